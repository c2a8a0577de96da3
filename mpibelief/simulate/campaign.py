"""Campaigns of simulated runs from one warmstart: the machinery of Figures 4 and 5.

A campaign is a table of :class:`Method` rows (a name, an algorithm, replicas, shards,
partitions, config overrides).  Every row starts from the same warmstart
(:mod:`.warmstart`), runs on the simulated cluster through :func:`.run.simulate` with
costs from a dedicated-core calibration (:mod:`.corecosts`), and leaves its curve of
test accuracy against simulated time.  A row whose algorithm the simulator does not
run yet is listed with the reason and skipped; it runs as soon as the simulator
accepts its config, with no change here.

Time to the target accuracy (:func:`time_to_target`): the first evaluation at or above
the target, linearly interpolated with the one before it, on the campaign's clock,
which starts with the warmstart (as the paper's Figure 4 hours do: its runs branch
off at ~10 h).  The target (:func:`choose_target`) is placed as the paper's is: its
16% sits 0.60 of the way from the warmstart's 6.7% to the best final 22.1%
(PAPER.md), so ours is ``warm + 0.60 * (best - warm)`` over the campaign's own best
test accuracy, rounded down to half a point.

Machines and cores (:meth:`Method.machines`, :meth:`Method.cores`): every replica is
one machine whose ``partitions`` cores each run one partition (model parallelism
within the machine); every parameter shard is a machine with one core; Sandblaster's
coordinator, which runs L-BFGS, is a machine with one core (Downpour's coordinator
only evaluates and is not counted); sync allreduce has no shards.

The campaign file (:func:`write`, :func:`read`; one file per campaign, small)::

    /                   attributes: provenance (results.stamp), campaign, command,
                        base config (TOML), dataset, n_params, network, latency,
                        bandwidth, target, target_rule, counting, warmstart_* (steps,
                        seconds, test accuracy, SHA-256 of the vector), real_seconds
    /costs              attributes: network, latency, bandwidth, apply_per_param_<rule>;
                        spread (compute-time factors, mean 1); /costs/P<p> attributes:
                        compute_per_sample with p partitions per replica
    /warmstart/<col>    the warmstart's /metrics columns (wall_seconds simulated)
    /runs/<key>/<col>   each method's /metrics columns, wall_seconds on the method's
                        own clock (add warmstart_seconds for the campaign's); attributes:
                        name, family, algorithm, replicas, shards, partitions, machines,
                        cores, sets, rates, paper, lr (the rate run), tuned_rates and
                        tuned_accuracy (the trials), time_to_target (campaign clock, NaN:
                        not reached), real_seconds, mean_staleness, max_shard_busy,
                        signature (:meth:`Campaign.signature`), reused_from
    /skipped            attributes: key -> why; /skipped/<key> the method's attributes
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError

TARGET_FRACTION = (16.0 - 6.7) / (22.1 - 6.7)  # PAPER.md Figure 4: 0.60
TARGET_RULE = ("target = warmstart + 0.60 x (best - warmstart) test accuracy, rounded down"
               " to 0.5 points (the paper's 16% between its 6.7% warmstart and 22.1% best)")
COUNTING = ("machines = replicas + shards (+1 Sandblaster coordinator); cores = replicas x"
            " partitions + shards (+1): a replica is one machine whose cores hold its"
            " partitions, a shard one machine with one core")
EXTEND = 2  # trial rates beyond a grid whose best is at its edge
# What changed in an algorithm's simulator since its rows were first run: part of the
# row's signature, so --reuse never takes a row run before the change.  Sandblaster:
# its pulls and pushes go through the shards' links (Costs.shard_links), as Downpour's
# always did; its rows run before that were timed without link contention.
SIMULATOR_REVISIONS = {"sandblaster": "pulls and pushes share the shards' links"}
METRIC_COLUMNS = ("wall_seconds", "samples", "updates", "train_loss", "train_accuracy",
                  "test_loss", "test_accuracy")


@dataclass(frozen=True)
class Method:
    """One row of a campaign.

    Attributes:
        name: the label, e.g. ``"Downpour [200] + Adagrad"``.
        algorithm: ``run.algorithm``: ``sgd``, ``downpour``, ``sandblaster``, ``sync``.
        replicas, shards: ``layout.replicas``, ``layout.shards``.
        partitions: a replica's partitions, on the cores of one machine (the compute
            is scaled by the scaling model; the config keeps ``layout.partitions = 1``:
            the gradients are the same).
        sets: config overrides, ``"table.key=value"``.
        rates: candidate ``train.lr`` values, ascending on a geometric grid; with
            more than one, each runs a trial first (the campaign's ``tune_fraction`` of
            the row), the grid is extended while its best is at an edge, and the best
            final test accuracy wins (the paper compares each method at its best rate).
        family: the method without its resources (Figure 5 draws a line per family).
        paper: its row in PAPER.md's Figure 4 table, or "".
    """

    name: str
    algorithm: str
    replicas: int
    shards: int = 0
    partitions: int = 1
    sets: tuple[str, ...] = ()
    rates: tuple[float, ...] = ()
    family: str = ""
    paper: str = ""

    @property
    def key(self) -> str:
        """The HDF5 group name, from the name (unique in a table): ``downpour_200_adagrad``."""
        text = "".join(c if c.isalnum() else "_" for c in self.name.lower())
        return "_".join(w for w in text.split("_") if w)

    @property
    def coordinators(self) -> int:
        return 1 if self.algorithm == "sandblaster" else 0

    @property
    def machines(self) -> int:
        return self.replicas + self.shards + self.coordinators

    @property
    def cores(self) -> int:
        return self.replicas * self.partitions + self.shards + self.coordinators

    def config(self, base: str, common: list[str]):
        """The run's config: ``base`` file, then ``common`` overrides, then the row's."""
        from mpibelief import config as configs

        return configs.load(base, [*common, f"run.algorithm={_toml(self.algorithm)}",
                                   f"layout.replicas={self.replicas}",
                                   f"layout.shards={self.shards}",
                                   f"run.name={_toml(self.key)}", *self.sets])


def _toml(text: str) -> str:
    return '"' + text.replace('"', r"\"") + '"'


def unavailable(cfg) -> str | None:
    """Why the simulator cannot run ``cfg`` (its one-line check), or None if it can."""
    from mpibelief.errors import ConfigError
    from mpibelief.simulate.run import check

    try:
        check(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def estimate_seconds(cfg, costs, n_train: int, n_params: int) -> float:
    """A rough simulated length of the run (for its evaluation interval only): steps per
    replica times the slowest of a replica's step, a shard link's and a shard's share."""
    R, S, batch = max(cfg.layout.replicas, 1), max(cfg.layout.shards, 1), cfg.train.batch
    steps = cfg.train.epochs * max(n_train // R // batch, 1)
    compute = batch * costs.compute_per_sample
    wire = 4 * n_params / costs.bandwidth
    if cfg.run.algorithm == "sgd":
        per_step = compute + n_params * costs.apply_per_param
    elif cfg.run.algorithm == "sync":
        per_step = compute + 2 * wire
    else:  # through shards: a pull and a push a step, every shard's link shared by R
        per_step = max(compute + 2 * (wire + S * costs.latency), R * wire / S,
                       R * n_params * costs.apply_per_param / S)
    seconds = steps * per_step
    return min(seconds, cfg.train.max_seconds) if cfg.train.max_seconds else seconds


@dataclass
class Campaign:
    """Runs rows from one warmstart on one machine description.

    Args:
        base, common: the config file and the overrides every row shares.
        costs: a :class:`~.corecosts.CoreCosts` (compute by P, apply by rule, network).
        start: the warmstart's parameters.
        n_train, n_params: for the evaluation interval's estimate.
        work: a directory for the runs' own result files and calibration files.
        evals: evaluations per run (the interval is its estimated length over this).
        tune_fraction: each candidate rate's trial runs this fraction of the row's
            ``train.max_seconds`` and ``train.epochs`` (0: take the first rate).
    """

    base: str
    common: list[str]
    costs: object
    start: np.ndarray
    n_train: int
    n_params: int
    work: Path
    evals: int = 25
    tune_fraction: float = 0.25
    log: object = print  # called like print (with flush=True)

    def config(self, m: Method, rate: float | None, extra=()):
        """The row's config at ``rate``, evaluated ``evals`` times (``extra`` last)."""
        sets = [*self.common, *((f"train.lr={rate}",) if rate else ())]
        cfg = m.config(self.base, [*sets, *extra])
        est = estimate_seconds(cfg, self.costs.costs(m.partitions, cfg.train.optimizer),
                               self.n_train, self.n_params)
        return m.config(self.base, [*sets, f"train.eval_every={est / self.evals:.6g}",
                                    *extra])

    def signature(self, m: Method) -> str:
        """SHA-256 of everything a row's run depends on: the row, the base config's
        text, the shared overrides, the warmstart, the costs, the evaluations and the
        tuning, and the simulator's revision for the row's algorithm
        (``SIMULATOR_REVISIONS``; two campaigns may share a run only if these are equal).
        A row that encodes (sync with compression) also depends on the codec's calibrated
        costs; without them its run times the codec itself, as before they existed, and
        its signature is what it was then."""
        from mpibelief.simulate.warmstart import digest

        c = self.costs
        codec = getattr(c, "codec", None)
        fields = {
            "row": [m.algorithm, m.replicas, m.shards, m.partitions, list(m.sets),
                    list(m.rates)], "base": Path(self.base).read_text(),
            "common": list(self.common), "start": digest(self.start),
            "costs": [c.compute.get(m.partitions), sorted(c.apply.items()),
                      c.network.latency, c.network.bandwidth, list(c.spread)],
            "evals": self.evals, "tune_fraction": self.tune_fraction, "extend": EXTEND}
        if codec and self.encodes(m):
            fields["codec"] = sorted(codec.items())
        if m.algorithm in SIMULATOR_REVISIONS:  # absent otherwise: old rows stay reusable
            fields["simulator"] = SIMULATOR_REVISIONS[m.algorithm]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def encodes(self, m: Method) -> bool:
        """Whether the row runs Strom's codec (its step charges the codec's costs)."""
        cfg = m.config(self.base, self.common)
        return cfg.run.algorithm == "sync" and cfg.compression.enabled

    def run(self, m: Method) -> tuple[dict | None, str | None]:
        """``(run, None)`` or ``(None, why it was skipped)``."""
        cfg = self.config(m, m.rates[0] if m.rates else None)
        why = unavailable(cfg)
        if why:
            return None, why
        tuning = {}
        if len(m.rates) > 1 and self.tune_fraction > 0:
            best = self._tune(m, cfg, tuning)
            cfg = self.config(m, best)
        run = self._simulate(m, cfg, m.key)
        run["signature"] = self.signature(m)
        run["lr"] = math.nan if m.algorithm == "sandblaster" else cfg.train.lr  # L-BFGS
        run["optimizer"] = cfg.train.optimizer
        run["epochs"] = cfg.train.epochs
        if tuning:
            run["tuned_rates"] = np.array(sorted(tuning))
            run["tuned_accuracy"] = np.array([tuning[r]["metrics"]["test_accuracy"][-1]
                                              for r in sorted(tuning)])
            run["real_seconds"] += sum(t["real_seconds"] for t in tuning.values())
        return run, None

    def _tune(self, m: Method, cfg, tuning: dict) -> float:
        """Trial runs of the row's rates; while the best is at an edge of those tried,
        one more a grid step beyond it (at most ``EXTEND`` more): a best rate at the
        edge of its grid says the grid missed the best.  Returns the best rate."""
        f, train = self.tune_fraction, cfg.train
        step = (m.rates[-1] / m.rates[0]) ** (1 / (len(m.rates) - 1))
        queue = list(m.rates)
        while queue:
            rate = queue.pop(0)
            trial = self.config(m, rate, [f"train.epochs={f * train.epochs:.6g}",
                                          f"train.max_seconds={f * train.max_seconds:.6g}",
                                          "train.eval_every=1e9"])
            tuning[rate] = self._simulate(m, trial, f"{m.key}_lr{rate:g}")
            final = tuning[rate]["metrics"]
            self.log(f"  {m.name}: lr {rate:g} for {f:g} of the row:"
                     f" {final['test_accuracy'][-1]:.4f} test accuracy at"
                     f" {final['wall_seconds'][-1]:.2f} s", flush=True)
            if not queue and len(tuning) < len(m.rates) + EXTEND:
                best = max(tuning, key=lambda r: tuning[r]["metrics"]["test_accuracy"][-1])
                k = round(math.log(best / m.rates[0]) / math.log(step))  # grid index
                if best == max(tuning):
                    queue.append(float(f"{m.rates[0] * step ** (k + 1):.3g}"))
                elif best == min(tuning):
                    queue.append(float(f"{m.rates[0] * step ** (k - 1):.3g}"))
        return max(tuning, key=lambda r: (tuning[r]["metrics"]["test_accuracy"][-1], -r))

    def _simulate(self, m: Method, cfg, name: str) -> dict:
        from mpibelief.simulate.corecosts import calibration_file

        costs = self.costs.costs(m.partitions, cfg.train.optimizer)
        calibration = calibration_file(costs, self.work / f"{name}_costs.h5",
                                       getattr(self.costs, "codec", None))
        return run_method(m, cfg, calibration, self.start, self.work / f"{name}.h5")


def run_method(method: Method, cfg, calibration: Path, start: np.ndarray, out: Path) -> dict:
    """Simulate one row from ``start``; its curve and summary (see :func:`write`)."""
    from mpibelief.simulate.run import simulate

    tick = time.perf_counter()
    simulate(cfg, out, calibration, overwrite=True, start=start)
    real = time.perf_counter() - tick
    with h5py.File(out, "r") as f:
        metrics = {k: f[f"metrics/{k}"][()] for k in METRIC_COLUMNS if f"metrics/{k}" in f}
        summary = {"real_seconds": real, "status": str(f.attrs.get("status", "")),
                   "label": str(f.attrs.get("method", method.name))}
        if "server/staleness" in f:
            hist = f["server/staleness"][()]
            summary["mean_staleness"] = float(np.dot(np.arange(len(hist)), hist)
                                              / max(hist.sum(), 1))
            summary["max_shard_busy"] = float(np.max(f["server/busy_fraction"][()]))
    return {"metrics": metrics, **summary}


def time_to_target(seconds, accuracy, target: float) -> float:
    """First time ``accuracy`` reaches ``target``: linear between the evaluation at or
    above it and the one before (the crossing lies between them); NaN if never."""
    seconds, accuracy = np.asarray(seconds, float), np.asarray(accuracy, float)
    hits = np.flatnonzero(accuracy >= target)
    if not len(hits):
        return math.nan
    i = int(hits[0])
    if i == 0:
        return float(seconds[0])
    a0, a1, t0, t1 = accuracy[i - 1], accuracy[i], seconds[i - 1], seconds[i]
    return float(t0 + (t1 - t0) * (target - a0) / (a1 - a0))


def choose_target(warm: float, best: float, fraction: float = TARGET_FRACTION) -> float:
    """The campaign's target test accuracy (see the module docstring)."""
    if not best > warm:
        raise UserError(f"no method improved on the warmstart's {warm:.4f}: no target")
    return math.floor((warm + fraction * (best - warm)) * 200 + 1e-9) / 200


def refuse_existing(out: Path, overwrite: bool) -> None:
    """One-line error, before any work, if ``out`` exists and ``overwrite`` is not given."""
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it, or --out another")


def write(out: Path, attrs: dict, costs, warm, runs: dict, skipped: dict,
          methods: dict[str, Method]) -> None:
    """The campaign file, built beside ``out`` and moved into place when complete.

    ``costs``: the :class:`~.corecosts.CoreCosts` every row ran on."""
    from mpibelief.results import stamp

    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    with h5py.File(part, "w") as f:
        stamp(f, {**attrs, "counting": COUNTING, "target_rule": attrs.get(
            "target_rule", TARGET_RULE), "warmstart_steps": warm.steps,
            "warmstart_seconds": warm.seconds, "warmstart_accuracy": warm.accuracy,
            "warmstart_sha256": warm.sha256, "command": " ".join(sys.argv)})
        g = f.create_group("costs")
        g.attrs.update({"network": costs.network.name, "latency": costs.network.latency,
                        "bandwidth": costs.network.bandwidth, "shard_links": True,
                        "first_step": 0.0,
                        **{f"apply_per_param_{k}": v for k, v in costs.apply.items()}})
        g["spread"] = np.array(costs.spread)
        for P, seconds in costs.compute.items():
            g.create_group(f"P{P}").attrs.update({"partitions": P,
                                                  "compute_per_sample": seconds})
        for col, values in warm.metrics.items():
            f[f"warmstart/{col}"] = values
        for key, run in runs.items():
            g = f.create_group(f"runs/{key}")
            for col, values in run["metrics"].items():
                g[col] = values
            g.attrs.update(_method_attrs(methods[key]))
            g.attrs.update({k: v for k, v in run.items() if k != "metrics"})
        top = f.create_group("skipped")
        for key, why in skipped.items():
            top.attrs[key] = why
            top.create_group(key).attrs.update(_method_attrs(methods[key]))
    os.replace(part, out)


def _method_attrs(m: Method) -> dict:
    return {"name": m.name, "family": m.family or m.name, "algorithm": m.algorithm,
            "replicas": m.replicas, "shards": m.shards, "partitions": m.partitions,
            "machines": m.machines, "cores": m.cores, "sets": " ".join(m.sets),
            "rates": np.array(m.rates, float), "paper": m.paper}


def read(path: Path) -> dict:
    """``{attrs, warmstart: {col}, runs: {key: {attrs, metrics}}, skipped: {key: attrs
    with 'why'}}``; a one-line error if ``path`` is not a campaign file."""
    try:
        with h5py.File(path, "r") as f:
            out = {"attrs": dict(f.attrs),
                   "warmstart": {k: v[()] for k, v in f["warmstart"].items()},
                   "runs": {k: {"attrs": dict(g.attrs), "metrics": {c: v[()] for c, v
                                                                    in g.items()}}
                            for k, g in f["runs"].items()},
                   "skipped": {k: {**dict(f[f"skipped/{k}"].attrs), "why": str(why)}
                               for k, why in f["skipped"].attrs.items()}}
            if "target" not in out["attrs"]:
                raise KeyError("no target")
            return out
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read {path} as a campaign file (bench/fig4.py,"
                        f" bench/fig5.py): {exc}") from None
