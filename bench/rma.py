"""Pull and push bandwidth through the parameter server against raw MPI RMA, in one run.

Run (from the repository root)::

    PYTHONPATH=. .venv/bin/mpiexec -n 3 .venv/bin/python -m mpi4py bench/rma.py

Rank 0 is the coordinator (idle, sleeping; it writes the file and prints the table),
rank 1 a parameter shard (``ParameterServer.serve``, plain SGD, lr=1), rank 2 the client
that measures.  For every message size the shard holds a parameter vector of exactly
that many bytes, and the raw operations of the same size go to a plain window on the
same shard, all inside one ``Lock_all`` epoch:

    raw_get, raw_put, raw_acc  MPI Get / Put / Accumulate(SUM, float32), then Flush
    pull                       ParameterClient.pull: pin the buffer, Get, Flush, unpin
    pull_fresh                 pull right after the shard applied a push (untimed), so
                               the parameters come fresh from the shard's cache, as in
                               training; the raw modes and pull re-read hot data
    push                       ParameterClient.push into a free inbox slot: Put, Flush,
                               atomic publish, Flush.  Done = the data is in the shard's
                               window memory and announced (origin-complete both); the
                               shard applies it afterwards, outside the timing (waited
                               for, untimed, before the next op of any mode)
    push_checked               push plus the client's finiteness pass over the whole
                               gradient, which the client makes when a push is split
                               over more than one shard
    push_stream                end to end: ``--stream`` back-to-back pushes until the
                               shard has applied them all; the rate of applied updates
    shard_apply                the shard's own view: gradient bytes / busy seconds

Before each timed op, of every mode alike, the op's local buffer is rewritten in place
(values unchanged), as backprop would have just written it (see ``written``).
Every mode is checked before anything is timed: pulled values equal what was set, a
push lands exactly once (value and version), raw Put/Get/Accumulate round-trip; after
timing, the parameters must equal the exact sum of every push made.  The modes are
timed in ``--runs`` rounds; in each, every mode runs a block of ``--warmup`` untimed and
``--block`` timed ops in turn, so bursts of load from other processes hit every mode;
MB/s (1e6 B/s) is size / median time per op (push_stream: per push).

Output: ``results/bench_rma.h5``, group ``/bench/rma/<mode>`` with datasets ``sizes``
(bytes), ``mbps`` (median MB/s), ``timings`` (seconds per op, sizes x repetitions, NaN
padded) and ``ratio_to_raw_get``; root attributes: MPI library version, host, date.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COORD, SHARD, CLIENT = 0, 1, 2
MODES = ("raw_get", "raw_put", "raw_acc", "pull", "pull_fresh", "push", "push_checked",
         "push_stream", "shard_apply")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-size", type=int, default=4 << 10, help="bytes (default 4 KiB)")
    ap.add_argument("--max-size", type=int, default=16 << 20, help="bytes (default 16 MiB)")
    ap.add_argument("--factor", type=int, default=4, help="size step factor (default 4)")
    ap.add_argument("--runs", type=int, default=8, help="rounds of blocks (default 8)")
    ap.add_argument("--block", type=int, default=6, help="timed ops per block (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed ops before each block")
    ap.add_argument("--stream", type=int, default=8, help="pushes per push_stream run")
    ap.add_argument("--depth", type=int, default=1, help="inbox slots per client (server)")
    ap.add_argument("--buffers", type=int, default=2, help="parameter versions (server)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_rma.h5")
    return ap.parse_args(argv)


def sizes_of(args) -> list[int]:
    sizes, size = [], args.min_size
    while size <= args.max_size:
        sizes.append(size)
        size *= args.factor
    return sizes


def pattern(n: int, seed: int) -> np.ndarray:
    """Small integers as float32: sums of a few hundred of them stay exact."""
    return ((np.arange(n, dtype=np.int64) * 31 + seed) % 97).astype(np.float32)


def written(local: np.ndarray) -> None:
    """Rewrite the op's local buffer in place, values unchanged, just before timing it.

    In training a push sends the gradient backprop has just written and a pull lands
    in the parameter vector the replica has just read, so the local side is cache-hot.
    Every mode, raw or through the server, gets the same preamble: without it a push,
    whose client has slept waiting for the shard's apply (and may have been moved to
    the other core), read a cold source and took twice as long as the hot raw loops.
    """
    local *= np.float32(1.0)


def elapsed(op) -> float:
    start = time.perf_counter()
    op()
    return time.perf_counter() - start


def repeated(ops: dict, runs: int, block: int, warmup: int) -> dict[str, np.ndarray]:
    """Seconds per call of each op: ``runs`` rounds, in each a block of every op in turn.

    A block is ``warmup`` untimed calls, then ``block`` timed ones (OSU style: warm,
    then a tight loop).  Repeating the rounds spreads bursts of load from other
    processes over all modes alike.  Each op returns its own elapsed time, so it can
    leave untimed work (the shard applying a push) out.
    """
    out = {name: [] for name in ops}
    for _ in range(runs):
        for name, op in ops.items():
            for i in range(warmup + block):
                seconds = op()
                if i >= warmup:
                    out[name].append(seconds)
    return {name: np.array(times) for name, times in out.items()}


def check_raw(raw, n: int) -> None:
    """Raw Get reads what the shard holds; Put lands; three Accumulates sum exactly."""
    buf, ref = np.empty(n, np.float32), pattern(n, 1)

    def get():
        raw.get(buf, SHARD, 0)
        raw.flush(SHARD)
        return buf
    assert np.array_equal(get(), pattern(n, 0)), "raw_get: read differs from the shard's"
    raw.put(ref, SHARD, 0)
    raw.flush(SHARD)
    assert np.array_equal(get(), ref), "raw_put: value did not land"
    for _ in range(3):
        raw.accumulate(ref, SHARD, 0)
    raw.flush(SHARD)
    assert np.array_equal(get(), 4 * ref), "raw_acc: sum is wrong"


def check_server(client, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pull returns what was set, as version 1; one push lands once; returns init, grad."""
    init, buf, grad = pattern(n, 2), np.empty(n, np.float32), np.ones(n, np.float32)
    client.set_params(init)
    versions = client.pull(buf)
    assert np.array_equal(buf, init) and versions[0] == 1, "pull: values or version wrong"
    client.push(grad, versions)
    client.wait_applied()
    versions = client.pull(buf)
    assert np.array_equal(buf, init - 1) and versions[0] == 2, "push: not applied once"
    return init, grad


def measure(client, raw, n: int, args) -> dict:
    """Check every mode, then time them interleaved; then the push stream."""
    check_raw(raw, n)
    init, grad = check_server(client, n)
    buf, versions = np.empty(n, np.float32), np.zeros(1, np.int64)

    def raw_op(call):
        def run():
            written(buf)
            return elapsed(lambda: (call(buf, SHARD, 0), raw.flush(SHARD)))
        return run

    def push_op(check: bool):
        def run():
            client.wait_applied()  # a free slot; the shard's apply is not in the time
            client.check_finite = check
            written(grad)
            return elapsed(lambda: client.push(grad, versions))
        return run

    def pull_fresh():
        client.push(grad, versions)
        client.wait_applied()
        written(buf)
        return elapsed(lambda: client.pull(buf))

    def pull():
        written(buf)
        return elapsed(lambda: client.pull(buf))

    ops = {"raw_get": raw_op(raw.get), "pull": pull,
           "pull_fresh": pull_fresh, "raw_put": raw_op(raw.put), "push": push_op(False),
           "raw_acc": raw_op(raw.accumulate), "push_checked": push_op(True),
           "push_stream": lambda: elapsed(lambda: push_stream(client, grad, args.stream))}
    # Every op starts with the shard idle, not still applying the last push.
    ops = {name: _after_apply(client, op) for name, op in ops.items()}
    timings = repeated(ops, args.runs, args.block, args.warmup)
    timings["push_stream"] /= args.stream
    client.check_finite = False
    raw.put(pattern(n, 0), SHARD, 0)  # restore what the next size's raw check expects
    raw.flush(SHARD)
    pushes = client.stats.pushes  # every push of this server, all of them finite
    versions = client.pull(buf)
    assert versions[0] == pushes + 1 and np.array_equal(buf, init - pushes), \
        "push: final state is not the exact sum of every push"
    return timings


def _after_apply(client, op):
    def run():
        client.wait_applied()
        return op()
    return run


def push_stream(client, grad, count: int) -> None:
    for _ in range(count):
        client.push(grad, None)
    client.wait_applied()


def one_size(comm, raw, size: int, args):
    """Every mode at one size; returns ``{mode: seconds per op}`` on the coordinator."""
    from mpibelief.comm import Tag, quiet_recv
    from mpibelief.optim import Optimizer
    from mpibelief.ps.server import ParameterServer

    ps = ParameterServer(comm, size // 4, [SHARD], [CLIENT], Optimizer("sgd", lr=1.0),
                         buffers=args.buffers, depth=args.depth)
    result = None
    if comm.rank == SHARD:
        stats = ps.serve()
        seconds = stats.busy_seconds / stats.bytes_in * size  # per push of this size
        comm.send(np.array([seconds]), COORD, Tag.REPORT)
    elif comm.rank == CLIENT:
        comm.send(measure(ps.client(), raw, size // 4, args), COORD, Tag.REPORT)
    else:
        result = quiet_recv(comm, source=CLIENT)
        ps.stop()
        result["shard_apply"] = quiet_recv(comm, source=SHARD)
    ps.free()
    return result


def make_raw(comm, max_size: int):
    """A plain window of ``max_size`` bytes on the shard, holding pattern 0."""
    from mpibelief.comm import quiet_barrier
    from mpibelief.ps.window import Window

    raw = Window(max_size if comm.rank == SHARD else 0, comm)
    if comm.rank == SHARD:
        raw.view(np.float32, 0, max_size // 4)[:] = pattern(max_size // 4, 0)
        raw.sync()
    quiet_barrier(comm)
    return raw


def summarise(sizes: list[int], results: list[dict]) -> dict:
    """Per mode: sizes, timings, median MB/s and the ratio to raw Get at each size."""
    out = {}
    for mode in MODES:
        width = max(len(r[mode]) for r in results)
        timings = np.full((len(sizes), width), np.nan)
        for i, r in enumerate(results):
            timings[i, :len(r[mode])] = r[mode]
        mbps = np.array(sizes) / np.nanmedian(timings, axis=1) / 1e6
        out[mode] = {"sizes": np.array(sizes, np.int64), "timings": timings, "mbps": mbps}
    for mode in MODES:
        out[mode]["ratio_to_raw_get"] = out[mode]["mbps"] / out["raw_get"]["mbps"]
    return out


def write(path: Path, table: dict) -> None:
    import h5py

    from mpibelief.results import stamp

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "world_size": 3,
                  "units": "sizes: bytes; timings: seconds per op; mbps: 1e6 bytes/s"})
        for mode, data in table.items():
            group = f.require_group(f"bench/rma/{mode}")
            for name, value in data.items():
                group.create_dataset(name, data=value)


def print_table(table: dict) -> None:
    cols = list(MODES)
    short = ["raw_get", "raw_put", "raw_acc", "pull", "pull_frs", "push", "push_chk", "stream",
             "apply"]
    ratios = ["pull", "pull_fresh", "push", "push_checked", "push_stream"]
    print("median MB/s (1e6 B/s); after |: ratio to raw_get in the same run")
    print(f"{'size':>5} " + " ".join(f"{c:>8}" for c in short) + " |"
          + " ".join(f"{c:>6}" for c in ("pull", "fresh", "push", "chk", "stream")))
    for i, size in enumerate(table["raw_get"]["sizes"]):
        label = f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"
        row = " ".join(f"{table[c]['mbps'][i]:8.0f}" for c in cols)
        rat = " ".join(f"{table[m]['ratio_to_raw_get'][i]:6.2f}" for m in ratios)
        print(f"{label:>5} {row} |{rat}", flush=True)


GOAL = 0.5  # issue 3: push and pull reach half of raw Get at 1 MiB and above


def print_verdict(table: dict) -> None:
    """The goal's verdict for ``pull`` and ``push``; the harder modes for information."""
    big = table["raw_get"]["sizes"] >= 1 << 20
    if not big.any():
        return
    for mode in ("pull", "push", "pull_fresh", "push_checked"):
        worst = float(table[mode]["ratio_to_raw_get"][big].min())
        verdict = ("PASS" if worst >= GOAL else "FAIL") if mode in ("pull", "push") else "info"
        print(f"{verdict}: {mode} at >= 1 MiB reaches {worst:.2f} x raw Get at worst"
              f" (goal >= {GOAL})")


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size != 3:
        raise SystemExit(f"bench/rma.py needs 3 ranks (coordinator, shard, client), got "
                         f"{comm.size}: mpiexec -n 3 python -m mpi4py bench/rma.py")
    sizes = sizes_of(args)
    raw = make_raw(comm, sizes[-1])
    results = [one_size(comm, raw, size, args) for size in sizes]
    raw.free()
    if comm.rank == COORD:
        table = summarise(sizes, results)
        write(args.out, table)
        print_table(table)
        print_verdict(table)
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
