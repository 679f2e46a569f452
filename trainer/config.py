"""The typed config: dataclasses registered with Hydra's ConfigStore, plus range checks.

Types and key names are enforced by OmegaConf when Hydra composes the config (a misspelt key or
`data.image_size=abc` fails there); `validate` adds the range checks OmegaConf cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from trainer import TrainerError


class BadImagePolicy(Enum):
    skip = "skip"
    fail = "fail"


class Strategy(Enum):
    auto = "auto"
    default = "default"
    mirrored = "mirrored"
    multi_worker = "multi_worker"


@dataclass
class DataConfig:
    train_dir: str | None = None
    test_dir: str | None = None  # null: split `validation_split` off train_dir
    validation_split: float = 0.2
    image_size: int = 224
    batch_size: int = 32  # per replica
    augment: bool = False  # random flip, rotation and zoom, applied on the fly
    on_bad_image: BadImagePolicy = BadImagePolicy.skip


@dataclass
class ModelConfig:
    weights: str | None = "imagenet"  # imagenet | null | path to *_notop.h5 or *.weights.h5
    dropout: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 10
    learning_rate: float = 1e-3
    min_accuracy: float | None = None
    feature_cache_max_mb: int = 1024
    finetune_epochs: int = 0
    finetune_from: str = "conv5_block1_1_conv"
    finetune_learning_rate: float = 1e-5
    backup_every_steps: int = 0  # 0: back up at each epoch's end; N: every N steps too
    precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    jit_compile: str = "auto"  # auto | true | false (XLA)


@dataclass
class DistributeConfig:
    strategy: Strategy = Strategy.auto
    simulate_devices: int | None = None
    timeout_seconds: int = 600  # multi_worker: give up on a worker lost this long (0: never)


@dataclass
class OutputConfig:
    dir: str = "${hydra:runtime.output_dir}"
    overwrite: bool = False


@dataclass
class StorageConfig:
    cache_dir: str = "${oc.env:TRAINER_CACHE_DIR,/tmp/trainer-cache}"  # gs:// inputs staged here
    sync_seconds: int = 60  # how often TensorBoard events are pushed to a gs:// output.dir
    feature_cache: str | None = "${storage.cache_dir}/features"  # shared by runs; gs://; null: off


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 42


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends, so Hydra type-checks every key."""
    ConfigStore.instance().store(name="schema", node=Config)


def _check(ok: bool, key: str, value: object, requirement: str) -> None:
    if not ok:
        raise TrainerError(f"{key}={value}: {requirement}")


def validate(cfg: DictConfig) -> None:
    """Raise TrainerError naming the first key whose value is out of range."""
    d, m, t, dist = cfg.data, cfg.model, cfg.train, cfg.distribute
    _check(
        d.train_dir not in (None, ""),
        "data.train_dir",
        d.train_dir,
        "is required: pass data.train_dir=PATH (a folder with one subfolder per class)",
    )
    _check(d.image_size >= 32, "data.image_size", d.image_size, "must be >= 32 (ResNet50's least)")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    if d.test_dir is None:
        _check(
            0.0 < d.validation_split < 1.0,
            "data.validation_split",
            d.validation_split,
            "must be between 0 and 1 (exclusive) when data.test_dir is null",
        )
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
    if t.min_accuracy is not None:
        _check(
            0.0 <= t.min_accuracy <= 1.0,
            "train.min_accuracy",
            t.min_accuracy,
            "must be between 0 and 1, or null",
        )
    # In memory, the features live inside the tf.data graph, which protobuf caps at 2 GB.
    _check(
        0 <= t.feature_cache_max_mb <= 1536,
        "train.feature_cache_max_mb",
        t.feature_cache_max_mb,
        "must be between 0 and 1536 (larger feature sets spill to disk, which is fine)",
    )
    _check(
        t.backup_every_steps >= 0,
        "train.backup_every_steps",
        t.backup_every_steps,
        "must be >= 0 (0: at the end of each epoch)",
    )
    _check(t.finetune_epochs >= 0, "train.finetune_epochs", t.finetune_epochs, "must be >= 0")
    _check(
        t.finetune_learning_rate > 0,
        "train.finetune_learning_rate",
        t.finetune_learning_rate,
        "must be > 0",
    )
    _check(
        t.precision in ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
        "train.precision",
        t.precision,
        "must be auto, float32, mixed_float16 or mixed_bfloat16",
    )
    _check(
        str(t.jit_compile).lower() in ("auto", "true", "false"),
        "train.jit_compile",
        t.jit_compile,
        "must be auto, true or false",
    )
    _check(dist.timeout_seconds >= 0, "distribute.timeout_seconds", dist.timeout_seconds, ">= 0")
    if dist.simulate_devices is not None:
        _check(
            dist.simulate_devices >= 1,
            "distribute.simulate_devices",
            dist.simulate_devices,
            "must be >= 1, or null",
        )
