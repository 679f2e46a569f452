"""Fine-tune a frozen ImageNet ResNet50 on image folders; see README.md and docs/architecture.md."""


class TrainerError(Exception):
    """A problem the user can fix (config, data, paths, weights). Exit code 2, one line."""


class BelowMinAccuracy(Exception):
    """The run trained but missed `train.min_accuracy`. Exit code 3; metrics written, no export."""
