"""The feature cache: what a run can reuse of an earlier run over the same files, kept for good.

It answers two questions, each behind one function: the backbone's pooled features of a split
(`split_features`) and which files of a listing do not decode (`scan_findings`). Both keys come
from one builder (`_key`) over the files' contents and what else decides the answer.

The frozen backbone's pooled features of a split are a pure function of the backbone weights,
the image size, the precision and the image files' contents in order, so a digest of exactly
those is the key (`feature_key`). Labels, class names and file names are not in it: they never
change a feature, so renaming a class folder still hits; rows follow the files' order, so a
different order (another split seed) is another key. Keys are cheap: local files are hashed
(2,000 small JPEGs take well under a second), objects staged from gs:// are identified by the
size and CRC32C of their listing, the ImageNet weights by the MD5 Keras checks them against.
Not in the key: the device and XLA, which change features only by float rounding (as running on
another machine does). Whether a file decodes depends on its bytes and on the decoder,
TensorFlow's version: the findings' key.

The cache (`storage.feature_cache`) is a local folder or a gs:// prefix holding

    <key>.npy        float32 [files, 2048], one row per file in the split's order
    <key>.claim      a run is computing <key>; others wait for it (claims.py)
    scan-<...>.json  the bad-image scan's findings over a listing

Every entry is written atomically and ends with a digest that readers check (entries.py), which
also lists and removes them for `python -m trainer.cache`: nothing evicts entries on its own.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

from trainer.feature_cache.claims import cached_features
from trainer.feature_cache.entries import (
    FOOTER,
    Entry,
    cache_errors,
    entries,
    load_text,
    lookup,
    remove,
    store,
    store_text,
)

__all__ = [  # what the rest of the trainer (and the tests) use
    "FOOTER",
    "IMAGENET_NOTOP_MD5",
    "Backbone",
    "Entry",
    "RunCache",
    "ScanEntry",
    "cache_errors",
    "cached_features",
    "entries",
    "feature_key",
    "file_digests",
    "listing_digests",
    "load_text",
    "lookup",
    "remove",
    "scan_findings",
    "split_features",
    "store",
    "store_text",
    "weights_digest",
]

log = logging.getLogger(__name__)

VERSION = 2  # bump when the entries change for the same inputs (2: the digest footer)
# keras.applications' file_hash (MD5) for resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5:
# Keras refuses a cached copy that does not match it, so it names the weights exactly.
IMAGENET_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
HASH_THREADS = 8  # hashlib releases the GIL: threads overlap reading and hashing small files


# -- the key -----------------------------------------------------------------------------------


def file_digests(
    paths: Sequence[str], *, known: Mapping[str, str] | None = None, threads: int = HASH_THREADS
) -> list[str]:
    """One content digest per file, in order: `known[path]` where given (`listing_digests`),
    else the SHA-256 of its bytes, or its path and error if it cannot be read."""
    known = known or {}

    def digest(path: str) -> str:
        if path in known:
            return known[path]
        try:
            return "sha256:" + _hash_file(path, "sha256")
        except OSError as error:
            return f"unreadable:{path}:{error.errno}"

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(digest, paths))


def _hash_file(path: str, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def listing_digests(objects: Mapping[str, object], local_dir: str) -> dict[str, str]:
    """{local path: digest} for a gs:// listing ({relative name: blob}, what the staging code
    lists) staged to `local_dir`: size and CRC32C, which staging checked the local copies
    against, so the staged files need not be read again."""
    return {
        os.path.join(local_dir, *relative.split("/")): f"gcs:{blob.size}:{blob.crc32c}"
        for relative, blob in objects.items()
    }


def weights_digest(weights: str | None, *, seed: int) -> str:
    """What identifies the backbone's weights: `imagenet`'s known file hash, a weights file's
    MD5 (the same digest when it is that very file), or for random weights (`null`) the seed
    and the Keras version that drew them: the same in every process and under every strategy,
    as long as the backbone is the first thing built after keras.utils.set_random_seed."""
    if weights is None:
        return f"random:seed={seed}:keras={metadata.version('keras')}"
    if weights == "imagenet":
        return f"md5:{IMAGENET_NOTOP_MD5}"
    return "md5:" + _hash_file(weights, "md5")


def _key(label: str, **facts) -> str:
    """The key of an entry: `label`, readable, so a person listing the cache sees what each
    entry is, then a digest of this cache's VERSION and the `facts` that decide its contents."""
    payload = {"version": VERSION, **facts}
    return f"{label}-{hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:40]}"


def feature_key(
    *,
    files: Sequence[str],
    weights: str,
    image_size: int,
    precision: str,
    backbone: str,
) -> str:
    """The cache key of a split's features. `files`: `file_digests` of the split, in order;
    `weights`: `weights_digest`; `precision`: the resolved Keras policy (e.g. mixed_bfloat16),
    not `auto`, which means different things on different machines; `backbone`: how the
    features are computed (trainer.model.backbone_kind)."""
    return _key(
        f"{image_size}px-{precision}-{len(files)}",
        backbone=backbone,
        weights=weights,
        image_size=image_size,
        precision=precision,
        files=list(files),
    )


# -- a split's features ----------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """What computes a split's features, the half of their key that is not the files: `weights`
    (`weights_digest`), the image size, the resolved `precision` and the `kind`
    (trainer.model.backbone_kind)."""

    weights: str
    image_size: int
    precision: str
    kind: str


@dataclass(frozen=True)
class RunCache:
    """One run's use of the cache: its `uri` (storage.feature_cache); `spill_dir`, the run's
    folder for features over the in-memory limit (a gs:// entry is downloaded there); `known`,
    {path: digest} of files not to read again; with several workers, `every_worker` (whether a
    flag holds on every worker: an all-reduce) and whether this worker is the `chief`."""

    uri: str
    spill_dir: str
    known: Mapping[str, str] = field(default_factory=dict)
    every_worker: Callable[[bool], bool] | None = None  # None: one worker
    chief: bool = True


def split_features(
    cache: RunCache,
    *,
    name: str,
    files: Sequence[str],
    backbone: Backbone,
    compute: Callable[[], np.ndarray],
    mmap: bool,
) -> tuple[np.ndarray, bool]:
    """(features of the split of `files`, whether the cache had them); `name` (train, test)
    for the log, `mmap`: a read-only memory map instead of an in-memory copy. One worker: the
    claim-or-wait protocol (`cached_features`). Several: the backbone pass is a collective, so
    all workers agree on hit or miss first (a hit only if every worker found the entry), and
    the chief stores what they computed together."""
    key = feature_key(
        files=file_digests(files, known=cache.known),
        weights=backbone.weights,
        image_size=backbone.image_size,
        precision=backbone.precision,
        backbone=backbone.kind,
    )
    load = {"rows": len(files), "local_dir": cache.spill_dir, "mmap": mmap}
    if cache.every_worker is None:
        features, hit = cached_features(cache.uri, key, compute, **load)
    else:
        with cache_errors(cache.uri):
            found = lookup(cache.uri, key, **load)
        hit = cache.every_worker(found is not None)
        features = found if hit else compute()
        if not hit and cache.chief:
            with cache_errors(cache.uri):
                store(cache.uri, key, features)
    if hit:
        log.info(
            "features of the %s set from the feature cache: %d x %d, %s/%s.npy"
            " (backbone pass skipped)",
            name,
            len(files),
            features.shape[1],
            cache.uri,
            key,
        )
    elif cache.chief:
        log.info("feature cache: the %s set's features stored as %s/%s.npy", name, cache.uri, key)
    return features, hit


# -- a listing's scan findings ---------------------------------------------------------------


@dataclass(frozen=True)
class ScanEntry:
    """The bad-image scan's entry for a listing of `files`: `found`, {path: reason} of the
    files that do not decode as an earlier run's scan over the same files found them, or None
    (scan them); `digests`, {path: digest} of every file, which the feature keys reuse; its
    `key` (None, as `uri`, without a cache)."""

    uri: str | None
    key: str | None
    files: tuple[str, ...]
    digests: dict[str, str] = field(default_factory=dict)
    found: dict[str, str] | None = None

    def remember(self, bad: Mapping[str, str]) -> None:
        """Store `bad` ({path: reason} of the files agreed undecodable) as this listing's
        findings; nothing without a cache."""
        if self.uri is None or self.key is None:
            return
        rows = [[i, bad[path]] for i, path in enumerate(self.files) if path in bad]
        with cache_errors(self.uri):
            store_text(self.uri, f"{self.key}.json", json.dumps({"bad": rows}))


def scan_findings(
    cache_uri: str | None, files: Sequence[str], *, known: Mapping[str, str], decoder: str
) -> ScanEntry:
    """The scan's entry for `files` (`known`: digests from a gs:// listing; the rest are hashed)
    under `decoder`, TensorFlow's version; its findings if an earlier run stored them."""
    if not cache_uri:
        return ScanEntry(None, None, tuple(files))
    digests = dict(zip(files, file_digests(files, known=known), strict=True))
    key = _key(f"scan-{len(files)}", decoder=decoder, files=list(digests.values()))
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
    return ScanEntry(cache_uri, key, tuple(files), digests, found)
