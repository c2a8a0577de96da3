"""Experiment configuration: TOML tables loaded into frozen dataclasses.

One dataclass per TOML table.  Unknown tables or keys and values of the wrong type are
rejected with a one-line :class:`ConfigError` naming the key and the file, so a typo
never silently falls back to a default.  Single keys can be overridden from the command
line (``--set train.lr=0.05``); the override is parsed as a TOML value.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from mpibelief.errors import ConfigError

OPTIMIZERS = ("sgd", "adagrad")
ACTIVATIONS = ("sigmoid", "tanh", "relu")
SOURCES = ("fsdd", "synthetic", "hdf5")


@dataclass(frozen=True)
class RunConfig:
    """What to run and where its results go."""

    name: str = "run"
    algorithm: str = "sgd"
    seed: int = 0
    results_dir: str = "results"
    threads: int = 1


@dataclass(frozen=True)
class LayoutConfig:
    """The static rank layout: world = 1 coordinator + shards + replicas * partitions."""

    shards: int = 0
    replicas: int = 1
    partitions: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """The network.

    ``kind = "mlp"``: ``layers`` hidden layers of ``hidden`` units each (the speech
    network).  ``kind = "image"``: the paper's image network over inputs of
    ``input_shape`` ``[H, W, C]``: one stage per entry of ``strides``, each a locally
    connected layer of ``rf x rf`` fields with ``units`` per location, max pooling by the
    stage's entry of ``pools`` (1: none) and local contrast normalisation over ``lcn x
    lcn`` windows (0: none).  ``output``: softmax, or one-vs-all logistic units.
    """

    kind: str = "mlp"
    hidden: int = 512
    layers: int = 2
    activation: str = "relu"
    init_scale: float = 1.0
    output: str = "softmax"
    input_shape: list = field(default_factory=list)
    units: int = 8
    rf: int = 10
    strides: list = field(default_factory=lambda: [1, 1, 1])
    pools: list = field(default_factory=lambda: [1, 3, 2])
    lcn: int = 5


@dataclass(frozen=True)
class DataConfig:
    """Where the frames come from and how they are made.

    ``path`` is the FSDD folder for ``source = "fsdd"`` and the HDF5 file for
    ``source = "hdf5"``; relative paths are taken from the working directory.
    """

    source: str = "fsdd"
    path: str = "../shared/data/fsdd"
    cache_dir: str = ".cache"
    states_per_digit: int = 5
    context: int = 11
    n_mels: int = 40
    n_train: int = 20000
    n_test: int = 2000
    n_inputs: int = 440
    n_classes: int = 50
    seed: int = 0
    image_shape: list = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    """Mini-batch SGD settings shared by every algorithm."""

    optimizer: str = "sgd"
    lr: float = 0.05
    adagrad_eps: float = 1e-6
    batch: int = 128
    epochs: float = 1.0
    max_seconds: float = 0.0
    eval_every: float = 5.0
    eval_samples: int = 0


@dataclass(frozen=True)
class DownpourConfig:
    """Downpour SGD: fetch and push intervals and the single-replica warmstart."""

    n_fetch: int = 1
    n_push: int = 1
    warmstart_steps: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (``<result>.ckpt/``): written every ``every`` seconds of training
    (0: only on SIGUSR1 and SIGTERM); the newest ``keep`` are kept."""

    every: float = 0.0
    keep: int = 3


@dataclass(frozen=True)
class FaultsConfig:
    """Fault detection, and fault injection for tests and experiments.

    ``replica_timeout``: a replica that applies nothing for this many seconds (Sandblaster:
    that sends nothing while it holds work) is declared failed and the run goes on
    without it (0: never).  ``stall_seconds``: any wait on
    another rank longer than this ends the job with a message naming that rank.
    Injection (rank or replica -1: none): replica ``stop_replica`` stops after
    ``stop_after`` seconds (``stop_mode`` "exit": its loop ends; "hang": it stops
    answering); rank ``slow_rank`` computes ``slow_factor`` times slower; rank
    ``kill_rank`` kills itself with SIGKILL after ``kill_after`` seconds.
    """

    replica_timeout: float = 0.0
    stall_seconds: float = 120.0
    stop_replica: int = -1
    stop_after: float = 0.0
    stop_mode: str = "exit"
    slow_rank: int = -1
    slow_factor: float = 1.0
    kill_rank: int = -1
    kill_after: float = 0.0


@dataclass(frozen=True)
class SandblasterConfig:
    """Sandblaster L-BFGS: batches, portions, backups, the line search, a straggler.

    ``batch`` = 0 takes the whole training set as every batch (deterministic L-BFGS);
    ``iterations`` is the number of batches (L-BFGS steps); ``slow_replica`` (-1: none)
    runs ``slow_factor`` times slower, for experiments on backup tasks.
    """

    batch: int = 4096
    portions: int = 16
    push_every: int = 4
    history: int = 10
    iterations: int = 50
    backups: bool = True
    max_copies: int = 2
    line_search_evals: int = 10
    c1: float = 1e-4
    c2: float = 0.9
    slow_replica: int = -1
    slow_factor: float = 1.0


@dataclass(frozen=True)
class CompressionConfig:
    """Strom's threshold compression of the gradients a replica sends (sync, Downpour).

    ``tau`` > 0 fixes the threshold (Strom's choice); ``tau = 0`` chooses it every step
    so that a packet is at most ``fraction`` of the dense float32 bytes.  Warm-up: with
    ``warmup_stages`` > 0 the kept fraction starts at ``warmup_start`` and falls
    geometrically towards ``fraction``, one stage per ``warmup_epochs`` epochs (DGC).
    """

    enabled: bool = False
    tau: float = 0.0
    fraction: float = 0.01
    warmup_start: float = 0.25
    warmup_stages: int = 0
    warmup_epochs: float = 1.0


@dataclass(frozen=True)
class Config:
    """The whole experiment: one attribute per TOML table."""

    run: RunConfig = field(default_factory=RunConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    sandblaster: SandblasterConfig = field(default_factory=SandblasterConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def to_toml(self) -> str:
        """The resolved config as TOML text, stored in every result file."""
        lines = []
        for table in fields(self):
            lines.append(f"[{table.name}]")
            for key, value in dataclasses.asdict(getattr(self, table.name)).items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


# Allowed values of string keys; checked after types.
_CHOICES = {
    ("train", "optimizer"): OPTIMIZERS,
    ("model", "activation"): ACTIVATIONS,
    ("data", "source"): SOURCES,
    ("faults", "stop_mode"): ("exit", "hang"),
    ("model", "kind"): ("mlp", "image"),
    ("model", "output"): ("softmax", "logistic"),
}


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a TOML config file and apply ``table.key=value`` overrides.

    Args:
        path: the TOML file, or None for the built-in defaults.
        overrides: strings like ``"train.lr=0.1"``; the value is parsed as TOML,
            falling back to a bare string.

    Raises:
        ConfigError: unreadable file, unknown table or key, wrong type, bad value.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build a :class:`Config` from nested dicts, checking every key and type."""
    tables = {f.name: f for f in fields(Config)}
    kwargs = {}
    for name, values in raw.items():
        if name not in tables:
            raise ConfigError(f"{source}: unknown table [{name}] (known: {', '.join(tables)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        kwargs[name] = _build_table(tables[name].default_factory, name, values, source)
    config = Config(**kwargs)
    _check(config, source)
    object.__setattr__(config, "source", source)  # not a table: for later error messages
    return config


def _build_table(cls: type, table: str, values: dict, source: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {table}.{key} (known: {', '.join(sorted(known))})"
            )
        values[key] = _coerce(value, hints[key], f"{table}.{key}", source)
    return cls(**values)


def _coerce(value, hint, key: str, source: str):
    """Check ``value`` against the field's type; ints are accepted where floats are."""
    expected = hint
    if isinstance(hint, types.UnionType):
        expected = tuple(t for t in typing.get_args(hint) if t is not type(None))
    ok = isinstance(value, expected) and not (isinstance(value, bool) and hint is not bool)
    if not ok and hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(
            f"{source}: {key} must be {name}, got {type(value).__name__} {value!r}"
        )
    return value


def _check(config: Config, source: str) -> None:
    """Range and choice checks that types alone cannot express."""
    for (table, key), choices in _CHOICES.items():
        value = getattr(getattr(config, table), key)
        if value not in choices:
            raise ConfigError(
                f"{source}: {table}.{key} = {value!r} is not one of {', '.join(choices)}"
            )
    positive = [
        ("layout", "partitions"), ("model", "hidden"), ("run", "threads"),
        ("data", "states_per_digit"), ("data", "context"), ("data", "n_mels"),
        ("train", "batch"), ("downpour", "n_fetch"), ("downpour", "n_push"),
        ("checkpoint", "keep"),
        ("sandblaster", "portions"), ("sandblaster", "push_every"),
        ("sandblaster", "history"), ("sandblaster", "max_copies"),
        ("sandblaster", "line_search_evals"), ("sandblaster", "slow_factor"),
    ]
    for table, key in positive:
        if getattr(getattr(config, table), key) < 1:
            raise ConfigError(f"{source}: {table}.{key} must be at least 1")
    non_negative = [
        ("layout", "shards"), ("layout", "replicas"), ("model", "layers"), ("train", "epochs"),
        ("train", "max_seconds"), ("train", "eval_every"), ("train", "eval_samples"),
        ("downpour", "warmstart_steps"), ("run", "seed"), ("data", "seed"),
        ("checkpoint", "every"), ("faults", "replica_timeout"), ("faults", "stop_after"),
        ("faults", "kill_after"), ("sandblaster", "batch"), ("sandblaster", "iterations"),
        ("compression", "tau"), ("compression", "warmup_stages"),
    ]
    for table, key in non_negative:
        if getattr(getattr(config, table), key) < 0:
            raise ConfigError(f"{source}: {table}.{key} must not be negative")
    for table in fields(config):
        for key, value in dataclasses.asdict(getattr(config, table.name)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{source}: {table.name}.{key} must be finite, got {value}")
    name = config.run.name
    if not name.strip() or "/" in name or name in (".", ".."):
        raise ConfigError(f"{source}: run.name = {name!r} must be a plain, non-empty file"
                          " name (it names the result file)")
    if config.faults.slow_factor < 1 or config.faults.stall_seconds <= 0:
        raise ConfigError(f"{source}: faults.slow_factor must be >= 1 and"
                          " faults.stall_seconds positive")
    if config.train.lr <= 0:
        raise ConfigError(f"{source}: train.lr must be positive")
    if config.train.adagrad_eps <= 0:
        raise ConfigError(f"{source}: train.adagrad_eps must be positive")
    _check_compression(config.compression, source)
    sb = config.sandblaster
    if not 0 < sb.c1 < sb.c2 < 1:
        raise ConfigError(f"{source}: sandblaster needs 0 < c1 < c2 < 1 (Wolfe conditions)")
    _check_image(config, source)
    if config.data.context % 2 == 0:
        raise ConfigError(f"{source}: data.context must be odd (centre frame plus both sides)")


def _check_compression(comp: CompressionConfig, source: str) -> None:
    for key in ("fraction", "warmup_start"):
        value = getattr(comp, key)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{source}: compression.{key} = {value} is not in (0, 1]")
    if comp.warmup_epochs <= 0:
        raise ConfigError(f"{source}: compression.warmup_epochs must be positive")


def _check_image(config: Config, source: str) -> None:
    """Shapes of the image network and of synthetic images."""
    m, d = config.model, config.data
    for key, value, length in (("model.input_shape", m.input_shape, 3),
                               ("data.image_shape", d.image_shape, 3)):
        if value and (len(value) != length or not all(
                isinstance(v, int) and v >= 1 for v in value)):
            raise ConfigError(f"{source}: {key} must be [H, W, C] of positive integers")
    if m.kind != "image":
        return
    if not m.input_shape:
        raise ConfigError(f"{source}: model.kind = 'image' needs model.input_shape = [H, W, C]")
    if len(m.strides) != len(m.pools) or not m.strides or not all(
            isinstance(v, int) and v >= 1 for v in [*m.strides, *m.pools]):
        raise ConfigError(f"{source}: model.strides and model.pools must be lists of"
                          " positive integers, one per stage")
    if m.units < 1 or m.rf < 1 or m.lcn < 0 or (m.lcn and m.lcn % 2 == 0):
        raise ConfigError(f"{source}: model.units and model.rf must be at least 1 and"
                          " model.lcn odd (or 0 for none)")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    table, dot, name = key.strip().partition(".")
    if not sep or not dot or not table or not name:
        raise ConfigError(f"override {item!r} must look like table.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    section = raw.setdefault(table, {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: [{table}] is not a table")
    section[name] = value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    return str(value)
