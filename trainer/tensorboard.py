"""What the run adds to TensorBoard beyond Keras' scalars: sample images, misclassified test
images, the confusion matrix, and HParams so sweeps line up in the HParams tab.

`python -m trainer.tensorboard --logdir DIR` is `tensorboard` without TensorFlow's start-up lines.
"""

from __future__ import annotations

from trainer.quiet import quiet_tensorflow_startup

quiet_tensorflow_startup()  # before TensorFlow loads, when this module is the command

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tensorboard.plugins.hparams import api as hp  # noqa: E402

TILE = 128  # small training images are scaled up so their captions stay readable


def _grid(images: np.ndarray, captions: list[str], columns: int = 4) -> np.ndarray:
    """Tile uint8 images into one RGB image with a caption under each."""
    rows = (len(images) + columns - 1) // columns
    caption_h = 14
    canvas = Image.new("RGB", (columns * TILE, rows * (TILE + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + caption_h)
        canvas.paste(Image.fromarray(image).resize((TILE, TILE)), (x, y))
        draw.text((x + 2, y + TILE + 1), caption[:24], fill="black")
    return np.asarray(canvas)


CELL = 48  # a confusion-matrix cell: room for a count of up to 5 digits
PAD = 6


def _text_image(draw: ImageDraw.ImageDraw, text: str) -> Image.Image:
    """`text` in black on white, cropped to the default font's extent of it."""
    left, top, right, bottom = draw.textbbox((0, 0), text)
    label = Image.new("RGB", (right - left, bottom - top), "white")
    ImageDraw.Draw(label).text((-left, -top), text, fill="black")
    return label


def _confusion_image(confusion: np.ndarray, classes: list[str]) -> np.ndarray:
    """Rows: true class, columns: predicted class. The margins are sized to the longest class
    name, and column headers run upwards, so names of any length stay whole and the matrix
    grows only with the number of classes."""
    n = len(classes)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [_text_image(draw, f"true {name}") for name in classes]
    columns = [_text_image(draw, name).transpose(Image.Transpose.ROTATE_90) for name in classes]
    title = _text_image(draw, "predicted ->")
    left = max(title.width, *(r.width for r in rows)) + 2 * PAD
    top = max(title.height, *(c.height for c in columns)) + 2 * PAD
    canvas = Image.new("RGB", (left + n * CELL, top + n * CELL), "white")
    canvas.paste(title, (PAD, top - PAD - title.height))
    draw = ImageDraw.Draw(canvas)
    peak = max(int(confusion.max()), 1)
    for t in range(n):
        canvas.paste(rows[t], (PAD, top + t * CELL + (CELL - rows[t].height) // 2))
        x = left + t * CELL + (CELL - columns[t].width) // 2
        canvas.paste(columns[t], (x, top - PAD - columns[t].height))  # read upwards from the row
        for p in range(n):
            shade = 255 - int(200 * confusion[t, p] / peak)
            box = (left + p * CELL, top + t * CELL, left + (p + 1) * CELL, top + (t + 1) * CELL)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text(
                (box[0] + PAD, box[1] + CELL // 3),
                str(confusion[t, p]),
                fill="black" if shade > 120 else "white",
            )
    return np.asarray(canvas)


def _to_uint8(images) -> np.ndarray:
    return np.clip(np.round(np.asarray(images)), 0, 255).astype(np.uint8)


def write_sample_batch(log_dir: str, images, labels, classes: list[str]) -> None:
    """An image grid of training images with their labels, as the input pipeline delivers them."""
    captions = [classes[int(label)] for label in labels]
    with tf.summary.create_file_writer(f"{log_dir}/train").as_default():
        tf.summary.image(
            "sample_training_batch",
            _grid(_to_uint8(images), captions)[None],
            step=0,
            description="16 training images (a seeded sample) after decoding, resizing and "
            "any augmentation, with their labels.",
        )


def write_test_report(
    log_dir: str,
    step: int,
    classes: list[str],
    confusion,
    wrong_images,
    wrong_true,
    wrong_predicted,
) -> None:
    """Confusion matrix and the misclassified test images with predicted and true class."""
    with tf.summary.create_file_writer(f"{log_dir}/validation").as_default():
        tf.summary.image(
            "confusion_matrix",
            _confusion_image(np.asarray(confusion), classes)[None],
            step=step,
            description="Rows: true class; columns: predicted class.",
        )
        if len(wrong_images):
            captions = [
                f"{classes[p]} (true {classes[t]})"
                for t, p in zip(wrong_true, wrong_predicted, strict=True)
            ]
            tf.summary.image(
                "misclassified",
                _grid(_to_uint8(wrong_images), captions)[None],
                step=step,
                description="Misclassified test images: predicted (true).",
            )


def hparams_of(cfg) -> dict:
    """The settings of the run's config `cfg` that TensorBoard's HParams dashboard compares
    runs by."""
    d, m, t = cfg.data, cfg.model, cfg.train
    return {
        "learning_rate": t.learning_rate,
        "batch_size": d.batch_size,
        "epochs": t.epochs,
        "dropout": m.dropout,
        "image_size": d.image_size,
        "augment": d.augment,
        "finetune_epochs": t.finetune_epochs,
        "weights": str(m.weights),
    }


def write_hparams(log_dir: str, hparams: dict, metrics: dict) -> None:
    """HParams for this run plus its final metrics, so TensorBoard compares the runs of a sweep."""
    with tf.summary.create_file_writer(log_dir).as_default():
        hp.hparams_config(
            hparams=[hp.HParam(name) for name in hparams],
            metrics=[hp.Metric(name) for name in metrics]
            + [hp.Metric("epoch_accuracy", group="validation", display_name="test accuracy/epoch")],
        )
        hp.hparams(hparams)
        for name, value in metrics.items():
            tf.summary.scalar(name, value, step=0)


def gcs_logdirs(argv: list[str]) -> list[str]:
    """The gs:// folders among TensorBoard's --logdir and --logdir_spec (name:path,...) values."""
    values = []
    for i, arg in enumerate(argv):
        for flag in ("--logdir", "--logdir_spec"):
            if arg == flag and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(f"{flag}="):
                values.append(arg.split("=", 1)[1])
    parts = [part for value in values for part in value.split(",")]
    return [part[part.index("gs://") :] for part in parts if "gs://" in part]


def check_gcs_access(logdirs: list[str]) -> None:
    """TrainerError naming --logdir unless the trainer's GCS client (credentials, or the
    emulator of STORAGE_EMULATOR_HOST) can list each folder: without credentials TensorBoard
    shows an empty page while its data server panics."""
    from trainer.gcs import READER_ROLE, client, retry, split_uri, user_errors

    for uri in logdirs:
        bucket, prefix = split_uri(uri, "--logdir")
        with user_errors(uri, "--logdir", READER_ROLE):
            blobs = client().list_blobs(bucket, prefix=prefix, max_results=1, retry=retry(30))
            next(iter(blobs), None)


def main(argv: list[str]) -> None:
    """`python -m trainer.tensorboard ARGS`: TensorBoard with ARGS, once a gs:// --logdir is
    known to be readable (else one line and exit 2)."""
    import sys

    from trainer import TrainerError

    try:
        check_gcs_access(gcs_logdirs(argv))
    except TrainerError as error:
        print(f"trainer.tensorboard: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    from tensorboard.main import run_main

    run_main()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
