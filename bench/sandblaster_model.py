"""An event-level model of what backup tasks can buy Sandblaster against one straggler.

Plays the dispatcher's protocol (:mod:`mpibelief.algorithms.sandblaster_dispatch`)
around the real :class:`~mpibelief.portions.PortionBook`, in virtual time: ``R``
replicas, one of them ``--factor`` times slower, compute portions of one fast time
unit each (jittered by +-10%), evaluations back to back; a copy still running when
its evaluation ends goes on into the next one (as on the real replicas, which cannot
be interrupted mid-portion), then is answered ``drop``.  Pushes, messages and the
coordinator's work between evaluations cost the given fractions of a fast portion.

For every portion count it prints the mean time per evaluation with backups off and
on, the tail decided by replica count (the rule before pace) and by pace, and the
bound no schedule can beat: the best split of whole portions between the straggler
and the others, ``min over j of max(j * factor, (P - j) / (R - 1))``.  The cut that
backups can give against ``off`` is at most ``1 - bound / off``.

Usage: ``python bench/sandblaster_model.py [--replicas 2] [--factor 4]
[--portions 2,4,8,16] [--push-every 4] [--evaluations 60] [--seeds 20]``
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/jobs.py, beside this file
from jobs import REPO, counts  # noqa: E402

sys.path.insert(0, str(REPO))
from mpibelief.portions import DROP, PUSH, PortionBook  # noqa: E402


def play(args, portions: int, backups: bool, paced: bool, seed: int) -> float:
    """Mean virtual time per evaluation (the first 5 left out: warming up)."""
    rng = random.Random(seed)
    R = args.replicas
    cost = [args.factor if r == R - 1 else 1.0 for r in range(R)]
    pace = cost if paced else None
    msg = args.message
    events, seq, waiting, times = [], [0], set(), []
    state = {"evaluation": 0, "start": 0.0}

    def at(t, r, kind, *payload):
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], r, kind, payload))

    def new_book():
        return PortionBook([1] * portions, R, args.push_every, backups, 2, pace=pace)

    def give(r, t):
        p = book.next_task(r)
        if p is None:
            waiting.add(r)
            return
        waiting.discard(r)
        at(t + msg + cost[r] * rng.uniform(0.9, 1.1), r, "done", state["evaluation"], p)

    book = new_book()
    for r in range(R):
        at(msg, r, "ready")
    while len(times) < args.evaluations:
        t, _, r, kind, payload = heapq.heappop(events)
        t += msg
        if kind == "ready":
            give(r, t)
        elif kind == "pushed":
            book.pushed(r)
            give(r, t)
        elif payload[0] != state["evaluation"]:  # a late copy: drop, ready
            at(t + 2 * msg, r, "ready")
        else:
            decision = book.finished(r, payload[1], 0.0)
            if decision == PUSH:
                at(t + msg + args.push, r, "pushed")
            elif decision == DROP:
                at(t + 2 * msg, r, "ready")
                for w in sorted(waiting):
                    give(w, t)
            else:
                give(r, t)
        if book.complete:
            times.append(t - state["start"])
            state["start"] = t + args.between
            state["evaluation"] += 1
            book = new_book()
            for w in sorted(waiting):
                give(w, state["start"])
    return statistics.mean(times[5:])


def bound(portions: int, replicas: int, factor: float) -> float:
    """The shortest evaluation any schedule of whole portions allows (no overheads)."""
    others = replicas - 1
    return min(max(j * factor, math.ceil((portions - j) / others))
               for j in range(portions + 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--portions", type=counts, default=[2, 4, 8, 16])
    parser.add_argument("--push-every", type=int, default=4)
    parser.add_argument("--evaluations", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--push", type=float, default=0.05, help="push + confirm, portions")
    parser.add_argument("--message", type=float, default=0.002, help="one message, portions")
    parser.add_argument("--between", type=float, default=0.05,
                        help="coordinator's work between evaluations, portions")
    args = parser.parse_args(argv)
    print(f"{args.replicas} replicas, the last {args.factor:g}x slower, push_every"
          f" {args.push_every}; time per evaluation in fast portions")
    print(f"{'portions':>8} {'off':>7} {'on/count':>9} {'on/pace':>8} {'bound':>6}"
          f" {'cut/count':>9} {'cut/pace':>8} {'cut max':>8}")
    for p in args.portions:
        mean = {(b, paced): statistics.mean(play(args, p, b, paced, s)
                                            for s in range(args.seeds))
                for b, paced in ((False, True), (True, False), (True, True))}
        off, count, paced = mean[False, True], mean[True, False], mean[True, True]
        best = bound(p, args.replicas, args.factor)
        print(f"{p:>8} {off:7.2f} {count:9.2f} {paced:8.2f} {best:6.2f}"
              f" {1 - count / off:9.0%} {1 - paced / off:8.0%} {1 - best / off:8.0%}")


if __name__ == "__main__":
    main()
