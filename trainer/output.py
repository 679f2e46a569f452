"""The output lifecycle: check, prepare, sync, publish, backup.

The run always writes to a local working folder. For a local output.dir that is output.dir
itself; for a `gs://` output.dir it is a folder under `storage.cache_dir`, `Output.sync` uploads
what changed while training runs (TensorBoard events), and `Output.publish` uploads everything
else, then `_SUCCESS` last, so a reader that sees `_SUCCESS` sees a complete run. The names
come from trainer/rundir.py; the bucket access from trainer/gcs.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from trainer import TrainerError, rundir
from trainer.gcs import (
    RETRY_SECONDS,
    WRITER_ROLE,
    cache_path,
    client,
    is_gcs,
    join,
    retry,
    split_uri,
    stage_prefix,
    user_errors,
)
from trainer.rundir import BACKUP, FINISHED_MARKERS, OUTPUTS, SUCCESS

log = logging.getLogger(__name__)


def _syncable(relative: str, with_model: bool) -> bool:
    """Whether the background/epoch-end sync (or, with_model, the final publish) uploads it."""
    top = relative.split("/")[0]
    if top == SUCCESS or rundir.is_scratch(relative):
        return False  # _SUCCESS goes last, by publish; scratch (feature spill, partial) never
    if top.startswith(rundir.SAVED_MODEL):
        # Uploaded once, complete, by publish; never half-written mid-export (saved_model.old).
        return with_model and top == rundir.SAVED_MODEL
    return True


def _clear(folder: str, *, keep: tuple[str, ...]) -> None:
    """Remove everything in `folder` but the names in `keep`."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name in keep:
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


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
        self.local_dir = cache_path(cache_dir, "outputs", uri) if self.remote else uri
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
        with user_errors(self.uri, "output.dir", WRITER_ROLE):
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
        with user_errors(self.uri, "output.dir", WRITER_ROLE):
            blobs = client().list_blobs(
                bucket,
                prefix=join(prefix, BACKUP) + "/",
                max_results=1,
                retry=retry(self.retry_seconds),
            )
            return next(iter(blobs), None) is not None

    def prepare(self) -> None:
        """On the chief: `check`, then clear an earlier run's outputs (only with `overwrite`);
        for gs://, fetch an unfinished run's backup and start the background sync."""
        found = self.check()
        resume = not self.overwrite and self.has_backup()
        if resume:
            # What the stopped attempt wrote (metrics.json at train.max_hours) is replaced when
            # this run writes its own: say so, it is not silent.
            left = f"; this run replaces its {', '.join(found)}" if found else ""
            log.info("output.dir=%s: resuming the unfinished run from its backup%s", self.uri, left)
        if self.remote:
            if found and self.overwrite:
                self._delete_remote_outputs()
            # The working folder is scratch: an earlier attempt's files must not be uploaded
            # as this run's. Only the backup comes back, to resume from; Hydra's log and
            # config are this run's own (Hydra's run dir is this folder), uploaded with it.
            _clear(self.local_dir, keep=rundir.HYDRA_FILES)
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
        with user_errors(self.uri, "output.dir", WRITER_ROLE):
            gcs = client()
            # _SUCCESS first: from here on no reader takes the old outputs for a finished run.
            for name in (*OUTPUTS, BACKUP):
                path = join(prefix, name)
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
            with user_errors(self.uri, "output.dir", WRITER_ROLE):
                bucket = client().bucket(bucket_name)

            def upload(item) -> None:
                relative, path, state = item
                blob = bucket.blob(join(prefix, relative))
                # Explicit retry: we are the only writer, so re-sending a file is idempotent.
                blob.upload_from_filename(path, retry=retry(self.retry_seconds))
                self._uploaded[relative] = state

            with user_errors(self.uri, "output.dir", WRITER_ROLE):
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    for _ in pool.map(upload, changed):
                        pass
        return len(changed)

    def publish(self) -> None:
        """Make every output visible at `output.dir`, then write `_SUCCESS` last."""
        success = os.path.join(self.local_dir, SUCCESS)
        if not self.remote:
            with open(success, "w"):
                pass
            self.remove_backup()
            return
        self._stop_thread()
        started = time.perf_counter()
        uploaded = self._upload_changed(with_model=True)  # raises: then no _SUCCESS anywhere
        bucket, prefix = split_uri(self.uri, "output.dir")
        with user_errors(self.uri, "output.dir", WRITER_ROLE):
            client().bucket(bucket).blob(join(prefix, SUCCESS)).upload_from_string(
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
        with user_errors(self.uri, "output.dir", WRITER_ROLE):
            start = join(prefix, BACKUP) + "/"
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
