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
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer import feature_cache
from trainer.context import RunContext, Schedule
from trainer.data import Split
from trainer.timings import Stopwatch

log = logging.getLogger(__name__)


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
    cache_outcome: str = "off"  # hit | miss | off: whether storage.feature_cache had them all
    finetuned: dict | None = None  # fine-tuning's report for metrics.json (`_finetune`)


def image_pipelines(ctx: RunContext, *, augment: bool, cache_max_mb: int) -> Images:
    """Training and test pipelines, each image decoded once and its pixels kept for the
    later epochs (in memory up to `cache_max_mb` a split, train.feature_cache_max_mb, else
    in the run's pixel spill); in multi-worker training each worker decodes only its own
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
        cache=pixel_cache(ctx, name="train", max_mb=cache_max_mb),
    )
    test = image_dataset(
        ctx.test,
        ctx.image_size,
        ctx.batch,
        cache=pixel_cache(ctx, name="test", max_mb=cache_max_mb),
    )
    return Images(train, test, steps)


def pixel_cache(ctx: RunContext, *, name: str, max_mb: int):
    """Where split `name`'s decoded pixels are kept: memory up to `max_mb`, else its file in
    the run's pixel spill folder."""
    from trainer.data import PixelCache

    return PixelCache(max_mb=max_mb, path=ctx.run_dir.pixel_spill(name))


def train_phases(
    ctx: RunContext, *, model, schedule: Schedule, time_limit, clock: Stopwatch
) -> Trained:
    """Phase 1 (resumed from its saved end, on cached features, or on images), then the
    optional fine-tuning (skipped once `time_limit`, train.max_hours, is reached); returns
    what the evaluation may reuse. The image pipelines are built only for a phase that trains
    on images. Each phase records its seconds on `clock`."""
    import keras

    from trainer.model import set_head_penalty
    from trainer.train import Training, fit

    set_head_penalty(model, train_size=len(ctx.train))  # every phase trains with it

    sync = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ctx.output.sync())
    training = Training(
        total_epochs=schedule.total_epochs,
        log_dir=ctx.run_dir.tensorboard,
        backup_every_steps=schedule.backup_every_steps,
        callbacks=(sync, time_limit),
        jit_compile=ctx.jit_compile,
    )
    fit_phase = functools.partial(fit, training=training)

    @functools.cache  # built on first use: both phases share them when both augment alike
    def pipelines(augment: bool) -> Images:
        return image_pipelines(ctx, augment=augment, cache_max_mb=schedule.spill_above_mb)

    def fit_images(phase, *, augment: bool, validation=None):
        """The full model on the image pipelines: the head phase with augmentation, fine-tuning
        (evaluated on `validation`, a dataset, instead of the test set when given)."""
        images = pipelines(augment)
        return fit_phase(
            model,
            images.train,
            images.test if validation is None else validation,
            phase=phase,
            steps_per_epoch=images.steps_per_epoch,
        )

    phases = {"model": model, "schedule": schedule, "clock": clock}
    phase1_done = ctx.run_dir.phase1_done
    if schedule.finetune_epochs and os.path.exists(phase1_done):
        model.load_weights(phase1_done)
        log.info("phase 1 finished before a restart: resuming from %s", phase1_done)
        trained = Trained(fast_path=False, test_features=None)
    elif not schedule.augment:
        trained = _head_on_features(ctx, fit_phase=fit_phase, **phases)
    else:
        _head_on_images(ctx, fit_images=fit_images, **phases)
        trained = Trained(fast_path=False, test_features=None)
    if not schedule.finetune_epochs or time_limit.reached:
        return trained
    phase1 = _accuracy(ctx, model=model, split=ctx.test, features=trained.test_features)
    finetuned = _finetune(ctx, fit_images=fit_images, **phases)
    # The backbone changed: cached features no longer match, the evaluation runs on images.
    return dataclasses.replace(
        trained, test_features=None, finetuned={"phase1_test_accuracy": phase1, **finetuned}
    )


def predictions(ctx: RunContext, *, model, split: Split, features=None) -> np.ndarray:
    """`model`'s class probabilities for `split`, in order, on every worker: from its cached
    `features` through the head (the backbone unchanged since), else from its images through
    the whole model."""
    from trainer.features import predict_files
    from trainer.train import predict_in_batches

    if features is not None:
        return np.asarray(predict_in_batches(model.get_layer("head"), features, ctx.batch))
    return np.asarray(
        predict_files(
            model, split, image_size=ctx.image_size, batch_size=ctx.batch, workers=ctx.workers
        )
    )


def _accuracy(ctx: RunContext, *, model, split: Split, features=None) -> float:
    probabilities = predictions(ctx, model=model, split=split, features=features)
    return float(np.mean(probabilities.argmax(axis=1) == split.labels))


def _head_on_features(
    ctx: RunContext, *, model, fit_phase, schedule: Schedule, clock: Stopwatch
) -> Trained:
    from trainer.features import feature_dataset, passes_per_epoch
    from trainer.model import set_feature_statistics
    from trainer.train import AgreeOnWeights, Phase

    log.info("fast path: frozen backbone, no augmentation -> backbone runs once per image")
    clock.restart()
    features, outcome = _backbone_features(ctx, model=model, schedule=schedule)
    clock.lap("backbone_pass_s")
    # The head standardizes features with the training set's statistics (trainer/model.py).
    set_feature_statistics(model, features["train"])
    clock.restart()
    passes = passes_per_epoch(
        len(ctx.train),
        batch_size=ctx.batch,
        epochs=schedule.epochs,
        min_steps=schedule.head_min_steps,
    )
    if passes > 1:
        log.info(
            "each head epoch goes %d times over the cached features (train.head_min_steps=%d)",
            passes,
            schedule.head_min_steps,
        )
    steps_per_epoch = passes * -(-len(ctx.train) // ctx.batch)
    head = model.get_layer("head")
    trainee = _trainee(ctx, head=head)
    fit_phase(
        trainee,
        feature_dataset(
            features["train"],
            ctx.train.labels,
            ctx.batch,
            shuffle=True,
            seed=ctx.seed,
            epochs=schedule.epochs * passes,
        ),
        feature_dataset(features["test"], ctx.test.labels, ctx.batch),
        phase=Phase(
            "head on cached features",
            learning_rate=schedule.learning_rate,
            epochs=schedule.epochs,
            backup_dir=ctx.run_dir.head_backup,
            # each worker trained its own copy: the same weights on all of them at the end
            callbacks=(AgreeOnWeights(ctx.strategy),) if ctx.workers[0] > 1 else (),
            steps_per_execution=_steps_per_call(
                steps_per_epoch, backup_every=schedule.backup_every_steps
            ),
        ),
        steps_per_epoch=steps_per_epoch,
    )
    if trainee is not head:
        head.set_weights(trainee.get_weights())
    clock.lap("head_s")
    return Trained(fast_path=True, test_features=features["test"], cache_outcome=outcome)


def _steps_per_call(steps_per_epoch: int, *, backup_every: int, most: int = 64) -> int:
    """How many head steps on cached features one call of the compiled step runs: the largest
    number up to `most` that divides the epoch's steps (Keras would otherwise read past the
    epoch's end) and train.backup_every_steps (so backups land where asked). A step here is a
    few microseconds of compute and ~2 ms of Keras and callbacks around it; 64 at a time run
    the same steps in the same order, about twice as fast (trainer/train.py's callbacks, the
    SIGTERM check among them, then run every 64 steps: ~0.1 s)."""
    return max(
        d
        for d in range(1, most + 1)
        if steps_per_epoch % d == 0 and (not backup_every or backup_every % d == 0)
    )


def _trainee(ctx: RunContext, *, head):
    """What trains on the cached features: the model's own head on one device; with several
    replicas, a copy of it on this process' default device. Every worker holds every cached
    feature, so the head's convex little problem needs no replica: under tf.distribute each of
    its ~1,000 steps would be an all-reduce (21 ms a step between two workers on loopback against
    ~2 ms on one device), for a model of 2,048 x classes weights. The global batch is the same,
    so is the optimization; the copy's weights (agreed between the workers at the end of its
    `fit`: trainer/train.py's AgreeOnWeights) go back into the model after the phase."""
    if ctx.strategy.num_replicas_in_sync == 1:
        return head
    from trainer.model import local_copy

    return local_copy(head)


def _backbone_features(
    ctx: RunContext, *, model, schedule: Schedule
) -> tuple[dict[str, np.ndarray], str]:
    """({"train": ..., "test": ...}: each split's pooled features, from storage.feature_cache
    or one backbone pass; hit | miss | off: whether the cache had them all). The test set's
    come from the backbone as the export serves it (output.serving_dtype), so the test
    accuracy is the exported model's; the training set's from the backbone in training."""
    from trainer.features import extract_features, spills
    from trainer.model import feature_extractor, serving_model

    models = {"train": model, "test": None}  # the serving model is built on first use only
    extractors = {}  # built on a miss only: a run whose features are all cached needs none

    def source(name: str):
        if models[name] is None:
            with ctx.strategy.scope():
                models[name] = serving_model(model, ctx.serving_dtype)
        return models[name]

    def backbone_pass(name: str, split: Split) -> np.ndarray:
        if name not in extractors:
            with ctx.strategy.scope():
                extractors[name] = feature_extractor(source(name))
                extractors[name].compile(jit_compile=ctx.jit_compile)  # predict() follows this
        features = extract_features(
            extractors[name],
            split,
            image_size=ctx.image_size,
            batch_size=ctx.batch,
            spill_above_mb=schedule.spill_above_mb,
            spill_dir=ctx.run_dir.feature_spill,
            name=name,
            workers=ctx.workers,
        )
        check_finite(features, what=f"the backbone's features of the {name} set")
        return features

    splits = {"train": ctx.train, "test": ctx.test}
    if not schedule.cache_uri:
        return {name: backbone_pass(name, split) for name, split in splits.items()}, "off"
    cache, backbones = _feature_cache(ctx, model=model, schedule=schedule)
    features, hits = {}, []
    for name, split in splits.items():
        features[name], hit = feature_cache.split_features(
            cache,
            name=name,
            files=split.files,
            backbone=backbones[name],
            compute=functools.partial(backbone_pass, name, split),
            mmap=spills(len(split), spill_above_mb=schedule.spill_above_mb),
        )
        hits.append(hit)
    return features, "hit" if all(hits) else "miss"


def _feature_cache(ctx: RunContext, *, model, schedule: Schedule):
    """(This run's use of storage.feature_cache, {split: what computes its features}): the
    training set's come from `model`'s backbone, the test set's from the serving model's. The
    weights' digest is computed once: it reads the whole weights file."""
    from trainer.distribute import every_worker
    from trainer.model import SERVING_KIND, backbone_kind

    backbone = functools.partial(
        feature_cache.Backbone,
        weights=feature_cache.weights_digest(schedule.weights, seed=ctx.seed),
        image_size=ctx.image_size,
    )
    cache = feature_cache.RunCache(
        uri=schedule.cache_uri,
        spill_dir=ctx.run_dir.feature_spill,
        known=ctx.digests,
        every_worker=functools.partial(every_worker, ctx.strategy) if ctx.workers[0] > 1 else None,
        chief=ctx.chief,
    )
    return cache, {
        "train": backbone(
            precision=model.get_layer("backbone").compute_dtype, kind=backbone_kind(model)
        ),
        "test": backbone(precision=ctx.serving_dtype, kind=SERVING_KIND),
    }


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


def _head_on_images(
    ctx: RunContext, *, model, fit_images, schedule: Schedule, clock: Stopwatch
) -> None:
    from trainer.features import sample_features
    from trainer.model import set_feature_statistics
    from trainer.train import Phase

    log.info("full forward each step (data.augment=true)")
    clock.restart()
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
        Phase(
            "head",
            learning_rate=schedule.learning_rate,
            epochs=schedule.epochs,
            backup_dir=ctx.run_dir.head_backup,
        ),
        augment=schedule.augment,
    )
    clock.lap("head_s")


def _finetune(ctx: RunContext, *, model, fit_images, schedule: Schedule, clock: Stopwatch) -> dict:
    """Phase 2: the top of the backbone unfrozen, on images (augmented unless
    train.finetune_augment=false). With a validation set (train.finetune_validation_split), the
    epoch with the best validation accuracy, phase 1's end included, is the one kept. Returns
    metrics.json's report of it."""
    from trainer.data import image_dataset
    from trainer.model import unfreeze_from
    from trainer.train import KeepBest, Phase

    phase1_done = ctx.run_dir.phase1_done
    if not os.path.exists(phase1_done):
        os.makedirs(ctx.run_dir.backup, exist_ok=True)
        model.save_weights(phase1_done)
        ctx.output.sync()
    clock.restart()
    validation, keep = None, ()
    if ctx.validation is not None:
        validation = image_dataset(
            ctx.validation,
            ctx.image_size,
            ctx.batch,
            cache=pixel_cache(ctx, name="validation", max_mb=schedule.spill_above_mb),
        )
        keep = (KeepBest(baseline=_accuracy(ctx, model=model, split=ctx.validation)),)
    with ctx.strategy.scope():
        unfrozen = unfreeze_from(model, schedule.finetune_from)
    log.info(
        "fine-tuning: %d backbone layers from %s unfrozen (BatchNorm stays frozen), lr %g%s",
        unfrozen,
        schedule.finetune_from,
        schedule.finetune_learning_rate,
        ", augmented" if schedule.finetune_augment else "",
    )
    fit_images(
        Phase(
            "fine-tune",
            learning_rate=schedule.finetune_learning_rate,
            epochs=schedule.finetune_epochs,
            initial_epoch=schedule.epochs,
            backup_dir=ctx.run_dir.finetune_backup,
            callbacks=keep,
            evaluates="test" if validation is None else "validation",
        ),
        augment=schedule.finetune_augment,
        validation=validation,
    )
    clock.lap("finetune_s")
    if not keep:
        return {}
    best = keep[0]
    return {
        "num_validation": len(ctx.validation),
        "phase1_validation_accuracy": best.baseline,
        "finetune_best_epoch": best.best_epoch,
        "finetune_best_validation_accuracy": best.best,
    }
