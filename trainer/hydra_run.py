"""Hydra's run directory: beside the outputs, and untouched by a run that never started.

`hydra.run.dir` (conf/config.yaml) is `${trainer.run_dir:DEFAULT}`: output.dir when the user set
one (for gs://, the local folder the run writes and uploads from), so train.log and .hydra/ sit
beside the outputs, else Hydra's `outputs/DATE/TIME`. Hydra creates that folder before the task
runs, so a run that fails early would leave it behind: the resolver notes what was there first,
and `undo_unused_run_dir` (called by `__main__` on every way out) puts it back.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


@dataclass
class _Before:
    """A run directory as it was before Hydra wrote to it."""

    created: list[str]  # the folders Hydra is about to make for it, deepest first
    hydra_files: dict[str, bytes]  # an earlier run's .hydra/ files and train.log there
    times: dict[str, tuple[int, int]]  # their (atime, mtime) in ns, .hydra/ itself last


_BEFORE: dict[str, _Before] = {}


def _run_dir(default: str, *, _root_: DictConfig) -> str:
    """`hydra.run.dir`: output.dir when the user set one (for gs://, the local folder the run
    writes and uploads from), else `default`, the folder output.dir then defaults to."""
    run_dir = default
    raw = OmegaConf.to_container(_root_.output, resolve=False)["dir"] if "output" in _root_ else ""
    if "hydra:runtime.output_dir" not in str(raw):  # output.dir is not Hydra's: a user's choice
        out = str(_root_.output.dir)
        if out.startswith("gs://"):
            from trainer.output import Output

            cache_dir = str(_root_.storage.cache_dir)
            out = Output(out, overwrite=False, cache_dir=cache_dir, sync_seconds=0).local_dir
        if os.path.isdir(out) or not os.path.exists(out):  # a file there: the job says so
            run_dir = out
    path = os.path.abspath(run_dir)
    if path not in _BEFORE:  # Hydra resolves this more than once; the first time is before
        log, subdir = _hydra_paths(path, _root_.hydra.job.name, _root_.hydra.output_subdir)
        existing = [os.path.join(subdir, n) for n in _listdir(subdir)] + [log, subdir]
        existing = [p for p in existing if os.path.exists(p)]
        _BEFORE[path] = _Before(
            created=missing_folders(path),
            hydra_files={p: _read(p) for p in existing if os.path.isfile(p)},
            times={p: (os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns) for p in existing},
        )
    return run_dir


def _hydra_paths(run_dir: str, job_name: str, output_subdir) -> tuple[str, str]:
    """Hydra's log file and its folder of the composed config (.hydra/) in `run_dir`."""
    return os.path.join(run_dir, f"{job_name}.log"), os.path.join(run_dir, str(output_subdir))


def missing_folders(path: str) -> list[str]:
    """`path` and its parents that do not exist yet, deepest first (what a run about to write
    there creates, and may remove again; the Kubernetes launcher's sweep folder too)."""
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


OmegaConf.register_new_resolver("trainer.run_dir", _run_dir)


def undo_unused_run_dir() -> None:
    """A run that wrote nothing (a config or data error) leaves no trace: the folders its run
    directory needed go if they hold only Hydra's files (.hydra/, train.log); in a folder that
    existed, an earlier run's Hydra files are put back as they were."""
    if not HydraConfig.initialized():
        return  # called with a composed config (tests, sweeper plugins): no run directory
    hydra = HydraConfig.get()
    run_dir = hydra.runtime.output_dir
    before = _BEFORE.get(run_dir)
    if before is None or not os.path.isdir(run_dir):
        return  # hydra.run.dir was given on the command line, or a sweep: Hydra's own layout
    log, subdir = _hydra_paths(run_dir, hydra.job.name, hydra.output_subdir)
    if before.created:
        if not set(os.listdir(run_dir)) <= {os.path.basename(log), os.path.basename(subdir)}:
            return
    elif "tensorflow" in sys.modules:
        return  # the job imports TensorFlow only after its checks: this run may have written
    _close_file_logs(run_dir)
    for path in [os.path.join(subdir, n) for n in _listdir(subdir)] + [log]:
        if path not in before.hydra_files and os.path.isfile(path):
            os.remove(path)
    if subdir not in before.times:
        shutil.rmtree(subdir, ignore_errors=True)
    for path, data in before.hydra_files.items():
        if not os.path.isfile(path) or _read(path) != data:
            with open(path, "wb") as f:
                f.write(data)
    for path, times in before.times.items():
        os.utime(path, ns=times)
    for folder in before.created:  # up to the first one something else has written to
        try:
            os.rmdir(folder)
        except OSError:
            break


def _close_file_logs(folder: str) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(folder):
            root.removeHandler(handler)
            handler.close()
