"""`python -m trainer [overrides]`: Hydra entry point.

Composes the config, runs the job, maps errors to their exit codes (`trainer.ExitCode`,
README's table) and returns the test accuracy, which Hydra sweepers optimize. Hydra's run
directory (train.log, .hydra/) is output.dir when one is set (trainer/hydra_run.py).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import os
import shlex
import sys

# TensorFlow and Keras build large object graphs: their modules at import, FuncGraphs and layers
# in every run, which Python's default thresholds (700, 10, 10) make the collector walk in full
# passes again and again. What that cost, measured: docs/performance.md, "Collector thresholds".
gc.set_threshold(10_000, 10, 10)

from trainer.quiet import quiet_tensorflow_startup  # noqa: E402

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) would bury our one-line errors.
quiet_tensorflow_startup()

import hydra  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from trainer import (  # noqa: E402
    BelowMinAccuracy,
    Diverged,
    ExitCode,
    Interrupted,
    LostPeer,
    Preempted,
    TimeLimitReached,
    TrainerError,
    config_error_line,
    hydra_run,
    sweep,
)
from trainer.config import enum_overrides, register_configs  # noqa: E402
from trainer.kube import sweep_point_overrides  # noqa: E402
from trainer.timings import process_seconds  # noqa: E402

register_configs()


# A source checkout (editable install, git worktree) reads conf/ beside the package; an installed
# wheel carries the same files as the package trainer.conf.
_CHECKOUT_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf")
_CONF = (
    os.path.normpath(_CHECKOUT_CONF)
    if os.path.isfile(os.path.join(_CHECKOUT_CONF, "config.yaml"))
    else "pkg://trainer.conf"
)


# Counts the runs of this process: the first one's metrics.json gets the process' start-up.
_RUNS = itertools.count()


@hydra.main(version_base="1.3", config_path=_CONF, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from trainer.job import run

    # Python, the imports and Hydra's config, for metrics.json's timings; a sweep's later
    # points start in a process long up.
    startup_s = process_seconds() if next(_RUNS) == 0 else None
    # Exit from inside the job: Hydra would otherwise add its own "Error executing job" report.
    # In a multirun, _fail raises the code to Hydra instead, and the sweep goes on.
    try:
        run_once = functools.partial(run, startup_s=startup_s)
        return sweep.run_point(run_once, cfg)["test_accuracy"]  # output.dir/N in a sweep
    except Exception as error:
        known, line = _known(error)
        if known is None:
            raise
        _fail(known.exit_code, line.format(known, resume=resume_command(cfg)), error)
    except KeyboardInterrupt as error:  # Ctrl-C twice, or once before the job's handler
        line = "trainer: interrupted (Ctrl-C): stopped at once; to resume (from the last backup"
        _fail(ExitCode.INTERRUPTED, f"{line}, if any), run: {resume_command(cfg)}", error)
    finally:
        hydra_run.undo_unused_run_dir()


def resume_command(cfg: DictConfig) -> str:
    """The command that resumes this run: its overrides as given, with output.dir set to the
    folder this run wrote (absolute, when local). The same command alone would not do without
    an output.dir: Hydra's default folder (outputs/DATE/TIME) is a new one at every start."""
    from hydra.core.hydra_config import HydraConfig

    given = [o for o in HydraConfig.get().overrides.task if o.split("=")[0] != "output.dir"]
    out = str(cfg.output.dir)
    out = out if out.startswith("gs://") else os.path.abspath(out)
    return shlex.join(["python", "-m", "trainer", *given, f"output.dir={out}"])


# The last line a single run prints on stderr for each error with an exit code of its own;
# {resume} is the command that resumes the run from its backup (resume_command).
_LINES = {
    TrainerError: "trainer: error: {}",
    BelowMinAccuracy: "trainer: {}",
    TimeLimitReached: "trainer: {}; backup kept; to resume, run: {resume}",
    Diverged: "trainer: diverged: {}",
    Interrupted: "trainer: interrupted (Ctrl-C): {}; to resume, run: {resume}",  # before Preempted
    Preempted: "trainer: stopped: {}; to resume, run: {resume}",
    LostPeer: "trainer: lost a peer worker: {}; the Job's retry restarts every worker",
}


def _known(error: Exception) -> tuple[Exception | None, str]:
    """`error` as one of _LINES' errors (TensorFlow's report of a lost peer as LostPeer), with
    its line; None for a crash. trainer.distribute is looked up, not imported: it loads
    TensorFlow, and unloaded means no cluster was joined."""
    distribute = sys.modules.get("trainer.distribute")
    lost = distribute.lost_peer(error) if distribute else None
    error = lost or error
    line = next((line for kind, line in _LINES.items() if isinstance(error, kind)), None)
    return (error, line) if line else (None, "")


def _fail(code: int, line: str, error: BaseException) -> None:
    """A single run prints `line` and exits `code`; a sweep point raises it to Hydra instead,
    so the sweep goes on (trainer/sweep.py)."""
    sweep.raise_or_exit(code, line, error, _exit)


def _exit(code: int, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    """Console script `trainer`; the same as `python -m trainer`."""
    try:
        _main()
    except SystemExit as stop:  # a one-line error (_exit), Hydra's --help
        if not isinstance(stop.code, (int, type(None))):
            raise
        _leave(stop.code or ExitCode.OK)


def _main() -> None:
    sys.argv[1:] = enum_overrides(sys.argv[1:] + sweep_point_overrides())
    # Hydra would print multi-line reports and exit 1; let errors reach us to give exit codes.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        _exit(ExitCode.USER_ERROR, f"trainer: config error: {config_error_line(error)}")
    except KeyboardInterrupt:  # Ctrl-C outside a run (Hydra composing the config): one line
        _exit(ExitCode.INTERRUPTED, "trainer: interrupted (Ctrl-C)")
    except (Exception, sweep.SweepStopped):  # the sweeper re-raised a point's error
        if not sweep.started():
            raise
    # A multirun exits with its first failing point's code (0: all succeeded).
    _leave(sweep.finish())


def _leave(code: int) -> None:
    """Exit as soon as the job is done or has failed: the interpreter's teardown of
    TensorFlow's objects takes about a second after the last line (docs/performance.md, "Exit
    at once"), and it would wait for work still running on other threads (the bad-image scan,
    when building the model failed); neither does anything a user needs (outputs are
    published, their writers closed). Log handlers (train.log) and both streams are flushed
    first, and autograph's generated modules removed."""
    logging.shutdown()
    _remove_autograph_files()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The name TensorFlow's autograph gives the module of each function it converts.
_AUTOGRAPH_MODULES = "__autograph_generated_file"


def _remove_autograph_files() -> None:
    """Autograph writes each converted function as a module into the temp dir and removes the
    file at exit (atexit), which os._exit skips. The modules this process loaded (sys.modules
    names them, with their files) go here: nobody else's, though they share the temp dir."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) if name.startswith(_AUTOGRAPH_MODULES) else None
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)


if __name__ == "__main__":
    main()
