"""Preemption: SIGTERM mid-training leaves a backup and exit code 143; the retry resumes.

The preempted run is a real `python -m trainer` (the signal and the exit code are the
behaviour); the retry, whose behaviour is the job's, runs in this process through `run(cfg)`.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import SMALL, Lines, configure, make_folders, start_trainer, stopped_on_exit
from trainer.job import run


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """12 training and 4 test images a class: enough steps an epoch to be stopped in."""
    return make_folders(tmp_path_factory.mktemp("resume-data"), train=12, test=4)


def _rerun(cfg, args: list[str], caplog) -> tuple[dict, str]:
    """The retry, with the same overrides, in this process: (its metrics, its log)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        metrics = run(configure(cfg, *args))
    return metrics, caplog.text


def _preempt(args: list[str], cwd, when: str, timeout: float = 300) -> tuple[int, str, str]:
    """Start the trainer, SIGTERM it once a line contains `when`; (exit code, stdout, stderr)."""
    process = start_trainer(*args, cwd=cwd)
    with stopped_on_exit(process):
        lines = Lines(process)
        lines.wait_for(when, timeout)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        time.sleep(0.2)  # the reader thread takes the last lines
    return process.returncode, lines.text(), (cwd / "stderr.txt").read_text()


def _assert_resumed_and_exported(out, log: str, epochs: int, metadata: dict) -> None:
    assert f"at epoch {metadata['epoch'] + 1}" in log
    assert "epoch 1/" not in log and f"epoch {epochs}/{epochs}" in log
    assert json.loads((out / "metrics.json").read_text())["epochs"] == epochs
    assert (out / "_SUCCESS").exists() and not (out / "backup").exists()


@pytest.mark.slow  # an augmented run twice; the default run has the fast path's resume
def test_sigterm_mid_training_then_a_rerun_resumes_and_exports(folders, tmp_path, cfg, caplog):
    out = tmp_path / "out"
    args = [
        f"data.train_dir={folders[0]}",
        f"data.test_dir={folders[1]}",
        f"output.dir={out}",
        "data.augment=true",
        "train.epochs=6",
        "train.backup_every_steps=2",
        *SMALL,
    ]
    code, log, stderr = _preempt(args, tmp_path, when="epoch 2/6")
    assert code == 143, stderr[-2000:]
    assert "run again with the same output.dir to resume" in stderr
    metadata = json.loads((out / "backup" / "head" / "training_metadata.json").read_text())
    assert metadata["epoch"] >= 2
    assert not (out / "_SUCCESS").exists() and "epoch 6/6" not in log

    _, second = _rerun(cfg, args, caplog)

    _assert_resumed_and_exported(out, second, 6, metadata)
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    dog = sorted(folders[1].glob("dog/*.jpg"))[0]
    assert serve(image_bytes=tf.constant([dog.read_bytes()]))["probabilities"].shape == (1, 2)


def test_sigterm_during_the_default_fast_path_then_a_rerun_resumes(folders, tmp_path, cfg, caplog):
    """The default run (head on cached features) is preempted too: the retry takes the
    features from the feature cache the first attempt filled (no second backbone pass) and goes
    on from the backup's epoch, not from epoch 1."""
    out = tmp_path / "out"
    epochs = 150  # the head's epochs take milliseconds: enough of them to be stopped mid-way
    args = [
        f"data.train_dir={folders[0]}",
        f"data.test_dir={folders[1]}",
        f"output.dir={out}",
        f"train.epochs={epochs}",
        *SMALL,
    ]
    code, log, stderr = _preempt(args, tmp_path, when=f"epoch 2/{epochs}")
    assert code == 143, stderr[-2000:]
    assert "head on cached features" in log and f"epoch {epochs}/{epochs}" not in log
    metadata = json.loads((out / "backup" / "head" / "training_metadata.json").read_text())

    _, second = _rerun(cfg, args, caplog)

    _assert_resumed_and_exported(out, second, epochs, metadata)
    assert "features of the train set from the feature cache" in second
    assert "features cached: train set" not in second  # no second backbone pass


@pytest.mark.slow  # fine-tuning twice
def test_sigterm_while_fine_tuning_keeps_phase_1_and_the_rerun_skips_it(
    folders, tmp_path, cfg, caplog
):
    out = tmp_path / "out"
    args = [
        f"data.train_dir={folders[0]}",
        f"data.test_dir={folders[1]}",
        f"output.dir={out}",
        "train.epochs=2",
        "train.finetune_epochs=3",
        "train.backup_every_steps=2",
        *SMALL,
    ]
    code, log, stderr = _preempt(args, tmp_path, when="fine-tuning:")
    assert code == 143, stderr[-2000:]
    assert (out / "backup" / "phase1_done.weights.h5").exists()

    _, second = _rerun(cfg, args, caplog)

    assert "phase 1 finished before a restart: resuming from" in second
    assert "features cached" not in second  # phase 1 (the fast path) is not run again
    assert "epoch 1/5" not in second and "epoch 5/5 (fine-tune)" in second
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 5
    assert (out / "_SUCCESS").exists() and not (out / "backup").exists()


def test_sigterm_before_training_exits_143_at_once(trained_run, tmp_path):
    """Outside the training loop nothing needs saving: the job stops straight away (here
    during the backbone pass, slowed by 224 px images), without a backup or an epoch."""
    out = tmp_path / "out"
    args = [
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"output.dir={out}",
        "model.weights=null",
        "data.image_size=224",
        "train.epochs=1",
    ]
    process = start_trainer(*args, cwd=tmp_path)
    with stopped_on_exit(process):
        lines = Lines(process)
        lines.wait_for("fast path: frozen backbone", timeout=300)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        process.wait(timeout=60)
        took = time.monotonic() - signalled
    assert process.returncode == 143, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert took < 10
    assert "epoch 1/1" not in lines.text() and "features cached: test set" not in lines.text()
    assert not (out / "backup").exists() and not (out / "_SUCCESS").exists()
