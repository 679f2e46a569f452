"""Short runs give good models: the head standardizes the pooled features, so a few epochs of Adam
reach what a converged linear model reaches on the same features.

The real-image set is scikit-learn's handwritten digits (1,797 8x8 scans shipped with the
package), written as PNG files in class folders and upscaled, as a user's folders would be.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import configure
from trainer.job import run
from trainer.synthetic import make_dataset

DIGITS = 5  # classes 0-4: ~900 images
SMALL_PER_CLASS = 12  # the small training set: 60 images, 2 steps an epoch at batch 32
SIZE = 32


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """Digit PNGs (70 % train, 30 % test per class), backbone weights in a file (a user's own
    weights: the trainer and the reference see the same features), and the accuracy of a
    converged LogisticRegression on those standardized features."""
    import keras
    from sklearn.datasets import load_digits

    from trainer.data import load_splits
    from trainer.distribute import choose_precision
    from trainer.features import extract_features
    from trainer.model import build_backbone, build_model, feature_extractor

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    rng = np.random.default_rng(0)
    for digit in range(DIGITS):
        rows = rng.permutation(np.flatnonzero(data.target == digit))
        test_count = int(len(rows) * 0.3)
        for split, part in (("test", rows[:test_count]), ("train", rows[test_count:])):
            folder = root / split / f"digit{digit}"
            folder.mkdir(parents=True)
            for i in part:
                scan = (data.images[i] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(scan).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
                image.save(folder / f"{i:04d}.png")

    keras.utils.set_random_seed(7)
    weights = root / "backbone.weights.h5"
    build_backbone(SIZE, None).save_weights(weights)
    # The reference's features in the precision a run at the defaults computes them in
    # (train.precision=auto: mixed_bfloat16 on a CPU with native bf16, float32 elsewhere).
    policy = keras.mixed_precision.global_policy()
    precision = choose_precision("auto")
    try:
        model = build_model(DIGITS, SIZE, str(weights), dropout=0.0)
        extractor = feature_extractor(model)
        _, train, test = load_splits(str(root / "train"), str(root / "test"), 0.2, seed=0)
        features = {
            name: np.asarray(
                extract_features(extractor, split, SIZE, 32, 1024, str(root), name), np.float32
            )
            for name, split in (("train", train), ("test", test))
        }
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    small = np.concatenate([np.flatnonzero(train.labels == k)[:SMALL_PER_CLASS] for k in range(5)])
    for row in small:  # the small training set: its first images of each class
        source = Path(train.files[row])
        target = root / "small" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return {
        "root": root,
        "weights": weights,
        "precision": precision,
        "reference": _logreg_accuracy(features["train"], train.labels, features["test"], test),
        "small_reference": _logreg_accuracy(
            features["train"][small], train.labels[small], features["test"], test
        ),
    }


def _logreg_accuracy(train_features, train_labels, test_features, test) -> float:
    """Test accuracy of a converged LogisticRegression (C=1) on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    reference = LogisticRegression(max_iter=5000).fit(
        scaler.transform(train_features), train_labels
    )
    return float(np.mean(reference.predict(scaler.transform(test_features)) == test.labels))


@pytest.mark.parametrize(("epochs", "tolerance"), [(5, 0.02), (None, 0.01)], ids=["5", "default"])
def test_digits_head_comes_within_reach_of_a_converged_logistic_regression(
    digits, cfg, composed_config, epochs, tolerance
):
    """Trainer on real digit images vs LogisticRegression on the same standardized features:
    within 0.02 after 5 epochs, within 0.01 at the default epochs (being better is fine)."""
    configure(
        cfg,
        f"data.train_dir={digits['root'] / 'train'}",
        f"data.test_dir={digits['root'] / 'test'}",
        f"data.image_size={SIZE}",
        f"data.batch_size={composed_config.data.batch_size}",  # the default, as before
        f"model.weights={digits['weights']}",
        *([f"train.epochs={epochs}"] if epochs else []),
    )
    metrics = run(cfg)
    accuracy = metrics["test_accuracy"]
    assert metrics["precision"] == digits["precision"]  # the reference's features are the run's
    assert digits["reference"] >= 0.95  # the features are good: the head has to learn them
    assert accuracy >= digits["reference"] - tolerance, (accuracy, digits["reference"])


def test_a_60_image_set_at_5_epochs_comes_within_001_of_the_regression_too(digits, cfg):
    """10 batches of 32 would leave the head far from the optimum of its loss: on cached
    features the epochs repeat the set up to train.head_min_steps steps, and the head carries
    the regression's penalty, so a small set ends where the converged regression does."""
    configure(
        cfg,
        f"data.train_dir={digits['root'] / 'small'}",
        f"data.test_dir={digits['root'] / 'test'}",
        f"data.image_size={SIZE}",
        f"model.weights={digits['weights']}",
        "train.epochs=5",
    )
    accuracy = run(cfg)["test_accuracy"]
    assert accuracy >= digits["small_reference"] - 0.01, (accuracy, digits["small_reference"])


def _shapes(root) -> list[str]:
    """120 generated training images (two classes) and 40 test images."""
    make_dataset(str(root / "train"), ["hotdog", "not-hotdog"], 60, min_size=56, max_size=96)
    make_dataset(str(root / "test"), ["hotdog", "not-hotdog"], 20, min_size=56, max_size=96, seed=1)
    return [f"data.train_dir={root / 'train'}", f"data.test_dir={root / 'test'}"]


def _train_on_shapes(tmp_path, cfg, composed_config, caplog, *overrides: str):
    """The trainer on the shapes set at 64 px, random backbone, 3 epochs: (its log, test
    accuracy)."""
    configure(
        cfg,
        *_shapes(tmp_path),
        "data.image_size=64",
        f"data.batch_size={composed_config.data.batch_size}",  # the default, as before
        "model.weights=null",
        "train.epochs=3",
        *overrides,
    )
    with caplog.at_level(logging.INFO, logger="trainer"):
        accuracy = run(cfg)["test_accuracy"]
    return caplog.text, accuracy


def test_shapes_reach_90_percent_in_3_epochs_with_a_random_backbone(
    tmp_path, cfg, composed_config, caplog
):
    """The fast path: statistics from the cached training features."""
    _, accuracy = _train_on_shapes(tmp_path, cfg, composed_config, caplog)
    assert accuracy >= 0.90


@pytest.mark.slow
def test_augmented_shapes_reach_90_percent_in_3_epochs_too(tmp_path, cfg, composed_config, caplog):
    """The image path (data.augment=true): statistics from one un-augmented pass."""
    log, accuracy = _train_on_shapes(tmp_path, cfg, composed_config, caplog, "data.augment=true")
    assert "feature statistics from 120 un-augmented training images" in log
    assert accuracy >= 0.90
