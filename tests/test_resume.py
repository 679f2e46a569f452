"""Preemption: SIGTERM mid-training leaves a backup and exit code 143; the retry resumes."""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

import pytest
import tensorflow as tf

from tests.conftest import SMALL, Lines, run_trainer, start_trainer, stopped_on_exit


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


def _resume_command(stderr: str, **changed: str) -> list[str]:
    """The overrides of the command the stop line says to run (`changed` keys replaced: a
    user's larger train.max_hours), checked to be `python -m trainer ... output.dir=...`."""
    line = [line for line in stderr.splitlines() if line.strip()][-1]
    assert "; to resume, run: python -m trainer " in line, line
    words = shlex.split(line.split("; to resume, run: ", 1)[1])
    assert words[:3] == ["python", "-m", "trainer"] and words[-1].startswith("output.dir=/")
    kept = [w for w in words[3:] if w.split("=")[0] not in changed]
    return kept + [f"{key}={value}" for key, value in changed.items()]


def _output_dir(command: list[str]) -> Path:
    return Path(next(w for w in command if w.startswith("output.dir=")).split("=", 1)[1])


def _assert_resumed_and_exported(out, second, epochs: int, metadata: dict) -> None:
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"at epoch {metadata['epoch'] + 1}" in second.stdout
    assert "epoch 1/" not in second.stdout and f"epoch {epochs}/{epochs}" in second.stdout
    assert json.loads((out / "metrics.json").read_text())["epochs"] == epochs
    assert (out / "_SUCCESS").exists() and not (out / "backup").exists()


@pytest.mark.slow  # an augmented run twice; the default run has the fast path's resume
def test_sigterm_mid_training_then_a_rerun_resumes_and_exports(trained_run, tmp_path):
    out = tmp_path / "out"
    args = [
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"output.dir={out}",
        "data.augment=true",
        "train.epochs=6",
        "train.backup_every_steps=2",
        *SMALL,
    ]
    code, log, stderr = _preempt(args, tmp_path, when="epoch 2/6")
    assert code == 143, stderr[-2000:]
    assert "to resume, run: python -m trainer " in stderr and f"output.dir={out}" in stderr
    metadata = json.loads((out / "backup" / "head" / "training_metadata.json").read_text())
    assert metadata["epoch"] >= 2
    assert not (out / "_SUCCESS").exists() and "epoch 6/6" not in log

    second = run_trainer(*args, cwd=tmp_path)

    _assert_resumed_and_exported(out, second, 6, metadata)
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    dog = sorted(trained_run.test_dir.glob("dog/*.jpg"))[0]
    assert serve(image_bytes=tf.constant([dog.read_bytes()]))["probabilities"].shape == (1, 2)


def test_sigterm_during_the_default_fast_path_then_a_rerun_resumes(trained_run, tmp_path):
    """The default run (head on cached features) is preempted too: the command its stop line
    names (the same overrides with output.dir=the folder it wrote) takes the features from the
    feature cache the first attempt filled (no second backbone pass) and goes on from the
    backup's epoch, not from epoch 1."""
    epochs = 150  # the head's epochs take milliseconds: enough of them to be stopped mid-way
    args = [
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"train.epochs={epochs}",
        *SMALL,
    ]  # no output.dir: Hydra's outputs/DATE/TIME, a new one at each start
    code, log, stderr = _preempt(args, tmp_path, when=f"epoch 2/{epochs}")
    assert code == 143, stderr[-2000:]
    assert "head on cached features" in log and f"epoch {epochs}/{epochs}" not in log
    resume = _resume_command(stderr)  # the stop line names the folder to resume from
    out = _output_dir(resume)
    assert out.parent.parent == tmp_path / "outputs"
    metadata = json.loads((out / "backup" / "head" / "training_metadata.json").read_text())

    second = run_trainer(*resume, cwd=tmp_path)

    _assert_resumed_and_exported(out, second, epochs, metadata)
    assert "features of the train set from the feature cache" in second.stdout
    assert "features cached: train set" not in second.stdout  # no second backbone pass


@pytest.mark.slow  # fine-tuning twice
def test_sigterm_while_fine_tuning_keeps_phase_1_and_the_rerun_skips_it(trained_run, tmp_path):
    out = tmp_path / "out"
    args = [
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"output.dir={out}",
        "train.epochs=2",
        "train.finetune_epochs=3",
        "train.backup_every_steps=2",
        *SMALL,
    ]
    code, log, stderr = _preempt(args, tmp_path, when="fine-tuning:")
    assert code == 143, stderr[-2000:]
    assert (out / "backup" / "phase1_done.weights.h5").exists()

    second = run_trainer(*args, cwd=tmp_path)

    assert second.returncode == 0, second.stderr[-2000:]
    assert "phase 1 finished before a restart: resuming from" in second.stdout
    assert "features cached" not in second.stdout  # phase 1 (the fast path) is not run again
    assert "epoch 1/5" not in second.stdout and "epoch 5/5 (fine-tune)" in second.stdout
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


def test_time_limit_keeps_the_backup_and_the_printed_command_resumes_at_the_next_epoch(
    trained_run, tmp_path
):
    """Exit 5 (train.max_hours) is a stop like SIGTERM's: the backup stays, and the command the
    stop line names, with a larger limit, resumes at the next epoch, finishes and exports, in
    the same folder (the default outputs/DATE/TIME here), saying it replaces the stopped
    attempt's metrics.json."""
    epochs = 20
    args = [
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"train.epochs={epochs}",
        "train.max_hours=1e-9",  # reached at the first step
        *SMALL,
    ]
    first = run_trainer(*args, cwd=tmp_path)

    assert first.returncode == 5, first.stderr[-2000:]
    resume = _resume_command(first.stderr, **{"train.max_hours": "null"})
    out = _output_dir(resume)
    metadata = json.loads((out / "backup" / "head" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1
    assert json.loads((out / "metrics.json").read_text())["stopped_at_time_limit"] is True

    second = run_trainer(*resume, cwd=tmp_path)

    _assert_resumed_and_exported(out, second, epochs, metadata)
    assert "this run replaces its metrics.json" in second.stdout
    assert json.loads((out / "metrics.json").read_text())["stopped_at_time_limit"] is False
    assert [p.name for p in (tmp_path / "outputs").glob("*/*")] == [out.name]  # no new folder


def test_ctrl_c_mid_training_is_one_line_exit_130_and_keeps_the_backup(trained_run, tmp_path):
    """Ctrl-C (SIGINT) stops like SIGTERM, at a step's end with a backup written: one line on
    stderr, no KeyboardInterrupt traceback, exit 130, and the line names how to resume."""
    out = tmp_path / "out"
    args = [
        f"data.train_dir={trained_run.train_dir}",
        f"data.test_dir={trained_run.test_dir}",
        f"output.dir={out}",
        "train.epochs=150",
        *SMALL,
    ]
    process = start_trainer(*args, cwd=tmp_path)
    with stopped_on_exit(process):
        Lines(process).wait_for("epoch 2/150", timeout=300)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()

    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("trainer: interrupted (Ctrl-C): SIGINT received; backup written")
    assert _output_dir(_resume_command(stderr)) == out
    assert json.loads((out / "backup" / "head" / "training_metadata.json").read_text())["epoch"]
    assert not (out / "_SUCCESS").exists()
