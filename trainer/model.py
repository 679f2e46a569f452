"""ResNet50 backbone, classification head, weights loading and freezing.

The model takes raw 0..255 RGB pixels and applies ResNet50's own `preprocess_input` (caffe
mode: BGR, ImageNet mean subtracted) inside the graph, so the exported model needs nothing
else. The backbone's BatchNorm layers stay in inference mode even when the top of the backbone
is unfrozen for fine-tuning: Keras 3 hands `fit`'s `training=True` down to nested models
whatever `training=False` a caller wrote, and a BatchNormalization layer normalizes with its
moving statistics (and keeps them) only while it is not trainable, so `unfreeze_from` leaves
every BatchNormalization frozen, as Keras' transfer-learning guide does.

The head standardizes the pooled features with the training set's mean and variance before its
Dense layer. Pooled ResNet50 features have large, uneven scales (a random-init backbone gives a
mean near 2.7 and peaks above 20; ImageNet, custom or fine-tuned weights each give others), and
Adam at 1e-3 would spend most of a short run rescaling them. The statistics are weights of the
model, so the export standardizes by itself and every replica and worker holds the same values.

The head's Dense kernel carries an L2 penalty of 1 / (2 n), n the training set's size
(`set_head_penalty`): the head's loss is then scikit-learn's LogisticRegression's (C=1) divided
by n, a convex loss with one optimum, which enough steps reach whatever n is. Without it, a
small set is separable in 2,048 dimensions and the unpenalized head drifts towards whatever
direction Adam's steps favour (0.92 against the regression's 0.945 after 2,000 steps on 60
Fashion-MNIST images, docs/performance.md).
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np

from trainer import TrainerError
from trainer.files import file_identity

FEATURES = 2048  # ResNet50's pooled feature width
NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def build_backbone(image_size: int, weights: str | None) -> keras.Model:
    """ResNet50 without its ImageNet top, average-pooled to 2048 features, weights loaded."""
    shape = (image_size, image_size, 3)
    common = dict(include_top=False, input_shape=shape, pooling="avg", name="backbone")
    if weights == "imagenet":
        try:
            return keras.applications.ResNet50(weights="imagenet", **common)
        except ValueError:
            raise
        except Exception as error:  # keras.utils.get_file raises bare Exception on fetch failure
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise TrainerError(
                f"model.weights=imagenet: cannot download the ResNet50 ImageNet weights ({first}). "
                f"Offline? Bake {NOTOP_FILE} into the image's Keras cache (~/.keras/models, the "
                "Dockerfile does this) or pass model.weights=/path/to/" + NOTOP_FILE
            ) from error
    backbone = keras.applications.ResNet50(weights=None, **common)
    if weights is not None:
        load_weights(backbone, weights)
    return backbone


def load_weights(backbone: keras.Model, path: str) -> None:
    """Load Keras' official notop .h5 or a Keras 3 .weights.h5 into `backbone`, or say why not."""
    if not os.path.isfile(path):
        raise TrainerError(f"model.weights={path}: file not found")
    if not path.endswith((".h5", ".hdf5")):
        raise TrainerError(f"model.weights={path}: expected {NOTOP_FILE} or a *.weights.h5 file")
    try:
        # Keras 3 only warns when parts of a .weights.h5 match nothing ("Skipping ... retain their
        # freshly-initialized weights"): a half-loaded backbone must be an error, not a warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone.load_weights(path)
        skipped = [str(w.message) for w in caught if "Skipping" in str(w.message)]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as error:  # h5py, ValueError, KeyError...: all mean "not these weights"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainerError(
            f"model.weights={path}: does not fit ResNet50 without top ({first[:200]})"
        ) from error


@keras.saving.register_keras_serializable(package="trainer")
class Standardize(keras.layers.Layer):
    """(x - mean) / sqrt(variance) per feature, with non-trainable `mean` and `variance` set by
    `set_feature_statistics` before training (identity until then). Unlike keras' Normalization,
    it reads its variables on every call, so assigned or restored values take effect at once."""

    def build(self, input_shape):
        width = input_shape[-1]
        self.mean = self.add_weight(
            shape=(width,), initializer="zeros", trainable=False, name="mean"
        )
        self.variance = self.add_weight(
            shape=(width,), initializer="ones", trainable=False, name="variance"
        )

    def call(self, inputs):
        return (inputs - self.mean) * keras.ops.rsqrt(self.variance)


@keras.saving.register_keras_serializable(package="trainer")
class HeadPenalty(keras.regularizers.Regularizer):
    """`factor` x the sum of the squared weights; `factor` is set by `set_head_penalty` before
    training (0 until then) and read when `fit` traces its step, after each compile."""

    def __init__(self, factor: float = 0.0):
        self.factor = factor

    def __call__(self, weights):
        return self.factor * keras.ops.sum(keras.ops.square(weights))

    def get_config(self):
        return {"factor": self.factor}


def build_head(num_classes: int, dropout: float, seed: int) -> keras.Model:
    """Standardize + Dropout + Dense softmax over pooled features; float32 in every precision
    policy (the head is cheap, its numerics are not)."""
    return keras.Sequential(
        [
            keras.Input((FEATURES,), name="features"),
            Standardize(dtype="float32", name="standardize"),
            keras.layers.Dropout(dropout, seed=seed, dtype="float32"),
            keras.layers.Dense(
                num_classes,
                activation="softmax",
                dtype="float32",
                name="probabilities",
                # Its own seed: the head starts the same whether or not ResNet50 was built
                # (drawing from Keras' global generator) just before it.
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                kernel_regularizer=HeadPenalty(),
            ),
        ],
        name="head",
    )


def local_copy(head: keras.Model) -> keras.Model:
    """A copy of `head` (its layers, weights and penalty) on this process' default device,
    outside any tf.distribute strategy: what the head trains as on cached features when the run
    has several replicas (trainer/phases.py). Call outside a strategy's scope."""
    copy = keras.models.clone_model(head)
    copy.set_weights(head.get_weights())
    return copy


VARIANCE_FLOOR = 1e-2  # relative to the mean variance: a feature's scale-up is at most 10x


def feature_statistics(features: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of `features` (an array or a spilled memmap, read chunk by
    chunk in float64), each variance at least VARIANCE_FLOOR x the mean variance (1 if every
    feature is constant). A feature (nearly) constant on the training set, such as a ReLU
    that barely fires, would otherwise turn a test image's ordinary deviation into a huge input:
    an absolute guard (variance < 1e-12) let a variance of 1e-10 scale a deviation by 1e5, and
    real ImageNet features gave |z| up to 180 on test images. The floor is relative because the
    features' scale differs with every backbone."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for lo in range(0, len(features), chunk):
        part = np.asarray(features[lo : lo + chunk], dtype=np.float64)
        total += part.sum(axis=0)
        squares += np.square(part).sum(axis=0)
    mean = total / len(features)
    variance = np.maximum(squares / len(features) - np.square(mean), 0.0)
    floor = VARIANCE_FLOOR * variance.mean()
    variance = np.maximum(variance, floor) if floor > 0 else np.ones_like(variance)
    return mean.astype(np.float32), variance.astype(np.float32)


def set_feature_statistics(model: keras.Model, features: np.ndarray) -> None:
    """Set the head's standardization to the mean and variance of `features` (the training
    set's pooled features). Called once before training, outside any replica context, so a
    mirrored model gets the same values on every replica."""
    mean, variance = feature_statistics(features)
    layer = model.get_layer("head").get_layer("standardize")
    layer.mean.assign(mean)
    layer.variance.assign(variance)


def set_head_penalty(model: keras.Model, *, train_size: int) -> None:
    """The head's L2 penalty for a training set of `train_size` images: 1 / (2 n), so the head's
    loss is LogisticRegression's (C=1) per image (see the module docstring). Set before `fit`."""
    dense = model.get_layer("head").get_layer("probabilities")
    dense.kernel_regularizer.factor = 0.5 / max(train_size, 1)


def build_model(
    num_classes: int,
    image_size: int,
    weights: str | None,
    dropout: float,
    seed: int = 0,
    *,
    fold: bool = True,
) -> keras.Model:
    """Raw pixels -> preprocess_input -> frozen ResNet50 -> head. Sublayers: `backbone`, `head`.
    `fold`: the backbone stays frozen for the whole run, so it runs as a `FoldedBackbone`
    (trainer/fold.py: the same function, 1.7x as fast); fine-tuning needs Keras' own layers."""
    pixels = keras.Input((image_size, image_size, 3), name="pixels")
    if fold:
        backbone = folded_backbone(image_size, weights, seed)
    else:
        backbone = build_backbone(image_size, weights)
        backbone.trainable = False
    head = build_head(num_classes, dropout, seed)
    return keras.Model(pixels, head(_features(backbone, pixels)), name="resnet50_classifier")


# The folded weights of the last backbone built, kept for the process: a local sweep runs its
# points one after another in one process, and each after the first skips building ResNet50.
_FOLDED: dict[tuple, object] = {}


def folded_backbone(image_size: int, weights: str | None, seed: int):
    """A FoldedBackbone (trainer/fold.py) of ResNet50 with `weights` (random ones drawn after
    keras.utils.set_random_seed(`seed`)), from the process' last fold when it is the same."""
    from trainer.fold import fold, folded_layer

    key = (image_size, weights, seed if weights is None else file_identity(weights))
    if key not in _FOLDED:
        _FOLDED.clear()  # one entry: a sweep over sizes or weights keeps memory bounded
        _FOLDED[key] = fold(build_backbone(image_size, weights))
    return folded_layer(_FOLDED[key], (None, image_size, image_size, 3))


def _features(backbone: keras.Model, pixels):
    return backbone(keras.applications.resnet50.preprocess_input(pixels), training=False)


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to the pooled features (same layers, same weights): what the fast path runs."""
    return keras.Model(
        model.input, _features(model.get_layer("backbone"), model.input), name="feature_extractor"
    )


SERVING_KIND = "resnet50-avg-folded"  # the serving model's backbone is always folded


def backbone_kind(model: keras.Model) -> str:
    """How `model` computes its features ("resnet50-avg" or "resnet50-avg-folded"): features
    from the two differ in their last bits, so the feature cache keeps them apart."""
    folded = not isinstance(model.get_layer("backbone"), keras.Model)
    return SERVING_KIND if folded else "resnet50-avg"


def finetune_start(model: keras.Model, layer_name: str) -> int:
    """Index in the backbone of `layer_name`, the first layer fine-tuning unfreezes; checked
    before training starts, so a misspelt name does not cost a whole first phase."""
    names = [layer.name for layer in model.get_layer("backbone").layers]
    if layer_name not in names:
        raise TrainerError(
            f"train.finetune_from={layer_name}: no such layer in ResNet50 "
            f"(e.g. conv5_block1_1_conv, conv4_block1_1_conv)"
        )
    return names.index(layer_name)


def unfreeze_from(model: keras.Model, layer_name: str) -> int:
    """Make the backbone trainable from `layer_name` on, BatchNormalization layers excepted (see
    the module docstring); return how many layers that unfroze."""
    backbone = model.get_layer("backbone")
    start = finetune_start(model, layer_name)
    backbone.trainable = True
    unfrozen = 0
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        unfrozen += layer.trainable
    return unfrozen


def serving_model(model: keras.Model, dtype: str) -> keras.Model:
    """The trained `model` as the export serves it (output.serving_dtype): the same head on its
    backbone folded (trainer/fold.py) and computing in `dtype`; `model` itself when it already
    is that. Build it inside the strategy's scope: it also evaluates the test set."""
    from trainer.fold import FoldedBackbone, fold, folded_layer

    backbone = model.get_layer("backbone")
    if isinstance(backbone, FoldedBackbone) and backbone.compute_dtype == dtype:
        return model
    folded = backbone.folded() if isinstance(backbone, FoldedBackbone) else fold(backbone)
    pixels = keras.Input(model.input.shape[1:], name="pixels")
    serving = folded_layer(folded, (None, *model.input.shape[1:]), dtype=dtype)
    return keras.Model(pixels, model.get_layer("head")(_features(serving, pixels)), name=model.name)
