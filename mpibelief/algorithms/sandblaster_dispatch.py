"""The Sandblaster coordinator's message loop: handing out portions over MPI.

Carries the decisions of :class:`~mpibelief.portions.PortionBook` to the replicas
(:mod:`mpibelief.portion_worker`) as two-sided control messages, strictly request and
reply: a replica sends one message (:attr:`Tag.WORK`) and waits for one answer
(:attr:`Tag.TASK`).  A replica asking when there is nothing to give is simply not
answered yet; it is *waiting*, and the next evaluation (or a portion reopened by a
dropped sum) answers it.  Messages of an evaluation already finished (a backup copy
that lost, still computing when the batch ended) are answered ``drop``.

Failed replicas.  A replica that holds work (a portion, a copy, or a commanded push)
and sends nothing for ``timeout`` seconds is given up on: the shards are told to
refuse its pushes from now on (``exclude``; they answer what it had summed this
evaluation, which decides whether a push it was making counts, see
:meth:`PortionBook.fail`), its portions are open again for the others, and
``on_fail`` records it.  It gets no work again; should it speak again it is answered
``stop``, so nothing it computed after being given up on can count twice.

Every message is counted, pickled as mpi4py sends it, into :attr:`Dispatcher.bytes_in`
and :attr:`Dispatcher.bytes_out`: the coordinator's traffic for the gradients is a few
small tuples per portion, whatever the model's size.

The transport is four methods: :meth:`~Dispatcher.evaluate` and
:meth:`~Dispatcher.stop` (the waiting loops), ``_serve_one`` (a message in) and
``_deliver`` (one out); every decision is made in the others, through ``_begin``,
``_receive`` and ``_end``.  The virtual-time simulator
(:mod:`mpibelief.simulate.sandblaster_cluster`) replaces those four and nothing else,
so a simulated run hands portions out by this very code.
"""

from __future__ import annotations

import pickle

from mpi4py import MPI

from mpibelief.comm import Backoff, Tag
from mpibelief.errors import UserError
from mpibelief.portions import DROP, PUSH, PortionBook


class Dispatcher:
    """Hands portions to the replicas' ranks ``ranks`` (one per replica: its only rank,
    or its partition 0, which relays to the others) over ``comm``.

    Args:
        push_every, backups, max_copies: passed to each evaluation's
            :class:`PortionBook`.
        clock: the run's clock; timeout: seconds of silence, holding work, before a
            replica is given up on (0: never).
        exclude: ``exclude(replica) -> [samples]``: the shards refuse that replica's
            pushes (every partition's) from now on; returns what each had summed, one
            count per shard and partition whose range meets it.
        on_fail: ``on_fail(rank, reason)``: record a replica given up on.
    """

    def __init__(self, comm: MPI.Intracomm, ranks: list[int], push_every: int,
                 backups: bool, max_copies: int = 2, clock=None, timeout: float = 0.0,
                 exclude=None, on_fail=None):
        self.clock, self.timeout = clock, timeout
        self.exclude, self.on_fail = exclude, on_fail
        self.failed: set[int] = set()
        self.stopped: set[int] = set()  # failed replicas already answered "stop"
        self.holding: dict[int, float] = {}  # replica -> clock time it was given work
        self.comm, self.ranks = comm, list(ranks)
        self.index = {rank: i for i, rank in enumerate(ranks)}
        self.push_every, self.backups, self.max_copies = push_every, backups, max_copies
        self.waiting: set[int] = set()  # replicas whose last message is unanswered
        self.book: PortionBook | None = None
        self.evaluation = -1
        self.task: tuple = ()  # (batch number, portion bounds) of the evaluation
        self.bytes_in = self.bytes_out = 0
        self.late = 0  # answers to finished evaluations (lost copies still running)
        # Seconds per portion of each replica (task sent to done read, halved toward
        # each new one), for the book's tail: a straggler pushes what it has sooner.
        self.pace: list[float | None] = [None] * len(self.ranks)
        self.given: dict[int, float] = {}  # replica -> clock time its task was sent

    def evaluate(self, number: int, bounds: list[tuple[int, int]]) -> PortionBook:
        """Have the replicas sum the gradient of batch ``number`` (cut at ``bounds``)
        into the shards' accumulator; returns when every portion is pushed and summed.
        """
        book = self._begin(number, bounds)
        backoff = Backoff(low=20e-6, high=5e-4)
        while not book.complete:
            if self._serve_one():
                backoff.reset()
            else:  # only with nothing queued: an answer waiting to be read is not silence
                self._check_silence()
                backoff.sleep()
        return self._end()

    def _begin(self, number: int, bounds: list[tuple[int, int]]) -> PortionBook:
        """A new evaluation's book; the replicas waiting get their first portions."""
        self.evaluation += 1
        self.task = (number, bounds)
        book = self.book = PortionBook([hi - lo for lo, hi in bounds], len(self.ranks),
                                       self.push_every, self.backups, self.max_copies,
                                       self.failed, self.pace)
        self._wake()
        return book

    def _end(self) -> PortionBook:
        """The evaluation is complete: copies still computing are wasted."""
        book = self.book
        book.stats.wasted += book.wasted_in_flight()
        self.book = None
        return book

    def stop(self) -> None:
        """Answer every replica ``stop`` once all live ones are waiting (late copies drain
        first); failed ones get it too, unanswered, for when they wake."""
        backoff = Backoff(low=20e-6, high=2e-3)
        while len(self.waiting) + len(self.failed) < len(self.ranks):
            if not self._serve_one():
                self._check_silence()
                backoff.sleep()
        for r in sorted(self.waiting | (self.failed - self.stopped)):
            self._send(r, ("stop",))  # a failed one still alive reads it when it wakes
        self.waiting.clear()

    def _serve_one(self) -> bool:
        status = MPI.Status()
        if not self.comm.Iprobe(MPI.ANY_SOURCE, Tag.WORK, status):
            return False
        rank = status.Get_source()
        self._receive(self.index[rank], self.comm.recv(source=rank, tag=Tag.WORK))
        return True

    def _receive(self, r: int, message: tuple) -> None:
        self.bytes_in += len(pickle.dumps(message, -1))
        self._handle(r, message)

    def _handle(self, r: int, message: tuple) -> None:
        kind, *args = message
        book = self.book
        self.holding.pop(r, None)
        if kind == "done" and r in self.given:
            took = self.clock.now() - self.given.pop(r)
            self.pace[r] = took if self.pace[r] is None else 0.5 * (self.pace[r] + took)
        if r in self.failed:  # given up on: out of the run, whatever it says
            self.late += 1
            self.stopped.add(r)
            self._send(r, ("stop",))
        elif kind == "ready":
            self._give(r)
        elif kind == "pushed":
            book.pushed(r)  # a push is always of the current evaluation
            self._give(r)
        elif book is None or args[0] != self.evaluation:  # "done", too late
            self.late += 1
            self._send(r, ("drop",))
        else:
            _, portion, loss = args
            decision = book.finished(r, portion, loss)
            if decision == PUSH:
                self._send(r, ("push", self.evaluation))
            elif decision == DROP:
                self._send(r, ("drop",))
                self._wake()  # its other portions are open again: idle replicas may take them
            else:
                self._give(r)

    def _give(self, r: int) -> None:
        """Answer replica ``r`` with a portion, or leave it waiting."""
        portion = None if self.book is None else self.book.next_task(r)
        if portion is None:
            self.waiting.add(r)
            return
        self.waiting.discard(r)
        number, bounds = self.task
        self._send(r, ("task", self.evaluation, number, portion, *bounds[portion]))

    def _wake(self) -> None:
        for r in sorted(self.waiting):
            self._give(r)

    def _send(self, r: int, message: tuple) -> None:
        self.bytes_out += len(pickle.dumps(message, -1))
        if message[0] in ("task", "push") and self.clock is not None:
            self.holding[r] = self.clock.now()
            if message[0] == "task":
                self.given[r] = self.holding[r]
        self._deliver(r, message)

    def _deliver(self, r: int, message: tuple) -> None:
        self.comm.send(message, dest=self.ranks[r], tag=Tag.TASK)

    def _check_silence(self) -> None:
        """Give up on every replica silent for ``timeout`` seconds while holding work."""
        if self.timeout <= 0 or not self.holding:
            return
        now = self.clock.now()
        for r, since in sorted(self.holding.items()):
            if now - since > self.timeout:
                self._fail(r, f"no message for {now - since:.0f} s while holding work")

    def _fail(self, r: int, reason: str) -> None:
        """Replica ``r`` is out: the shards refuse its pushes, its work is reopened."""
        self.holding.pop(r, None)
        self.failed.add(r)
        self.waiting.discard(r)
        summed = self.exclude(r) if self.exclude is not None else []
        book = self.book
        if book is not None:
            book.fail(r, r in book.pushing and self._landed(book, r, summed))
        if self.on_fail is not None:
            self.on_fail(self.ranks[r], reason)
        if len(self.failed) == len(self.ranks):
            raise UserError(f"every replica failed (the last, rank {self.ranks[r]}:"
                            f" {reason}); nothing left to compute the gradient")
        self._wake()  # its portions are open: idle replicas take them

    def _landed(self, book: PortionBook, r: int, summed: list[int]) -> bool:
        """Whether the push ``r`` was making reached every shard (or none), from every
        partition."""
        before, pushing = book.confirmed[r], book.inflight_samples(r)
        if all(s == before + pushing for s in summed):
            return True
        if all(s == before for s in summed):
            return False
        raise UserError(f"replica rank {self.ranks[r]} failed in the middle of a push"
                        f" (shards summed {summed} samples of it): the batch cannot be"
                        " counted exactly once; resume from the last checkpoint")
