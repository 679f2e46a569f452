"""`run(cfg) -> dict`: the whole job, top to bottom. Tests call this; `__main__` adds Hydra.

stage inputs -> validate and split (trainer/inputs.py) -> choose strategy -> build model (the
bad-image scan beside it) -> undecodable images left out -> train phases (head on cached
features | head on images; optional fine-tune; trainer/phases.py) -> evaluate -> report
(TensorBoard) -> export -> metrics.json -> publish (_SUCCESS last)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from trainer import BelowMinAccuracy, rundir
from trainer.config import validate
from trainer.context import RunContext, Runtime, Settled, context_of, schedule_of
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
from trainer.phases import Trained, train_phases
from trainer.timings import Stopwatch, for_metrics

log = logging.getLogger(__name__)


def run(cfg: DictConfig, *, startup_s: float | None = None) -> dict:
    """Train and export as `cfg` says; return the metrics written to metrics.json."""
    clock = Stopwatch(startup_s=startup_s)  # each step's seconds, for metrics.json's timings
    validate(cfg)
    d, t = cfg.data, cfg.train
    output = output_of(cfg)
    output.check()  # read-only here: only the chief may clear anything, and it is not known yet
    share = staging_share(augment=d.augment, finetune_epochs=t.finetune_epochs)
    (train_dir, test_dir, weights), (classes, *listed) = inputs(cfg, share=share)
    clock.lap("inputs_s")
    # TensorFlow is imported only now: config and folder errors above answer in a second.
    runtime = start_runtime(cfg.distribute, seed=cfg.seed, precision=t.precision)
    with working_dir(output, chief=runtime.cluster.chief) as run_dir:
        digests = listing_digests(train_dir, test_dir)
        clock.lap("runtime_s")
        # The scan decodes in tf.data's threads while this thread builds the model.
        scan = start_scan(listed, share=share, cache_uri=cfg.storage.feature_cache, digests=digests)
        model = build(strategy=runtime.strategy, cfg=cfg, classes=len(classes), weights=weights)
        clock.lap("build_s")
        fetch_chief_backup(output, run_dir=run_dir, chief=runtime.cluster.chief)
        images = settle_images(
            scan.result(), classes=classes, listed=listed, runtime=runtime, cfg=cfg, share=share
        )
        ctx = context_of(
            cfg, output=output, run_dir=run_dir, runtime=runtime, images=images, share=share
        )
        clock.lap("bad_images_s")
        write_sample_batch(ctx, augment=d.augment)
        clock.lap("sample_batch_s")
        from trainer.train import SIGTERM, TimeLimit  # loads Keras, as everything from here on

        SIGTERM.check()  # a SIGTERM while the model was built stops here (trainer/train.py)
        time_limit = TimeLimit(
            t.max_hours, started=clock.started, strategy=ctx.strategy, workers=ctx.workers[0]
        )
        schedule = schedule_of(cfg, weights=weights)
        remove_pixel_spill(ctx)  # an earlier attempt's: tf.data would serve its stale pixels
        try:
            trained = train_phases(
                ctx, model=model, schedule=schedule, time_limit=time_limit, clock=clock
            )
        finally:  # the training phases' pipelines are the spilled pixels' only readers
            remove_pixel_spill(ctx)
        clock.restart()  # the phases timed themselves
        serving = build_serving(ctx, model=model)
        try:
            result = evaluate_model(ctx, model=serving, test_features=trained.test_features)
        finally:  # the evaluation is the spilled features' last reader
            remove_feature_spill(ctx)
        clock.lap("evaluate_s")
        metrics = report(ctx, result=result, cfg=cfg, trained=trained, time_limit=time_limit)
        try:  # metrics.json is written once, whichever way the run ends from here
            stop_before_export(ctx, metrics=metrics, time_limit=time_limit, cfg=cfg)
            clock.lap("report_s")
            export(ctx, model=serving)
            clock.lap("export_s")
        finally:
            write_metrics(ctx, metrics=metrics, cfg=cfg, clock=clock, trained=trained)
        publish(ctx)
        return metrics


def output_of(cfg: DictConfig) -> Output:
    """The run's output lifecycle, as output.* and storage.* ask for it."""
    return Output(
        str(cfg.output.dir),
        overwrite=cfg.output.overwrite,
        cache_dir=cfg.storage.cache_dir,
        sync_seconds=cfg.storage.sync_seconds,
    )


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


def start_runtime(distribute: DictConfig, *, seed: int, precision) -> Runtime:
    """SIGTERM handling, then the tf.distribute strategy (distribute.*) for the cluster this
    process is in, the seed and the precision policy."""
    import keras

    from trainer.cluster import from_environment
    from trainer.distribute import choose_precision, choose_strategy
    from trainer.train import SIGTERM

    cluster = from_environment()
    # The strategy first: simulated devices and the multi-worker runtime must be set up before
    # TensorFlow runs anything (seeding included).
    strategy = choose_strategy(
        distribute.strategy.value,
        distribute.simulate_devices,
        distribute.timeout_seconds,
        cluster=cluster,
    )
    # Until now SIGTERM's default action ends the process; from here on it ends training at a
    # step boundary with a backup written (see trainer/train.py). After the strategy: the
    # multi-worker runtime installs a SIGTERM handler of its own that would replace ours.
    SIGTERM.install()
    keras.utils.set_random_seed(seed)
    choose_precision(precision)
    # choose_strategy refuses a one-machine strategy in a cluster of several: the strategy
    # trains in `cluster`.
    return Runtime(strategy, cluster)


@contextlib.contextmanager
def working_dir(output: Output, *, chief: bool) -> Iterator[rundir.RunDir]:
    """Where this worker writes. Only the chief writes output.dir (prepared here: an earlier
    run's outputs cleared or its backup fetched); other workers write to a private folder,
    as Keras' callbacks and the export need somewhere to write on every worker. On every way
    out the output's sync stops and the private folder is removed."""
    if chief:
        output.prepare()
    scratch = None if chief else rundir.worker_scratch()
    try:
        yield rundir.RunDir(scratch or output.local_dir)
    finally:
        output.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def fetch_chief_backup(output: Output, *, run_dir: rundir.RunDir, chief: bool) -> None:
    """A worker other than the chief resumes where the chief resumes: from the backup in
    output.dir, if there is one (the chief reads it there itself)."""
    if not chief and output.fetch_backup(run_dir.root):
        log.info("worker resumes from the backup in %s", output.uri)


def settle_images(
    findings: Findings,
    *,
    classes: list[str],
    listed: tuple[Split, Split],
    runtime: Runtime,
    cfg: DictConfig,
    share: tuple[int, int],
) -> Settled:
    """The `listed` training and test files without the undecodable images: the scan's
    `findings` agreed between the workers, data.on_bad_image applied, and the findings kept in
    storage.feature_cache by the chief."""
    strategy, cluster = runtime
    findings = agreed_findings(
        findings, splits=listed, strategy=strategy, workers=cluster.workers, share=share
    )
    fail = cfg.data.on_bad_image.value == "fail"
    kept = drop_undecodable(listed, found=findings.bad, fail=fail, strategy=strategy, share=share)
    if cluster.chief:
        remember_findings(findings, kept=kept)
    return Settled(classes, *kept, digests=findings.digests)


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
            num_classes=classes,
            image_size=cfg.data.image_size,
            weights=weights,
            dropout=cfg.model.dropout,
            seed=cfg.seed,
            fold=not finetune,
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
    from trainer.phases import check_finite, predictions
    from trainer.train import evaluate

    probabilities = predictions(ctx, model=model, split=ctx.test, features=test_features)
    check_finite(probabilities, what="the model's predictions on the test set")
    return evaluate(probabilities, ctx.test.labels, len(ctx.classes))


def remove_feature_spill(ctx: RunContext) -> None:
    """The run's spill folder goes once the test features, memory-mapped from it when they
    were over the in-memory limit, had their last reader (the evaluation)."""
    shutil.rmtree(ctx.run_dir.feature_spill, ignore_errors=True)


def remove_pixel_spill(ctx: RunContext) -> None:
    """The run's decoded-pixel spill folder (tf.data cache files, trainer/data.py): removed
    before training, as tf.data would read an earlier attempt's files instead of decoding, and
    after it."""
    shutil.rmtree(ctx.run_dir.pixel_spill_dir, ignore_errors=True)


def report(ctx: RunContext, *, result: dict, cfg: DictConfig, trained: Trained, time_limit) -> dict:
    """The TensorBoard test report (confusion matrix, misclassified images, HParams) and the
    metrics dict that metrics.json holds (its timings are added when it is written)."""
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
    epochs = cfg.train.epochs + cfg.train.finetune_epochs
    tensorboard.write_test_report(
        ctx.run_dir.tensorboard,
        step=epochs,
        classes=ctx.classes,
        confusion=result["confusion_matrix"],
        wrong_images=_pixels(ctx.test.subset(wrong), ctx.image_size),
        wrong_true=ctx.test.labels[wrong],
        wrong_predicted=predicted[wrong],
    )
    scores = {"test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"]}
    tensorboard.write_hparams(ctx.run_dir.tensorboard, tensorboard.hparams_of(cfg), scores)
    log.info("test accuracy %.4f, test loss %.4f", scores["test_accuracy"], scores["test_loss"])
    return {
        **scores,
        "epochs": epochs,
        "classes": ctx.classes,
        "num_train": len(ctx.train),
        "num_test": len(ctx.test),
        "confusion_matrix": result["confusion_matrix"],
        **runtime(ctx.strategy),  # strategy, replicas, devices, precision
        "jit_compile": ctx.jit_compile,
        "serving_dtype": ctx.serving_dtype,
        "fast_path": trained.fast_path,
        "stopped_at_time_limit": time_limit.reached,
        **(trained.finetuned or {}),  # phase 1's accuracy and the epoch fine-tuning kept
    }


def _pixels(split: Split, image_size: int):
    """The decoded images of `split`, stacked (an empty list for no images)."""
    from trainer.data import decode_files

    return decode_files(split.files, image_size) if len(split) else []


def stop_before_export(ctx: RunContext, *, metrics: dict, time_limit, cfg: DictConfig) -> None:
    """Raise what ends a run that must not export: train.max_hours reached (exit 5), a SIGTERM
    (exit 143: the backup stays, and the retry exports), or a test accuracy below
    train.min_accuracy (exit 3: the backup goes, as the run is finished)."""
    from trainer.train import SIGTERM

    time_limit.check(f"{ctx.output.uri}/{rundir.METRICS}")
    SIGTERM.check()
    min_accuracy = cfg.train.min_accuracy
    if min_accuracy is None or metrics["test_accuracy"] >= min_accuracy:
        return
    if ctx.chief:
        ctx.output.remove_backup()  # finished, if below target: a retry must not resume it
    raise BelowMinAccuracy(
        f"test accuracy {metrics['test_accuracy']:.4f} is below train.min_accuracy="
        f"{min_accuracy}: metrics written to {ctx.output.uri}/{rundir.METRICS},"
        " model not exported"
    )


def export(ctx: RunContext, *, model) -> None:
    """The SavedModel of the serving `model`."""
    from trainer.export import export_saved_model

    export_saved_model(
        model, classes=ctx.classes, image_size=ctx.image_size, path=ctx.run_dir.saved_model
    )


def write_metrics(
    ctx: RunContext, *, metrics: dict, cfg: DictConfig, clock: Stopwatch, trained: Trained
) -> None:
    """labels.txt, metrics.json (`metrics` with the steps' timings and the wall seconds so far,
    added to it) and config.yaml: a run below train.min_accuracy leaves its numbers too."""
    from trainer.export import write_run_files

    metrics["timings"] = for_metrics(clock.timings, cache_outcome=trained.cache_outcome)
    metrics["wall_seconds"] = round(time.perf_counter() - clock.started, 3)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    write_run_files(ctx.run_dir.root, classes=ctx.classes, metrics=metrics, config_yaml=config_yaml)


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
