"""The fast export writes the same model as the ExportArchive-based one it replaced.

`_export_with_export_archive` is a verbatim copy of the old `export_saved_model` (before the
single-trace export): both signatures of both SavedModels must give bit-identical outputs on
the same inputs, with the same input names, output keys and dtypes.
"""

from __future__ import annotations

import io
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.export import _outputs, export_saved_model, replace_dir
from trainer.images import decode_image
from trainer.model import build_model

SIZE = 32
CLASSES = ["cat", "dog", "fox"]


def _export_with_export_archive(model, classes, image_size, path) -> None:
    labels = tf.constant(classes)
    pixel_spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)

    def serve_bytes(image_bytes):
        pixels = tf.map_fn(
            lambda data: decode_image(data, image_size), image_bytes, fn_output_signature=pixel_spec
        )
        return _outputs(model(pixels, training=False), labels)

    def serve_pixels(pixels):
        return _outputs(model(pixels, training=False), labels)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        "serving_pixels",
        serve_pixels,
        input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="pixels")
        ],
    )
    parent, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(parent, f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    archive.write_out(staging, verbose=False)
    replace_dir(staging, path)


def _encoded_images(rng) -> list[bytes]:
    """JPEGs and PNGs of several sizes and modes, as a client would send them."""
    images = []
    for width, height, mode, fmt in [
        (40, 56, "RGB", "JPEG"),
        (32, 32, "RGB", "PNG"),
        (71, 29, "L", "JPEG"),
        (50, 50, "RGBA", "PNG"),
    ]:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(array.squeeze() if channels == 1 else array)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        images.append(buffer.getvalue())
    return images


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(old SavedModel, new SavedModel) of one model whose head is not all zeros."""
    root = tmp_path_factory.mktemp("exports")
    keras.utils.set_random_seed(3)
    model = build_model(len(CLASSES), SIZE, None, 0.2, seed=3)
    head = model.get_layer("head").get_layer("probabilities")
    kernel, bias = head.get_weights()
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 0.05, kernel.shape), rng.normal(0, 0.5, bias.shape)])
    _export_with_export_archive(model, CLASSES, SIZE, str(root / "old"))
    export_saved_model(model, CLASSES, SIZE, str(root / "new"))
    return tf.saved_model.load(str(root / "old")), tf.saved_model.load(str(root / "new"))


def _assert_identical(old: dict, new: dict) -> None:
    assert sorted(old) == sorted(new) == ["class_id", "class_name", "probabilities"]
    for key in old:
        assert old[key].dtype == new[key].dtype, key
        np.testing.assert_array_equal(old[key].numpy(), new[key].numpy(), err_msg=key)


def test_both_signatures_take_the_same_named_inputs(exports):
    old, new = exports
    for name in ("serving_default", "serving_pixels"):
        assert old.signatures[name].structured_input_signature == (
            new.signatures[name].structured_input_signature
        ), name
        assert old.signatures[name].structured_outputs == new.signatures[name].structured_outputs


def test_serving_default_gives_bit_identical_outputs_on_image_bytes(exports):
    old, new = exports
    images = tf.constant(_encoded_images(np.random.default_rng(1)))
    _assert_identical(
        old.signatures["serving_default"](image_bytes=images),
        new.signatures["serving_default"](image_bytes=images),
    )


def test_serving_pixels_gives_bit_identical_outputs_on_pixels(exports):
    old, new = exports
    pixels = tf.constant(np.random.default_rng(2).uniform(0, 255, (5, SIZE, SIZE, 3)), tf.float32)
    result = new.signatures["serving_pixels"](pixels=pixels)
    assert len(set(result["class_id"].numpy())) > 1  # the head discriminates: not a vacuous test
    _assert_identical(old.signatures["serving_pixels"](pixels=pixels), result)
