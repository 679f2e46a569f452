"""TensorFlow's start-up in the trainer's commands: its C++ lines kept off the terminal, the
optional packages that TensorFlow and Keras would import for nothing left out, and the garbage
collector paused while they load.

`import tensorflow` (2.21) prints absl's "All log messages before absl::InitializeLog() ..." banner
and INFO lines (oneDNN, "Could not find cuda drivers"), once per library that carries its own
absl; its first device listing then logs an error-level "failed call to cuInit" on a machine
without a GPU. The INFO lines come from C++ before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so no
setting hides them: while TensorFlow loads and lists its devices, the process's stderr (fd 2)
goes to a temporary file, and every line but those is written back afterwards.

When installed, IPython, scikit-learn and SciPy are imported along with Keras and TensorFlow (for
Keras' notebook check, Keras' scikit-learn wrappers and tf.keras v1's sparse-input check), each
inside a try/except ImportError, and none is used by the trainer. scikit-learn and SciPy come with
`pip install -e ".[dev]"`, and they slowed every start there (measured: docs/performance.md,
"TensorFlow loads without IPython, scikit-learn and SciPy"). While TensorFlow loads they are
hidden (`OPTIONAL_IMPORTS`); afterwards they import as usual.

Importing TensorFlow and Keras creates objects by the hundred thousand, all kept until the process
ends, and Python's collector walked them again and again while they were created (measured:
docs/performance.md, "No garbage collection while TensorFlow and Keras load"). The collector is
paused while they load, and what they created is then frozen out of later collections.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = re.compile(r"([IWEF])\d{4} ")  # absl's prefix: I0000 00:00:1795851835.99 ...
_LEVELS = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3
# Imported by Keras or TensorFlow only if installed, used by neither in the trainer.
OPTIONAL_IMPORTS = ("IPython", "sklearn", "scipy")
# Whichever of the two is imported first imports the other: the job imports keras first.
_FIRST = ("tensorflow", "keras")


def quiet_tensorflow_startup() -> None:
    """Call before anything imports TensorFlow or Keras: its start-up lines below
    TF_CPP_MIN_LOG_LEVEL (default 2, errors only) are dropped, and so is cuInit's error on a
    machine without GPUs; `OPTIONAL_IMPORTS` are not imported with it. On a machine with
    /dev/nvidia* every line that mentions CUDA still shows."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        min_level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        min_level = 0
    if any(name in sys.modules for name in _FIRST):
        return  # too late
    if any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        return
    gpu_machine = bool(glob.glob("/dev/nvidia*"))
    drop = None if min_level <= 0 else lambda line: _is_noise(line, min_level, gpu_machine)
    sys.meta_path.insert(0, _QuietImport(drop))  # TF_CPP_MIN_LOG_LEVEL=0: nothing dropped


def _is_noise(line: str, min_level: int, gpu_machine: bool) -> bool:
    if line.strip() == _BANNER:
        return True
    severity = _SEVERITY.match(line)
    if severity is None:
        return False  # Python's own output (warnings, tracebacks) always passes
    if gpu_machine and "cuda" in line.lower():
        return False  # a GPU that will not be used must not go unnoticed
    if _LEVELS.index(severity.group(1)) < min_level:
        return True
    return not gpu_machine and "failed call to cuInit" in line


_Drop = Callable[[str], bool] | None  # which stderr lines to drop; None: stderr untouched


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` or `keras`, whichever comes first, once, with a loader that filters
    stderr and hides `OPTIONAL_IMPORTS` while the module (and the other, which it imports) runs."""

    def __init__(self, drop: _Drop):
        self.drop = drop

    def find_spec(self, name, path=None, target=None):
        if name not in _FIRST:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self.drop)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader, drop: _Drop):
        self.loader = loader
        self.drop = drop

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        filtered = contextlib.nullcontext() if self.drop is None else _stderr_filtered(self.drop)
        with filtered, _hidden(OPTIONAL_IMPORTS), _collector_paused():
            self.loader.exec_module(module)
            import tensorflow as tf

            # The first device listing is where CUDA is initialized (and cuInit fails without
            # a GPU); doing it now changes nothing else: devices are listed once per process.
            tf.config.list_physical_devices()

    def __getattr__(self, name):
        return getattr(self.loader, name)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection inside the block; on the way out, the objects that exist then
    (modules, classes, functions: kept for the process' life) are left out of every later
    collection (gc.freeze)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


@contextlib.contextmanager
def _hidden(names: tuple[str, ...]) -> Iterator[None]:
    """`import name` raises ImportError inside the block for each of `names` not yet imported
    (a None entry in sys.modules), and works again after it."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


@contextlib.contextmanager
def _stderr_filtered(drop: Callable[[str], bool]) -> Iterator[None]:
    """fd 2 (C++ and Python alike) goes to a file, unlinked from the start; lines that `drop`
    rejects are written back to stderr on the way out, in order, exceptions included."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not drop(line)))
            sys.stderr.flush()
