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

from trainer.data import Split, image_dataset
from trainer.model import FEATURES

log = logging.getLogger(__name__)


def extract_features(
    extractor,
    split: Split,
    image_size: int,
    batch_size: int,
    max_mb: int,
    spill_dir: str,
    name: str,
) -> np.ndarray:
    """Pooled features for every image of `split`, in order: in memory up to `max_mb`, else a
    memory-mapped .npy file in `spill_dir` (filled chunk by chunk, so memory stays bounded)."""
    n = len(split)
    start = time.perf_counter()
    if n * FEATURES * 4 <= max_mb * 2**20:
        features = extractor.predict(image_dataset(split, image_size, batch_size), verbose=0)
        features = np.asarray(features, dtype=np.float32)
    else:
        os.makedirs(spill_dir, exist_ok=True)
        path = os.path.join(spill_dir, f"{name}_features.npy")
        features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, FEATURES))
        chunk = max(batch_size, (max_mb * 2**20 // (FEATURES * 4)) // batch_size * batch_size)
        for lo in range(0, n, chunk):
            part = split.subset(np.arange(lo, min(n, lo + chunk)))
            features[lo : lo + len(part)] = extractor.predict(
                image_dataset(part, image_size, batch_size), verbose=0
            )
        features.flush()
        log.info(
            "features of the %s set spilled to %s (over train.feature_cache_max_mb=%d)",
            name,
            path,
            max_mb,
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


def feature_dataset(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batched (features, label) pairs from the cache, reshuffled every epoch when asked."""
    if not isinstance(features, np.memmap):
        ds = tf.data.Dataset.from_tensor_slices((features, labels))
        if shuffle:
            ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    # Spilled: shuffle row indices and read each batch's rows from the memory-mapped file.
    def rows(index):
        return np.asarray(features[index])

    label_table = tf.constant(labels)
    ds = tf.data.Dataset.range(len(labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)

    def load(index):
        x = tf.numpy_function(rows, [index], tf.float32, stateful=False)
        x.set_shape([None, FEATURES])
        return x, tf.gather(label_table, index)

    return (
        ds.batch(batch_size)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
