"""Figure 3: model-parallel speed-up against machines, measured, modelled and the paper's.

Reads only the file ``bench/model_parallel.py`` writes (``results/fig3_measured.h5``):
``/measured/<model>/P<p>`` (this machine's jobs: each repeat's speed-up, paired with
P = 1's job of the same round, as small dots; the median as a large disc; the
speed-up in CPU seconds, which the machine's other jobs do not stretch, as a square) and
``/model/curves/<preset>/<model>`` (the scaling model on the network preset the file
names in ``/model``'s attributes, with its compute factor, as lines).  The paper's
values (Dean et al. 2012, Figure 3, as ``PAPER.md`` tabulates them, read off the
published figure to about +-0.2x) are drawn dashed and labelled "paper".  Left: speed-up
(time per mini-batch on 1 machine over N), the ideal line dotted; right: efficiency
(speed-up over N), which shows where machines stop paying for themselves.  The x axis
is logarithmic: the measured points (1, 2) and the paper's (up to 128) are decades apart.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError

# Dean et al. 2012, Figure 3, from ../shared/PAPER.md ("~": read off the figure, +-0.2x).
PAPER = {
    "speech": {1: 1.0, 2: 1.4, 4: 1.8, 8: 2.2, 16: 0.95, 32: 1.35, 64: 1.4, 128: 1.15},
    "images_80m": {1: 1.0, 4: 1.4, 8: 2.2, 16: 2.4, 36: 3.1, 64: 4.6, 100: 5.1, 128: 5.8},
    "images_330m": {1: 1.0, 2: 1.5, 4: 2.3, 8: 3.7, 16: 4.7, 36: 6.2, 64: 7.0, 100: 11.0,
                    128: 12.1},
    "images_1700m": {1: 1.0, 4: 2.2, 8: 3.4, 16: 4.6, 36: 5.6, 64: 9.9, 100: 12.3,
                     128: 13.2},
}
LABELS = {"speech": "speech 42M", "images_80m": "images 80M", "images_330m": "images 330M",
          "images_1700m": "images 1.7B"}


def read_fig3(path: Path) -> dict:
    """``{measured: {model: {P: (median, [per repeat])}}, curves: {model: {partitions,
    speedup}}, preset, factor}``."""
    try:
        with h5py.File(path, "r") as f:
            measured = {name: _measured(group) for name, group in f["measured"].items()}
            top = f["model"]
            preset = str(top.attrs["preset"])
            curves = {name: {k: g[k][()] for k in ("partitions", "speedup")}
                      for name, g in top[f"curves/{preset}"].items()}
            return {"measured": measured, "curves": curves, "preset": preset,
                    "factor": float(top.attrs["compute_factor"]),
                    "latency": float(top.attrs["latency"]),
                    "bandwidth": float(top.attrs["bandwidth"])}
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read {path} as a Figure 3 file (bench/model_parallel.py"
                        f" with the scaling model): {exc}") from None


def _measured(group) -> dict:
    """Per P: (median speed-up, each round's speed-up against P = 1's job that round,
    the speed-up in the busiest rank's CPU seconds)."""
    if "P1" not in group:
        return {}
    base = group["P1/seconds"][()]
    out = {}
    for g in group.values():
        seconds = g["seconds"][()]
        n = min(len(seconds), len(base))
        out[int(g.attrs["partitions"])] = (float(g.attrs["speedup"]), base[:n] / seconds[:n],
                                           float(g.attrs.get("cpu_speedup", np.nan)))
    return out


def _draw(ax, eff_ax, name: str, color: str, data: dict) -> None:
    label = LABELS.get(name, name)
    if name in data["curves"]:
        c = data["curves"][name]
        ax.plot(c["partitions"], c["speedup"], "-", color=color, lw=1.8,
                label=f"{label}: scaling model")
        eff_ax.plot(c["partitions"], c["speedup"] / c["partitions"], "-", color=color, lw=1.8)
    if name in PAPER:
        P, up = np.array(list(PAPER[name])), np.array(list(PAPER[name].values()))
        ax.plot(P, up, "--x", color=color, alpha=0.6, ms=5, label=f"{label}: paper")
        eff_ax.plot(P, up / P, "--x", color=color, alpha=0.6, ms=5)
    for P, (median, rounds, cpu) in sorted(data["measured"].get(name, {}).items()):
        ax.plot(np.full(len(rounds), P), rounds, ".", color=color, alpha=0.5)
        first = min(data["measured"][name]) == P
        ax.plot(P, median, "o", color=color, ms=8, mec="k",
                label=f"{label}: measured here (wall)" if first else None)
        ax.plot(P, cpu, "s", mfc="none", mec=color, ms=9,
                label=f"{label}: measured here (CPU)" if first else None)
        eff_ax.plot(P, median / P, "o", color=color, ms=8, mec="k")
        eff_ax.plot(P, cpu / P, "s", mfc="none", mec=color, ms=9)


def plot_fig3(path: str, out: str | None = None) -> Path:
    """Draw the figure; returns the PNG's path (default: ``fig3.png`` beside the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = Path(path)
    data = read_fig3(source)
    names = [n for n in LABELS if n in data["curves"] or n in data["measured"]]
    names += sorted(set(data["curves"]) - set(names))
    fig, (ax, eff_ax) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    for i, name in enumerate(names):
        _draw(ax, eff_ax, name, f"C{i}", data)
    top = max([max(PAPER[n].values()) for n in names if n in PAPER]
              + [float(np.max(c["speedup"])) for c in data["curves"].values()] + [2.0])
    ideal = np.array([1, 144])
    ax.plot(ideal, ideal, ":", color="k", lw=1, label="ideal (speed-up = machines)")
    ax.set_ylim(0, 1.15 * top)
    ax.set_ylabel("speed-up (time per mini-batch, 1 machine / N)")
    eff_ax.axhline(1.0, ls=":", color="k", lw=1)
    eff_ax.set_yscale("log")
    eff_ax.set_ylabel("efficiency (speed-up / machines), log scale")
    for a in (ax, eff_ax):
        a.set_xscale("log")
        a.set_xlabel("machines (partitions of one model replica), log scale")
        a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_title(f"Figure 3: model-parallel speed-up (model: {data['preset']},"
                 f" {data['latency'] * 1e6:g} us, {data['bandwidth'] / 1e6:g} MB/s;"
                 f" compute x{data['factor']:g})", fontsize=10)
    eff_ax.set_title("Efficiency: lines scaling model, dashed paper, dots measured here",
                     fontsize=10)
    target = Path(out) if out else source.parent / "fig3.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
