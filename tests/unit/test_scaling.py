"""The scaling model (no MPI): its arithmetic on hand-made numbers, and on a tiny real
model whose tiles are really timed and whose bytes come from the plan."""

from __future__ import annotations

import numpy as np
import pytest

from mpibelief.layers import Dense
from mpibelief.model import Model, image_stack
from mpibelief.plan import boundary_bytes
from mpibelief.simulate.compute import LayerTimer
from mpibelief.simulate.network import PRESETS, Network, preset
from mpibelief.simulate.scaling import Scaling, exchange_seconds, predict

NET = Network("test", latency=1e-3, bandwidth=1e6)  # 1 ms a message, 1 MB/s


def tiny_image():
    return Model.of(image_stack((12, 12, 2), 5, 3, rf=3, strides=(1, 1), pools=(2, 1), lcn=3),
                    (12, 12, 2), "logistic", allocate=False)


def test_an_exchange_costs_the_busiest_partitions_messages():
    # 0 sends 2 MB to 1 and 1 MB to 2; 1 sends 1 MB to 0: partition 0 sends the most
    b = np.array([[0, 2e6, 1e6], [1e6, 0, 0], [0, 0, 0]])
    assert exchange_seconds(b, NET) == pytest.approx(2 * 1e-3 + 3.0)
    assert exchange_seconds(np.zeros((1, 1)), NET) == 0.0


def test_predict_sums_the_slowest_tile_per_layer_and_both_directions():
    fwd = np.array([[1.0, 3.0], [2.0, 2.0]])  # layer 0 unbalanced, layer 1 balanced
    bwd = 2 * fwd
    bytes_fwd = np.zeros((2, 2, 2))
    bytes_fwd[1, 0, 1] = bytes_fwd[1, 1, 0] = 1e6  # layer 1's halo, each way
    got = predict(fwd, bwd, bytes_fwd, NET, batch=4, factor=2.0)
    assert got["compute"] == pytest.approx(2.0 * (3 + 2 + 6 + 4))
    assert got["wait"] == pytest.approx(2.0 * (1 + 2))  # max - mean of layer 0, fwd + bwd
    loss = 3 * 2 * 1 * (1e-3 + 32 / 1e6)  # 3 allreduces, log2(2) = 1 round each way
    assert got["comm"] == pytest.approx(2 * (1e-3 + 1.0) + loss)
    assert got["seconds"] == pytest.approx(got["compute"] + got["comm"])


def test_tiles_are_timed_once_per_distinct_shape():
    model = tiny_image()
    timer = LayerTimer(model, batch=4)
    fwd, bwd = timer.times(4)  # 2x2 tiles of even maps: one shape per layer
    assert fwd.shape == bwd.shape == (len(model.layers), 4)
    assert (fwd > 0).all() and (bwd > 0).all()
    assert timer.timed <= 4 * len(model.layers)  # odd maps: two heights, two widths
    before = timer.timed
    again = timer.times(4)
    assert timer.timed == before  # all cached
    np.testing.assert_array_equal(again[0], fwd)


def test_the_curve_starts_at_one_and_a_slow_network_stops_a_dense_model():
    model = Model(20, 6, 16, 2, "sigmoid", allocate=False)
    scaling = Scaling(model, batch=8, partitions=[2, 4])
    assert scaling.partitions == [1, 2, 4]
    np.testing.assert_array_equal(scaling.bytes[4], boundary_bytes(model, 4, 8))
    fast = scaling.curve(Network("ideal", 0.0, 1e30))
    assert fast["speedup"][0] == 1.0 and fast["comm"][0] == 0.0
    slow = scaling.curve(Network("slow", 1.0, 1e3))  # a second per message
    assert slow["speedup"][2] < slow["speedup"][1] < 1.0
    assert isinstance(model.layers[0], Dense)


def test_presets_and_an_unknown_one():
    assert set(PRESETS) == {"1gbe", "10gbe", "infiniband"}
    assert preset("1gbe").bandwidth < preset("10gbe").bandwidth < preset("infiniband").bandwidth
    with pytest.raises(Exception, match="unknown network preset"):
        preset("token-ring")


def test_the_refit_takes_the_models_the_file_measured_from_their_configs(tmp_path):
    import h5py

    from mpibelief.simulate.scaling import REPO, fitted_models, model_config

    assert model_config("speech") == ("speech", REPO / "configs" / "speech.toml")
    own = tmp_path / "mine.toml"
    assert model_config(str(own)) == ("mine", own)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_group("measured/mine/P1").attrs["batch"] = 4
        f["measured/mine"].attrs["config"] = str(own)
        f.create_group("measured/speech/P2").attrs["batch"] = 8  # a file from before
        assert fitted_models(f, []) == {"mine": (own, 4), "speech": (REPO / "configs" /
                                                                     "speech.toml", 8)}
        # Named on the command line: those only, the measured batch where there is one.
        assert fitted_models(f, ["images_80m", "speech"]) == {
            "images_80m": (REPO / "configs" / "images_80m.toml", None),
            "speech": (REPO / "configs" / "speech.toml", 8)}
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        assert list(fitted_models(f, [])) == ["speech", "images_80m", "images_330m",
                                              "images_1700m"]
