"""`python -m trainer` and `python -m trainer.predict` with every path on gs://, against a GCS
emulator on loopback, the way a user on GKE runs them."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import CLASSES, last_error_line, trainer_env
from trainer.synthetic import make_dataset

pytest_plugins = ["tests.gcs_emulator"]  # the emulator fixtures

SMALL = ["data.image_size=32", "data.batch_size=16", "train.epochs=2"]


def run_module(module: str, *args: str, cwd: Path, emulator_url: str):
    """`python -m module args...` as conftest runs it, with the emulator as GCS."""
    return conftest.run_module(
        module, *args, cwd=cwd, env=trainer_env(STORAGE_EMULATOR_HOST=emulator_url)
    )


@pytest.fixture(scope="module")
def gcs_run(emulator, tmp_path_factory):
    """One run with data, weights and output.dir on gs://; (bucket, output uri, data, result)."""
    root = tmp_path_factory.mktemp("gcs_run")
    make_dataset(str(root / "train"), CLASSES, 12, min_size=40, max_size=56, seed=1)
    make_dataset(str(root / "test"), CLASSES, 6, min_size=40, max_size=56, seed=2)
    import keras

    weights = root / "weights" / "backbone.weights.h5"
    weights.parent.mkdir()
    keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg", name="backbone"
    ).save_weights(str(weights))
    bucket = "e2e-data"
    emulator.client().create_bucket(bucket)
    for folder in ("train", "test", "weights"):
        emulator.upload_dir(root / folder, f"gs://{bucket}/hotdog/{folder}")
    out = f"gs://{bucket}/runs/first"
    result = run_module(
        "trainer",
        f"data.train_dir=gs://{bucket}/hotdog/train",
        f"data.test_dir=gs://{bucket}/hotdog/test",
        f"model.weights=gs://{bucket}/hotdog/weights/backbone.weights.h5",
        f"output.dir={out}",
        f"storage.cache_dir={root / 'cache'}",
        "storage.sync_seconds=1",
        *SMALL,
        cwd=root,
        emulator_url=emulator.url,
    )
    return bucket, out, root, result


def _download_model(emulator, bucket: str, out: str, local: Path) -> Path:
    """The published saved_model/ of `out`, copied to `local` with the client (not the trainer)."""
    prefix = out[len(f"gs://{bucket}/") :]
    for name in emulator.names(out):
        if name.startswith("saved_model/"):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            emulator.client().bucket(bucket).blob(f"{prefix}/{name}").download_to_filename(
                local / name
            )
    return local / "saved_model"


def test_run_with_everything_on_gcs_publishes_a_servable_model(emulator, gcs_run, tmp_path):
    bucket, out, root, result = gcs_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "staging gs://e2e-data/hotdog/train: 24 objects" in result.stdout + result.stderr
    names = emulator.names(out)
    for expected in ("_SUCCESS", "labels.txt", "metrics.json", "config.yaml"):
        assert expected in names
    assert "saved_model/saved_model.pb" in names
    assert any(n.startswith("tensorboard/") and ".tfevents." in n for n in names)
    blobs = list(emulator.client().list_blobs(bucket, prefix="runs/first/"))
    success = next(b for b in blobs if b.name.endswith("/_SUCCESS"))
    assert all(b.generation < success.generation for b in blobs if b is not success)

    import tensorflow as tf

    saved_model = _download_model(emulator, bucket, out, tmp_path / "model")
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    jpeg = next((root / "test" / "cat").glob("*.jpg")).read_bytes()
    answer = serve(image_bytes=tf.constant([jpeg, jpeg]))
    assert answer["probabilities"].shape == (2, 2)
    assert {n.decode() for n in answer["class_name"].numpy()} <= set(CLASSES)


def test_predict_classifies_with_a_model_on_gcs(emulator, gcs_run, tmp_path):
    """predict on gs:// answers what the published model answers, image by image."""
    bucket, out, root, result = gcs_run
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted((root / "test").glob("*/*.jpg"))
    predicted = run_module(
        "trainer.predict",
        f"{out}/saved_model",
        *map(str, images),
        cwd=tmp_path,
        emulator_url=emulator.url,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    lines = [line.split("\t") for line in predicted.stdout.splitlines()]
    assert [path for path, _, _ in lines] == list(map(str, images))

    import tensorflow as tf

    saved_model = _download_model(emulator, bucket, out, tmp_path / "model")
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    probabilities = serve(image_bytes=tf.constant([p.read_bytes() for p in images]))
    for (_, name, p), row in zip(lines, probabilities["probabilities"].numpy(), strict=True):
        assert name == CLASSES[row.argmax()] and float(p) == pytest.approx(row.max(), abs=1e-4)


def test_a_second_run_into_a_published_output_dir_exits_2_and_changes_nothing(
    emulator, gcs_run, tmp_path
):
    bucket, out, root, _ = gcs_run
    before = {b.name: b.generation for b in emulator.client().list_blobs(bucket, prefix="runs/")}
    result = run_module(
        "trainer",
        f"data.train_dir=gs://{bucket}/hotdog/train",
        f"output.dir={out}",
        f"storage.cache_dir={tmp_path / 'cache'}",
        *SMALL,
        cwd=tmp_path,
        emulator_url=emulator.url,
    )
    assert result.returncode == 2
    assert last_error_line(result).startswith(f"trainer: error: output.dir={out}: holds")
    after = {b.name: b.generation for b in emulator.client().list_blobs(bucket, prefix="runs/")}
    assert after == before


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "data.train_dir=gs://no-such-bucket-e2e/train",
            "bucket gs://no-such-bucket-e2e not found",
        ),
        ("data.train_dir=gs://e2e-data/no/such/prefix", "no objects (.jpg, .jpeg"),
        ("output.dir=gs://no-such-bucket-e2e/run", "bucket gs://no-such-bucket-e2e not found"),
    ],
)
def test_missing_bucket_or_prefix_exits_2_naming_the_uri(
    emulator, gcs_run, tmp_path, override, says
):
    key, uri = override.split("=", 1)
    defaults = {
        "data.train_dir": "gs://e2e-data/hotdog/train",
        "output.dir": str(tmp_path / "out"),
    }
    defaults[key] = uri
    result = run_module(
        "trainer",
        *(f"{k}={v}" for k, v in defaults.items()),
        f"storage.cache_dir={tmp_path / 'cache'}",
        *SMALL,
        cwd=tmp_path,
        emulator_url=emulator.url,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    line = last_error_line(result)
    assert line.startswith(f"trainer: error: {key}={uri}: ") and says in line


@pytest.mark.slow  # two trainer processes on the emulator; local resume is in the default run
def test_preempted_run_on_gcs_resumes_on_a_fresh_pod_and_publishes(emulator, gcs_run, tmp_path):
    """SIGTERM: the backup reaches gs://; the retry, with an empty cache (a new pod), fetches
    it, resumes at its epoch and publishes; the backup is then gone from the bucket."""
    bucket, _, root, _ = gcs_run
    out, epochs = f"gs://{bucket}/runs/preempted", 150  # the head's epochs take milliseconds
    args = [
        f"data.train_dir=gs://{bucket}/hotdog/train",
        f"data.test_dir=gs://{bucket}/hotdog/test",
        "model.weights=null",
        f"output.dir={out}",
        f"train.epochs={epochs}",
        *SMALL[:2],
    ]
    env = trainer_env(STORAGE_EMULATOR_HOST=emulator.url)
    first = tmp_path / "pod1"
    first.mkdir()
    process = conftest.start_trainer(*args, f"storage.cache_dir={first}/cache", cwd=first, env=env)
    with conftest.stopped_on_exit(process):
        conftest.Lines(process).wait_for(f"epoch 2/{epochs}", timeout=300)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    assert process.returncode == 143, (first / "stderr.txt").read_text()[-2000:]
    names = emulator.names(out)
    assert "backup/head/training_metadata.json" in names and "_SUCCESS" not in names
    metadata = json.loads(
        emulator.client()
        .bucket(bucket)
        .blob("runs/preempted/backup/head/training_metadata.json")
        .download_as_bytes()
    )

    second = run_module(
        "trainer",
        *args,
        f"storage.cache_dir={tmp_path}/pod2",
        cwd=tmp_path,
        emulator_url=emulator.url,
    )

    assert second.returncode == 0, second.stderr[-2000:]
    assert f"at epoch {metadata['epoch'] + 1}" in second.stdout
    assert "epoch 1/" not in second.stdout and f"epoch {epochs}/{epochs}" in second.stdout
    names = emulator.names(out)
    assert "_SUCCESS" in names and not [n for n in names if n.startswith("backup/")]


def test_below_min_accuracy_on_gcs_uploads_metrics_and_events_and_stages_in_trainer_cache_dir(
    emulator, gcs_run, tmp_path
):
    """Exit 3 still uploads metrics and TensorBoard events, never a model or _SUCCESS; without
    storage.cache_dir the inputs are staged under $TRAINER_CACHE_DIR."""
    bucket, _, root, _ = gcs_run
    same = tmp_path / "same"  # one picture set in both classes: accuracy stays near chance
    make_dataset(str(same), CLASSES[:1], 4, min_size=40, max_size=56, seed=5)
    shutil.copytree(same / CLASSES[0], same / CLASSES[1])
    (same / "README.txt").write_text("not an image")
    emulator.upload_dir(same, f"gs://{bucket}/same")
    out, cache = f"gs://{bucket}/runs/below", tmp_path / "env-cache"
    result = conftest.run_module(
        "trainer",
        f"data.train_dir=gs://{bucket}/same",
        f"data.test_dir=gs://{bucket}/same",
        "model.weights=null",
        f"output.dir={out}",
        "train.min_accuracy=0.9",
        *SMALL,
        cwd=tmp_path,
        env=trainer_env(STORAGE_EMULATOR_HOST=emulator.url, TRAINER_CACHE_DIR=str(cache)),
    )
    assert result.returncode == 3, result.stderr[-2000:]
    names = emulator.names(out)
    assert "metrics.json" in names and any(".tfevents." in n for n in names)
    assert "_SUCCESS" not in names and not any(n.startswith("saved_model") for n in names)
    staged = cache / "inputs" / bucket / "same"
    assert sorted(p.name for p in staged.iterdir()) == CLASSES  # README.txt not fetched
