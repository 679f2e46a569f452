"""The GCS layer: the only module that talks to `gs://`. It knows nothing of images or runs.

Objects under `gs://bucket/prefix` are staged to a local cache with parallel downloads; objects
already there with the same size and CRC32C are not downloaded again. The caller says which
objects it wants (a filter on the relative name). All I/O goes through google-cloud-storage,
which honours `STORAGE_EMULATOR_HOST` (tests use a GCS emulator on loopback) and Application
Default Credentials otherwise. Errors the user must fix (credentials, roles, a missing bucket)
become one TrainerError naming the config key; transient ones are retried.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from trainer import TrainerError

log = logging.getLogger(__name__)

WORKERS = 16  # parallel transfers: small images are latency-bound, so threads overlap the waits
RETRY_SECONDS = 120.0  # how long a transient error (429, 5xx, reset, timeout) is retried
PROGRESS_SECONDS = 5.0
READER_ROLE = "roles/storage.objectViewer"
WRITER_ROLE = "roles/storage.objectAdmin"


def is_gcs(path: str | None) -> bool:
    """True for a `gs://bucket/prefix` URI."""
    return bool(path) and str(path).startswith("gs://")


def split_uri(uri: str, key: str) -> tuple[str, str]:
    """(bucket, prefix) of `gs://bucket/prefix`; the prefix has no leading or trailing slash."""
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise TrainerError(f"{key}={uri}: no bucket name (expected gs://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


def join(prefix: str, name: str) -> str:
    """`prefix/name`, or `name` at the bucket's root."""
    return f"{prefix}/{name}" if prefix else name


def cache_path(cache_dir: str, kind: str, uri: str) -> str:
    """The local folder under `cache_dir`/`kind` that mirrors `uri`."""
    # Mirror bucket/prefix under the cache, so different URIs never share a folder and a
    # retried pod with the same cache finds what the last attempt staged.
    bucket, prefix = split_uri(uri, kind)
    return os.path.join(cache_dir, kind, bucket, *[p for p in prefix.split("/") if p])


# -- client, retries and errors ---------------------------------------------------------------

_client_lock = threading.Lock()
_clients: dict[str, object] = {}


def client():
    """The process's storage client: the emulator when STORAGE_EMULATOR_HOST is set, else ADC."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from requests.adapters import HTTPAdapter

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    with _client_lock:
        if emulator not in _clients:
            if emulator:
                project = os.environ.get("GOOGLE_CLOUD_PROJECT", "test")
                made = storage.Client(project=project, credentials=AnonymousCredentials())
            else:
                made = storage.Client()  # Workload Identity on GKE, GOOGLE_APPLICATION_CREDENTIALS
            # One connection per transfer thread; requests' default pool of 10 would make
            # every extra thread open and discard a connection per object.
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=WORKERS * 2)
            made._http.mount("https://", adapter)
            made._http.mount("http://", adapter)
            _clients[emulator] = made
        return _clients[emulator]


def retry(seconds: float = RETRY_SECONDS):
    """The library's retry policy (429, 408, 5xx, resets, timeouts; exponential backoff)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(seconds)


def _bucket_exists(bucket: str, retry_seconds: float) -> bool:
    """Whether `bucket` exists, by listing (objectViewer may list but not read bucket metadata)."""
    from google.api_core import exceptions

    try:
        next(iter(client().list_blobs(bucket, max_results=1, retry=retry(retry_seconds))), None)
    except exceptions.NotFound:
        return False
    return True


@contextlib.contextmanager
def user_errors(uri: str, key: str, role: str, not_found: str = "") -> Iterator[None]:
    """Turn what the user must fix (no credentials, 401/403, no bucket) into one TrainerError;
    `not_found` says what a 404 means where it is not the bucket."""
    from google.api_core import exceptions
    from google.auth.exceptions import DefaultCredentialsError, RefreshError

    bucket = split_uri(uri, key)[0]
    try:
        yield
    except DefaultCredentialsError as error:
        raise TrainerError(
            f"{key}={uri}: no Google Cloud credentials: on GKE use Workload Identity, elsewhere"
            " set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`"
        ) from error
    except RefreshError as error:
        raise TrainerError(
            f"{key}={uri}: could not get an access token ({' '.join(str(error).split())}):"
            " check the Workload Identity"
            " binding of the pod's Kubernetes service account, or GOOGLE_APPLICATION_CREDENTIALS"
        ) from error
    except (exceptions.Forbidden, exceptions.Unauthorized) as error:
        raise TrainerError(
            f"{key}={uri}: access denied ({error.code}): grant the job's service account"
            f" {role} on bucket gs://{bucket} and check the credentials in use"
        ) from error
    except exceptions.NotFound as error:
        if not_found:
            raise TrainerError(f"{key}={uri}: {not_found}") from error
        raise TrainerError(
            f"{key}={uri}: bucket gs://{bucket} not found: check the bucket name (and that the"
            f" job's service account has {role} on it)"
        ) from error


def _crc32c_b64(path: str) -> str:
    """A file's CRC32C as GCS reports it (base64 of the big-endian 32-bit value)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


# -- staging in --------------------------------------------------------------------------------


@dataclass
class StageReport:
    """What one staging did: objects downloaded and skipped, bytes downloaded, seconds taken."""

    downloaded: int
    skipped: int
    bytes: int
    seconds: float
    objects: dict = field(default_factory=dict)  # {relative path: blob}: all that was listed

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def objects_per_second(self) -> float:
        return self.downloaded / max(self.seconds, 1e-9)


def _is_staged(local: str, blob) -> bool:
    if not os.path.isfile(local) or os.path.getsize(local) != blob.size:
        return False
    # Size alone misses an object replaced by one of the same length (a re-encoded image).
    return blob.crc32c is None or _crc32c_b64(local) == blob.crc32c


def _download(blob, local: str, retry_seconds: float) -> None:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.partial"
    # download_to_filename checks the object's CRC32C (checksum="auto") and removes a corrupt
    # file; the rename means a killed pod never leaves a half-written file under its real name.
    blob.download_to_filename(partial, retry=retry(retry_seconds))
    os.replace(partial, local)


def list_objects(uri: str, key: str, keep: Callable[[str], bool], retry_seconds: float) -> dict:
    """{relative path: blob} of the objects under `uri` that `keep` accepts."""
    bucket, prefix = split_uri(uri, key)
    start = f"{prefix}/" if prefix else ""
    with user_errors(uri, key, READER_ROLE):
        blobs = list(client().list_blobs(bucket, prefix=start, retry=retry(retry_seconds)))
    found = {}
    for blob in blobs:
        relative = blob.name[len(start) :]
        parts = relative.split("/")
        # Skip folder placeholders ("a/") and names that would escape the cache folder.
        if relative.endswith("/") or any(p in ("", ".", "..") for p in parts):
            continue
        if keep(relative):
            found[relative] = blob
    return found


def _remove_stale(local_dir: str, wanted: set[str]) -> None:
    """Delete files the bucket no longer has, so the staged folder equals the prefix."""
    for folder, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.relpath(path, local_dir).replace(os.sep, "/") not in wanted:
                os.remove(path)


def _to_download(objects: dict, local_dir: str) -> list[tuple[object, str]]:
    """(blob, local path) of the objects `local_dir` lacks or holds an older version of;
    files the prefix no longer has are deleted, so the staged folder equals the prefix."""
    os.makedirs(local_dir, exist_ok=True)
    _remove_stale(local_dir, set(objects))
    todo = []
    for relative, blob in objects.items():
        local = os.path.join(local_dir, *relative.split("/"))
        if not _is_staged(local, blob):
            todo.append((blob, local))
    return todo


def stage_prefix(
    uri: str,
    local_dir: str,
    key: str,
    keep: Callable[[str], bool] = lambda name: True,
    workers: int = WORKERS,
    retry_seconds: float = RETRY_SECONDS,
    what: str = "objects",
    only: Callable[[str], bool] | None = None,
) -> StageReport:
    """Make `local_dir` hold the objects under `uri` (those `keep` accepts; of those, only
    the ones `only` accepts, when given; the report lists them all), downloading in parallel
    only what is missing or changed. TrainerError when the prefix holds none of `what`."""
    started = time.perf_counter()  # the report's seconds cover listing and checking too
    objects = list_objects(uri, key, keep, retry_seconds)
    if not objects:
        raise TrainerError(
            f"{key}={uri}: no {what} under this prefix: check the path (gcloud storage ls {uri})"
        )
    wanted = objects if only is None else {r: b for r, b in objects.items() if only(r)}
    todo = _to_download(wanted, local_dir)
    total_bytes = sum(blob.size for blob, _ in todo)
    if only is not None:
        log.info(
            "staging %s: %d of its %d objects are this worker's", uri, len(wanted), len(objects)
        )
    log.info(
        "staging %s: %d objects (%.1f MB) to download, %d already staged, %d workers -> %s",
        uri,
        len(todo),
        total_bytes / 1e6,
        len(wanted) - len(todo),
        workers,
        local_dir,
    )
    progress = _Progress(uri, len(todo), total_bytes, time.perf_counter())

    def fetch(item) -> None:
        blob, local = item
        # The download asks for the listed generation: a 404 means it changed meanwhile.
        changed = f"{blob.name} changed or was deleted while staging: run again"
        with user_errors(uri, key, READER_ROLE, not_found=changed):
            _download(blob, local, retry_seconds)
        progress.add(blob.size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fetch, todo):  # re-raises the first failure
            pass
    report = StageReport(len(todo), len(wanted) - len(todo), total_bytes, 0.0, objects)
    report.seconds = time.perf_counter() - started
    if todo:
        _log_staged(uri, report)
    return report


def _log_staged(uri: str, report: StageReport) -> None:
    log.info(
        "staged %s: %d objects, %.1f MB in %.1f s (%.1f MB/s, %.0f objects/s)",
        uri,
        report.downloaded,
        report.bytes / 1e6,
        report.seconds,
        report.mb_per_second,
        report.objects_per_second,
    )


class _Progress:
    """Thread-safe download counter that logs count, bytes and rate every few seconds."""

    def __init__(self, uri: str, count: int, total_bytes: int, started: float):
        self.uri, self.count, self.total_bytes, self.started = uri, count, total_bytes, started
        self.done = self.bytes = 0
        self.logged = started
        self.lock = threading.Lock()

    def add(self, size: int) -> None:
        with self.lock:
            self.done += 1
            self.bytes += size
            now = time.perf_counter()
            if now - self.logged < PROGRESS_SECONDS or self.done == self.count:
                return
            self.logged = now
            log.info(
                "staging %s: %d/%d objects, %.1f/%.1f MB, %.1f MB/s",
                self.uri,
                self.done,
                self.count,
                self.bytes / 1e6,
                self.total_bytes / 1e6,
                self.bytes / 1e6 / (now - self.started),
            )


def stage_file(uri: str, cache_dir: str, key: str, retry_seconds: float = RETRY_SECONDS) -> str:
    """A local copy of the file at `uri` (the file itself when it is local)."""
    if not is_gcs(uri):
        return uri
    bucket, name = split_uri(uri, key)
    local = cache_path(cache_dir, "inputs", uri)
    with user_errors(uri, key, READER_ROLE):
        blob = client().bucket(bucket).get_blob(name, retry=retry(retry_seconds)) if name else None
        if blob is None:
            if not _bucket_exists(bucket, retry_seconds):
                raise TrainerError(f"{key}={uri}: bucket gs://{bucket} not found: check its name")
            raise TrainerError(f"{key}={uri}: no such object: check the path")
        if _is_staged(local, blob):
            log.info("%s: already staged at %s", uri, local)
        else:
            started = time.perf_counter()
            _download(blob, local, retry_seconds)
            log.info(
                "staged %s (%.1f MB) in %.1f s", uri, blob.size / 1e6, time.perf_counter() - started
            )
    return local


def default_cache_dir() -> str:
    """Where commands without a config (predict) stage gs:// inputs; same as storage.cache_dir."""
    return os.environ.get("TRAINER_CACHE_DIR", "/tmp/trainer-cache")
