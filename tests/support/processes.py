"""Starting, watching and stopping processes: the trainer's commands as a user types them, and
the helpers that give every wait a deadline and every started process an end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def trainer_env(**extra: str) -> dict:
    """The environment for a trainer subprocess: this checkout's code first, quiet TensorFlow."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


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
        time.sleep(0.2)
    pytest.fail(f"no '{text}' in {path} after {timeout} s")


def seconds_to_exit_after_kill(
    survivor: subprocess.Popen, victim: subprocess.Popen, timeout: float
) -> float:
    """SIGKILL `victim` (a lost worker), then wait for `survivor` to end; the seconds it took."""
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor.wait(timeout=timeout)
    return time.monotonic() - killed
