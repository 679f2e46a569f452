"""The job's inputs: which share of the images this worker stages, the staging itself, the
class folders split into file lists, and the undecodable images left out (agreed between workers).

Everything but the bad-image scan (`start_scan`, `drop_undecodable`) runs before TensorFlow is
imported, so a wrong path or an empty folder answers in a second. With storage.feature_cache set,
the scan's findings are kept there, keyed by the files' contents: a run over the same files
(a sweep's pods, a rerun) decodes none of them to learn which are bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

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


FOUND_ELSEWHERE = "undecodable; found by another worker"


@dataclass(frozen=True)
class Findings:
    """What the bad-image scan found: {path: reason} of the files that do not decode; whether
    that came from storage.feature_cache (then it covers every listed file), else this worker
    scanned its own share; the entry's key (None: no cache); {path: digest} of every file."""

    bad: dict[str, str]
    cached: bool = False
    key: str | None = None
    digests: dict[str, str] = field(default_factory=dict)


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
        key, known = None, {}
        if cache_uri:
            key, known = _scan_key(files, digests)
            found = _cached_findings(cache_uri, key, files)
            if found is not None:
                return Findings(found, True, key, known)
        return Findings(_scan_share(files, share), False, key, known)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bad-image-scan")
    try:
        return pool.submit(scan)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the scan


def _scan_share(files: list[str], share: tuple[int, int]) -> dict[str, str]:
    from trainer.data import find_bad_images

    workers, index = share
    mine = [path for path in files if owner(path, workers) == index]
    # The first images decoded: scripts/benchmark.py's start-up ends at this line.
    log.info("scanning %d images for undecodable files", len(mine))
    return dict(find_bad_images(mine)) if mine else {}


def _scan_key(files: list[str], digests: dict) -> tuple[str, dict[str, str]]:
    """(The findings' key, {path: digest}): whether a file decodes depends on its bytes and on
    the decoder, TensorFlow's."""
    import tensorflow as tf

    from trainer.feature_cache import VERSION, file_digests

    known = dict(zip(files, file_digests(files, known=digests), strict=True))
    payload = {"version": VERSION, "decoder": tf.__version__, "files": list(known.values())}
    digest = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
    return f"scan-{len(files)}-{digest[:40]}", known


def _cached_findings(cache_uri: str, key: str, files: list[str]) -> dict[str, str] | None:
    """{path: reason} from the entry of `key`, or None (no entry, or one that does not parse)."""
    from trainer.feature_cache import cache_errors, load_text

    with cache_errors(cache_uri):
        text = load_text(cache_uri, f"{key}.json")
    try:
        found = {files[i]: reason for i, reason in json.loads(text)["bad"]} if text else None
    except (ValueError, KeyError, IndexError, TypeError):
        found = None  # unreadable: scanned again, and stored again
    if found is not None:
        log.info(
            "bad-image scan skipped: %d of these %d images are undecodable, as %s/%s.json"
            " says (storage.feature_cache)",
            len(found),
            len(files),
            cache_uri,
            key,
        )
    return found


def agreed_findings(
    findings: Findings, *, splits: tuple[Split, ...], strategy, share: tuple[int, int]
) -> Findings:
    """One worker: `findings`. Several: the cached findings only if every worker found them
    (an all-reduce: every worker calls this); else each scans its share of `splits`, a worker
    that had found them too, and `drop_undecodable` merges the shares."""
    from trainer.distribute import worker_shard
    from trainer.phases import any_worker

    if worker_shard(strategy)[0] == 1:
        return findings
    missed = np.asarray([0.0 if findings.cached else 1.0], dtype=np.float32)
    if not any_worker(strategy, missed)[0] or not findings.cached:
        return findings  # every worker found them, or this one scanned
    files = [path for split in splits for path in split.files]
    return Findings(_scan_share(files, share), False, findings.key, findings.digests)


def remember_findings(findings: Findings, *, listed, kept, cache_uri: str | None) -> None:
    """Store what a scan found (the files every worker agreed are bad, `listed` minus `kept`)
    in storage.feature_cache: the chief calls this once the splits are settled."""
    from trainer.feature_cache import cache_errors, store_text

    if cache_uri is None or findings.cached or findings.key is None:
        return
    files = [path for split in listed for path in split.files]
    good = {path for split in kept for path in split.files}
    bad = [
        [i, findings.bad.get(path, FOUND_ELSEWHERE)]
        for i, path in enumerate(files)
        if path not in good
    ]
    with cache_errors(cache_uri):
        store_text(cache_uri, f"{findings.key}.json", json.dumps({"bad": bad}))


def drop_undecodable(
    split: Split, *, name: str, fail: bool, strategy, share, found: dict[str, str]
) -> Split:
    """drop_bad_images with what the scan `found` ({path: reason}); with a staged `share`, each
    worker scanned the images it owns and the workers agree on the bad ones (an all-reduce),
    so every worker keeps the same files."""
    from trainer.data import drop_bad_images
    from trainer.phases import any_worker

    if share[0] == 1:
        bad = [(path, found[path]) for path in split.files if path in found]
        return drop_bad_images(split, name, fail, bad=bad)
    flags = np.asarray([path in found for path in split.files], dtype=np.float32)
    agreed = any_worker(strategy, flags)
    bad = [
        (split.files[i], found.get(split.files[i], FOUND_ELSEWHERE)) for i in np.flatnonzero(agreed)
    ]
    return drop_bad_images(split, name, fail, bad=bad)
