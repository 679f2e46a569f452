"""The exported run: SavedModel signatures called as TF Serving would, and the files beside it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from tests.conftest import CLASSES
from trainer.export import replace_dir
from trainer.images import decode_image


@pytest.fixture(scope="module")
def signatures(trained_run):
    return tf.saved_model.load(str(trained_run.out / "saved_model")).signatures


def _test_images(trained_run):
    files = sorted(trained_run.test_dir.glob("*/*.jpg"))
    labels = [CLASSES.index(f.parent.name) for f in files]
    return files, np.array(labels)


def test_output_dir_has_the_documented_layout(trained_run):
    names = {p.name for p in trained_run.out.iterdir()}
    assert {
        "saved_model",
        "labels.txt",
        "metrics.json",
        "config.yaml",
        "tensorboard",
        "_SUCCESS",
    } <= names
    assert not [n for n in names if "partial" in n or n.endswith(".old")]
    assert (trained_run.out / "labels.txt").read_text() == "cat\ndog\n"
    metrics = trained_run.metrics
    for key in [
        "test_accuracy",
        "test_loss",
        "epochs",
        "classes",
        "num_train",
        "num_test",
        "wall_seconds",
    ]:
        assert key in metrics
    config = OmegaConf.load(trained_run.out / "config.yaml")
    assert config.data.image_size == 48 and config.output.dir == str(trained_run.out)


def test_serving_default_classifies_jpeg_bytes(trained_run, signatures):
    files, labels = _test_images(trained_run)
    serve = signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["image_bytes"]

    out = serve(image_bytes=tf.constant([f.read_bytes() for f in files]))

    assert out["probabilities"].dtype == tf.float32
    assert out["probabilities"].shape == (len(files), 2)
    assert out["class_id"].dtype == tf.int64 and out["class_name"].dtype == tf.string
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(out["class_id"].numpy() == labels) >= 0.95
    names = [n.decode() for n in out["class_name"].numpy()]
    assert names == [CLASSES[i] for i in out["class_id"].numpy()]


def test_serving_default_takes_png_too(trained_run, signatures, tmp_path):
    from PIL import Image

    jpeg = sorted(trained_run.test_dir.glob("dog/*.jpg"))[0]
    png = tmp_path / "dog.png"
    Image.open(jpeg).save(png)
    out = signatures["serving_default"](image_bytes=tf.constant([png.read_bytes()]))
    assert out["class_name"].numpy()[0] == b"dog"


def test_exported_model_reproduces_the_metrics_from_cached_features(trained_run, signatures):
    """metrics.json was computed by the head on cached features; the exported full model
    must give the same loss and accuracy from the pixels: the fast path is exact."""
    files, labels = _test_images(trained_run)
    pixels = tf.stack([decode_image(tf.io.read_file(str(f)), 48) for f in files])
    probabilities = signatures["serving_pixels"](pixels=pixels)["probabilities"].numpy()

    loss = -np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1)))
    accuracy = np.mean(probabilities.argmax(axis=1) == labels)
    assert accuracy == trained_run.metrics["test_accuracy"]
    assert loss == pytest.approx(trained_run.metrics["test_loss"], rel=1e-4, abs=1e-6)


def _cached_features(trained_run, split: str) -> np.ndarray:
    """The backbone's features of the run's `split` set, from the feature cache entry its log
    names."""
    from trainer import feature_cache

    log = (trained_run.out / "train.log").read_text()
    found = re.search(
        rf"the {split} set's features stored as (\S+)\.npy"
        rf"|features of the {split} set from the feature cache: .*?, (\S+)\.npy",
        log,
    )
    assert found, f"no feature cache entry of the {split} set in the log"
    uri, key = (found[1] or found[2]).rsplit("/", 1)
    features = feature_cache.lookup(uri, key)
    assert features is not None, f"{uri}/{key}.npy"
    return features


def test_the_exported_head_standardizes_with_the_training_sets_statistics(trained_run):
    """The head's mean and variance, stored in the SavedModel, are the training set's: the test
    set's would leak it into the model (and its accuracy)."""
    train, test = _cached_features(trained_run, "train"), _cached_features(trained_run, "test")
    metrics = trained_run.metrics
    assert (len(train), len(test)) == (metrics["num_train"], metrics["num_test"])
    loaded = tf.saved_model.load(str(trained_run.out / "saved_model"))
    stored = {
        v.name.split(":")[0].rsplit("/", 1)[-1]: v.numpy()
        for v in loaded.variables
        if v.shape == (train.shape[1],)
    }
    for name, statistic in (("mean", np.mean), ("variance", np.var)):
        of_train = statistic(train.astype(np.float64), axis=0)
        of_test = statistic(test.astype(np.float64), axis=0)
        assert not np.allclose(of_train, of_test, rtol=1e-3)  # the sets tell them apart
        if name == "variance":  # floored at 1e-2 x the mean variance (a dead or rare ReLU)
            of_train = np.maximum(of_train, 1e-2 * of_train.mean())
        np.testing.assert_allclose(stored[name], of_train, rtol=1e-4, atol=1e-6, err_msg=name)


def test_replacing_a_directory_leaves_no_partial_state(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")

    replace_dir(str(tmp_path / "new"), str(tmp_path / "model"))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.txt"]


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not plain JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_are_plain_json_and_agree_with_the_exported_model(trained_run, signatures):
    """metrics.json parses as strict JSON (no NaN, no numpy types); its confusion matrix (rows:
    true class, columns: predicted) and accuracy are what the exported model gives on the test
    images."""
    metrics = _strict_json((trained_run.out / "metrics.json").read_text())
    files, labels = _test_images(trained_run)
    out = signatures["serving_default"](image_bytes=tf.constant([f.read_bytes() for f in files]))
    predicted = out["class_id"].numpy()
    expected = np.zeros((2, 2), dtype=int)
    np.add.at(expected, (labels, predicted), 1)

    assert metrics["classes"] == CLASSES and metrics["num_test"] == len(files)
    assert metrics["confusion_matrix"] == expected.tolist()
    assert all(isinstance(v, int) for row in metrics["confusion_matrix"] for v in row)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-9)
    assert isinstance(metrics["test_loss"], float) and np.isfinite(metrics["test_loss"])


def test_serving_pixels_gives_class_id_and_name_of_the_highest_probability(trained_run, signatures):
    files, _ = _test_images(trained_run)
    pixels = tf.stack([decode_image(tf.io.read_file(str(f)), 48) for f in files])
    out = signatures["serving_pixels"](pixels=pixels)
    probabilities = out["probabilities"].numpy()

    assert out["class_id"].dtype == tf.int64 and out["class_name"].dtype == tf.string
    assert out["class_id"].numpy().tolist() == probabilities.argmax(axis=1).tolist()
    names = [n.decode() for n in out["class_name"].numpy()]
    assert names == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    assert {"cat", "dog"} == set(names)  # both classes occur: a constant answer fails


@pytest.mark.parametrize("fmt", ["BMP", "GIF"])
def test_serving_default_takes_bmp_and_gif_bytes(trained_run, signatures, tmp_path, fmt):
    """README promises JPEG, PNG, BMP and GIF bytes; each gives the JPEG's class."""
    from PIL import Image

    files = [sorted(trained_run.test_dir.glob(f"{c}/*.jpg"))[0] for c in CLASSES]
    converted = []
    for f in files:
        path = tmp_path / f"{f.stem}.{fmt.lower()}"
        Image.open(f).convert("RGB").save(path, fmt)
        converted.append(path.read_bytes())
    serve = signatures["serving_default"]
    out = serve(image_bytes=tf.constant(converted))
    from_jpeg = serve(image_bytes=tf.constant([f.read_bytes() for f in files]))
    assert [n.decode() for n in out["class_name"].numpy()] == CLASSES
    assert out["class_id"].numpy().tolist() == from_jpeg["class_id"].numpy().tolist()
