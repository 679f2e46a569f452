"""Distribution: TF_CONFIG from a Kubernetes Indexed Job, MirroredStrategy over two simulated CPU
devices and two workers on loopback giving the single-device model, a lost worker failing the rest.

The end-to-end tests run `python -m trainer` in subprocesses: simulated devices and the
multi-worker runtime must be set up before TensorFlow starts, once per process.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import free_ports, seconds_to_exit_after_kill, stop, wait_for_text
from trainer import TrainerError
from trainer.cluster import indexed_job_tf_config, parse, resolve_tf_config
from trainer.distribute import choose_jit_compile

REPO = Path(__file__).resolve().parents[1]
INDEXED_JOB = {
    "TRAINER_WORKERS": "3",
    "TRAINER_JOB_NAME": "hotdog",
    "TRAINER_SERVICE": "hotdog-workers",
    "TRAINER_PORT": "2222",
}
# Global batch 16 everywhere: 16 on one device, 8 per replica on two replicas. The precision is
# the default (auto): where it resolves to a low precision (a CPU with bf16), rounding depends on
# how oneDNN splits a batch, and the comparisons loosen (see _assert_same_model).
SMALL_RUN = [
    "model.weights=null",
    "data.image_size=32",
    "train.epochs=2",
    "model.dropout=0",
    "storage.feature_cache=null",  # every run's backbone pass runs (tests/test_fast.py: cached)
]


# --- TF_CONFIG from the environment -------------------------------------------------------------


def test_indexed_job_worker_0_of_3_gets_the_cluster_and_index_0():
    config = indexed_job_tf_config({**INDEXED_JOB, "JOB_COMPLETION_INDEX": "0"})
    assert config == {
        "cluster": {
            "worker": [
                "hotdog-0.hotdog-workers:2222",
                "hotdog-1.hotdog-workers:2222",
                "hotdog-2.hotdog-workers:2222",
            ]
        },
        "task": {"type": "worker", "index": 0},
    }


def test_indexed_job_worker_2_of_3_gets_the_same_cluster_and_index_2():
    config = indexed_job_tf_config({**INDEXED_JOB, "JOB_COMPLETION_INDEX": "2"})
    assert config["cluster"]["worker"][2] == "hotdog-2.hotdog-workers:2222"
    assert len(config["cluster"]["worker"]) == 3
    assert config["task"] == {"type": "worker", "index": 2}


def test_indexed_job_tf_config_is_exported_for_tensorflow():
    env = {**INDEXED_JOB, "JOB_COMPLETION_INDEX": "1", "TRAINER_PORT": "3000"}
    config = resolve_tf_config(env)
    assert json.loads(env["TF_CONFIG"]) == config
    assert config["cluster"]["worker"][0] == "hotdog-0.hotdog-workers:3000"
    assert parse(config).workers == 3


def test_kubeflow_tf_config_is_used_unchanged():
    tfjob = {
        "cluster": {"chief": ["c-0:2222"], "worker": ["w-0:2222", "w-1:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    env = {"TF_CONFIG": json.dumps(tfjob), **INDEXED_JOB, "JOB_COMPLETION_INDEX": "0"}
    assert resolve_tf_config(env) == tfjob
    assert json.loads(env["TF_CONFIG"]) == tfjob
    assert parse(tfjob).workers == 3


def test_an_indexed_sweep_without_trainer_workers_is_not_a_cluster():
    env = {"JOB_COMPLETION_INDEX": "4"}
    assert resolve_tf_config(env) is None
    assert "TF_CONFIG" not in env


def test_indexed_job_without_its_service_name_says_which_variable_is_missing():
    env = {**INDEXED_JOB, "JOB_COMPLETION_INDEX": "0"}
    del env["TRAINER_SERVICE"]
    with pytest.raises(TrainerError, match="TRAINER_SERVICE"):
        indexed_job_tf_config(env)
    with pytest.raises(TrainerError, match="JOB_COMPLETION_INDEX=3"):
        indexed_job_tf_config({**INDEXED_JOB, "JOB_COMPLETION_INDEX": "3"})


def test_a_single_machine_strategy_inside_a_cluster_is_refused(monkeypatch):
    from trainer.distribute import choose_strategy

    monkeypatch.setenv(
        "TF_CONFIG", json.dumps(indexed_job_tf_config({**INDEXED_JOB, "JOB_COMPLETION_INDEX": "1"}))
    )
    with pytest.raises(TrainerError, match="distribute.strategy=mirrored: TF_CONFIG names 3"):
        choose_strategy("mirrored", None)


@pytest.mark.parametrize("value, expected", [("auto", False), ("true", True), ("false", False)])
def test_jit_compile_accepts_auto_true_false_as_hydra_passes_them(value, expected):
    """The value as Hydra composes it from `train.jit_compile=...`. This machine has no GPU, where
    README says auto means no XLA on a CPU."""
    from tests.conftest import compose_config

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: auto is Keras' choice there")
    cfg = compose_config("data.train_dir=x", f"train.jit_compile={value}")
    assert choose_jit_compile(cfg.train.jit_compile) is expected


def test_jit_compile_is_turned_off_across_simulated_cpu_devices():
    class Extended:
        worker_devices = ("/job:localhost/replica:0/task:0/device:CPU:0", "/device:CPU:1")

    class TwoCpus:
        num_replicas_in_sync = 2
        extended = Extended()

    assert choose_jit_compile("true", TwoCpus()) is False
    Extended.worker_devices = ("/device:GPU:0", "/device:GPU:1")
    assert choose_jit_compile("true", TwoCpus()) is True


def test_mixed_precision_keeps_the_head_and_the_output_float32():
    import keras

    from trainer.distribute import choose_precision
    from trainer.model import build_model

    try:
        assert choose_precision("mixed_bfloat16") == "mixed_bfloat16"
        model = build_model(2, 32, None, 0.2)
        assert model.get_layer("backbone").compute_dtype == "bfloat16"
        head = model.get_layer("head")
        assert {layer.compute_dtype for layer in head.layers} == {"float32"}
        assert model(np.zeros((1, 32, 32, 3), "float32")).dtype == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}


def test_auto_precision_on_a_cpu_is_bfloat16_only_where_it_measured_faster():
    """README: on CPUs, mixed_bfloat16 only with native bf16 instructions (avx512_bf16 or
    amx_bf16), where it measured 1.45x faster; float32 otherwise."""
    import keras

    from trainer import distribute

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible")
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    try:
        policy = distribute.choose_precision("auto")
        assert policy == ("mixed_bfloat16" if native else "float32")
        assert keras.mixed_precision.dtype_policy().name == policy  # set, not only returned
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """34 training images (17 a class: odd shares on two workers) and 10 test images."""
    from trainer.synthetic import make_dataset

    root = tmp_path_factory.mktemp("images")
    make_dataset(str(root / "train"), ["a", "b"], 17, min_size=40, max_size=56)
    make_dataset(str(root / "test"), ["a", "b"], 5, min_size=40, max_size=56, seed=1)
    return {"train": str(root / "train"), "test": str(root / "test")}


def _trainer(folders, out_dir, *overrides, env=None, log=None, umask=-1) -> subprocess.Popen:
    """Start `python -m trainer` on this checkout (cwd: its conf/ and package)."""
    args = [
        sys.executable,
        "-m",
        "trainer",
        f"data.train_dir={folders['train']}",
        f"data.test_dir={folders['test']}",
        f"output.dir={out_dir}",
        f"hydra.run.dir={out_dir}-hydra",
        *SMALL_RUN,
        *overrides,
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    full_env.update({"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=full_env,
        stdout=log or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        umask=umask,
    )


def _communicate(process: subprocess.Popen, timeout: float) -> str:
    """The process's output once it ends; killed (and the test failed) if it outlives `timeout`."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"still running after {timeout} s:\n{(output or '')[-3000:]}")
    return output or ""


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output = _communicate(process, timeout)
    assert process.returncode == 0, f"exit {process.returncode}:\n{output[-3000:]}"
    return output


def _tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


@contextlib.contextmanager
def stopped_on_exit_all(processes: list[subprocess.Popen]):
    """Every process in `processes` (filled inside the block) is ended on every path out."""
    try:
        yield
    finally:
        for process in processes:
            stop(process)


def _serve(saved_model: str, images: list[str]) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    data = [Path(p).read_bytes() for p in images]
    return serve(image_bytes=tf.constant(data))["probabilities"].numpy()


@pytest.fixture(scope="module")
def one_device_run(folders, tmp_path_factory) -> str:
    """The reference: one device, global batch 16."""
    out_dir = tmp_path_factory.mktemp("runs") / "one-device"
    _finish(_trainer(folders, out_dir, "distribute.strategy=default", "data.batch_size=16"))
    return str(out_dir)


def _test_images(folders) -> list[str]:
    return sorted(glob.glob(os.path.join(folders["test"], "*", "*.jpg")))


def _assert_same_model(run_dir: str, reference_dir: str, folders) -> None:
    metrics = json.loads(Path(run_dir, "metrics.json").read_text())
    reference = json.loads(Path(reference_dir, "metrics.json").read_text())
    assert metrics["precision"] == reference["precision"]
    exact = metrics["precision"] == "float32"  # else bfloat16's 8 bits of mantissa
    assert metrics["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-3 if exact else 0.1)
    images = _test_images(folders)
    np.testing.assert_allclose(
        _serve(f"{run_dir}/saved_model", images),
        _serve(f"{reference_dir}/saved_model", images),
        atol=1e-4 if exact else 3e-2,
    )


def test_mirrored_on_two_simulated_devices_gives_the_one_device_model(
    folders, one_device_run, tmp_path
):
    out_dir = tmp_path / "mirrored"
    log = _finish(_trainer(folders, out_dir, "distribute=sim2", "data.batch_size=8"))
    assert "strategy: mirrored, 2 replica(s)" in log
    assert "batch size: 8 per replica x 2 replica(s) = 16" in log
    assert json.loads((out_dir / "metrics.json").read_text())["replicas"] == 2
    assert (out_dir / "_SUCCESS").exists()
    _assert_same_model(str(out_dir), one_device_run, folders)


@pytest.mark.slow  # two workers; test_paths has multi_worker-auto-fast-auto in the default run
def test_two_workers_on_loopback_export_once_and_give_the_one_device_model(
    folders, one_device_run, tmp_path
):
    out_dir = tmp_path / "multi-worker"
    ports = free_ports(2)
    scratch = [tmp_path / f"tmp{i}" for i in range(2)]  # each worker's TMPDIR
    workers = []
    with stopped_on_exit_all(workers):
        for index in range(2):
            scratch[index].mkdir()
            env = {"TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(scratch[index])}
            # Worker 1 creates files 0640 and folders 0750 (group-readable, not world-readable),
            # the chief 0644 and 0755: whatever worker 1 wrote into output.dir shows.
            umask = 0o022 if index == 0 else 0o027
            workers.append(_trainer(folders, out_dir, "data.batch_size=8", env=env, umask=umask))
        logs = [_finish(worker) for worker in workers]

    assert "strategy: multi_worker, 2 replicas (2 workers; this is worker 0)" in logs[0]
    exports = [p for p in glob.glob(f"{tmp_path}/**/saved_model", recursive=True)]
    assert exports == [f"{out_dir}/saved_model"]
    assert (out_dir / "_SUCCESS").exists()
    by_worker_1 = [
        str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.stat().st_mode & 0o044 == 0o040
    ]
    assert not by_worker_1, f"a non-chief worker wrote into output.dir: {by_worker_1[:10]}"
    assert not list(scratch[1].glob("trainer-worker-*")), "worker 1 left its private directory"
    _assert_same_model(str(out_dir), one_device_run, folders)


@pytest.mark.slow
def test_two_workers_fine_tune_on_training_images_sharded_by_file(folders, tmp_path):
    out_dir = tmp_path / "multi-worker-finetune"
    ports = free_ports(2)
    workers = []
    with stopped_on_exit_all(workers):
        for index in range(2):
            workers.append(
                _trainer(
                    folders,
                    out_dir,
                    "data.batch_size=4",
                    "train.epochs=1",
                    "train.finetune_epochs=1",
                    env={"TF_CONFIG": _tf_config(ports, index)},
                )
            )
        logs = [_finish(worker, timeout=400) for worker in workers]
    # 34 files less the validation set held out of them (train.finetune_validation_split), 2
    # workers, global batch 8: whole global batches of files per worker, the same count on each.
    from trainer.data import worker_share, worker_steps

    held = int(re.search(r"validation set: (\d+) training images held out", logs[0]).group(1))
    share, steps = worker_share(34 - held, 8, 2), worker_steps(34 - held, 8, 2)
    assert share > 0 and steps > 0
    line = f"training images sharded by file: {share} a worker an epoch, {steps} steps"
    assert all(line in x for x in logs), (line, re.findall(r"sharded by file[^\n]*", logs[0]))
    assert glob.glob(f"{tmp_path}/**/saved_model", recursive=True) == [f"{out_dir}/saved_model"]
    assert (out_dir / "_SUCCESS").exists()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["num_test"] == 10


@pytest.mark.slow  # two workers; the default run has test_cluster's killed-worker exit 4
def test_a_killed_worker_makes_the_other_exit_non_zero_within_a_bounded_time(folders, tmp_path):
    ports = free_ports(2)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = []
    for index in range(2):
        with open(logs[index], "w") as log:
            # Its own TMPDIR: a worker killed with SIGKILL cannot remove its private folder.
            (tmp_path / f"tmp{index}").mkdir()
            env = {"TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(tmp_path / f"tmp{index}")}
            workers.append(
                _trainer(
                    folders,
                    tmp_path / "out",
                    "data.batch_size=8",
                    "distribute.timeout_seconds=30",
                    env=env,
                    log=log,
                )
            )
    try:
        wait_for_text(logs[1], "strategy: multi_worker", workers[1], timeout=120)
        waited = seconds_to_exit_after_kill(workers[0], workers[1], timeout=90)
    finally:
        for worker in workers:
            stop(worker)
    assert workers[0].returncode not in (0, None), logs[0].read_text()[-3000:]
    assert waited < 90
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.slow  # waits for the join to time out
def test_a_worker_that_never_joins_makes_the_other_exit_non_zero(folders, tmp_path):
    ports = free_ports(2)
    started = time.monotonic()
    lonely = _trainer(
        folders,
        tmp_path / "out",
        "distribute.timeout_seconds=5",
        env={"TF_CONFIG": _tf_config(ports, 0)},
    )
    output = _communicate(lonely, timeout=120)
    assert lonely.returncode == 1, output[-3000:]
    assert "joining the cluster" in output
    assert time.monotonic() - started < 120


@pytest.mark.slow  # two workers, then the collective timeout
def test_a_live_worker_that_hangs_makes_the_other_exit_after_the_timeout(folders, tmp_path):
    """Worker 1 stays alive (its heartbeats go on) but its Python stops in the training loop, as
    in a deadlock: worker 0's next collective gives up after distribute.timeout_seconds. (On
    cached features each worker trains the head alone: that collective is the all-reduce of the
    head's weights at the phase's end, after worker 0's last epoch.)"""
    hang = tmp_path / "hang"  # a sitecustomize for worker 1 only: SIGUSR1 makes it hang
    hang.mkdir()
    (hang / "sitecustomize.py").write_text(
        "import signal, time\nsignal.signal(signal.SIGUSR1, lambda *_: time.sleep(10**6))\n"
    )
    ports, timeout, epochs = free_ports(2), 10, 300
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = []
    with stopped_on_exit_all(workers):
        for index in range(2):
            (tmp_path / f"tmp{index}").mkdir()  # worker 1 ends killed: its private folder stays
            env = {"TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(tmp_path / f"tmp{index}")}
            if index == 1:
                env["PYTHONPATH"] = os.pathsep.join([str(hang), str(REPO)])
            with open(logs[index], "w") as log:
                workers.append(
                    _trainer(
                        folders,
                        tmp_path / "out",
                        "data.batch_size=8",
                        f"train.epochs={epochs}",
                        f"distribute.timeout_seconds={timeout}",
                        env=env,
                        log=log,
                    )
                )
        wait_for_text(logs[1], f"epoch 2/{epochs}", workers[1], timeout=240)
        workers[1].send_signal(signal.SIGUSR1)
        hung = time.monotonic()
        try:
            workers[0].wait(timeout=timeout + 90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker 0 still waits {timeout + 90} s after worker 1 hung")
        waited = time.monotonic() - hung
        assert workers[1].poll() is None, "worker 1 was meant to hang alive, not to exit"
    assert workers[0].returncode not in (0, None), logs[0].read_text()[-3000:]
    assert waited >= timeout - 1
    assert not (tmp_path / "out" / "_SUCCESS").exists()
