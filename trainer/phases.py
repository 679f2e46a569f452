"""The training phases: the head (on cached features or on images), then optional fine-tuning.

Phase 1 trains the new head with the backbone frozen. Without live augmentation it runs on
cached features (trainer/features.py): the backbone runs once per image, which is exact and
where the speed comes from. Phase 2 (train.finetune_epochs) unfreezes the top of the backbone
and trains the whole model on images at a lower rate. Backups let a preempted pod's retry
resume (train.backup_every_steps); phase 1's end is also kept as full-model weights, so a retry
during fine-tuning skips phase 1 altogether.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainer.data import Split
from trainer.output import Output
from trainer.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What several phases share: where the run writes, how it is distributed, its data."""

    output: Output
    run_dir: RunDir  # output.dir's working folder on the chief, a private scratch folder else
    chief: bool
    strategy: Any  # a tf.distribute.Strategy
    classes: list[str]
    train: Split
    test: Split
    image_size: int
    batch: int  # the global batch: data.batch_size x replicas
    workers: tuple[int, int]  # (count, index): each worker decodes its own share of files
    jit_compile: bool | str
    seed: int
    serving_dtype: str = "float32"  # output.serving_dtype: what the export and the test compute in
    timings: dict[str, float] = field(default_factory=dict)
    feature_cache: str = "off"  # hit | miss | off: whether the backbone pass was skipped
    # {local path: digest} of files staged from gs:// (their listing's size and CRC32C): the
    # feature cache's key without reading the files again; other files are hashed.
    digests: dict[str, str] = field(default_factory=dict)
    # Each worker staged only the images it owns (trainer.data.owner): it must decode no other.
    sharded_staging: bool = False


@dataclass(frozen=True)
class Schedule:
    """The phases train.* asks for."""

    epochs: int
    learning_rate: float
    finetune_epochs: int
    finetune_from: str
    finetune_learning_rate: float
    backup_every_steps: int
    feature_cache_max_mb: int
    cache_features: bool  # data.augment=false: the head may train on cached features
    feature_cache: str | None  # storage.feature_cache: features shared across runs; None: off
    weights: str | None  # model.weights as staged (a local path, imagenet or None): in the key

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs


@dataclass(frozen=True)
class Images:
    """The image pipelines: training (shuffled, maybe augmented and sharded) and test."""

    train: Any
    test: Any
    steps_per_epoch: int | None  # set when each worker reads only its share of the files


@dataclass(frozen=True)
class Trained:
    """What the phases leave for the evaluation."""

    fast_path: bool  # the head was trained on cached features in this run
    test_features: np.ndarray | None  # still the backbone's output for the test set, or None


def image_pipelines(ctx: RunContext, *, augment: bool) -> Images:
    """Training and test pipelines; in multi-worker training each worker decodes only its own
    training files, if each gets a whole batch."""
    from trainer.data import image_dataset, worker_share, worker_steps

    count = ctx.workers[0]
    shard = ctx.workers if worker_share(len(ctx.train), ctx.batch, count) else (1, 0)
    steps = worker_steps(len(ctx.train), ctx.batch, shard[0]) if shard[0] > 1 else None
    if steps:
        log.info(
            "training images sharded by file: %d a worker an epoch, %d steps",
            worker_share(len(ctx.train), ctx.batch, shard[0]),
            steps,
        )
    train = image_dataset(
        ctx.train,
        ctx.image_size,
        ctx.batch,
        shuffle=True,
        augment=augment,
        seed=ctx.seed,
        shard=shard,
    )
    return Images(train, image_dataset(ctx.test, ctx.image_size, ctx.batch), steps)


def train_phases(
    ctx: RunContext, *, model, augment: bool, schedule: Schedule, time_limit
) -> Trained:
    """Phase 1 (resumed from its saved end, on cached features, or on images), then the
    optional fine-tuning (skipped once `time_limit`, train.max_hours, is reached); returns
    what the evaluation may reuse. The image pipelines (`augment`: data.augment) are built
    only for a phase that trains on images."""
    import keras

    from trainer.train import fit

    sync = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ctx.output.sync())
    # What every phase shares; each call adds its data, rate, epochs and backup folder.
    fit_phase = functools.partial(
        fit,
        total_epochs=schedule.total_epochs,
        log_dir=ctx.run_dir.tensorboard,
        extra_callbacks=[sync, time_limit],
        backup_every_steps=schedule.backup_every_steps,
        jit_compile=ctx.jit_compile,
    )

    @functools.cache  # built on first use: both phases share them
    def pipelines() -> Images:
        return image_pipelines(ctx, augment=augment)

    def fit_images(**phase):
        """The full model on the image pipelines: the head phase with augmentation, fine-tuning."""
        images = pipelines()
        return fit_phase(
            model, images.train, images.test, steps_per_epoch=images.steps_per_epoch, **phase
        )

    phase1_done = ctx.run_dir.phase1_done
    if schedule.finetune_epochs and os.path.exists(phase1_done):
        model.load_weights(phase1_done)
        log.info("phase 1 finished before a restart: resuming from %s", phase1_done)
        trained = Trained(fast_path=False, test_features=None)
    elif schedule.cache_features:
        trained = _head_on_features(ctx, model=model, fit_phase=fit_phase, schedule=schedule)
    else:
        _head_on_images(ctx, model=model, fit_images=fit_images, schedule=schedule)
        trained = Trained(fast_path=False, test_features=None)
    if not schedule.finetune_epochs or time_limit.reached:
        return trained
    _finetune(ctx, model=model, fit_images=fit_images, schedule=schedule)
    # The backbone changed: cached features no longer match, the evaluation runs on images.
    return dataclasses.replace(trained, test_features=None)


def _head_on_features(ctx: RunContext, *, model, fit_phase, schedule: Schedule) -> Trained:
    from trainer.features import feature_dataset
    from trainer.model import set_feature_statistics

    log.info("fast path: frozen backbone, no augmentation -> backbone runs once per image")
    features = _backbone_features(ctx, model=model, schedule=schedule)
    # The head standardizes features with the training set's statistics (trainer/model.py).
    set_feature_statistics(model, features["train"])
    started = time.perf_counter()
    fit_phase(
        model.get_layer("head"),
        feature_dataset(
            features["train"],
            ctx.train.labels,
            ctx.batch,
            shuffle=True,
            seed=ctx.seed,
            epochs=schedule.epochs,
        ),
        feature_dataset(features["test"], ctx.test.labels, ctx.batch),
        learning_rate=schedule.learning_rate,
        epochs=schedule.epochs,
        initial_epoch=0,
        steps_per_epoch=-(-len(ctx.train) // ctx.batch),
        phase="head on cached features",
        backup_dir=ctx.run_dir.head_backup,
    )
    ctx.timings["head_s"] = time.perf_counter() - started
    return Trained(fast_path=True, test_features=features["test"])


def _backbone_features(ctx: RunContext, *, model, schedule: Schedule) -> dict[str, np.ndarray]:
    """{"train": ..., "test": ...}: each split's pooled features, from storage.feature_cache or
    one backbone pass; records whether the cache had them all and the seconds it took. The test
    set's come from the backbone as the export serves it (output.serving_dtype), so the test
    accuracy is the exported model's; the training set's from the backbone in training."""
    from trainer.features import extract_features
    from trainer.model import feature_extractor, serving_model

    started = time.perf_counter()
    models = {"train": model, "test": None}  # the serving model is built on first use only

    def source(name: str):
        if models[name] is None:
            with ctx.strategy.scope():
                models[name] = serving_model(model, ctx.serving_dtype)
        return models[name]

    extractors = {}  # built on a miss only: a run whose features are all cached needs none

    def backbone_pass(name: str, split: Split) -> np.ndarray:
        if name not in extractors:
            with ctx.strategy.scope():
                extractors[name] = feature_extractor(source(name))
                extractors[name].compile(jit_compile=ctx.jit_compile)  # predict() follows this
        features = extract_features(
            extractors[name],
            split,
            ctx.image_size,
            ctx.batch,
            schedule.feature_cache_max_mb,
            ctx.run_dir.feature_cache,
            name,
            ctx.workers,
        )
        check_finite(features, what=f"the backbone's features of the {name} set")
        return features

    key_of = _key_of(ctx, schedule=schedule) if schedule.feature_cache else None
    features, hits = {}, []
    for name, split in (("train", ctx.train), ("test", ctx.test)):
        features[name], hit = _cached_features(
            ctx,
            name=name,
            split=split,
            schedule=schedule,
            key=key_of(split, model if name == "train" else None) if key_of else None,
            compute=backbone_pass,
        )
        hits.append(hit)
    if schedule.feature_cache:
        ctx.feature_cache = "hit" if all(hits) else "miss"
    ctx.timings["backbone_pass_s"] = time.perf_counter() - started
    return features


def check_finite(values: np.ndarray, *, what: str, chunk: int = 4096) -> None:
    """Diverged (exit 6) naming `what` if any of `values` (an array or a spilled memmap, read
    chunk by chunk) is NaN or infinite: no model trained on or judged by them is exported."""
    from trainer import Diverged

    bad = sum(
        int(np.count_nonzero(~np.isfinite(values[lo : lo + chunk])))
        for lo in range(0, len(values), chunk)
    )
    if bad:
        raise Diverged(f"{what}: {bad} non-finite value(s) (NaN or inf); nothing exported")


def _key_of(ctx: RunContext, *, schedule: Schedule):
    """(split, the model computing its features, or None for the serving model) -> its
    feature cache key. What the splits share is computed once: the weights' digest reads the
    whole weights file."""
    from trainer import feature_cache
    from trainer.model import SERVING_KIND, backbone_kind

    weights = feature_cache.weights_digest(schedule.weights, seed=ctx.seed)

    def key(split: Split, model) -> str:
        return feature_cache.feature_key(
            files=feature_cache.file_digests(split.files, known=ctx.digests),
            weights=weights,
            image_size=ctx.image_size,
            precision=model.get_layer("backbone").compute_dtype if model else ctx.serving_dtype,
            backbone=backbone_kind(model) if model else SERVING_KIND,
        )

    return key


def _cached_features(
    ctx: RunContext, *, name: str, split: Split, schedule: Schedule, key: str | None, compute
):
    """(features of `split`, whether storage.feature_cache had them). One worker: the cache's
    claim-or-wait protocol. Several: the backbone pass is a collective, so all workers agree
    on hit or miss first (a hit only if every worker found the entry), and the chief stores
    what they computed together."""
    from trainer import feature_cache
    from trainer.model import FEATURES

    if not schedule.feature_cache:
        return compute(name, split), False
    uri = schedule.feature_cache
    load = {
        "rows": len(split),
        "local_dir": ctx.run_dir.feature_cache,
        "mmap": len(split) * FEATURES * 4 > schedule.feature_cache_max_mb * 2**20,
    }
    if ctx.workers[0] == 1:
        features, hit = feature_cache.cached_features(
            uri, key, lambda: compute(name, split), **load
        )
    else:
        with feature_cache.cache_errors(uri):
            found = feature_cache.lookup(uri, key, **load)
        hit = _on_every_worker(ctx.strategy, found is not None)
        features = found if hit else compute(name, split)
        if not hit and ctx.chief:
            with feature_cache.cache_errors(uri):
                feature_cache.store(uri, key, features)
    if hit:
        log.info(
            "features of the %s set from the feature cache: %d x %d, %s/%s.npy"
            " (backbone pass skipped)",
            name,
            len(split),
            FEATURES,
            uri,
            key,
        )
    elif ctx.chief:
        log.info("feature cache: the %s set's features stored as %s/%s.npy", name, uri, key)
    return features, hit


def _on_every_worker(strategy, flag: bool) -> bool:
    """Whether `flag` holds on every worker (an all-reduce: every worker must call this)."""
    return not any_worker(strategy, np.asarray([0.0 if flag else 1.0], dtype=np.float32))[0]


def any_worker(strategy, flags: np.ndarray) -> np.ndarray:
    """Element by element, whether any worker set the flag (float32 0/1): an all-reduce, so
    every worker must call this with flags of the same shape."""
    import tensorflow as tf

    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(flags)), axis=None
    )
    return np.asarray(total) > 0


def _head_on_images(ctx: RunContext, *, model, fit_images, schedule: Schedule) -> None:
    from trainer.features import sample_features
    from trainer.model import set_feature_statistics

    log.info("full forward each step (data.augment=true)")
    started = time.perf_counter()
    # The head's standardization statistics, from one un-augmented pass over a sample.
    sample = sample_features(
        model,
        ctx.train,
        ctx.image_size,
        ctx.batch,
        seed=ctx.seed,
        workers=ctx.workers,
        jit_compile=ctx.jit_compile,
    )
    set_feature_statistics(model, sample)
    log.info("feature statistics from %d un-augmented training images", len(sample))
    fit_images(
        learning_rate=schedule.learning_rate,
        epochs=schedule.epochs,
        initial_epoch=0,
        phase="head",
        backup_dir=ctx.run_dir.head_backup,
    )
    ctx.timings["head_s"] = time.perf_counter() - started


def _finetune(ctx: RunContext, *, model, fit_images, schedule: Schedule) -> None:
    from trainer.model import unfreeze_from

    phase1_done = ctx.run_dir.phase1_done
    if not os.path.exists(phase1_done):
        os.makedirs(ctx.run_dir.backup, exist_ok=True)
        model.save_weights(phase1_done)
        ctx.output.sync()
    started = time.perf_counter()
    with ctx.strategy.scope():
        unfrozen = unfreeze_from(model, schedule.finetune_from)
    log.info(
        "fine-tuning: %d backbone layers from %s unfrozen (BatchNorm stays frozen), lr %g",
        unfrozen,
        schedule.finetune_from,
        schedule.finetune_learning_rate,
    )
    fit_images(
        learning_rate=schedule.finetune_learning_rate,
        epochs=schedule.finetune_epochs,
        initial_epoch=schedule.epochs,
        phase="fine-tune",
        backup_dir=ctx.run_dir.finetune_backup,
    )
    ctx.timings["finetune_s"] = time.perf_counter() - started
