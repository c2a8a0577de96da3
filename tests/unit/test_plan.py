"""How a model is cut into partitions: tiles, windows, layout order, boundary bytes."""

from __future__ import annotations

import numpy as np
import pytest

from mpibelief.layers import LocallyConnected, box_shape, grid
from mpibelief.model import Model, image_stack
from mpibelief.plan import Plan, boundary_bytes, intersect, size


def image(output="softmax"):
    return Model.of(image_stack((17, 15, 2), 5, 3, rf=4, strides=(1, 2), pools=(2, 1), lcn=3),
                    (17, 15, 2), output, allocate=False)


MODELS = {"mlp": lambda: Model(13, 7, 11, 2, "sigmoid", allocate=False), "image": image}


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiles_cover_every_output_once_and_windows_fit(name, partitions):
    model = MODELS[name]()
    plan = Plan(model, partitions)
    for layer, tiles, windows in zip(model.layers, plan.tiles, plan.windows, strict=True):
        assert sum(size(t) for t in tiles) == int(np.prod(layer.out_shape))
        for a in range(partitions):
            for b in range(a + 1, partitions):
                assert intersect(tiles[a], tiles[b]) is None
        for tile, window in zip(tiles, windows, strict=True):
            if size(tile):  # the local layer computes exactly the tile from the window
                local = layer.local(tile)
                assert local.in_shape == box_shape(window)
                assert local.out_shape == box_shape(tile)


@pytest.mark.parametrize("partitions", [1, 2, 3, 4])
def test_layout_is_partition_major_and_one_partition_is_the_flat_vector(partitions):
    model = image()
    lay = model.layout(partitions)
    ranges = [lay.partition(p) for p in range(partitions)]
    assert ranges[0][0] == 0 and ranges[-1][1] == model.n_params
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))
    v = np.arange(model.n_params, dtype=np.float32)
    ordered = model.to_layout(v, partitions)
    assert sorted(ordered.tolist()) == v.tolist()  # a permutation
    np.testing.assert_array_equal(model.from_layout(ordered, partitions), v)
    if partitions == 1:
        np.testing.assert_array_equal(ordered, v)


def test_fully_connected_units_cross_once_to_each_partition():
    model, batch = Model(13, 7, 11, 2, "sigmoid", allocate=False), 5
    moved = boundary_bytes(model, 3, batch)
    assert not moved[0].any()  # every partition reads the data itself
    owned = [4, 4, 3]  # 11 hidden units over 3 partitions
    for layer in (1, 2):
        for q in range(3):
            for p in range(3):
                assert moved[layer, q, p] == (0 if p == q else 4 * batch * owned[q])
    assert not boundary_bytes(model, 1, batch).any()


def test_locally_connected_halo_is_the_neighbours_rows():
    first = LocallyConnected((10, 10, 1), 3, 1, 4, "relu")  # -> 8x8x4
    second = LocallyConnected(first.out_shape, 3, 1, 2, "relu")  # -> 6x6x2
    model = Model.of([first, second], (10, 10, 1), allocate=False)
    assert grid(2) == (2, 1)
    moved = boundary_bytes(model, 2, batch=3)
    # tiles of rows [0, 3) and [3, 6) read rows [0, 5) and [3, 8) of the 8x8x4 map,
    # owned as rows [0, 4) and [4, 8): one row of 8 locations x 4 units each way.
    assert moved[1, 1, 0] == moved[1, 0, 1] == 4 * 3 * 8 * 4
    assert moved[1].sum() == 2 * 4 * 3 * 8 * 4


def test_grid_is_as_square_as_the_count_allows():
    assert [grid(p) for p in (1, 2, 3, 4, 6, 8, 9, 144)] == [
        (1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (4, 2), (3, 3), (12, 12)]
