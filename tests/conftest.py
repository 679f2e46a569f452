"""Shared fixtures: generated image folders and one trained run that many tests inspect.

Tests run the trainer the way users do (`python -m trainer ...` in a subprocess) wherever the
behaviour is user-visible; the tiny images (32 px) and random-init backbone keep a run ~15 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]
AUTOGRAPH_TEMP_FILES = "__autograph_generated_file"
# What the trainer, its tests and the emulator name their temporary files: one of these in the
# real system temp dir is a leak of ours; anything else there may be another program's.
OWN_TEMP_PREFIXES = ("trainer-", "gcs-emulator-")
SMALL = ["data.image_size=32", "data.batch_size=16", "model.weights=null"]


def trainer_env(**extra: str) -> dict:
    """The environment for a trainer subprocess: this checkout's code first, quiet TensorFlow."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory):
    """Every test writes under pytest's temporary paths and ends every process it starts.

    For the session, TMPDIR (and `tempfile`'s default) is a folder inside pytest's basetemp and
    TRAINER_CACHE_DIR another, so trainers, workers and emulators started by tests write there,
    never to the system temp dir or the default `/tmp/trainer-cache`. At the end the run fails if
    the session temp folder is not empty again (a test or a trainer left something in the temp
    dir) or if a child process is still running. In the real system temp dir, an entry named as
    ours (OWN_TEMP_PREFIXES: a hard-coded /tmp path, such as the default cache) fails the run;
    any other new entry is a warning, as other programs on the machine write there too.
    """
    _adopt_orphans()
    base = tmp_path_factory.getbasetemp()
    system_tmp = tempfile.gettempdir()
    before = _entries(system_tmp)
    session_tmp, cache = base / "session-tmp", base / "trainer-cache"
    session_tmp.mkdir()
    saved_env = {key: os.environ.get(key) for key in ("TMPDIR", "TRAINER_CACHE_DIR")}
    os.environ.update(TMPDIR=str(session_tmp), TRAINER_CACHE_DIR=str(cache))
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None
    problems = []
    running = _running_children(grace_seconds=5)
    if running:
        problems.append(f"processes still running: {running}")
    # TensorFlow's autograph writes generated modules to the temp dir and removes them at exit
    # (atexit), so the ones of this very process are still there now.
    left = sorted(
        p.name for p in session_tmp.iterdir() if not p.name.startswith(AUTOGRAPH_TEMP_FILES)
    )
    if left:
        problems.append(f"left in the temp dir ({session_tmp}): {left}")
    appeared = sorted(
        name for name in _entries(system_tmp) - before if not name.startswith("pytest-of-")
    )
    ours = [name for name in appeared if name.startswith(OWN_TEMP_PREFIXES)]
    if ours:
        problems.append(f"left in the system temp dir {system_tmp} (a hard-coded path?): {ours}")
    if appeared:
        warnings.warn(
            f"appeared in the system temp dir {system_tmp} during the tests: {appeared}",
            stacklevel=1,
        )
    if problems:
        pytest.fail("the test session left things behind: " + "; ".join(problems))


def _adopt_orphans() -> None:
    """Make this process the Linux 'child subreaper' of everything it starts: a grandchild whose
    parent exits (a trainer started by a script) then becomes our child, not init's, so the
    end-of-session check still sees it."""
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _entries(folder: str) -> set[str]:
    return set(os.listdir(folder))


def _running_children(grace_seconds: float) -> list[str]:
    """This process's descendants that are still alive (not zombies), as 'pid command'."""
    deadline = time.monotonic() + grace_seconds
    while True:
        children = _descendants(os.getpid())
        if not children or time.monotonic() > deadline:
            return children
        time.sleep(0.2)


def _descendants(root: int) -> list[str]:
    parents, commands = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # ended while we looked
            continue
        # The command name in stat is in parentheses and may contain spaces: split after it.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            parents[int(entry)] = int(ppid)
            commands[int(entry)] = command.decode(errors="replace").strip()[:200]
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += [f"{pid} {commands[pid]}" for pid in sorted(frontier)]
    return found


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """End `process` if it still runs: SIGTERM, then SIGKILL after `timeout` s; reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def stopped_on_exit(*processes: subprocess.Popen):
    """`with stopped_on_exit(p, q):` every process is ended on every path out of the block."""
    try:
        yield processes
    finally:
        for process in processes:
            stop(process)


class Lines:
    """A process's stdout read line by line in a thread, so waiting for a line has a deadline
    (a bare readline() blocks forever on a trainer that hangs)."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines = process, []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append(None)  # end of output
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        """Return once a line contains `text`; fail the test if output ends or time runs out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(line and text in line for line in self.lines):
                if self.lines and self.lines[-1] is None:
                    pytest.fail(f"output ended without {text!r}:\n{self.text()[-3000:]}")
                if not self._changed.wait(timeout=max(0.0, deadline - time.monotonic())):
                    pytest.fail(f"no {text!r} after {timeout} s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return "".join(line for line in list(self.lines) if line)


def start_trainer(*overrides: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m trainer overrides...` started in the background, stdout piped as text, stderr
    to `cwd`/stderr.txt; end it with `stop()` (or `stopped_on_exit`)."""
    with open(cwd / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer", *overrides],
            cwd=cwd,
            env=env or trainer_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run `python -m module args...`; return the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env or trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_trainer(*overrides: str, cwd: Path, env: dict | None = None):
    """Run `python -m trainer overrides...` with Hydra's run directory inside `cwd`."""
    return run_module("trainer", *overrides, cwd=cwd, env=env)


def last_error_line(result) -> str:
    """The line a user reads: the last line on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def make_folders(root: Path, train: int = 24, test: int = 10, classes=CLASSES) -> tuple[Path, Path]:
    """root/train/<class>/ and root/test/<class>/ with separable JPEGs of 40-56 px."""
    make_dataset(str(root / "train"), classes, train, min_size=40, max_size=56, seed=1)
    make_dataset(str(root / "test"), classes, test, min_size=40, max_size=56, seed=2)
    return root / "train", root / "test"


def corrupt_files(folder: Path) -> list[Path]:
    """Add a zero-byte, a truncated and a garbage image to `folder`; return their paths."""
    good = next(folder.glob("*.jpg")).read_bytes()
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "garbage.png": b"this is not a png",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in bad]


@dataclass
class Run:
    """A finished trainer run: its output.dir, the process result and the data it used."""

    out: Path
    result: subprocess.CompletedProcess
    train_dir: Path
    test_dir: Path
    bad_files: list[Path]

    @property
    def metrics(self) -> dict:
        return json.loads((self.out / "metrics.json").read_text())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Run:
    """One run on separable data with three undecodable files in the training set."""
    root = tmp_path_factory.mktemp("trained")
    train_dir, test_dir = make_folders(root / "data", train=40, test=16)
    bad = corrupt_files(train_dir / "dog")
    out = root / "out"
    out.mkdir()  # a folder made for the run beforehand: it must keep the run's train.log, .hydra/
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        f"output.dir={out}",
        "train.epochs=8",
        "data.batch_size=16",
        "model.weights=null",
        "data.image_size=48",  # at 32 px a random float32 backbone separates the test set to 0.94
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(out, result, train_dir, test_dir, bad)


@pytest.fixture
def in_process_run(tmp_path, monkeypatch):
    """For a test that calls `run(cfg)` in this process: gs:// staging caches under tmp_path
    (storage.cache_dir defaults to $TRAINER_CACHE_DIR), and afterwards the SIGTERM and SIGINT
    handlers and Keras' global dtype policy as they were (the job installs its own of both)."""
    import signal

    import keras

    from trainer.train import SIGTERM

    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    policy = keras.mixed_precision.global_policy()
    yield tmp_path / "cache"
    for number, handler in handlers.items():  # the job handles SIGTERM and Ctrl-C
        signal.signal(number, handler)
    keras.mixed_precision.set_dtype_policy(policy)
    SIGTERM.requested = None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    """Wait until `text` appears in the log file `path` of `process`; fail the test if the
    process ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert process.poll() is None, path.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    pytest.fail(f"no '{text}' in {path} after {timeout} s")


def seconds_to_exit_after_kill(
    survivor: subprocess.Popen, victim: subprocess.Popen, timeout: float
) -> float:
    """SIGKILL `victim` (a lost worker), then wait for `survivor` to end; the seconds it took."""
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor.wait(timeout=timeout)
    return time.monotonic() - killed
