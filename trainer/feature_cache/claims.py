"""Claims: when several runs miss the same key at once, one computes and the others wait.

    <key>.claim   a run is computing <key>; others wait for it rather than compute it again

A claim older than the wait is stale (its run died, or is slower than anyone should wait) and
taken over. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainer.feature_cache.entries import cache_errors, gcs_object, lookup, store
from trainer.gcs import client, is_gcs, retry, split_uri

log = logging.getLogger("trainer.feature_cache")  # one name in the log for the whole cache

WAIT_SECONDS = 600.0  # how long a miss waits for another run's claim; also when a claim is stale
POLL_SECONDS = 2.0


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
            gcs_object(self.cache_uri, name).delete(
                if_generation_match=self.generation, retry=retry()
            )


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

    blob = gcs_object(cache_uri, name)
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
