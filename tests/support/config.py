"""The config a test runs the job with, composed the way `python -m trainer` composes it.

`compose_config(*overrides)` is the one place the tests call Hydra's compose API. The `cfg`
fixture is the defaults composed once a session (a deep copy a test), made small and pointed at
the test's tmp_path: a test sets what it needs on it (`cfg.train.epochs = 2`) and calls
`trainer.job.run(cfg)` in this process. It brings `in_process_run`, which gives every such test
a process as a fresh one would be.
"""

from __future__ import annotations

import copy

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from tests.support.processes import REPO
from trainer.config import enum_overrides, register_configs


def compose_config(*overrides: str, module: bool = False, hydra: bool = False) -> DictConfig:
    """conf/config.yaml with `overrides` as the command line gives them (Hydra's override
    grammar, train.jit_compile's true/false quoted as `python -m trainer` quotes them);
    `module=True`: the copy an installed wheel carries (the package trainer.conf); `hydra=True`:
    with Hydra's own node (`hydra.overrides.task`, ...), as a running app has it."""
    register_configs()
    init = (
        initialize_config_module("trainer.conf", version_base="1.3")
        if module
        else initialize_config_dir(str(REPO / "conf"), version_base="1.3")
    )
    with init:
        return compose(
            "config", overrides=enum_overrides(list(overrides)), return_hydra_config=hydra
        )


@pytest.fixture(scope="session")
def composed_config() -> DictConfig:
    """The defaults, as a user with no overrides gets them; composed once for the session."""
    return compose_config()


@pytest.fixture
def cfg(composed_config, tmp_path, in_process_run) -> DictConfig:
    """A run of seconds (32 px, batch 16, random-init backbone) writing to tmp_path/out, its
    caches in tmp_path/cache; data.train_dir and data.test_dir are for the test to set."""
    config = copy.deepcopy(composed_config)
    config.data.image_size, config.data.batch_size, config.model.weights = 32, 16, None
    config.output.dir = str(tmp_path / "out")
    config.storage.cache_dir = str(tmp_path / "cache")
    return config


def configure(cfg: DictConfig, *overrides: str) -> DictConfig:
    """`cfg` with `overrides` ("train.epochs=2", "data.augment=true", "model.weights=null")
    merged in, type-checked by the schema as the command line's are; returns `cfg`."""
    cfg.merge_with(OmegaConf.from_dotlist(list(overrides)))
    return cfg
