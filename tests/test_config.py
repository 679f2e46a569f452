"""The config a user writes: typed keys, one-line errors with exit code 2, presets that compose."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_config, last_error_line, run_trainer
from trainer import TrainerError
from trainer.config import Config, enum_overrides, register_configs, validate

register_configs()


def composed(*overrides: str, module: bool = False):
    return compose_config(*overrides, module=module)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.imagesize=64", "data.imagesize"),
        ("data.image_size=abc", "data.image_size"),
        ("data.on_bad_image=ignore", "data.on_bad_image"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.precision=fp8", "train.precision"),
        ("train.jit_compile=maybe", "train.jit_compile"),
    ],
)
def test_misspelt_key_or_wrong_type_exits_2_with_one_line_naming_the_key(tmp_path, override, key):
    result = run_trainer(override, "data.train_dir=x", cwd=tmp_path)
    assert result.returncode == 2
    assert key in last_error_line(result)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # before TensorFlow is even imported


@pytest.mark.parametrize(
    "override, says",
    [
        # Hydra lists the options on the lines after its heading: they belong in the one line.
        ("experiment=dem", "Available options in 'experiment': demo, hotdog"),
        # Hydra's third hint is the one a user meant: keep it.
        ("model.dropout=0.1,0.2", "3. To sweep over it, add --multirun to your command line"),
    ],
)
def test_config_errors_keep_what_the_user_acts_on_in_their_one_line(tmp_path, override, says):
    result = run_trainer(override, "data.train_dir=x", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert says in last_error_line(result)
    assert "Config search path" not in result.stderr


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.image_size=16", "data.image_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.validation_split=1.5", "data.validation_split"),
        ("train.epochs=0", "train.epochs"),
        ("train.head_min_steps=-1", "train.head_min_steps"),
        ("train.finetune_validation_split=1.0", "train.finetune_validation_split"),
        ("train.learning_rate=-0.1", "train.learning_rate"),
        ("train.min_accuracy=2", "train.min_accuracy"),
        ("model.dropout=1.0", "model.dropout"),
        ("distribute.simulate_devices=0", "distribute.simulate_devices"),
        ("train.max_hours=0", "train.max_hours"),
        ("train.max_hours=-1", "train.max_hours"),
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


@pytest.mark.parametrize(
    "value, expected",
    [("true", "'true'"), ("false", "'false'"), ("auto", "auto"), ("True", "'true'")],
)
def test_jit_compile_true_false_auto_work_from_the_command_line(tmp_path, value, expected):
    # Hydra parses `=true` as a boolean, which an Enum key refuses unless the trainer quotes it.
    result = run_trainer(
        "data.train_dir=x", f"train.jit_compile={value}", "--cfg", "job", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert f"jit_compile: {expected}" in result.stdout


def test_jit_compile_sweep_values_reach_the_enum_as_names():
    assert enum_overrides(["-m", "train.jit_compile=true,False", "train.epochs=1"]) == [
        "-m",
        "train.jit_compile='true','false'",
        "train.epochs=1",
    ]
    cfg = composed("data.train_dir=x", *enum_overrides(["train.jit_compile=false"]))
    assert cfg.train.jit_compile.value == "false"


def _schema_default(path: list[str]):
    node = Config()
    for key in path:
        node = getattr(node, key)
    return node.value if hasattr(node, "value") else node


def _leaves(node, path=()):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


@pytest.mark.parametrize(
    "preset", sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").glob("*/*.yaml"))
)
def test_presets_hold_only_what_they_change_from_the_schema(preset):
    """Each default lives in trainer/config.py alone: a preset repeating one would drift."""
    group = preset.split("/")[0]
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / preset)) or {}
    values.pop("defaults", None)
    prefix = () if group == "experiment" else (group,)
    repeated = [
        ".".join(path)
        for path, value in _leaves(values, prefix)
        if value == _schema_default(list(path))
    ]
    assert not repeated, f"{preset} repeats the schema's defaults for {repeated}"


def test_every_schema_key_says_when_to_change_it():
    """One clause per knob, in the one place the defaults live (nanoGPT's way)."""
    source = (REPO / "trainer" / "config.py").read_text().splitlines()
    for section in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(section.default_factory):
            continue
        for knob in dataclasses.fields(section.default_factory):
            line = next(x for x in source if x.strip().startswith(f"{knob.name}:"))
            assert "  # " in line, f"{section.name}.{knob.name} has no comment in config.py"
