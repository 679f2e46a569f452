"""Training behaviour: accuracy, the exact fast path, augmentation, fine-tuning, gates, sweeps."""

from __future__ import annotations

import json
import logging
import re
import shutil

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import CLASSES, SMALL, configure, make_folders, run_trainer
from trainer import BelowMinAccuracy, TrainerError
from trainer.data import image_dataset, load_splits
from trainer.features import extract_features, feature_dataset
from trainer.job import run
from trainer.model import build_model, feature_extractor


def test_separable_dataset_reaches_95_percent_test_accuracy(trained_run):
    metrics = trained_run.metrics
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["classes"] == CLASSES and metrics["num_test"] == 32
    assert metrics["fast_path"] is True and metrics["epochs"] == 8
    assert "epoch 8/8 (head on cached features)" in trained_run.result.stdout


def test_backbone_runs_once_per_image_on_the_fast_path(trained_run):
    log = trained_run.result.stdout
    assert log.count("features cached: train set, 80 x 2048") == 1
    assert log.count("features cached: test set, 32 x 2048") == 1
    assert set(trained_run.metrics["timings"]) >= {"backbone_pass_s", "head_s", "export_s"}


def _small_model_and_split(tmp_path):
    train_dir, test_dir = make_folders(tmp_path, train=6, test=3)
    _, _, test = load_splits(str(train_dir), str(test_dir), 0.2, seed=0)
    keras.utils.set_random_seed(0)
    return build_model(2, 32, None, 0.3), test


def test_head_on_cached_features_equals_the_full_model(tmp_path):
    """The fast path is exact: head(features) gives what the full model gives on the images."""
    model, test = _small_model_and_split(tmp_path)
    features = extract_features(feature_extractor(model), test, 32, 4, 64, str(tmp_path), "test")

    on_features = model.get_layer("head").predict(feature_dataset(features, test.labels, 4))
    on_images = model.predict(image_dataset(test, 32, 4))

    np.testing.assert_allclose(on_features, on_images, rtol=1e-4, atol=1e-6)


def test_feature_cache_spills_to_disk_above_its_limit_with_the_same_values(tmp_path):
    model, test = _small_model_and_split(tmp_path)
    extractor = feature_extractor(model)
    in_memory = extract_features(extractor, test, 32, 4, 64, str(tmp_path / "a"), "test")
    spilled = extract_features(extractor, test, 32, 4, 0, str(tmp_path / "b"), "test")

    assert isinstance(spilled, np.memmap) and not isinstance(in_memory, np.memmap)
    assert (tmp_path / "b" / "test_features.npy").stat().st_size >= spilled.nbytes
    np.testing.assert_allclose(spilled, in_memory, rtol=1e-5, atol=1e-6)
    batches = [(x, y) for x, y in feature_dataset(spilled, test.labels, 4).as_numpy_iterator()]
    np.testing.assert_allclose(np.concatenate([x for x, _ in batches]), in_memory, rtol=1e-5)
    assert np.concatenate([y for _, y in batches]).tolist() == test.labels.tolist()


def test_shuffled_feature_batches_keep_features_and_labels_together(tmp_path):
    features = np.arange(10, dtype=np.float32)[:, None].repeat(2048, axis=1)
    labels = np.arange(10, dtype=np.int64)
    memmap = np.lib.format.open_memmap(tmp_path / "f.npy", "w+", np.float32, (10, 2048))
    memmap[:] = features
    for source in (features, memmap):
        for x, y in feature_dataset(source, labels, 3, shuffle=True, seed=1).as_numpy_iterator():
            assert x[:, 0].tolist() == y.tolist()


def test_many_shuffled_epochs_of_features_are_each_a_whole_permutation_in_batches():
    """train.head_min_steps repeats a small set thousands of times (40 epochs x 250 passes):
    the dataset builds at once, and each pass is the whole set in batches of its own."""
    labels = np.arange(10, dtype=np.int64)
    features = labels[:, None].astype(np.float32).repeat(2048, axis=1)
    ds = feature_dataset(features, labels, 4, shuffle=True, seed=1, epochs=10_000)
    assert ds.cardinality() == 10_000 * 3  # Keras reads the length to end an epoch
    batches = [y for _, y in ds.take(3000).as_numpy_iterator()]  # the first 1,000 passes
    assert [len(b) for b in batches[:3]] == [4, 4, 2]
    passes = [np.concatenate(batches[i : i + 3]) for i in range(0, len(batches), 3)]
    assert all(sorted(p.tolist()) == labels.tolist() for p in passes)
    assert len({tuple(p) for p in passes}) > 900  # each pass in its own seeded order


def _log_of(caplog, job, cfg):
    """`job(cfg)` with the trainer's log captured: (its result, the log)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        return job(cfg), caplog.text


@pytest.mark.slow  # augmentation and fine-tuning on images
def test_augmented_run_with_finetuning_trains_the_full_model_and_may_overwrite(
    trained_run, tmp_path, cfg, caplog
):
    """data.augment=true: full forward each step; finetune_epochs: a second phase continues the
    epoch count; output.overwrite=true replaces an earlier finished run. Few images: every step
    is a full forward pass."""
    train_dir, test_dir = make_folders(tmp_path / "data", train=8, test=4)
    out = tmp_path / "out"
    shutil.copytree(trained_run.out, out)
    configure(
        cfg,
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        f"output.dir={out}",
        "output.overwrite=true",
        "data.augment=true",
        "train.epochs=1",
        "train.finetune_epochs=1",
    )
    metrics, log = _log_of(caplog, run, cfg)
    assert "full forward each step (data.augment=true)" in log
    assert "features cached" not in log
    assert "fine-tuning: 23 backbone layers from conv5_block1_1_conv unfrozen" in log
    assert "epoch 2/2 (fine-tune)" in log
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["fast_path"] is False and metrics["epochs"] == 2
    assert "finetune_s" in metrics["timings"]
    # A validation set held out of the training images (not the test set's) picks the epoch kept.
    assert "16 training and 8 test images" in log  # what this run's folders hold
    assert metrics["num_validation"] + metrics["num_train"] == 16 and metrics["num_validation"] > 0
    assert metrics["num_test"] == 8
    assert metrics["finetune_best_epoch"] in (0, 2)
    assert 0.0 <= metrics["phase1_test_accuracy"] <= 1.0
    assert 0.0 <= metrics["phase1_validation_accuracy"] <= 1.0
    assert metrics["finetune_best_validation_accuracy"] >= metrics["phase1_validation_accuracy"]
    assert (out / "_SUCCESS").exists() and (out / "saved_model" / "saved_model.pb").exists()


def test_finished_run_is_not_overwritten_without_asking(trained_run, cfg):
    before = {p: p.stat().st_mtime_ns for p in trained_run.out.rglob("*")}
    configure(
        cfg,
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"output.dir={trained_run.out}",
    )
    with pytest.raises(TrainerError, match=f"^output.dir={trained_run.out}:") as refused:
        run(cfg)
    assert refused.value.exit_code == 2 and "output.overwrite=true" in str(refused.value)
    assert {p: p.stat().st_mtime_ns for p in trained_run.out.rglob("*")} == before


def test_below_min_accuracy_is_exit_3_with_metrics_and_no_export(tmp_path, cfg):
    # The same pictures in both classes: nothing to learn, so accuracy stays near chance.
    train_dir, test_dir = make_folders(tmp_path / "data", train=8, test=6)
    for split in (train_dir, test_dir):
        shutil.rmtree(split / "dog")
        shutil.copytree(split / "cat", split / "dog")
    out = tmp_path / "out"
    configure(
        cfg,
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "train.epochs=2",
        "train.min_accuracy=0.9",
    )
    with pytest.raises(BelowMinAccuracy, match="below train.min_accuracy=0.9") as below:
        run(cfg)
    assert below.value.exit_code == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] < 0.9
    assert not (out / "saved_model").exists() and not (out / "_SUCCESS").exists()
    # The misclassified images are what a user looks at next: they are in TensorBoard.
    from tests.test_tensorboard import tags_by_run

    assert "misclassified" in tags_by_run(out / "tensorboard")["validation"]


def test_multirun_sweep_gives_each_run_its_own_directory(trained_run, tmp_path):
    """README: in a sweep each run writes to Hydra's multirun/DATE/TIME/N by default."""
    result = run_trainer(
        "-m",
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        "train.learning_rate=1e-3,3e-3",
        "train.epochs=1",
        *SMALL,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1 and re.fullmatch(
        r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", "/".join(sweeps[0].parts[-2:])
    ), sweeps
    runs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in runs] == ["0", "1"]
    for point in runs:
        assert (point / "_SUCCESS").exists()
        assert (point / "saved_model" / "saved_model.pb").exists()
        assert (point / "tensorboard").is_dir() and (point / "metrics.json").exists()
    rates = [OmegaConf.load(point / "config.yaml").train.learning_rate for point in runs]
    assert rates == [1e-3, 3e-3]


def test_sweep_metric_is_the_test_accuracy(trained_run, tmp_path, cfg):
    """`main()` returns test accuracy: what Hydra sweepers (Optuna, Nevergrad) optimize."""
    from trainer.__main__ import _hydra_main

    configure(
        cfg,
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        "train.epochs=1",
    )
    accuracy = _hydra_main(cfg)  # hydra.main passes a given config straight to the task
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert accuracy == metrics["test_accuracy"]


def test_a_test_accuracy_equal_to_train_min_accuracy_passes_the_gate(tmp_path):
    """README: below train.min_accuracy, exit 3. At it, the run exports: a perfect run with
    train.min_accuracy=1.0 (or 3 of 4 right at 0.75) is not refused."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from trainer import BelowMinAccuracy
    from trainer.job import stop_before_export
    from trainer.output import Output

    ctx = SimpleNamespace(
        chief=True, output=Output(str(tmp_path / "out"), False, str(tmp_path / "cache"), 0)
    )
    no_time_limit = SimpleNamespace(check=lambda metrics_path: None)

    def gate(accuracy: float, min_accuracy: float) -> None:
        stop_before_export(
            ctx,
            metrics={"test_accuracy": accuracy},
            time_limit=no_time_limit,
            cfg=OmegaConf.create({"train": {"min_accuracy": min_accuracy}}),
        )

    for accuracy in (1.0, 0.75):
        gate(accuracy, min_accuracy=accuracy)
    with pytest.raises(BelowMinAccuracy, match="is below train.min_accuracy=0.75"):
        gate(0.7499, min_accuracy=0.75)


def test_a_perfect_models_test_loss_is_zero_not_minus_zero():
    import math

    from trainer.train import evaluate

    result = evaluate(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), num_classes=2)
    assert result["test_loss"] == 0.0 and math.copysign(1.0, result["test_loss"]) == 1.0


def test_finetuning_keeps_its_best_epoch_not_a_worse_last_one():
    """KeepBest (train.finetune_validation_split): the weights of the epoch with the best
    validation accuracy are the model's at the end, phase 1's end (the baseline) included."""
    from trainer.train import KeepBest

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keep = KeepBest(baseline=0.5)
    keep.set_model(model)
    keep.on_train_begin()
    kernel = model.layers[0].kernel
    for epoch, (value, accuracy) in enumerate([(1.0, 0.7), (2.0, 0.9), (3.0, 0.6)]):
        kernel.assign(np.full((2, 1), value, np.float32))
        keep.on_epoch_end(epoch, {"val_accuracy": accuracy})
    keep.on_train_end()

    np.testing.assert_array_equal(kernel.numpy(), np.full((2, 1), 2.0, np.float32))
    assert keep.best_epoch == 2 and keep.best == 0.9

    keep = KeepBest(baseline=0.95)  # no epoch beats phase 1: its weights come back
    keep.set_model(model)
    keep.on_train_begin()
    kernel.assign(np.zeros((2, 1), np.float32))
    keep.on_epoch_end(0, {"val_accuracy": 0.9})
    keep.on_train_end()
    np.testing.assert_array_equal(kernel.numpy(), np.full((2, 1), 2.0, np.float32))
    assert keep.best_epoch == 0


@pytest.mark.parametrize(
    ("steps", "backup_every", "expected"),
    [(500, 0, 50), (63, 0, 63), (4000, 0, 50), (7, 0, 7), (130, 0, 26), (500, 8, 4)],
)
def test_head_steps_run_in_calls_that_end_on_each_epoch_and_backup_boundary(
    steps, backup_every, expected
):
    """Several steps a call of the compiled step on cached features, never past an epoch's end
    (Keras would read the next epoch's batches into this one) nor past a backup point."""
    from trainer.phases import _steps_per_call

    per_call = _steps_per_call(steps, backup_every=backup_every)
    assert per_call == expected
    assert steps % per_call == 0 and per_call <= 64
    assert not backup_every or backup_every % per_call == 0
