"""The job's inputs: which share of the images this worker stages, the staging itself, the
class folders split into file lists, and the undecodable images left out (agreed between workers).

Everything but the bad-image scan (`start_scan`, `drop_undecodable`) runs before TensorFlow is
imported, so a wrong path or an empty folder answers in a second. With storage.feature_cache set,
the scan's findings are kept there, keyed by the files' contents: a run over the same files
(a sweep's pods, a rerun) decodes none of them to learn which are bad.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from trainer import feature_cache
from trainer.data import Folder, Split, load_splits, owner, stage_image_folder
from trainer.feature_cache import ScanEntry, scan_findings
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
    return {
        path: digest
        for folder in folders
        if folder is not None
        for path, digest in feature_cache.listing_digests(folder.objects, folder.root).items()
    }


FOUND_ELSEWHERE = "undecodable; found by another worker"


@dataclass(frozen=True)
class Findings:
    """What the bad-image scan found: {path: reason} of the files that do not decode; whether
    that came from storage.feature_cache (then it covers every listed file), else this worker
    scanned its own share; the listing's entry in the feature cache."""

    bad: dict[str, str]
    cached: bool
    entry: ScanEntry

    @property
    def digests(self) -> dict[str, str]:
        """{path: digest} of every listed file (empty without a feature cache)."""
        return self.entry.digests


def start_scan(
    splits: tuple[Split, ...], *, share: tuple[int, int], cache_uri: str | None, digests: dict
) -> Future:
    """`Findings` for the files of `splits`, on a thread of its own: the scan's decoding runs in
    tf.data's threads while the main thread builds the model, which is Python. With `cache_uri`
    (storage.feature_cache) it first looks for the findings of an earlier run over the same
    files (`digests`: those already known, from a gs:// listing; the rest are hashed). A scan
    decodes only this worker's share; the workers agree afterwards (`agreed_findings`,
    `drop_undecodable`)."""
    files = [path for split in splits for path in split.files]

    def scan() -> Findings:
        import tensorflow as tf  # the decoder: its version is in the findings' key

        entry = scan_findings(cache_uri, files, known=digests, decoder=tf.__version__)
        if entry.found is not None:
            return Findings(entry.found, cached=True, entry=entry)
        return Findings(_scan_share(files, share), cached=False, entry=entry)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bad-image-scan")
    try:
        return pool.submit(scan)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the scan


def _scan_share(files: list[str], share: tuple[int, int]) -> dict[str, str]:
    from trainer.data import find_bad_images

    workers, index = share
    mine = [path for path in files if owner(path, workers) == index]
    log.info("scanning %d images for undecodable files", len(mine))
    return dict(find_bad_images(mine)) if mine else {}


def agreed_findings(
    findings: Findings, *, splits: tuple[Split, ...], strategy, workers: int, share: tuple[int, int]
) -> Findings:
    """One worker: `findings`. Several (`workers`): the cached findings only if every worker
    found them (an all-reduce: every worker calls this); else each scans its share of `splits`,
    a worker that had found them too, and `drop_undecodable` merges the shares."""
    from trainer.distribute import every_worker

    if workers == 1:
        return findings
    if every_worker(strategy, findings.cached) or not findings.cached:
        return findings  # every worker found them, or this one scanned
    files = [path for split in splits for path in split.files]
    return Findings(_scan_share(files, share), cached=False, entry=findings.entry)


def remember_findings(findings: Findings, *, kept: tuple[Split, ...]) -> None:
    """Keep in storage.feature_cache which of the listed files every worker agreed are bad
    (those not `kept`), each with its reason: the chief calls this once the splits are settled."""
    if findings.cached:
        return
    good = {path for split in kept for path in split.files}
    listed = findings.entry.files
    bad = {path: findings.bad.get(path, FOUND_ELSEWHERE) for path in listed if path not in good}
    findings.entry.remember(bad)


def drop_undecodable(
    splits: tuple[Split, Split], *, found: dict[str, str], fail: bool, strategy, share
) -> tuple[Split, Split]:
    """The training and test `splits` without the files the scan `found` ({path: reason}) do
    not decode (`fail`: refuse them instead, data.on_bad_image=fail); with a staged `share`,
    each worker scanned the images it owns and the workers agree on the bad ones (an
    all-reduce), so every worker keeps the same files."""
    return tuple(
        _drop(split, name=name, found=found, fail=fail, strategy=strategy, share=share)
        for name, split in zip(("training", "test"), splits, strict=True)
    )


def _drop(split: Split, *, name: str, found: dict[str, str], fail: bool, strategy, share) -> Split:
    from trainer.data import drop_bad_images
    from trainer.distribute import any_worker

    if share[0] == 1:
        bad = [(path, found[path]) for path in split.files if path in found]
        return drop_bad_images(split, name, fail, bad=bad)
    agreed = any_worker(strategy, [path in found for path in split.files])
    bad = [
        (split.files[i], found.get(split.files[i], FOUND_ELSEWHERE)) for i in np.flatnonzero(agreed)
    ]
    return drop_bad_images(split, name, fail, bad=bad)
