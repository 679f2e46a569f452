"""The job's inputs: which share of the images this worker stages, the staging itself, the
class folders split into file lists, and the undecodable images left out (agreed between workers).

Everything but `drop_undecodable` runs before TensorFlow is imported, so a wrong path or an
empty folder answers in a second.
"""

from __future__ import annotations

import logging
import os

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


def drop_undecodable(split: Split, *, name: str, fail: bool, strategy, share) -> Split:
    """drop_bad_images; with a staged `share`, each worker probes the images it owns and the
    workers agree on the bad ones (an all-reduce), so every worker keeps the same files."""
    from trainer.data import drop_bad_images, find_bad_images
    from trainer.phases import any_worker

    workers, index = share
    if workers == 1:
        return drop_bad_images(split, name, fail)
    mine = [i for i, path in enumerate(split.files) if owner(path, workers) == index]
    found = dict(find_bad_images([split.files[i] for i in mine])) if mine else {}
    flags = np.asarray([path in found for path in split.files], dtype=np.float32)
    agreed = any_worker(strategy, flags)
    other = "undecodable; found by another worker"
    bad = [(split.files[i], found.get(split.files[i], other)) for i in np.flatnonzero(agreed)]
    return drop_bad_images(split, name, fail, bad=bad)
