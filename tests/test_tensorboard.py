"""TensorBoard: the event files a user's TensorBoard reads, read back with TensorBoard's reader."""

from __future__ import annotations

from pathlib import Path

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
