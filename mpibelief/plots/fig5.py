"""Figure 5: time to the target accuracy against machines and against cores, per method.

Reads only the campaign file ``bench/fig5.py`` writes (layout:
:mod:`mpibelief.simulate.campaign`): per method family, its four resource
configurations, each a marker at (machines, time to target) on the left and (cores,
time to target) on the right, joined in order of resources.  A configuration that did
not reach the target within its epochs is an open marker on the "not reached" band at
the top.  The time is simulated seconds on the campaign's clock, which includes the
warmstart (the dotted floor: no method can beat it).  How machines and cores are
counted is printed on the figure, as the file states it.

The paper's Figure 5 values are not tabulated (PAPER.md: "the ordering and the crossover
are what to compare"), so the paper is quoted, labelled, in a box: its findings, not
its numbers.  The resource axes are logarithmic (1 to thousands); the time axes start
at zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mpibelief.simulate.campaign import read

FAMILY_COLORS = {"SGD [1]": "C0", "Downpour": "C1", "Downpour + Adagrad": "C2",
                 "Sandblaster L-BFGS": "C4", "Sync allreduce + Adagrad": "C5",
                 "Sync + Strom 1% + Adagrad": "C6"}
PAPER_FINDINGS = (
    "paper (Dean et al. 2012, Fig. 5; findings, no values tabulated):\n"
    "- Downpour + Adagrad: the best time for any budget up to ~2000 cores\n"
    "- fixed-rate Downpour often misses the deadline\n"
    "- Sandblaster L-BFGS scales with cores; may be fastest at ~30k cores")


def families(data: dict) -> dict:
    """``{family: [(machines, cores, seconds or NaN, label)]}`` in file order."""
    out: dict = {}
    for run in data["runs"].values():
        a = run["attrs"]
        out.setdefault(str(a["family"]), []).append(
            (int(a["machines"]), int(a["cores"]), float(a["time_to_target"]),
             _short(a)))
    return out


def _short(a) -> str:
    text = f"R{int(a['replicas'])}"
    if int(a["shards"]):
        text += f" S{int(a['shards'])}"
    return text + (f" P{int(a['partitions'])}" if int(a["partitions"]) > 1 else "")


def _panel(ax, fams: dict, index: int, top: float, skipped: dict) -> None:
    band = top * 1.08
    for i, (family, points) in enumerate(fams.items()):
        color = FAMILY_COLORS.get(family, f"C{(i + 7) % 10}")
        pts = sorted(points, key=lambda p: p[index])
        x = np.array([p[index] for p in pts], float)
        t = np.array([p[2] for p in pts])
        ok = np.isfinite(t)
        if ok.any():
            ax.plot(x[ok], t[ok], "-o", color=color, ms=6, mec="k", label=family)
        ax.plot(x[~ok], np.full((~ok).sum(), band), "x", color=color, ms=8,
                label=None if ok.any() else f"{family} (none reached the target)")
        for p in pts:
            y = p[2] if math.isfinite(p[2]) else band
            ax.annotate(p[3], (p[index], y), textcoords="offset points", xytext=(4, 3),
                        fontsize=6, color=color)
    for s in _skipped_families(skipped):
        ax.plot([], [], " ", label=f"not run: {s} (not simulated yet)")
    ax.axhline(band, color="0.6", lw=0.6)
    ax.text(1.0, band, "not reached ", ha="right", va="bottom", fontsize=7, color="0.4",
            transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib_ticker().LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib_ticker().FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    ax.set_ylim(0, band * 1.08)
    ax.grid(alpha=0.3, which="both")


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _skipped_families(skipped: dict) -> list[str]:
    return sorted({str(s.get("family", s["name"])) for s in skipped.values()})


def plot_fig5(path: str, out: str | None = None) -> Path:
    """Draw the figure; returns the PNG's path (default: ``fig5.png`` beside the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = Path(path)
    data = read(source)
    attrs = data["attrs"]
    fams = families(data)
    times = [p[2] for pts in fams.values() for p in pts if math.isfinite(p[2])]
    top = max(times + [float(attrs["warmstart_seconds"]) * 2, 1e-3])
    fig, axes = plt.subplots(1, 2, figsize=(15, 7), layout="constrained")
    for ax, index, what in ((axes[0], 0, "machines"), (axes[1], 1, "cores")):
        _panel(ax, fams, index, top, data["skipped"])
        ax.axhline(float(attrs["warmstart_seconds"]), color="k", ls=":", lw=0.8,
                   label="warmstart's length (the floor)")
        ax.set_xlabel(f"{what} (log scale)")
        ax.set_ylabel(f"simulated seconds to {100 * float(attrs['target']):.1f}% test"
                      " accuracy (campaign clock)")
    axes[0].set_title("Time to target against machines", fontsize=10)
    axes[1].set_title("Time to target against cores", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower left", ncol=2, fontsize=8)
    counting = "counting: " + str(attrs["counting"]).replace(": a replica", ":\na replica")
    notes = fig.legend([], [], title=PAPER_FINDINGS + "\n" + counting,
                       loc="outside lower right", title_fontsize=7.5)
    notes._legend_box.align = "left"  # the title's lines flush left
    quick = " (QUICK: plumbing sizes, not a result)" if attrs.get("quick") else ""
    fig.suptitle(f"Figure 5: FSDD, {int(attrs['n_params']) / 1e6:.2f}M parameters,"
                 f" simulated on {attrs['network']}; every run to"
                 f" {float(attrs['horizon']):.2f} s or {float(attrs['epochs']):g} epochs"
                 f"{quick}", fontsize=11)
    target = Path(out) if out else source.parent / "fig5.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target
