"""The rows that are not the trainer, each run in a child process of its own
(`benchmark.py _recipe NAME ...`): the floor (ResNet50's forward pass alone, Keras' and the
trainer's folded one) and the two recipes users would otherwise copy."""

from __future__ import annotations

import argparse
import json
import time

from . import RECIPES

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
    args = parser.parse_args(argv)
    recipe = {"floor": floor, "keras_guide": keras_guide, "seed_recipe": seed_recipe}[args.name]
    result = recipe(args.train_dir, args.test_dir, args.image_size, args.epochs)
    with open(args.result, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


def floor(train_dir: str, test_dir: str, image_size: int, epochs: int) -> dict:
    """ResNet50's forward pass over every image, decoded and resized beforehand (untimed), at the
    batch size that runs fastest here: the time no implementation with this backbone can beat.
    Then the trainer's own backbone, the same ResNet50 with each BatchNormalization folded into
    its conv (trainer/fold.py), over the same pixels at the same batch size, warmed up alike."""
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


def keras_guide(train_dir: str, test_dir: str, image_size: int, epochs: int) -> dict:
    """The recipe of Keras' transfer-learning guide (keras-io guides/transfer_learning.py), with
    ResNet50 for its Xception and image_dataset_from_directory for its TFDS loader, as the guide
    suggests for image folders: cached and prefetched data, augmentation in the model, the frozen
    base called with training=False on every step of every epoch, pooled dropout + Dense(1)."""
    import keras

    size = (image_size, image_size)
    train_ds = keras.utils.image_dataset_from_directory(
        train_dir, image_size=size, batch_size=32, label_mode="binary", seed=0
    )
    test_ds = keras.utils.image_dataset_from_directory(
        test_dir, image_size=size, batch_size=32, label_mode="binary", shuffle=False
    )
    train_ds = train_ds.cache().prefetch(buffer_size=10)
    test_ds = test_ds.cache().prefetch(buffer_size=10)

    data_augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    base_model = keras.applications.ResNet50(
        weights=None, input_shape=(image_size, image_size, 3), include_top=False
    )
    base_model.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = data_augmentation(inputs)
    x = keras.applications.resnet50.preprocess_input(x)  # ResNet50's scaling, as Xception's
    x = base_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy()],
    )
    history = model.fit(train_ds, epochs=epochs, validation_data=test_ds, verbose=2)
    return {"accuracy": float(history.history["val_binary_accuracy"][-1])}


def seed_recipe(train_dir: str, test_dir: str, image_size: int, epochs: int) -> dict:
    """The seed tutorial's recipe, bug for bug: ImageDataGenerator(rescale=1/255) instead of
    ResNet50's preprocessing, the 1000-way ImageNet top kept and Flatten + Dense(2) stacked on it.
    The tutorial ran 10 steps per epoch; here every epoch sees every image, like the others."""
    import tensorflow as tf

    image_generator = tf.keras.preprocessing.image.ImageDataGenerator(rescale=1.0 / 255)
    size = (image_size, image_size)
    train_data_gen = image_generator.flow_from_directory(
        directory=train_dir, batch_size=32, target_size=size, shuffle=True
    )
    test_data_gen = image_generator.flow_from_directory(
        directory=test_dir, batch_size=32, target_size=size, shuffle=True
    )
    resnet50 = tf.keras.applications.ResNet50(weights=None, input_shape=(*size, 3))
    for layer in resnet50.layers:
        layer.trainable = False
    net = tf.keras.models.Sequential()
    net.add(resnet50)
    net.add(tf.keras.layers.Flatten())
    net.add(tf.keras.layers.Dense(2, activation="softmax"))
    net.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    history = net.fit(train_data_gen, epochs=epochs, validation_data=test_data_gen, verbose=2)
    return {"accuracy": float(history.history["val_accuracy"][-1])}
