"""The config a user writes: typed keys, one-line errors with exit code 2, presets that compose."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module

from tests.conftest import REPO, last_error_line, run_trainer
from trainer import TrainerError
from trainer.config import register_configs, validate

register_configs()


def composed(*overrides: str, module: bool = False):
    init = (
        initialize_config_module("trainer.conf", version_base="1.3")
        if module
        else initialize_config_dir(str(REPO / "conf"), version_base="1.3")
    )
    with init:
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.imagesize=64", "data.imagesize"),
        ("data.image_size=abc", "data.image_size"),
        ("data.on_bad_image=ignore", "data.on_bad_image"),
        ("train.epochs=1.5", "train.epochs"),
    ],
)
def test_misspelt_key_or_wrong_type_exits_2_with_one_line_naming_the_key(tmp_path, override, key):
    result = run_trainer(override, "data.train_dir=x", cwd=tmp_path)
    assert result.returncode == 2
    assert key in last_error_line(result)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # before TensorFlow is even imported


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.image_size=16", "data.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.validation_split=1.5", "data.validation_split"),
        ("train.epochs=0", "train.epochs"),
        ("train.learning_rate=-0.1", "train.learning_rate"),
        ("train.min_accuracy=2", "train.min_accuracy"),
        ("model.dropout=1.0", "model.dropout"),
        ("distribute.simulate_devices=0", "distribute.simulate_devices"),
        ("data.train_dir=null", "data.train_dir"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    cfg = composed("data.train_dir=somewhere", override)
    with pytest.raises(TrainerError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_out_of_range_value_exits_2_from_the_command_line(tmp_path):
    result = run_trainer("data.train_dir=x", "data.batch_size=0", cwd=tmp_path)
    assert result.returncode == 2
    assert last_error_line(result).startswith("trainer: error: data.batch_size=0")


def test_defaults_are_valid_once_train_dir_is_set():
    cfg = composed("data.train_dir=somewhere")
    validate(cfg)
    assert cfg.data.image_size == 224 and cfg.model.weights == "imagenet"
    assert cfg.distribute.strategy.value == "auto"


@pytest.mark.parametrize("name", ["demo", "hotdog"])
def test_experiment_presets_compose_and_show_their_command(name):
    text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert f"python -m trainer experiment={name}" in "\n".join(
        line for line in text.splitlines() if line.startswith("#")
    )
    validate(composed(f"experiment={name}"))
