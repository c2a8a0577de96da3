"""The run context: everything one rank of a run is given, built once by ``train.py``.

An algorithm's role entry points receive this and nothing else, so adding a field here
(a clock, a communicator) reaches every algorithm without changing a signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RunContext:
    """One rank's view of the run.

    Attributes:
        cfg: the resolved :class:`~mpibelief.config.Config`.
        comms: the rank's :class:`~mpibelief.comm.Comms` (world, control, replica,
            across); None where MPI is not used (an in-process test).
        layout: the :class:`~mpibelief.layout.Layout` of every rank.
        rank: this rank in ``comms.world``.
        data: the :class:`~mpibelief.data.Dataset` (all of it; replicas take a shard).
        model: the :class:`~mpibelief.model.Model`, initialised from ``cfg.run.seed``.
        writer: the :class:`~mpibelief.results.ResultWriter` on the coordinating rank,
            else None.
        clock: :class:`~mpibelief.clock.WallClock`, or a virtual clock in simulation.
        signals: the :class:`~mpibelief.signals.Signals` flags (SIGTERM, SIGUSR1).
        checkpoints: the run's checkpoint folder (``<result>.ckpt``).
        resume: the checkpoint being resumed (its manifest state), or None.
    """

    cfg: Any
    comms: Any
    layout: Any
    rank: int
    data: Any
    model: Any
    writer: Any
    clock: Any
    signals: Any = None
    checkpoints: Any = None
    resume: dict | None = None

    @property
    def role(self):
        """This rank's :class:`~mpibelief.layout.Role`."""
        return self.layout.roles[self.rank]
