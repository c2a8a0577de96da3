"""Time one replica's mini-batch over ``P`` partitions, as a user's job runs it.

``mpiexec -n P python -m mpibelief.simulate.steptime CONFIG [--set ...] --steps N
--out FILE.json`` builds the config's model, cuts it into ``P = world size``
partitions (:class:`~mpibelief.partition.PartitionedModel`, the class training uses),
initialises them as training does, and times ``loss_and_grad`` (forward plus backward
with every boundary exchange and the loss's allreduces) on random mini-batches of the
config's batch size.  The optimiser's update and all parameter traffic are left out
on purpose: Figure 3 times the model-parallel step itself, and a parameter server's
fetch and push (Downpour) would be measured by ``bench/downpour.py``.

One warm-up step (Numba's JIT, first-touch of the buffers) is run and dropped.  Per
rank and per timed step: wall seconds, seconds waiting for other partitions (halo and
activation exchanges and allreduces: the time the slowest partition costs the
others), bytes sent, and CPU seconds (what the rank computed, however the machine's
other jobs shared its core out: on a loaded machine, wall time shows the load and CPU
time the work); compute is wall minus wait.  Rank 0 writes them with each
rank's peak resident memory as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

for _var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per partition, as in training


def build(config: str, overrides: list[str]):
    """(config, unallocated model) as ``mpibelief train`` would build them."""
    from mpibelief import config as configs
    from mpibelief.model import Model

    cfg = configs.load(config, overrides)
    if cfg.data.source == "synthetic":
        from mpibelief.data.synthetic import synthetic_inputs

        n_in = synthetic_inputs(cfg.data)
    else:
        n_in = int(cfg.data.n_mels * cfg.data.context)
    return cfg, Model.from_config(cfg.model, n_in, cfg.data.n_classes, allocate=False)


def time_steps(model, comm, batch: int, steps: int, seed: int) -> dict:
    """Warm up once, then time ``steps`` calls of ``loss_and_grad``."""
    import numpy as np

    from mpibelief.partition import PartitionedModel

    part = PartitionedModel(model, comm)
    part.init(seed)
    rng = np.random.default_rng(seed)  # the same batches on every rank
    x = rng.standard_normal((batch, model.n_inputs), dtype=np.float32)
    y = rng.integers(0, model.n_classes, batch)
    part.loss_and_grad(x, y)
    rows = {"seconds": [], "wait_seconds": [], "bytes_sent": [], "cpu_seconds": []}
    for _ in range(steps):
        comm.Barrier()  # every step starts together: its time is the slowest rank's
        wait0, sent0, tick = part.wait_seconds, part.bytes_sent, time.perf_counter()
        cpu0 = time.process_time()
        part.loss_and_grad(x, y)
        rows["seconds"].append(time.perf_counter() - tick)
        rows["cpu_seconds"].append(time.process_time() - cpu0)
        rows["wait_seconds"].append(part.wait_seconds - wait0)
        rows["bytes_sent"].append(part.bytes_sent - sent0)
    rows["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows["n_params"] = part.n_params
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after a warm-up)")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    cfg, model = build(args.config, args.set)
    rows = time_steps(model, comm, cfg.train.batch, args.steps, cfg.run.seed)
    ranks = comm.gather(rows, root=0)
    if comm.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"partitions": comm.size, "batch": cfg.train.batch,
                       "n_params": model.n_params, "ranks": ranks}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
