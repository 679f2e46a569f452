"""Fine-tune a frozen ImageNet ResNet50 on image folders; see README.md and docs/architecture.md."""


class TrainerError(Exception):
    """A problem the user can fix (config, data, paths, weights). Exit code 2, one line."""


class LostPeer(Exception):
    """Multi-worker training lost another worker (preempted, crashed, unreachable). Exit code 4:
    the Job's podFailurePolicy ignores it and its retry restarts every worker from the backup."""


class TimeLimitReached(Exception):
    """`train.max_hours` passed: training stopped at a step boundary, the model was evaluated and
    metrics written, nothing exported. Exit code 5 (a sweep's podFailurePolicy fails the point)."""


class Diverged(Exception):
    """The loss, the backbone's features or the predictions became NaN or infinite: nothing is
    exported. Exit code 6, which the Job's podFailurePolicy treats as permanent (a retry from
    the same inputs diverges again)."""


class BelowMinAccuracy(Exception):
    """The run trained but missed `train.min_accuracy`. Exit code 3; metrics written, no export."""


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
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
