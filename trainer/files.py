"""A local file as it is now, for the process' own caches (the bad-image probe's findings, the
last folded backbone): a file rewritten in place is another file. No trainer imports, so every
module may use it."""

from __future__ import annotations

import os
from stat import S_ISREG


def file_identity(path: str) -> tuple:
    """(path, size, modification time) of the file at `path` (a stat, no more: thousands of
    images are asked about at every run); `(path,)` when there is none (a missing file, or a
    name like model.weights=imagenet, which is Keras' fixed file)."""
    try:
        stat = os.stat(path)
    except OSError:
        return (path,)
    if not S_ISREG(stat.st_mode):
        return (path,)
    return (path, stat.st_size, stat.st_mtime_ns)
