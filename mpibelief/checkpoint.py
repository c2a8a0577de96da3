"""Checkpoints: one consistent, verifiable snapshot of a run, and finding the newest.

A checkpoint ``N`` of a run lives in the run's checkpoint folder (``<result>.ckpt/``
beside the result file) as:

- ``N.part<k>.h5``: part ``k`` of the parameters (a shard's slice, or the whole model of
  a single replica) with its optimiser state and counters, written by its owner;
- ``N.h5``: the manifest, written last by the coordinator: the config, the run's
  counters and positions, and the SHA-256 of every part.

Every file is written under a temporary name, flushed, ``fsync``ed and renamed into
place, so a crash leaves either the old file or the new one, never half of one.  The
manifest is the commit point: a checkpoint counts only if its manifest exists and every
part's checksum (and the manifest's own, over its attributes) verifies, so a truncated
or bit-flipped file is detected and the previous checkpoint is used instead.  The last
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError

FORMAT = "mpibelief-checkpoint 1"
# Keys that may differ between a checkpoint and the config resuming it.
RESUMABLE = {"train.epochs", "train.max_seconds", "train.eval_every", "run.threads",
             "checkpoint.every", "checkpoint.keep", "faults"}


def folder_for(result: Path) -> Path:
    return result.with_suffix(".ckpt")


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _attrs_digest(attrs: dict) -> str:
    return hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()


def _write_atomic(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def write_part(folder: Path, number: int, part: int, arrays: dict[str, np.ndarray],
               attrs: dict | None = None) -> str:
    """Write one part of checkpoint ``number``; returns its checksum for the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    sha = digest(arrays)
    _write_atomic(folder / f"{number}.part{part}.h5", arrays,
                  {**(attrs or {}), "format": FORMAT, "sha256": sha})
    return sha


def write_manifest(folder: Path, number: int, state: dict, parts: list[str],
                   keep: int = 3) -> Path:
    """Commit checkpoint ``number``: ``state`` (JSON-able) and the parts' checksums.

    Then delete all but the newest ``keep`` checkpoints.
    """
    attrs = {"format": FORMAT, "number": str(number), "state": json.dumps(state),
             "parts": json.dumps(parts)}  # strings only: they read back exactly
    attrs["sha256"] = _attrs_digest(attrs)
    path = folder / f"{number}.h5"
    _write_atomic(path, {}, attrs)
    for old in sorted(numbers(folder))[:-keep]:
        for f in folder.glob(f"{old}.*h5"):
            f.unlink(missing_ok=True)
    return path


def numbers(folder: Path) -> list[int]:
    """Checkpoint numbers with a manifest in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob("*.h5") if p.stem.isdigit())


def read_part(folder: Path, number: int, part: int) -> tuple[dict, dict]:
    """The verified arrays and attributes of one part.

    Raises:
        UserError: missing, unreadable, or its checksum does not match.
    """
    path = folder / f"{number}.part{part}.h5"
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][()] for name in f}
            attrs = dict(f.attrs)
    except OSError as exc:
        raise UserError(f"checkpoint part {path} cannot be read: {exc}") from None
    if attrs.get("format") != FORMAT or digest(arrays) != attrs.get("sha256"):
        raise UserError(f"checkpoint part {path} is corrupt (checksum mismatch)")
    return arrays, attrs


def read_manifest(folder: Path, number: int) -> dict:
    """The manifest's state, after verifying it and every part it names."""
    path = folder / f"{number}.h5"
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else str(v))
                     for k, v in f.attrs.items()}
    except OSError as exc:
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from None
    claimed = attrs.pop("sha256", None)
    if attrs.get("format") != FORMAT or _attrs_digest(attrs) != claimed:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch)")
    for part, sha in enumerate(json.loads(attrs["parts"])):
        _, part_attrs = read_part(folder, number, part)
        if part_attrs["sha256"] != sha:
            raise UserError(f"checkpoint {path}: part {part} is from another checkpoint")
    state = json.loads(attrs["state"])
    state["number"] = number
    return state


def newest_valid(folder: Path, report=print) -> dict:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped.

    Raises:
        UserError: there is no valid checkpoint in ``folder``.
    """
    for number in reversed(numbers(folder)):
        try:
            return read_manifest(folder, number)
        except UserError as exc:
            report(f"mpibelief: skipping checkpoint {number}: {exc}")
    raise UserError(f"no valid checkpoint in {folder} to resume from")


def config_difference(saved_toml: str, current_toml: str) -> str | None:
    """The first config key that differs and may not (``table.key = old``, ``new``)."""
    import tomllib

    old, new = tomllib.loads(saved_toml), tomllib.loads(current_toml)
    for table in sorted(set(old) | set(new)):
        if table in RESUMABLE:
            continue
        keys = set(old.get(table, {})) | set(new.get(table, {}))
        for key in sorted(keys):
            if f"{table}.{key}" in RESUMABLE:
                continue
            a, b = old.get(table, {}).get(key), new.get(table, {}).get(key)
            if a != b:
                return f"{table}.{key} = {a!r} in the checkpoint, {b!r} now"
    return None
