"""Data sources: FSDD features and cache, synthetic teacher, user HDF5, sharding.

WAV and HDF5 fixtures are built small in ``tmp_path``; one test reads the real FSDD
folder next to the repository and is skipped when it is absent.
"""

from __future__ import annotations

import multiprocessing
import wave
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpibelief.config import DataConfig
from mpibelief.data import Dataset, fsdd, load_dataset
from mpibelief.errors import DataError

REAL_FSDD = Path(__file__).resolve().parents[2].parent / "shared/data/fsdd"


def write_wav(path: Path, samples, rate=8000, width=2, channels=1) -> Path:
    """A PCM WAV file from integer samples (interleaved if ``channels > 1``)."""
    dtype = {1: np.uint8, 2: "<i2"}[width]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype).tobytes())
    return path


def tone(digit: int, take: int, n: int) -> np.ndarray:
    """A digit-dependent tone with a little noise, as int16 samples."""
    t = np.arange(n) / 8000.0
    rng = np.random.default_rng(100 * digit + take)
    x = np.sin(2 * np.pi * (300 + 150 * digit) * t) + 0.05 * rng.standard_normal(n)
    return (8000 * x).astype(np.int16)


@pytest.fixture
def fsdd_dir(tmp_path) -> Path:
    """Ten digits, one speaker, takes 0 (test) and 5, 6 (train), 0.15-0.35 s each."""
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for digit in range(10):
        for take in (0, 5, 6):
            write_wav(rec / f"{digit}_alice_{take}.wav", tone(digit, take, 1200 + 160 * digit))
    return tmp_path / "fsdd"


def fsdd_cfg(folder: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source="fsdd", path=str(folder), cache_dir=str(tmp_path / "cache"), **kw)


# --- FSDD: feature pieces -------------------------------------------------------------

def test_mel_filterbank_covers_every_band():
    fb = fsdd.mel_filterbank(fsdd.FeatureParams())
    assert fb.shape == (129, 40)
    assert (fb >= 0).all() and fb.max() <= 1.0
    assert (fb.sum(axis=0) > 0).all()  # no empty low band at 8 kHz / 256-point FFT
    assert np.argmax(fb[:, 0]) < np.argmax(fb[:, -1])


def test_frames_are_centred_every_hop():
    p = fsdd.FeatureParams()
    signal = np.arange(1000, dtype=np.float32)
    frames = fsdd.frame_signal(signal, p)
    assert frames.shape == ((1000 + 40) // 80, 200)  # one frame per 10 ms, rounded
    # Frame t is centred on sample t*hop + hop/2 (Kaldi's snip-edges=false).
    assert [frames[t, 100] for t in (2, 5)] == [2 * 80 + 40, 5 * 80 + 40]
    assert fsdd.frame_signal(signal[:30], p).shape == (0, 200)


def test_log_mel_shape_and_finite_on_silence():
    p = fsdd.FeatureParams()
    feats = fsdd.log_mel(np.zeros(800, np.int16), p)
    assert feats.shape == (10, 40) and feats.dtype == np.float32
    assert np.allclose(feats, np.log(p.log_floor))  # floored, not -inf


def test_stack_context_repeats_edges_within_each_utterance():
    frames = np.arange(5, dtype=np.float32)[:, None] * [1, -1]  # 5 frames of 2 features
    x = fsdd.stack_context(frames, np.array([2, 3]), context=3)
    assert x.shape == (5, 6)
    centre = x[:, 2]  # first feature of the middle frame
    left, right = x[:, 0], x[:, 4]
    assert list(centre) == [0, 1, 2, 3, 4]
    assert list(left) == [0, 0, 2, 2, 3]  # never reaches back into utterance 0
    assert list(right) == [1, 1, 3, 4, 4]


def test_state_targets_cut_each_utterance_into_k_segments():
    y = fsdd.state_targets(np.array([10, 5]), np.array([0, 3]), k=5)
    assert list(y[:10]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert list(y[10:]) == [15, 16, 17, 18, 19]
    assert y.dtype == np.int32


# --- FSDD: loading and caching --------------------------------------------------------

def test_load_fsdd_shapes_split_and_normalisation(fsdd_dir, tmp_path):
    data = load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    assert data.n_inputs == 440 and data.n_classes == 50 and data.name == "fsdd"
    test_frames = sum((1200 + 160 * d + 40) // 80 for d in range(10))  # take 0 only
    assert len(data.x_test) == test_frames
    assert len(data.x_train) == 2 * test_frames  # takes 5 and 6, same lengths
    assert set(np.unique(data.y_train)) == set(range(50))
    assert np.allclose(data.x_train.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(data.x_train.std(axis=0), 1, atol=1e-3)
    assert data.info["train_utterances"] == 20 and data.info["test_utterances"] == 10


def test_cache_is_reused_keyed_by_parameters_and_files(fsdd_dir, tmp_path):
    first = load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    second = load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    assert not first.info["cache_hit"] and second.info["cache_hit"]
    assert second.info["cache_file"] == first.info["cache_file"]
    assert np.array_equal(first.x_train, second.x_train)
    # K and context are applied after the cache: same file, still a hit.
    k3 = load_dataset(fsdd_cfg(fsdd_dir, tmp_path, states_per_digit=3))
    assert k3.info["cache_hit"] and k3.n_classes == 30
    # Different features or a changed recording: a new cache file.
    mels = load_dataset(fsdd_cfg(fsdd_dir, tmp_path, n_mels=20, n_inputs=220))
    assert not mels.info["cache_hit"] and mels.n_inputs == 220
    write_wav(fsdd_dir / "recordings" / "3_alice_5.wav", tone(3, 5, 4000))
    changed = load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    assert not changed.info["cache_hit"]
    assert len({first.info["cache_file"], mels.info["cache_file"],
                changed.info["cache_file"]}) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))  # temp files renamed or removed


def _load_test_labels(cfg: DataConfig) -> np.ndarray:
    return load_dataset(cfg).y_test


def test_concurrent_loads_share_one_complete_cache(fsdd_dir, tmp_path):
    # Like MPI ranks starting together: all build the cache, one rename wins.
    cfg = fsdd_cfg(fsdd_dir, tmp_path)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_load_test_labels, [cfg] * 3)
    assert all(np.array_equal(results[0], r) for r in results)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert load_dataset(cfg).info["cache_hit"]


def test_corrupt_cache_is_rebuilt(fsdd_dir, tmp_path):
    first = load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    cache = Path(first.info["cache_file"])
    cache.write_bytes(cache.read_bytes()[:2000])  # a half-written file
    again = load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    assert not again.info["cache_hit"]
    assert np.array_equal(first.x_test, again.x_test)
    assert load_dataset(fsdd_cfg(fsdd_dir, tmp_path)).info["cache_hit"]


def test_unwritable_cache_dir_is_a_data_error(fsdd_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = replace(fsdd_cfg(fsdd_dir, tmp_path), cache_dir=str(blocker / "cache"))
    with pytest.raises(DataError, match="cannot write feature cache"):
        load_dataset(cfg)


# --- FSDD: errors ---------------------------------------------------------------------

def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="FSDD folder not found: .*nowhere"):
        load_dataset(fsdd_cfg(tmp_path / "nowhere", tmp_path))
    (tmp_path / "empty" / "recordings").mkdir(parents=True)
    with pytest.raises(DataError, match="no FSDD recordings"):
        load_dataset(fsdd_cfg(tmp_path / "empty", tmp_path))


def test_truncated_wav_names_the_file(fsdd_dir, tmp_path):
    bad = fsdd_dir / "recordings" / "4_alice_5.wav"
    bad.write_bytes(bad.read_bytes()[:-500])  # header still declares the full length
    with pytest.raises(DataError, match=r"4_alice_5\.wav: truncated"):
        load_dataset(fsdd_cfg(fsdd_dir, tmp_path))


@pytest.mark.parametrize("content", [b"", b"not a wav file at all, just text" * 4,
                                     b"RIFF\x10\x00\x00\x00WAVE"])
def test_non_wav_names_the_file(fsdd_dir, tmp_path, content):
    (fsdd_dir / "recordings" / "2_alice_6.wav").write_bytes(content)
    with pytest.raises(DataError, match=r"2_alice_6\.wav: not a valid WAV"):
        load_dataset(fsdd_cfg(fsdd_dir, tmp_path))


@pytest.mark.parametrize("kw, what", [
    ({"rate": 16000}, "16000 Hz"),
    ({"width": 1}, "8-bit"),
    ({"channels": 2}, "2 channel"),
])
def test_wrong_wav_format(fsdd_dir, tmp_path, kw, what):
    samples = np.zeros(1600 * kw.get("channels", 1), np.uint8 if kw.get("width") else np.int16)
    write_wav(fsdd_dir / "recordings" / "7_alice_5.wav", samples, **kw)
    with pytest.raises(DataError, match=rf"7_alice_5\.wav: .*{what}.*expected mono 16-bit"):
        load_dataset(fsdd_cfg(fsdd_dir, tmp_path))


def test_bad_name_too_short_and_missing_split(fsdd_dir, tmp_path):
    odd = write_wav(fsdd_dir / "recordings" / "hello.wav", tone(0, 0, 800))
    with pytest.raises(DataError, match=r"hello\.wav: name is not"):
        load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    odd.unlink()
    short = write_wav(fsdd_dir / "recordings" / "1_alice_7.wav", tone(1, 7, 20))
    with pytest.raises(DataError, match=r"1_alice_7\.wav: too short"):
        load_dataset(fsdd_cfg(fsdd_dir, tmp_path))
    short.unlink()
    for path in (fsdd_dir / "recordings").glob("*_0.wav"):
        path.unlink()
    with pytest.raises(DataError, match="no test recordings"):
        load_dataset(fsdd_cfg(fsdd_dir, tmp_path))


# --- FSDD: the real folder ------------------------------------------------------------

@pytest.mark.skipif(not REAL_FSDD.is_dir(), reason=f"FSDD not found at {REAL_FSDD}")
def test_real_fsdd(tmp_path):
    data = load_dataset(fsdd_cfg(REAL_FSDD, tmp_path))
    assert data.n_inputs == 440 and data.n_classes == 50
    total = len(data.x_train) + len(data.x_test)
    assert 125_000 < total < 137_000  # about 22 minutes of audio at 10 ms per frame
    assert data.info["train_utterances"] == 2700 and data.info["test_utterances"] == 300
    assert 0.08 < len(data.x_test) / total < 0.12  # takes 0-4 are a tenth of the takes
    for y in (data.y_train, data.y_test):
        assert set(np.unique(y)) == set(range(50))
    assert np.isfinite(data.x_train).all() and np.isfinite(data.x_test).all()


# --- synthetic ------------------------------------------------------------------------

SYNTH = DataConfig(source="synthetic", n_train=3000, n_test=500, n_inputs=20, n_classes=8,
                   seed=3)


def test_synthetic_is_deterministic_and_balanced():
    a, b = load_dataset(SYNTH), load_dataset(SYNTH)
    assert a.x_train.shape == (3000, 20) and a.x_test.shape == (500, 20)
    assert a.n_classes == 8 and a.name == "synthetic"
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    counts = np.bincount(a.y_train, minlength=8)
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.5 * counts.mean()
    other = load_dataset(replace(SYNTH, seed=4))
    assert not np.array_equal(a.y_train, other.y_train)


def test_synthetic_test_set_does_not_depend_on_train_size():
    a, b = load_dataset(SYNTH), load_dataset(replace(SYNTH, n_train=100))
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_test, b.y_test)
    assert np.array_equal(a.y_train[:100], b.y_train)


def test_synthetic_teacher_is_not_linear():
    # A least-squares linear classifier fits much worse than the teacher's 100%.
    data = load_dataset(replace(SYNTH, n_train=6000))
    onehot = np.eye(8)[data.y_train]
    x = np.c_[data.x_train, np.ones(len(data.x_train))]
    w = np.linalg.lstsq(x, onehot, rcond=None)[0]
    accuracy = (np.c_[data.x_test, np.ones(500)] @ w).argmax(1) == data.y_test
    assert 1 / 8 + 0.05 < accuracy.mean() < 0.95


def test_synthetic_bad_sizes():
    with pytest.raises(DataError, match="n_classes >= 2"):
        load_dataset(replace(SYNTH, n_classes=1))
    with pytest.raises(DataError, match="n_train >= 1"):
        load_dataset(replace(SYNTH, n_train=0))


# --- user HDF5 ------------------------------------------------------------------------

def write_h5(path: Path, attrs=None, drop=(), **override) -> Path:
    """A valid user file with 10 train and 4 test rows of 3 features, then changes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train/x": rng.standard_normal((10, 3)), "train/y": np.arange(10) % 4,
        "test/x": rng.standard_normal((4, 3)), "test/y": np.array([0, 1, 2, 3]),
    }
    arrays.update({k.replace("_", "/"): v for k, v in override.items()})
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            if name not in drop:
                f[name] = value
        f.attrs.update(attrs or {})
    return path


def h5_cfg(path: Path) -> DataConfig:
    return DataConfig(source="hdf5", path=str(path))


def test_hdf5_valid_file(tmp_path):
    data = load_dataset(h5_cfg(write_h5(tmp_path / "data.h5")))
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    assert data.y_train.dtype == np.int32 and data.x_test.shape == (4, 3)
    assert data.n_classes == 4
    wide = load_dataset(h5_cfg(write_h5(tmp_path / "wide.h5", attrs={"n_classes": 10})))
    assert wide.n_classes == 10 and wide.info["n_classes_from"] == "attribute"


@pytest.mark.parametrize("name", ["train/x", "train/y", "test/x", "test/y"])
def test_hdf5_missing_dataset(tmp_path, name):
    path = write_h5(tmp_path / "data.h5", drop=(name,))
    with pytest.raises(DataError, match=rf"data\.h5: missing dataset /{name}$"):
        load_dataset(h5_cfg(path))


@pytest.mark.parametrize("override, message", [
    ({"train_x": np.zeros(10)}, r"/train/x must be 2-D"),
    ({"test_y": np.zeros((4, 1), int)}, r"/test/y must be 1-D"),
    ({"train_y": np.arange(9) % 4}, r"/train/x has 10 rows but /train/y has 9"),
    ({"test_x": np.zeros((4, 5))}, r"/train/x has 3 features but /test/x has 5"),
    ({"train_x": np.array([["a"] * 3] * 10, dtype="S1")}, r"/train/x has dtype .*floating"),
    ({"train_y": np.zeros(10)}, r"/train/y has dtype float64, expected integer"),
    ({"test_y": np.array([0, -2, 1, 1])}, r"/test/y has negative label -2"),
    ({"train_x": np.full((10, 3), np.nan)}, r"/train/x contains NaN"),
    ({"train_x": np.zeros((0, 3)), "train_y": np.zeros(0, int)}, r"/train/x is empty"),
])
def test_hdf5_bad_contents(tmp_path, override, message):
    path = write_h5(tmp_path / "data.h5", **override)
    with pytest.raises(DataError, match=message):
        load_dataset(h5_cfg(path))


def test_hdf5_labels_beyond_n_classes_attribute(tmp_path):
    path = write_h5(tmp_path / "data.h5", attrs={"n_classes": 3})
    with pytest.raises(DataError, match=r"label 3, outside 0\.\.2 \(attribute n_classes = 3\)"):
        load_dataset(h5_cfg(path))
    path = write_h5(tmp_path / "data.h5", attrs={"n_classes": "ten"})
    with pytest.raises(DataError, match="attribute n_classes = 'ten'"):
        load_dataset(h5_cfg(path))


def test_hdf5_missing_or_not_hdf5(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*absent\.h5"):
        load_dataset(h5_cfg(tmp_path / "absent.h5"))
    junk = tmp_path / "junk.h5"
    junk.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"junk\.h5: not a readable HDF5 file"):
        load_dataset(h5_cfg(junk))


# --- Dataset and dispatch -------------------------------------------------------------

def test_shards_cover_training_set_exactly_once():
    data = load_dataset(replace(SYNTH, n_train=1001))
    shards = [data.shard(i, 3) for i in range(3)]
    rows = np.concatenate([s.x_train for s in shards])
    order = np.lexsort(rows.T)
    assert np.array_equal(rows[order], data.x_train[np.lexsort(data.x_train.T)])
    assert sum(len(s.y_train) for s in shards) == 1001
    for s in shards:
        assert s.x_test is data.x_test and s.x_train.flags.c_contiguous
        assert set(np.unique(s.y_train)) == set(range(8))  # strided: every class
    assert data.shard(0, 1) is data


def test_shard_arguments():
    data = load_dataset(replace(SYNTH, n_train=4))
    with pytest.raises(ValueError):
        data.shard(3, 3)
    with pytest.raises(DataError, match="5 replicas but only 4 training rows"):
        data.shard(0, 5)


def test_dataset_rejects_wrong_arrays_and_unknown_source():
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError):
        Dataset(x.astype(np.float64), y, x, y, n_classes=2, name="bad")
    with pytest.raises(ValueError):
        Dataset(x, y[:1], x, y, n_classes=2, name="bad")
    with pytest.raises(DataError, match="unknown data source"):
        load_dataset(DataConfig(source="csv"))
