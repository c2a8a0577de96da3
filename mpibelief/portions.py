"""Sandblaster's bookkeeping of one gradient evaluation: portions, copies, exactly once.

A batch is cut into portions much smaller than ``1/R`` of it.  The coordinator hands a
portion to whichever replica asks (dynamic load balancing: a fast replica asks more
often, so it does more); once no fresh portion is left, replicas that ask get a copy
of a portion still outstanding (a *backup*, as in MapReduce), and the first copy to
be committed counts.  This class is the decision logic alone, plain Python, so that
it can be tested on every interleaving; :mod:`mpibelief.algorithms.sandblaster_dispatch`
carries its decisions over MPI.

Exactly once, and how a replica learns its copy lost.  A replica sums the gradients
of the portions it finished in one accumulator (its *pending* portions) and pushes
that sum every ``push_every`` portions.  A sum cannot be taken apart, so the claim is
made for the whole sum, *before* it is pushed::

    replica                      coordinator (this book)
    DONE p (loss) ------------>  finished(r, p):
                                   p, or any pending portion of r, already
                                   committed?  -> DROP: r zeroes its sum; its
                                                  uncommitted portions stay open
                                   enough pending, or the batch's tail?
                                               -> PUSH: every pending portion of r
                                                  is committed to r, now
                                   else        -> the next portion (CONTINUE)
    PUSH -> push the sum, wait until the shards summed it, PUSHED ---> pushed(r)

A portion is committed once, by the one replica that will push it (a committed
portion is never handed out again, and a later copy of it is dropped); the shards
sum only pushes that were committed; so every portion is summed exactly once, and
the evaluation is complete when every portion is committed and every PUSH has been
answered by PUSHED.  The sizes applied add up to the batch size, which the shards'
own sample counts confirm independently.

Why commit at push time rather than at finish time: a straggler holding finished but
unpushed portions would otherwise hold the whole batch hostage while it computes its
next portion; here its unpushed portions stay *open*, so backups can take them over.
And in the tail every replica pushes after each portion, so little is ever held back
when the batch ends.  A replica is in the tail when the fresh portions left would be
gone before it could finish another one: fewer than ``1 + sum(pace[r] / pace[o])``
over the other live replicas ``o``, ``pace`` being the seconds per portion the
dispatcher measured for each (with equal paces: fewer fresh portions than replicas).
Why pace matters, by an event-level model of 2 replicas, one 4x slower, 16 portions,
``push_every`` 4 (``bench/sandblaster_model.py``): with the count rule alone the
straggler goes on summing portions unpushed while the fast one runs out of fresh
work, so every portion it finished is copied and done again by the fast one, and
backups made the batch 1% *slower* than no backups; pushing by pace, the straggler
commits what it has and the copies cover only its portion in progress: 7% faster.
Measured (FSDD, 2 replicas, 5 interleaved runs each, load 3-7): the straggler's
portions that counted went from 11-15 to 24-30 of 192 per run and the copies wasted
from 23-30 to 10-12; seconds per batch stayed within the noise of this shared 2-core
machine (medians 0.738 and 0.716 s).

A failed replica (:meth:`PortionBook.fail`: silent too long while holding work) is
treated as one whose sum was dropped: its copies and its pending portions are open
again, for the others to take as fresh work.  If it failed between PUSH and PUSHED,
its committed portions count only if its push reached the shards (the caller has the
shards refuse its pushes first, then asks what they summed); otherwise they are
uncommitted and open again.  A failed replica is never given work again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

CONTINUE, PUSH, DROP = "continue", "push", "drop"


@dataclass
class BookStats:
    """Counts of one evaluation: portions issued (fresh and backup), copies wasted."""

    issued: int = 0
    backups: int = 0
    wasted: int = 0
    done_by: list[int] = field(default_factory=list)  # portions committed per replica


class PortionBook:
    """Who computes which portion of one evaluation, and whose result counts.

    Args:
        sizes: samples in each portion (they add up to the batch).
        replicas: how many replicas ask for work.
        push_every: portions a replica sums before it pushes (outside the tail).
        backups: hand out copies of outstanding portions once none is fresh.
        max_copies: most replicas holding one portion at a time (with the original).
        failed: replicas given up on before this evaluation (never given work).
        pace: seconds per portion of each replica as last measured, None where not
            yet known (then the tail counts replicas, as if all were equally fast);
            read when a replica finishes, so the caller may update it in place.
    """

    def __init__(self, sizes: list[int], replicas: int, push_every: int = 1,
                 backups: bool = True, max_copies: int = 2, failed: set[int] | None = None,
                 pace: list[float | None] | None = None):
        self.sizes, self.replicas = list(sizes), replicas
        self.push_every, self.backups, self.max_copies = push_every, backups, max_copies
        self.fresh = deque(range(len(sizes)))
        self.holders: dict[int, set[int]] = {p: set() for p in range(len(sizes))}
        self.committed: dict[int, int] = {}  # portion -> replica that pushes it
        self.pending: list[list[int]] = [[] for _ in range(replicas)]
        self.losses: list[float] = [0.0] * replicas  # loss sums of pending portions
        self.pushing: set[int] = set()
        self.inflight: dict[int, tuple[list[int], float]] = {}  # commanded, not yet PUSHED
        self.confirmed = [0] * replicas  # samples each replica's PUSHED sums cover
        self.failed = set(failed or ())
        self.pace = pace
        self.loss_sum = 0.0  # over committed portions
        self.stats = BookStats(done_by=[0] * replicas)

    @property
    def complete(self) -> bool:
        """Every portion committed and every commanded push done."""
        return len(self.committed) == len(self.sizes) and not self.pushing

    @property
    def samples(self) -> int:
        """Samples in the committed portions."""
        return sum(self.sizes[p] for p in self.committed)

    def next_task(self, r: int) -> int | None:
        """A portion for idle replica ``r``: fresh, else a copy of an open one, else None.

        An open portion nobody holds (its holder's sum was dropped) is always
        reissued; a portion somebody holds is copied only with ``backups``.
        """
        if self.fresh:
            p = self.fresh.popleft()
            self.stats.issued += 1
        else:
            p = self._copy_for(r)
            if p is None:
                return None
            if self.holders[p]:
                self.stats.backups += 1
            else:
                self.stats.issued += 1
        self.holders[p].add(r)
        return p

    def _copy_for(self, r: int) -> int | None:
        candidates = [p for p, who in self.holders.items()
                      if p not in self.committed and r not in who
                      and (not who or (self.backups and len(who) < self.max_copies))]
        return min(candidates, key=lambda p: (len(self.holders[p]), p), default=None)

    def finished(self, r: int, p: int, loss_sum: float) -> str:
        """Replica ``r`` finished portion ``p``: ``PUSH``, ``DROP`` or ``CONTINUE``."""
        mine = [*self.pending[r], p]
        if any(q in self.committed for q in mine):
            self.stats.wasted += len(mine)
            for q in mine:
                self.holders[q].discard(r)
            self.pending[r], self.losses[r] = [], 0.0
            return DROP
        self.pending[r].append(p)
        self.losses[r] += loss_sum
        if len(self.pending[r]) < self.push_every and not self.tail(r):
            return CONTINUE
        for q in self.pending[r]:
            self.committed[q] = r
        self.stats.done_by[r] += len(self.pending[r])
        self.loss_sum += self.losses[r]
        self.inflight[r] = (self.pending[r], self.losses[r])
        self.pending[r], self.losses[r] = [], 0.0
        self.pushing.add(r)
        return PUSH

    def tail(self, r: int) -> bool:
        """Whether the fresh portions would run out before replica ``r`` finishes
        another: then it pushes what it has, rather than risk it being done again."""
        live = [o for o in range(self.replicas) if o not in self.failed]
        pace = self.pace
        if pace is None or any(pace[o] is None or pace[o] <= 0 for o in live):
            return len(self.fresh) < len(live)
        return len(self.fresh) < 1 + sum(pace[r] / pace[o] for o in live if o != r)

    def pushed(self, r: int) -> None:
        """Replica ``r`` pushed its committed sum, and the shards have summed it."""
        self.pushing.discard(r)
        portions, _ = self.inflight.pop(r, ([], 0.0))
        self.confirmed[r] += sum(self.sizes[q] for q in portions)

    def inflight_samples(self, r: int) -> int:
        """Samples in the push replica ``r`` was told to make and has not confirmed."""
        return sum(self.sizes[q] for q in self.inflight.get(r, ([], 0.0))[0])

    def fail(self, r: int, landed: bool = False) -> None:
        """Give up on replica ``r``: what it holds or has finished unpushed is open
        again; its commanded push counts only if it ``landed`` on the shards."""
        self.failed.add(r)
        for who in self.holders.values():
            who.discard(r)
        self.pending[r], self.losses[r] = [], 0.0
        portions, loss = self.inflight.pop(r, ([], 0.0))
        self.pushing.discard(r)
        if landed:
            self.confirmed[r] += sum(self.sizes[q] for q in portions)
            return
        for q in portions:
            del self.committed[q]
        self.loss_sum -= loss
        self.stats.done_by[r] -= len(portions)

    def wasted_in_flight(self) -> int:
        """Copies still being computed by some replica for committed portions."""
        return sum(len(who - {self.committed[p]}) for p, who in self.holders.items()
                   if p in self.committed)


def batch_rows(n_train: int, batch: int, seed: int, number: int):
    """The training rows of batch ``number``: the whole set when ``batch`` covers it.

    A pure function of its arguments, so the coordinator only sends a batch number
    and a row range, and every replica derives the same rows.
    """
    import numpy as np

    if batch >= n_train:
        return np.arange(n_train)
    rows = np.random.default_rng([seed, number]).choice(n_train, batch, replace=False)
    rows.sort()  # memory order: the gather from x_train runs forwards
    return rows


def portion_bounds(batch: int, portions: int) -> list[tuple[int, int]]:
    """``portions`` contiguous ranges of ``range(batch)``, sizes differing by at most 1."""
    base, extra = divmod(batch, portions)
    bounds, lo = [], 0
    for p in range(portions):
        hi = lo + base + (1 if p < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds
