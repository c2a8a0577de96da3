"""Figure 4: test accuracy against training time per method, the paper's and ours.

Reads only the campaign file ``bench/fig4.py`` writes (layout:
:mod:`mpibelief.simulate.campaign`).  Three panels, because the two time scales are
not comparable (the paper's hours on a 2012 cluster with a 42M-parameter model and 1.1
billion frames; our simulated seconds with a 0.5M model on FSDD) and are never put on
one axis:

- left, "paper": Dean et al. 2012, Figure 4, as ``PAPER.md`` tabulates it (read off
  the published figure: +-0.3 points, +-1 h), from the shared warmstart (~10 h, 6.7%),
  with the paper's 16% target;
- middle, ours: the warmstart (grey) and every row's test accuracy against simulated
  seconds on the campaign's clock, the target, and where each row reaches it;
- right: time to the target over Downpour [small]'s (the paper's: Downpour [20]'s
  ~56 h; ours: our Downpour row with the fewer replicas), both clocks including the
  warmstart, so the two orderings can be read side by side on one honest scale.

Colours follow the paper's rows; rows without a paper counterpart (sync allreduce,
Strom) get their own.  Rows the simulator did not run are named under the middle panel.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mpibelief.simulate.campaign import read

# Dean et al. 2012, Figure 4 (PAPER.md): test frame accuracy (%) at hours; all from the
# ~10 h warmstart at 6.7%.  "first >= 16%": hours to the paper's target (None: not in 120 h).
PAPER_WARMSTART = (10.0, 6.7)
PAPER_TARGET = 16.0
PAPER = {
    "SGD [1]": ({20: 9.2, 40: 11.6, 60: 13.0, 80: 14.3, 110: 15.0, 120: 15.5}, None),
    "GPU [1]": ({20: 13.1, 40: 15.2, 60: 16.2, 80: 17.0, 110: 17.6, 120: 17.9}, 54.0),
    "Downpour [20]": ({20: 11.3, 40: 14.7, 60: 16.2, 80: 17.2, 110: 18.3, 118: 18.5}, 56.0),
    "Downpour [20] + Adagrad": ({20: 13.2, 40: 16.5, 60: 17.6, 75: 18.2}, 35.0),
    "Sandblaster L-BFGS [2000]": ({20: 13.6, 40: 18.2, 60: 19.7, 80: 20.3, 110: 21.0}, 27.0),
    "Downpour [200] + Adagrad": ({20: 17.2, 40: 20.0, 60: 21.0, 80: 21.5, 110: 22.0,
                                  120: 22.1}, 17.0),
}
COLORS = {"SGD [1]": "C0", "Downpour [20]": "C1", "Downpour [20] + Adagrad": "C2",
          "Downpour [200] + Adagrad": "C3", "Sandblaster L-BFGS [2000]": "C4",
          "GPU [1]": "C7"}
OTHER_COLORS = ["C5", "C6", "C8", "C9"]
REFERENCE = "Downpour [20]"  # the normalising row (the paper's and ours)


def colors_of(runs: dict, skipped: dict) -> dict:
    """Row key -> colour: the paper's row's colour, else the next free one."""
    out, spare = {}, iter(OTHER_COLORS * 3)
    for key, attrs in [*((k, r["attrs"]) for k, r in runs.items()), *skipped.items()]:
        out[key] = COLORS.get(str(attrs.get("paper", ""))) or next(spare)
    return out


def _paper_panel(ax) -> None:
    for name, (points, _) in PAPER.items():
        hours = [PAPER_WARMSTART[0], *points]
        acc = [PAPER_WARMSTART[1], *points.values()]
        ax.plot(hours, acc, "--x", color=COLORS[name], ms=5, label=f"{name} (paper)")
    ax.plot(*PAPER_WARMSTART, "ko", ms=5, label="warmstart, ~10 h (paper)")
    ax.axhline(PAPER_TARGET, color="k", lw=0.8, ls=":", label="target 16% (paper)")
    ax.set_xlim(0, 125)
    ax.set_ylim(0, 25)
    ax.set_xlabel("training time (hours, 2012 cluster)")
    ax.set_ylabel("test frame accuracy (%)")
    ax.set_title("Paper: speech 42M, 1.1G frames (Dean et al. 2012, Fig. 4)", fontsize=10)


def _our_panel(ax, data: dict, colors: dict) -> None:
    attrs, warm = data["attrs"], data["warmstart"]
    w0 = float(attrs["warmstart_seconds"])
    ax.plot(warm["wall_seconds"], 100 * warm["test_accuracy"], "-", color="0.4", lw=2,
            label=f"warmstart: SGD [1], {int(attrs['warmstart_steps'])} steps")
    target = 100 * float(attrs["target"])
    for key, run in data["runs"].items():
        a, m = run["attrs"], run["metrics"]
        t = np.concatenate([[w0], w0 + m["wall_seconds"]])
        acc = 100 * np.concatenate([[warm["test_accuracy"][-1]], m["test_accuracy"]])
        rate = float(a["lr"])
        how = f"lr {rate:g}" if math.isfinite(rate) else "L-BFGS"
        if t[-1] < 0.95 * float(attrs.get("horizon", 0.0)):  # a row run shorter (its sets)
            how += f", stopped at {t[-1]:.2f} s"
        ax.plot(t, acc, "-o", color=colors[key], lw=1.6, ms=2.5, label=f"{a['name']} ({how})")
        hit = float(a.get("time_to_target", math.nan))
        if math.isfinite(hit):
            ax.plot(hit, target, "o", color=colors[key], mec="k", ms=7)
    ax.axhline(target, color="k", lw=0.8, ls=":", label=f"target {target:.1f}%")
    top = max([100 * float(np.max(r["metrics"]["test_accuracy"])) for r in
               data["runs"].values()] + [target, 1.0])
    ax.set_ylim(0, 1.1 * top)
    ax.set_xlim(left=0)
    ax.set_xlabel("simulated training time (seconds, campaign clock)")
    ax.set_ylabel("test frame accuracy (%)")
    ax.set_title(f"Ours: FSDD, {_mb(attrs)} parameters, simulated on"
                 f" {attrs['network']} ({float(attrs['latency']) * 1e6:g} us,"
                 f" {float(attrs['bandwidth']) / 1e6:g} MB/s)", fontsize=10)
    for s in data["skipped"].values():
        ax.plot([], [], " ", label=f"not run: {s['name']} (not simulated yet)")


def _mb(attrs) -> str:
    return f"{int(attrs['n_params']) / 1e6:.2f}M"


def _ratio_panel(ax, data: dict, colors: dict) -> None:
    """Horizontal bars: time to target over the reference row's, paper beside ours."""
    ours = {(r["attrs"]["paper"] or r["attrs"]["name"]): (k, r)
            for k, r in data["runs"].items()}
    ref_t = float(ours[REFERENCE][1]["attrs"]["time_to_target"]) if REFERENCE in ours \
        else math.nan
    rows = [n for n in PAPER if n != "GPU [1]"] + [n for n in ours if n not in PAPER]
    cap = 3.0  # where a bar of a row that never reached the target ends
    drawn = False
    for i, name in enumerate(rows):
        color = COLORS.get(name) or colors[ours[name][0]]
        if name in PAPER:
            hours = PAPER[name][1]
            value = hours / PAPER[REFERENCE][1] if hours else cap
            ax.barh(i + 0.2, value, 0.38, color=color, alpha=0.45, hatch="//",
                    label="paper" if i == 0 else None)
            ax.text(value, i + 0.2, f"  {value:.2f} ({hours:g} h)" if hours else
                    "  not in 120 h", va="center", fontsize=7)
        if name not in ours:
            ax.text(0.02, i - 0.2, "ours: not run", va="center", fontsize=7, color="0.4")
            continue
        a = ours[name][1]["attrs"]
        t = float(a["time_to_target"])
        value = t / ref_t if math.isfinite(t) and math.isfinite(ref_t) else cap
        ax.barh(i - 0.2, value, 0.38, color=color, label=None if drawn else "ours")
        drawn = True
        note = "not reached" if not math.isfinite(t) else (
            f"{value:.2f} ({t:.2f} s)" if math.isfinite(ref_t) else f"{t:.2f} s")
        ax.text(value, i - 0.2, f"  {note}", va="center", fontsize=7)
    labels = []
    for name in rows:
        ours_name = ours[name][1]["attrs"]["name"] if name in ours else name
        label = name.replace("Sandblaster L-BFGS", "Sandblaster")
        labels.append(label if ours_name == name else f"{label}\n(ours: {ours_name})")
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.4, -0.7)  # top to bottom, room for the first row's note
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xlim(0, cap * 1.35)
    ax.set_xlabel(f"time to target / {REFERENCE}'s; clocks include the warmstart",
                  fontsize=8)
    ax.set_title(f"Time to target over {REFERENCE}'s\n(hatched: paper, 16%; solid: ours;"
                 f" a bar at {cap:g}: not reached)", fontsize=9)


def plot_fig4(path: str, out: str | None = None) -> Path:
    """Draw the figure; returns the PNG's path (default: ``fig4.png`` beside the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = Path(path)
    data = read(source)
    colors = colors_of(data["runs"], data["skipped"])
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(18, 5.6), layout="constrained",
                                           gridspec_kw={"width_ratios": [1, 1.2, 1]})
    _paper_panel(left)
    _our_panel(mid, data, colors)
    _ratio_panel(right, data, colors)
    for ax in (left, mid):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    right.legend(fontsize=7, loc="lower right")
    right.grid(alpha=0.3, axis="x")
    quick = " (QUICK: plumbing sizes, not a result)" if data["attrs"].get("quick") else ""
    fig.suptitle("Figure 4: test accuracy against training time, one warmstart for all"
                 f"{quick}", fontsize=11)
    target = Path(out) if out else source.parent / "fig4.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target
