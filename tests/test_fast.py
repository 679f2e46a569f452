"""Paying once: the feature cache shared by runs (storage.feature_cache) as a run sees it.

Runs call `run(cfg)` in this process on a config composed as `python -m trainer` composes it;
the cache's own rules (keys, invalidation, concurrent misses) are tested in
tests/test_feature_cache.py.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest

from tests.conftest import (
    CLASSES,
    REPO,
    SMALL,
    compose_config,
    free_ports,
    make_folders,
    run_trainer,
    trainer_env,
)
from trainer.job import run

HIT = "from the feature cache"
BACKBONE_PASS = "features cached: "  # extract_features' line: the backbone ran over a split


@contextlib.contextmanager
def all_stopped(processes: list):
    """Every process put in `processes` inside the block is killed on every way out."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def _config(*overrides: str):
    return compose_config(*SMALL, "train.epochs=2", *overrides)


def _run(tmp_path, name: str, data, cache, caplog) -> tuple[dict, str]:
    """One run into tmp_path/name with the feature cache at `cache`: (metrics, its log)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        metrics = run(
            _config(
                f"data.train_dir={data[0]}",
                f"data.test_dir={data[1]}",
                f"output.dir={tmp_path / name}",
                f"storage.feature_cache={cache}",
            )
        )
    return metrics, caplog.text


def _exported_probabilities(out, test_dir) -> tuple[np.ndarray, np.ndarray]:
    """The exported model's probabilities for the test images, and their labels."""
    import tensorflow as tf

    from trainer.images import decode_image

    files = sorted(test_dir.glob("*/*.jpg"))
    labels = np.array([CLASSES.index(f.parent.name) for f in files])
    pixels = tf.stack([decode_image(tf.io.read_file(str(f)), 32) for f in files])
    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_pixels"]
    return serve(pixels=pixels)["probabilities"].numpy(), labels


def test_a_second_run_takes_the_features_from_the_cache_and_exports_the_same_model(
    tmp_path, in_process_run, caplog
):
    data = make_folders(tmp_path / "data", train=12, test=6)
    cache = tmp_path / "features"

    first, first_log = _run(tmp_path, "first", data, cache, caplog)
    second, second_log = _run(tmp_path, "second", data, cache, caplog)

    assert first["timings"]["feature_cache"] == "miss"
    assert BACKBONE_PASS in first_log and HIT not in first_log
    assert len(list(cache.glob("*.npy"))) == 2  # train and test
    assert second["timings"]["feature_cache"] == "hit"
    assert second_log.count(HIT) == 2 and "backbone pass skipped" in second_log
    assert BACKBONE_PASS not in second_log  # no backbone pass at all
    for key in ("test_accuracy", "test_loss", "confusion_matrix"):
        assert second[key] == first[key]
    first_out, labels = _exported_probabilities(tmp_path / "first", data[1])
    second_out, _ = _exported_probabilities(tmp_path / "second", data[1])
    np.testing.assert_array_equal(second_out, first_out)
    # The exactness of the fast path holds with cached features: metrics.json (the head on
    # the cached features) is what the exported model gives from the pixels.
    loss = -np.mean(np.log(np.clip(second_out[np.arange(len(labels)), labels], 1e-7, 1)))
    assert np.mean(second_out.argmax(axis=1) == labels) == second["test_accuracy"]
    assert loss == pytest.approx(second["test_loss"], rel=1e-4, abs=1e-6)


def test_changing_one_training_image_is_a_miss(tmp_path, in_process_run, caplog):
    data = make_folders(tmp_path / "data", train=12, test=6)
    cache = tmp_path / "features"
    _run(tmp_path, "first", data, cache, caplog)
    image = sorted((data[0] / "dog").glob("*.jpg"))[0]
    other = sorted((data[0] / "dog").glob("*.jpg"))[1]
    image.write_bytes(other.read_bytes())  # same name, another picture

    metrics, log = _run(tmp_path, "second", data, cache, caplog)

    assert metrics["timings"]["feature_cache"] == "miss"
    assert "features cached: train set" in log  # the training set's backbone pass ran again
    assert "test set from the feature cache" in log  # the unchanged test set still hit


def test_feature_cache_null_turns_it_off(tmp_path, in_process_run, caplog):
    data = make_folders(tmp_path / "data", train=12, test=6)

    metrics, log = _run(tmp_path, "out", data, "null", caplog)

    assert metrics["timings"]["feature_cache"] == "off"
    assert BACKBONE_PASS in log and "feature cache" not in log


def test_a_local_sweep_over_head_keys_runs_the_backbone_once(tmp_path):
    """The default cache (${storage.cache_dir}/features) is shared by a -m sweep's points."""
    train_dir, test_dir = make_folders(tmp_path / "data", train=12, test=6)
    result = run_trainer(
        "-m",
        f"data.train_dir={train_dir}",
        f"data.test_dir={test_dir}",
        "model.dropout=0.1,0.2,0.3",
        "train.epochs=1",
        *SMALL,
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
        env=trainer_env(TRAINER_CACHE_DIR=str(tmp_path / "cache")),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert log.count("features cached: train set") == 1  # the first point's backbone pass
    assert log.count("train set from the feature cache") == 2  # the other two points'
    for point in range(3):
        assert (tmp_path / "sweep" / str(point) / "_SUCCESS").exists(), point
    assert list((tmp_path / "cache" / "features").glob("*.npy"))


START_CHECK = """
import sys
from hydra import compose, initialize_config_dir
from trainer import TrainerError
from trainer.config import register_configs
from trainer.job import run

register_configs()
with initialize_config_dir({conf!r}, version_base="1.3"):
    cfg = compose("config", overrides={overrides!r})
try:
    run(cfg)
except TrainerError as error:
    print("error:", error)
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.parametrize(
    "override, error",
    [
        ("data.train_dir={tmp}/nonexistent", "data.train_dir=.*/nonexistent: folder not found"),
        ("data.test_dir={tmp}/nonexistent", "data.test_dir=.*/nonexistent: folder not found"),
        ("data.train_dir={tmp}/data/train/cat", "data.train_dir=.*/cat: found 0 class folder"),
        ("data.validation_split=1.5", "data.validation_split"),
    ],
)
def test_config_and_folder_errors_are_raised_before_tensorflow_is_imported(
    tmp_path, override, error
):
    """A fresh process (this one may have TensorFlow loaded): run(cfg) raises TrainerError with
    TensorFlow still unimported, so the error answers in a second, not after TF's start-up."""
    import re
    import subprocess
    import sys

    train_dir, test_dir = make_folders(tmp_path / "data", train=4, test=2)
    overrides = [
        f"data.train_dir={train_dir}",
        "data.test_dir=null",
        f"output.dir={tmp_path / 'out'}",
        *SMALL,
        override.format(tmp=tmp_path),
    ]
    script = START_CHECK.format(conf=str(REPO / "conf"), overrides=overrides)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=trainer_env(TRAINER_CACHE_DIR=str(tmp_path / "cache")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(f"^error: {error}", result.stdout, re.MULTILINE), result.stdout
    assert "tensorflow imported: False" in result.stdout


@pytest.mark.slow  # four trainer processes, two at a time: about two minutes on 2 cores
def test_two_workers_agree_on_miss_then_hit_and_give_the_same_model(tmp_path):
    """Multi-worker: the backbone pass is a collective, so both workers must decide alike.
    The first pair misses (both compute, the chief stores), the second pair hits (neither runs
    the backbone), and both export the same model."""
    from tests.test_distribute import _finish, _serve, _tf_config, _trainer

    train_dir, test_dir = make_folders(tmp_path / "data", train=12, test=6)
    folders = {"train": str(train_dir), "test": str(test_dir)}
    cache = f"storage.feature_cache={tmp_path / 'features'}"
    logs = {}
    for name in ("first", "second"):
        ports = free_ports(2)
        with all_stopped([]) as workers:
            for index in range(2):
                env = {"TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(tmp_path)}
                workers.append(
                    _trainer(folders, tmp_path / name, "data.batch_size=8", cache, env=env)
                )
            logs[name] = [_finish(worker) for worker in workers]
    assert all(BACKBONE_PASS in log and HIT not in log for log in logs["first"])
    assert all(log.count(HIT) == 2 and BACKBONE_PASS not in log for log in logs["second"])
    assert len(list((tmp_path / "features").glob("*.npy"))) == 2  # the chief stored once each
    import json

    first, second = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in logs)
    assert (first["timings"]["feature_cache"], second["timings"]["feature_cache"]) == (
        "miss",
        "hit",
    )
    assert second["test_loss"] == first["test_loss"]
    images = sorted(str(p) for p in test_dir.glob("*/*.jpg"))
    np.testing.assert_array_equal(
        _serve(str(tmp_path / "second" / "saved_model"), images),
        _serve(str(tmp_path / "first" / "saved_model"), images),
    )
