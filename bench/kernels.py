"""Single-thread speed of the numba kernels against their numpy twins and sgemm.

Cases (``--quick`` shrinks every shape, for smoke tests):

* ``dense<k>_<i>x<o>``: layer ``k`` of the paper's speech model
  (440-2560-2560-2560-2560-8192, batch 128), ``dense_forward`` + ``dense_backward``;
* ``dense_stack``: the whole model, forward through all layers, then backward, with
  ``dense_backward_params`` for the first layer (no gradient w.r.t. the data);
* ``lc``: the locally connected layer (32x32x3 input, 10x10 windows, stride 2, 8 units
  per location, batch 32), ``lc_forward`` + ``lc_backward``;
* ``sgemm_1024``: ``np.dot`` of two square float32 1024x1024 matrices.

FLOP model (multiply and add count 2; bias, activation and copies are not counted):
dense forward ``2*n*i*o``, backward ``2*n*i*o`` for ``dx`` plus ``2*n*i*o`` for ``dw``;
LC with ``K = rf*rf*C`` forward ``2*n*OH*OW*K*U``, backward the same again for ``dx`` and
for ``dw``.  The sgemm rate of a dense case is ``np.dot`` doing exactly the products
the kernels do (``x @ w``, ``dy @ w.T``, ``x.T @ dy`` per layer, no ``dx`` for the
first layer of the stack), so the ratio measures what the kernels add or lose over raw
BLAS.  The LC goal uses ``sgemm_1024`` (timed in turn with the LC candidates, so under
the same load); the LC ratio to the 128x2560x2560 layer sgemm is printed for
information.

Goals (reported, not asserted): dense_stack >= 0.8 x its sgemm rate; lc >= 0.25 x the
sgemm rate and >= 3 x its numpy twin.

Method: every candidate is called once untimed (JIT, caches), kernel and twin results
are compared (exit 1 on mismatch), then each repeat times every candidate of a case in
turn (so load from other processes hits all of them alike; the square sgemm is timed in
the LC case's turn); a repeat runs a short call several times and records the mean.
Reported times are medians over repeats.
"""

import os

THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS")
for _var in THREAD_VARS:  # before numpy / numba are imported anywhere
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402  (numba's BLAS is scipy's)

from mpibelief import kernels, reference  # noqa: E402

SPEECH = (440, 2560, 2560, 2560, 2560, 8192)
FULL = {"layers": SPEECH, "batch": 128, "lc": (32, 32, 32, 3, 10, 2, 8), "square": 1024}
QUICK = {"layers": (40, 96, 64, 80), "batch": 16, "lc": (4, 12, 12, 3, 4, 2, 4),
         "square": 128}
MIN_BATCH_SECONDS = 0.02  # short calls are repeated to fill at least this much time
F32 = np.float32


def _dense_pass(mod, acts, ws, bs, grads, dws, dbs):
    """Forward through the stack, then backward; first layer skips ``dx``."""
    for layer, (w, b) in enumerate(zip(ws, bs, strict=True)):
        mod.dense_forward(acts[layer], w, b, acts[layer + 1])
    for layer in range(len(ws) - 1, 0, -1):
        mod.dense_backward(acts[layer], ws[layer], grads[layer + 1], grads[layer],
                           dws[layer], dbs[layer])
    mod.dense_backward_params(acts[0], grads[1], dws[0], dbs[0])


def dense_cases(layers, n, rng):
    """The whole stack and each layer: candidates, flops, shapes, outputs to compare."""
    ws = [(rng.standard_normal((i, o)) / math.sqrt(i)).astype(F32)
          for i, o in zip(layers[:-1], layers[1:], strict=True)]
    bs = [rng.standard_normal(o).astype(F32) for o in layers[1:]]
    x = rng.standard_normal((n, layers[0])).astype(F32)
    gy = rng.standard_normal((n, layers[-1])).astype(F32)

    def buffers():
        acts = [x] + [np.empty((n, d), F32) for d in layers[1:]]
        grads = [np.empty((n, d), F32) for d in layers[:-1]] + [gy]
        return acts, grads, [np.empty_like(w) for w in ws], [np.empty_like(b) for b in bs]

    mine, twin = buffers(), buffers()
    scratch = buffers()
    fwd = [2 * n * w.shape[0] * w.shape[1] for w in ws]

    def sgemm(layer, with_dx=True):
        """np.dot on the layer's products: x @ w, dy @ w.T (if with_dx), x.T @ dy."""
        a, w, g = mine[0][layer], ws[layer], mine[1][layer + 1]
        np.dot(a, w, out=scratch[0][layer + 1])
        if with_dx:
            np.dot(g, w.T, out=scratch[1][layer])
        np.dot(a.T, g, out=scratch[2][layer])

    cases = {"dense_stack": {
        "kernel": lambda: _dense_pass(kernels, mine[0], ws, bs, *mine[1:]),
        "numpy": lambda: _dense_pass(reference, twin[0], ws, bs, *twin[1:]),
        "sgemm": lambda: [sgemm(k, k > 0) for k in range(len(ws))],
        "flops": 3 * sum(fwd) - fwd[0], "sgemm_flops": 3 * sum(fwd) - fwd[0],
        "shapes": {"layers": list(layers), "batch": n},
        "compare": lambda: [  # activations, data gradients (not the first), dw, db
            *zip(mine[0][1:], twin[0][1:], strict=True),
            *zip(mine[1][1:-1], twin[1][1:-1], strict=True),
            *zip(mine[2], twin[2], strict=True), *zip(mine[3], twin[3], strict=True)],
    }}
    for k, (w, b) in enumerate(zip(ws, bs, strict=True)):
        a, out, g = mine[0][k], mine[0][k + 1], mine[1][k + 1]
        dx, dw, db = np.empty_like(a), mine[2][k], mine[3][k]

        def run(mod, a=a, w=w, b=b, out=out, g=g, dx=dx, dw=dw, db=db):
            mod.dense_forward(a, w, b, out)
            mod.dense_backward(a, w, g, dx, dw, db)

        cases[f"dense{k}_{w.shape[0]}x{w.shape[1]}"] = {
            "kernel": lambda run=run: run(kernels), "numpy": lambda run=run: run(reference),
            "sgemm": lambda k=k: sgemm(k),
            "flops": 3 * fwd[k], "sgemm_flops": 3 * fwd[k],
            "shapes": {"batch": n, "in": w.shape[0], "out": w.shape[1]},
            "compare": lambda: [],  # same kernels as the stack, checked there
        }
    return cases


def lc_case(n, h, w, c, rf, stride, u, rng):
    """The locally connected layer, forward + backward, kernel and twin."""
    oh, ow = kernels.lc_output_shape(h, w, rf, stride)
    k = rf * rf * c
    x = rng.standard_normal((n, h, w, c)).astype(F32)
    wt = (rng.standard_normal((oh, ow, k, u)) / math.sqrt(k)).astype(F32)
    b = rng.standard_normal((oh, ow, u)).astype(F32)
    g = rng.standard_normal((n, oh, ow, u)).astype(F32)
    bufs = {m: [np.empty((n, oh, ow, u), F32), np.empty_like(x), np.empty_like(wt),
                np.empty_like(b)] for m in ("kernel", "numpy")}

    def run(mod, out, dx, dw, db):
        mod.lc_forward(x, wt, b, rf, stride, out)
        mod.lc_backward(x, wt, g, rf, stride, dx, dw, db)

    return {"kernel": lambda: run(kernels, *bufs["kernel"]),
            "numpy": lambda: run(reference, *bufs["numpy"]),
            "flops": 3 * 2 * n * oh * ow * k * u,
            "shapes": {"batch": n, "input": [h, w, c], "rf": rf, "stride": stride,
                       "units": u, "output": [oh, ow]},
            "compare": lambda: list(zip(bufs["kernel"], bufs["numpy"], strict=True))}


def time_round_robin(fns, repeats):
    """Median-ready timings (seconds per call, one per repeat) for each callable."""
    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up: JIT compile, first-touch pages, caches
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, math.ceil(MIN_BATCH_SECONDS / max(time.perf_counter() - t0, 1e-9)))
    timings = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            timings[name].append((time.perf_counter() - t0) / inner[name])
    return {name: np.array(t) for name, t in timings.items()}, inner


def validate(name, case):
    """Kernel and twin results must agree before anything is reported."""
    case["kernel"]()
    case["numpy"]()
    for mine, twin in case["compare"]():
        scale = max(1.0, float(np.max(np.abs(twin))))
        if not np.allclose(mine, twin, rtol=1e-3, atol=1e-4 * scale):
            err = float(np.max(np.abs(mine - twin)))
            sys.exit(f"bench/kernels.py: {name}: kernel and numpy twin disagree "
                     f"(max abs diff {err:.3g}, scale {scale:.3g})")


def run_all(cfg, repeats, rng):
    """Time every case; returns {case: result dict} and the square sgemm result."""
    m = cfg["square"]
    a, b = (rng.standard_normal((m, m)).astype(F32) for _ in range(2))
    out = np.empty((m, m), F32)
    cases = dense_cases(cfg["layers"], cfg["batch"], rng)
    cases["lc"] = lc_case(*cfg["lc"], rng)
    # The square sgemm is timed in the LC round-robin, so both see the same machine load.
    cases["lc"].update(sgemm=lambda: np.dot(a, b, out=out), sgemm_flops=2 * m ** 3)
    results = {}
    for name, case in cases.items():
        validate(name, case)
        fns = {k: case[k] for k in ("kernel", "numpy", "sgemm")}
        timings, inner = time_round_robin(fns, repeats)
        res = {"timings": timings, "inner": inner, "flops": case["flops"],
               "shapes": case["shapes"]}
        for k, t in timings.items():
            flops = case["sgemm_flops"] if k == "sgemm" else case["flops"]
            res[f"gflops_{k}"] = flops / np.median(t) / 1e9
        results[name] = res
        print(f"  timed {name}", flush=True)
    lc = results["lc"]
    sq = {"timings": lc["timings"]["sgemm"], "flops": 2 * m ** 3, "size": m,
          "gflops": lc["gflops_sgemm"]}
    layer_key = next((k for k, r in results.items()  # first square dense layer
                      if "in" in r["shapes"] and r["shapes"]["in"] == r["shapes"]["out"]), None)
    lc["gflops_sgemm_square"] = sq["gflops"]
    lc["gflops_sgemm_layer"] = results[layer_key]["gflops_sgemm"] if layer_key else 0.0
    lc["sgemm_reference"] = f"sgemm_{m}, timed in turn with the LC kernel and twin"
    for res in results.values():
        res.setdefault("sgemm_reference", "np.dot on the same products as the kernels")
        res["ratio_vs_sgemm"] = res["gflops_kernel"] / res["gflops_sgemm"]
        res["ratio_vs_numpy"] = res["gflops_kernel"] / res["gflops_numpy"]
    goals(results)
    return results, sq


def goals(results):
    """Attach the project's performance goals to the cases they concern."""
    stack, lc = results["dense_stack"], results["lc"]
    stack["goal"] = "gflops_kernel >= 0.8 * gflops_sgemm"
    stack["goal_pass"] = bool(stack["ratio_vs_sgemm"] >= 0.8)
    lc["goal"] = "gflops_kernel >= 0.25 * gflops_sgemm and >= 3 * gflops_numpy"
    lc["goal_pass"] = bool(lc["ratio_vs_sgemm"] >= 0.25 and lc["ratio_vs_numpy"] >= 3.0)


def print_table(results, sq):
    print(f"\nsgemm {sq['size']}^3: {sq['gflops']:.1f} GFLOP/s")
    head = f"{'case':<16}{'kernel':>9}{'numpy':>9}{'sgemm':>9}{'x sgemm':>9}{'x numpy':>9}  goal"
    print(head + "\n" + "-" * (len(head) + 6))
    for name, r in results.items():
        goal = ("PASS" if r["goal_pass"] else "FAIL") if "goal" in r else ""
        print(f"{name:<16}{r['gflops_kernel']:9.1f}{r['gflops_numpy']:9.1f}"
              f"{r['gflops_sgemm']:9.1f}{r['ratio_vs_sgemm']:9.2f}{r['ratio_vs_numpy']:9.2f}"
              f"  {goal}")
    print("(GFLOP/s, medians; x = ratio of kernel GFLOP/s)")
    lc = results["lc"]
    line = f"lc sgemm reference: {lc['sgemm_reference']}"
    if lc["gflops_sgemm_layer"]:
        line += (f"; for information, lc is {lc['gflops_kernel'] / lc['gflops_sgemm_layer']:.2f}"
                 f" x the square layer's sgemm (timed with that layer)")
    print(line)
    for name, r in results.items():
        if "goal" in r:
            print(f"goal {name}: {r['goal']}: {'PASS' if r['goal_pass'] else 'FAIL'}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def write_h5(path, results, sq, args):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({
            "numpy_version": np.__version__, "numba_version": numba.__version__,
            "h5py_version": h5py.__version__, "scipy_version": scipy.__version__,
            "python_version": platform.python_version(), "cpu": _cpu_model(),
            "host": socket.gethostname(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "threads": json.dumps({v: os.environ[v] for v in THREAD_VARS}),
            "argv": json.dumps(sys.argv), "quick": bool(args.quick),
            "repeats": args.repeats})
        group = f.require_group("bench/kernels")
        group.attrs["flop_model"] = "FLOP model " + __doc__.split("FLOP model ")[1].split(
            "\n\nGoals")[0]
        sq_group = group.create_group(f"sgemm_{sq['size']}")
        sq_group.create_dataset("timings", data=sq["timings"])
        sq_group.attrs.update({"gflops": sq["gflops"], "flops": sq["flops"]})
        for name, r in results.items():
            g = group.create_group(name)
            for k, t in r["timings"].items():
                g.create_dataset(f"timings_{k}", data=t)
            g.attrs.update({k: r[k] for k in ("gflops_kernel", "gflops_numpy", "gflops_sgemm",
                                              "ratio_vs_sgemm", "ratio_vs_numpy", "flops",
                                              "sgemm_reference")})
            g.attrs["shapes"] = json.dumps(r["shapes"])
            g.attrs["inner_calls"] = json.dumps(r["inner"])
            g.attrs["repeats"] = args.repeats
            for k in ("gflops_sgemm_square", "gflops_sgemm_layer"):
                if k in r:
                    g.attrs[k] = r[k]
            if "goal" in r:
                g.attrs["goal"], g.attrs["goal_pass"] = r["goal"], r["goal_pass"]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time mpibelief.kernels (single thread) against the numpy twins and "
                    "sgemm, check the performance goals, write an HDF5 file.",
        epilog="Exit status 0 whether goals pass or fail; 1 if kernel and twin disagree.")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per candidate (default 12, or 2 with --quick); "
                             "a full run takes about 4 s per repeat")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, for a smoke test (a few seconds)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_kernels.h5"),
                        help="HDF5 output file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 12
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    cfg = QUICK if args.quick else FULL
    print(f"bench/kernels.py: {'quick' if args.quick else 'full'} shapes, "
          f"{args.repeats} repeats, threads=1", flush=True)
    results, sq = run_all(cfg, args.repeats, np.random.default_rng(0))
    print_table(results, sq)
    write_h5(args.out, results, sq, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
