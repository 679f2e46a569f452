"""`python -m trainer [overrides]`: Hydra entry point.

Composes the config, runs the job, maps errors to exit codes (2: bad config or data, 3: below
`train.min_accuracy`) and returns the test accuracy, which Hydra sweepers optimize.
"""

from __future__ import annotations

import json
import os
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) would bury our one-line errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from trainer import BelowMinAccuracy, TrainerError, sweep  # noqa: E402
from trainer.config import register_configs  # noqa: E402

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
    from trainer.train import Preempted

    # Exit from inside the job: Hydra would otherwise add its own "Error executing job" report.
    # issue 10: in a multirun, _fail raises the code to Hydra instead, and the sweep goes on.
    try:
        return sweep.run_point(run, cfg)["test_accuracy"]  # issue 10: output.dir/N in a sweep
    except TrainerError as error:
        _fail(2, f"trainer: error: {error}", error)
    except BelowMinAccuracy as error:
        _fail(3, f"trainer: {error}", error)
    except Preempted as error:  # 128 + SIGTERM, as if the signal had ended us: the Job retries
        _fail(
            143, f"trainer: stopped: {error}; run again with the same output.dir to resume", error
        )


def _fail(code: int, line: str, error: BaseException) -> None:  # issue 10
    sweep.raise_or_exit(code, line, error, _exit)


def _exit(code: int, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _config_error_line(error: BaseException) -> str:
    """One line naming the key, from Hydra's and OmegaConf's multi-line messages."""
    cause = error
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = getattr(cause, "msg", None) or str(cause)
        msg = msg.splitlines()[0] if msg else type(cause).__name__
        return f"{key}: {msg}" if key else msg
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def sweep_point_overrides(environ=os.environ) -> list[str]:
    """In a sweep's Indexed Job, this pod's overrides: scripts/submit.py puts every point's
    override list in TRAINER_SWEEP (JSON) and Kubernetes sets JOB_COMPLETION_INDEX."""
    if "TRAINER_SWEEP" not in environ or "JOB_COMPLETION_INDEX" not in environ:
        return []
    return json.loads(environ["TRAINER_SWEEP"])[int(environ["JOB_COMPLETION_INDEX"])]


def main() -> None:
    """Console script `trainer`; the same as `python -m trainer`."""
    sys.argv += sweep_point_overrides()
    # Hydra would print multi-line reports and exit 1; let errors reach us to give exit codes.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        _exit(2, f"trainer: config error: {_config_error_line(error)}")
    except (Exception, sweep.SweepStopped):  # issue 10: the sweeper re-raised a point's error
        if not sweep.started():
            raise
    # issue 10: a multirun exits with its first failing point's code (0: all succeeded).
    code = sweep.finish()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
