"""Print the MPI world size a config needs: ``python slurm/world.py [--np N] CONFIG [K=V]...``.

The Slurm scripts ask this before they launch anything, so a job whose task count
does not fit its config stops with one line instead of N ranks failing at once, and
the campaign driver asks it to request exactly the tasks each run needs.

``--np N`` is the task count on offer: a config that fills the world
(``layout.replicas = 0``) takes as many replicas as N holds. Without it such a config
has no size of its own, which is an error naming the way out.
"""

from __future__ import annotations

import argparse
import sys

from mpibelief import config, layout
from mpibelief.errors import ConfigError, LayoutError


def world_size(cfg: config.Config, np: int | None) -> int:
    """Ranks the run needs; ``np`` sizes a config that fills the world."""
    lay = cfg.layout
    if lay.replicas:
        return layout.required_world(lay.shards, lay.replicas, lay.partitions)
    if np is None:
        raise ConfigError("layout.replicas = 0 fills the world, so the task count must be"
                          " given: CONFIG@NTASKS for the campaign driver, --ntasks for sbatch")
    return layout.make_layout(np, lay.shards, 0, lay.partitions).world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="world.py", description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, help="tasks on offer (sizes layout.replicas = 0)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="TABLE.KEY=VALUE")
    args = p.parse_args(argv)
    try:
        print(world_size(config.load(args.config, args.overrides), args.np))
    except (ConfigError, LayoutError) as exc:
        print(f"mpibelief: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
