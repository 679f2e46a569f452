"""SavedModel with serving signatures, plus labels, metrics and the resolved config.

`serving_default` takes encoded images (tf.string [None]) and does decoding, resizing and
ResNet50 preprocessing in the graph, so TF Serving needs nothing else; `serving_pixels` takes
float RGB pixels [None, H, W, 3] in 0..255. Both return probabilities, class_id, class_name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import keras
import tensorflow as tf

from trainer import rundir
from trainer.images import decode_image


def _outputs(probabilities, labels):
    class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
    return {
        "probabilities": probabilities,
        "class_id": class_id,
        "class_name": tf.gather(labels, class_id),
    }


def export_saved_model(model: keras.Model, classes: list[str], image_size: int, path: str) -> None:
    """Write the SavedModel to a temporary sibling of `path`, then rename it into place, so
    `path` is never half-written (a reader sees the old model or the new one)."""
    staging = rundir.staging_dir(path)
    shutil.rmtree(staging, ignore_errors=True)
    serving = _Serving(model, classes, image_size)
    # The tf.functions themselves, not concrete functions traced beforehand: TensorFlow keys
    # its trace cache on being inside a save, so an earlier trace would be thrown away.
    signatures = {
        "serving_default": serving.serving_default,
        "serving_pixels": serving.serving_pixels,
    }
    with _quiet_save_logs():
        tf.saved_model.save(serving, staging, signatures=signatures)
    replace_dir(staging, path)


@contextlib.contextmanager
def _quiet_save_logs():
    """TensorFlow's saver logs at INFO for every export (input names it renames, "Assets written
    to" the temporary folder): lines about internals and a path that is renamed away next."""
    loggers = [logging.getLogger(name) for name in ("absl", "tensorflow")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Serving(tf.__internal__.tracking.AutoTrackable):
    """What the SavedModel holds: the model's variables and the two signatures.

    Not keras.export.ExportArchive: it traces ResNet50 once per signature and again inside the
    save, walks the whole Keras layer tree looking for lookup tables, and saves each variable
    through a Keras wrapper (what that cost: docs/performance.md). Here the model is traced
    once, by `serving_pixels`, which `serving_default` calls after decoding, and only the plain
    tf.Variables are tracked.
    """

    def __init__(self, model: keras.Model, classes: list[str], image_size: int):
        # The names ExportArchive gave them, so a loaded model looks the same as before.
        self.variables = [v.value for v in model.variables]
        self.trainable_variables = [v.value for v in model.trainable_variables]
        self.non_trainable_variables = [v.value for v in model.non_trainable_variables]
        labels = tf.constant(classes)
        pixel_spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="pixels")
            ],
            autograph=False,
        )
        def serving_pixels(pixels):
            return _outputs(model(pixels, training=False), labels)

        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
            autograph=False,
        )
        def serving_default(image_bytes):
            pixels = tf.map_fn(
                lambda data: decode_image(data, image_size),
                image_bytes,
                fn_output_signature=pixel_spec,
            )
            return serving_pixels(pixels)

        self.serving_pixels = serving_pixels
        self.serving_default = serving_default


def replace_dir(new: str, path: str) -> None:
    """Move directory `new` to `path`, replacing what is there (two renames: a short gap)."""
    old = rundir.old_dir(path)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Write a small file atomically (temporary file, then rename)."""
    partial = rundir.partial_path(path)
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def write_run_files(out_dir: str, classes: list[str], metrics: dict, config_yaml: str) -> None:
    """labels.txt (class_id order), metrics.json and config.yaml."""
    run = rundir.RunDir(out_dir)
    write_text(run.path(rundir.LABELS), "".join(f"{c}\n" for c in classes))
    write_text(run.path(rundir.METRICS), json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    write_text(run.path(rundir.CONFIG), config_yaml)
