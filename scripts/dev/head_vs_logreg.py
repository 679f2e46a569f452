"""The trainer's head against a converged logistic regression on the same features (a dev tool).

    python scripts/dev/head_vs_logreg.py --train DIR --test DIR --weights PATH \
        [--image-size 96] [--before CHECKOUT] [-- trainer overrides...]

Runs `python -m trainer` on the folders (its test accuracy, from metrics.json; with --before,
first the trainer of another checkout, e.g. `git archive main | tar -x -C DIR`, on the same
folders: both columns side by side, the second run's backbone pass taken from the first's
feature cache, so both heads train on the same features), then computes the
pooled features of the same images with the trainer's own feature extractor (the folded
backbone, in the precision the trainer's run used: train.precision from the overrides, else
auto, which is mixed_bfloat16 on a CPU with native bf16) and fits scikit-learn's
LogisticRegression on them, standardized as the head standardizes them: with C=1
(scikit-learn's default) and C=1e4 (nearly unregularized), each to convergence. Prints one
tab-separated row: [before,] trainer, logreg C=1, logreg C=1e4, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's trainer


def trainer_accuracy(
    *,
    train: str,
    test: str,
    weights: str,
    size: int,
    extra: list[str],
    checkout: Path = REPO,
    feature_cache: str = "null",
) -> float:
    """Test accuracy of one `python -m trainer` run of `checkout`'s trainer on the folders
    (outputs in a temp dir, storage.feature_cache=`feature_cache`)."""
    with tempfile.TemporaryDirectory(prefix="trainer-head-") as scratch:
        command = [sys.executable, "-m", "trainer", f"data.train_dir={train}"]
        command += [f"data.test_dir={test}", f"data.image_size={size}", f"model.weights={weights}"]
        command += [f"storage.feature_cache={feature_cache}", f"output.dir={scratch}/out", *extra]
        env = dict(os.environ, PYTHONPATH=str(checkout))
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"trainer exited {result.returncode}: {result.stderr[-2000:]}")
        return json.loads(Path(scratch, "out", "metrics.json").read_text())["test_accuracy"]


def logreg_accuracies(
    *, train: str, test: str, weights: str, size: int, precision: str = "auto"
) -> dict[float, float]:
    """C -> test accuracy of LogisticRegression on the standardized pooled features, computed in
    `precision` (train.precision's values; a run at the defaults computes its features in
    `auto`'s: mixed_bfloat16 on a CPU with native bf16, whose features differ from float32's)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from trainer.data import load_splits
    from trainer.distribute import choose_precision
    from trainer.features import extract_features
    from trainer.model import build_model, feature_extractor

    choose_precision(precision)

    classes, train_split, test_split = load_splits(train, test, 0.2, seed=0)
    extractor = feature_extractor(build_model(len(classes), size, weights, dropout=0.0))
    with tempfile.TemporaryDirectory(prefix="trainer-head-") as scratch:
        features = {
            name: extract_features(extractor, split, size, 32, 1024, scratch, name)
            for name, split in (("train", train_split), ("test", test_split))
        }
    scaler = StandardScaler().fit(features["train"])
    x_train, x_test = scaler.transform(features["train"]), scaler.transform(features["test"])
    accuracies = {}
    for c in (1.0, 1e4):
        model = LogisticRegression(C=c, max_iter=20000, tol=1e-6).fit(x_train, train_split.labels)
        accuracies[c] = float(np.mean(model.predict(x_test) == test_split.labels))
    return accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--weights", required=True, help="model.weights: a notop .h5")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--before", type=Path, help="another checkout's trainer, run first")
    parser.add_argument("overrides", nargs="*", help="more trainer overrides (after --)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    common = dict(train=args.train, test=args.test, weights=args.weights, size=args.image_size)
    heads = {}
    with tempfile.TemporaryDirectory(prefix="trainer-head-") as cache:
        if args.before:
            heads["before"] = trainer_accuracy(
                **common, extra=args.overrides, checkout=args.before.resolve(), feature_cache=cache
            )
        heads["trainer"] = trainer_accuracy(**common, extra=args.overrides, feature_cache=cache)
    from trainer.quiet import quiet_tensorflow_startup

    quiet_tensorflow_startup()
    # The regression's features in the precision the trainer's run computed its own in
    precision = next(
        (o.split("=", 1)[1] for o in args.overrides if o.startswith("train.precision=")), "auto"
    )
    reference = logreg_accuracies(**common, precision=precision)
    seconds = time.perf_counter() - started
    print("\t".join([*heads, "logreg_C1", "logreg_C1e4", "seconds"]))
    row = [*heads.values(), reference[1.0], reference[1e4]]
    print("\t".join(f"{value:.3f}" for value in row) + f"\t{seconds:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
