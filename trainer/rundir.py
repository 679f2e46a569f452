"""The run directory's layout: every name under output.dir and the run's local working folder.

    output.dir/
      saved_model/        the SavedModel (trainer/export.py), written as .saved_model.partial
                          beside it and renamed into place (an older one goes via saved_model.old)
      labels.txt  metrics.json  config.yaml
      tensorboard/        event files, synced while training runs
      backup/             an unfinished run's state (head/, finetune/, phase1_done.weights.h5);
                          removed once the run is finished
      .feature_cache/     the run's feature spill: backbone features over the in-memory limit
                          (train.feature_cache_max_mb), memory-mapped; removed after evaluation
      .pixel_cache/       the run's pixel spill: decoded training, test and validation images over
                          the same limit, as tf.data cache files; removed when training ends
      _SUCCESS            written last: a reader that sees it sees a complete run

Names starting with "." and files ending in ".partial" are scratch: never published. Every
other module asks here for a path instead of spelling a name.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

SUCCESS = "_SUCCESS"
SAVED_MODEL = "saved_model"
LABELS = "labels.txt"
METRICS = "metrics.json"
CONFIG = "config.yaml"
TENSORBOARD = "tensorboard"
BACKUP = "backup"
FEATURE_SPILL = ".feature_cache"  # its name on disk is older than storage.feature_cache
PIXEL_SPILL = ".pixel_cache"
PARTIAL = ".partial"  # suffix of a file being written, renamed into place when complete
OLD = ".old"  # suffix of the previous model while a new one is moved into place

HYDRA_FILES = ("train.log", ".hydra")  # Hydra's log and composed config (conf/config.yaml)
FINISHED_MARKERS = (SUCCESS, SAVED_MODEL, METRICS)  # any of them: an earlier run finished here
OUTPUTS = (SUCCESS, SAVED_MODEL, METRICS, LABELS, CONFIG, TENSORBOARD)  # what a run publishes


def is_scratch(relative: str) -> bool:
    """Whether a path relative to the run directory is scratch (hidden or half-written)."""
    parts = relative.split("/")
    return relative.endswith(PARTIAL) or any(part.startswith(".") for part in parts)


def partial_path(path: str) -> str:
    """Where a file is written before it is renamed to `path` (an atomic write)."""
    return f"{path}{PARTIAL}"


def staging_dir(path: str) -> str:
    """The hidden sibling a directory is written into before it is renamed to `path`."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}{PARTIAL}")


def old_dir(path: str) -> str:
    """Where the directory at `path` goes while its replacement is moved into place."""
    return f"{path}{OLD}"


def worker_scratch() -> str:
    """A new private folder in the system temp dir for a non-chief worker, which must write
    somewhere (Keras callbacks, the export) but never to output.dir. The caller removes it."""
    return tempfile.mkdtemp(prefix="trainer-worker-")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run's local working folder `root` (output.dir itself when local)."""

    root: str

    def path(self, name: str) -> str:
        """`root`/`name`, for one of this module's names."""
        return os.path.join(self.root, name)

    @property
    def tensorboard(self) -> str:
        return self.path(TENSORBOARD)

    @property
    def saved_model(self) -> str:
        return self.path(SAVED_MODEL)

    @property
    def feature_spill(self) -> str:
        """Where this run's features over the in-memory limit are memory-mapped."""
        return self.path(FEATURE_SPILL)

    def pixel_spill(self, name: str) -> str:
        """The tf.data cache file (a prefix: tf.data adds .index and .data-* to it) of the
        decoded images of split `name` over the in-memory limit; all in one folder,
        `pixel_spill_dir`."""
        return os.path.join(self.pixel_spill_dir, name)

    @property
    def pixel_spill_dir(self) -> str:
        return self.path(PIXEL_SPILL)

    @property
    def backup(self) -> str:
        return self.path(BACKUP)

    @property
    def head_backup(self) -> str:
        """Keras' backup of the head phase (on images or on cached features)."""
        return os.path.join(self.backup, "head")

    @property
    def finetune_backup(self) -> str:
        return os.path.join(self.backup, "finetune")

    @property
    def phase1_done(self) -> str:
        """The full model's weights at the end of phase 1: a retry while fine-tuning starts
        from here and skips phase 1."""
        return os.path.join(self.backup, "phase1_done.weights.h5")
