"""The exactly-once oracle, shared by the MPI parameter-server test and the in-memory one.

Every client pushes ``alpha(client, round) * w`` for one fixed vector ``w`` (SGD at
lr = 1 on integer-valued float32, so every sum is exact); some rounds carry a NaN or an
inf and must be refused whole.  The final state must be ``(BETA - expected_alpha_sum) *
w`` exactly: nothing lost, nothing applied twice.  And every consistent snapshot of a
shard is an integer multiple of ``w`` there, so a pull that mixed two versions (a torn
read) fails :func:`check_snapshot`.
"""

from __future__ import annotations

import numpy as np

N = 100_003  # odd: uneven shard slices
ROUNDS = 300
NAN_ROUND = 123  # each client's push this round holds a NaN in shard 1's slice only
FORCED_ROUND = 211  # client 0 skips its own check, NaN/inf in both slices: shards refuse
BETA = 3  # initial state BETA * w


def alpha(client: int, step: int) -> int:
    """The known integer multiplier of ``w`` for one push (always >= 1: loss shows)."""
    return 1 + (7 * step + 3 * client) % 4


def weights(n: int) -> np.ndarray:
    return (1 + np.arange(n, dtype=np.int64) * 7919 % 5).astype(np.float32)


def check_snapshot(buf, w, slices, where: str) -> None:
    """Each shard's slice is one version: ``k * w`` for one integer k (no torn read)."""
    for part in slices:
        ratio = buf[part] / w[part]
        assert np.all(ratio == ratio[0]), f"{where}: torn pull, ratios {np.unique(ratio)[:5]}"
        assert ratio[0] == np.round(ratio[0]), f"{where}: non-integer state {ratio[0]}"


def expected_alpha_sum(n_clients: int) -> int:
    total = 0
    for c in range(n_clients):
        total += sum(alpha(c, r) for r in range(ROUNDS) if r not in (NAN_ROUND, FORCED_ROUND))
        if c != 0:
            total += alpha(c, FORCED_ROUND)  # only client 0 forces a NaN that round
    return total + 3 * 2  # the staleness phase: three pushes of 2 * w by client 0
