"""`run(cfg)` in this process, on a config composed the way `python -m trainer` composes it
(Hydra's compose API), pointed at tmp_path: the whole job in seconds, no subprocess."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CLASSES, SMALL, compose_config, make_folders
from trainer.job import run

PUBLISHED = {"_SUCCESS", "saved_model", "labels.txt", "metrics.json", "config.yaml", "tensorboard"}


def _config(tmp_path, *overrides: str, classes=CLASSES):
    train_dir, test_dir = make_folders(tmp_path / "data", train=8, test=4, classes=classes)
    return compose_config(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        f"output.dir={tmp_path / 'out'}",
        *SMALL,
        *overrides,
    )


def test_run_returns_the_metrics_it_publishes_and_leaves_only_outputs(tmp_path, in_process_run):
    """Also: class ids follow the sorted folder names, "Dog" before "cat" (labels.txt, the
    training labels), and the exported model names each id as labels.txt does."""
    import tensorflow as tf

    # feature_cache_max_mb=0: the features spill to disk, and the spill must be gone at the end
    config = _config(
        tmp_path, "train.epochs=2", "train.feature_cache_max_mb=0", classes=["Dog", "cat"]
    )
    metrics = run(config)

    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == PUBLISHED  # no backup, feature spill or partials
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["fast_path"] is True and metrics["epochs"] == 2
    assert (metrics["num_train"], metrics["num_test"]) == (16, 8)
    assert sum(map(sum, metrics["confusion_matrix"])) == 8
    assert {"backbone_pass_s", "head_s", "export_s"} <= set(metrics["timings"])
    assert (out / "saved_model" / "saved_model.pb").exists()
    labels = (out / "labels.txt").read_text().splitlines()
    assert labels == sorted(["cat", "Dog"]) == metrics["classes"]
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    images = sorted((tmp_path / "data" / "test").glob("*/*.jpg"))
    served = serve(image_bytes=tf.constant([p.read_bytes() for p in images]))
    names = [name.decode() for name in served["class_name"].numpy()]
    assert names == [labels[i] for i in served["class_id"].numpy()]


@pytest.mark.slow  # about a minute: fine-tuning runs the backbone's top on every step
def test_augmented_run_with_finetuning_trains_on_images_and_says_so(tmp_path, in_process_run):
    metrics = run(
        _config(tmp_path, "data.augment=true", "train.epochs=1", "train.finetune_epochs=1")
    )

    assert metrics["fast_path"] is False and metrics["epochs"] == 2
    assert "backbone_pass_s" not in metrics["timings"]
    assert {"head_s", "finetune_s", "export_s"} <= set(metrics["timings"])
    assert {p.name for p in (tmp_path / "out").iterdir()} == PUBLISHED
