"""scripts/benchmark.py end to end at a tiny size: every figure written, and the chart drawn;
with --data/--weights, every row on the folders' classes with the weights file's kernels.

No timing is asserted (the machine is shared and noisy); the default-size figures are read from
the benchmark's own output, never checked by tests. About 45 s on 2 cores (four TensorFlow
processes start) for each end-to-end run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from scripts.bench import CONTEXT_KEYS, FIGURE_KEYS, REAL_KEYS, kernel_digest
from scripts.bench.harness import PHASES, REST, trainer_result
from trainer.timings import STEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(tmp_path, *flags: str) -> tuple[dict, str]:
    """scripts/benchmark.py at a tiny size with `flags`: (its figures, its stdout)."""
    figures_path, chart_path = tmp_path / "bench.json", tmp_path / "bench.png"
    # Its own session: on a timeout the benchmark and the trainers it started are killed as one
    # process group (killing only the script would leave its children running).
    bench = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "benchmark.py"),
            "--train-images=8",
            "--test-images=4",
            "--image-size=32",
            "--epochs=1",
            f"--json={figures_path}",
            f"--png={chart_path}",
            f"--work-dir={tmp_path / 'work'}",
            *flags,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=900)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate()
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(figures_path.read_text()), stdout


@pytest.mark.slow  # every row of the benchmark, each a trainer process: about a minute
def test_benchmark_writes_every_figure_as_json_and_draws_the_chart(tmp_path):
    figures, stdout = _benchmark(tmp_path)
    assert set(figures) == set(FIGURE_KEYS) | set(CONTEXT_KEYS)
    for key in FIGURE_KEYS:
        value = figures[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        if key.endswith("_accuracy"):
            assert 0.0 <= value <= 1.0, (key, value)
        else:
            assert value > 0, (key, value)
    assert all(figures[f"{run}_cpu_s"] > 0 for run in ("floor", "trainer", "keras_guide"))
    assert (figures["train_images"], figures["test_images"]) == (8, 4)
    # Every step the run took (no fine-tuning), from metrics.json's timings, and the rest of the
    # trainer's process time: together, all of it.
    phases = figures["trainer_phases_s"]
    assert [key for key, _ in PHASES] == list(STEPS)  # no step of the trainer's left out
    assert list(phases) == [label for key, label in PHASES if key != "finetune_s"] + [REST]
    assert all(seconds >= 0 for seconds in phases.values())
    assert abs(sum(phases.values()) - figures["trainer_s"]) < 0.1
    assert figures["trainer_feature_cache"] == "miss"  # a first run: the backbone pass ran
    assert figures["trainer_startup_s"] < figures["trainer_s"]
    assert "| trainer (`python -m trainer`) |" in stdout  # the markdown table
    # The trainer's own backbone (BatchNorm folded), timed beside Keras' on the same pixels
    assert figures["floor_folded_s"] > 0 and figures["floor_folded_cpu_s"] > 0
    assert "| the same, BatchNorm folded (the trainer's backbone) (batch" in stdout
    assert "Not a target: trainer_s / floor_folded_s = " in stdout


@pytest.mark.slow  # a three-point sweep in a process
def test_benchmark_sweep_row_runs_the_backbone_once_and_skipped_rows_are_left_out(tmp_path):
    figures, stdout = _benchmark(tmp_path, "--skip=keras_guide,seed_recipe", "--sweep=2")

    assert figures["sweep_points"] == 2
    assert figures["sweep_backbone_passes"] == 1  # the points shared the features
    assert figures["sweep_s"] > 0 and figures["sweep_cpu_s"] > 0
    assert figures["skipped"] == ["keras_guide", "seed_recipe"]
    assert not [key for key in figures if key.startswith(("keras_guide", "seed_recipe"))]
    assert {"floor_s", "trainer_s", "trainer_export_s"} <= set(figures)
    assert "| sweep: 2-point grid" in stdout and "Keras transfer-learning guide" not in stdout


def _real_data(tmp_path, classes: list[str]) -> tuple[str, str]:
    """Image folders of `classes` (4 train, 2 test images each) and a notop .h5 written as
    scripts/dev/fetch_imagenet_weights.py writes ImageNet's, from a seeded random ResNet50, with
    a resnet50_fc1000.npz beside it: (the data folder, the weights file)."""
    import keras
    import numpy as np

    from scripts.bench.recipes import TOP_FILE
    from scripts.dev.fetch_imagenet_weights import write_notop_h5
    from trainer.model import NOTOP_FILE
    from trainer.synthetic import make_dataset

    data = tmp_path / "data"
    make_dataset(str(data / "train"), classes, 4, seed=0)
    make_dataset(str(data / "test"), classes, 2, seed=1)
    keras.utils.set_random_seed(11)  # the file's kernels: a row that ignored it would differ
    weights = tmp_path / "weights" / NOTOP_FILE
    weights.parent.mkdir()
    write_notop_h5(model=keras.applications.ResNet50(weights=None, include_top=False), path=weights)
    rng = np.random.default_rng(0)
    top = {"kernel": rng.normal(size=(2048, 1000)), "bias": np.zeros(1000)}
    np.savez(weights.parent / TOP_FILE, **{k: v.astype(np.float32) for k, v in top.items()})
    return str(data), str(weights)


def _file_conv1_digest(weights: str) -> str:
    """kernel_digest of the conv1 kernel as the .h5 file holds it, read with h5py alone."""
    import h5py

    with h5py.File(weights, "r") as f:
        return kernel_digest(f["conv1_conv"]["conv1_conv/kernel"][()])


@pytest.mark.slow  # three TensorFlow processes and a ResNet50 built here: about a minute
def test_benchmark_on_folders_runs_every_row_on_their_classes_with_the_weights_file(tmp_path):
    data, weights = _real_data(tmp_path, ["boot", "coat", "sandal"])

    figures, stdout = _benchmark(tmp_path, f"--data={data}", f"--weights={weights}")

    assert set(REAL_KEYS) <= set(figures) <= set(FIGURE_KEYS) | set(CONTEXT_KEYS) | set(REAL_KEYS)
    assert (figures["train_images"], figures["test_images"], figures["classes"]) == (12, 6, 3)
    rows = ("trainer", "keras_guide", "seed_recipe")
    assert {row: figures[f"{row}_classes"] for row in rows} == dict.fromkeys(rows, 3)
    expected = _file_conv1_digest(weights)
    digests = {row: figures[f"{row}_conv1_digest"] for row in rows}
    assert digests == dict.fromkeys(rows, expected)  # each row loaded the file's kernels
    assert figures["seed_recipe_top"] == "resnet50_fc1000.npz"
    assert figures["weights"] == weights
    assert "floor" in figures["skipped"] and "floor_s" not in figures  # skipped with --data
    assert "Weights: conv1 kernel digest after loading, the same weights: trainer " in stdout
    assert "12 train + 6 test images in 3 classes from " in stdout


def test_benchmark_refuses_an_unknown_row_and_a_one_point_sweep(tmp_path):
    script = os.path.join(REPO, "scripts", "benchmark.py")
    mismatched = tmp_path / "mismatched"  # test/ lacks train/'s "dog"
    for folder in ("train/cat", "train/dog", "test/cat"):
        (mismatched / folder).mkdir(parents=True)
    (tmp_path / "w.h5").write_bytes(b"")
    for flags, message in (
        (["--skip=trainer"], "--skip trainer: no such row"),
        (["--sweep=1"], "--sweep (1)"),
        ([f"--data={tmp_path}"], "--data and --weights go together"),
        ([f"--weights={tmp_path / 'w.h5'}"], "--data and --weights go together"),
        (
            [f"--data={mismatched}", f"--weights={tmp_path / 'w.h5'}"],
            "train/ has classes ['cat', 'dog'], test/ ['cat']",
        ),
    ):
        done = subprocess.run(
            [sys.executable, script, *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_trainer_row_reads_its_phases_from_metrics_json_not_its_log(tmp_path):
    timings = {"startup_s": 1.0, "inputs_s": 0.25, "runtime_s": 1.5, "backbone_pass_s": 3.0}
    timings_json = {**timings, "feature_cache": "miss"}
    metrics = {"test_accuracy": 0.75, "classes": ["a", "b"], "timings": timings_json}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "_SUCCESS").write_text("")

    result = trainer_result(out=str(tmp_path), seconds=7.0, log_path="no such log")

    assert result["accuracy"] == 0.75 and result["startup_s"] == 2.75  # to the scan's start
    assert result["classes"] == 2
    assert list(result["phases"].values()) == [1.0, 0.25, 1.5, 3.0, 1.25]  # the rest: 1.25
