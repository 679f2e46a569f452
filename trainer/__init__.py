"""Fine-tune a frozen ImageNet ResNet50 on image folders; see README.md and DESIGN.md."""


class TrainerError(Exception):
    """A problem the user can fix (config, data, paths, weights). Exit code 2, one line."""


class LostPeer(Exception):
    """Multi-worker training lost another worker (preempted, crashed, unreachable). Exit code 4:
    the Job's podFailurePolicy ignores it and its retry restarts every worker from the backup."""


class TimeLimitReached(Exception):
    """`train.max_hours` passed: training stopped at a step boundary, the model was evaluated and
    metrics written, nothing exported. Exit code 5 (a sweep's podFailurePolicy fails the point)."""


class BelowMinAccuracy(Exception):
    """The run trained but missed `train.min_accuracy`. Exit code 3; metrics written, no export."""
