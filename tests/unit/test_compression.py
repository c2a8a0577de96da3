"""Strom threshold compression: every kernel against its numpy twin, then the invariants.

The numpy twins below define what each kernel in :mod:`mpibelief.compression` must
compute, written the plain numpy way.  One helper, :func:`check_pair`, runs a kernel and
its twin on copies of the same seeded inputs and requires the results *and* every
argument the kernel writes to be bitwise equal (only the float64 sum of squares, summed
in a different order, gets a tolerance).  Then the invariants: residual conservation,
the kept fraction, the warm-up schedule, the word format at its edges, refusals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpibelief import compression as tc
from mpibelief.errors import ConfigError, UserError

F32 = np.float32

# ------------------------------------------------------------------ the numpy twins


def ref_accumulate(residual, grad, hist):
    if not np.isfinite(grad).all():
        return -1
    residual += grad
    if hist.size:
        hist[:] = np.bincount((residual.view(np.uint32) & tc.INDEX_MASK) >> 16, minlength=1 << 16)
    return int(np.count_nonzero(residual))


def ref_select_magnitude(residual, hist, m):
    return np.sort(np.abs(residual))[::-1][m - 1]


def ref_encode(residual, tau, words):
    pos, neg = residual > tau, residual < -tau
    index = np.flatnonzero(pos | neg)
    k = index.size
    if k > words.size:
        raise ValueError("encode: more entries exceed tau than words can hold")
    words[:k] = [tc.pack(i, n) for i, n in zip(index, neg[index], strict=True)]
    residual[pos] -= tau
    residual[neg] += tau
    return k, float(np.sum(residual.astype(np.float64) ** 2))


def ref_decode_add(words, tau, out):
    index, negative = tc.unpack(words)
    if index.size and index.max() >= out.size:
        raise ValueError("decode: packed index beyond the end of the vector")
    np.add.at(out, index, np.where(negative, -tau, tau).astype(out.dtype))


def ref_decode_packets(buffer, counts, displs, out):
    out[:] = 0
    for count, start in zip(counts, displs, strict=True):
        if count:
            tau = buffer[start:start + 1].view(F32)[0]
            ref_decode_add(buffer[start + 1:start + count], tau, out)


TWINS = {"accumulate": ref_accumulate, "select_magnitude": ref_select_magnitude,
         "encode": ref_encode, "decode_add": ref_decode_add,
         "decode_packets": ref_decode_packets}

# ------------------------------------------------------------------ kernel vs twin


def check_pair(name, args, float_result=False):
    """Run kernel ``name`` and its twin on copies of ``args``; everything must match."""
    mine = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    theirs = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    got = getattr(tc, name)(*mine)
    want = TWINS[name](*theirs)
    if float_result:  # (k, sum of squares): the sum is float64 in another order
        assert got[0] == want[0], (name, got, want)
        assert got[1] == pytest.approx(want[1], rel=1e-9, abs=1e-12), (name, got, want)
    else:
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), (name, got, want)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if isinstance(a, np.ndarray):
            assert a.tobytes() == b.tobytes(), f"{name}: argument {i} differs from the twin"


def residual_with_zeros_and_ties(rng, n):
    r = (rng.standard_normal(n) * 3).astype(F32)
    r[rng.integers(0, n, n // 10)] = 0.0
    r[rng.integers(0, n, n // 20)] = -1.5  # ties, both signs
    r[rng.integers(0, n, n // 20)] = 1.5
    return r


@pytest.mark.parametrize("n", [1, 7, 1000, 65_537])
@pytest.mark.parametrize("with_hist", [True, False])
def test_accumulate(n, with_hist):
    rng = np.random.default_rng(n)
    hist = np.zeros((1 << 16) if with_hist else 0, np.int64)
    check_pair("accumulate", [residual_with_zeros_and_ties(rng, n),
                              rng.standard_normal(n).astype(F32), hist])


@pytest.mark.parametrize("n", [1, 2, 1000, 100_003])
def test_select_magnitude(n):
    rng = np.random.default_rng(n)
    r = residual_with_zeros_and_ties(rng, n)
    for m in sorted({1, 2, n // 3 + 1, n // 2 + 1, n}):
        if m > n:
            continue
        hist = np.zeros(1 << 16, np.int64)
        hist[:] = np.bincount((r.view(np.uint32) & tc.INDEX_MASK) >> 16, minlength=1 << 16)
        got = tc.select_magnitude(r, hist.copy(), m)
        assert got == ref_select_magnitude(r, hist, m), (n, m)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.5, 100.0])
def test_encode(tau):
    rng = np.random.default_rng(3)
    r = residual_with_zeros_and_ties(rng, 10_000)  # +-1.5 exactly: equal to tau stays
    check_pair("encode", [r, F32(tau), np.zeros(10_001, np.uint32)], float_result=True)


def test_encode_refuses_overflowing_words():
    r = np.ones(10, F32)
    for kernel in (tc.encode, ref_encode):
        with pytest.raises(ValueError, match="more entries exceed tau"):
            kernel(r.copy(), F32(0.5), np.zeros(9, np.uint32))


def test_decode_add_and_packets():
    rng = np.random.default_rng(4)
    n = 5_000
    packets = []
    for tau in (0.25, 0.1, 3.0):  # overlapping indices, different taus per sender
        index = np.sort(rng.choice(n, 700, replace=False))
        words = [tc.pack(i, s) for i, s in zip(index, rng.random(700) < 0.5, strict=True)]
        packets.append(np.array([F32(tau).view(np.uint32), *words], np.uint32))
    packets.insert(1, np.array([F32(9.0).view(np.uint32)], np.uint32))  # a sender with k=0
    check_pair("decode_add", [packets[0][1:], F32(0.25), rng.standard_normal(n).astype(F32)])
    counts = np.array([p.size for p in packets], np.int32)
    displs = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int32)
    check_pair("decode_packets", [np.concatenate(packets), counts, displs,
                                  np.full(n, np.nan, F32)])


def test_decode_refuses_index_beyond_vector():
    for kernel in (tc.decode_add, ref_decode_add):
        with pytest.raises(ValueError, match="beyond the end"):
            kernel(np.array([tc.pack(10, False)], np.uint32), F32(1.0), np.zeros(10, F32))

# ----------------------------------------------------------------- the word format


def test_pack_edges():
    top = tc.MAX_ENTRIES - 1
    assert tc.pack(0, False) == 0 and tc.pack(0, True) == 0x8000_0000
    assert tc.pack(top, False) == 0x7FFF_FFFF and tc.pack(top, True) == 0xFFFF_FFFF
    index, negative = tc.unpack(np.array([0, 0x8000_0000, 0x7FFF_FFFF, 0xFFFF_FFFF], np.uint32))
    assert index.tolist() == [0, 0, top, top]
    assert negative.tolist() == [False, True, False, True]
    for bad in (-1, tc.MAX_ENTRIES):
        with pytest.raises(ValueError, match="31 bits"):
            tc.pack(bad, False)


def test_encoded_words_at_the_vector_edges():
    n = 1 << 20
    r = np.zeros(n, F32)
    r[0], r[1], r[n - 2], r[n - 1] = 2.0, -2.0, 2.0, -2.0
    words = np.zeros(8, np.uint32)
    k, _ = tc.encode(r, F32(1.0), words)
    assert words[:k].tolist() == [tc.pack(0, False), tc.pack(1, True),
                                  tc.pack(n - 2, False), tc.pack(n - 1, True)]
    out = np.zeros(n, F32)
    tc.decode_add(words[:k], F32(1.0), out)
    assert out[[0, 1, n - 2, n - 1]].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert np.count_nonzero(out) == 4 and np.count_nonzero(r) == 4


def test_too_long_vector_is_refused():
    for n in (tc.MAX_ENTRIES + 1, 0):
        with pytest.raises(UserError, match="31 bits"):
            tc.ThresholdCompressor(n, tc.FixedTau(1.0))

# ------------------------------------------------------------------ the compressor


def compress_twin(residual, grad, tau):
    """The whole step in numpy, with a given tau: new residual, dense update sent."""
    residual = residual + grad
    sent = np.where(residual > tau, tau, np.where(residual < -tau, -tau, 0)).astype(F32)
    return residual - sent, sent


@pytest.mark.parametrize("policy", [tc.FixedTau(0.75),
                                    tc.AdaptiveTau(tc.FractionSchedule(0.01))],
                         ids=["fixed", "adaptive"])
def test_round_trip_against_twin(policy):
    rng = np.random.default_rng(5)
    n = 20_000
    comp = tc.ThresholdCompressor(n, policy)
    residual = np.zeros(n, F32)
    for _ in range(10):
        grad = (rng.standard_normal(n) * 0.5).astype(F32)
        packet, stats = comp.compress(grad)
        tau = packet[:1].view(F32)[0]
        assert tau == F32(stats.tau)
        residual, sent = compress_twin(residual, grad, tau)
        got = comp.decompress(packet, np.zeros(n, F32))
        assert got.tobytes() == sent.tobytes()
        assert comp.residual.tobytes() == residual.tobytes()
        assert stats.residual_norm == pytest.approx(np.linalg.norm(residual), rel=1e-6)


@pytest.mark.parametrize("policy", [tc.FixedTau(0.5), tc.AdaptiveTau(tc.FractionSchedule(0.05))],
                         ids=["fixed", "adaptive"])
def test_residual_conservation_is_exact(policy):
    """sent + residual == sum of gradients, exactly: multiples of 1/64, small sums."""
    rng = np.random.default_rng(6)
    n = 50_000
    comp = tc.ThresholdCompressor(n, policy)
    total, sent = np.zeros(n, np.float64), np.zeros(n, F32)
    for _ in range(40):
        grad = (rng.integers(-256, 257, n) / 64).astype(F32)
        total += grad
        packet, stats = comp.compress(grad)
        assert stats.sent > 0
        comp.decompress(packet, sent)
    assert np.array_equal(sent.astype(np.float64) + comp.residual, total)


@pytest.mark.parametrize("n", [100_000, 1_000_003])
@pytest.mark.parametrize("target", [0.01, 0.001])
def test_adaptive_tau_keeps_the_target_fraction(n, target):
    rng = np.random.default_rng(7)
    comp = tc.ThresholdCompressor(n, tc.AdaptiveTau(tc.FractionSchedule(target)))
    want = tc.budget(target, n)
    for _ in range(5):
        _, stats = comp.compress(rng.standard_normal(n).astype(F32))
        assert want - 2 <= stats.sent <= want  # fewer only on ties at tau
        assert target - 4 / n <= stats.fraction <= target  # the header's 2 words, ties
        assert stats.ratio >= 1 / target  # the header is inside the budget
        assert stats.bytes_dense == 4 * n and stats.bytes_compressed == 4 * stats.sent + 8


def test_adaptive_tau_sends_every_entry_of_a_sparse_residual():
    n = 100_000
    comp = tc.ThresholdCompressor(n, tc.AdaptiveTau(tc.FractionSchedule(0.01)))
    grad = np.zeros(n, F32)
    grad[[3, 500, 99_999]] = [0.5, -0.25, 0.125]
    packet, stats = comp.compress(grad)
    assert stats.sent == 3 and tc.unpack(packet[1:])[0].tolist() == [3, 500, 99_999]
    _, stats = comp.compress(np.zeros(n, F32))
    assert stats.sent == 3  # what stayed behind (value - tau) goes next
    comp.residual[:] = 0
    _, stats = comp.compress(np.zeros(n, F32))
    assert stats.sent == 0 and stats.tau == 0.0


def test_non_finite_gradient_is_refused_and_residual_untouched():
    comp = tc.ThresholdCompressor(1000, tc.FixedTau(1.0))
    comp.compress(np.full(1000, 0.5, F32))
    before = comp.residual.copy()
    for bad in (np.nan, np.inf):
        grad = np.ones(1000, F32)
        grad[777] = bad
        with pytest.raises(ValueError, match="non-finite"):
            comp.compress(grad)
        assert comp.residual.tobytes() == before.tobytes()

# --------------------------------------------------------------------- the schedule


def test_warmup_schedule():
    sched = tc.FractionSchedule(0.001, tc.DGC_WARMUP)
    got = [sched(e) for e in (0, 0.99, 1, 2.5, 3, 4, 100)]
    assert got == [0.25, 0.25, 0.0625, 0.015625, 0.004, 0.001, 0.001]
    slow = tc.FractionSchedule(0.01, (0.5, 0.1), epochs_per_stage=2)
    assert [slow(e) for e in (0, 1.9, 2, 3.9, 4)] == [0.5, 0.5, 0.1, 0.1, 0.01]
    geo = tc.FractionSchedule.geometric(0.001)
    assert np.allclose(geo.warmup, tc.DGC_WARMUP, rtol=0.02)  # DGC's values, rounded
    for bad in [dict(target=0.0), dict(target=1.5), dict(target=0.01, warmup=(0.0,)),
                dict(target=0.01, epochs_per_stage=0)]:
        with pytest.raises(ConfigError):
            tc.FractionSchedule(**bad)
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError):
            tc.FixedTau(tau)


def test_compressor_follows_the_warmup():
    n = 200_000
    rng = np.random.default_rng(8)
    sched = tc.FractionSchedule(0.001, tc.DGC_WARMUP)
    comp = tc.ThresholdCompressor(n, tc.AdaptiveTau(sched))
    assert comp.packet.size == tc.budget(0.25, n) + 1  # room for the largest stage
    for epoch in (0, 1, 2, 3, 4, 7):
        _, stats = comp.compress(rng.standard_normal(n).astype(F32), epoch=epoch)
        assert stats.sent == pytest.approx(tc.budget(sched(epoch), n), abs=2), epoch
