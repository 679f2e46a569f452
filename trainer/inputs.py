"""The job's inputs: which share of the images this worker stages, the staging itself, the
class folders split into file lists, and the undecodable images left out (agreed between workers).

Everything but the bad-image scan (`start_scan`, `drop_undecodable`) runs before TensorFlow is
imported, so a wrong path or an empty folder answers in a second.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from trainer.data import Folder, Split, load_splits, owner, stage_image_folder
from trainer.gcs import stage_file

log = logging.getLogger(__name__)


def staging_share(*, augment: bool, finetune_epochs: int) -> tuple[int, int]:
    """(workers, index): which images this worker stages and decodes (trainer.data.owner).
    A multi-worker run on cached features decodes each image on one worker only, so each
    stages only its own; training on images (augmentation, fine-tuning) reads every file on
    every worker. Read from the environment: TensorFlow is not loaded yet."""
    from trainer.cluster import from_environment

    if augment or finetune_epochs:
        return 1, 0
    cluster = from_environment(dict(os.environ))  # a copy: TF_CONFIG is written later
    return cluster.workers, cluster.index


def stage_inputs(
    *,
    train_dir: str,
    test_dir: str | None,
    weights: str | None,
    cache_dir: str,
    share: tuple[int, int],
):
    """Local copies of gs:// inputs (local paths pass through): (train_dir, test_dir, weights)
    as Folders for the image folders; of the images, only this worker's `share`."""
    train_dir = stage_image_folder(train_dir, cache_dir, "data.train_dir", share=share)
    if test_dir is not None:
        test_dir = stage_image_folder(test_dir, cache_dir, "data.test_dir", share=share)
    if weights not in (None, "imagenet"):
        weights = stage_file(weights, cache_dir, "model.weights")
    return train_dir, test_dir, weights


def split_data(*, train_dir: Folder, test_dir: Folder | None, validation_split: float, seed: int):
    """Classes and the train and test file lists (no TensorFlow yet), of every image even
    where only a share was staged."""
    folders = [f for f in (train_dir, test_dir) if f is not None]
    classes, train, test = load_splits(
        train_dir.root,
        test_dir.root if test_dir else None,
        validation_split,
        seed,
        names={f.root: f.names for f in folders},
    )
    log.info(
        "found %d classes %s: %d training and %d test images",
        len(classes),
        classes,
        len(train),
        len(test),
    )
    return classes, train, test


def listing_digests(*folders: Folder | None) -> dict[str, str]:
    """{local path: digest} of the images staged from gs://, from their listing (size and
    CRC32C): the feature cache's key without reading the files, staged here or not."""
    from trainer.feature_cache import listing_digests as digests

    return {
        path: digest
        for folder in folders
        if folder is not None
        for path, digest in digests(folder.objects, folder.root).items()
    }


def start_scan(splits: tuple[Split, ...], *, share: tuple[int, int]) -> Future:
    """The bad-image scan of this worker's images of `splits` (all of them unless staging is
    sharded), on a thread of its own: its decoding runs in tf.data's threads while the main
    thread builds the model, which is Python. The future's result: {path: reason} of the files
    that do not decode. The scan is local: the workers agree afterwards (`drop_undecodable`)."""
    from trainer.data import find_bad_images

    workers, index = share
    files = [path for split in splits for path in split.files if owner(path, workers) == index]
    # The first images decoded: scripts/benchmark.py's start-up ends at this line.
    log.info("scanning %d images for undecodable files", len(files))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bad-image-scan")
    try:
        return pool.submit(lambda: dict(find_bad_images(files)) if files else {})
    finally:
        pool.shutdown(wait=False)  # the thread ends with the scan


def drop_undecodable(
    split: Split, *, name: str, fail: bool, strategy, share, found: dict[str, str]
) -> Split:
    """drop_bad_images with what the scan `found` ({path: reason}, `start_scan`); with a
    staged `share`, each worker scanned the images it owns and the workers agree on the bad
    ones (an all-reduce), so every worker keeps the same files."""
    from trainer.data import drop_bad_images
    from trainer.phases import any_worker

    if share[0] == 1:
        bad = [(path, found[path]) for path in split.files if path in found]
        return drop_bad_images(split, name, fail, bad=bad)
    flags = np.asarray([path in found for path in split.files], dtype=np.float32)
    agreed = any_worker(strategy, flags)
    other = "undecodable; found by another worker"
    bad = [(split.files[i], found.get(split.files[i], other)) for i in np.flatnonzero(agreed)]
    return drop_bad_images(split, name, fail, bad=bad)
