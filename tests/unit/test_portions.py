"""Sandblaster's portion book on every kind of interleaving, without MPI.

A small discrete-event loop plays the replicas of :mod:`mpibelief.portion_worker`
and the dispatcher's request/reply protocol around one :class:`PortionBook`: each
replica computes the portion it was handed for a time set by its speed, keeps a sum
of the portions it finished, and pushes that sum (to a counter standing in for the
shards' accumulator) when told.  Whatever the speeds, ``push_every`` and backups, every
portion must reach the accumulator exactly once, and the sizes must add up to the batch.
"""

from __future__ import annotations

import heapq
from collections import Counter

import numpy as np
import pytest

from mpibelief.portions import DROP, PUSH, PortionBook, batch_rows, portion_bounds


def play(sizes, speeds, push_every, backups, seed=0, max_copies=2, fail=None,
         push_time=0.01, pace=None):
    """Run one evaluation; returns (book, portions summed by the 'shards', makespan).

    ``fail = [r, at, landed]``: replica ``r`` goes silent at time ``at`` and is given up
    on; a push it was making reaches the 'shards' when ``landed`` (else never); whether
    it was pushing is appended to ``fail``.
    """
    rng = np.random.default_rng(seed)
    book = PortionBook(sizes, len(speeds), push_every, backups, max_copies, pace=pace)
    summed: Counter = Counter()
    sums = [[] for _ in speeds]  # the portions in each replica's running sum
    events, waiting, t = [], set(), 0.0

    def give(r, now):
        p = book.next_task(r)
        if p is None:
            waiting.add(r)
            return
        waiting.discard(r)
        cost = sizes[p] / speeds[r] * rng.uniform(0.9, 1.1)
        heapq.heappush(events, (now + cost, r, "done", p))

    for r in range(len(speeds)):
        give(r, 0.0)
    while not book.complete:
        t, r, kind, p = heapq.heappop(events)
        if fail is not None and t >= fail[1] and fail[0] not in book.failed:
            dead, _, landed = fail[:3]
            fail.append(dead in book.pushing)
            landed = landed and dead in book.pushing
            if landed:
                summed.update(sums[dead])
            book.fail(dead, landed)
            for w in sorted(waiting):  # its portions are open: idle replicas take them
                give(w, t)
        if r in book.failed:
            continue  # silent: whatever it was doing never reaches anyone
        if kind == "pushed":
            summed.update(sums[r])
            sums[r] = []
            book.pushed(r)
            give(r, t)
            continue
        sums[r].append(p)
        decision = book.finished(r, p, loss_sum=float(sizes[p]))
        if decision == PUSH:
            heapq.heappush(events, (t + push_time, r, "pushed", -1))
        elif decision == DROP:
            sums[r] = []
            give(r, t)
            for w in sorted(waiting):  # reopened portions go to idle replicas
                give(w, t)
        else:
            give(r, t)
    return book, summed, t


@pytest.mark.parametrize("backups", [False, True])
@pytest.mark.parametrize("push_every", [1, 3, 5])
@pytest.mark.parametrize("speeds", [(1.0,), (1.0, 1.0), (1.0, 0.25), (1.0, 0.7, 0.2, 1.3)])
def test_every_portion_is_summed_exactly_once(speeds, push_every, backups):
    for seed in range(5):
        sizes = [len(range(lo, hi)) for lo, hi in portion_bounds(1000 + seed, 16)]
        book, summed, _ = play(sizes, speeds, push_every, backups, seed)
        assert summed == Counter(range(len(sizes))), summed  # each exactly once
        assert sum(sizes[p] for p in summed) == sum(sizes) == book.samples
        assert book.loss_sum == pytest.approx(sum(sizes))
        assert sum(book.stats.done_by) == len(sizes)
        assert book.stats.issued >= len(sizes)
        if not backups:
            assert book.stats.backups == 0 and book.stats.wasted == 0


def test_backups_shorten_a_batch_held_up_by_a_straggler():
    sizes = [1] * 8
    off = np.median([play(sizes, (1.0, 0.25), 1, False, s)[2] for s in range(9)])
    on_book, _, _ = play(sizes, (1.0, 0.25), 1, True, 0)
    on = np.median([play(sizes, (1.0, 0.25), 1, True, s)[2] for s in range(9)])
    assert on < off
    assert on_book.stats.backups >= 1 and on_book.wasted_in_flight() >= 1  # lost copy
    assert on_book.stats.done_by[0] > on_book.stats.done_by[1]  # the fast one does more


def test_a_straggler_does_less_work():
    book, _, _ = play([1] * 40, (1.0, 0.25), 2, False)
    fast, slow = book.stats.done_by
    assert fast > 2.5 * slow  # dynamic balancing: work follows speed


def test_a_straggler_by_pace_pushes_before_the_fresh_work_runs_out():
    """Replica 1 is 4x slower.  With 3 fresh portions left it finishes one: counting
    replicas it would go on summing (3 >= 2 replicas), but the fast one will have
    taken all 3 before it finishes another, so by pace it pushes now."""
    decisions = {}
    for pace in (None, [1.0, 4.0]):
        book = PortionBook([1] * 16, 2, push_every=4, backups=True, pace=pace)
        assert book.next_task(1) == 0
        for p in range(1, 13):
            assert book.next_task(0) == p
            if book.finished(0, p, 1.0) == PUSH:
                book.pushed(0)
        assert len(book.fresh) == 3
        decisions[pace is not None] = book.finished(1, 0, 1.0)
        assert not book.tail(0)  # the fast one goes on either way: 3 >= 1 + 1/4
    assert decisions == {False: "continue", True: PUSH}


def test_pushing_by_pace_keeps_backups_from_redoing_a_stragglers_sum():
    """With push_every 4 and the count rule, the straggler's finished portions are
    still unpushed when the fast replica runs out of fresh work: its copies redo
    them, and backups gain almost nothing; by pace they redo only the portion in
    progress."""
    sizes, speeds = [1] * 8, (1.0, 0.25)

    def makespan(backups, pace):
        return np.median([play(sizes, speeds, 4, backups, s, pace=pace)[2] for s in range(9)])

    off, counted, paced = makespan(False, None), makespan(True, None), makespan(True, [1, 4])
    assert paced < counted and paced < off - 0.8  # of about 8 fast portions' time
    assert counted > off - 0.2


def test_a_copy_that_wins_drops_the_whole_sum_holding_it():
    """The claim is made for a replica's whole sum when it is pushed (module doc)."""
    book = PortionBook([1, 1, 1, 1], replicas=2, push_every=3, backups=True)
    assert (book.next_task(0), book.next_task(1)) == (0, 1)
    assert book.finished(0, 0, 1.0) == "continue"  # 2 fresh left for 2 replicas
    assert book.next_task(0) == 2
    assert book.finished(1, 1, 1.0) == PUSH  # the tail: push after every portion
    book.pushed(1)
    assert book.next_task(1) == 3
    assert book.finished(1, 3, 1.0) == PUSH
    book.pushed(1)
    assert book.next_task(1) == 0  # a backup of 0, which replica 0 holds unpushed
    assert book.finished(1, 0, 1.0) == PUSH  # the copy is committed first
    book.pushed(1)
    assert book.next_task(1) == 2  # a backup of what replica 0 computes
    assert book.finished(0, 2, 1.0) == DROP  # its sum holds 0: the sum is discarded
    assert 2 not in book.committed and book.next_task(0) == 2  # 2 stays open
    assert book.finished(1, 2, 1.0) == PUSH
    book.pushed(1)
    assert book.complete and book.samples == 4
    assert book.stats.done_by == [0, 4]
    assert (book.stats.backups, book.stats.wasted) == (3, 2)
    assert book.wasted_in_flight() == 1  # replica 0 still computes a copy of 2


@pytest.mark.parametrize("push_every", [1, 3])
@pytest.mark.parametrize("backups", [False, True])
@pytest.mark.parametrize("landed", [False, True])
def test_a_failed_replica_loses_nothing_and_counts_nothing_twice(push_every, backups, landed):
    """Replica 1 dies at any moment (holding portions, a pending sum, or in the middle of
    a push that reaches the shards or not): the others finish the batch, and every
    portion is summed exactly once."""
    sizes = [10 + (i % 3) for i in range(12)]
    mid_push = 0
    for at in np.arange(0.0, 40.0, 0.5):
        fail = [1, at, landed]
        book, summed, _ = play(sizes, [1.0, 1.3, 0.8], push_every, backups, seed=3,
                               fail=fail, push_time=3.0)
        mid_push += fail[3:] == [True]
        assert book.failed == {1}
        assert sorted(summed) == list(range(len(sizes))) and set(summed.values()) == {1}
        assert book.samples == sum(sizes) and book.loss_sum == pytest.approx(sum(sizes))
        assert sum(book.stats.done_by) == len(sizes) and sum(book.confirmed) == sum(sizes)
    assert mid_push >= 3  # the hard case was really played


def test_a_new_book_gives_a_failed_replica_nothing():
    book = PortionBook([5] * 4, 2, push_every=1, backups=True, failed={1})
    assert book.next_task(0) == 0
    for p in range(1, 4):  # the tail counts the live replica only
        assert book.finished(0, p - 1, 5.0) == PUSH
        book.pushed(0)
        assert book.next_task(0) == p


def test_batch_rows_and_bounds():
    assert portion_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    rows = batch_rows(100, 30, seed=1, number=4)
    assert len(set(rows.tolist())) == 30 and (np.diff(rows) > 0).all()
    assert (rows == batch_rows(100, 30, seed=1, number=4)).all()  # every rank agrees
    assert not (rows == batch_rows(100, 30, seed=1, number=5)).all()
    assert (batch_rows(100, 100, 1, 7) == np.arange(100)).all()
