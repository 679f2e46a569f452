"""Preemption: SIGTERM mid-training leaves a backup and exit code 143; the retry resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import tensorflow as tf

from tests.conftest import SMALL, run_trainer, trainer_env


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
    with open(tmp_path / "stderr.txt", "w") as stderr:
        first = subprocess.Popen(
            [sys.executable, "-m", "trainer", *args],
            cwd=tmp_path,
            env=trainer_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        seen, deadline = [], time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until two epochs are done, then preempt
            line = first.stdout.readline()
            seen.append(line)
            if "epoch 2/6" in line or not line:
                break
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=120)
    log = "".join(seen) + rest
    assert first.returncode == 143, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert "run again with the same output.dir to resume" in (tmp_path / "stderr.txt").read_text()
    metadata = json.loads((out / "backup" / "head" / "training_metadata.json").read_text())
    assert metadata["epoch"] >= 2
    assert not (out / "_SUCCESS").exists() and "epoch 6/6" not in log

    second = run_trainer(*args, cwd=tmp_path)

    assert second.returncode == 0, second.stderr[-2000:]
    resumed_at = metadata["epoch"] + 1
    assert f"at epoch {resumed_at}" in second.stdout
    assert "epoch 1/6" not in second.stdout and "epoch 6/6" in second.stdout
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 6
    assert (out / "_SUCCESS").exists() and not (out / "backup").exists()
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    dog = sorted(trained_run.test_dir.glob("dog/*.jpg"))[0]
    assert serve(image_bytes=tf.constant([dog.read_bytes()]))["probabilities"].shape == (1, 2)


def test_sigterm_before_training_exits_143_at_once(tmp_path):
    """Outside the training loop nothing needs saving: the job stops straight away."""
    from trainer.train import SIGTERM, Preempted

    SIGTERM.install()
    try:
        signal.raise_signal(signal.SIGTERM)
    except Preempted:
        pass
    else:
        raise AssertionError("SIGTERM outside fit did not stop the job")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        SIGTERM.requested = False
