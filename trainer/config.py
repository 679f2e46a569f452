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


class Precision(Enum):
    auto = "auto"
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class ServingDtype(Enum):
    """What the exported backbone computes in, whatever train.precision was."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class JitCompile(Enum):
    """XLA on/off. Hydra parses `=true`/`=false` as booleans, which OmegaConf will not take for
    an Enum; `enum_overrides` turns them back into these names before Hydra composes."""

    auto = "auto"
    true = "true"
    false = "false"


@dataclass
class DataConfig:
    train_dir: str | None = None  # local or gs://, one subfolder per class (JPEG, PNG, BMP, GIF)
    test_dir: str | None = None  # null: validation_split of train_dir is held out (seeded)
    validation_split: float = 0.2  # only used when test_dir is null
    image_size: int = 224  # ResNet50's native size; 32-64 px for quick tests and demos
    batch_size: int = 32  # per replica: the global batch is batch_size x replicas
    augment: bool = False  # true: random flip/rotation/zoom, but the backbone then runs each step
    on_bad_image: BadImagePolicy = BadImagePolicy.skip  # skip: listed in the log; fail: exit 2


@dataclass
class ModelConfig:
    weights: str | None = "imagenet"  # null: random init (tests, demos); or a *_notop.h5 path
    dropout: float = 0.2  # before the head; raise it if the head overfits a small dataset


@dataclass
class TrainConfig:
    epochs: int = 10  # head epochs; cheap on cached features, so more is rarely a cost problem
    head_min_steps: int = 1000  # cached features: epochs repeat the data up to this many steps
    learning_rate: float = 1e-3  # Adam, for the head
    min_accuracy: float | None = None  # below it: metrics written, no export, exit code 3
    max_hours: float | None = None  # per-run limit: stop, evaluate, no export, exit 5 (sweeps)
    feature_cache_max_mb: int = 1024  # MB; bigger features spill to the local run folder, not gs://
    finetune_epochs: int = 0  # > 0: a second phase that unfreezes the backbone from finetune_from
    finetune_from: str = "conv5_block1_1_conv"  # ResNet50's last stage; earlier layers overfit
    finetune_learning_rate: float = 1e-5  # low, so the pretrained features are nudged, not lost
    finetune_validation_split: float = 0.2  # of each class, held out; phase 2 keeps its best epoch
    finetune_augment: bool = True  # augmentation during fine-tuning (data.augment: in phase 1 too)
    backup_every_steps: int = 0  # 0: back up at each epoch's end; N: every N steps (long epochs)
    precision: Precision = Precision.auto  # auto: measured per device, see docs/distributed.md
    jit_compile: JitCompile = JitCompile.auto  # XLA; auto: on GPUs only (slower on CPUs)


@dataclass
class DistributeConfig:
    strategy: Strategy = Strategy.auto  # auto: multi_worker in a cluster, mirrored on >1 GPU
    simulate_devices: int | None = None  # N: split the CPU in N devices to try mirrored locally
    timeout_seconds: int = 600  # multi_worker: give up on a worker lost this long (0: never)


@dataclass
class OutputConfig:
    dir: str = "${hydra:runtime.output_dir}"  # local or gs://; each run and sweep job its own
    overwrite: bool = False  # true: replace a finished run's outputs in dir
    serving_dtype: ServingDtype = ServingDtype.float32  # the export's; float32 serves anywhere


@dataclass
class StorageConfig:
    cache_dir: str = "${oc.env:TRAINER_CACHE_DIR,/tmp/trainer-cache}"  # gs:// inputs staged here
    sync_seconds: int = 60  # how often TensorBoard events reach a gs:// output.dir (0: epoch ends)
    feature_cache: str | None = "${storage.cache_dir}/features"  # shared by runs; gs://; null: off


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 42  # splits, shuffling, initial weights and augmentation


def register_configs() -> None:
    """Register the schema that conf/config.yaml extends, so Hydra type-checks every key."""
    ConfigStore.instance().store(name="schema", node=Config)


# Keys whose Enum has members named true/false, which Hydra's override parser reads as booleans.
_BOOLEAN_NAMED_ENUMS = ("train.jit_compile",)


def enum_overrides(overrides: list[str]) -> list[str]:
    """`overrides` with `train.jit_compile=true` (also `=false`, `=True`, sweeps `=true,false`)
    quoted as strings, so Hydra hands the JitCompile Enum a name instead of a boolean."""
    fixed = []
    for override in overrides:
        key, sep, value = override.partition("=")
        words = value.split(",")
        if sep and key.lstrip("+~") in _BOOLEAN_NAMED_ENUMS and all(w.isalpha() for w in words):
            override = key + "=" + ",".join(f"'{w.lower()}'" for w in words)
        fixed.append(override)
    return fixed


def _check(ok: bool, key: str, value: object, requirement: str) -> None:
    if not ok:
        raise TrainerError(f"{key}={value}: {requirement}")


def validate(cfg: DictConfig) -> None:
    """Raise TrainerError naming the first key whose value is out of range."""
    _validate_data(cfg.data)
    _check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", cfg.model.dropout, "must be in [0, 1)")
    _validate_train(cfg.train)
    _validate_distribute(cfg.distribute)


def _validate_data(d: DictConfig) -> None:
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


def _validate_train(t: DictConfig) -> None:
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(t.head_min_steps >= 0, "train.head_min_steps", t.head_min_steps, "must be >= 0")
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
        0.0 <= t.finetune_validation_split < 1.0,
        "train.finetune_validation_split",
        t.finetune_validation_split,
        "must be in [0, 1) (0: no validation set, the last epoch is kept)",
    )
    _check(
        t.finetune_learning_rate > 0,
        "train.finetune_learning_rate",
        t.finetune_learning_rate,
        "must be > 0",
    )
    if t.max_hours is not None:
        _check(t.max_hours > 0, "train.max_hours", t.max_hours, "must be > 0, or null")


def _validate_distribute(dist: DictConfig) -> None:
    _check(dist.timeout_seconds >= 0, "distribute.timeout_seconds", dist.timeout_seconds, ">= 0")
    if dist.simulate_devices is not None:
        _check(
            dist.simulate_devices >= 1,
            "distribute.simulate_devices",
            dist.simulate_devices,
            "must be >= 1, or null",
        )
