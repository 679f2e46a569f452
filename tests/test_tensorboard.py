"""TensorBoard: the event files a user's TensorBoard reads, read back with TensorBoard's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2


def _multiplexer(log_dir: Path) -> EventMultiplexer:
    mux = EventMultiplexer(size_guidance={"tensors": 0})
    mux.AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    return mux


def tags_by_run(log_dir: Path) -> dict[str, set[str]]:
    """Run name -> every tag (scalars, images and the rest are all tensors in TF2 summaries)."""
    mux = _multiplexer(log_dir)
    return {run: set(tags["tensors"]) for run, tags in mux.Runs().items()}


def test_scalars_per_epoch_for_train_and_test_with_the_learning_rate(trained_run):
    mux = _multiplexer(trained_run.out / "tensorboard")
    train = {e.step for e in mux.Tensors("train", "epoch_accuracy")}
    assert train == set(range(8))
    assert {e.step for e in mux.Tensors("validation", "epoch_accuracy")} == set(range(8))
    assert {"epoch_loss", "epoch_learning_rate"} <= set(mux.Runs()["train"]["tensors"])
    assert "epoch_loss" in mux.Runs()["validation"]["tensors"]


def test_images_sample_batch_and_confusion_matrix(trained_run):
    tags = tags_by_run(trained_run.out / "tensorboard")
    assert "sample_training_batch" in tags["train"]
    assert "confusion_matrix" in tags["validation"]


def test_hparams_with_final_metrics_for_the_hparams_tab(trained_run):
    mux = _multiplexer(trained_run.out / "tensorboard")
    content = mux.PluginRunToTagToContent("hparams")
    assert content, "no HParams summaries written"
    session = None
    for tags in content.values():
        for tag, blob in tags.items():
            if tag == "_hparams_/session_start_info":
                session = plugin_data_pb2.HParamsPluginData.FromString(blob).session_start_info
    assert session is not None
    assert session.hparams["learning_rate"].number_value == 1e-3
    assert session.hparams["image_size"].number_value == 32
    root = tags_by_run(trained_run.out / "tensorboard")["."]
    assert {"test_accuracy", "test_loss"} <= root


def _ink(pixels) -> int:
    """How many pixels of drawn text: dark in every channel."""
    return int((np.asarray(pixels)[..., :3].max(axis=-1) < 128).sum())


def _ink_of_text(text: str) -> int:
    canvas = Image.new("RGB", (1200, 40), "white")
    ImageDraw.Draw(canvas).text((10, 10), text, fill="black")
    return _ink(canvas)


def test_confusion_matrix_shows_every_class_name_whole():
    """Headers are not cut (the hotdog run's read "not-hotd"): the margins hold every pixel of
    every label drawn on its own, however long the name."""
    from trainer.tensorboard import CELL, _confusion_image

    classes = ["hotdog", "not-hotdog", "a class name far longer than any fixed margin would allow"]
    image = _confusion_image(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 3]]), classes)
    top, left = image.shape[0] - 3 * CELL, image.shape[1] - 3 * CELL
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    assert left > measure(f"true {classes[2]}") and top > measure(classes[2])  # grew with it
    assert _ink(image[:top, left:]) == sum(_ink_of_text(name) for name in classes)
    assert _ink(image[top:, :left]) == sum(_ink_of_text(f"true {name}") for name in classes)
