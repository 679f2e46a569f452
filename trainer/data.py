"""Image folders -> validated file lists -> tf.data pipelines.

A dataset is a folder with one subfolder per class. Classes are the sorted subfolder names;
JPEG, PNG, BMP and GIF files are found by extension (any case); hidden files and anything else
are ignored. Files TensorFlow cannot decode are found up front, reported and left out.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from trainer import TrainerError
from trainer.files import file_identity
from trainer.images import IMAGE_EXTENSIONS, decode_image, is_image

log = logging.getLogger(__name__)

# The probe asks whether decode_image accepts a file; a small size keeps the resize cheap.
PROBE_SIZE = 8


@dataclass
class Split:
    """Parallel lists of image paths and integer labels."""

    files: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: np.ndarray) -> Split:
        return Split([self.files[i] for i in keep], self.labels[keep])


def owner(path: str, workers: int) -> int:
    """The worker that decodes `path` for the backbone pass and the bad-image probe of a
    multi-worker run: a hash of the path's last two parts (class folder/file name), so every
    worker computes the same owner whatever its local folder, and neither the split, the
    bad-image filter nor a subset moves a file to another worker. Sharded staging downloads
    exactly the files a worker owns."""
    if workers == 1:
        return 0
    tail = "/".join(path.replace(os.sep, "/").split("/")[-2:])
    return zlib.crc32(tail.encode()) % workers


@dataclass(frozen=True)
class Folder:
    """An image folder ready to list: its local root and, when the root holds only this
    worker's share (sharded staging), the relative names of every image the source holds."""

    root: str
    names: list[str] | None = None
    objects: dict = field(default_factory=dict)  # gs:// only: {relative name: listed blob}


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_image_folder(root: str, key: str, names: list[str] | None = None) -> dict[str, list[str]]:
    """Map each class folder under `root` to its sorted image files; `key` names the config key.
    `names`: the images' relative names, when `root` holds only some of them (sharded staging)."""
    if names is not None:
        return _list_names(root, key, names)
    if not os.path.isdir(root):
        raise TrainerError(f"{key}={root}: folder not found")
    classes = sorted(n for n in os.listdir(root) if _visible(n) and os.path.isdir(f"{root}/{n}"))
    if len(classes) < 2:
        raise TrainerError(
            f"{key}={root}: found {len(classes)} class folder(s) {classes}; need at least 2 "
            "(one subfolder per class)"
        )
    found = {}
    for name in classes:
        folder = os.path.join(root, name)
        files = sorted(
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if is_image(f) and os.path.isfile(os.path.join(folder, f))
        )
        if not files:
            raise TrainerError(
                f"{key}={root}: class folder '{name}' holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        found[name] = files
    return found


def _list_names(root: str, key: str, names: list[str]) -> dict[str, list[str]]:
    """list_image_folder from a listing: the images directly inside class folders."""
    found: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and _visible(parts[0]) and is_image(parts[1]):
            found.setdefault(parts[0], []).append(os.path.join(root, *parts))
    if len(found) < 2:
        raise TrainerError(
            f"{key}={root}: found {len(found)} class folder(s) {sorted(found)}; need at least 2 "
            "(one subfolder per class)"
        )
    return {name: sorted(found[name]) for name in sorted(found)}


def stage_image_folder(
    uri: str, cache_dir: str, key: str, *, share: tuple[int, int] = (1, 0)
) -> Folder:
    """A local folder holding the image folder at `uri` (the folder itself when it is local);
    only image files are downloaded: the listing counts nothing else. `share` (workers, index):
    only the images this worker owns (`owner`) are downloaded; the folder then lists every
    image of `uri` by name."""
    from trainer.gcs import cache_path, is_gcs, stage_prefix

    if not is_gcs(uri):
        return Folder(uri)
    workers, index = share
    if workers > 1:  # staging removes what it does not stage: workers must not share a folder
        cache_dir = os.path.join(cache_dir, f"worker-{index}-of-{workers}")
    local = cache_path(cache_dir, "inputs", uri)
    report = stage_prefix(
        uri,
        local,
        key,
        keep=is_image,
        what=f"objects ({', '.join(IMAGE_EXTENSIONS)})",
        only=None if workers == 1 else lambda name: owner(name, workers) == index,
    )
    return Folder(local, None if workers == 1 else sorted(report.objects), report.objects)


def _to_split(by_class: dict[str, list[str]], classes: list[str]) -> Split:
    files, labels = [], []
    for label, name in enumerate(classes):
        files += by_class[name]
        labels += [label] * len(by_class[name])
    return Split(files, np.asarray(labels, dtype=np.int64))


def load_splits(
    train_dir: str,
    test_dir: str | None,
    validation_split: float,
    seed: int,
    names: dict[str, list[str] | None] | None = None,
) -> tuple[list[str], Split, Split]:
    """Classes (sorted folder names) and the train and test file lists.

    With no test_dir, a seeded, per-class share of the training files becomes the test set, so
    every class appears in both and the split is the same on every run with the same seed.
    """
    names = names or {}
    train = list_image_folder(train_dir, "data.train_dir", names.get(train_dir))
    classes = list(train)
    if test_dir is not None:
        test = list_image_folder(test_dir, "data.test_dir", names.get(test_dir))
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise TrainerError(
                f"data.test_dir={test_dir}: class folder(s) {unknown} not in data.train_dir"
                f"={train_dir} (classes there: {classes})"
            )
        return classes, _to_split(train, classes), _to_split(test, classes)

    rng = np.random.default_rng(seed)
    kept, held = {}, {}
    for name, files in train.items():
        order = rng.permutation(len(files))
        n_test = int(round(len(files) * validation_split))
        if n_test < 1 or n_test >= len(files):
            raise TrainerError(
                f"data.validation_split={validation_split}: class '{name}' has {len(files)} "
                "images, too few to split; add images or set data.test_dir"
            )
        held[name] = [files[i] for i in sorted(order[:n_test])]
        kept[name] = [files[i] for i in sorted(order[n_test:])]
    return classes, _to_split(kept, classes), _to_split(held, classes)


def hold_out(split: Split, *, share: float, seed: int, key: str) -> tuple[Split, Split]:
    """(kept, held): a seeded `share` of each class's files of `split` held out, the rest kept,
    both in `split`'s order; `key` names the setting in the error when a class is too small."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(split.labels):
        rows = np.flatnonzero(split.labels == label)
        count = int(round(len(rows) * share))
        if count < 1 or count >= len(rows):
            raise TrainerError(
                f"{key}={share}: class {int(label)} has {len(rows)} training images, too few to"
                " hold out a validation set from; add images or set it to 0"
            )
        held += list(rows[rng.permutation(len(rows))[:count]])
    held = np.sort(np.asarray(held, dtype=np.int64))
    kept = np.setdiff1d(np.arange(len(split)), held)
    return split.subset(kept), split.subset(held)


# What the probe found, by file_identity (path, size, modification time): None for a good file,
# else why it is bad. A local sweep's points run in one process, and those after the first
# probe nothing.
_PROBED: dict[tuple, str | None] = {}


def find_bad_images(files: list[str]) -> list[tuple[str, str]]:
    """(path, reason) for each file that `decode_image` (the decoder training and serving use)
    cannot read and decode, checked in parallel; files this process probed before, unchanged
    since, are not decoded again."""
    keys = [file_identity(path) for path in files]
    new = [i for i, key in enumerate(keys) if key not in _PROBED]
    if new:
        reasons = _probe([files[i] for i in new])
        _PROBED.update({keys[i]: reasons.get(files[i]) for i in new})
    return [(path, _PROBED[key]) for path, key in zip(files, keys, strict=True) if _PROBED[key]]


def _probe(files: list[str]) -> dict[str, str]:
    """{path: reason} of the files of `files` that do not decode."""
    import tensorflow as tf

    def probe(index, path):
        # A value computed from the pixels: decode_image's static shape would let tf.data
        # prune the decode if only the shape were asked for.
        return index, tf.reduce_sum(decode_image(tf.io.read_file(path), PROBE_SIZE))

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(files)), files))
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ds = ds.map(lambda index, total: index).batch(1024).prefetch(tf.data.AUTOTUNE)
    good = {int(index) for batch in ds.as_numpy_iterator() for index in batch}
    bad = {}
    for index in sorted(set(range(len(files))) - good):
        try:  # decode the few bad ones again, eagerly, for the reason
            decode_image(tf.io.read_file(files[index]), PROBE_SIZE)
            reason = "unreadable"
        except (tf.errors.OpError, ValueError) as error:
            reason = _reason(getattr(error, "message", str(error)))
        bad[files[index]] = reason
    return bad


def _reason(message: str) -> str:
    """What TensorFlow says is wrong with a file, without where it said it: "{{function_node
    ...}} Input is empty. [Op:DecodeImage] name: " -> "Input is empty."."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    return re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:.*$", "", line).strip() or "undecodable"


def drop_bad_images(
    split: Split, name: str, fail: bool, bad: list[tuple[str, str]] | None = None
) -> Split:
    """Leave out (or, with `fail`, refuse) the undecodable files of `split`, listing each one;
    `bad`: (path, reason) already found (by default `find_bad_images` looks at every file)."""
    bad = find_bad_images(split.files) if bad is None else bad
    if not bad:
        return split
    if fail:
        path, reason = bad[0]
        raise TrainerError(
            f"{path}: cannot decode image ({reason}); {len(bad)} bad file(s) in the {name} set "
            "(data.on_bad_image=fail; set data.on_bad_image=skip to leave them out)"
        )
    log.warning("skipping %d undecodable image(s) in the %s set:", len(bad), name)
    for path, reason in bad:
        log.warning("  skipped %s (%s)", path, reason)
    bad_paths = {path for path, _ in bad}
    keep = np.asarray([i for i, f in enumerate(split.files) if f not in bad_paths], dtype=np.int64)
    kept = split.subset(keep)
    for label in np.unique(split.labels):
        if not np.any(kept.labels == label):
            folder = os.path.dirname(split.files[int(np.argmax(split.labels == label))])
            raise TrainerError(
                f"{folder}: every image of this class in the {name} set is undecodable"
            )
    return kept


# The spill path's shuffle buffer holds at least this many decoded images (about 38 MB at 224
# px), so even train.feature_cache_max_mb=0 gives each epoch a new order.
SPILL_SHUFFLE_MIN = 256


@dataclass(frozen=True)
class PixelCache:
    """Where a pipeline keeps its decoded pixels: in memory while they take at most `max_mb`
    (train.feature_cache_max_mb), else in a tf.data cache file at `path` (in the run's pixel
    spill folder, trainer/rundir.py)."""

    max_mb: int
    path: str


def pixels_spill(rows: int, image_size: int, *, max_mb: int) -> bool:
    """Whether `rows` decoded uint8 images go to the spill file rather than memory."""
    return rows * image_size * image_size * 3 > max_mb * 2**20


def image_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    shard: tuple[int, int] = (1, 0),
    cache: PixelCache | None = None,
):
    """Batched (pixels, label) pairs, float32 0..255: read, decode and resize, then augment
    (each batch, every pass anew) and prefetch.

    Without `cache` every pass reads and decodes every file again (one pass needs no more).
    With it (`_decoded_once`) each file is decoded once and its pixels kept, so the epochs
    after the first only shuffle, augment and train; `shard` (workers, index) then means: this
    worker decodes only its own fixed share of the files, repeated without end.

    Without `cache`, `shard`, for multi-worker training with `shuffle`: every worker shuffles
    the paths alike, then reads and decodes only its own `worker_share` of them, repeated without
    end (train `worker_steps` steps an epoch); each epoch leaves out fewer than one global batch
    per worker, different files each time. tf.distribute would otherwise decode every file on
    every worker and drop most.
    """
    import tensorflow as tf

    if cache is None:
        ds = _decoded_each_pass(
            split, image_size, batch_size, shuffle=shuffle, seed=seed, shard=shard
        )
    else:
        ds = _decoded_once(split, image_size, cache=cache, shuffle=shuffle, seed=seed, shard=shard)
    ds = ds.batch(batch_size)
    augmenter = _augmenter(seed) if augment else None

    def to_model(x, y):  # the cache holds uint8; the model sees float32 as decode_image gives
        x = tf.cast(x, tf.float32)
        return (augmenter(x, training=True) if augment else x), y

    if cache is not None or augment:
        ds = ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)
    if shard[0] > 1:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        ds = ds.with_options(options)
    # tf.data's autotuner off: with it on, ResNet50 fed by this pipeline ran at times (in about
    # half of the runs, at random) on one core's worth of CPU, its two compute threads taking
    # turns; with it off, every run used both cores (docs/performance.md). AUTOTUNE then means
    # min(16, schedulable cores) decode calls, and two batches are read ahead.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)


def _decoded_each_pass(
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int],
):
    """(pixels, label) elements, each file read and decoded again on every pass."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((split.files, split.labels))
    if shuffle:  # shuffle paths, not pixels: a full-size shuffle buffer then costs nothing
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    workers, index = shard
    if workers > 1:
        share = worker_share(len(split), batch_size, workers)
        ds = ds.take(share * workers).shard(workers, index).repeat()
    return ds.map(
        lambda path, label: (decode_image(tf.io.read_file(path), image_size), label),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle,
    )


def _decoded_once(
    split: Split,
    image_size: int,
    *,
    cache: PixelCache,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int],
):
    """(uint8 pixels, label) elements, each file of this worker's share read and decoded on the
    first pass only, its resized pixels kept (rounded to uint8: a quarter of float32's memory,
    each pixel within 0.5 of decode_image's) by tf.data's cache, which fills on the first
    complete pass and then serves every later one. Memory: image_size² x 3 bytes an image
    while the pipeline lives (2,000 images at 224 px: 301 MB), unless `cache.max_mb` sends
    them to the spill file.

    Order: the files are cached in a seeded random order; with `shuffle`, each pass then goes
    through a shuffle buffer with its own seeded order. In memory the buffer holds every image,
    a uniform new permutation each epoch (it holds the cache's tensors, not copies: tensors
    share their buffers); from the spill file it holds what fits under `cache.max_mb` (at
    least SPILL_SHUFFLE_MIN images): each epoch is still a permutation of the set in a new order,
    mixed within that window of the cached order (itself random, so batches mix the classes).

    `shard` (workers, index): this worker reads only every `workers`-th file from `index` on,
    the same files every epoch (a file's pixels are kept by the one worker that decoded them),
    and repeats them without end: tf.distribute then takes `worker_steps` steps an epoch from
    that stream, the same number on every worker, so an epoch of `worker_share` files ends
    wherever it ends and the next goes on from there: every file trains as often as any other
    of its worker's. (Without the cache each epoch gave each worker different files.)
    """
    import tensorflow as tf

    workers, index = shard
    files, labels = split.files[index::workers], split.labels[index::workers]
    order = np.random.default_rng(seed).permutation(len(files))
    ds = tf.data.Dataset.from_tensor_slices(([files[i] for i in order], labels[order]))
    ds = ds.map(
        lambda path, label: (_to_uint8(decode_image(tf.io.read_file(path), image_size)), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = _kept(ds, rows=len(files), image_size=image_size, cache=cache, shuffle=shuffle, seed=seed)
    return ds.repeat() if workers > 1 else ds


def _kept(ds, *, rows: int, image_size: int, cache: PixelCache, shuffle: bool, seed: int):
    """`ds` (`rows` decoded images) cached in memory or in `cache.path`, then shuffled each pass
    (`shuffle`) with a buffer of every image in memory, of the limit's worth from the file."""
    buffer = rows
    if not pixels_spill(rows, image_size, max_mb=cache.max_mb):
        ds = ds.cache()
    else:
        os.makedirs(os.path.dirname(cache.path), exist_ok=True)
        ds = ds.cache(cache.path)
        fit = cache.max_mb * 2**20 // (image_size * image_size * 3)
        buffer = min(rows, max(fit, SPILL_SHUFFLE_MIN))
        log.info(
            "decoded images of %s spilled to a tf.data cache file (over "
            "train.feature_cache_max_mb=%d)%s",
            os.path.basename(cache.path),
            cache.max_mb,
            f"; shuffle buffer {buffer} images" if shuffle else "",
        )
    return ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True) if shuffle else ds


def _to_uint8(pixels):
    """decode_image's float32 0..255 as uint8: rounded, clipped (bilinear resizing stays in
    range; the clip is a guard), so casting back moves a pixel by at most 0.5."""
    import tensorflow as tf

    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


def decode_files(
    files: list[str], image_size: int, *, augment: bool = False, seed: int = 0
) -> np.ndarray:
    """A few images (TensorBoard's samples, misclassified test images) decoded and resized as
    `image_dataset` does, then augmented if `augment`: float32 [n, S, S, 3]. Eagerly: a tf.data
    pipeline takes longer to build than 16 images take to decode this way (docs/performance.md)."""
    import tensorflow as tf

    pixels = tf.stack([decode_image(tf.io.read_file(path), image_size) for path in files])
    if augment:
        pixels = _augmenter(seed)(pixels, training=True)
    return np.asarray(pixels)


def worker_share(num_files: int, batch_size: int, workers: int) -> int:
    """Files each worker trains on per epoch: whole global batches, the same on every worker
    (tf.distribute needs every worker to run the same number of steps); 0 if too few files."""
    return num_files // workers // batch_size * batch_size


def worker_steps(num_files: int, batch_size: int, workers: int) -> int:
    """Steps per epoch over sharded input: tf.distribute splits each of a worker's global
    batches into one piece per replica of the cluster, so one lasts `workers` steps."""
    return worker_share(num_files, batch_size, workers) // batch_size * workers


def _augmenter(seed: int):
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 2),
        ],
        name="augment",
    )
