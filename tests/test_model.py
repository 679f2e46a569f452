"""Backbone, head, weights files: what the model is made of and what a bad weights file says."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest

from tests.conftest import SMALL, last_error_line, make_folders, run_trainer, trainer_env
from trainer import TrainerError
from trainer.model import NOTOP_FILE, build_backbone, build_model, feature_extractor

SIZE = 32


def _reference_backbone(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_backbone(SIZE, None)


def _write_legacy_notop_h5(model: keras.Model, path) -> None:
    """The layout of Keras' official resnet50_..._notop.h5 (per-layer groups, weight_names)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.mark.parametrize("kind", ["official_notop_h5", "keras3_weights_h5"])
def test_weights_file_is_loaded_into_the_backbone(tmp_path, kind):
    source = _reference_backbone(seed=3)
    if kind == "official_notop_h5":
        path = tmp_path / NOTOP_FILE
        _write_legacy_notop_h5(source, path)
    else:
        path = tmp_path / "backbone.weights.h5"
        source.save_weights(path)

    keras.utils.set_random_seed(99)  # a different random init, to be overwritten by the file
    loaded = build_backbone(SIZE, str(path))

    for expected, actual in zip(source.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, actual)


def test_weights_file_that_does_not_fit_is_refused_naming_it(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(TrainerError, match=f"model.weights={path}: does not fit ResNet50"):
        build_backbone(SIZE, str(path))


def test_missing_weights_file_exits_2_naming_it(tmp_path):
    train_dir, test_dir = make_folders(tmp_path / "data", train=3, test=2)
    missing = tmp_path / "nope.weights.h5"
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        *SMALL,
        f"model.weights={missing}",
        f"output.dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert last_error_line(result) == f"trainer: error: model.weights={missing}: file not found"


def test_offline_imagenet_download_names_both_remedies(tmp_path):
    """No network (a proxy that refuses): the error says how to run offline."""
    train_dir, test_dir = make_folders(tmp_path / "data", train=3, test=2)
    closed = "http://127.0.0.1:9"  # discard port: connection refused, never the real network
    env = trainer_env(
        KERAS_HOME=str(tmp_path / "keras"),
        HTTPS_PROXY=closed,
        HTTP_PROXY=closed,
        https_proxy=closed,
        http_proxy=closed,
    )
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "data.image_size=32",
        "model.weights=imagenet",
        f"output.dir={tmp_path}/out",
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2
    line = last_error_line(result)
    assert line.startswith("trainer: error: model.weights=imagenet: cannot download")
    assert "Bake resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 into the image" in line
    assert "model.weights=/path/to/" in line


def test_backbone_is_frozen_and_its_batchnorm_stays_in_inference_mode():
    keras.utils.set_random_seed(0)
    model = build_model(num_classes=3, image_size=SIZE, weights=None, dropout=0.5)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")

    assert [w.path for w in model.trainable_weights] == [
        "head/probabilities/kernel",
        "head/probabilities/bias",
    ]
    extractor = feature_extractor(model)
    # training=True would switch BatchNorm to batch statistics; the backbone must ignore it.
    np.testing.assert_allclose(
        extractor(pixels, training=True), extractor(pixels, training=False), rtol=1e-6
    )
    assert model.output.dtype == "float32"


def test_model_takes_raw_pixels_and_applies_resnet50_preprocessing_itself():
    keras.utils.set_random_seed(0)
    model = build_model(num_classes=2, image_size=SIZE, weights=None, dropout=0.0)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")

    backbone, head = model.get_layer("backbone"), model.get_layer("head")
    by_hand = head(backbone(keras.applications.resnet50.preprocess_input(pixels.copy())))

    np.testing.assert_allclose(model(pixels), by_hand, rtol=1e-5, atol=1e-6)


def test_misspelt_finetune_layer_exits_2_before_any_training(tmp_path):
    train_dir, test_dir = make_folders(tmp_path / "data", train=3, test=2)
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        *SMALL,
        "train.finetune_epochs=1",
        "train.finetune_from=conv9_nope",
        f"output.dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert last_error_line(result).startswith("trainer: error: train.finetune_from=conv9_nope")
    assert "features cached" not in result.stdout and "epoch 1/" not in result.stdout
