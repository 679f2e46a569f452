"""Shared fixtures: generated image folders and one trained run that many tests inspect.

Tests run the trainer the way users do (`python -m trainer ...` in a subprocess) wherever the
behaviour is user-visible; the tiny images (32 px) and random-init backbone keep a run ~15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]
SMALL = ["data.image_size=32", "data.batch_size=16", "model.weights=null"]


def trainer_env(**extra: str) -> dict:
    """The environment for a trainer subprocess: this checkout's code first, quiet TensorFlow."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


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


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """storage.cache_dir (and so the feature cache under it) in this session's tmp folder, for
    trainer subprocesses too: a run must not reuse the features an earlier session cached."""
    before = os.environ.get("TRAINER_CACHE_DIR")
    os.environ["TRAINER_CACHE_DIR"] = str(tmp_path_factory.mktemp("trainer-cache"))
    yield
    if before is None:
        os.environ.pop("TRAINER_CACHE_DIR", None)
    else:
        os.environ["TRAINER_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Run:
    """One run on separable data with three undecodable files in the training set."""
    root = tmp_path_factory.mktemp("trained")
    train_dir, test_dir = make_folders(root / "data", train=40, test=16)
    bad = corrupt_files(train_dir / "dog")
    out = root / "out"
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        f"output.dir={out}",
        "train.epochs=8",
        *SMALL,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(out, result, train_dir, test_dir, bad)


@pytest.fixture
def in_process_run(tmp_path, monkeypatch):
    """For a test that calls `run(cfg)` in this process: gs:// staging caches under tmp_path
    (storage.cache_dir defaults to $TRAINER_CACHE_DIR), and afterwards the SIGTERM handler and
    Keras' global dtype policy as they were (the job installs its own of both)."""
    import signal

    import keras

    from trainer.train import SIGTERM

    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    handler = signal.getsignal(signal.SIGTERM)
    policy = keras.mixed_precision.global_policy()
    yield tmp_path / "cache"
    signal.signal(signal.SIGTERM, handler)
    keras.mixed_precision.set_dtype_policy(policy)
    SIGTERM.requested = False
