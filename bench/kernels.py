"""Single-thread speed of the numba kernels against their numpy twins and sgemm.

Cases (``--quick`` shrinks every shape, for smoke tests):

* ``dense<k>_<i>x<o>``: layer ``k`` of the paper's speech model
  (440-2560-2560-2560-2560-8192, batch 128), ``dense_forward`` + ``dense_backward``;
* ``dense_stack``: the whole model, forward through all layers, then backward, with
  ``dense_backward_params`` for the first layer (no gradient w.r.t. the data);
* ``lc``: a locally connected layer (32x32x3 input, 10x10 windows, stride 2, 8 units
  per location, batch 32), ``lc_forward`` + ``lc_backward``;
* ``img<s>_u<U>``: stage ``s`` of the paper's image models: 10x10 windows at stride 1
  on a 100x100x3 input, each stage followed by 2x2 pooling, so the stages see
  100x100x3, 45x45xU and 18x18xU (``--lc-units``, default 8 and 36, the paper's range).

FLOP model (multiply and add count 2; bias, activation and copies are not counted):
dense forward ``2*n*i*o``, backward ``2*n*i*o`` for ``dx`` plus ``2*n*i*o`` for ``dw``;
LC with ``K = rf*rf*C`` forward ``2*n*OH*OW*K*U``, backward the same again for ``dx`` and
for ``dw``.

The sgemm reference goes through the BLAS the kernels can call: numba's ``np.dot``
(``numba_xxgemm``, scipy's OpenBLAS), from an ``@njit`` loop, on operands already laid
out for it.  Each product is timed in both orientations (``C = A @ B`` and
``C.T = B.T @ A.T``, one sgemm each with different transpose flags) and the faster
median counts, so the reference is the fastest call a kernel could make.  Two rates:
*shaped*, exactly the kernel's products (dense: ``x @ w``, ``dy @ w.T``, ``x.T @ dy``
per layer, no ``dx`` for the first layer of the stack; LC: the three products of every
location, ``OH*OW`` GEMMs of ``n x K x U`` each, without the im2col), and *square*, a
``--square``-sized square product (peak-shaped), timed in every LC case's turn.
``np.dot`` of numpy's own OpenBLAS on the square (the old reference) is printed for
information.

Goals (reported, not asserted): dense_stack >= 0.8 x its shaped sgemm rate; every LC
case >= 0.5 x the square sgemm rate and >= 3 x its numpy twin.

Method (OSU style): every candidate is called once untimed (JIT, caches), kernel and twin
results and every reference product are checked (exit 1 on mismatch), then each repeat
times every candidate of a case in turn (so load from other processes hits all of them
alike); a repeat runs a short call several times and records the mean.  Reported times
are medians over repeats.
"""

import os

THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS")
for _var in THREAD_VARS:  # before numpy / numba are imported anywhere
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402  (numba's BLAS is scipy's)

from mpibelief import kernels, reference  # noqa: E402
from mpibelief.results import stamp  # noqa: E402

SPEECH = (440, 2560, 2560, 2560, 2560, 8192)
FULL = {"layers": SPEECH, "batch": 128, "lc": {"lc": (32, 32, 32, 3, 10, 2, 8)},
        "image": True}
QUICK = {"layers": (40, 96, 64, 80), "batch": 16, "lc": {"lc": (4, 12, 12, 3, 4, 2, 4)},
         "image": False}
MIN_BATCH_SECONDS = 0.02  # short calls are repeated to fill at least this much time
F32 = np.float32


def image_stages(n, units):
    """The paper's image-model stages as LC specs ``(n, h, w, c, rf, stride, u)``."""
    specs = {}
    for u in units:
        for s, (h, c) in enumerate(((100, 3), (45, u), (18, u)), start=1):
            specs[f"img{s}_u{u}"] = (n, h, h, c, 10, 1, u)
    return specs


@numba.njit(cache=True)
def _batched_dot(a, b, c, ta, tb):
    """``c[l] = op(a[l]) @ op(b[l])`` through numba's ``np.dot`` (the kernels' BLAS)."""
    for layer in range(a.shape[0]):
        if ta and tb:
            np.dot(a[layer].T, b[layer].T, c[layer])
        elif ta:
            np.dot(a[layer].T, b[layer], c[layer])
        elif tb:
            np.dot(a[layer], b[layer].T, c[layer])
        else:
            np.dot(a[layer], b[layer], c[layer])


def product(a, b, c, ta=False, tb=False):
    """One batched product in both orientations: ``{"n": C = A @ B, "t": C.T = B.T @ A.T}``.

    ``a``, ``b``, ``c`` are 3-D (a batch of matrices); the transposed orientation writes
    ``C.T`` into ``c``'s memory.  ``check()`` compares both with numpy.
    """
    ct = c.reshape(c.shape[0], c.shape[2], c.shape[1])
    fns = {"n": lambda: _batched_dot(a, b, c, ta, tb),
           "t": lambda: _batched_dot(b, a, ct, not tb, not ta)}

    def check():
        want = np.matmul(a.transpose(0, 2, 1) if ta else a, b.transpose(0, 2, 1) if tb else b)
        fns["n"]()
        yield c, want
        fns["t"]()
        yield ct.transpose(0, 2, 1), want

    return fns | {"check": check}


def _seq(products):
    """Several products of one kind (the layers of a stack) as one pair of candidates."""
    return {o: (lambda o=o: [p[o]() for p in products]) for o in ("n", "t")} | {
        "check": lambda: (pair for p in products for pair in p["check"]())}


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
    fwd = [2 * n * w.shape[0] * w.shape[1] for w in ws]
    prods = []  # per layer: the kernels' three products on their own operands, as 3-D
    for k, w in enumerate(ws):
        a, g = mine[0][k][None], mine[1][k + 1][None]
        prods.append({"fwd": product(a, w[None], np.empty((1, n, w.shape[1]), F32)),
                      "dx": product(g, w[None], np.empty((1, n, w.shape[0]), F32), tb=True),
                      "dw": product(a, g, np.empty((1,) + w.shape, F32), ta=True)})
    cases = {"dense_stack": {
        "kernel": lambda: _dense_pass(kernels, mine[0], ws, bs, *mine[1:]),
        "numpy": lambda: _dense_pass(reference, twin[0], ws, bs, *twin[1:]),
        "products": {kind: _seq([p[kind] for k, p in enumerate(prods) if kind != "dx" or k])
                     for kind in ("fwd", "dx", "dw")},
        "flops": 3 * sum(fwd) - fwd[0],
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
            "products": prods[k], "flops": 3 * fwd[k],
            "shapes": {"batch": n, "in": w.shape[0], "out": w.shape[1]},
            "compare": lambda: [],  # same kernels as the stack, checked there
        }
    return cases


def lc_case(n, h, w, c, rf, stride, u, rng):
    """A locally connected layer, forward + backward: kernel, twin and its products."""
    oh, ow = kernels.lc_output_shape(h, w, rf, stride)
    k, locs = rf * rf * c, oh * ow
    x = rng.standard_normal((n, h, w, c)).astype(F32)
    wt = (rng.standard_normal((oh, ow, u, k)) / math.sqrt(k)).astype(F32)
    b = rng.standard_normal((oh, ow, u)).astype(F32)
    g = rng.standard_normal((n, oh, ow, u)).astype(F32)
    bufs = {m: [np.empty((n, oh, ow, u), F32), np.empty_like(x), np.empty_like(wt),
                np.empty_like(b)] for m in ("kernel", "numpy")}

    def run(mod, out, dx, dw, db):
        mod.lc_forward(x, wt, b, rf, stride, out)
        mod.lc_backward(x, wt, g, rf, stride, dx, dw, db)

    # The kernel's products per location, operands laid out in advance (no im2col):
    # patches P (n, K), weights W (U, K), output gradient G (n, U).
    p = np.ascontiguousarray(reference._patches(x, rf, stride)).reshape(locs, n, k)
    wl, gl = wt.reshape(locs, u, k), np.ascontiguousarray(g.transpose(1, 2, 0, 3))
    gl = gl.reshape(locs, n, u)
    prods = {"fwd": product(p, wl, np.empty((locs, n, u), F32), tb=True),
             "dx": product(gl, wl, np.empty((locs, n, k), F32)),
             "dw": product(gl, p, bufs["numpy"][2].reshape(locs, u, k), ta=True)}
    return {"kernel": lambda: run(kernels, *bufs["kernel"]),
            "numpy": lambda: run(reference, *bufs["numpy"]),
            "products": prods, "flops": 3 * 2 * n * locs * k * u,
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


def _agree(name, pairs):
    for mine, want in pairs:
        scale = max(1.0, float(np.max(np.abs(want))))
        if not np.allclose(mine, want, rtol=1e-3, atol=1e-4 * scale):
            err = float(np.max(np.abs(mine - want)))
            sys.exit(f"bench/kernels.py: {name}: results disagree "
                     f"(max abs diff {err:.3g}, scale {scale:.3g})")


def validate(name, case):
    """Kernel and twin, and each reference product and numpy, agree before any timing."""
    case["kernel"]()
    case["numpy"]()
    _agree(f"{name}: kernel vs numpy twin", case["compare"]())
    for kind, prod in case["products"].items():
        _agree(f"{name}: sgemm {kind} vs numpy", prod["check"]())


def measure(name, case, repeats):
    """Time one case's candidates in turn; rates in GFLOP/s from the medians."""
    validate(name, case)
    fns = {"kernel": case["kernel"], "numpy": case["numpy"]}
    for kind, prod in case["products"].items():
        fns |= {f"sgemm_{kind}_{o}": prod[o] for o in ("n", "t")}
    fns |= case.get("extra", {})
    timings, inner = time_round_robin(fns, repeats)
    med = {k: float(np.median(t)) for k, t in timings.items()}
    best = {kind: min("nt", key=lambda o, kind=kind: med[f"sgemm_{kind}_{o}"])
            for kind in case["products"]}
    shaped = sum(med[f"sgemm_{kind}_{o}"] for kind, o in best.items())
    res = {"timings": timings, "inner": inner, "flops": case["flops"],
           "shapes": case["shapes"], "orientation": best,
           "gflops_kernel": case["flops"] / med["kernel"] / 1e9,
           "gflops_numpy": case["flops"] / med["numpy"] / 1e9,
           "gflops_sgemm": case["flops"] / shaped / 1e9}
    if "extra" in case:  # the square products
        sq = case["square_flops"]
        res["gflops_sgemm_square"] = sq / min(med["square_n"], med["square_t"]) / 1e9
        res["gflops_numpy_dot_square"] = sq / med["numpy_dot_square"] / 1e9
        res["ratio_vs_square"] = res["gflops_kernel"] / res["gflops_sgemm_square"]
    res["ratio_vs_sgemm"] = res["gflops_kernel"] / res["gflops_sgemm"]
    res["ratio_vs_numpy"] = res["gflops_kernel"] / res["gflops_numpy"]
    return res


def run_all(cfg, args, rng):
    """Time every case; returns {case: result dict}."""
    m = args.square
    a, b = (rng.standard_normal((1, m, m)).astype(F32) for _ in range(2))
    out = np.empty((1, m, m), F32)
    square = product(a, b, out)
    _agree("square sgemm vs numpy", square["check"]())
    extra = {"square_n": square["n"], "square_t": square["t"],
             "numpy_dot_square": lambda: np.dot(a[0], b[0], out=out[0])}
    cases = dense_cases(cfg["layers"], cfg["batch"], rng)
    specs = dict(cfg["lc"])
    if cfg["image"]:
        specs |= image_stages(args.lc_batch, args.lc_units)
    specs |= {f"lc_{'x'.join(map(str, s))}": s for s in args.lc}
    cases |= specs  # LC cases as specs: each is built when its turn comes
    results = {}
    for name, case in cases.items():
        if args.only and name not in args.only:
            continue
        if isinstance(case, tuple):  # one at a time: the big ones need gigabytes
            case = lc_case(*case, rng) | {"extra": extra, "square_flops": 2 * m ** 3}
        results[name] = measure(name, case, args.repeats)
        del case
        print(f"  timed {name}", flush=True)
    goals(results)
    return results


def goals(results):
    """Attach the project's performance goals to the cases they concern."""
    if "dense_stack" in results:
        stack = results["dense_stack"]
        stack["goal"] = "gflops_kernel >= 0.8 * gflops_sgemm (shaped)"
        stack["goal_pass"] = bool(stack["ratio_vs_sgemm"] >= 0.8)
    for r in results.values():
        if "ratio_vs_square" in r:
            r["goal"] = "gflops_kernel >= 0.5 * gflops_sgemm_square and >= 3 * gflops_numpy"
            r["goal_pass"] = bool(r["ratio_vs_square"] >= 0.5 and r["ratio_vs_numpy"] >= 3.0)


def print_table(results, square):
    head = (f"{'case':<18}{'kernel':>8}{'numpy':>8}{'shaped':>8}{'square':>8}"
            f"{'x shaped':>9}{'x square':>9}{'x numpy':>8}  goal")
    print("\n" + head + "\n" + "-" * (len(head) + 4))
    for name, r in results.items():
        goal = ("PASS" if r["goal_pass"] else "FAIL") if "goal" in r else ""
        sq = r.get("gflops_sgemm_square")
        print(f"{name:<18}{r['gflops_kernel']:8.1f}{r['gflops_numpy']:8.1f}"
              f"{r['gflops_sgemm']:8.1f}" + (f"{sq:8.1f}" if sq else " " * 8) +
              f"{r['ratio_vs_sgemm']:9.2f}" +
              (f"{r['ratio_vs_square']:9.2f}" if sq else " " * 9) +
              f"{r['ratio_vs_numpy']:8.2f}  {goal}")
    print(f"(GFLOP/s, medians; shaped/square: sgemm through numba's np.dot (scipy's "
          f"OpenBLAS), square {square}^3; x = kernel rate over that rate)")
    sqs = [r for r in results.values() if "gflops_numpy_dot_square" in r]
    if sqs:
        ratio = np.median([r["gflops_numpy_dot_square"] / r["gflops_sgemm_square"] for r in sqs])
        print(f"for information: numpy's own np.dot on the square runs at {ratio:.2f} x "
              f"the square reference (median over the LC cases)")
    for goal in dict.fromkeys(r["goal"] for r in results.values() if "goal" in r):
        print(f"goal: {goal}: " + ", ".join(f"{k} {'PASS' if r['goal_pass'] else 'FAIL'}"
                                            for k, r in results.items() if r.get("goal") == goal))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


RESULT_ATTRS = ("gflops_kernel", "gflops_numpy", "gflops_sgemm", "gflops_sgemm_square",
                "gflops_numpy_dot_square", "ratio_vs_sgemm", "ratio_vs_square",
                "ratio_vs_numpy", "flops", "goal", "goal_pass")


def write_h5(path, results, args):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        stamp(f, {  # the run files' provenance, plus what shapes kernel speed
            "version_scipy": scipy.__version__, "python_version": platform.python_version(),
            "cpu": _cpu_model(), "platform": platform.platform(),
            "threads": json.dumps({v: os.environ[v] for v in THREAD_VARS}),
            "command": " ".join(sys.argv), "quick": bool(args.quick),
            "repeats": args.repeats, "square": args.square})
        group = f.require_group("bench/kernels")
        group.attrs["flop_model"] = "FLOP model " + __doc__.split("FLOP model ")[1].split(
            "\n\nThe sgemm")[0]
        group.attrs["sgemm_reference"] = "The sgemm " + __doc__.split("The sgemm ")[1].split(
            "\n\nGoals")[0]
        for name, r in results.items():
            g = group.create_group(name)
            for k, t in r["timings"].items():
                g.create_dataset(f"timings_{k}", data=t)
            g.attrs.update({k: r[k] for k in RESULT_ATTRS if k in r})
            g.attrs["shapes"] = json.dumps(r["shapes"])
            g.attrs["sgemm_orientation"] = json.dumps(r["orientation"])
            g.attrs["inner_calls"] = json.dumps(r["inner"])
            g.attrs["repeats"] = args.repeats


def _lc_spec(text):
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 7 or min(parts) < 1:
        raise argparse.ArgumentTypeError("want seven positive integers n,h,w,c,rf,stride,u")
    return tuple(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time mpibelief.kernels (single thread) against the numpy twins and "
                    "sgemm, check the performance goals, write an HDF5 file.",
        epilog="Exit status 0 whether goals pass or fail; 1 if results disagree.")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per candidate (default 12, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, no image stages, for a smoke test (a few seconds)")
    parser.add_argument("--square", type=int, default=None,
                        help="size of the square sgemm reference (default 1024; 128 quick)")
    parser.add_argument("--lc-units", type=lambda s: [int(v) for v in s.split(",") if v],
                        default=[8, 36], help="units per location of the image stages, "
                        "comma-separated (default 8,36; empty: no image stages)")
    parser.add_argument("--lc-batch", type=int, default=32,
                        help="batch of the image stages (default %(default)s)")
    parser.add_argument("--lc", type=_lc_spec, action="append", default=[],
                        metavar="N,H,W,C,RF,STRIDE,U", help="an extra LC case (repeatable)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=[],
                        metavar="CASE,...", help="time only these cases (names as printed)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_kernels.h5"),
                        help="HDF5 output file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 12
    if args.square is None:
        args.square = 128 if args.quick else 1024
    if min(args.repeats, args.square, args.lc_batch, *args.lc_units) < 1:
        parser.error("--repeats, --square, --lc-batch and --lc-units must be >= 1")
    cfg = QUICK if args.quick else FULL
    print(f"bench/kernels.py: {'quick' if args.quick else 'full'} shapes, "
          f"{args.repeats} repeats, threads=1", flush=True)
    results = run_all(cfg, args, np.random.default_rng(0))
    print_table(results, args.square)
    write_h5(args.out, results, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
