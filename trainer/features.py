"""The cached-feature fast path.

With the backbone frozen and no live augmentation, an image always yields the same pooled
features, so the backbone runs once per image and the head trains on cached features for every
epoch. That is exact (the head sees what the full model would compute) and is where the speed
comes from: a head epoch over 2,000 cached vectors takes milliseconds, a backbone pass minutes.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import tensorflow as tf

from trainer.data import Split, image_dataset, owner
from trainer.model import FEATURES

log = logging.getLogger(__name__)


def spills(rows: int, *, spill_above_mb: int) -> bool:
    """Whether `rows` pooled feature vectors go to a memory-mapped file in the run's spill
    folder rather than memory (train.feature_cache_max_mb: `spill_above_mb`)."""
    return rows * FEATURES * 4 > spill_above_mb * 2**20


def extract_features(
    extractor,
    split: Split,
    image_size: int,
    batch_size: int,
    spill_above_mb: int,
    spill_dir: str,
    name: str,
    workers: tuple[int, int] = (1, 0),
) -> np.ndarray:
    """Pooled features for every image of `split`, in order: in memory up to `spill_above_mb`,
    else a memory-mapped .npy file in `spill_dir` (filled chunk by chunk, so memory stays
    bounded). `workers` (count, index): in multi-worker training each worker decodes and runs
    its own share of the files, and every worker gets all the features."""
    n = len(split)
    start = time.perf_counter()
    if not spills(n, spill_above_mb=spill_above_mb):
        features = predict_files(extractor, split, image_size, batch_size, workers)
    else:
        os.makedirs(spill_dir, exist_ok=True)
        path = os.path.join(spill_dir, f"{name}_features.npy")
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, FEATURES))
        per_chunk = spill_above_mb * 2**20 // (FEATURES * 4)
        chunk = max(batch_size, per_chunk // batch_size * batch_size)
        for lo in range(0, n, chunk):
            part = split.subset(np.arange(lo, min(n, lo + chunk)))
            features[lo : lo + len(part)] = predict_files(
                extractor, part, image_size, batch_size, workers
            )
        features.flush()
        log.info(
            "features of the %s set spilled to %s (over train.feature_cache_max_mb=%d)",
            name,
            path,
            spill_above_mb,
        )
    seconds = time.perf_counter() - start
    log.info(
        "features cached: %s set, %d x %d in %.1f s (%.1f images/s)",
        name,
        n,
        FEATURES,
        seconds,
        n / max(seconds, 1e-9),
    )
    return features


def predict_files(
    model, split: Split, image_size: int, batch_size: int, workers: tuple[int, int] = (1, 0)
) -> np.ndarray:
    """`model`'s float32 outputs for every image of `split`, in order, on every worker.

    One worker (one device or MirroredStrategy): a plain `predict`. Several workers: worker w
    reads and decodes only the files it owns (`trainer.data.owner`: the ones sharded staging
    gave it; tf.data's own sharding would decode everything on every worker and drop most of
    it); Keras' `predict` all-gathers the outputs and each row carries its file index, so every
    worker puts them back in order. tf.distribute fails if one worker runs more steps than
    another, so each share is padded with blank images (row -1, dropped) to the largest share's
    whole number of global batches.
    """
    count, index = workers
    if count == 1:
        outputs = model.predict(
            image_dataset(split, image_size, batch_size), verbose=0, callbacks=_on_sigterm()
        )
        return np.asarray(outputs, dtype=np.float32)
    n = len(split)
    owners = np.asarray([owner(path, count) for path in split.files], dtype=np.int64)
    mine = np.flatnonzero(owners == index)
    share = int(np.bincount(owners, minlength=count).max())  # the same on every worker
    padded = max(1, -(-share // batch_size)) * batch_size  # whole global batches
    # The label slot carries the file's row index through the pipeline and the model.
    ds = tf.data.Dataset.from_tensors(
        (tf.zeros([image_size, image_size, 3], tf.float32), tf.constant(-1, tf.int64))
    ).repeat(padded - len(mine))  # the padding
    if len(mine):
        own = Split([split.files[i] for i in mine], mine)
        ds = image_dataset(own, image_size, batch_size).unbatch().concatenate(ds)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda pixels, row: ((pixels, row),))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    import keras

    with model.distribute_strategy.scope():
        row = keras.Input((), dtype="int64", name="row")
        # float32 out: the all-gather has no bfloat16 kernel (mixed_bfloat16 on CPUs).
        output = keras.layers.Activation("linear", dtype="float32")(model.output)
        tagged = keras.Model([model.input, row], [output, keras.layers.Identity()(row)])
    # tf.distribute splits each global batch into one piece per replica of the cluster, and a
    # step takes one piece per replica; as this worker's pipeline holds only its own share, a
    # batch lasts `count` steps. Keras would stop after as many steps as the dataset has
    # batches, so the count is hidden from it (filter) and the steps given.
    ds = ds.filter(lambda *_: tf.constant(True))
    outputs, rows = tagged.predict(
        ds, steps=count * padded // batch_size, verbose=0, callbacks=_on_sigterm()
    )
    result = np.zeros((n, *outputs.shape[1:]), dtype=np.float32)
    real = rows >= 0
    result[rows[real]] = np.asarray(outputs, dtype=np.float32)[real]
    return result


def passes_per_epoch(rows: int, *, batch_size: int, epochs: int, min_steps: int) -> int:
    """How many times each head epoch on cached features goes over the `rows` training vectors:
    enough for `epochs` epochs to take at least `min_steps` optimizer steps in all
    (train.head_min_steps), one at least. A step costs ~2 ms here, so on a small set the number
    of steps, not the data, would otherwise limit the head: 60 images at batch 32 over 5 epochs
    are 10 steps, far from the optimum of the head's convex loss."""
    per_pass = -(-rows // batch_size)
    return max(1, -(-min_steps // (per_pass * epochs)))


def feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epochs: int = 1,
) -> tf.data.Dataset:
    """Batched (features, label) pairs from the cache. With `shuffle`: `epochs` epochs back to
    back, each in its own seeded order (train with steps_per_epoch = ceil(n / batch_size)).

    The orders come from the seed alone. tf.data's reshuffle_each_iteration instead draws a new
    order each time an iterator starts, and Keras starts an extra one under tf.distribute (to
    build the model), so one device and several replicas would see different batches.
    """
    # Every worker holds all the features (cheap); tf.distribute gives each its part of a batch.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    if not shuffle and not isinstance(features, np.memmap):
        # The test set, in order: Keras starts a new iterator over it for every epoch's
        # evaluation, and without a map and a prefetch that costs ~10 ms less each time.
        pairs = (np.asarray(features, dtype=np.float32), labels)
        ds = tf.data.Dataset.from_tensor_slices(pairs).batch(batch_size)
        return ds.with_options(options)
    n = len(labels)
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(n) for _ in range(epochs)] if shuffle else [np.arange(n)])
    # One order after the other, each batched on its own (batches never straddle two epochs):
    # a flat_map, not a chain of `concatenate`s, whose building grows with its length (10,000
    # orders, e.g. 40 epochs of 250 passes, never finished).
    ds = tf.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
    )
    # flat_map hides the length; Keras needs it to end an evaluation without a warning
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(orders) * -(-n // batch_size)))
    label_table = tf.constant(labels)

    if isinstance(features, np.memmap):  # spilled: read each batch's rows from the file

        def rows(index):
            return np.asarray(features[index])

        def load(index):
            x = tf.numpy_function(rows, [index], tf.float32, stateful=False)
            x.set_shape([None, FEATURES])
            return x, tf.gather(label_table, index)
    else:
        feature_table = tf.constant(features, dtype=tf.float32)

        def load(index):
            return tf.gather(feature_table, index), tf.gather(label_table, index)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def sample_features(
    model,
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    limit: int = 1024,
    seed: int = 0,
    workers: tuple[int, int] = (1, 0),
    jit_compile: bool | str = "auto",
) -> np.ndarray:
    """Pooled, un-augmented features of up to `limit` images of `split` (a seeded sample, the
    same on every worker): the head's standardization statistics when training on images with
    augmentation. 1,024 images pin a feature's mean to a few percent of its spread, at the cost
    of one forward pass over that many images."""
    from trainer.model import feature_extractor

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(len(split))[:limit])
    with model.distribute_strategy.scope():
        extractor = feature_extractor(model)
        extractor.compile(jit_compile=jit_compile)  # predict() follows this setting
    return predict_files(extractor, split.subset(rows), image_size, batch_size, workers)


def _on_sigterm() -> list:
    from trainer.train import StopPredictingOnSigterm

    return [StopPredictingOnSigterm()]
