"""Training data: one :class:`Dataset` type and one loader per source.

Every source (real FSDD speech frames, a synthetic teacher task, a user's HDF5 file)
ends up in the same shape, so the trainers never know where frames came from:
``x`` float32 ``(N, D)`` C-contiguous, ``y`` int32 ``(N,)`` in ``0..n_classes-1``.
Each replica keeps only its own :meth:`Dataset.shard` of the training set, as in
DistBelief, while the full test set stays with whoever evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from mpibelief.config import DataConfig
from mpibelief.errors import DataError

__all__ = ["Dataset", "load_dataset"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test frames with integer targets.

    Attributes:
        x_train: float32 ``(N, D)`` C-contiguous inputs.
        y_train: int32 ``(N,)`` class indices.
        x_test: float32 ``(M, D)`` C-contiguous inputs.
        y_test: int32 ``(M,)`` class indices.
        n_classes: number of output classes; every label is below it.
        name: short name of the source, e.g. ``"fsdd"``.
        info: provenance (feature parameters, cache file, shard) as plain scalars and
            strings, so it can be stored as HDF5 attributes next to the results.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        # Loaders are trusted to build these right; a mismatch here is a bug in a
        # loader, so plain assertions-with-messages (ValueError) are appropriate.
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
                raise ValueError(f"x_{split} must be C-contiguous 2-D float32")
            if y.dtype != np.int32 or y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must be int32 of shape ({x.shape[0]},)")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError("train and test inputs differ in width")

    @property
    def n_inputs(self) -> int:
        """Width of one input row (440 for FSDD: 11 frames x 40 mel energies)."""
        return self.x_train.shape[1]

    def shard(self, index: int, count: int) -> Dataset:
        """Replica ``index`` of ``count``: every ``count``-th training row from ``index``.

        The slice is strided rather than contiguous because sources store frames in
        file order (FSDD is sorted by digit); a contiguous block would hand one
        replica only zeros and ones.  Strided shards are disjoint, cover the training
        set exactly once, and each sees every class.  The test set is unchanged.

        Raises:
            ValueError: ``index`` is not in ``0..count-1``.
            DataError: more replicas than training rows, so a shard would be empty.
        """
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard index {index} is not in 0..{count - 1}")
        n = self.x_train.shape[0]
        if count > n:
            raise DataError(f"{count} replicas but only {n} training rows in {self.name}")
        if count == 1:
            return self
        return replace(
            self,
            x_train=np.ascontiguousarray(self.x_train[index::count]),
            y_train=np.ascontiguousarray(self.y_train[index::count]),
            info={**self.info, "shard_index": index, "shard_count": count},
        )


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset named by ``cfg.source``.

    Raises:
        DataError: the data is missing, corrupt or inconsistent (one-line message).
    """
    # Imported here so that each source's dependencies load only when used.
    if cfg.source == "fsdd":
        from mpibelief.data.fsdd import load_fsdd

        return load_fsdd(cfg)
    if cfg.source == "synthetic":
        from mpibelief.data.synthetic import load_synthetic

        return load_synthetic(cfg)
    if cfg.source == "hdf5":
        from mpibelief.data.hdf5 import load_hdf5

        return load_hdf5(cfg)
    raise DataError(f"unknown data source {cfg.source!r} (known: fsdd, synthetic, hdf5)")


def batches(n: int, batch: int, rng: np.random.Generator):
    """Endless shuffled mini-batch index arrays, a new permutation every epoch."""
    if n < batch:  # no full batch: the loop below would spin without yielding
        raise ValueError(f"{n} rows cannot fill a batch of {batch}")
    return _shuffled(n, batch, rng)


def _shuffled(n: int, batch: int, rng: np.random.Generator):
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]
