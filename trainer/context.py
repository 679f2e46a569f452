"""What the job's steps share, built once by `run` (trainer/job.py) and then only read.

`RunContext`: where this worker writes, how the run is distributed, its settled data.
`Schedule`: the training phases the config asks for. Neither changes after it is built: a
step's own results (a phase's timings, whether the feature cache had the features) are what
that step returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from omegaconf import DictConfig

from trainer.cluster import Cluster
from trainer.data import Split, hold_out
from trainer.output import Output
from trainer.rundir import RunDir

log = logging.getLogger(__name__)


class Runtime(NamedTuple):
    """The tf.distribute strategy and the cluster it trains in (one machine outside
    multi-worker training): parsed once, when the strategy is chosen (trainer/job.py)."""

    strategy: Any
    cluster: Cluster


class Settled(NamedTuple):
    """The images the run trains and tests on: the classes, the training and test files
    without the undecodable ones (the same on every worker), and {path: digest} of the listed
    files (the bad-image scan's, for the feature cache's keys)."""

    classes: list[str]
    train: Split
    test: Split
    digests: dict[str, str]


@dataclass(frozen=True)
class RunContext:
    """What several steps share: where the run writes, how it is distributed, its data."""

    output: Output
    run_dir: RunDir  # output.dir's working folder on the chief, a private scratch folder else
    cluster: Cluster  # the cluster the strategy trains in (one machine outside multi-worker)
    strategy: Any  # a tf.distribute.Strategy
    classes: list[str]
    train: Split  # the undecodable images left out, the same files on every worker
    test: Split
    validation: Split | None  # held out of the training files for fine-tuning to monitor
    image_size: int
    batch: int  # the global batch: data.batch_size x replicas
    jit_compile: bool | str
    seed: int
    serving_dtype: str = "float32"  # output.serving_dtype: what the export and the test compute in
    # {local path: digest} of the listed files: from a gs:// listing (size and CRC32C) or hashed
    # once by the bad-image scan; the feature cache's key without reading the files again.
    digests: dict[str, str] = field(default_factory=dict)
    # Each worker staged only the images it owns (trainer.data.owner): it must decode no other.
    sharded_staging: bool = False

    @property
    def chief(self) -> bool:
        """Whether this worker writes output.dir."""
        return self.cluster.chief

    @property
    def workers(self) -> tuple[int, int]:
        """(count, index): each worker decodes its own share of the files."""
        return self.cluster.workers, self.cluster.index


@dataclass(frozen=True)
class Schedule:
    """The phases train.* asks for."""

    epochs: int
    head_min_steps: int  # optimizer steps of the head on cached features, at least
    learning_rate: float
    finetune_epochs: int
    finetune_from: str
    finetune_learning_rate: float
    backup_every_steps: int
    spill_above_mb: int  # train.feature_cache_max_mb: bigger features and decoded pixels spill
    augment: bool  # data.augment: the head trains on images, else on the backbone's features
    finetune_augment: bool  # train.finetune_augment: fine-tuning's images augmented
    cache_uri: str | None  # storage.feature_cache: features shared across runs; None: off
    weights: str | None  # model.weights as staged (a local path, imagenet or None): in the key

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs


def context_of(
    cfg: DictConfig,
    *,
    output: Output,
    run_dir: RunDir,
    runtime: Runtime,
    images: Settled,
    share: tuple[int, int],
) -> RunContext:
    """What the steps from `images` on share, built once: the global batch (data.batch_size x
    replicas, logged), XLA as train.jit_compile resolves for the strategy, and whether this
    worker's `share` of the images is all it staged."""
    from trainer.distribute import choose_jit_compile

    strategy, cluster = runtime
    replicas = strategy.num_replicas_in_sync
    train, validation = images.train, None
    held = cfg.train.finetune_validation_split
    if cfg.train.finetune_epochs and held:
        key = "train.finetune_validation_split"
        train, validation = hold_out(images.train, share=held, seed=cfg.seed, key=key)
        log.info("validation set: %d training images held out (%s)", len(validation), key)
    batch = cfg.data.batch_size * replicas
    log.info(
        "batch size: %d per replica x %d replica(s) = %d", cfg.data.batch_size, replicas, batch
    )
    return RunContext(
        output=output,
        run_dir=run_dir,
        cluster=cluster,
        strategy=strategy,
        classes=images.classes,
        train=train,
        test=images.test,
        validation=validation,
        image_size=cfg.data.image_size,
        batch=batch,
        jit_compile=choose_jit_compile(cfg.train.jit_compile, strategy),
        seed=cfg.seed,
        serving_dtype=cfg.output.serving_dtype.value,
        digests=images.digests,
        sharded_staging=share[0] > 1,
    )


def schedule_of(cfg: DictConfig, *, weights: str | None) -> Schedule:
    """The training phases as train.*, data.augment and storage.feature_cache ask for them;
    `weights`: model.weights as staged (part of the feature cache's key)."""
    t = cfg.train
    return Schedule(
        epochs=t.epochs,
        head_min_steps=t.head_min_steps,
        learning_rate=t.learning_rate,
        finetune_epochs=t.finetune_epochs,
        finetune_from=t.finetune_from,
        finetune_learning_rate=t.finetune_learning_rate,
        backup_every_steps=t.backup_every_steps,
        spill_above_mb=t.feature_cache_max_mb,
        augment=cfg.data.augment,  # augmentation changes the features every epoch
        finetune_augment=cfg.train.finetune_augment or cfg.data.augment,
        cache_uri=cfg.storage.feature_cache,
        weights=weights,
    )
