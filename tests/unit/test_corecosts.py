"""The dedicated-core calibration's codec costs: added to a file that lacks them, in
CPU seconds, with nothing else in the file changed."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpibelief import config as configs
from mpibelief.data import load_dataset
from mpibelief.simulate import corecosts, exchange_work
from mpibelief.simulate.corecosts import CoreCosts
from mpibelief.simulate.network import preset

SETS = ["data.source='synthetic'", "data.n_train=512", "data.n_test=64", "data.n_inputs=20",
        "data.n_classes=5", "model.hidden=16", "model.layers=1", "train.batch=16"]


def snapshot(path) -> dict:
    out = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            out[name] = (obj[()] if isinstance(obj, h5py.Dataset) else None,
                         dict(obj.attrs))
        f.visititems(visit)
        out["/"] = (None, dict(f.attrs))
    return out


def test_a_file_without_codec_costs_has_them_measured_and_added(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = configs.load(None, SETS)
    data = load_dataset(cfg.data)
    n = corecosts.model_size(cfg, data)
    path = tmp_path / "cal.h5"
    old = CoreCosts({1: 4e-5, 2: 2e-5}, {"sgd": 2e-10, "adagrad": 3e-9}, preset("1gbe"),
                    (0.9, 1.1))
    corecosts.write(path, old, {"n_params": n, "batch": 16, "network": "1gbe",
                                "cpu_step_seconds": np.array([1.0, 2.0])})
    before = snapshot(path)
    assert corecosts.read(path)[0].codec is None
    logged = []
    found, attrs = corecosts.load_or_measure(path, cfg, data, "1gbe", log=logged.append)
    assert set(found.codec) == set(exchange_work.CODEC)
    assert 0 < found.codec["encode_per_entry"] < 1e-6  # seconds per entry: ns, not us
    assert attrs["codec_clock"] == corecosts.CODEC_CLOCK and "codec costs added" in logged[0]
    assert found.compute == old.compute and found.apply == old.apply
    after = snapshot(path)
    for name, (value, obj_attrs) in before.items():  # everything there before, unchanged
        assert value is None or np.array_equal(after[name][0], value)
        new = after[name][1]
        assert all(np.array_equal(new[k], v) for k, v in obj_attrs.items())
        assert set(new) - set(obj_attrs) <= {k for k in new if k.startswith("codec_")}
    with h5py.File(path) as f:
        assert len(f["timings/codec_encode_seconds"]) == 30
    again, _ = corecosts.load_or_measure(path, cfg, data, "1gbe", log=logged.append)
    assert again.codec == found.codec and len(logged) == 1  # measured once


def test_a_file_for_another_model_is_refused_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = configs.load(None, SETS)
    data = load_dataset(cfg.data)
    path = tmp_path / "cal.h5"
    corecosts.write(path, CoreCosts({1: 4e-5}, {"sgd": 2e-10}, preset("1gbe"), (1.0,)),
                    {"n_params": 7, "batch": 16, "network": "1gbe"})
    before = path.read_bytes()
    with pytest.raises(Exception, match="n_params"):
        corecosts.load_or_measure(path, cfg, data, "1gbe", log=lambda *_: None)
    assert path.read_bytes() == before
