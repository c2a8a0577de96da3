"""Config loading: every bad key, type and value is a one-line ConfigError."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mpibelief import config
from mpibelief.errors import ConfigError

REPO_CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/*.toml"))


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_round_trip_through_toml():
    cfg = config.load(None)
    assert config.from_dict(tomllib.loads(cfg.to_toml())) == cfg


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert config.load(path).run.name


def test_overrides_parse_toml_values():
    cfg = config.load(None, ["train.lr=0.5", "model.hidden=64", "run.name=x y", "train.epochs=2"])
    assert cfg.train.lr == 0.5 and cfg.model.hidden == 64 and cfg.run.name == "x y"
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[train]\nlearning_rate = 0.1\n", "unknown key train.learning_rate"),
        ("[trian]\nlr = 0.1\n", "unknown table [trian]"),
        ('[train]\nlr = "fast"\n', "train.lr must be float, got str"),
        ("[model]\nhidden = 1.5\n", "model.hidden must be int"),
        ("[model]\nhidden = true\n", "model.hidden must be int, got bool"),
        ("[train]\nbatch = 0\n", "train.batch must be at least 1"),
        ("[data]\ncontext = 10\n", "data.context must be odd"),
        ("[train\n", "not valid TOML"),
        ("[train]\nepochs = inf\n", "train.epochs must be finite"),
        ("[train]\nmax_seconds = nan\n", "train.max_seconds must be finite"),
        ("[train]\nadagrad_eps = -1.0\n", "train.adagrad_eps must be positive"),
        ("[layout]\npartitions = 0\n", "layout.partitions must be at least 1"),
        ('[model]\nkind = "image"\n', "needs model.input_shape"),
        ('[model]\nkind = "image"\ninput_shape = [8, 8]\n', "model.input_shape must be"),
        ('[model]\nkind = "image"\ninput_shape = [8, 8, 1]\npools = [1]\n',
         "one per stage"),
        ('[model]\nkind = "image"\ninput_shape = [8, 8, 1]\nlcn = 4\n', "model.lcn odd"),
        ('[model]\noutput = "hinge"\n', "model.output = 'hinge' is not one of"),
        ("[compression]\nfraction = 0.0\n", "compression.fraction = 0.0 is not in (0, 1]"),
        ("[compression]\ntau = -1.0\n", "compression.tau must not be negative"),
        ("[compression]\nenabled = 1\n", "compression.enabled must be bool"),
    ],
)
def test_bad_configs_name_the_key_and_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    message = str(err.value)
    assert needle in message and str(path) in message
    assert "\n" not in message


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        config.load("/nonexistent/x.toml")


@pytest.mark.parametrize("item", ["train.lr", "lr=1", ".lr=1", "train.=1"])
def test_bad_override_syntax(item):
    with pytest.raises(ConfigError, match="table.key=value"):
        config.load(None, [item])


def test_override_of_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        config.load(None, ["train.nope=1"])
