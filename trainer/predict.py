"""`python -m trainer.predict MODEL_DIR IMAGE_OR_DIR...`: classify images with an exported model.

MODEL_DIR is a run's output.dir or its saved_model/ folder. Prints one tab-separated line per
image: path, class, probability. Folders are searched recursively for JPEG/PNG/BMP/GIF files.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainer.quiet import quiet_tensorflow_startup

quiet_tensorflow_startup()  # TensorFlow's C++ start-up lines would bury the results

from trainer import ExitCode, TrainerError  # noqa: E402
from trainer.gcs import cache_path, default_cache_dir, is_gcs, list_objects, stage_prefix  # noqa: E402
from trainer.images import is_image  # noqa: E402
from trainer.rundir import SAVED_MODEL, SUCCESS  # noqa: E402

BATCH = 32


def find_images(paths: list[str]) -> list[str]:
    """The image files named by `paths`, folders expanded recursively and sorted."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(folder, f) for f in sorted(files) if is_image(f)]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise TrainerError(f"{path}: no such file or folder")
    return found


def stage_model_dir(uri: str, cache_dir: str | None = None) -> str:
    """A local copy of an exported model directory (the folder itself when it is local).
    For a gs:// run directory only its saved_model/ is fetched, and only if `_SUCCESS` is there."""
    if not is_gcs(uri):
        if not os.path.isdir(uri):
            raise TrainerError(f"{uri}: model folder not found")
        return uri
    key = "MODEL_DIR"
    local = cache_path(cache_dir or default_cache_dir(), "models", uri)
    names = list_objects(uri, key, lambda name: name in (SUCCESS, "saved_model.pb"), 60)
    if "saved_model.pb" in names:  # the saved_model/ folder itself
        stage_prefix(uri, local, key)
    elif SUCCESS in names:  # a run's output.dir: the model only, the rest may be large
        stage_prefix(f"{uri.rstrip('/')}/{SAVED_MODEL}", os.path.join(local, SAVED_MODEL), key)
    else:
        raise TrainerError(
            f"{uri}: no saved_model.pb and no _SUCCESS here: check the path, or wait until the"
            " run has published its model (it writes _SUCCESS last)"
        )
    return local


def load_model(model_dir: str):
    """The `serving_default` signature of the SavedModel in `model_dir` (or its saved_model/)."""
    import tensorflow as tf

    local = stage_model_dir(model_dir)
    if os.path.isdir(os.path.join(local, SAVED_MODEL)):
        local = os.path.join(local, SAVED_MODEL)
    if not os.path.isfile(os.path.join(local, "saved_model.pb")):
        raise TrainerError(f"{model_dir}: no SavedModel here (expected saved_model.pb)")
    return tf.saved_model.load(local).signatures["serving_default"]


def classify(serve, paths: list[str]):
    """Yield (path, class_name, probability, error) for each image, in order."""
    import tensorflow as tf

    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
        data = [open(p, "rb").read() for p in chunk]
        try:
            results = [serve(image_bytes=tf.constant(data))]
            groups = [chunk]
        except tf.errors.InvalidArgumentError:  # a bad file in the batch: go one by one
            results, groups = [], []
            for path, blob in zip(chunk, data, strict=True):
                try:
                    results.append(serve(image_bytes=tf.constant([blob])))
                    groups.append([path])
                except tf.errors.InvalidArgumentError:
                    yield path, None, None, "cannot decode image"
        for out, group in zip(results, groups, strict=True):
            names = out["class_name"].numpy()
            probs = out["probabilities"].numpy().max(axis=1)
            for path, name, prob in zip(group, names, probs, strict=True):
                yield path, name.decode(), float(prob), None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.predict",
        description="Classify images with a trained run's exported model: one line per image,"
        " path<TAB>class<TAB>probability.",
    )
    parser.add_argument("model_dir", help="a run's output.dir or its saved_model/ (local or gs://)")
    parser.add_argument("images", nargs="+", help="image files or folders")
    args = parser.parse_args(argv)
    try:
        paths = find_images(args.images)
        if not paths:
            raise TrainerError(f"no images (JPEG, PNG, BMP, GIF) in {' '.join(args.images)}")
        serve = load_model(args.model_dir)
        failed = 0
        for path, name, prob, error in classify(serve, paths):
            if error:
                failed += 1
                print(f"trainer.predict: {path}: {error}", file=sys.stderr)
            else:
                print(f"{path}\t{name}\t{prob:.4f}", flush=True)
    except TrainerError as error:
        print(f"trainer.predict: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    if failed:
        sys.exit(ExitCode.USER_ERROR)


if __name__ == "__main__":
    main()
