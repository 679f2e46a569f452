"""Fine-tune a frozen ImageNet ResNet50 on image folders; see README.md and docs/architecture.md."""

import enum


class ExitCode(enum.IntEnum):
    """The trainer's exit codes (README's table), defined here only: `__main__` exits with
    them, `kube`'s podFailurePolicy, `sweep` and the Kubernetes launcher derive from them."""

    OK = 0  # model exported, _SUCCESS written
    CRASH = 1  # a bug, GCS unavailable past its retries, a worker that never joined
    USER_ERROR = 2  # bad config or data: one line naming the key, path or file
    BELOW_MIN_ACCURACY = 3  # trained, below train.min_accuracy: metrics written, no export
    LOST_PEER = 4  # multi-worker: another worker is gone; the Job's retry restarts every worker
    TIME_LIMIT = 5  # train.max_hours reached: metrics written, no export
    DIVERGED = 6  # NaN or inf loss, features or predictions: nothing exported
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (a backup kept); the Kubernetes launcher stopped
    PREEMPTED = 143  # 128 + SIGTERM: stopped with a backup; the same command resumes


class TrainerError(Exception):
    """A problem the user can fix (config, data, paths, weights): one line."""

    exit_code = ExitCode.USER_ERROR


class LostPeer(Exception):
    """Multi-worker training lost another worker (preempted, crashed, unreachable): the Job's
    podFailurePolicy ignores its code and its retry restarts every worker from the backup."""

    exit_code = ExitCode.LOST_PEER


class TimeLimitReached(Exception):
    """`train.max_hours` passed: training stopped at a step boundary, the model was evaluated and
    metrics written, nothing exported (a sweep's podFailurePolicy fails the point)."""

    exit_code = ExitCode.TIME_LIMIT


class Diverged(Exception):
    """The loss, the backbone's features or the predictions became NaN or infinite: nothing is
    exported, and the Job's podFailurePolicy treats the code as permanent (a retry from the
    same inputs diverges again)."""

    exit_code = ExitCode.DIVERGED


class BelowMinAccuracy(Exception):
    """The run trained but missed `train.min_accuracy`; metrics written, no export."""

    exit_code = ExitCode.BELOW_MIN_ACCURACY


class Preempted(Exception):
    """SIGTERM (node preemption, eviction, `kubectl delete`): stopped after flushing a backup
    (trainer/train.py); the Job's retry resumes from it."""

    exit_code = ExitCode.PREEMPTED


class Interrupted(Preempted):
    """SIGINT (Ctrl-C): stopped as SIGTERM stops the run, a backup kept, exit 130."""

    exit_code = ExitCode.INTERRUPTED


def config_error_line(error: BaseException) -> str:
    """One line naming the key, from Hydra's and OmegaConf's multi-line messages (the trainer's
    and scripts/submit.py's config errors)."""
    from omegaconf.errors import OmegaConfBaseException

    cause = error
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = getattr(cause, "msg", None) or str(cause)
        msg = msg.splitlines()[0] if msg else type(cause).__name__
        return f"{key}: {msg}" if key else msg
    return _joined(str(error)) or type(error).__name__


# Where Hydra's report goes on to list its config search path: of no use to the user.
_SEARCH_PATH = "Config search path:"


def _joined(message: str) -> str:
    """Hydra's multi-line `message` as one line, keeping what the user acts on: a heading
    ending in ":" takes the lines under it as its list ("Available options in 'experiment':
    demo, hotdog"), other lines (numbered hints: "3. To sweep over it, add --multirun ...")
    are joined with "; "."""
    lines = [line.strip() for line in message.split(_SEARCH_PATH)[0].splitlines()]
    parts, listing = [], False
    for line in filter(None, lines):
        if parts and parts[-1].endswith(":"):
            parts[-1], listing = f"{parts[-1]} {line}", True
        elif listing and " " not in line:
            parts[-1] = f"{parts[-1]}, {line}"
        else:
            parts.append(line)
            listing = False
    return "; ".join(parts)
