"""Local sweeps (`python -m trainer -m ...`): every point runs, a failing point is reported in one
line, the process exits with the first failing point's code, and sweep.csv sums the sweep up.
Real Hydra multiruns in a subprocess: the BasicSweeper, and Optuna's sweeper."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    SMALL,
    Lines,
    make_folders,
    run_trainer,
    start_trainer,
    stopped_on_exit,
    trainer_env,
)

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return make_folders(tmp_path_factory.mktemp("sweep-data"), train=6, test=3)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _experiment(root: Path):
    """The experiment-level HParams config written in `root` itself (TensorBoard's run '.')."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    mux = EventMultiplexer(size_guidance={"tensors": 0})
    mux.AddRun(str(root), name=".")
    mux.Reload()
    content = mux.PluginRunToTagToContent("hparams").get(".", {})
    assert metadata.EXPERIMENT_TAG in content, "no HParams experiment at the sweep root"
    return metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])


def _record(point, accuracy, loss, code=0) -> dict:
    """A sweep point as sweep.csv records it."""
    return {
        "point": point,
        "overrides": f"model.dropout=0.{point}",
        "status": "ok" if code == 0 else "failed",
        "exit_code": code,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "wall_seconds": 1.0,
        "output_dir": f"out/{point}",
    }


def test_sweep_csv_and_its_table_list_the_best_point_first():
    """README: best first (highest test accuracy, then lowest loss), failed points last."""
    from trainer.sweep import format_table, summary_csv

    records = [
        _record(0, 0.5, 0.9),
        _record(1, None, None, code=2),
        _record(2, 0.9, 0.4),
        _record(3, 0.9, 0.3),
        _record(4, 0.7, 0.6),
    ]
    rows = list(csv.DictReader(summary_csv(records).splitlines()))
    assert [r["point"] for r in rows] == ["3", "2", "4", "0", "1"]
    table = format_table(records).splitlines()
    assert [line.split()[0] for line in table[1:]] == ["3", "2", "4", "0", "1"]


def test_the_sweep_table_never_prints_a_negative_zero():
    """A perfect point's loss (-0.0 from metrics written before the fix, or a rounding) reads 0."""
    from trainer.sweep import format_table

    table = format_table([_record(0, 1.0, -0.0), _record(1, 1.0, -0.00001)])
    assert "-0.0000" not in table
    assert [line.split()[4] for line in table.splitlines()[1:]] == ["0.0000", "0.0000"]


def test_failing_points_are_reported_the_sweep_goes_on_and_exits_with_the_first_ones_code(
    folders, tmp_path
):
    """Points 0 and 2 fail with different codes (5: train.max_hours reached; 2: a bad dropout),
    point 1 succeeds: each failure is one line, and the exit code is point 0's."""
    train_dir, test_dir = folders
    out, sweep_dir = tmp_path / "out", tmp_path / "sweep"
    result = run_trainer(
        "-m",
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "train.max_hours=1e-09,null",
        "model.dropout=0.2,1.5",
        "train.epochs=1",
        *SMALL,
        f"output.dir={out}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )

    assert result.returncode == 5, result.stderr[-3000:]
    reported = [line for line in result.stderr.splitlines() if line.startswith("sweep point")]
    assert [line.split(": ", 1)[0] for line in reported] == [
        "sweep point 0 [train.max_hours=1e-09 model.dropout=0.2] exit 5",
        "sweep point 1 [train.max_hours=1e-09 model.dropout=1.5] exit 2",
        "sweep point 3 [train.max_hours=null model.dropout=1.5] exit 2",
    ]
    assert reported[1].endswith("trainer: error: model.dropout=1.5: must be in [0, 1)")
    # The promised line only: not Hydra's own report besides it
    assert "Error executing job" not in result.stderr
    # output.dir is the sweep's root: point N writes to output.dir/N.
    assert (out / "2" / "_SUCCESS").exists() and not (out / "0" / "_SUCCESS").exists()
    metrics = json.loads((out / "2" / "metrics.json").read_text())

    rows = _rows(sweep_dir / "sweep.csv")
    assert (out / "sweep.csv").read_text() == (sweep_dir / "sweep.csv").read_text()
    assert [(r["point"], r["status"], r["exit_code"]) for r in rows] == [
        ("2", "ok", "0"),  # best first; failed points last
        ("0", "failed", "5"),
        ("1", "failed", "2"),
        ("3", "failed", "2"),
    ]
    assert rows[0]["overrides"] == "train.max_hours=null model.dropout=0.2"
    assert float(rows[0]["test_accuracy"]) == metrics["test_accuracy"]
    assert float(rows[0]["test_loss"]) == metrics["test_loss"]
    assert rows[0]["output_dir"] == str(out / "2") and float(rows[0]["wall_seconds"]) > 0
    table = result.stdout[result.stdout.index("point  status") :].splitlines()
    assert table[1].split()[:3] == ["2", "ok", "0"] and table[2].split()[:3] == ["0", "failed", "5"]

    experiment = _experiment(sweep_dir)
    dropout = {h.name: h for h in experiment.hparam_infos}["dropout"]
    assert sorted(v.number_value for v in dropout.domain_discrete.values) == [0.2, 1.5]
    assert dropout.differs
    assert {m.name.tag for m in experiment.metric_infos} == {"test_accuracy", "test_loss"}
    assert _experiment(out).hparam_infos == experiment.hparam_infos


def test_sigterm_stops_a_local_sweep_with_143_and_no_further_point_starts(folders, tmp_path):
    """The machine or pod is going away: the point being trained stops with its backup, the
    sweep starts no other point, sums up what ran and exits 143."""
    train_dir, test_dir = folders
    out, sweep_dir = tmp_path / "out", tmp_path / "sweep"
    epochs = 300  # the head's epochs take milliseconds: enough of them to be stopped mid-way
    process = start_trainer(
        "-m",
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "model.dropout=0.1,0.2,0.3",
        f"train.epochs={epochs}",
        *SMALL,
        f"output.dir={out}",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    with stopped_on_exit(process):
        lines = Lines(process)
        lines.wait_for(f"epoch 2/{epochs}", timeout=300)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()

    assert process.returncode == 143, stderr[-3000:]
    reported = [line for line in stderr.splitlines() if line.startswith("sweep point")]
    assert [line.split(": ", 1)[0] for line in reported] == [
        "sweep point 0 [model.dropout=0.1] exit 143"
    ], stderr[-3000:]
    assert (out / "0" / "backup").is_dir() and not (out / "1").exists()
    rows = _rows(sweep_dir / "sweep.csv")
    assert [(r["point"], r["status"], r["exit_code"]) for r in rows] == [("0", "failed", "143")]


def test_a_sweep_into_gcs_writes_each_point_and_the_summary_under_output_dir(
    folders, tmp_path, emulator, gcs_bucket
):
    train_dir, test_dir = folders
    root = f"gs://{gcs_bucket}/sweeps/s1"
    result = run_trainer(
        "-m",
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "model.dropout=0.1,0.2",
        "train.epochs=1",
        *SMALL,
        f"output.dir={root}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        env=trainer_env(STORAGE_EMULATOR_HOST=emulator.url),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = set(emulator.names(root))
    assert {"0/_SUCCESS", "1/_SUCCESS", "sweep.csv"} <= names, sorted(names)
    bucket = emulator.client().bucket(gcs_bucket)
    remote = bucket.blob("sweeps/s1/sweep.csv").download_as_text()
    assert remote == (tmp_path / "sweep" / "sweep.csv").read_text()
    rows = list(csv.DictReader(remote.splitlines()))
    assert sorted(r["point"] for r in rows) == ["0", "1"]
    assert {r["output_dir"] for r in rows} == {f"{root}/0", f"{root}/1"}


def test_a_summary_that_cannot_reach_its_bucket_is_one_line_not_a_traceback(
    folders, tmp_path, emulator
):
    train_dir, test_dir = folders
    result = run_trainer(
        "-m",
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "model.dropout=0.1,0.2",
        *SMALL,
        "output.dir=gs://no-such-bucket-here/sweeps/s1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        env=trainer_env(STORAGE_EMULATOR_HOST=emulator.url),
    )
    assert result.returncode == 2, result.stderr[-3000:]  # every point: no such bucket
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("sweep: summary")]
    assert len(lines) == 1 and "gs://no-such-bucket-here/sweeps/s1" in lines[0], result.stderr
    assert (tmp_path / "sweep" / "sweep.csv").exists()  # the local copy stands


@pytest.mark.slow
def test_optuna_sweep_survives_a_failing_trial_and_writes_its_results(folders, tmp_path):
    """3 Optuna trials over model.dropout, one of which (1.5) is out of range."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    train_dir, test_dir = folders
    sweep_dir = tmp_path / "sweep"
    result = run_trainer(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.sampler.seed=3",
        "model.dropout=choice(0.1,0.2,1.5)",
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "train.epochs=1",
        *SMALL,
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )

    rows = _rows(sweep_dir / "sweep.csv")
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["overrides"] for r in failed] == ["model.dropout=1.5"], result.stderr[-3000:]
    assert len(rows) == 3 and failed[0]["exit_code"] == "2"
    assert result.returncode == 2
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    best = max(float(r["test_accuracy"]) for r in rows if r["status"] == "ok")
    assert results["best_value"] == pytest.approx(best)
    assert results["best_params"]["model.dropout"] in (0.1, 0.2)
