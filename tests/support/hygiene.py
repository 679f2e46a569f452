"""Session hygiene: every test writes under pytest's temporary paths and ends every process it
starts; a run that leaves something behind fails at the end of the session.

What is checked is this session's own: the temp dir it points TMPDIR at (inside pytest's
basetemp, unique to the session) and its own descendant processes. Nothing is judged by a name
in a shared folder such as the system /tmp, where other programs on the machine (another
clone's tests among them) write whatever they like.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from pathlib import Path

import pytest

# TensorFlow's autograph writes generated modules to the temp dir and removes them at exit
# (atexit), so the ones of this very process are still there at the end of the session.
AUTOGRAPH_TEMP_FILES = "__autograph_generated_file"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory):
    """For the session, TMPDIR (and `tempfile`'s default) is a folder inside pytest's basetemp
    and TRAINER_CACHE_DIR another, so trainers, workers and emulators started by tests write
    there, never to the system temp dir or the default `/tmp/trainer-cache`. At the end the run
    fails if the session temp folder is not empty again (a test or a trainer left something in
    the temp dir) or if a child process is still running."""
    _adopt_orphans()
    base = tmp_path_factory.getbasetemp()
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
    problems = leftovers(session_tmp)
    if problems:
        pytest.fail("the test session left things behind: " + "; ".join(problems))


def leftovers(session_tmp: Path, grace_seconds: float = 5) -> list[str]:
    """What the session left: its descendant processes still running, and what is in its temp
    dir (except this process' own autograph files)."""
    problems = []
    running = _running_children(grace_seconds)
    if running:
        problems.append(f"processes still running: {running}")
    left = sorted(
        p.name for p in session_tmp.iterdir() if not p.name.startswith(AUTOGRAPH_TEMP_FILES)
    )
    if left:
        problems.append(f"left in the temp dir ({session_tmp}): {left}")
    return problems


def _adopt_orphans() -> None:
    """Make this process the Linux 'child subreaper' of everything it starts: a grandchild whose
    parent exits (a trainer started by a script) then becomes our child, not init's, so the
    end-of-session check still sees it."""
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


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


@pytest.fixture
def in_process_run(tmp_path, monkeypatch):
    """For a test that calls `run(cfg)` (or other job code) in this process: gs:// staging
    caches under tmp_path (storage.cache_dir defaults to $TRAINER_CACHE_DIR), and afterwards the
    process as a fresh one would be: the SIGTERM and SIGINT handlers and Keras' global dtype
    policy as they were (the job installs its own of each), the process-wide caches a local
    sweep's next point would reuse (the bad-image probe's findings, the last folded backbone)
    emptied, and Keras' graph state cleared, so no test sees what an earlier one left."""
    import signal

    import keras

    from trainer.train import SIGTERM

    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    policy = keras.mixed_precision.global_policy()
    forget_process_caches()
    yield tmp_path / "cache"
    for number, handler in handlers.items():  # the job handles SIGTERM and Ctrl-C
        signal.signal(number, handler)
    keras.mixed_precision.set_dtype_policy(policy)
    SIGTERM.requested = None
    forget_process_caches()
    keras.backend.clear_session()
    gc.collect()


def forget_process_caches() -> None:
    """Empty what this process keeps for a local sweep's next point: the bad-image probe's
    findings and the last folded backbone. Between two runs of one test, as between two pods."""
    from trainer import data, model

    data._PROBED.clear()
    model._FOLDED.clear()
