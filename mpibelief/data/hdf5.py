"""User data from one HDF5 file: ``/train/x``, ``/train/y``, ``/test/x``, ``/test/y``.

``x`` is a 2-D float array (rows are samples), ``y`` a 1-D integer array of class
indices of the same length; train and test have the same number of features.  The
number of classes is the root attribute ``n_classes`` when present (so a class missing
from a small file still gets an output unit), else the largest label plus one.

The file is someone's own, so every check ends in a one-line :class:`DataError` that
names the file and the dataset at fault rather than a traceback from deep inside a
training step.  The data is used as given: no normalisation, no shuffling.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mpibelief.config import DataConfig
from mpibelief.data import Dataset
from mpibelief.errors import DataError

DATASETS = ("/train/x", "/train/y", "/test/x", "/test/y")


def load_hdf5(cfg: DataConfig) -> Dataset:
    """Load and validate the user's HDF5 file ``cfg.path``.

    Raises:
        DataError: missing or unreadable file, a missing dataset, or a shape, dtype,
            value or label-range problem; the message names the file and dataset.
    """
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: _read(f, name, path) for name in DATASETS}
            n_classes_attr = f.attrs.get("n_classes")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({_first_line(exc)})") from None
    for split in ("train", "test"):
        _check_split(arrays[f"/{split}/x"], arrays[f"/{split}/y"], split, path)
    # Cast before the value checks: float64 beyond float32's range becomes inf here.
    x_train = np.ascontiguousarray(arrays["/train/x"], np.float32)
    x_test = np.ascontiguousarray(arrays["/test/x"], np.float32)
    y_train, y_test = arrays["/train/y"], arrays["/test/y"]
    for split, x in (("train", x_train), ("test", x_test)):
        if not np.isfinite(x).all():
            raise DataError(f"{path}: /{split}/x contains NaN or values beyond float32 range")
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(
            f"{path}: /train/x has {x_train.shape[1]} features but /test/x has "
            f"{x_test.shape[1]}"
        )
    n_classes = _n_classes(n_classes_attr, y_train, y_test, path)
    origin = "attribute" if n_classes_attr is not None else "labels"
    info = {"path": str(path.resolve()), "n_classes_from": origin}
    return Dataset(
        x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
        n_classes=n_classes, name="hdf5", info=info,
    )


def _read(f: h5py.File, name: str, path: Path) -> np.ndarray:
    """One dataset as a numpy array, or a DataError saying why it cannot be."""
    obj = f.get(name)
    if obj is None:
        raise DataError(f"{path}: missing dataset {name}")
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: {name} is a group, expected a dataset")
    kind = obj.dtype.kind
    if name.endswith("/x") and kind not in "fiu":
        raise DataError(f"{path}: {name} has dtype {obj.dtype}, expected floating point")
    if name.endswith("/y") and kind not in "iu":
        raise DataError(f"{path}: {name} has dtype {obj.dtype}, expected integer labels")
    return obj[()]


def _check_split(x: np.ndarray, y: np.ndarray, split: str, path: Path) -> None:
    """Shapes and values of one split."""
    if x.ndim != 2:
        raise DataError(f"{path}: /{split}/x must be 2-D (samples, features), got {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{path}: /{split}/y must be 1-D (samples,), got {y.shape}")
    if len(x) != len(y):
        raise DataError(
            f"{path}: /{split}/x has {len(x)} rows but /{split}/y has {len(y)} labels"
        )
    if len(x) == 0 or x.shape[1] == 0:
        raise DataError(f"{path}: /{split}/x is empty, shape {x.shape}")
    if np.issubdtype(y.dtype, np.signedinteger) and y.min() < 0:
        raise DataError(f"{path}: /{split}/y has negative label {int(y.min())}")


def _n_classes(attr, y_train: np.ndarray, y_test: np.ndarray, path: Path) -> int:
    """Number of classes from the attribute if present, else from the labels."""
    largest = int(max(y_train.max(), y_test.max()))
    if largest >= np.iinfo(np.int32).max:
        raise DataError(f"{path}: label {largest} is too large for an int32 class index")
    if attr is None:
        if largest + 1 < 2:
            raise DataError(f"{path}: labels are all 0; at least 2 classes are needed")
        return largest + 1
    value = np.asarray(attr)
    if value.shape != () or value.dtype.kind not in "iu" or int(value) < 2:
        raise DataError(f"{path}: attribute n_classes = {attr!r} must be an integer >= 2")
    n_classes = int(value)
    if largest >= n_classes:
        split = "train" if y_train.max() == largest else "test"
        raise DataError(
            f"{path}: /{split}/y has label {largest}, outside 0..{n_classes - 1} "
            f"(attribute n_classes = {n_classes})"
        )
    return n_classes


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
