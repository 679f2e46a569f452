"""The cluster a worker trains in, and how a run ends inside one: chief and shard from TF_CONFIG
or an Indexed Job, a malformed TF_CONFIG refused (exit 2), a lost peer (exit 4), the per-run
time limit `train.max_hours` (exit 5), and the Keras patch's version check.

The parsing tests are pure Python; a malformed TF_CONFIG and a lost peer are checked through real
`python -m trainer` processes, as a Job's podFailurePolicy sees them; the time limit, a job
behaviour, through `run(cfg)` in this process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    SMALL,
    configure,
    free_ports,
    last_error_line,
    make_folders,
    run_trainer,
    seconds_to_exit_after_kill,
    stop,
    trainer_env,
    wait_for_text,
)
from trainer import TimeLimitReached, TrainerError
from trainer.cluster import from_environment, parse
from trainer.job import run

INDEXED_JOB = {
    "TRAINER_WORKERS": "3",
    "TRAINER_JOB_NAME": "hotdog",
    "TRAINER_SERVICE": "hotdog-workers",
}
KUBEFLOW = {"chief": ["c-0:2222"], "worker": ["w-0:2222", "w-1:2222"]}


# --- chief, worker count, shard -----------------------------------------------------------------


@pytest.mark.parametrize(
    "task, chief, index",
    [
        ({"type": "chief", "index": 0}, True, 0),
        ({"type": "worker", "index": 0}, False, 1),
        ({"type": "worker", "index": 1}, False, 2),
    ],
)
def test_kubeflow_chief_task_is_the_chief_and_shard_0(task, chief, index):
    cluster = parse({"cluster": KUBEFLOW, "task": task})
    assert (cluster.workers, cluster.chief, cluster.index) == (3, chief, index)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_indexed_job_worker_i_reads_shard_i_and_only_worker_0_is_chief(index):
    env = {**INDEXED_JOB, "JOB_COMPLETION_INDEX": str(index)}
    cluster = from_environment(env)
    assert (cluster.workers, cluster.index, cluster.chief) == (3, index, index == 0)
    assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": index}
    assert cluster.task == f"worker {index}"


def test_no_cluster_is_one_worker_that_is_the_chief():
    env = {"JOB_COMPLETION_INDEX": "4"}  # a sweep point, not a cluster
    cluster = from_environment(env)
    assert (cluster.workers, cluster.index, cluster.chief, cluster.tf_config) == (1, 0, True, None)
    assert "TF_CONFIG" not in env


@pytest.mark.parametrize(
    "tf_config, named",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "JSON object"),
        ('{"cluster": {"worker": "w-0:2222"}}', "'cluster'"),
        (json.dumps({"cluster": KUBEFLOW, "task": {"type": "ps", "index": 0}}), "'ps'"),
        (json.dumps({"cluster": KUBEFLOW, "task": {"type": "worker", "index": 2}}), "index 2"),
        (json.dumps({"cluster": KUBEFLOW}), "task type None"),
    ],
)
def test_malformed_tf_config_is_a_trainer_error_naming_what_is_wrong(tf_config, named):
    with pytest.raises(TrainerError, match="TF_CONFIG") as error:
        from_environment({"TF_CONFIG": tf_config})
    assert named in str(error.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return make_folders(tmp_path_factory.mktemp("cluster-data"), train=12, test=6)


@pytest.mark.parametrize("tf_config", ["{not json", '{"cluster": {"worker": ["a:1", "b:2"]}}'])
def test_malformed_tf_config_exits_2_with_one_line(folders, tmp_path, tf_config):
    train_dir, test_dir = folders
    result = run_trainer(
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        f"output.dir={tmp_path / 'out'}",
        *SMALL,
        cwd=tmp_path,
        env=trainer_env(TF_CONFIG=tf_config),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_error_line(result).startswith("trainer: error: TF_CONFIG: ")
    assert "Traceback" not in result.stderr


# --- train.max_hours: exit 5 --------------------------------------------------------------------


def test_max_hours_stops_evaluates_writes_metrics_and_is_exit_5_without_export(
    folders, tmp_path, cfg, caplog
):
    train_dir, test_dir = folders
    out = tmp_path / "out"
    configure(
        cfg,
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "train.epochs=50",
        "train.finetune_epochs=2",
        "train.max_hours=0.0001",  # 0.36 s: gone before the first step ends
    )
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(TimeLimitReached) as end:
        run(cfg)
    assert end.value.exit_code == 5 and str(end.value).startswith("train.max_hours=0.0001 reached")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_at_time_limit"] is True
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["num_test"] == 12
    assert "epoch 1/52" in caplog.text and "epoch 2/52" not in caplog.text  # within epoch 1
    assert "fine-tuning" not in caplog.text  # and the fine-tuning phase never starts
    assert not (out / "saved_model").exists()
    assert not (out / "_SUCCESS").exists()


# --- a lost peer: exit 4 ------------------------------------------------------------------------


def _worker(
    folders, out: Path, ports: list[int], index: int, log, *overrides: str
) -> subprocess.Popen:
    train_dir, test_dir = folders
    workers = [f"127.0.0.1:{port}" for port in ports]
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    # Its own TMPDIR: a worker killed with SIGKILL cannot remove its private scratch folder.
    tmp = out.parent / f"tmp{index}"
    tmp.mkdir(exist_ok=True)
    env = trainer_env(TF_CONFIG=json.dumps(tf_config), TMPDIR=str(tmp))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer",
            f"data.train_dir={train_dir}",
            f"data.test_dir={test_dir}",
            f"output.dir={out}",
            f"hydra.run.dir={out}-hydra-{index}",
            "model.weights=null",
            "data.image_size=32",
            "data.batch_size=4",
            "data.augment=true",  # a full forward each step: training lasts long enough to kill
            "train.epochs=100",
            "distribute.timeout_seconds=60",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _start_two_workers(folders, out: Path, logs: list[Path], *overrides: str, into: list) -> None:
    """Two workers on loopback, each logging to its file; appended to `into` as they start, so
    the caller's `finally` stops whichever started."""
    ports = free_ports(2)
    for index in range(2):
        with open(logs[index], "w") as log:
            into.append(_worker(folders, out, ports, index, log, *overrides))


def test_a_worker_killed_mid_training_makes_the_survivor_exit_4(folders, tmp_path):
    workers, logs = [], [tmp_path / f"worker{i}.log" for i in range(2)]
    try:
        _start_two_workers(folders, tmp_path / "out", logs, into=workers)
        wait_for_text(logs[0], "epoch 1/100", workers[0], timeout=180)  # mid-training
        waited = seconds_to_exit_after_kill(workers[0], workers[1], timeout=120)
    finally:
        for worker in workers:
            stop(worker)
    output = logs[0].read_text(errors="replace")
    assert workers[0].returncode == 4, output[-3000:]
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert last.startswith("trainer: lost a peer worker: ")
    assert last.endswith("; the Job's retry restarts every worker")
    assert waited < 120
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.slow
def test_max_hours_stops_every_worker_after_the_same_epoch_and_all_exit_5(folders, tmp_path):
    workers, logs = [], [tmp_path / f"worker{i}.log" for i in range(2)]
    try:
        _start_two_workers(folders, tmp_path / "out", logs, "train.max_hours=0.0001", into=workers)
        for worker in workers:
            worker.wait(timeout=300)
    finally:
        for worker in workers:
            stop(worker)
    outputs = [path.read_text(errors="replace") for path in logs]
    assert [w.returncode for w in workers] == [5, 5], outputs[0][-2000:] + outputs[1][-2000:]
    assert all("epoch 1/100" in x and "epoch 2/100" not in x for x in outputs)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["stopped_at_time_limit"] is True
    assert not (tmp_path / "out" / "saved_model").exists()


def test_a_collective_error_is_a_lost_peer_only_inside_a_cluster(monkeypatch):
    import tensorflow as tf

    from trainer import LostPeer
    from trainer.distribute import lost_peer

    unavailable = tf.errors.UnavailableError(
        None,
        None,
        "{{function_node __wrapped__CollectiveReduceV2}} Collective ops is aborted by: "
        "Error reported from /job:worker/task:1: The following tasks are unhealthy\nmore",
    )
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TRAINER_WORKERS", raising=False)
    assert lost_peer(unavailable) is None  # one machine: a crash of our own, not a lost peer
    two = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(two))
    lost = lost_peer(unavailable)
    assert isinstance(lost, LostPeer)
    assert str(lost) == (  # the line a user reads: the error, not TensorFlow's graph tag
        "UnavailableError: Collective ops is aborted by: Error reported from /job:worker/task:1: "
        "The following tasks are unhealthy"
    )
    assert lost_peer(ValueError("a bug")) is None


# --- the Keras multi-worker patch ---------------------------------------------------------------


def test_keras_patch_warns_in_one_line_outside_the_verified_releases(caplog):
    from keras.src.backend.tensorflow import trainer as tf_trainer

    from trainer.distribute import _check_keras_for_patch

    with caplog.at_level(logging.WARNING, logger="trainer.distribute"):
        _check_keras_for_patch("3.15.1", tf_trainer)
        assert not caplog.records
        _check_keras_for_patch("3.16.0", tf_trainer)
    (record,) = caplog.records
    assert "Keras 3.16.0" in record.getMessage() and "may no longer apply" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_keras_patch_refuses_when_the_private_functions_are_gone():
    from trainer.distribute import _check_keras_for_patch

    class Trainer:  # a Keras whose TensorFlow trainer was refactored
        class TensorFlowTrainer:
            pass

    with pytest.raises(TrainerError, match=r"Keras 4\.0\.0: .*reduce_per_replica"):
        _check_keras_for_patch("4.0.0", Trainer)
