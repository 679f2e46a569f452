"""The feature cache's entries: written atomically, each ending with a digest its readers check.

Locally an entry is written under a temporary name and renamed; on GCS it is created with
if_generation_match=0, so the first writer wins and a later one keeps its own identical copy.
Each ends with a footer holding the SHA-256 of the bytes before it (numpy ignores bytes after
an array), which a reader checks: an entry whose digest does not match (a bit flip, a bad disk,
a writer that died or wrote something else), or that does not load as the expected array of
finite values, is a miss, logged and removed, never a hit. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import TrainerError
from trainer.gcs import WRITER_ROLE, client, is_gcs, retry, split_uri, user_errors

log = logging.getLogger("trainer.feature_cache")  # one name in the log for the whole cache

FOOTER = b"TRAINER-SHA256:"  # + the hex SHA-256 of every byte before it
# What each entry of the cache is, by its name's ending (the package's docstring has the layout);
# names starting with "." are writes in progress, never entries.
KINDS = {".npy": "features", ".json": "scan findings", ".claim": "claim"}


@dataclass(frozen=True)
class Entry:
    """One entry of a cache as `entries` lists it: its `name` in the cache, what it is
    (`kind`, a value of KINDS), its size in bytes and when it was written (epoch seconds)."""

    name: str
    kind: str
    size: int
    written: float


def entries(cache_uri: str) -> list[Entry]:
    """Every entry of the cache at `cache_uri` (a folder or gs:// prefix), oldest first; none
    for a folder that does not exist."""
    found = []
    if not is_gcs(cache_uri):
        with contextlib.suppress(FileNotFoundError), os.scandir(cache_uri) as listing:
            for item in listing:
                kind = _kind(item.name)
                if kind and item.is_file():
                    stat = item.stat()
                    found.append(Entry(item.name, kind, stat.st_size, stat.st_mtime))
    else:
        bucket, prefix = split_uri(cache_uri, "storage.feature_cache")
        start = f"{prefix}/" if prefix else ""
        with user_errors(cache_uri, "storage.feature_cache", WRITER_ROLE):
            for blob in client().list_blobs(bucket, prefix=start, delimiter="/", retry=retry()):
                name = blob.name[len(start) :]
                if _kind(name):
                    found.append(Entry(name, _kind(name), blob.size, blob.updated.timestamp()))
    return sorted(found, key=lambda entry: entry.written)


def _kind(name: str) -> str | None:
    if name.startswith("."):
        return None
    return next((kind for end, kind in KINDS.items() if name.endswith(end)), None)


def remove(cache_uri: str, entry: Entry) -> None:
    """Remove `entry` from the cache (gone already: nothing to do). A run reading it meanwhile
    keeps its open copy locally, or finds a miss and computes it again."""
    _remove(cache_uri, entry.name)


def gcs_object(cache_uri: str, name: str):
    """The GCS object of the entry `name` under the gs:// `cache_uri`."""
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

    blob = gcs_object(cache_uri, name)
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
            data = gcs_object(cache_uri, name).download_as_bytes(retry=retry())
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
        gcs_object(cache_uri, name).delete(retry=retry())


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
            gcs_object(cache_uri, name).upload_from_filename(
                partial, if_generation_match=0, retry=retry()
            )
        except exceptions.PreconditionFailed:
            return False
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(partial)


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
