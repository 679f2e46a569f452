"""`run(cfg) -> dict`: the whole job, top to bottom. Tests call this; `__main__` adds Hydra.

stage inputs -> validate and split (trainer/inputs.py) -> choose strategy -> build model ->
train phases (head on cached features | head on images; optional fine-tune; trainer/phases.py)
-> evaluate -> report (TensorBoard, metrics) -> export -> publish (_SUCCESS last)
"""

from __future__ import annotations

import functools
import logging
import shutil
import time

import numpy as np
from omegaconf import DictConfig, OmegaConf

from trainer import BelowMinAccuracy, rundir
from trainer.config import validate
from trainer.data import Split, owner
from trainer.inputs import (
    Findings,
    agreed_findings,
    drop_undecodable,
    listing_digests,
    remember_findings,
    split_data,
    stage_inputs,
    staging_share,
    start_scan,
)
from trainer.output import Output
from trainer.phases import RunContext, Schedule, train_phases
from trainer.timings import Stopwatch, for_metrics

log = logging.getLogger(__name__)


def run(cfg: DictConfig, *, startup_s: float | None = None) -> dict:
    """Train and export as `cfg` says; return the metrics written to metrics.json."""
    clock = Stopwatch(startup_s=startup_s)  # each step's seconds, for metrics.json's timings
    validate(cfg)
    d, t, s, dist = cfg.data, cfg.train, cfg.storage, cfg.distribute
    output = Output(str(cfg.output.dir), cfg.output.overwrite, s.cache_dir, s.sync_seconds)
    output.check()  # read-only here: only the chief may clear anything, and it is not known yet
    share = staging_share(augment=d.augment, finetune_epochs=t.finetune_epochs)
    (train_dir, test_dir, weights), (classes, train, test) = inputs(cfg, share=share)
    clock.lap("inputs_s")
    # TensorFlow is imported only now: config and folder errors above answer in a second.
    strategy = start_runtime(
        strategy=dist.strategy.value,
        simulate_devices=dist.simulate_devices,
        timeout_seconds=dist.timeout_seconds,
        seed=cfg.seed,
        precision=t.precision,
    )
    from trainer.distribute import is_chief

    chief = is_chief(strategy)
    if chief:
        output.prepare()
    # Only the chief writes output.dir; other workers write to a private folder, removed on
    # every way out (Keras' callbacks and the export need somewhere to write on every worker).
    scratch = None if chief else rundir.worker_scratch()
    try:
        # The scan decodes in tf.data's threads while this thread builds the model.
        digests = listing_digests(train_dir, test_dir)
        clock.lap("runtime_s")
        scan = start_scan((train, test), share=share, cache_uri=s.feature_cache, digests=digests)
        model = build(strategy=strategy, cfg=cfg, classes=len(classes), weights=weights)
        clock.lap("build_s")
        ctx = make_context(
            output=output,
            work_dir=scratch or output.local_dir,
            chief=chief,
            strategy=strategy,
            classes=classes,
            splits=(train, test),
            findings=scan.result(),
            data=d,
            feature_cache=s.feature_cache,
            jit_compile=t.jit_compile,
            seed=cfg.seed,
            share=share,
            digests=digests,
            serving_dtype=cfg.output.serving_dtype.value,
        )
        clock.lap("bad_images_s")
        return train_and_export(ctx, model=model, cfg=cfg, weights=weights, clock=clock)
    finally:
        output.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def inputs(cfg: DictConfig, *, share: tuple[int, int]) -> tuple[tuple, tuple]:
    """((train dir, test dir, weights) as staged locally, (classes, train, test) file lists):
    the data and model.weights keys of `cfg`, this worker's `share` of gs:// images staged."""
    d = cfg.data
    staged = stage_inputs(
        train_dir=d.train_dir,
        test_dir=d.test_dir,
        weights=cfg.model.weights,
        cache_dir=cfg.storage.cache_dir,
        share=share,
    )
    split = split_data(
        train_dir=staged[0],
        test_dir=staged[1],
        validation_split=d.validation_split,
        seed=cfg.seed,
    )
    return staged, split


def train_and_export(ctx: RunContext, *, model, cfg: DictConfig, weights, clock: Stopwatch) -> dict:
    """Train the model's phases, evaluate, report, export, publish; the metrics."""
    t, started = cfg.train, clock.started
    ctx.timings = clock.timings  # the phases add theirs
    write_sample_batch(ctx, augment=cfg.data.augment)
    clock.lap("sample_batch_s")
    schedule = schedule_of(cfg, weights=weights)
    from trainer import tensorboard
    from trainer.train import SIGTERM, TimeLimit  # loads Keras, as everything from here on

    SIGTERM.check()  # a SIGTERM while the model was built stops here (trainer/train.py)
    time_limit = TimeLimit(t.max_hours, started, ctx.workers[0])  # train.max_hours: exit 5
    trained = train_phases(
        ctx, model=model, augment=cfg.data.augment, schedule=schedule, time_limit=time_limit
    )
    clock.restart()  # the phases timed themselves
    serving = build_serving(ctx, model=model)
    result = evaluate_model(ctx, model=serving, test_features=trained.test_features)
    clock.lap("evaluate_s")
    metrics = report(
        ctx,
        result=result,
        epochs=schedule.total_epochs,
        fast_path=trained.fast_path,
        hparams=tensorboard.hparams_of(cfg),
    )
    metrics["stopped_at_time_limit"] = time_limit.reached
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    write_metrics(ctx, metrics=metrics, config_yaml=config_yaml, started=started)
    clock.lap("report_s")  # in metrics.json from the export's rewrite on
    time_limit.check(f"{ctx.output.uri}/{rundir.METRICS}")
    SIGTERM.check()  # before the export: the backup stays, and the retry exports
    check_min_accuracy(ctx, metrics=metrics, min_accuracy=t.min_accuracy)
    export(ctx, model=serving, metrics=metrics, config_yaml=config_yaml, started=started)
    publish(ctx)
    return metrics


def start_runtime(
    *, strategy: str, simulate_devices, timeout_seconds: int, seed: int, precision: str
):
    """SIGTERM handling, then the tf.distribute strategy, the seed and the precision policy."""
    import keras

    from trainer.distribute import choose_precision, choose_strategy
    from trainer.train import SIGTERM

    # The strategy first: simulated devices and the multi-worker runtime must be set up before
    # TensorFlow runs anything (seeding included).
    chosen = choose_strategy(strategy, simulate_devices, timeout_seconds)
    # Until now SIGTERM's default action ends the process; from here on it ends training at a
    # step boundary with a backup written (see trainer/train.py). After the strategy: the
    # multi-worker runtime installs a SIGTERM handler of its own that would replace ours.
    SIGTERM.install()
    keras.utils.set_random_seed(seed)
    choose_precision(precision)
    return chosen


def make_context(
    *,
    output: Output,
    work_dir: str,
    chief: bool,
    strategy,
    classes,
    splits,
    data,
    jit_compile,
    seed: int,
    share: tuple[int, int],
    findings: Findings,
    feature_cache: str | None,
    digests: dict[str, str],
    serving_dtype: str,
) -> RunContext:
    """Leave out (or refuse) the undecodable images of the scan's `findings` (the chief keeps
    them in storage.feature_cache), size the batch, and gather what the phases share; a worker
    other than the chief resumes from the chief's backup, if there is one."""
    from trainer.distribute import choose_jit_compile, worker_shard

    run_dir = rundir.RunDir(work_dir)
    if not chief and output.fetch_backup(run_dir.root):  # resume where the chief resumes
        log.info("worker resumes from the backup in %s", output.uri)
    findings = agreed_findings(findings, splits=splits, strategy=strategy, share=share)
    drop = functools.partial(
        drop_undecodable,
        fail=data.on_bad_image.value == "fail",
        strategy=strategy,
        share=share,
        found=findings.bad,
    )
    train, test = drop(splits[0], name="training"), drop(splits[1], name="test")
    if chief:
        remember_findings(findings, listed=splits, kept=(train, test), cache_uri=feature_cache)
    replicas = strategy.num_replicas_in_sync
    batch = data.batch_size * replicas
    log.info("batch size: %d per replica x %d replica(s) = %d", data.batch_size, replicas, batch)
    return RunContext(
        output=output,
        run_dir=run_dir,
        chief=chief,
        strategy=strategy,
        classes=classes,
        train=train,
        test=test,
        image_size=data.image_size,
        batch=batch,
        workers=worker_shard(strategy),
        jit_compile=choose_jit_compile(jit_compile, strategy),
        seed=seed,
        digests={**digests, **findings.digests},
        sharded_staging=share[0] > 1,
        serving_dtype=serving_dtype,
    )


def build(*, strategy, cfg: DictConfig, classes: int, weights):
    """The model (frozen backbone with `weights`, as staged, + new head for `classes` classes)
    inside the strategy's scope; when the run fine-tunes, train.finetune_from must name one of
    its layers."""
    from trainer.model import build_model, finetune_start

    finetune = bool(cfg.train.finetune_epochs)
    with strategy.scope():
        # Frozen for the whole run: the folded backbone (trainer/fold.py); fine-tuning trains
        # Keras' own layers.
        model = build_model(
            classes, cfg.data.image_size, weights, cfg.model.dropout, cfg.seed, fold=not finetune
        )
    if finetune:
        finetune_start(model, cfg.train.finetune_from)  # a bad name fails now, not after phase 1
    return model


def write_sample_batch(ctx: RunContext, *, augment: bool) -> None:
    """16 training images (a seeded sample, of this worker's own images under sharded
    staging), as the model sees them (decoded, resized, augmented if it is), in TensorBoard.
    Decoded on their own: the first batch of the training pipeline would decode its read-ahead
    too, ~100 images, at every sweep point."""
    from trainer import tensorboard
    from trainer.data import decode_files

    rows = np.arange(len(ctx.train))
    if ctx.sharded_staging:  # this worker holds only its own images
        workers, index = ctx.workers
        rows = np.asarray([i for i in rows if owner(ctx.train.files[i], workers) == index])
        if not len(rows):
            return
    sample = ctx.train.subset(np.random.default_rng(ctx.seed).permutation(rows)[:16])
    pixels = decode_files(sample.files, ctx.image_size, augment=augment, seed=ctx.seed)
    tensorboard.write_sample_batch(ctx.run_dir.tensorboard, pixels, sample.labels, ctx.classes)


def schedule_of(cfg: DictConfig, *, weights: str | None) -> Schedule:
    """The training phases as train.*, data.augment and storage.feature_cache ask for them;
    `weights`: model.weights as staged (part of the feature cache's key)."""
    t = cfg.train
    return Schedule(
        epochs=t.epochs,
        learning_rate=t.learning_rate,
        finetune_epochs=t.finetune_epochs,
        finetune_from=t.finetune_from,
        finetune_learning_rate=t.finetune_learning_rate,
        backup_every_steps=t.backup_every_steps,
        feature_cache_max_mb=t.feature_cache_max_mb,
        cache_features=not cfg.data.augment,  # augmentation changes the features every epoch
        feature_cache=cfg.storage.feature_cache,
        weights=weights,
    )


def build_serving(ctx: RunContext, *, model):
    """The model the export holds and the test set judges: the trained head on the backbone
    folded in output.serving_dtype (trainer/model.py)."""
    from trainer.model import serving_model

    with ctx.strategy.scope():
        return serving_model(model, ctx.serving_dtype)


def evaluate_model(ctx: RunContext, *, model, test_features) -> dict:
    """Accuracy, loss, confusion matrix and predictions of the serving `model` on the test set:
    on the test features when the backbone never changed (the serving backbone's, so the
    numbers the full model gives, without another backbone pass), else on images. Both give
    every worker all test predictions, in order. Non-finite predictions: Diverged (exit 6)."""
    from trainer.features import predict_files
    from trainer.phases import check_finite
    from trainer.train import evaluate, predict_in_batches

    if test_features is not None:
        probabilities = predict_in_batches(model.get_layer("head"), test_features, ctx.batch)
    else:
        probabilities = predict_files(model, ctx.test, ctx.image_size, ctx.batch, ctx.workers)
    shutil.rmtree(ctx.run_dir.feature_cache, ignore_errors=True)
    probabilities = np.asarray(probabilities)
    check_finite(probabilities, what="the model's predictions on the test set")
    return evaluate(probabilities, ctx.test.labels, len(ctx.classes))


def report(ctx: RunContext, *, result: dict, epochs: int, fast_path: bool, hparams: dict) -> dict:
    """The TensorBoard test report (confusion matrix, misclassified images, HParams) and the
    metrics dict that metrics.json holds."""
    from trainer import tensorboard
    from trainer.distribute import runtime

    predicted = result.pop("predicted")
    wrong = np.flatnonzero(predicted != ctx.test.labels)
    if ctx.sharded_staging:  # this worker holds only its own test images
        wrong = np.asarray(
            [i for i in wrong if owner(ctx.test.files[i], ctx.workers[0]) == ctx.workers[1]],
            dtype=np.int64,
        )
    wrong = wrong[:16]
    log_dir = ctx.run_dir.tensorboard
    tensorboard.write_test_report(
        log_dir,
        epochs,
        ctx.classes,
        result["confusion_matrix"],
        _pixels(ctx.test.subset(wrong), ctx.image_size),
        ctx.test.labels[wrong],
        predicted[wrong],
    )
    metrics = {
        "test_accuracy": result["test_accuracy"],
        "test_loss": result["test_loss"],
        "epochs": epochs,
        "classes": ctx.classes,
        "num_train": len(ctx.train),
        "num_test": len(ctx.test),
        "confusion_matrix": result["confusion_matrix"],
        **runtime(ctx.strategy),  # strategy, replicas, devices, precision
        "jit_compile": ctx.jit_compile,
        "serving_dtype": ctx.serving_dtype,
        "fast_path": fast_path,
        "timings": for_metrics(ctx.timings, feature_cache=ctx.feature_cache),
    }
    scores = {"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]}
    tensorboard.write_hparams(log_dir, hparams, scores)
    return metrics


def _pixels(split: Split, image_size: int):
    """The decoded images of `split`, stacked (an empty list for no images)."""
    from trainer.data import decode_files

    return decode_files(split.files, image_size) if len(split) else []


def write_metrics(ctx: RunContext, *, metrics: dict, config_yaml: str, started: float) -> None:
    """labels.txt, metrics.json and config.yaml, written before the export so a run below
    train.min_accuracy still leaves its numbers."""
    from trainer.export import write_run_files

    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_run_files(ctx.run_dir.root, ctx.classes, metrics, config_yaml)
    log.info("test accuracy %.4f, test loss %.4f", metrics["test_accuracy"], metrics["test_loss"])


def check_min_accuracy(ctx: RunContext, *, metrics: dict, min_accuracy: float | None) -> None:
    """BelowMinAccuracy (exit 3, no export) when the run missed train.min_accuracy."""
    if min_accuracy is None or metrics["test_accuracy"] >= min_accuracy:
        return
    if ctx.chief:
        ctx.output.remove_backup()  # finished, if below target: a retry must not resume it
    raise BelowMinAccuracy(
        f"test accuracy {metrics['test_accuracy']:.4f} is below train.min_accuracy="
        f"{min_accuracy}: metrics written to {ctx.output.uri}/{rundir.METRICS},"
        " model not exported"
    )


def export(ctx: RunContext, *, model, metrics: dict, config_yaml: str, started: float) -> None:
    """The SavedModel, then metrics.json again with the export's time in it."""
    from trainer.export import export_saved_model, write_run_files

    export_started = time.perf_counter()
    export_saved_model(model, ctx.classes, ctx.image_size, ctx.run_dir.saved_model)
    ctx.timings["export_s"] = time.perf_counter() - export_started
    metrics["timings"] = for_metrics(ctx.timings, feature_cache=ctx.feature_cache)
    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_run_files(ctx.run_dir.root, ctx.classes, metrics, config_yaml)


def publish(ctx: RunContext) -> None:
    """On the chief: every output visible at output.dir, `_SUCCESS` last, the backup removed
    (a finished run is not resumed)."""
    if not ctx.chief:
        return
    ctx.output.publish()
    where = ctx.output.uri
    log.info("exported to %s/%s", where, rundir.SAVED_MODEL)
    log.info(
        "TensorBoard logs: python -m trainer.tensorboard --logdir %s/%s", where, rundir.TENSORBOARD
    )
