"""Backbone features shared across runs: a split's pooled features, computed once, kept for good.

The frozen backbone's pooled features of a split are a pure function of the backbone weights,
the image size, the precision and the image files' contents in order, so a digest of exactly
those is the key (`feature_key`). Labels, class names and file names are not in it: they never
change a feature, so renaming a class folder still hits; rows follow the files' order, so a
different order (another split seed) is another key. Keys are cheap: local files are hashed
(2,000 small JPEGs take well under a second), objects staged from gs:// are identified by the
size and CRC32C of their listing, the ImageNet weights by the MD5 Keras checks them against.
Not in the key: the device and XLA, which change features only by float rounding (as running on
another machine does).

The cache (`storage.feature_cache`) is a local folder or a gs:// prefix holding

    <key>.npy     float32 [files, 2048], one row per file in the split's order
    <key>.claim   a run is computing <key>; others wait for it rather than compute it again
    scan-<...>.json  the bad-image scan's findings over a listing (trainer/inputs.py)

Entries are written atomically (locally a temporary name and a rename; on GCS a create with
if_generation_match=0, so the first writer wins and a later one keeps its own identical copy).
Each ends with a footer holding the SHA-256 of the bytes before it (numpy ignores bytes after
an array), which a reader checks: an entry whose digest does not match (a bit flip, a bad disk,
a writer that died or wrote something else), or that does not load as the expected array of
finite values, is a miss, logged and removed, never a hit.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from trainer import TrainerError
from trainer.gcs import WRITER_ROLE, client, is_gcs, retry, split_uri, user_errors

log = logging.getLogger(__name__)

VERSION = 2  # bump when the entries change for the same inputs (2: the digest footer)
FOOTER = b"TRAINER-SHA256:"  # + the hex SHA-256 of every byte before it
# keras.applications' file_hash (MD5) for resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5:
# Keras refuses a cached copy that does not match it, so it names the weights exactly.
IMAGENET_NOTOP_MD5 = "4d473c1dd8becc155b73f8504c6f6626"
WAIT_SECONDS = 600.0  # how long a miss waits for another run's claim; also when a claim is stale
POLL_SECONDS = 2.0
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
    payload = {
        "version": VERSION,
        "backbone": backbone,
        "weights": weights,
        "image_size": image_size,
        "precision": precision,
        "files": list(files),
    }
    digest = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
    # Readable prefix, so a person listing the cache sees what each entry is.
    return f"{image_size}px-{precision}-{len(files)}-{digest[:40]}"


# -- entries -----------------------------------------------------------------------------------


def _blob(cache_uri: str, name: str):
    bucket, prefix = split_uri(cache_uri, "storage.feature_cache")
    return client().bucket(bucket).blob(f"{prefix}/{name}" if prefix else name)


def _footer(digest) -> bytes:
    return FOOTER + digest.hexdigest().encode("ascii")


def _verified(path: str) -> bool:
    """Whether the entry at `path` ends with the footer of the bytes before it."""
    footer_size = len(FOOTER) + 64
    try:
        size = os.path.getsize(path)
        if size < footer_size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            left = size - footer_size
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    return False
                digest.update(chunk)
                left -= len(chunk)
            return f.read() == _footer(digest)
    except OSError:
        return False


def _load(path: str, rows: int | None, mmap: bool) -> np.ndarray | None:
    """The features in the entry at `path`, or None if it is not an intact float32 [rows, N]
    array of finite values."""
    if not _verified(path):
        return None
    try:
        features = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # truncated, not an .npy, unreadable
        return None
    ok = features.dtype == np.float32 and features.ndim == 2
    ok = ok and (rows is None or features.shape[0] == rows) and _finite(features)
    return features if ok else None


def _finite(features: np.ndarray, chunk: int = 4096) -> bool:
    rows = range(0, len(features), chunk)
    return all(np.isfinite(features[lo : lo + chunk]).all() for lo in rows)


def lookup(
    cache_uri: str,
    key: str,
    *,
    rows: int | None = None,
    local_dir: str | None = None,
    mmap: bool = False,
) -> np.ndarray | None:
    """The cached features of `key`, or None. An entry that is not a float32 [rows, N] array
    (truncated, corrupt) is a miss and is removed. `mmap`: a read-only memory map instead of
    an in-memory copy (gs:// entries are downloaded to `local_dir` first, kept there)."""
    name = f"{key}.npy"
    if not is_gcs(cache_uri):
        path = os.path.join(cache_uri, name)
        if not os.path.isfile(path):
            return None
        features = _load(path, rows, mmap)
        if features is None:
            log.warning(
                "feature cache: %s is corrupt (digest, shape or values): removed, a miss", path
            )
            with contextlib.suppress(OSError):
                os.remove(path)
        return features
    from google.api_core import exceptions

    blob = _blob(cache_uri, name)
    os.makedirs(local_dir or tempfile.gettempdir(), exist_ok=True)
    local = os.path.join(local_dir or tempfile.gettempdir(), f".{name}.{uuid.uuid4().hex}")
    try:
        blob.download_to_filename(local, retry=retry())  # checks the CRC32C
        features = _load(local, rows, mmap)
        if features is None:
            log.warning(
                "feature cache: %s/%s is corrupt (digest, shape or values): removed, a miss",
                cache_uri,
                name,
            )
            with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
                blob.delete(if_generation_match=blob.generation)  # not a newer, good copy
        elif mmap:
            final = os.path.join(local_dir or tempfile.gettempdir(), name)
            os.replace(local, final)
            return np.load(final, mmap_mode="r", allow_pickle=False)
        return features
    except exceptions.NotFound:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.remove(local)


def store(cache_uri: str, key: str, features: np.ndarray) -> bool:
    """Save `features` as the entry of `key`, atomically; False when another writer's entry was
    already there (same key, same features: theirs is kept, ours discarded)."""
    features = np.asarray(features, dtype=np.float32)
    # np.save writes to the open file: given a name, it would append ".npy"
    return _store_entry(cache_uri, f"{key}.npy", lambda f: np.save(f, features, allow_pickle=False))


def load_text(cache_uri: str, name: str) -> str | None:
    """The text entry `name` (a scan's findings), or None when it is missing or its digest
    does not match (logged; the caller computes it again and stores it anew)."""
    if not is_gcs(cache_uri):
        path = Path(cache_uri, name)
        data = path.read_bytes() if path.is_file() else None
    else:
        from google.api_core import exceptions

        try:
            data = _blob(cache_uri, name).download_as_bytes(retry=retry())
        except exceptions.NotFound:
            data = None
    if data is None:
        return None
    text, footer = data[: -len(FOOTER) - 64], data[-len(FOOTER) - 64 :]
    if footer != _footer(hashlib.sha256(text)):
        log.warning("feature cache: %s/%s is corrupt (digest): removed, a miss", cache_uri, name)
        _remove(cache_uri, name)
        return None
    return text.decode("utf-8")


def _remove(cache_uri: str, name: str) -> None:
    if not is_gcs(cache_uri):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(cache_uri, name))
        return
    from google.api_core import exceptions

    with contextlib.suppress(exceptions.NotFound):
        _blob(cache_uri, name).delete(retry=retry())


def store_text(cache_uri: str, name: str, text: str) -> None:
    """Save the text entry `name` atomically; on GCS the first writer's entry is kept."""
    _store_entry(cache_uri, name, lambda f: f.write(text.encode("utf-8")))


def _store_entry(cache_uri: str, name: str, write: Callable) -> bool:
    """Write the entry `name` with `write(binary file)`: locally to a temporary name, then
    renamed; on GCS uploaded with if_generation_match=0. False when another writer's entry was
    already there on GCS (its copy is kept)."""
    local_root = cache_uri if not is_gcs(cache_uri) else tempfile.gettempdir()
    os.makedirs(local_root, exist_ok=True)
    partial = os.path.join(local_root, f".{name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            write(f)
        with open(partial, "r+b") as f:  # the digest of what was written, appended
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            f.write(_footer(digest))
        if not is_gcs(cache_uri):
            os.replace(partial, os.path.join(cache_uri, name))  # same bytes if someone else won
            return True
        from google.api_core import exceptions

        try:
            _blob(cache_uri, name).upload_from_filename(
                partial, if_generation_match=0, retry=retry()
            )
        except exceptions.PreconditionFailed:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(partial)


# -- claims: one run computes, the others wait ------------------------------------------------


@dataclass
class Claim:
    """This process's claim on computing `key`; `release` when done (or failed)."""

    cache_uri: str
    key: str
    generation: int = 0  # gs:// only: so a release never removes someone else's newer claim

    def release(self) -> None:
        name = f"{self.key}.claim"
        if not is_gcs(self.cache_uri):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.cache_uri, name))
            return
        from google.api_core import exceptions

        with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
            _blob(self.cache_uri, name).delete(if_generation_match=self.generation, retry=retry())


def claim(cache_uri: str, key: str) -> Claim | None:
    """Claim the computing of `key`: a Claim, or None when another run holds the claim."""
    name = f"{key}.claim"
    holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    if not is_gcs(cache_uri):
        os.makedirs(cache_uri, exist_ok=True)
        try:
            fd = os.open(os.path.join(cache_uri, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(holder)
        return Claim(cache_uri, key)
    from google.api_core import exceptions

    blob = _blob(cache_uri, name)
    try:
        blob.upload_from_string(holder, if_generation_match=0, retry=retry())
    except exceptions.PreconditionFailed:
        return None
    return Claim(cache_uri, key, blob.generation)


def _drop_stale_claim(cache_uri: str, key: str, stale_seconds: float) -> None:
    """Remove the claim on `key` if it is older than `stale_seconds`: its run died (a run that
    fails releases its claim) or is slower than anyone should wait."""
    name = f"{key}.claim"
    if not is_gcs(cache_uri):
        path = os.path.join(cache_uri, name)
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(path) > stale_seconds:
                os.remove(path)
        return
    from google.api_core import exceptions

    bucket, prefix = split_uri(cache_uri, "storage.feature_cache")
    blob = client().bucket(bucket).get_blob(f"{prefix}/{name}" if prefix else name, retry=retry())
    if blob is not None and time.time() - blob.time_created.timestamp() > stale_seconds:
        with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
            blob.delete(if_generation_match=blob.generation, retry=retry())


@contextlib.contextmanager
def cache_errors(cache_uri: str) -> Iterator[None]:
    """What the user must fix about the cache itself (a folder that cannot be written, no
    access to the bucket) becomes one TrainerError naming storage.feature_cache."""
    key = "storage.feature_cache"
    if is_gcs(cache_uri):
        with user_errors(cache_uri, key, WRITER_ROLE):
            yield
        return
    try:
        yield
    except OSError as error:
        raise TrainerError(
            f"{key}={cache_uri}: cannot use this folder ({error.strerror or error}): point it at"
            " a writable folder or gs://BUCKET/PREFIX, or pass storage.feature_cache=null to turn"
            " the cache off"
        ) from error


def _claim_or_wait(
    cache_uri: str, key: str, *, rows: int, wait_seconds: float, poll_seconds: float, **load
) -> tuple[Claim | None, np.ndarray | None]:
    """(our claim, None) when this process should compute `key`; (None, features) when another
    run stored them meanwhile; (None, None) when the wait ran out: compute without a claim."""
    deadline = time.monotonic() + wait_seconds
    held = claim(cache_uri, key)
    if held is None and wait_seconds > 0:
        log.info(
            "feature cache: another run is computing %s; waiting up to %.0f s", key, wait_seconds
        )
    while held is None and time.monotonic() < deadline:
        time.sleep(poll_seconds)
        found = lookup(cache_uri, key, rows=rows, **load)
        if found is not None:
            return None, found
        _drop_stale_claim(cache_uri, key, wait_seconds)
        held = claim(cache_uri, key)  # free again: that run stored its entry, or failed
    if held is None:
        log.info("feature cache: waited %.0f s for %s; computing it here", wait_seconds, key)
        return None, None
    # The claim may be free because a run just stored the entry and released it.
    found = lookup(cache_uri, key, rows=rows, **load)
    if found is not None:
        held.release()
        return None, found
    return held, None


def cached_features(
    cache_uri: str,
    key: str,
    compute: Callable[[], np.ndarray],
    *,
    rows: int,
    wait_seconds: float = WAIT_SECONDS,
    poll_seconds: float = POLL_SECONDS,
    local_dir: str | None = None,
    mmap: bool = False,
) -> tuple[np.ndarray, bool]:
    """(features of `key`, whether they came from the cache). On a miss this process claims
    the key, runs `compute` and stores the result; when another run holds the claim it waits
    for that run's entry up to `wait_seconds`, then computes itself. A claim older than
    `wait_seconds` is stale and taken over. For one process per run: a multi-worker run must
    decide hit or miss on all workers together (`lookup`, agree, compute, the chief `store`s)."""
    load = {"local_dir": local_dir, "mmap": mmap}
    with cache_errors(cache_uri):
        found = lookup(cache_uri, key, rows=rows, **load)
        if found is not None:
            return found, True
        held, found = _claim_or_wait(
            cache_uri, key, rows=rows, wait_seconds=wait_seconds, poll_seconds=poll_seconds, **load
        )
        if found is not None:
            return found, True
    try:
        features = compute()
        with cache_errors(cache_uri):
            store(cache_uri, key, features)
        return features, False
    finally:
        if held is not None:
            held.release()
