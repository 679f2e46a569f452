"""`python -m trainer [overrides]`: Hydra entry point.

Composes the config, runs the job, maps errors to exit codes (2: bad config or data, 3: below
`train.min_accuracy`) and returns the test accuracy, which Hydra sweepers optimize. Hydra's run
directory (train.log, .hydra/) is output.dir when one is set (see `_run_dir`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass

from trainer.quiet import quiet_tensorflow_startup

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) would bury our one-line errors.
quiet_tensorflow_startup()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from trainer import (  # noqa: E402
    BelowMinAccuracy,
    LostPeer,
    TimeLimitReached,
    TrainerError,
    config_error_line,
    sweep,
)
from trainer.config import enum_overrides, register_configs  # noqa: E402
from trainer.kube import sweep_point_overrides  # noqa: E402

register_configs()


# A source checkout (editable install, git worktree) reads conf/ beside the package; an installed
# wheel carries the same files as the package trainer.conf.
_CHECKOUT_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf")
_CONF = (
    os.path.normpath(_CHECKOUT_CONF)
    if os.path.isfile(os.path.join(_CHECKOUT_CONF, "config.yaml"))
    else "pkg://trainer.conf"
)


@hydra.main(version_base="1.3", config_path=_CONF, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from trainer.job import run

    # Exit from inside the job: Hydra would otherwise add its own "Error executing job" report.
    # In a multirun, _fail raises the code to Hydra instead, and the sweep goes on.
    try:
        return sweep.run_point(run, cfg)["test_accuracy"]  # output.dir/N in a sweep
    except TrainerError as error:
        _fail(2, f"trainer: error: {error}", error)
    except BelowMinAccuracy as error:
        _fail(3, f"trainer: {error}", error)
    except TimeLimitReached as error:
        _fail(5, f"trainer: {error}", error)
    except Exception as error:
        code, line = _exit_for(error)
        if code is None:
            raise
        _fail(code, line, error)
    finally:
        _undo_unused_run_dir()


def _exit_for(error: Exception) -> tuple[int | None, str]:
    """Exit 143 for a preemption, 4 for a lost peer worker, None for a crash. The modules are
    looked up, not imported: they load TensorFlow, and unloaded means neither could happen."""
    train = sys.modules.get("trainer.train")
    if train is not None and isinstance(error, train.Preempted):
        # 128 + SIGTERM, as if the signal had ended us: the Job retries
        return 143, f"trainer: stopped: {error}; run again with the same output.dir to resume"
    distribute = sys.modules.get("trainer.distribute")  # not loaded: no cluster was joined
    lost = error if isinstance(error, LostPeer) else distribute and distribute.lost_peer(error)
    if lost:
        return 4, f"trainer: lost a peer worker: {lost}; the Job's retry restarts every worker"
    return None, ""


def _fail(code: int, line: str, error: BaseException) -> None:
    """A single run prints `line` and exits `code`; a sweep point raises it to Hydra instead,
    so the sweep goes on (trainer/sweep.py)."""
    sweep.raise_or_exit(code, line, error, _exit)


def _exit(code: int, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


# -- Hydra's run directory: beside the outputs, untouched by a run that never started ----------


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

            out = Output(out, False, str(_root_.storage.cache_dir), 0).local_dir
        if os.path.isdir(out) or not os.path.exists(out):  # a file there: the job says so
            run_dir = out
    path = os.path.abspath(run_dir)
    if path not in _BEFORE:  # Hydra resolves this more than once; the first time is before
        log, subdir = _hydra_paths(path, _root_.hydra.job.name, _root_.hydra.output_subdir)
        existing = [os.path.join(subdir, n) for n in _listdir(subdir)] + [log, subdir]
        existing = [p for p in existing if os.path.exists(p)]
        _BEFORE[path] = _Before(
            created=_missing_folders(path),
            hydra_files={p: _read(p) for p in existing if os.path.isfile(p)},
            times={p: (os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns) for p in existing},
        )
    return run_dir


def _hydra_paths(run_dir: str, job_name: str, output_subdir) -> tuple[str, str]:
    """Hydra's log file and its folder of the composed config (.hydra/) in `run_dir`."""
    return os.path.join(run_dir, f"{job_name}.log"), os.path.join(run_dir, str(output_subdir))


def _missing_folders(path: str) -> list[str]:
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


def _undo_unused_run_dir() -> None:
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


def main() -> None:
    """Console script `trainer`; the same as `python -m trainer`."""
    sys.argv[1:] = enum_overrides(sys.argv[1:] + sweep_point_overrides())
    # Hydra would print multi-line reports and exit 1; let errors reach us to give exit codes.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        _exit(2, f"trainer: config error: {config_error_line(error)}")
    except (Exception, sweep.SweepStopped):  # the sweeper re-raised a point's error
        if not sweep.started():
            raise
    # A multirun exits with its first failing point's code (0: all succeeded).
    code = sweep.finish()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
