"""What counts as an image, and how one becomes pixels: one answer for every part of the job.

Listing, GCS staging, the bad-image probe, training, evaluation, `trainer.predict` and the
exported model's `serving_default` all use these two, so a file that trains is a file that
serves, with the same pixels (no training/serving skew; the images a training pipeline keeps
for its later epochs are these rounded to uint8, within 0.5 of a level: trainer/data.py).
"""

from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def is_image(relative: str) -> bool:
    """Whether a file name or relative path names an image: a known extension (any case) and
    no hidden part (".DS_Store", ".cache/x.jpg")."""
    parts = relative.split("/")
    return relative.lower().endswith(IMAGE_EXTENSIONS) and not any(
        part.startswith(".") for part in parts
    )


def decode_image(image_bytes, image_size: int):
    """Encoded JPEG/PNG/BMP/GIF bytes -> float32 RGB [size, size, 3] in 0..255.

    Grayscale, RGBA and CMYK become RGB; a GIF gives its first frame. Raises
    tf.errors.InvalidArgumentError for bytes that are not such an image.
    """
    import tensorflow as tf

    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size])  # bilinear, float32
    image.set_shape([image_size, image_size, 3])
    return image
