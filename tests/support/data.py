"""Generated image folders, and the one trained run (a real `python -m trainer`) that many tests
inspect: its outputs, its log, its SavedModel, its TensorBoard events."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import run_trainer
from trainer.synthetic import make_dataset

CLASSES = ["cat", "dog"]
# A run in seconds: tiny images, a random-init backbone (nothing downloaded).
SMALL = ["data.image_size=32", "data.batch_size=16", "model.weights=null"]


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
    """One `python -m trainer` run on separable data with three undecodable files in the training
    set, shared by the tests that only read what a finished run left."""
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
