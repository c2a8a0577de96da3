"""Real speech: frame-level "state" targets from the Free Spoken Digit Dataset.

The input is the DistBelief speech model's input: 25 ms Hamming-windowed frames every
10 ms, 40 log mel-filterbank energies per frame, 11 consecutive frames stacked into 440
inputs, each input dimension normalised to zero mean and unit variance with statistics of
the training set only.  The targets stand in for HMM states: each utterance's frames are
cut into ``K`` equal segments and frame ``t`` of digit ``d`` gets class ``d*K + segment``.
The official split puts takes 0-4 of every speaker and digit in the test set.

Log mel frames are the expensive part (a few seconds for all 3000 files), so they are
cached in one HDF5 file under ``cfg.cache_dir``, named by a hash of the feature
parameters and of the folder's file list (names, sizes, mtimes): a changed parameter or
dataset gets a new file rather than stale features.  Stacking, targets and
normalisation depend on ``context`` and ``K`` and are cheap, so they are redone at each
load and one cache serves every ``K``.

Frames follow Kaldi's ``snip-edges=false`` convention: an utterance of ``n`` samples has
``round(n / hop)`` frames centred on successive 10 ms steps, edges reflected, so every
10 ms of audio (about 131,000 frames in all) gets exactly one target.

Dataset: Z. Jackson et al., Free Spoken Digit Dataset, CC BY-SA 4.0
(github.com/Jakobovski/free-spoken-digit-dataset).  It is read in place, never copied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mpibelief.config import DataConfig
from mpibelief.data import Dataset
from mpibelief.errors import DataError

# Bump when the extraction code changes meaning, so old caches are not reused.
CACHE_VERSION = 1
N_DIGITS = 10
TEST_TAKES = range(0, 5)
_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


@dataclass(frozen=True)
class FeatureParams:
    """Everything that determines the cached log mel frames (and hence its name)."""

    sample_rate: int = 8000
    frame_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 256
    n_mels: int = 40
    f_min: float = 0.0
    f_max: float = 4000.0
    preemphasis: float = 0.97
    log_floor: float = 1e-6

    @property
    def frame_len(self) -> int:
        return round(self.sample_rate * self.frame_ms / 1000)

    @property
    def hop(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)


@dataclass(frozen=True)
class Recording:
    """One WAV file and the labels its name carries."""

    path: Path
    digit: int
    speaker: str
    take: int


def mel_filterbank(p: FeatureParams) -> np.ndarray:
    """Triangular filters equally spaced on the HTK mel scale, shape ``(n_fft//2+1, n_mels)``.

    Each filter rises from the previous centre to its own and falls to the next, with
    peak 1; at 8 kHz with 40 filters the low ones span only one or two FFT bins, which
    is the usual price of the paper's 40 bands on narrowband audio.
    """
    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(p.f_min), to_mel(p.f_max), p.n_mels + 2))
    bins = np.fft.rfftfreq(p.n_fft, 1.0 / p.sample_rate)[:, None]
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    rise = (bins - lo) / (mid - lo)
    fall = (hi - bins) / (hi - mid)
    return np.maximum(0.0, np.minimum(rise, fall)).astype(np.float32)


def frame_signal(signal: np.ndarray, p: FeatureParams) -> np.ndarray:
    """Cut ``n`` samples into ``(n + hop/2) // hop`` overlapping frames ``(T, frame_len)``.

    Frame ``t`` is centred on sample ``t*hop + hop/2``; the signal is reflected at both
    ends so edge frames are full length.  The frames are a strided view (no copy).
    """
    n, hop, length = len(signal), p.hop, p.frame_len
    n_frames = (n + hop // 2) // hop
    if n_frames == 0:
        return np.empty((0, length), signal.dtype)
    left = (length - hop) // 2
    right = max(0, (n_frames - 1) * hop + length - left - n)
    padded = np.pad(signal, (left, right), mode="reflect" if n > 1 else "edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, length)
    return windows[: (n_frames - 1) * hop + 1 : hop]


def log_mel(signal: np.ndarray, p: FeatureParams) -> np.ndarray:
    """Log mel energies of one int16 (or float) signal, shape ``(T, n_mels)`` float32."""
    return _frames_to_log_mel(frame_signal(_emphasise(signal, p), p), p, mel_filterbank(p))


def _emphasise(samples: np.ndarray, p: FeatureParams) -> np.ndarray:
    """Scale int16 samples to [-1, 1) and apply pre-emphasis (a first difference).

    Speech spectra fall by about 6 dB per octave; pre-emphasis flattens them so the
    upper mel bands are not buried under the log floor.
    """
    x = np.asarray(samples, np.float32) / 32768.0
    if p.preemphasis and len(x) > 1:
        x = np.append(x[:1], x[1:] - np.float32(p.preemphasis) * x[:-1])
    return x


def _frames_to_log_mel(frames: np.ndarray, p: FeatureParams, fbank: np.ndarray):
    # Remove each frame's DC offset before windowing, as HTK and Kaldi do; some
    # recordings carry a constant offset that would otherwise fill the lowest band.
    frames = frames - frames.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(frames * np.hamming(p.frame_len).astype(np.float32), p.n_fft)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return np.log(np.maximum(power @ fbank, p.log_floor))


def read_wav(path: Path, sample_rate: int = 8000) -> np.ndarray:
    """Samples of a 16-bit mono WAV file as int16.

    Raises:
        DataError: not a readable RIFF/WAVE file, truncated, or not 16-bit mono at
            ``sample_rate`` Hz; the message names the file.
    """
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            declared = w.getnframes()
            raw = w.readframes(declared)
    except (wave.Error, EOFError) as exc:
        raise DataError(f"{path}: not a valid WAV file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if (channels, width, rate) != (1, 2, sample_rate):
        raise DataError(
            f"{path}: {channels} channel(s), {8 * width}-bit, {rate} Hz; "
            f"expected mono 16-bit {sample_rate} Hz"
        )
    if len(raw) < 2 * declared:
        raise DataError(
            f"{path}: truncated, header declares {declared} samples but only "
            f"{len(raw) // 2} are present"
        )
    return np.frombuffer(raw, dtype="<i2")


def list_recordings(folder: Path) -> list[Recording]:
    """The FSDD recordings under ``folder`` (or ``folder/recordings``), sorted by name.

    Raises:
        DataError: missing folder, no WAV files, or a WAV whose name is not
            ``{digit}_{speaker}_{take}.wav``.
    """
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f" (looked in {folder.resolve()})"
        raise DataError(f"FSDD folder not found: {folder}{where}")
    wav_dir = folder / "recordings" if (folder / "recordings").is_dir() else folder
    recordings = []
    for path in sorted(wav_dir.glob("*.wav")):
        match = _NAME.match(path.name)
        if match is None:
            raise DataError(f"{path}: name is not {{digit}}_{{speaker}}_{{take}}.wav")
        digit, speaker, take = match.groups()
        recordings.append(Recording(path, int(digit), speaker, int(take)))
    if not recordings:
        raise DataError(f"no FSDD recordings (*.wav) in {wav_dir}")
    return recordings


def extract(recordings: list[Recording], p: FeatureParams):
    """Log mel frames of every recording, concatenated.

    Returns:
        ``(frames, lengths)``: float32 ``(sum(lengths), n_mels)`` and int64 frame
        counts per recording.  Framing is per file, but the FFT and the filterbank run
        once over all frames, which is what makes 3000 files take seconds.
    """
    chunks, lengths = [], []
    for rec in recordings:
        x = _emphasise(read_wav(rec.path, p.sample_rate), p)
        frames = frame_signal(x, p)
        if len(frames) == 0:
            raise DataError(f"{rec.path}: too short ({len(x)} samples) for one frame")
        chunks.append(frames)
        lengths.append(len(frames))
    frames = np.concatenate(chunks)
    return _frames_to_log_mel(frames, p, mel_filterbank(p)), np.asarray(lengths, np.int64)


def cache_key(recordings: list[Recording], p: FeatureParams) -> str:
    """SHA-256 of the feature parameters and every file's name, size and mtime."""
    digest = hashlib.sha256()
    params = {"version": CACHE_VERSION, **dataclasses.asdict(p)}
    digest.update(json.dumps(params, sort_keys=True).encode())
    for rec in recordings:
        try:
            st = rec.path.stat()
        except OSError as exc:
            raise DataError(f"{rec.path}: cannot read ({exc.strerror or exc})") from None
        digest.update(f"{rec.path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_log_mel(recordings: list[Recording], p: FeatureParams, cache_dir: Path):
    """Log mel frames of ``recordings``, from the cache when it is valid.

    Returns:
        ``(frames, lengths, cache_file, hit)``; ``hit`` says whether the cache served.
    """
    key = cache_key(recordings, p)
    path = cache_dir / f"fsdd-{key[:16]}.h5"
    cached = _read_cache(path, key, len(recordings))
    if cached is not None:
        return (*cached, path, True)
    frames, lengths = extract(recordings, p)
    _write_cache(path, key, frames, lengths, recordings, p)
    return frames, lengths, path, False


def _read_cache(path: Path, key: str, n_recordings: int):
    """``(frames, lengths)`` from a cache file, or None if absent, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("key") != key:
                return None
            frames, lengths = f["frames"][...], f["lengths"][...].astype(np.int64)
    except (OSError, KeyError, ValueError, TypeError):
        return None  # unreadable or half-formed: rebuilt by the caller
    ok = (
        frames.dtype == np.float32 and frames.ndim == 2 and lengths.shape == (n_recordings,)
        and lengths.sum() == len(frames) and bool(np.isfinite(frames).all())
    )
    return (frames, lengths) if ok else None


def _write_cache(path, key, frames, lengths, recordings, p) -> None:
    """Write the cache to a temporary file and rename it into place.

    The rename is atomic, so MPI ranks that build the cache at the same time, or a run
    killed mid-write, never leave a half file under the final name.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DataError(f"cannot write feature cache in {path.parent}: {exc.strerror}") from None
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["key"] = key
            f.attrs["params"] = json.dumps(dataclasses.asdict(p), sort_keys=True)
            f.create_dataset("frames", data=frames)
            f.create_dataset("lengths", data=lengths)
            f.create_dataset("files", data=[r.path.name for r in recordings])
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shareable
        os.replace(tmp, path)
    except OSError as exc:
        raise DataError(f"cannot write feature cache {path}: {exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def stack_context(frames: np.ndarray, lengths: np.ndarray, context: int) -> np.ndarray:
    """Each frame with its ``context // 2`` neighbours on both sides, flattened.

    Neighbours never cross into another utterance: near an edge the first or last
    frame is repeated.  Returns float32 ``(len(frames), context * n_mels)``.
    """
    half = context // 2
    ends = np.cumsum(lengths)
    first = np.repeat(ends - lengths, lengths)[:, None]
    last = np.repeat(ends - 1, lengths)[:, None]
    idx = np.arange(len(frames))[:, None] + np.arange(-half, half + 1)
    np.clip(idx, first, last, out=idx)
    return frames[idx].reshape(len(frames), -1)


def state_targets(lengths: np.ndarray, digits: np.ndarray, k: int) -> np.ndarray:
    """Class ``digit*k + segment`` per frame, the utterance cut into ``k`` equal segments."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(int(lengths.sum())) - starts
    segment = position * k // np.repeat(lengths, lengths)
    return (np.repeat(digits, lengths) * k + segment).astype(np.int32)


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> None:
    """Scale every input to zero mean, unit variance by training statistics, in place."""
    total, total_sq = np.zeros(x_train.shape[1]), np.zeros(x_train.shape[1])
    for start in range(0, len(x_train), 16384):  # float64 sums without a float64 copy
        chunk = x_train[start : start + 16384].astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += (chunk * chunk).sum(axis=0)
    mean = total / len(x_train)
    std = np.sqrt(np.maximum(total_sq / len(x_train) - mean * mean, 0.0))
    scale = 1.0 / np.where(std > 1e-6, std, 1.0)  # a constant input stays constant
    for x in (x_train, x_test):
        x -= mean.astype(np.float32)
        x *= scale.astype(np.float32)


def load_fsdd(cfg: DataConfig) -> Dataset:
    """Frame-level speech-state data from the FSDD folder ``cfg.path``.

    Raises:
        DataError: missing folder, no recordings, a corrupt or wrong-format WAV (named),
            no test or no training takes, or an unwritable cache folder.
    """
    params = FeatureParams(n_mels=cfg.n_mels)
    recordings = list_recordings(Path(cfg.path))
    frames, lengths, cache_file, hit = cached_log_mel(recordings, params, Path(cfg.cache_dir))
    is_test = np.array([r.take in TEST_TAKES for r in recordings])
    digits = np.array([r.digit for r in recordings])
    splits = {}
    for name, keep in (("train", ~is_test), ("test", is_test)):
        if not keep.any():
            raise DataError(f"no {name} recordings in {cfg.path} (test takes are 0-4)")
        x = stack_context(frames[np.repeat(keep, lengths)], lengths[keep], cfg.context)
        splits[name] = (x, state_targets(lengths[keep], digits[keep], cfg.states_per_digit))
    _normalise(splits["train"][0], splits["test"][0])
    info = {
        **dataclasses.asdict(params),
        "path": str(Path(cfg.path).resolve()),
        "cache_file": str(cache_file),
        "cache_hit": hit,
        "context": cfg.context,
        "states_per_digit": cfg.states_per_digit,
        "train_utterances": int((~is_test).sum()),
        "test_utterances": int(is_test.sum()),
    }
    return Dataset(
        *splits["train"], *splits["test"],
        n_classes=N_DIGITS * cfg.states_per_digit, name="fsdd", info=info,
    )
