"""Where inputs come from and outputs go: the only module that knows about `gs://`.

Inputs (image folders, weights files) are staged to local disk; the run writes its outputs to a
local working directory, and `Output.publish` makes them visible at `output.dir` with `_SUCCESS`
last, so a reader that sees `_SUCCESS` sees a complete run.
"""

from __future__ import annotations

import os
import shutil

from trainer import TrainerError

FINISHED_MARKERS = ("_SUCCESS", "saved_model", "metrics.json")
OUTPUTS = ("_SUCCESS", "saved_model", "metrics.json", "labels.txt", "config.yaml", "tensorboard")


def is_gcs(path: str | None) -> bool:
    return bool(path) and str(path).startswith("gs://")


def _no_gcs_yet(uri: str, key: str) -> TrainerError:
    return TrainerError(f"{key}={uri}: gs:// paths are not supported by this build")


def stage_dir(uri: str, cache_dir: str, key: str) -> str:
    """A local folder holding the image folder at `uri` (the folder itself when it is local)."""
    if is_gcs(uri):
        raise _no_gcs_yet(uri, key)
    return uri


def stage_file(uri: str, cache_dir: str, key: str) -> str:
    """A local copy of the file at `uri` (the file itself when it is local)."""
    if is_gcs(uri):
        raise _no_gcs_yet(uri, key)
    return uri


class Output:
    """The run's output directory: `local_dir` is where the run writes; `publish` finishes it."""

    def __init__(self, uri: str, overwrite: bool, cache_dir: str, sync_seconds: int):
        if is_gcs(uri):
            raise _no_gcs_yet(uri, "output.dir")
        self.uri = uri
        self.local_dir = uri
        self.overwrite = overwrite
        self.sync_seconds = sync_seconds

    def check(self) -> list[str]:
        """Refuse (TrainerError) a finished run at output.dir unless `overwrite`; read-only.
        Returns the finished-run markers found."""
        out_dir = self.local_dir
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise TrainerError(f"output.dir={out_dir}: exists and is not a directory")
        found = [m for m in FINISHED_MARKERS if os.path.exists(os.path.join(out_dir, m))]
        if found and not self.overwrite:
            raise TrainerError(
                f"output.dir={self.uri}: holds the outputs of an earlier run ({', '.join(found)});"
                " choose another output.dir or pass output.overwrite=true to replace them"
            )
        return found

    def prepare(self) -> None:
        """On the chief: `check`, then clear an earlier run's outputs (only with `overwrite`)."""
        out_dir = self.local_dir
        for name in OUTPUTS if self.check() else ():
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        os.makedirs(out_dir, exist_ok=True)

    def sync(self) -> None:
        """Push what the run has written so far (TensorBoard events) to `output.dir`."""

    def publish(self) -> None:
        """Make every output visible at `output.dir`, then write `_SUCCESS` last."""
        with open(os.path.join(self.local_dir, "_SUCCESS"), "w"):
            pass

    def close(self) -> None:
        """Stop background syncing; the working directory stays for inspection."""


def stage_model_dir(uri: str) -> str:
    """A local copy of an exported model directory (the folder itself when it is local)."""
    if is_gcs(uri):
        raise _no_gcs_yet(uri, "MODEL_DIR")
    if not os.path.isdir(uri):
        raise TrainerError(f"{uri}: model folder not found")
    return uri
