"""Figure 5 at simulated scale: time to a fixed test accuracy against machines and cores.

The paper's Figure 5 gives, for each method, four resource configurations and the hours
each took to reach 16% test accuracy, against the machines and against the cores used.
Here each method family gets four configurations (replicas R, shards S, partitions P
per replica), every one from the same warmstart as Figure 4 (recomputed here with the
same recipe; its SHA-256 is checked against Figure 4's file), on the same costs, with
Figure 4's target (``--target-from results/fig4.h5``, or ``--target``) and Figure 4's
horizon and epoch cap (the same defaults).  A run that has not reached the target by
then is recorded as not reached (the paper's fixed-rate Downpour "often misses the
deadline").

Counting (stated in the file and on the plot): a replica is one machine whose P cores
hold its partitions (the compute time shrinks as the scaling model says for P partitions
inside one machine; the parameter traffic still crosses the machine's one link); a
shard is one machine with one core; Sandblaster's coordinator one more.

Rows identical to one of Figure 4's (same method, resources, rates, epochs, warmstart,
costs and tuning) are taken from its file instead of being run again (``--no-reuse``
runs them; ``--reuse FILE`` adds other earlier campaign files).

Usage: ``python bench/fig5.py [--quick] [--out results/fig5.h5] [--calibration FILE]
[--methods KEY,...] [--target-from results/fig4.h5 | --target 0.55] ...``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

for _var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy: one core per simulated rank, as calibrated

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/campaign_cli.py
import campaign_cli as cli  # noqa: E402
from fig4 import (  # noqa: E402
    ADAGRAD_RATES,
    LARGE_RATES,
    SGD_RATES,
    SYNC_RATES,
    sandblaster_sets,
    sandblaster_shards,
)

from mpibelief.simulate.campaign import Method  # noqa: E402


def methods(args) -> list[Method]:
    """Four resource configurations per family (quick: the same shapes, tiny)."""
    s = lambda r: max(1, round(r * args.shards_per_replica))  # noqa: E731
    sgd, ada = ("train.optimizer='sgd'",), ("train.optimizer='adagrad'",)
    strom = (*ada, "compression.enabled=true", "compression.fraction=0.01")
    q = args.quick
    down = [(4, 1), (8, 1), (8, 4), (16, 1)] if q else [(20, 1), (20, 4), (50, 1), (200, 1)]
    fixed = [(2, 1), (4, 1), (4, 4), (8, 1)] if q else [(10, 1), (20, 1), (20, 4), (50, 1)]
    # Sandblaster's real cost grows with R (the dispatcher's events: about 30 s of real
    # time per batch at R = 2000, 77 minutes for Figure 4's row), so its fourth
    # configuration puts 4 cores on R = 200 rather than on R = 2000.
    sb = [(8, 1), (16, 1), (16, 4), (32, 1)] if q else [(100, 1), (200, 1), (200, 4),
                                                         (2000, 1)]
    sync = [(2, 1), (4, 1), (4, 4), (8, 1)] if q else [(5, 1), (10, 1), (20, 1), (20, 4)]
    rows = [Method(f"SGD [1], {P} cores", "sgd", 1, 0, P, sgd, (0.1,), "SGD [1]")
            for P in (1, 2, 4, 8)]
    rows += [Method(f"Downpour [{R}] + Adagrad{_p(P)}", "downpour", R, s(R), P, ada,
                    LARGE_RATES if R > 100 else ADAGRAD_RATES,
                    "Downpour + Adagrad") for R, P in down]
    rows += [Method(f"Downpour [{R}]{_p(P)}", "downpour", R, s(R), P, sgd, SGD_RATES,
                    "Downpour") for R, P in fixed]
    rows += [Method(f"Sandblaster L-BFGS [{R}]{_p(P)}", "sandblaster", R,
                    sandblaster_shards(min(R, 200), q, args.shards_per_replica), P,
                    sandblaster_sets(R, q), (),
                    "Sandblaster L-BFGS") for R, P in sb]
    rows += [Method(f"Sync allreduce [{R}] + Adagrad{_p(P)}", "sync", R, 0, P, ada,
                    SYNC_RATES, "Sync allreduce + Adagrad") for R, P in sync]
    rows += [Method(f"Sync [{R}] + Strom 1% + Adagrad{_p(P)}", "sync", R, 0, P, strom,
                    SYNC_RATES, "Sync + Strom 1% + Adagrad") for R, P in sync]
    return rows


def _p(P: int) -> str:
    return f", {P} cores each" if P > 1 else ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.common_arguments(parser, "fig5")
    parser.add_argument("--target-from", default=str(cli.REPO / "results" / "fig4.h5"),
                        help="Figure 4's campaign file: its target and warmstart"
                             " (quick: results/fig4_quick.h5)")
    parser.add_argument("--target", type=float, default=0.0,
                        help="the target test accuracy, instead of --target-from's")
    parser.add_argument("--no-reuse", action="store_true",
                        help="run rows identical to Figure 4's again")
    args = parser.parse_args(argv)
    if args.quick and args.target_from == parser.get_default("target_from"):
        args.target_from = str(cli.REPO / "results" / "fig4_quick.h5")
    return args


def figure4(args) -> dict | None:
    """Figure 4's campaign file, read (None if neither needed nor there)."""
    from mpibelief.errors import UserError
    from mpibelief.simulate.campaign import read

    path = Path(args.target_from)
    if not path.exists():
        if args.target:
            return None
        raise UserError(f"no {path}: run bench/fig4.py first, or give --target")
    return read(path)


def main(argv=None) -> int:
    from mpibelief.simulate import campaign

    args = parse_args(argv)
    rows = methods(args)
    fig4 = None if args.list else figure4(args)
    runner, state = cli.prepare(args, rows, "fig5")
    if runner is None:
        return 0
    warm = state["warm"]
    if fig4 is not None and fig4["attrs"]["warmstart_sha256"] != warm.sha256:
        print(f"fig5: WARNING: this warmstart ({warm.sha256[:12]}) differs from"
              f" {args.target_from}'s ({fig4['attrs']['warmstart_sha256'][:12]}):"
              " other sizes, code or machine", flush=True)
    target = args.target or float(fig4["attrs"]["target"])
    rule = ("given on the command line (--target)" if args.target else
            f"Figure 4's ({args.target_from}): {fig4['attrs']['target_rule']}")
    sources = args.reuse + ([] if args.no_reuse or fig4 is None else [args.target_from])
    done = cli.reuse(rows, sources, runner, args)
    runs, skipped = cli.run_rows([m for m in rows if m.key not in done], runner, args)
    runs.update(done)
    cli.attach_times(runs, warm, target)
    attrs = cli.file_attrs(args, state, "fig5", target, rule)
    attrs["real_seconds"] = time.perf_counter() - state["started"]
    campaign.write(args.out, attrs, state["costs"], warm, runs, skipped,
                   {m.key: m for m in rows})
    cli.report(runs, skipped, rows, target, warm)
    reached = sum(math.isfinite(r["time_to_target"]) for r in runs.values())
    print(f"{reached} of {len(runs)} configurations reached the target;"
          f" wrote {args.out} in {attrs['real_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.guarded(main, "fig5"))
