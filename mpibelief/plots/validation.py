"""The simulator's validation: simulated against real Downpour runs on this machine.

Reads only the file ``python -m mpibelief.simulate.validate`` writes
(``results/sim_validation.h5``, documented there).  Three rows:

- test accuracy against samples applied, per case: the real runs' mean (dots and line)
  and the simulated runs' mean (line) at the first real run's evaluations, each run
  faint; the second half of the samples, where the curves are compared, shaded;
- the difference, simulated mean minus real, in points at each real evaluation, with
  the bound (+-2 points) as a band over the compared half;
- seconds per step and mean staleness per case, real and simulated side by side, the
  real value's band drawn as an error bar (+-25% of it; +-30% of it + 0.05 updates),
  each run as a dot.

The title of each case says its verdict and the machine its real runs met: the cores,
the other sessions wanting them (sampled, mean over the runs), and the load average
before and after.  The
axes start at 0 where a quantity does (accuracy, step time, staleness); the difference
axis is symmetric about 0 and never narrower than the bound.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError


def read_validation(path: Path) -> dict:
    """``{bounds: {...}, cases: {name: {real: {...}, sim: {...}, found: {...}}}}``."""
    try:
        with h5py.File(path, "r") as f:
            bounds = {k[len("bound_"):]: float(v) for k, v in f.attrs.items()
                      if k.startswith("bound_")}
            cases = {}
            for name, group in f["validation"].items():
                cases[name] = {"found": dict(group.attrs)}
                for label in ("real", "sim"):
                    g = group[label]
                    cases[name][label] = {**dict(g.attrs), **{k: g[k][()] for k in g}}
                real, sim = cases[name]["real"], cases[name]["sim"]
                if len(sim["samples"]) != len(real["samples"]):  # a file from before
                    # simulations were evaluated at the real samples: its dense curve there
                    sim["test_accuracy"] = np.interp(real["samples"], sim["samples"],
                                                     sim["test_accuracy"])
                    sim["samples"] = real["samples"]
            return {"bounds": bounds, "cases": dict(sorted(cases.items()))}
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read {path} as a validation file"
                        f" (python -m mpibelief.simulate.validate writes one): {exc}") from None


def _verdict(found: dict) -> str:
    ok = all(bool(found[k]) for k in ("step_ok", "staleness_ok", "accuracy_ok"))
    return "PASS" if ok else "FAIL"


def _curves(ax, diff_ax, name: str, case: dict, bound: float) -> None:
    real, sim, found = case["real"], case["sim"], case["found"]
    x = real["samples"] / 1000
    half = x.min() + (x.max() - x.min()) / 2
    for curves in (ax, diff_ax):
        curves.axvspan(half, x.max(), color="grey", alpha=0.1, lw=0)
    for color, run in (("C0", real), ("C1", sim)):
        for one in run.get("runs_test_accuracy", []):
            ax.plot(x, 100 * one, "-", color=color, alpha=0.25, lw=0.8)
    runs = len(real.get("runs_test_accuracy", [0]))
    ax.plot(x, 100 * sim["test_accuracy"], "-", color="C1", lw=1.8,
            label=f"simulated (mean of {runs})")
    ax.plot(x, 100 * real["test_accuracy"], "o-", color="C0", ms=5, lw=1,
            label=f"real (mean of {runs})")
    ax.set_ylim(0, 100 * max(real["test_accuracy"].max(), sim["test_accuracy"].max()) + 5)
    machine = (f"  ({int(found['cores'])} cores, {found['background']:.1f} others; load"
               f" {found['loadavg_before']:.1f}-{found['loadavg_after']:.1f})"
               if "cores" in found else "")
    ax.set_title(f"{name.replace('_', ' ')}: {_verdict(found)}{machine}", fontsize=9)
    diff = 100 * (sim["test_accuracy"] - real["test_accuracy"])
    diff_ax.fill_between([half, x.max()], -bound, bound, color="green", alpha=0.15,
                         label=f"bound +-{bound:g} points")
    diff_ax.axhline(0, color="k", lw=0.8)
    diff_ax.plot(x, diff, "o-", color="C3", ms=4, lw=1)
    top = max(bound * 1.5, float(np.abs(diff).max()) * 1.15)
    diff_ax.set_ylim(-top, top)
    diff_ax.set_xlabel("samples applied (thousands)")


def _bars(ax, cases: dict, key: str, scale: float, band) -> None:
    names = list(cases)
    x = np.arange(len(names))
    real = np.array([scale * cases[n]["real"][key] for n in names])
    sim = np.array([scale * cases[n]["sim"][key] for n in names])
    ax.bar(x - 0.2, real, 0.4, color="C0", label="real (mean)")
    ax.bar(x + 0.2, sim, 0.4, color="C1", label="simulated")
    ax.errorbar(x - 0.2, real, yerr=band(real), fmt="none", ecolor="k", capsize=6, lw=1,
                label="agreement band (each run: a dot)")
    for n, name in enumerate(names):
        for side, dx in (("real", -0.2), ("sim", 0.2)):
            runs = cases[name][side].get(f"runs_{key}")
            if runs is not None:
                ax.plot(np.full(len(runs), x[n] + dx), scale * np.asarray(runs), "k.", ms=4)
    ax.set_xticks(x, [n.replace("_", " ") for n in names])
    ax.set_ylim(0, 1.15 * max(real.max() + band(real).max(), sim.max()))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def plot_validation(path: str, out: str | None = None) -> Path:
    """Draw the figure; returns the PNG's path (default: beside the file, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = Path(path)
    data = read_validation(source)
    cases, bounds = data["cases"], data["bounds"]
    if not cases:
        raise UserError(f"{source}: no cases in /validation")
    n = len(cases)
    fig = plt.figure(figsize=(4 * max(n, 2), 10), layout="constrained")
    grid = fig.add_gridspec(3, max(n, 2), height_ratios=[1.2, 0.8, 1])
    for i, (name, case) in enumerate(cases.items()):
        ax = fig.add_subplot(grid[0, i])
        diff_ax = fig.add_subplot(grid[1, i], sharex=ax)
        _curves(ax, diff_ax, name, case, bounds["accuracy_points"])
        if i == 0:
            ax.set_ylabel("test frame accuracy (%)")
            diff_ax.set_ylabel("simulated - real (points)")
            ax.legend(fontsize=8, loc="lower right")
            diff_ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
        diff_ax.grid(alpha=0.3)
    half = max(n, 2) // 2
    step_ax = fig.add_subplot(grid[2, :half])
    stale_ax = fig.add_subplot(grid[2, half:])
    _bars(step_ax, cases, "step_seconds", 1e3, lambda v: bounds["step_seconds"] * v)
    step_ax.set_ylabel("milliseconds per step (replicas' mean)")
    step_ax.set_title(f"Seconds per step (band: +-{100 * bounds['step_seconds']:g}% of real)",
                      fontsize=10)
    _bars(stale_ax, cases, "staleness", 1.0, lambda v: bounds["staleness"] * v + 0.05)
    stale_ax.set_ylabel("mean staleness (updates)")
    stale_ax.set_title(f"Mean staleness (band: +-{100 * bounds['staleness']:g}% of real"
                       " + 0.05)", fontsize=10)
    with h5py.File(source, "r") as f:
        epochs = f.attrs.get("epochs", "?")
    fig.suptitle(f"Simulated against real Downpour on this machine, {epochs} epoch(s) per"
                 " case: accuracy compared over the shaded half", fontsize=11)
    target = Path(out) if out else source.with_suffix(".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
