"""The folded backbone (trainer/fold.py) computes what Keras' frozen ResNet50 computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer.fold import FoldedBackbone, fold_backbone
from trainer.model import build_backbone, build_model

SIZE = 64


def _with_batchnorm_statistics(backbone: keras.Model, seed: int = 1) -> keras.Model:
    """Give every BatchNormalization the kind of statistics trained weights have (a fresh one
    is the identity, and folding it would prove nothing)."""
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, shape).astype("float32"),  # gamma
                    rng.normal(0.0, 0.1, shape).astype("float32"),  # beta
                    rng.normal(0.0, 0.1, shape).astype("float32"),  # moving mean
                    rng.uniform(0.5, 1.5, shape).astype("float32"),  # moving variance
                ]
            )
    return backbone


def _preprocessed(count: int = 4, seed: int = 0) -> np.ndarray:
    pixels = np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 3)).astype("float32")
    return keras.applications.resnet50.preprocess_input(pixels)


@pytest.fixture
def policy():
    """Restores the global precision policy each test sets."""
    before = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(before)


def test_folded_backbone_equals_keras_resnet50_in_float32(policy):
    policy("float32")
    keras.utils.set_random_seed(0)
    backbone = _with_batchnorm_statistics(build_backbone(SIZE, None))
    folded = fold_backbone(backbone)
    x = _preprocessed()

    expected = np.asarray(backbone(x, training=False))
    got = np.asarray(folded(x))

    assert got.shape == (4, 2048) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert not folded.trainable_weights


def test_under_bfloat16_the_folded_backbone_is_as_close_to_float32_as_keras_own(policy):
    keras.utils.set_random_seed(0)
    policy("float32")
    x = _preprocessed(count=8)
    reference = np.asarray(_with_batchnorm_statistics(build_backbone(SIZE, None))(x))
    policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    backbone = _with_batchnorm_statistics(build_backbone(SIZE, None))
    folded = fold_backbone(backbone)

    def error(features) -> float:
        features = np.asarray(features, dtype=np.float32)
        return float(np.abs(features - reference).mean() / np.abs(reference).mean())

    # float32 variables (what every strategy broadcasts), bfloat16 compute
    assert folded.kernel_values.dtype == "float32" and folded.compute_dtype == "bfloat16"
    keras_error, folded_error = error(backbone(x, training=False)), error(folded(x))
    assert keras_error < 0.05
    assert folded_error < 1.5 * keras_error


def test_kernels_of_any_size_fold_into_two_weights(policy):
    """Every kernel and every bias shares one weight (a SavedModel's save costs ~2 ms a
    variable), whatever their shapes."""
    policy("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 3))
    x = keras.layers.Conv2D(5, 3, name="odd")(inputs)  # 135 values
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(7, 1, name="odder")(x)  # 35 values
    x = keras.layers.BatchNormalization()(x)
    small = _with_batchnorm_statistics(
        keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    )
    folded = fold_backbone(small)
    pixels = np.random.default_rng(0).normal(size=(4, 9, 9, 3)).astype("float32")

    expected = np.asarray(small(pixels, training=False))
    np.testing.assert_allclose(np.asarray(folded(pixels)), expected, rtol=1e-5, atol=1e-5)
    assert len(folded.weights) == 2


def test_the_model_folds_its_backbone_unless_it_will_be_fine_tuned(policy):
    policy("float32")
    frozen = build_model(2, SIZE, None, 0.2)
    tuned = build_model(2, SIZE, None, 0.2, fold=False)

    assert isinstance(frozen.get_layer("backbone"), FoldedBackbone)
    assert isinstance(tuned.get_layer("backbone"), keras.Model)
    assert [w.path for w in frozen.trainable_weights] == [w.path for w in tuned.trainable_weights]


def _backbone_weights(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_layer("backbone").weights]


def test_a_process_reuses_its_last_fold_only_for_the_same_weights(policy, tmp_path, monkeypatch):
    """A local sweep runs its points in one process: a point after the first takes the folded
    weights of the one before, if they are the same weights; the result is what a fresh build
    gives, the head included."""
    from trainer import model as model_module

    policy("float32")
    built = []
    real = model_module.build_backbone
    monkeypatch.setattr(
        model_module, "build_backbone", lambda *a, **k: built.append(a) or real(*a, **k)
    )

    def build(seed: int, weights=None):
        keras.utils.set_random_seed(seed)
        return build_model(2, SIZE, weights, 0.2, seed=seed)

    model_module._FOLDED.clear()
    first = build(1)
    again = build(1)
    assert len(built) == 1  # reused
    for a, b in zip(
        _backbone_weights(first) + [np.asarray(w) for w in first.get_layer("head").weights],
        _backbone_weights(again) + [np.asarray(w) for w in again.get_layer("head").weights],
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    other_seed = build(2)  # other random weights
    assert len(built) == 2
    assert not np.array_equal(_backbone_weights(other_seed)[0], _backbone_weights(first)[0])

    weights = tmp_path / "backbone.weights.h5"
    keras.utils.set_random_seed(3)
    build_backbone(SIZE, None).save_weights(weights)
    from_file = build(1, str(weights))
    assert len(built) == 3
    keras.utils.set_random_seed(4)
    build_backbone(SIZE, None).save_weights(weights)  # the same file, rewritten
    rewritten = build(1, str(weights))
    assert len(built) == 4
    assert not np.array_equal(_backbone_weights(rewritten)[0], _backbone_weights(from_file)[0])

    model_module._FOLDED.clear()  # a fresh process
    fresh = build(2)
    for a, b in zip(_backbone_weights(fresh), _backbone_weights(other_seed), strict=True):
        np.testing.assert_array_equal(a, b)
