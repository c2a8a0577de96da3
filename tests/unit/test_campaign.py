"""Figures 4 and 5's campaign machinery, without running a campaign.

Time to target on hand-made curves, the target rule against the paper's placement, the
machines and cores counting, the refusal to replace a file, a campaign file written
from hand-made runs read back and drawn by both plots, and the shard links' contention
in the simulated cluster.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpibelief.errors import UserError
from mpibelief.simulate import campaign
from mpibelief.simulate.campaign import Method, choose_target, time_to_target
from mpibelief.simulate.corecosts import CoreCosts
from mpibelief.simulate.network import preset
from mpibelief.simulate.warmstart import Warmstart


def test_time_to_target_interpolates_between_the_evaluations_around_the_crossing():
    seconds, acc = [0.0, 1.0, 2.0, 3.0], [0.1, 0.3, 0.5, 0.7]
    assert time_to_target(seconds, acc, 0.4) == pytest.approx(1.5)
    assert time_to_target(seconds, acc, 0.5) == pytest.approx(2.0)  # an exact hit
    assert time_to_target(seconds, acc, 0.05) == 0.0  # reached before the first step
    assert math.isnan(time_to_target(seconds, acc, 0.71))  # never


def test_time_to_target_takes_the_first_crossing_of_a_noisy_curve():
    seconds, acc = [0.0, 2.0, 4.0, 6.0], [0.1, 0.6, 0.3, 0.8]
    assert time_to_target(seconds, acc, 0.5) == pytest.approx(2.0 * 0.4 / 0.5)


def test_target_sits_where_the_papers_does():
    # The paper: 16% between its 6.7% warmstart and 22.1% best; the rule gives it back
    # (to the half point it rounds down to).
    assert choose_target(0.067, 0.221) == pytest.approx(0.16)
    assert choose_target(0.3937, 0.60) == pytest.approx(0.515)  # 0.5182 rounded down
    with pytest.raises(UserError, match="no method improved"):
        choose_target(0.5, 0.5)


def test_machines_and_cores_as_stated():
    down = Method("Downpour [20] + Adagrad", "downpour", 20, 10, 4)
    assert (down.machines, down.cores) == (30, 90)  # 20 replicas of 4 cores, 10 shards
    sb = Method("Sandblaster L-BFGS [2000]", "sandblaster", 2000, 100)
    assert (sb.machines, sb.cores) == (2101, 2101)  # + the coordinator
    sgd = Method("SGD [1], 8 cores", "sgd", 1, 0, 8)
    assert (sgd.machines, sgd.cores) == (1, 8)
    assert down.key == "downpour_20_adagrad" and sgd.key == "sgd_1_8_cores"
    assert "machines = replicas + shards" in campaign.COUNTING


def test_an_existing_campaign_file_is_refused(tmp_path):
    out = tmp_path / "fig4.h5"
    campaign.refuse_existing(out, overwrite=False)  # absent: fine
    out.write_bytes(b"x")
    with pytest.raises(UserError, match="--overwrite"):
        campaign.refuse_existing(out, overwrite=False)
    campaign.refuse_existing(out, overwrite=True)
    assert out.read_bytes() == b"x"  # refusing touches nothing


def made_campaign(tmp_path, name="fig4"):
    """A campaign file from hand-made curves: two rows reach the target, one does not,
    one is skipped."""
    warm = Warmstart(np.zeros(10, np.float32), 1.0, 100, 12800,
                     {"wall_seconds": np.array([0.0, 0.5, 1.0]),
                      "test_accuracy": np.array([0.02, 0.3, 0.4])})
    rows = [Method("Downpour [20]", "downpour", 20, 10, sets=("train.optimizer='sgd'",),
                   rates=(0.003,), family="Downpour", paper="Downpour [20]"),
            Method("Downpour [200] + Adagrad", "downpour", 200, 100, family="Downpour + Adagrad",
                   paper="Downpour [200] + Adagrad"),
            Method("Downpour [20] + Adagrad, 4 cores each", "downpour", 20, 10, 4,
                   family="Downpour + Adagrad", paper="Downpour [20] + Adagrad"),
            Method("SGD [1]", "sgd", 1, 0, family="SGD [1]", paper="SGD [1]")]
    curves = [[0.4, 0.45, 0.5, 0.55], [0.4, 0.5, 0.6, 0.62], [0.4, 0.42, 0.44, 0.45]]
    runs = {}
    for m, acc in zip(rows, curves, strict=False):
        t = np.array([0.0, 1.0, 2.0, 3.0])
        runs[m.key] = {"metrics": {"wall_seconds": t, "test_accuracy": np.array(acc),
                                   "train_accuracy": np.array(acc) + 0.01},
                       "lr": 0.003, "real_seconds": 1.0, "signature": m.key}
        runs[m.key]["time_to_target"] = time_to_target(1.0 + t, acc, 0.52)
    costs = CoreCosts({1: 4e-5, 4: 1.3e-5}, {"sgd": 2e-10, "adagrad": 3e-9}, preset("1gbe"),
                      (0.9, 1.1))
    attrs = {"campaign": name, "target": 0.52, "n_params": 10, "network": "1gbe",
             "latency": 50e-6, "bandwidth": 117e6, "epochs": 4.0, "horizon": 4.0,
             "quick": False}
    out = tmp_path / f"{name}.h5"
    campaign.write(out, attrs, costs, warm, runs, {rows[3].key: "not simulated yet"},
                   {m.key: m for m in rows})
    return out


def test_campaign_file_round_trip(tmp_path):
    data = campaign.read(made_campaign(tmp_path))
    assert data["attrs"]["target"] == 0.52 and data["attrs"]["warmstart_seconds"] == 1.0
    assert set(data["runs"]) == {"downpour_20", "downpour_200_adagrad",
                                 "downpour_20_adagrad_4_cores_each"}
    fast = data["runs"]["downpour_200_adagrad"]["attrs"]
    assert fast["time_to_target"] == pytest.approx(1.0 + 1.2)  # 0.5 -> 0.6 in [1, 2]
    assert math.isnan(data["runs"]["downpour_20_adagrad_4_cores_each"]["attrs"]["time_to_target"])
    assert data["runs"]["downpour_20_adagrad_4_cores_each"]["attrs"]["cores"] == 90
    assert data["skipped"]["sgd_1"]["why"] == "not simulated yet"
    assert not list(tmp_path.glob(".*.part"))  # built aside, moved into place
    with pytest.raises(UserError, match="campaign file"):
        campaign.read(tmp_path / "missing.h5")


def test_both_plots_draw_from_a_campaign_file(tmp_path):
    from mpibelief.plots.fig4 import plot_fig4
    from mpibelief.plots.fig5 import families, plot_fig5

    path = made_campaign(tmp_path)
    for plot, name in ((plot_fig4, "fig4.png"), (plot_fig5, "fig5.png")):
        png = plot(str(path), str(tmp_path / name))
        assert png.stat().st_size > 20_000
    fams = families(campaign.read(path))
    assert sorted(fams) == ["Downpour", "Downpour + Adagrad"]
    assert [p[:2] for p in fams["Downpour + Adagrad"]] == [(300, 300), (30, 90)]


def test_shard_links_share_a_shards_bandwidth():
    """Four replicas pushing 1 MB pieces to one shard: without links the transfers
    overlap; with them the shard's link carries one at a time, so the run takes at
    least all the bytes over the bandwidth, and longer than without."""
    from mpibelief.data import load_dataset
    from mpibelief.simulate.cluster import Faults
    from mpibelief.simulate.run import build
    from tests.unit.test_simulate import COSTS, cfg_of

    cfg = cfg_of(replicas=4, shards=1, epochs=1.0)
    data = load_dataset(cfg.data)
    slow_net = dict(latency=1e-5, bandwidth=1e4)  # a piece of 421 floats: 0.17 s
    ends = {}
    for links in (False, True):
        costs = COSTS.__class__(**{**COSTS.__dict__, **slow_net, "shard_links": links})
        _, server, cluster = build(cfg, data, costs, Faults())
        cluster.run()
        ends[links] = cluster.env.now
        moved = sum(s.stats.applied for s in server.states) * 4 * server.n_params
    assert ends[True] >= moved / slow_net["bandwidth"]  # pushes alone fill the link
    assert ends[True] > 1.5 * ends[False]


class FakeTrials(campaign.Campaign):
    """A campaign whose trial runs end at an accuracy that peaks at ``peak`` (log rate)."""

    def __init__(self, peak: float):
        super().__init__("configs/fig45.toml", [], None, np.zeros(1), 1, 1, None)
        self.peak, self.tried = peak, []

    def config(self, m, rate, extra=()):
        from types import SimpleNamespace

        return SimpleNamespace(train=SimpleNamespace(epochs=4.0, max_seconds=8.0, lr=rate))

    def _simulate(self, m, cfg, name):
        self.tried.append(cfg.train.lr)
        acc = 0.6 - 0.05 * abs(math.log10(cfg.train.lr / self.peak))
        return {"metrics": {"test_accuracy": np.array([acc]), "wall_seconds": np.array([2.0])},
                "real_seconds": 0.0}


def test_rate_grid_is_extended_while_its_best_is_at_an_edge():
    row = Method("Downpour [20]", "downpour", 20, 10, rates=(1e-4, 3e-4, 1e-3))
    inside = FakeTrials(peak=3e-4)
    assert inside._tune(row, inside.config(row, None), {}) == 3e-4
    assert inside.tried == [1e-4, 3e-4, 1e-3]  # no extension
    above = FakeTrials(peak=1e-2)
    assert above._tune(row, above.config(row, None), {}) == pytest.approx(1e-2, rel=0.01)
    assert len(above.tried) == 3 + campaign.EXTEND  # 3e-3, then 1e-2; then it stops
    below = FakeTrials(peak=2e-5)
    assert below._tune(row, below.config(row, None), {}) == pytest.approx(3.16e-5, rel=0.01)


def test_a_simulator_revision_changes_only_its_algorithms_signatures(monkeypatch):
    """A row run before its simulator changed (Sandblaster before shard links) is never
    reused; the other algorithms' rows keep their signatures, so they still are."""
    costs = CoreCosts({1: 4e-5}, {"sgd": 2e-10}, preset("1gbe"), (0.9, 1.1))
    runner = campaign.Campaign("configs/fig45.toml", [], costs, np.zeros(4, np.float32),
                               1, 1, None)
    rows = [Method("Sandblaster L-BFGS [20]", "sandblaster", 20, 10),
            Method("Downpour [20]", "downpour", 20, 10), Method("SGD [1]", "sgd", 1)]
    now = [runner.signature(m) for m in rows]
    monkeypatch.setattr(campaign, "SIMULATOR_REVISIONS", {})
    before = [runner.signature(m) for m in rows]
    assert now[0] != before[0]
    assert now[1:] == before[1:]


def test_only_rows_that_encode_sign_the_codec_costs():
    """A Strom row's signature changes with the calibrated codec costs (so a row run
    with the codec timed on a loaded machine is not reused); a dense sync row's and a
    Downpour row's do not (their runs never charge the codec)."""
    from pathlib import Path

    base = str(Path(__file__).resolve().parents[2] / "configs" / "fig45.toml")
    strom = Method("Strom", "sync", 20, sets=("compression.enabled=true",), rates=(0.003,))
    rows = [strom, Method("Dense", "sync", 20, rates=(0.003,)),
            Method("Downpour", "downpour", 20, 10, rates=(0.003,))]
    signatures = []
    for codec in (None, {"encode_per_entry": 3e-9, "decode_per_entry": 6e-11,
                         "decode_per_word": 1.2e-9},
                  {"encode_per_entry": 4e-9, "decode_per_entry": 6e-11,
                   "decode_per_word": 1.2e-9}):
        costs = CoreCosts({1: 4e-5}, {"sgd": 2e-10, "adagrad": 3e-9}, preset("1gbe"),
                          (0.9, 1.1), codec)
        run = campaign.Campaign(base, ["train.epochs=1"], costs, np.zeros(10, np.float32),
                                1000, 10, Path("."))
        assert [run.encodes(m) for m in rows] == [True, False, False]
        signatures.append([run.signature(m) for m in rows])
    assert len({s[0] for s in signatures}) == 3
    assert len({s[1] for s in signatures}) == 1 and len({s[2] for s in signatures}) == 1
