"""Every promised path: strategy x precision x phase x XLA, SIGTERM under
MultiWorkerMirroredStrategy, a corrupt feature-cache entry, a run that diverges.

The matrix runs `python -m trainer` as users do (a strategy, simulated devices and the
multi-worker runtime are set up once per process) and prunes it to the combinations that run
distinct code: each precision on each strategy once, each phase (the fast path on cached
features, `data.augment=true` on images, `train=finetune`'s Keras backbone) under a low
precision, and XLA where it is not turned off. mixed_float16 runs on CPUs too, so the loss
scaling and half-precision collectives a GPU takes run here. Every combination must exit 0,
export once (only the chief writes output.dir), record what it resolved in metrics.json, and
serve exactly the test accuracy metrics.json reports. `auto` is what a user gets: float32 here
unless the CPU has native bf16. The slowest combinations are marked `slow` (CI's slow pass).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from tests.conftest import configure, free_ports, make_folders, stop, trainer_env, wait_for_text
from tests.support.hygiene import forget_process_caches
from trainer import Diverged, feature_cache
from trainer.job import run

SMALL = [
    "model.weights=null",
    "data.image_size=32",
    "data.batch_size=8",  # per replica: two replicas make 16
    "train.epochs=2",
    "storage.feature_cache=null",  # every run's backbone pass runs in its own precision
]
PHASES = {
    "fast": [],
    "augment": ["data.augment=true"],
    "finetune": ["train.epochs=1", "train.finetune_epochs=1"],
}
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """16 training and 6 test images a class (two classes)."""
    return make_folders(tmp_path_factory.mktemp("paths"), train=16, test=6)


def _start(data, out: Path, *overrides: str, tf_config: str | None = None, log: Path):
    """`python -m trainer` on `data` into `out`, its output (stdout and stderr) in `log`."""
    env = {k: v for k, v in trainer_env().items() if k != "TF_CONFIG"}
    if tf_config:
        env["TF_CONFIG"] = tf_config
    args = [f"data.train_dir={data[0]}", f"data.test_dir={data[1]}", f"output.dir={out}"]
    with open(log, "w") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer", *args, f"hydra.run.dir={log}.hydra", *overrides],
            cwd=log.parent,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
        )


def _tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def _run(data, out: Path, *overrides: str, workers: int = 1, timeout: float = 600) -> list[int]:
    """Run the trainer (`workers` processes on loopback when > 1) to the end; their exit codes.
    Logs go to `out`-<i>.log beside `out`."""
    ports = free_ports(workers)
    processes = []
    try:
        for index in range(workers):
            tf_config = _tf_config(ports, index) if workers > 1 else None
            log = out.parent / f"{out.name}-{index}.log"
            processes.append(_start(data, out, *overrides, tf_config=tf_config, log=log))
        deadline = time.monotonic() + timeout
        for process in processes:
            process.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for process in processes:
            stop(process)
    return [process.returncode for process in processes]


def _log(out: Path, index: int = 0) -> str:
    return (out.parent / f"{out.name}-{index}.log").read_text(errors="replace")


def _serving_accuracy(out: Path, test_dir: Path) -> float:
    """The exported model's accuracy on the test folder, through serving_default (image bytes)."""
    import tensorflow as tf

    classes = (out / "labels.txt").read_text().split()
    paths = sorted(test_dir.glob("*/*.jpg"))
    labels = np.asarray([classes.index(p.parent.name) for p in paths])
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    result = serve(image_bytes=tf.constant([p.read_bytes() for p in paths]))
    return float(np.mean(result["class_id"].numpy() == labels))


def _assert_exported_once(tmp_path: Path, out: Path, data) -> dict:
    """One SavedModel, at output.dir, published; it serves metrics.json's test accuracy."""
    exports = sorted(str(p) for p in tmp_path.rglob("saved_model"))
    assert exports == [str(out / "saved_model")]
    assert (out / "_SUCCESS").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert _serving_accuracy(out, data[1]) == metrics["test_accuracy"]
    return metrics


COMBINATIONS = [
    # strategy, precision, phase, XLA (train.jit_compile), marks
    ("default", "mixed_bfloat16", "fast", "auto", ()),
    ("default", "float32", "fast", "true", ()),
    ("default", "mixed_float16", "augment", "true", slow),
    ("default", "mixed_bfloat16", "finetune", "true", slow),
    ("mirrored", "mixed_bfloat16", "fast", "auto", slow),
    ("mirrored", "mixed_float16", "finetune", "auto", slow),
    ("mirrored", "auto", "augment", "true", slow),
    ("multi_worker", "auto", "fast", "auto", ()),
    ("multi_worker", "mixed_bfloat16", "fast", "auto", slow),  # = auto on a bf16 CPU
    ("multi_worker", "mixed_float16", "finetune", "auto", slow),
    ("multi_worker", "mixed_bfloat16", "augment", "true", slow),
]


@pytest.mark.parametrize(
    "strategy,precision,phase,jit",
    [pytest.param(*c[:4], marks=c[4], id="-".join(c[:4])) for c in COMBINATIONS],
)
def test_every_combination_trains_exports_once_and_serves_its_reported_accuracy(
    data, tmp_path, strategy, precision, phase, jit
):
    out = tmp_path / "out"
    overrides = [*SMALL, *PHASES[phase]]
    if precision != "auto":
        overrides.append(f"train.precision={precision}")
    if jit != "auto":
        overrides.append(f"train.jit_compile={jit}")
    if strategy == "mirrored":
        overrides.append("distribute=sim2")
    workers = 2 if strategy == "multi_worker" else 1

    codes = _run(data, out, *overrides, workers=workers)

    assert codes == [0] * workers, _log(out)[-3000:]
    metrics = _assert_exported_once(tmp_path, out, data)
    assert metrics["strategy"] == strategy
    assert metrics["replicas"] == (1 if strategy == "default" else 2)
    assert metrics["devices"] == ["CPU"]
    assert metrics["serving_dtype"] == "float32"
    if precision != "auto":
        assert metrics["precision"] == precision
    # XLA runs on one CPU device; across replicas on CPUs it is turned off (and says so)
    assert metrics["jit_compile"] is (jit == "true" and strategy == "default")
    assert metrics["fast_path"] is (phase != "augment")
    if phase == "fast":  # the head learns the two plain classes, whichever way it trained
        assert metrics["test_accuracy"] >= 0.9, metrics["test_accuracy"]


def _start_workers(data, out: Path, *overrides: str, logs: list[Path]) -> list[subprocess.Popen]:
    ports = free_ports(2)
    return [
        _start(data, out, *overrides, tf_config=_tf_config(ports, i), log=logs[i]) for i in range(2)
    ]


@pytest.mark.parametrize("victim", [0, pytest.param(1, marks=slow)], ids=["chief", "worker-1"])
def test_sigterm_to_a_worker_backs_up_exits_143_the_other_exits_4_and_a_rerun_resumes(
    data, tmp_path, victim
):
    """A preempted multi-worker pod (at the default precision): the worker that gets SIGTERM
    stops at a step's end with a backup and exits 143 within 15 s, the other sees a lost peer
    (exit 4), and the Job's retry (both workers, the same output.dir) resumes and exports."""
    out = tmp_path / "out"
    overrides = [*SMALL, "train.epochs=40"]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    # Each worker trains the head on its own (trainer/phases.py: _trainee), in ~1 ms a step: 200
    # steps an epoch keep the signal inside the head phase. The other worker trains on to the
    # phase's end, where the all-reduce of the head's weights finds its peer gone.
    workers = _start_workers(data, out, *overrides, "train.head_min_steps=8000", logs=logs)
    try:
        wait_for_text(logs[victim], "epoch 3/40", workers[victim], timeout=300)
        workers[victim].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            workers[victim].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker that got SIGTERM still trains 60 s later (handler replaced?)")
        took = time.monotonic() - sent
        workers[1 - victim].wait(timeout=120)
    finally:
        for worker in workers:
            stop(worker)
    codes = [worker.returncode for worker in workers]
    assert codes[victim] == 143, logs[victim].read_text()[-3000:]
    assert codes[1 - victim] == 4, logs[1 - victim].read_text()[-3000:]
    assert took < 15
    assert "SIGTERM received; backup written" in logs[victim].read_text()
    assert (out / "backup" / "head").is_dir() and not (out / "_SUCCESS").exists()

    rerun = [tmp_path / f"rerun{i}.log" for i in range(2)]
    workers = _start_workers(data, out, *overrides, "train.epochs=5", logs=rerun)
    try:
        for worker in workers:
            worker.wait(timeout=300)
    finally:
        for worker in workers:
            stop(worker)
    assert [w.returncode for w in workers] == [0, 0], rerun[0].read_text()[-3000:]
    assert "resuming head on cached features from the backup" in rerun[0].read_text()
    assert "epoch 1/5" not in rerun[0].read_text()
    _assert_exported_once(tmp_path, out, data)


# --- never a NaN model ---------------------------------------------------------------------


def test_a_corrupt_or_non_finite_cache_entry_is_a_miss_and_is_removed(tmp_path, caplog):
    cache = str(tmp_path / "cache")
    good = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    feature_cache.store(cache, "flipped", good)
    entry = Path(cache, "flipped.npy")
    data = bytearray(entry.read_bytes())
    data[200] ^= 0x10  # one bit of one feature: the .npy header still parses
    entry.write_bytes(bytes(data))
    nan = good.copy()
    nan[2, 3] = np.nan
    feature_cache.store(cache, "nan", nan)  # a buggy writer: its digest matches its NaN
    feature_cache.store(cache, "intact", good)

    assert feature_cache.lookup(cache, "flipped", rows=6) is None
    assert feature_cache.lookup(cache, "nan", rows=6) is None
    np.testing.assert_array_equal(feature_cache.lookup(cache, "intact", rows=6), good)
    assert sorted(os.listdir(cache)) == ["intact.npy"]
    assert "flipped.npy is corrupt" in caplog.text and "nan.npy is corrupt" in caplog.text


def _in_process(cfg, data, out: Path, *overrides: str) -> DictConfig:
    """`cfg` for a one-device run on `data` into `out` with the matrix's SMALL settings."""
    train, test = data
    return configure(
        copy.deepcopy(cfg),
        f"data.train_dir={train}",
        f"data.test_dir={test}",
        *SMALL,
        f"output.dir={out}",
        *overrides,
    )


def test_a_corrupt_cache_entry_is_computed_again_and_the_model_is_the_same(
    data, tmp_path, cfg, caplog
):
    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    cached = f"storage.feature_cache={cache}"
    reference = run(_in_process(cfg, data, first, cached))
    for entry in cache.glob("*.npy"):  # every feature entry: flip a bit near the end
        raw = bytearray(entry.read_bytes())
        raw[-len(feature_cache.FOOTER) - 64 - 5] ^= 0x01
        entry.write_bytes(bytes(raw))
    forget_process_caches()  # the second run as a process of its own

    with caplog.at_level("INFO", logger="trainer"):
        metrics = run(_in_process(cfg, data, second, cached))

    assert "is corrupt (digest, shape or values): removed, a miss" in caplog.text
    assert metrics["timings"]["feature_cache"] == "miss"
    assert metrics["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)
    assert _serving_accuracy(second, data[1]) == metrics["test_accuracy"]


def test_a_diverging_run_is_exit_6_naming_the_loss_and_exports_nothing(data, tmp_path, cfg):
    out = tmp_path / "out"
    with pytest.raises(Diverged, match="^the training loss became nan in epoch ") as diverged:
        run(_in_process(cfg, data, out, "train.learning_rate=1e38"))
    assert diverged.value.exit_code == 6
    assert not (out / "saved_model").exists() and not (out / "_SUCCESS").exists()
    assert not (out / "backup").exists()


def test_weights_that_give_non_finite_features_are_exit_6_before_training(
    data, tmp_path, cfg, caplog
):
    import keras

    from trainer.model import build_backbone

    backbone = build_backbone(32, None)
    # The last conv's first filter at 3e38 (float32's and bfloat16's largest is 3.4e38): its sum
    # over the block's activations overflows to inf, which the ReLU and the pooling keep. A NaN
    # or inf weight would not do: in graph mode TensorFlow's fused conv + bias + ReLU turns the
    # NaN it makes (inf x 0) into 0, and the features come out finite.
    conv = backbone.get_layer("conv5_block3_3_conv")
    kernel = conv.kernel.numpy()
    kernel[..., 0] = 3e38
    conv.kernel.assign(kernel)
    weights = tmp_path / "broken.weights.h5"
    backbone.save_weights(weights)
    keras.backend.clear_session()
    out = tmp_path / "out"

    with caplog.at_level("INFO", logger="trainer"), pytest.raises(Diverged) as diverged:
        run(_in_process(cfg, data, out, f"model.weights={weights}"))

    assert diverged.value.exit_code == 6
    assert "the backbone's features of the train set" in str(diverged.value)
    assert "non-finite" in str(diverged.value)
    assert "epoch 1/" not in caplog.text
    assert not (out / "saved_model").exists()
