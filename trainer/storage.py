"""Where inputs come from and outputs go: the only module that knows about `gs://`.

Inputs (image folders, weights files, exported models) under `gs://bucket/prefix` are staged to
a local cache with parallel downloads; objects already there with the same size and CRC32C are
not downloaded again. The run always writes to a local working directory; for a `gs://`
output.dir, `Output` uploads what changed while training runs (TensorBoard events) and
`Output.publish` uploads everything else, then `_SUCCESS` last, so a reader that sees `_SUCCESS`
sees a complete run. All I/O goes through google-cloud-storage, which honours
`STORAGE_EMULATOR_HOST` (tests use a GCS emulator on loopback) and Application Default
Credentials otherwise.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from trainer import TrainerError
from trainer.data import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

FINISHED_MARKERS = ("_SUCCESS", "saved_model", "metrics.json")
OUTPUTS = ("_SUCCESS", "saved_model", "metrics.json", "labels.txt", "config.yaml", "tensorboard")
BACKUP = "backup"  # training state of an unfinished run (see trainer/train.py); removed at the end
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _cache_path(cache_dir: str, kind: str, uri: str) -> str:
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
def _user_errors(uri: str, key: str, role: str, not_found: str = "") -> Iterator[None]:
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


def _list(uri: str, key: str, keep: Callable[[str], bool], retry_seconds: float) -> dict:
    """{relative path: blob} of the objects under `uri` that `keep` accepts."""
    bucket, prefix = split_uri(uri, key)
    start = f"{prefix}/" if prefix else ""
    with _user_errors(uri, key, READER_ROLE):
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


def stage_prefix(
    uri: str,
    local_dir: str,
    key: str,
    keep: Callable[[str], bool] = lambda name: True,
    workers: int = WORKERS,
    retry_seconds: float = RETRY_SECONDS,
    what: str = "objects",
) -> StageReport:
    """Make `local_dir` hold the objects under `uri` (those `keep` accepts), downloading in
    parallel only what is missing or changed. TrainerError when the prefix holds none of
    `what`."""
    started = time.perf_counter()  # the report's seconds cover listing and checking too
    objects = _list(uri, key, keep, retry_seconds)
    if not objects:
        raise TrainerError(
            f"{key}={uri}: no {what} under this prefix: check the path (gcloud storage ls {uri})"
        )
    os.makedirs(local_dir, exist_ok=True)
    _remove_stale(local_dir, set(objects))
    todo = [
        (blob, os.path.join(local_dir, *relative.split("/")))
        for relative, blob in objects.items()
        if not _is_staged(os.path.join(local_dir, *relative.split("/")), blob)
    ]
    total_bytes = sum(blob.size for blob, _ in todo)
    log.info(
        "staging %s: %d objects (%.1f MB) to download, %d already staged, %d workers -> %s",
        uri,
        len(todo),
        total_bytes / 1e6,
        len(objects) - len(todo),
        workers,
        local_dir,
    )
    progress = _Progress(uri, len(todo), total_bytes, time.perf_counter())

    def fetch(item) -> None:
        blob, local = item
        # The download asks for the listed generation: a 404 means it changed meanwhile.
        changed = f"{blob.name} changed or was deleted while staging: run again"
        with _user_errors(uri, key, READER_ROLE, not_found=changed):
            _download(blob, local, retry_seconds)
        progress.add(blob.size)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fetch, todo):  # re-raises the first failure
            pass
    report = StageReport(len(todo), len(objects) - len(todo), total_bytes, 0.0)
    report.seconds = time.perf_counter() - started
    if todo:
        log.info(
            "staged %s: %d objects, %.1f MB in %.1f s (%.1f MB/s, %.0f objects/s)",
            uri,
            report.downloaded,
            report.bytes / 1e6,
            report.seconds,
            report.mb_per_second,
            report.objects_per_second,
        )
    return report


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


def _is_image(relative: str) -> bool:
    # The data module counts only these; staging anything else would only cost bandwidth.
    return relative.lower().endswith(IMAGE_EXTENSIONS) and not any(
        part.startswith(".") for part in relative.split("/")
    )


def stage_dir(uri: str, cache_dir: str, key: str, workers: int = WORKERS) -> str:
    """A local folder holding the image folder at `uri` (the folder itself when it is local)."""
    if not is_gcs(uri):
        return uri
    local = _cache_path(cache_dir, "inputs", uri)
    what = f"objects ({', '.join(IMAGE_EXTENSIONS)})"
    stage_prefix(uri, local, key, keep=_is_image, workers=workers, what=what)
    return local


def stage_file(uri: str, cache_dir: str, key: str, retry_seconds: float = RETRY_SECONDS) -> str:
    """A local copy of the file at `uri` (the file itself when it is local)."""
    if not is_gcs(uri):
        return uri
    bucket, name = split_uri(uri, key)
    local = _cache_path(cache_dir, "inputs", uri)
    with _user_errors(uri, key, READER_ROLE):
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


def stage_model_dir(uri: str, cache_dir: str | None = None) -> str:
    """A local copy of an exported model directory (the folder itself when it is local).
    For a gs:// run directory only its saved_model/ is fetched, and only if `_SUCCESS` is there."""
    if not is_gcs(uri):
        if not os.path.isdir(uri):
            raise TrainerError(f"{uri}: model folder not found")
        return uri
    key = "MODEL_DIR"
    local = _cache_path(cache_dir or default_cache_dir(), "models", uri)
    names = _list(uri, key, lambda name: name in ("_SUCCESS", "saved_model.pb"), 60)
    if "saved_model.pb" in names:  # the saved_model/ folder itself
        stage_prefix(uri, local, key)
    elif "_SUCCESS" in names:  # a run's output.dir: the model only, the rest may be large
        stage_prefix(uri.rstrip("/") + "/saved_model", os.path.join(local, "saved_model"), key)
    else:
        raise TrainerError(
            f"{uri}: no saved_model.pb and no _SUCCESS here: check the path, or wait until the"
            " run has published its model (it writes _SUCCESS last)"
        )
    return local


# -- outputs -----------------------------------------------------------------------------------


def _syncable(relative: str, with_model: bool) -> bool:
    """Whether the background/epoch-end sync (or, with_model, the final publish) uploads it."""
    top = relative.split("/")[0]
    if top == "_SUCCESS" or relative.endswith(".partial"):
        return False
    if any(part.startswith(".") for part in relative.split("/")):
        return False  # feature spill, the export's .saved_model.partial: scratch, never outputs
    if top.startswith("saved_model"):
        # Uploaded once, complete, by publish; never half-written mid-export (saved_model.old).
        return with_model and top == "saved_model"
    return True


class Output:
    """The run's output directory: `local_dir` is where the run writes; `publish` finishes it.

    For a local output.dir the two are the same folder. For gs:// the run writes under
    `storage.cache_dir`; `sync` uploads changed files (not the model), a daemon thread calls it
    every `sync_seconds`, and `publish` uploads the rest and then `_SUCCESS`."""

    def __init__(
        self,
        uri: str,
        overwrite: bool,
        cache_dir: str,
        sync_seconds: int,
        retry_seconds: float = RETRY_SECONDS,
        workers: int = 8,
    ):
        self.uri = uri.rstrip("/") if is_gcs(uri) else uri
        self.remote = is_gcs(uri)
        self.local_dir = _cache_path(cache_dir, "outputs", uri) if self.remote else uri
        self.overwrite = overwrite
        self.sync_seconds = sync_seconds
        self.retry_seconds = retry_seconds
        self.workers = workers
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._lock = threading.Lock()  # one sync at a time: epoch end vs the daemon thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepared = self._published = False

    def check(self) -> list[str]:
        """Refuse (TrainerError) a finished run at output.dir unless `overwrite`; read-only.
        Returns the finished-run markers found. A run that left a backup is unfinished (it was
        stopped, e.g. preempted, before publishing): it is resumed, not refused."""
        found = self._remote_markers() if self.remote else self._local_markers()
        if found and not self.overwrite and not self.has_backup():
            raise TrainerError(
                f"output.dir={self.uri}: holds the outputs of an earlier run ({', '.join(found)});"
                " choose another output.dir or pass output.overwrite=true to replace them"
            )
        return found

    def _local_markers(self) -> list[str]:
        out_dir = self.local_dir
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise TrainerError(f"output.dir={out_dir}: exists and is not a directory")
        return [m for m in FINISHED_MARKERS if os.path.exists(os.path.join(out_dir, m))]

    def _remote_markers(self) -> list[str]:
        bucket, prefix = split_uri(self.uri, "output.dir")
        start = f"{prefix}/" if prefix else ""
        with _user_errors(self.uri, "output.dir", WRITER_ROLE):
            pages = client().list_blobs(
                bucket, prefix=start, delimiter="/", retry=retry(self.retry_seconds)
            )
            names = {blob.name[len(start) :] for blob in pages}
            names |= {p[len(start) :].rstrip("/") for p in pages.prefixes}
        return [m for m in FINISHED_MARKERS if m in names]

    def has_backup(self) -> bool:
        """Whether output.dir holds the backup of an unfinished run."""
        if not self.remote:
            return os.path.isdir(os.path.join(self.local_dir, BACKUP))
        bucket, prefix = split_uri(self.uri, "output.dir")
        with _user_errors(self.uri, "output.dir", WRITER_ROLE):
            blobs = client().list_blobs(
                bucket,
                prefix=_join(prefix, BACKUP) + "/",
                max_results=1,
                retry=retry(self.retry_seconds),
            )
            return next(iter(blobs), None) is not None

    def prepare(self) -> None:
        """On the chief: `check`, then clear an earlier run's outputs (only with `overwrite`);
        for gs://, fetch an unfinished run's backup and start the background sync."""
        found = self.check()
        resume = not self.overwrite and self.has_backup()
        if self.remote:
            if found and self.overwrite:
                self._delete_remote_outputs()
            # The working folder is scratch: an earlier attempt's files must not be uploaded
            # as this run's. Only the backup comes back, to resume from.
            shutil.rmtree(self.local_dir, ignore_errors=True)
            if resume:
                stage_prefix(
                    f"{self.uri}/{BACKUP}",
                    os.path.join(self.local_dir, BACKUP),
                    "output.dir",
                    retry_seconds=self.retry_seconds,
                    what="backup files",
                )
        elif self.overwrite:
            for name in (*OUTPUTS, BACKUP):
                path = os.path.join(self.local_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(self.local_dir, exist_ok=True)
        self._prepared = True
        if self.remote and self.sync_seconds > 0:
            self._thread = threading.Thread(target=self._sync_forever, daemon=True)
            self._thread.start()

    def _delete_remote_outputs(self) -> None:
        bucket, prefix = split_uri(self.uri, "output.dir")
        with _user_errors(self.uri, "output.dir", WRITER_ROLE):
            gcs = client()
            # _SUCCESS first: from here on no reader takes the old outputs for a finished run.
            for name in (*OUTPUTS, BACKUP):
                path = _join(prefix, name)
                blobs = list(gcs.list_blobs(bucket, prefix=path, retry=retry(self.retry_seconds)))
                for blob in blobs:
                    if blob.name == path or blob.name.startswith(f"{path}/"):
                        blob.delete(retry=retry(self.retry_seconds))
        log.info("output.overwrite=true: removed the earlier run's outputs from %s", self.uri)

    def sync(self) -> None:
        """Push what the run has written so far (TensorBoard events, metrics; not the model)
        to a gs:// output.dir. Permanent errors raise TrainerError; transient ones, once
        retries are exhausted, are logged: the final `publish` uploads everything again."""
        if not (self.remote and self._prepared):
            return
        try:
            self._upload_changed(with_model=False)
        except TrainerError:
            raise
        except Exception as error:  # noqa: BLE001 - training goes on; publish will retry
            log.warning("sync to %s failed, will try again later: %s", self.uri, error)

    def _sync_forever(self) -> None:
        while not self._stop.wait(self.sync_seconds):
            try:
                self.sync()
            except Exception as error:  # noqa: BLE001 - never kill the daemon thread
                log.warning("background sync to %s failed: %s", self.uri, error)

    def _changed(self, with_model: bool) -> list[tuple[str, str, tuple[int, int]]]:
        changed = []
        for folder, dirs, files in os.walk(self.local_dir):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                if not _syncable(relative, with_model):
                    continue
                try:
                    stat = os.stat(path)
                except FileNotFoundError:  # renamed away while we walked (atomic writes)
                    continue
                state = (stat.st_size, stat.st_mtime_ns)
                if self._uploaded.get(relative) != state:
                    changed.append((relative, path, state))
        return changed

    def _upload_changed(self, with_model: bool) -> int:
        """Upload files changed since the last upload; return how many. Raises on failure."""
        bucket_name, prefix = split_uri(self.uri, "output.dir")
        with self._lock:
            changed = self._changed(with_model)
            with _user_errors(self.uri, "output.dir", WRITER_ROLE):
                bucket = client().bucket(bucket_name)

            def upload(item) -> None:
                relative, path, state = item
                blob = bucket.blob(_join(prefix, relative))
                # Explicit retry: we are the only writer, so re-sending a file is idempotent.
                blob.upload_from_filename(path, retry=retry(self.retry_seconds))
                self._uploaded[relative] = state

            with _user_errors(self.uri, "output.dir", WRITER_ROLE):
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    for _ in pool.map(upload, changed):
                        pass
        return len(changed)

    def publish(self) -> None:
        """Make every output visible at `output.dir`, then write `_SUCCESS` last."""
        success = os.path.join(self.local_dir, "_SUCCESS")
        if not self.remote:
            with open(success, "w"):
                pass
            self.remove_backup()
            return
        self._stop_thread()
        started = time.perf_counter()
        uploaded = self._upload_changed(with_model=True)  # raises: then no _SUCCESS anywhere
        bucket, prefix = split_uri(self.uri, "output.dir")
        with _user_errors(self.uri, "output.dir", WRITER_ROLE):
            client().bucket(bucket).blob(_join(prefix, "_SUCCESS")).upload_from_string(
                b"", retry=retry(self.retry_seconds)
            )
        with open(success, "w"):
            pass
        self._published = True
        self.remove_backup()
        log.info(
            "published %s: %d files uploaded in %.1f s, _SUCCESS last",
            self.uri,
            uploaded,
            time.perf_counter() - started,
        )

    def fetch_backup(self, dest_dir: str) -> bool:
        """Copy an unfinished run's backup into `dest_dir`/backup (read-only for output.dir):
        other workers resume from the chief's state. Returns whether there was one."""
        if self.overwrite or not self.has_backup():
            return False
        dest = os.path.join(dest_dir, BACKUP)
        if self.remote:
            stage_prefix(
                f"{self.uri}/{BACKUP}",
                dest,
                "output.dir",
                retry_seconds=self.retry_seconds,
                what="backup files",
            )
        else:
            shutil.copytree(os.path.join(self.local_dir, BACKUP), dest, dirs_exist_ok=True)
        return True

    def remove_backup(self) -> None:
        """A finished run's backup goes (locally and at output.dir): a retry must not resume it.
        Removed after `_SUCCESS`, so a stop in between leaves a run that still counts as done."""
        with self._lock:
            shutil.rmtree(os.path.join(self.local_dir, BACKUP), ignore_errors=True)
            self._uploaded = {k: v for k, v in self._uploaded.items() if k.split("/")[0] != BACKUP}
        if not self.remote:
            return
        bucket, prefix = split_uri(self.uri, "output.dir")
        with _user_errors(self.uri, "output.dir", WRITER_ROLE):
            start = _join(prefix, BACKUP) + "/"
            for blob in client().list_blobs(bucket, prefix=start, retry=retry(self.retry_seconds)):
                blob.delete(retry=retry(self.retry_seconds))

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop background syncing; after a failed or below-target run, push what exists (events,
        metrics) once more. The working directory stays for inspection."""
        self._stop_thread()
        if self.remote and self._prepared and not self._published:
            with contextlib.suppress(Exception):
                self.sync()
