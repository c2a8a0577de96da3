"""Strom compression: test accuracy and seconds per step against the compression ratio.

Reads only ``results/compression.h5`` as ``bench/compression.py`` writes it
(``/bench/compression/<case>``, one value per repeat).  Two panels share the x axis,
the compression ratio (dense float32 bytes over bytes sent), on a log scale because
the cases are decades apart (10x, 100x, 1000x); uncompressed sync SGD sits at 1x.
Every repeat is drawn, the median as a diamond joined by a line, so the spread is
visible.  The accuracy axis is zoomed to the cases (a few points around dense sync
SGD's median, drawn dashed) because the differences that matter are about a point;
the shaded band, one point below dense, is the acceptance margin and gives the scale.
The time axis starts at 0.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError


def read_cases(path: Path) -> dict[str, dict]:
    """``{case: {accuracy, seconds_per_step, ratio, fraction (arrays), kept}}``."""
    try:
        with h5py.File(path, "r") as f:
            group = f["bench/compression"]
            return {name: {**{k: g[k][()] for k in g}, "kept": float(g.attrs["kept"])}
                    for name, g in group.items()}
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read {path} as a compression bench file: {exc}") from None


def _order(cases: dict) -> list[str]:
    return sorted(cases, key=lambda name: float(np.median(cases[name]["ratio"])))


def _legend(name: str, kept: float) -> str:
    if name == "dense":
        return "dense (sync SGD)"
    return f"keep {100 * kept:g}% (adaptive tau)" if kept else f"fixed {name}"


def plot_compression(path: str, out: str | None = None) -> Path:
    """Draw the figure; returns the PNG's path (default: beside the file, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = Path(path)
    cases = read_cases(source)
    if "dense" not in cases:
        raise UserError(f"{source}: no dense case to compare against")
    names = _order(cases)
    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    medians = {}
    for i, name in enumerate(names):
        c = cases[name]
        label = _legend(name, c["kept"])
        for ax, key, scale in ((acc_ax, "accuracy", 100.0), (time_ax, "seconds_per_step", 1e3)):
            ax.plot(c["ratio"], scale * c[key], "o", color=f"C{i}", alpha=0.5, ms=4)
            ax.plot(np.median(c["ratio"]), scale * np.median(c[key]), "D", color=f"C{i}",
                    ms=7, label=label if ax is acc_ax else None)
        medians[name] = [np.median(c[k]) for k in ("ratio", "accuracy", "seconds_per_step")]
    line = np.array([medians[n] for n in names])
    acc_ax.plot(line[:, 0], 100 * line[:, 1], "-", color="grey", lw=0.8)
    time_ax.plot(line[:, 0], 1e3 * line[:, 2], "-", color="grey", lw=0.8)
    base = 100 * float(np.median(cases["dense"]["accuracy"]))
    acc_ax.axhline(base, color="k", lw=0.8, ls="--")
    acc_ax.axhspan(base - 1.0, base, color="green", alpha=0.12, label="within 1 point of dense")
    low = min(100 * float(np.min(c["accuracy"])) for c in cases.values())
    acc_ax.set_ylim(max(0.0, low - 5.0), min(100.0, base + 3.0))
    time_ax.set_ylim(bottom=0)
    for ax in (acc_ax, time_ax):
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio (dense float32 bytes / bytes sent), log scale")
        ax.grid(alpha=0.3, which="both")
    acc_ax.set_ylabel("test frame accuracy (%)")
    time_ax.set_ylabel("milliseconds per step (rank 0)")
    acc_ax.legend(fontsize=8, loc="lower left")
    with h5py.File(source, "r") as f:
        epochs, replicas = f.attrs.get("epochs", "?"), f.attrs.get("replicas", "?")
    acc_ax.set_title(f"Accuracy after {epochs} epochs, {replicas} replicas")
    time_ax.set_title("Time per synchronous step")
    target = Path(out) if out else source.with_suffix(".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
