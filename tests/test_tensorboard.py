"""TensorBoard: the event files a user's TensorBoard reads, read back with TensorBoard's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer.tensorboard import TILE, _confusion_image


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


def _last_image(mux: EventMultiplexer, run: str, tag: str) -> np.ndarray:
    """The last image logged under `tag`, decoded (an image summary holds w, h, PNG bytes)."""
    event = mux.Tensors(run, tag)[-1]
    png = tf.make_ndarray(event.tensor_proto)[2]
    return tf.io.decode_png(png, channels=3).numpy()


def test_sample_batch_images_are_pictures(trained_run):
    """Each tile of the grids is a picture, not a constant: a blank batch would fail."""
    mux = _multiplexer(trained_run.out / "tensorboard")
    grid = _last_image(mux, "train", "sample_training_batch")
    tiles = [grid[:TILE, i * TILE : (i + 1) * TILE] for i in range(4)]
    assert all(tile.std() > 5 for tile in tiles), [float(t.std()) for t in tiles]
    assert len({tile.tobytes() for tile in tiles}) == 4  # four different images


def test_confusion_matrix_image_shows_the_matrix_of_metrics_json(trained_run):
    """The image drawn in TensorBoard is the one metrics.json's matrix gives (which test_export
    checks against the exported model): a wrong or blank matrix fails."""
    mux = _multiplexer(trained_run.out / "tensorboard")
    logged = _last_image(mux, "validation", "confusion_matrix")
    metrics = trained_run.metrics
    expected = _confusion_image(np.array(metrics["confusion_matrix"]), metrics["classes"])
    assert logged.std() > 5
    np.testing.assert_array_equal(logged, expected)


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
    assert session.hparams["image_size"].number_value == 48
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
