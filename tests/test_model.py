"""Backbone, head, weights files: what the model is made of and what a bad weights file says."""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import configure, last_error_line, make_folders, run_trainer, trainer_env
from trainer import TrainerError
from trainer.job import run
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


def test_missing_weights_file_is_an_error_naming_it(tmp_path, cfg):
    train_dir, test_dir = make_folders(tmp_path / "data", train=3, test=2)
    missing = tmp_path / "nope.weights.h5"
    configure(cfg, f"data.train_dir={train_dir}", f"data.test_dir={test_dir}")
    with pytest.raises(TrainerError) as error:
        run(configure(cfg, f"model.weights={missing}"))
    assert str(error.value) == f"model.weights={missing}: file not found"
    assert error.value.exit_code == 2


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


def _realistic_batchnorm(backbone: keras.Model, seed: int) -> None:
    """Moving statistics far from a random init's identity (mean 0, variance 1), as trained
    weights have them: batch statistics then give visibly different activations."""
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            width = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 2, width).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 5, width).astype("float32"))


def _moving_statistics(backbone: keras.Model) -> dict[str, np.ndarray]:
    return {
        w.path: np.array(w.numpy())
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for w in (layer.moving_mean, layer.moving_variance)
    }


def test_fine_tuning_trains_the_top_convs_and_leaves_batchnorm_in_inference_mode(tmp_path):
    """What train=finetune does to the backbone: Keras' fit passes training=True down to the
    nested ResNet50, so its BatchNorm layers must stay non-trainable to keep normalizing with
    (and keeping) their moving statistics, as Keras' transfer-learning guide does."""
    from trainer.model import unfreeze_from
    from trainer.train import Phase, Training, fit

    keras.utils.set_random_seed(0)
    model = build_model(num_classes=2, image_size=SIZE, weights=None, dropout=0.0, fold=False)
    backbone = model.get_layer("backbone")
    _realistic_batchnorm(backbone, seed=1)
    statistics = _moving_statistics(backbone)
    conv = backbone.get_layer("conv5_block3_3_conv")
    conv_before = np.array(conv.kernel.numpy())
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (16, SIZE, SIZE, 3)).astype("float32")
    labels = rng.integers(0, 2, 16)

    unfreeze_from(model, "conv5_block1_1_conv")
    fit(
        model,
        tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(8),
        None,
        phase=Phase("fine-tune", learning_rate=1e-3, epochs=2),
        training=Training(total_epochs=2, log_dir=str(tmp_path / "logs")),
    )

    assert not np.allclose(conv.kernel.numpy(), conv_before), "conv5 was not fine-tuned"
    after = _moving_statistics(backbone)
    for path, values in statistics.items():
        np.testing.assert_array_equal(after[path], values, err_msg=path)
    extractor = feature_extractor(model)
    np.testing.assert_allclose(
        extractor(pixels[:4], training=True), extractor(pixels[:4], training=False), rtol=1e-5
    )
    assert all(
        not layer.trainable
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_only_the_head_trains_while_the_backbone_is_frozen():
    keras.utils.set_random_seed(0)
    model = build_model(num_classes=3, image_size=SIZE, weights=None, dropout=0.5)
    assert [w.path for w in model.trainable_weights] == [
        "head/probabilities/kernel",
        "head/probabilities/bias",
    ]
    assert model.output.dtype == "float32"


def test_model_takes_raw_pixels_and_applies_resnet50_preprocessing_itself():
    keras.utils.set_random_seed(0)
    model = build_model(num_classes=2, image_size=SIZE, weights=None, dropout=0.0)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")

    backbone, head = model.get_layer("backbone"), model.get_layer("head")
    by_hand = head(backbone(keras.applications.resnet50.preprocess_input(pixels.copy())))

    np.testing.assert_allclose(model(pixels), by_hand, rtol=1e-5, atol=1e-6)


def test_misspelt_finetune_layer_is_an_error_before_any_training(tmp_path, cfg, caplog):
    train_dir, test_dir = make_folders(tmp_path / "data", train=3, test=2)
    configure(cfg, f"data.train_dir={train_dir}", f"data.test_dir={test_dir}")
    configure(cfg, "train.finetune_epochs=1", "train.finetune_from=conv9_nope")
    with caplog.at_level("INFO", logger="trainer"), pytest.raises(TrainerError) as error:
        run(cfg)
    assert str(error.value).startswith("train.finetune_from=conv9_nope")
    assert error.value.exit_code == 2
    assert "features cached" not in caplog.text and "epoch 1/" not in caplog.text


def _standardized(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """`test` through a head whose standardization has `train`'s statistics."""
    from trainer.model import set_feature_statistics

    model = build_model(num_classes=2, image_size=SIZE, weights=None, dropout=0.0)
    set_feature_statistics(model, train)
    return keras.ops.convert_to_numpy(model.get_layer("head").get_layer("standardize")(test))


def test_a_feature_nearly_constant_in_training_stays_bounded_on_test_images():
    """A ReLU that barely fires on the training set (variance 1e-10, far above an absolute
    guard's 1e-12) must not turn a test image's ordinary deviation into a huge input; the other
    features are standardized exactly."""
    rng = np.random.default_rng(0)
    train = rng.normal(2.0, 1.0, (200, 2048)).astype(np.float32)
    train[:, 0] = 0.5 + 1e-5 * rng.standard_normal(200)
    test = rng.normal(2.0, 1.0, (5, 2048)).astype(np.float32)
    test[:, 0] = 1.5  # one unit off: an ordinary deviation for the other features

    z = _standardized(train, test)

    assert np.abs(z[:, 0]).max() <= 20, z[:, 0]
    expected = (test[:, 1:] - train[:, 1:].mean(0)) / train[:, 1:].std(0)
    np.testing.assert_allclose(z[:, 1:], expected, rtol=1e-3, atol=1e-3)


def test_the_head_carries_logistic_regressions_penalty_for_its_training_set():
    """The head's loss is LogisticRegression's (C=1) per image: the mean cross-entropy plus
    sum(W**2) / (2 n), n the training set's size, so it has the regression's optimum."""
    from trainer.model import set_head_penalty

    model = build_model(num_classes=3, image_size=SIZE, weights=None, dropout=0.0)
    set_head_penalty(model, train_size=60)
    head = model.get_layer("head")
    head(np.zeros((1, 2048), np.float32))
    kernel = keras.ops.convert_to_numpy(head.get_layer("probabilities").kernel)
    penalty = float(keras.ops.convert_to_numpy(keras.ops.sum(head.losses)))
    assert penalty == pytest.approx(np.sum(kernel.astype(np.float64) ** 2) / 120, rel=1e-5)
