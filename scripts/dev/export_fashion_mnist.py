"""Fashion-MNIST as image folders, from Debian's dataset-fashion-mnist (a dev tool).

    apt-get install -y dataset-fashion-mnist                 # the idx files, ~30 MB
    python scripts/dev/export_fashion_mnist.py               # all 70,000 -> data/fashion-mnist
    python scripts/dev/export_fashion_mnist.py --out DIR --train-per-class 100 \
        --test-per-class 100 --classes sneaker,ankle_boot    # a seeded two-class subset

Writes OUT/train/<class>/<index>.png and OUT/test/<class>/<index>.png: Zalando's 28x28 grayscale
product photos as grayscale PNG (the trainer decodes them to 3 channels), named by their index
in the idx file, so a subset's files keep their names in a larger export. Class folders are the
10 classes below, or the ones --classes names. OUT/train and OUT/test must be absent or empty,
unless --overwrite.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts the idx files
CLASSES = (  # label 0..9, as folder names
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FILES = {"train": "train", "test": "t10k"}  # split -> idx file prefix
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


class ExportError(Exception):
    """Missing or malformed idx files, unknown classes, a non-empty output; says which."""


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """A gzipped idx file as a uint8 array: (n, 28, 28) images or (n,) labels."""
    if not path.exists():
        raise ExportError(f"{path}: not found (apt-get install -y dataset-fashion-mnist)")
    data = gzip.decompress(path.read_bytes())
    header = np.frombuffer(data, dtype=">i4", count=1)[0]
    if header != magic:
        raise ExportError(f"{path}: idx magic {header}, expected {magic}")
    dims = data[3]  # the magic's last byte: how many big-endian int32 sizes follow
    shape = np.frombuffer(data, dtype=">i4", count=dims, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `split` ("train": 60,000, "test": 10,000)."""
    prefix = FILES[split]
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", magic=IMAGES_MAGIC)
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", magic=LABELS_MAGIC)
    if len(images) != len(labels):
        raise ExportError(f"{source}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def parse_classes(text: str | None) -> list[str]:
    """--classes "sneaker,ankle_boot" -> those names, checked; None -> all 10."""
    if not text:
        return list(CLASSES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CLASSES]
    if unknown or len(set(names)) < 2:
        raise ExportError(f"--classes {text}: want at least 2 distinct of {', '.join(CLASSES)}")
    return names


def select(labels: np.ndarray, *, classes: list[str], per_class: int | None, seed: int) -> dict:
    """class name -> sorted indices: `per_class` of that class's images drawn without
    replacement with `seed` (all of them when None or more than there are)."""
    if per_class is not None and per_class < 1:
        raise ExportError(f"per-class count {per_class}: want at least 1")
    rng = np.random.default_rng(seed)
    chosen = {}
    for name in classes:
        rows = np.flatnonzero(labels == CLASSES.index(name))
        if per_class is not None and per_class < len(rows):
            rows = rng.choice(rows, size=per_class, replace=False)
        chosen[name] = np.sort(rows)
    return chosen


def prepare(folder: Path, *, overwrite: bool) -> None:
    """An empty `folder`: refuse to mix an earlier export into this one, unless `overwrite`."""
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ExportError(f"{folder}: not empty (pass --overwrite to replace it)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def write_pngs(images: np.ndarray, chosen: dict, *, folder: Path) -> int:
    """Each chosen image as folder/<class>/<index>.png (grayscale); return how many."""
    from PIL import Image

    for name, rows in chosen.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for row in rows:
            # uint8 (28, 28) becomes a mode "L" image: grayscale PNG
            Image.fromarray(images[row]).save(folder / name / f"{row:05d}.png")
    return sum(len(rows) for rows in chosen.values())


def export(
    *,
    out: Path,
    source: Path = SOURCE,
    classes: list[str] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the train and test folders under `out`; return the image count of each split."""
    classes = classes or list(CLASSES)
    counts = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load_split(source, split)
        chosen = select(labels, classes=classes, per_class=per_class, seed=seed)
        prepare(out / split, overwrite=overwrite)
        counts[split] = write_pngs(images, chosen, folder=out / split)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder of the idx .gz files")
    parser.add_argument("--classes", help=f"comma-separated, of: {','.join(CLASSES)}")
    parser.add_argument("--train-per-class", type=int, help="seeded subset (default: all 6,000)")
    parser.add_argument("--test-per-class", type=int, help="seeded subset (default: all 1,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/train and OUT/test")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        counts = export(
            out=args.out,
            source=args.source,
            classes=parse_classes(args.classes),
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except ExportError as error:
        print(f"export_fashion_mnist: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    print(f"{args.out}: {counts['train']} train, {counts['test']} test images in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
