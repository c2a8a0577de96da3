"""Rank layout: roles by rank, world-size errors naming both numbers, shard slices."""

from __future__ import annotations

import pytest

from mpibelief.errors import LayoutError
from mpibelief.layout import COORDINATOR, SHARD, WORKER, make_layout, shard_slices


def test_parameter_server_layout_orders_coordinator_shards_workers():
    lay = make_layout(7, shards=2, replicas=2, partitions=2)
    assert [r.kind for r in lay.roles] == [COORDINATOR, SHARD, SHARD] + [WORKER] * 4
    assert lay.shard_ranks() == [1, 2]
    assert lay.worker_ranks(1) == [5, 6]
    assert [(r.index, r.partition) for r in lay.roles[3:]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.rank for r in lay.roles if r.coordinates] == [0]


def test_without_shards_rank0_trains_and_coordinates():
    lay = make_layout(1, shards=0, replicas=1, partitions=1)
    (only,) = lay.roles
    assert only.kind == WORKER and only.coordinates


def test_zero_replicas_fills_the_world():
    assert make_layout(7, shards=2, replicas=0, partitions=1).replicas == 4
    assert make_layout(7, shards=2, replicas=0, partitions=2).replicas == 2


@pytest.mark.parametrize(
    ("world", "shards", "replicas", "partitions", "need"),
    [(7, 2, 2, 1, 5), (2, 0, 1, 1, 1), (3, 2, 0, 1, 4), (6, 2, 0, 2, 5)],
)
def test_wrong_world_names_both_numbers(world, shards, replicas, partitions, need):
    with pytest.raises(LayoutError, match=f"need {need} ranks.*got {world}"):
        make_layout(world, shards, replicas, partitions)


@pytest.mark.parametrize(("n", "s"), [(10, 3), (3, 3), (1000003, 7), (5, 1)])
def test_shard_slices_tile_the_vector(n, s):
    slices = shard_slices(n, s)
    assert slices[0].start == 0 and slices[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:], strict=False))
    sizes = [sl.stop - sl.start for sl in slices]
    assert max(sizes) - min(sizes) <= 1
