"""The static rank layout: which MPI rank plays which role.

A pure function of the world size and the config, with no MPI import, so it can be
printed before anything is launched (``mpibelief info --np N``) and tested alone.
Rank 0 is the coordinator, then ``S`` parameter shards, then ``R`` replicas of ``P``
partitions each: ``world = 1 + S + R * P``.  Algorithms without a parameter server
(``S = 0``: single-replica and allreduce SGD) need no idle coordinator, so there rank 0
coordinates *and* trains as replica 0's first partition: ``world = R * P``, and a
single-replica run works alone, without ``mpiexec``.  ``R = 0`` in the config means
"as many replicas as the world holds", so one config serves every job size.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpibelief.errors import LayoutError

COORDINATOR = "coordinator"
SHARD = "shard"
WORKER = "worker"


@dataclass(frozen=True)
class Role:
    """What one rank does.

    Attributes:
        rank: the rank in COMM_WORLD.
        kind: ``coordinator``, ``shard`` or ``worker``.
        index: the shard index for shards, the replica index for workers, else 0.
        partition: the partition within its replica (workers only), else 0.
        coordinates: True on the one rank that gathers metrics and writes results.
    """

    rank: int
    kind: str
    index: int = 0
    partition: int = 0
    coordinates: bool = False

    def describe(self) -> str:
        if self.kind == SHARD:
            return f"parameter shard {self.index}"
        if self.kind == WORKER:
            text = f"replica {self.index}, partition {self.partition}"
            return text + (" + coordinator" if self.coordinates else "")
        return "coordinator: metrics, evaluation, results"


@dataclass(frozen=True)
class Layout:
    """Every rank's role, plus the counts they came from."""

    shards: int
    replicas: int
    partitions: int
    roles: tuple[Role, ...]

    @property
    def world(self) -> int:
        return len(self.roles)

    @property
    def coordinator_rank(self) -> int:
        """The rank that coordinates: gathers metrics and writes the result file."""
        return next(r.rank for r in self.roles if r.coordinates)

    def shard_ranks(self) -> list[int]:
        return [r.rank for r in self.roles if r.kind == SHARD]

    def worker_ranks(self, replica: int | None = None) -> list[int]:
        return [
            r.rank for r in self.roles
            if r.kind == WORKER and (replica is None or r.index == replica)
        ]

    def table(self) -> str:
        """A printable table of ranks and roles."""
        lines = ["rank  role"]
        lines += [f"{r.rank:>4}  {r.describe()}" for r in self.roles]
        return "\n".join(lines)


def required_world(shards: int, replicas: int, partitions: int) -> int:
    """World size the layout needs (``replicas`` >= 1)."""
    return (1 if shards else 0) + shards + replicas * partitions


def make_layout(world: int, shards: int, replicas: int, partitions: int) -> Layout:
    """Assign a role to every rank of a world of ``world`` ranks.

    Args:
        replicas: the replica count, or 0 for as many as fit in ``world``.

    Raises:
        LayoutError: when ``world`` does not fit the layout, naming both numbers.
    """
    if replicas == 0:
        replicas = _fill(world, shards, partitions)
    need = required_world(shards, replicas, partitions)
    if world != need:
        raise LayoutError(
            f"need {need} ranks, got {world} ({_spell(shards, replicas, partitions)})"
            + _launch_hint(world, need)
        )
    roles = []
    if shards:
        roles.append(Role(0, COORDINATOR, coordinates=True))
        roles += [Role(1 + s, SHARD, index=s) for s in range(shards)]
    first = len(roles)
    roles += [
        Role(first + r * partitions + p, WORKER, index=r, partition=p,
             coordinates=first + r * partitions + p == 0)
        for r in range(replicas)
        for p in range(partitions)
    ]
    return Layout(shards, replicas, partitions, tuple(roles))


def _fill(world: int, shards: int, partitions: int) -> int:
    """The replica count that fills ``world``; at least one replica is always needed."""
    spare = world - required_world(shards, 0, partitions)
    replicas = max(spare // partitions, 1)
    if spare < partitions or spare % partitions:
        lo = required_world(shards, replicas, partitions)
        hint = "" if lo == world else f" (or {lo + partitions}, {lo + 2 * partitions}, ...)"
        raise LayoutError(
            f"need {lo} ranks{hint}, got {world} ({_spell(shards, None, partitions)})"
            + _launch_hint(world, lo)
        )
    return replicas


def _launch_hint(world: int, need: int) -> str:
    return f"; start it with: mpiexec -n {need} python -m mpibelief ..." if world == 1 else ""


def _spell(shards: int, replicas: int | None, partitions: int) -> str:
    reps = "R" if replicas is None else str(replicas)
    if not shards:
        return f"{reps} replicas x {partitions} partitions, no parameter server"
    return f"1 coordinator + {shards} shards + {reps} replicas x {partitions} partitions"


def layout_for(world: int, config) -> Layout:
    """The layout a config asks for, checked against the world size."""
    lay = config.layout
    return make_layout(world, lay.shards, lay.replicas, lay.partitions)


def shard_slices(n_params: int, shards: int) -> list[slice]:
    """Split ``n_params`` into ``shards`` contiguous slices differing by at most one."""
    if shards < 1:
        raise ValueError("need at least one shard")
    base, extra = divmod(n_params, shards)
    slices, start = [], 0
    for s in range(shards):
        stop = start + base + (1 if s < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def overlap(a: slice, b: slice) -> slice | None:
    """The common part of two ranges of the flat vector, or None when they are disjoint."""
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return slice(start, stop) if start < stop else None


@dataclass(frozen=True)
class Part:
    """Where one shard meets a client's range.

    Attributes:
        rank: the shard's rank.  local: the part as a slice of the client's vector.
        offset: where the part starts in the shard's slice (elements).
    """

    rank: int
    local: slice
    offset: int


def parts_of(lo: int, hi: int, shard_ranks: list[int], slices: list[slice]) -> list[Part]:
    """The shards a range ``[lo, hi)`` meets, in slice order."""
    found = []
    for rank, part in zip(shard_ranks, slices, strict=True):
        common = overlap(part, slice(lo, hi))
        if common is not None:
            found.append(Part(rank, slice(common.start - lo, common.stop - lo),
                              common.start - part.start))
    return found
