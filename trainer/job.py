"""`run(cfg) -> dict`: the whole job, top to bottom. Tests call this; `__main__` adds Hydra.

image folders -> validated file lists -> (frozen backbone once -> cached features -> head)
or (full forward each step, with augmentation) -> optional fine-tuning of the top blocks
-> evaluation, TensorBoard report -> SavedModel + labels + metrics + config -> _SUCCESS
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time

from omegaconf import DictConfig, OmegaConf

from trainer import BelowMinAccuracy
from trainer.config import validate
from trainer.data import drop_bad_images, load_splits
from trainer.storage import BACKUP, Output, stage_dir, stage_file

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train and export as `cfg` says; return the metrics written to metrics.json."""
    started = time.perf_counter()
    validate(cfg)
    d, m, s = cfg.data, cfg.model, cfg.storage
    output = Output(str(cfg.output.dir), cfg.output.overwrite, s.cache_dir, s.sync_seconds)
    output.check()  # read-only here: only the chief may clear anything, and it is not known yet
    train_dir = stage_dir(d.train_dir, s.cache_dir, "data.train_dir")
    test_dir = None if d.test_dir is None else stage_dir(d.test_dir, s.cache_dir, "data.test_dir")
    weights = m.weights
    if weights not in (None, "imagenet"):
        weights = stage_file(weights, s.cache_dir, "model.weights")
    classes, train, test = load_splits(train_dir, test_dir, d.validation_split, cfg.seed)
    log.info(
        "found %d classes %s: %d training and %d test images",
        len(classes),
        classes,
        len(train),
        len(test),
    )

    # TensorFlow is imported only now: config and folder errors above answer in a second.
    import keras

    from trainer.distribute import choose_precision, choose_strategy, is_chief
    from trainer.train import SIGTERM

    # Before this, SIGTERM's default action ends the process; from here on it ends training
    # at a step boundary with a backup written (see trainer/train.py).
    SIGTERM.install()

    # The strategy first: simulated devices and the multi-worker runtime must be set up before
    # TensorFlow runs anything (seeding included).
    dist = cfg.distribute
    strategy = choose_strategy(dist.strategy.value, dist.simulate_devices, dist.timeout_seconds)
    keras.utils.set_random_seed(cfg.seed)
    choose_precision(cfg.train.precision)
    chief = is_chief(strategy)
    # Only the chief writes output.dir; other workers write to a private directory, removed at
    # the end (Keras' callbacks and the export need somewhere to write on every worker).
    if chief:
        output.prepare()
    out_dir = output.local_dir if chief else tempfile.mkdtemp(prefix="trainer-worker-")
    if not chief and output.fetch_backup(out_dir):  # resume where the chief resumes
        log.info("worker resumes from the backup in %s", cfg.output.dir)
    try:
        return _train_and_export(
            cfg, output, out_dir, chief, strategy, classes, train, test, weights, started
        )
    finally:
        output.close()
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)


def _train_and_export(
    cfg, output, out_dir, chief, strategy, classes, train, test, weights, started
) -> dict:
    import keras
    import numpy as np

    from trainer import tensorboard
    from trainer.data import image_dataset, worker_share, worker_steps
    from trainer.distribute import choose_jit_compile, worker_shard
    from trainer.export import export_saved_model, write_run_files
    from trainer.features import extract_features, feature_dataset, predict_files, sample_features
    from trainer.model import (
        build_model,
        feature_extractor,
        finetune_start,
        set_feature_statistics,  # issue 10
        unfreeze_from,
    )
    from trainer.train import evaluate, fit, predict_in_batches

    d, m, t = cfg.data, cfg.model, cfg.train
    fail = d.on_bad_image.value == "fail"
    train = drop_bad_images(train, "training", fail)
    test = drop_bad_images(test, "test", fail)

    replicas = strategy.num_replicas_in_sync
    batch = d.batch_size * replicas
    log.info("batch size: %d per replica x %d replica(s) = %d", d.batch_size, replicas, batch)
    workers = worker_shard(strategy)  # (count, index): each worker decodes its share of files
    jit_compile = choose_jit_compile(t.jit_compile, strategy)
    log_dir = os.path.join(out_dir, "tensorboard")
    timings: dict[str, float] = {}
    sync = [keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: output.sync())]

    with strategy.scope():
        model = build_model(len(classes), d.image_size, weights, m.dropout, cfg.seed)
    if t.finetune_epochs:
        finetune_start(model, t.finetune_from)  # a bad layer name fails now, not after phase 1
    # Multi-worker: each worker decodes only its own training files, if each gets a whole batch.
    shard = workers if worker_share(len(train), batch, workers[0]) else (1, 0)
    image_steps = worker_steps(len(train), batch, shard[0]) if shard[0] > 1 else None
    if image_steps:
        log.info(
            "training images sharded by file: %d a worker an epoch, %d steps",
            worker_share(len(train), batch, shard[0]),
            image_steps,
        )
    train_images = image_dataset(
        train, d.image_size, batch, shuffle=True, augment=d.augment, seed=cfg.seed, shard=shard
    )
    test_images = image_dataset(test, d.image_size, batch)
    sample_x, sample_y = next(iter(train_images.take(1)))
    tensorboard.write_sample_batch(log_dir, sample_x[:16], sample_y[:16].numpy(), classes)

    fast_path = not d.augment
    total_epochs = t.epochs + t.finetune_epochs
    # Backups let a preempted pod's retry resume (train.backup_every_steps). Phase 1's end is
    # kept as full-model weights, so a retry during fine-tuning skips phase 1 altogether.
    backup_root = os.path.join(out_dir, BACKUP)
    phase1_done = os.path.join(backup_root, "phase1_done.weights.h5")
    # What every training phase shares; each call adds its data, rate, epochs and backup folder.
    train_phase = functools.partial(
        fit,
        total_epochs=total_epochs,
        log_dir=log_dir,
        extra_callbacks=sync,
        backup_every_steps=t.backup_every_steps,
        jit_compile=jit_compile,
    )
    phase_started = time.perf_counter()
    if t.finetune_epochs and os.path.exists(phase1_done):
        model.load_weights(phase1_done)
        fast_path = False  # the final evaluation runs on images: the backbone will change
        log.info("phase 1 finished before a restart: resuming from %s", phase1_done)
    elif fast_path:
        log.info("fast path: frozen backbone, no augmentation -> backbone runs once per image")
        with strategy.scope():
            extractor = feature_extractor(model)
            extractor.compile(jit_compile=jit_compile)  # predict() follows this setting
        spill = os.path.join(out_dir, ".feature_cache")
        features = {
            name: extract_features(
                extractor, split, d.image_size, batch, t.feature_cache_max_mb, spill, name, workers
            )
            for name, split in (("train", train), ("test", test))
        }
        timings["backbone_pass_s"] = time.perf_counter() - phase_started
        # issue 10: the head standardizes features with the training set's statistics.
        set_feature_statistics(model, features["train"])
        phase_started = time.perf_counter()
        head = model.get_layer("head")
        train_phase(
            head,
            feature_dataset(
                features["train"], train.labels, batch, shuffle=True, seed=cfg.seed, epochs=t.epochs
            ),
            feature_dataset(features["test"], test.labels, batch),
            learning_rate=t.learning_rate,
            epochs=t.epochs,
            initial_epoch=0,
            steps_per_epoch=-(-len(train) // batch),
            phase="head on cached features",
            backup_dir=os.path.join(backup_root, "head"),
        )
        timings["head_s"] = time.perf_counter() - phase_started
    else:
        log.info("full forward each step (data.augment=true)")
        # issue 10: standardization statistics from one un-augmented pass over a sample.
        sample = sample_features(
            model,
            train,
            d.image_size,
            batch,
            seed=cfg.seed,
            workers=workers,
            jit_compile=jit_compile,
        )
        set_feature_statistics(model, sample)
        log.info("feature statistics from %d un-augmented training images", len(sample))
        train_phase(
            model,
            train_images,
            test_images,
            learning_rate=t.learning_rate,
            epochs=t.epochs,
            initial_epoch=0,
            steps_per_epoch=image_steps,
            phase="head",
            backup_dir=os.path.join(backup_root, "head"),
        )
        timings["head_s"] = time.perf_counter() - phase_started

    if t.finetune_epochs:
        if not os.path.exists(phase1_done):
            os.makedirs(backup_root, exist_ok=True)
            model.save_weights(phase1_done)
            output.sync()
        phase_started = time.perf_counter()
        with strategy.scope():
            unfrozen = unfreeze_from(model, t.finetune_from)
        log.info(
            "fine-tuning: %d backbone layers from %s unfrozen, lr %g",
            unfrozen,
            t.finetune_from,
            t.finetune_learning_rate,
        )
        train_phase(
            model,
            train_images,
            test_images,
            learning_rate=t.finetune_learning_rate,
            epochs=t.finetune_epochs,
            initial_epoch=t.epochs,
            steps_per_epoch=image_steps,
            phase="fine-tune",
            backup_dir=os.path.join(backup_root, "finetune"),
        )
        timings["finetune_s"] = time.perf_counter() - phase_started

    # Final evaluation: on cached features when the backbone never changed (same numbers the
    # full model gives, without another backbone pass), else on images.
    # Both give every worker all test predictions, in order.
    if fast_path and not t.finetune_epochs:
        probabilities = predict_in_batches(model.get_layer("head"), features["test"], batch)
    else:
        probabilities = predict_files(model, test, d.image_size, batch, workers)
    shutil.rmtree(os.path.join(out_dir, ".feature_cache"), ignore_errors=True)
    result = evaluate(np.asarray(probabilities), test.labels, len(classes))
    predicted = result.pop("predicted")

    wrong = np.flatnonzero(predicted != test.labels)[:16]
    wrong_images = (
        np.stack(
            [
                x
                for x, _ in image_dataset(test.subset(wrong), d.image_size, 16)
                .unbatch()
                .as_numpy_iterator()
            ]
        )
        if len(wrong)
        else []
    )
    tensorboard.write_test_report(
        log_dir,
        total_epochs,
        classes,
        result["confusion_matrix"],
        wrong_images,
        test.labels[wrong],
        predicted[wrong],
    )

    metrics = {
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "epochs": total_epochs,
        "classes": classes,
        "num_train": len(train),
        "num_test": len(test),
        "confusion_matrix": result["confusion_matrix"],
        "replicas": replicas,
        "fast_path": fast_path,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    tensorboard.write_hparams(
        log_dir,
        {
            "learning_rate": t.learning_rate,
            "batch_size": d.batch_size,
            "epochs": t.epochs,
            "dropout": m.dropout,
            "image_size": d.image_size,
            "augment": d.augment,
            "finetune_epochs": t.finetune_epochs,
            "weights": str(m.weights),
        },
        {"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]},
    )
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_run_files(out_dir, classes, metrics, config_yaml)
    log.info("test accuracy %.4f, test loss %.4f", metrics["test_accuracy"], metrics["test_loss"])

    if t.min_accuracy is not None and metrics["test_accuracy"] < t.min_accuracy:
        if chief:
            output.remove_backup()  # finished, if below target: a retry must not resume it
        raise BelowMinAccuracy(
            f"test accuracy {metrics['test_accuracy']:.4f} is below train.min_accuracy="
            f"{t.min_accuracy}: metrics written to {output.uri}/metrics.json, model not exported"
        )

    export_started = time.perf_counter()
    saved_model = os.path.join(out_dir, "saved_model")
    export_saved_model(model, classes, d.image_size, saved_model)
    timings["export_s"] = time.perf_counter() - export_started
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_run_files(out_dir, classes, metrics, config_yaml)
    if chief:
        output.publish()  # and then removes the backup: a finished run is not resumed
        where = output.uri
        log.info("exported to %s/saved_model", where)
        log.info("TensorBoard logs: tensorboard --logdir %s/tensorboard", where)
    return metrics
