"""The algorithm registry: each algorithm says its name, its layout check and one entry
point per role, and registers itself; ``train.py`` looks it up by ``run.algorithm``.

An algorithm is a driver: it says what each role does and when, using the roles
(:mod:`mpibelief.worker`, :mod:`mpibelief.coordinator`) and the transports
(:mod:`mpibelief.ps`, :mod:`mpibelief.comm`).  A new one is a module here plus its
config table; nothing else changes::

    NOOP = register(Algorithm("noop", {WORKER: lambda ctx: {...}}))

Every entry point takes the :class:`~mpibelief.context.RunContext` and returns the
run's summary dict on the coordinating rank (``train_seconds``, ``test_accuracy``,
``train_accuracy``), None elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from mpibelief.errors import ConfigError

BUILTIN = ("sgd", "downpour", "sandblaster", "sync")  # modules that register on import


@dataclass(frozen=True)
class Algorithm:
    """A training algorithm: one entry point per role kind, and a layout check.

    Attributes:
        name: the ``run.algorithm`` value that selects it.
        roles: role kind (``coordinator``, ``shard``, ``worker``) -> entry point.
        check: ``check(cfg)`` raises :class:`ConfigError` when the config's layout
            (or anything else) does not suit the algorithm; runs before MPI starts work.
        summary: one line for ``--help`` and ``info``.
    """

    name: str
    roles: dict[str, Callable]
    check: Callable = field(default=lambda cfg: None)
    summary: str = ""

    def entry(self, kind: str) -> Callable:
        if kind not in self.roles:
            raise ConfigError(f"run.algorithm = {self.name!r} has no {kind} role;"
                              " check the layout table")
        return self.roles[kind]


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Make ``algorithm`` selectable by its name (a later one of the same name wins)."""
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> Algorithm:
    """The algorithm called ``name``, or a one-line :class:`ConfigError` listing them."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"run.algorithm = {name!r} is not one of {', '.join(names())}")
    return _REGISTRY[name]


def resolve(cfg) -> Algorithm:
    """The config's algorithm, after its own check of the config.

    Raises:
        ConfigError: unknown algorithm, or a config it refuses; naming the config file.
    """
    try:
        algorithm = get(cfg.run.algorithm)
        algorithm.check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{getattr(cfg, 'source', '<config>')}: {exc}") from None
    return algorithm


def _load_builtins() -> None:
    for module in BUILTIN:
        importlib.import_module(f"{__name__}.{module}")
