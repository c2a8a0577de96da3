"""``mpibelief simulate`` for Sandblaster L-BFGS: the config's run on the simulated
cluster (:mod:`.sandblaster_cluster`, whose docstring draws the timeline and says what
is real and what is timed), written in a real Sandblaster run's layout.

The coordinator's loop is played here as :mod:`mpibelief.algorithms.sandblaster` plays
it: batches until ``sandblaster.iterations``, three rejected steps in a row or
``train.max_seconds`` of training; ``/metrics`` every ``train.eval_every`` seconds of
training (simulated seconds: ``wall_seconds``; evaluation takes none), then the
``/sandblaster``, ``/ranks`` and ``/server`` tables by the real run's own writer.  The
root attributes say ``simulated = True``, name the calibration file and the costs, and
record the real seconds the simulation took.

Defaults: a batch must have at least as many portions as replicas; when
``sandblaster.portions`` is fewer, the run cuts the batch into R portions (one per
replica at first, the rest of the evaluation balanced by backups), says so, and
records the portions it used in the stored config (``portions_configured`` keeps the
config's).  A batch smaller than R is refused with one line.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from mpibelief.errors import ConfigError, UserError
from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs, Faults
from mpibelief.simulate.sandblaster_cluster import SimSandblaster


def portions_for(cfg) -> int:
    """The portions a batch is cut into: ``sandblaster.portions``, at least R."""
    return max(cfg.sandblaster.portions, cfg.layout.replicas)


def check(cfg) -> None:
    """What the simulated Sandblaster runs: explicit R and S, P = 1, no injected stops."""
    lay, sb, faults = cfg.layout, cfg.sandblaster, cfg.faults
    if lay.replicas < 1 or lay.shards < 1 or lay.partitions != 1:
        raise ConfigError("simulate needs layout.replicas >= 1, layout.shards >= 1 and"
                          " layout.partitions = 1 (e.g. --set layout.replicas=200)")
    if faults.stop_replica >= 0 or faults.kill_rank >= 0:
        raise ConfigError("simulate does not model stopped or killed Sandblaster replicas"
                          " (faults.stop_replica, faults.kill_rank)")
    portions = portions_for(cfg)
    if sb.batch and sb.batch < portions:
        raise ConfigError(f"sandblaster.batch = {sb.batch} cannot be cut into {portions}"
                          f" portions (at least one per replica, {lay.replicas}): raise"
                          " sandblaster.batch or lower layout.replicas")


def resolved(cfg):
    """The config as simulated: ``sandblaster.portions`` raised to R where it is fewer."""
    portions = portions_for(cfg)
    if portions == cfg.sandblaster.portions:
        return cfg
    return dataclasses.replace(
        cfg, sandblaster=dataclasses.replace(cfg.sandblaster, portions=portions))


def build(cfg, data, costs: Costs, faults: Faults | None = None,
          start: np.ndarray | None = None) -> SimSandblaster:
    """The simulated run of ``cfg`` (checked and resolved), ready for its first step."""
    check(cfg)
    return SimSandblaster(resolved(cfg), data, costs, faults, start)


def method(cfg) -> str:
    """The run's label for plots, as the real run's: ``sandblaster[R]``."""
    return f"sandblaster[{cfg.layout.replicas}]"


def simulate(cfg, out: Path, calibration: Path, faults: Faults | None = None,
             overwrite: bool = False, start: np.ndarray | None = None) -> dict:
    """Run the config's Sandblaster on the simulated cluster; write ``out`` in a real
    Sandblaster run's layout; return the last ``/metrics`` row.

    Args:
        start: float32 parameters loaded into the shards instead of the model's
            initialisation (a warmstart shared between methods).
    """
    from mpibelief.coordinator import Evaluator
    from mpibelief.data import load_dataset
    from mpibelief.layout import make_layout
    from mpibelief.progress import Progress
    from mpibelief.results import ResultWriter

    check(cfg)
    sim_cfg = resolved(cfg)
    R, S, sb = cfg.layout.replicas, cfg.layout.shards, sim_cfg.sandblaster
    if sb.portions != cfg.sandblaster.portions:
        print(f"mpibelief: simulate: sandblaster.portions = {cfg.sandblaster.portions} is"
              f" fewer than the {R} replicas: the batch is cut into {sb.portions}",
              flush=True)
    costs = calibrate.read(calibration)
    data = load_dataset(sim_cfg.data)
    sim = SimSandblaster(sim_cfg, data, costs, faults, start)
    lay = make_layout(1 + S + R, S, R, 1)
    name = method(sim_cfg)
    attrs = {"config": sim_cfg.to_toml(), "algorithm": "sandblaster", "method": name,
             "world_size": lay.world, "roles": lay.table(), "dataset": data.name,
             "n_classes": data.n_classes, "n_params": sim.model.n_params, "replicas": R,
             "simulated": True, "calibration": str(calibration),
             **{f"cost_{k}": getattr(costs, k) for k in calibrate.FIELDS},
             "faults": repr(sim.faults), "warmstart": start is not None,
             "portions_configured": cfg.sandblaster.portions}
    evaluate = Evaluator(data, sim_cfg.train.eval_samples, sim_cfg.run.seed)
    with ResultWriter(out, attrs, overwrite) as writer:
        progress = Progress(3 * sb.iterations * sim.driver.batch, f"{name} (simulated)")
        started = time.perf_counter()
        records, row = _train(sim_cfg, sim, evaluate, writer, progress)
        progress.close()
        _tables(writer, sim, records, lay)
        writer.set_attrs({"real_seconds": time.perf_counter() - started,
                          "simulated_seconds": sim.env.now,
                          "forward_rows": sim.math.forward_rows,
                          "gradient_rows": sim.math.gradient_rows})
    return row


def _train(cfg, sim: SimSandblaster, evaluate, writer, progress) -> tuple[list, dict]:
    """Batches until ``iterations``, three rejected steps in a row or
    ``train.max_seconds`` of simulated training (as the real coordinator's loop);
    ``/metrics`` every ``train.eval_every`` simulated seconds, evaluation taking none."""
    sb, limit = cfg.sandblaster, cfg.train.max_seconds
    trained = {"seconds": 0.0, "samples": 0, "batches": 0}
    records, rejected = [], 0
    row = _sample(sim, evaluate, writer, trained)
    next_eval = cfg.train.eval_every
    for k in range(sb.iterations):
        rec = sim.step(k)
        records.append(rec)
        trained["seconds"] += rec.seconds
        trained["samples"] += rec.samples_applied
        trained["batches"] += 1
        rejected = 0 if rec.accepted else rejected + 1
        done = k + 1 == sb.iterations or rejected >= 3 or 0 < limit <= trained["seconds"]
        figures = {"loss": rec.loss, "sim_s": round(trained["seconds"], 2)}
        if trained["seconds"] >= next_eval or done:
            row = _sample(sim, evaluate, writer, trained)
            next_eval = trained["seconds"] + cfg.train.eval_every
            figures["test_acc"] = row["test_accuracy"]
        progress.update(trained["samples"] - progress.done, **figures)
        if done:
            break
    sim.finish()
    return records, row


def _sample(sim: SimSandblaster, evaluate, writer, trained: dict) -> dict:
    """One ``/metrics`` row: the shards' parameters (the coordinator's pull), evaluated."""
    sim.client.pull(sim.model.params)
    row = {"wall_seconds": trained["seconds"], "updates": trained["batches"],
           "samples": trained["samples"], **evaluate(sim.model)}
    writer.append_metrics(row)
    if not np.isfinite(row["test_loss"]):
        raise UserError(f"training diverged: the shards' parameters give a non-finite loss"
                        f" after {trained['batches']} L-BFGS steps")
    return row


def _tables(writer, sim: SimSandblaster, records: list, lay) -> None:
    """``/sandblaster``, ``/ranks`` and ``/server`` as the real run writes them."""
    from mpibelief.algorithms.sandblaster import write_tables

    reports = {rep.stats.rank: rep.stats for rep in sim.replicas}
    write_tables(writer, records, sim.client, [s.stats for s in sim.states], reports, lay,
                 sim.dispatcher, sim.space)
