"""The rows that are not the trainer, each run in a child process of its own
(`benchmark.py _recipe NAME ...`): the floor (ResNet50's forward pass alone, Keras' and the
trainer's folded one) and the two recipes users would otherwise copy.

With `--weights PATH` (Keras' notop ResNet50 .h5, or a Keras 3 .weights.h5) both recipes load
those weights instead of starting from random ones; each reports the classes it trained on and
the kernel_digest of its conv1 kernel after loading, which the benchmark compares across rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from . import RECIPES, kernel_digest

TOP_FILE = "resnet50_fc1000.npz"  # ImageNet's 1000-class top, beside the notop weights

FLOOR_BATCH_SIZES = (16, 32, 64)


def run_recipe(argv: list[str]) -> int:
    """`_recipe NAME ...`: measure one recipe in this process and write its figures as JSON."""
    parser = argparse.ArgumentParser(prog="benchmark.py _recipe")
    parser.add_argument("name", choices=RECIPES)
    parser.add_argument("--train-dir", required=True)
    parser.add_argument("--test-dir", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--weights", help="notop ResNet50 weights (default: random init)")
    args = parser.parse_args(argv)
    recipe = {"floor": floor, "keras_guide": keras_guide, "seed_recipe": seed_recipe}[args.name]
    result = recipe(
        args.train_dir, args.test_dir, args.image_size, args.epochs, weights=args.weights
    )
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


def floor(
    train_dir: str, test_dir: str, image_size: int, epochs: int, *, weights: str | None = None
) -> dict:
    """ResNet50's forward pass over every image, decoded and resized beforehand (untimed), at the
    batch size that runs fastest here: the time no implementation with this backbone can beat.
    Then the trainer's own backbone, the same ResNet50 with each BatchNormalization folded into
    its conv (trainer/fold.py), over the same pixels at the same batch size, warmed up alike.
    Random weights always (`weights` is not read): they change the values, not the compute."""
    import keras
    import tensorflow as tf

    from trainer.distribute import choose_precision
    from trainer.fold import fold_backbone

    pixels = floor_pixels(train_dir, test_dir, image_size)
    # The floor runs at the precision the trainer picks here (train.precision=auto: bfloat16
    # on CPUs with native bf16), or it would be no floor for it; the recipes stay float32, as
    # users copy them.
    precision = choose_precision("auto")
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(image_size, image_size, 3)
    )
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)

    @tf.function(input_signature=[spec])
    def forward(batch):
        x = keras.applications.resnet50.preprocess_input(tf.cast(batch, tf.float32))
        return backbone(x, training=False)

    best, probes = best_batch_size(forward, pixels)
    seconds, cpu_s = timed_pass(forward, pixels, best)
    folded = fold_backbone(backbone, name="folded")

    @tf.function(input_signature=[spec])
    def folded_forward(batch):
        return folded(keras.applications.resnet50.preprocess_input(tf.cast(batch, tf.float32)))

    warm_up(folded_forward, pixels, best)
    folded_seconds, folded_cpu_s = timed_pass(folded_forward, pixels, best)
    probes_text = ", ".join(f"batch {bs}: {c:.1f}/CPU-s {w:.1f}/s" for bs, (c, w) in probes.items())
    print(
        f"floor: {len(pixels)} images in {seconds:.1f} s at batch {best}, {precision} "
        f"({probes_text}); folded: {folded_seconds:.1f} s"
    )
    return {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "folded_seconds": folded_seconds,
        "folded_cpu_s": folded_cpu_s,
        "batch_size": best,
        "precision": precision,
        "probes_images_per_s": probes,
    }


def best_batch_size(forward, pixels) -> tuple[int, dict]:
    """The batch size of FLOOR_BATCH_SIZES with the most images per CPU second (on a shared
    machine the wall-clock rate of a few batches mostly measures the other processes), and
    {batch size: (images per CPU second, images per second)} of each probe."""
    probes = {}
    for batch_size in FLOOR_BATCH_SIZES:
        batch = warm_up(forward, pixels, batch_size)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(2):
            forward(batch).numpy()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        probes[batch_size] = (2 * batch_size / cpu, 2 * batch_size / wall)
    return max(probes, key=lambda bs: probes[bs][0]), probes


def warm_up(forward, pixels, batch_size: int):
    """One call of `forward` on a batch of `batch_size` images (first-call graph building,
    untimed); the batch."""
    import numpy as np
    import tensorflow as tf

    batch = tf.constant(pixels[np.arange(batch_size) % len(pixels)])
    forward(batch).numpy()
    return batch


def timed_pass(forward, pixels, batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of `forward` over every row of `pixels`, `batch_size` at a time."""
    import tensorflow as tf

    started, cpu_started = time.perf_counter(), time.process_time()
    for lo in range(0, len(pixels), batch_size):
        forward(tf.constant(pixels[lo : lo + batch_size])).numpy()
    return time.perf_counter() - started, time.process_time() - cpu_started


def floor_pixels(train_dir: str, test_dir: str, image_size: int):
    """Every image decoded and resized, in memory: uint8 [n, S, S, 3], 4x less than float32."""
    import glob

    import numpy as np
    import tensorflow as tf

    files = sorted(glob.glob(f"{train_dir}/*/*.jpg") + glob.glob(f"{test_dir}/*/*.jpg"))

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.cast(tf.image.resize(image, [image_size, image_size]), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return np.stack(list(ds.as_numpy_iterator()))


def keras_guide(
    train_dir: str, test_dir: str, image_size: int, epochs: int, *, weights: str | None = None
) -> dict:
    """The recipe of Keras' transfer-learning guide (keras-io guides/transfer_learning.py), with
    ResNet50 for its Xception and image_dataset_from_directory for its TFDS loader, as the guide
    suggests for image folders: cached and prefetched data, augmentation in the model, the frozen
    base called with training=False on every step of every epoch, pooled dropout + Dense(1).
    With more than two class folders the head is Dense(classes) with a sparse categorical loss
    (the guide's binary head cannot say which of ten); `weights` loads into the base."""
    import keras

    size = (image_size, image_size)
    classes = len([entry for entry in os.scandir(train_dir) if entry.is_dir()])
    labels = "binary" if classes == 2 else "int"  # the guide's, for its two classes
    train_ds = keras.utils.image_dataset_from_directory(
        train_dir, image_size=size, batch_size=32, label_mode=labels, seed=0
    )
    test_ds = keras.utils.image_dataset_from_directory(
        test_dir, image_size=size, batch_size=32, label_mode=labels, shuffle=False
    )
    train_ds = train_ds.cache().prefetch(buffer_size=10)
    test_ds = test_ds.cache().prefetch(buffer_size=10)

    data_augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    base_model = keras.applications.ResNet50(
        weights=weights, input_shape=(image_size, image_size, 3), include_top=False
    )
    base_model.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = data_augmentation(inputs)
    x = keras.applications.resnet50.preprocess_input(x)  # ResNet50's scaling, as Xception's
    x = base_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1 if classes == 2 else classes)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(), **guide_loss(classes))
    history = model.fit(train_ds, epochs=epochs, validation_data=test_ds, verbose=2)
    return {
        "accuracy": float(history.history["val_accuracy"][-1]),
        "classes": classes,
        "conv1_digest": kernel_digest(base_model.get_layer("conv1_conv").kernel),
    }


def guide_loss(classes: int) -> dict:
    """compile()'s loss and metric for the guide's logits head: its binary ones for two classes,
    sparse categorical ones for more. The metric is named `accuracy` in both, so history's key
    is the same."""
    import keras

    if classes == 2:
        return {
            "loss": keras.losses.BinaryCrossentropy(from_logits=True),
            "metrics": [keras.metrics.BinaryAccuracy(name="accuracy")],
        }
    return {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    }


def seed_recipe(
    train_dir: str, test_dir: str, image_size: int, epochs: int, *, weights: str | None = None
) -> dict:
    """The seed tutorial's recipe, bug for bug: ImageDataGenerator(rescale=1/255) instead of
    ResNet50's preprocessing, the 1000-way ImageNet top kept and Flatten + Dense(classes) stacked
    on it (the tutorial's Dense(2), one output per class folder).
    The tutorial ran 10 steps per epoch; here every epoch sees every image, like the others.
    `weights`: see `load_seed_weights`; its preprocessing stays the tutorial's, as that is the
    bug this baseline shows."""
    import tensorflow as tf

    image_generator = tf.keras.preprocessing.image.ImageDataGenerator(rescale=1.0 / 255)
    size = (image_size, image_size)
    train_data_gen = image_generator.flow_from_directory(
        directory=train_dir, batch_size=32, target_size=size, shuffle=True
    )
    test_data_gen = image_generator.flow_from_directory(
        directory=test_dir, batch_size=32, target_size=size, shuffle=True
    )
    classes = train_data_gen.num_classes
    resnet50 = tf.keras.applications.ResNet50(weights=None, input_shape=(*size, 3))
    top = load_seed_weights(resnet50, weights=weights, image_size=image_size) if weights else None
    for layer in resnet50.layers:
        layer.trainable = False
    net = tf.keras.models.Sequential()
    net.add(resnet50)
    net.add(tf.keras.layers.Flatten())
    net.add(tf.keras.layers.Dense(classes, activation="softmax"))
    net.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    history = net.fit(train_data_gen, epochs=epochs, validation_data=test_data_gen, verbose=2)
    return {
        "accuracy": float(history.history["val_accuracy"][-1]),
        "classes": classes,
        "conv1_digest": kernel_digest(resnet50.get_layer("conv1_conv").kernel),
        "top": top or "random init",
    }


def load_seed_weights(resnet50, *, weights: str, image_size: int) -> str:
    """Put notop `weights` into the include_top=True `resnet50`, layer by layer by name (a notop
    file holds every layer but the top, so Keras' by-order loading refuses it), and its 1000-way
    top `predictions` from TOP_FILE beside the file (scripts/dev/fetch_imagenet_weights.py
    writes it) when there is one; without it the top stays random. Returns where the top came
    from."""
    import keras

    notop = keras.applications.ResNet50(
        weights=weights, include_top=False, input_shape=(image_size, image_size, 3)
    )
    for layer in notop.layers:
        if layer.weights:
            resnet50.get_layer(layer.name).set_weights(layer.get_weights())
    top_path = os.path.join(os.path.dirname(weights), TOP_FILE)
    if not os.path.exists(top_path):
        return f"random init (no {TOP_FILE} beside the weights)"
    import numpy as np

    top = np.load(top_path)
    resnet50.get_layer("predictions").set_weights([top["kernel"], top["bias"]])
    return TOP_FILE
