"""Train and test accuracy against training time, for one or more runs.

Reads only result files (see :mod:`mpibelief.results`).  The accuracy axis runs from 0
to 1 so that no run looks better than it is, and chance level is drawn for scale.
"""

from __future__ import annotations

from pathlib import Path

from mpibelief.results import read_metrics


def _label(path: Path, attrs: dict) -> str:
    algo = attrs.get("algorithm", "?")
    return f"{path.stem} ({algo}, {attrs.get('world_size', '?')} ranks)"


def time_unit(seconds: float) -> tuple[float, str]:
    """A readable unit for an axis that runs to ``seconds``: (divisor, name)."""
    if seconds < 120:
        return 1.0, "seconds"
    if seconds < 2 * 3600:
        return 60.0, "minutes"
    return 3600.0, "hours"


def plot_accuracy(runs: list[str], out: str | None = None) -> Path:
    """Draw the figure; returns the PNG's path (default: the first run's, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    chance = None
    loaded = []
    for run in runs:
        path = Path(run)
        loaded.append((path, *read_metrics(path)))
    longest = max((float(m["wall_seconds"].max(initial=0)) for _, _, m in loaded), default=0)
    scale, unit = time_unit(longest)
    for i, (path, attrs, m) in enumerate(loaded):
        color = f"C{i}"
        t = m["wall_seconds"] / scale
        ax.plot(t, m["test_accuracy"], "-o", ms=3, color=color,
                label=f"{_label(path, attrs)}: test")
        ax.plot(t, m["train_accuracy"], "--", color=color, alpha=0.7,
                label=f"{path.stem}: train")
        if "n_classes" in attrs:
            chance = 1.0 / float(attrs["n_classes"])
    if chance:
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlabel(f"training time ({unit})")
    ax.set_ylabel("frame accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Frame accuracy against training time")
    target = Path(out) if out else Path(runs[0]).with_suffix(".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
