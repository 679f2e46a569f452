"""Prove the speed: the trainer against the physical floor and the recipes users would copy.

    python scripts/benchmark.py [--train-images N] [--test-images M] [--image-size S]
                                [--epochs E] [--sweep P] [--skip ROW,...] [--json PATH]
                                [--png PATH] [--data DIR --weights PATH]

Defaults are the hotdog shape: 2,000 train and 800 test images, 224 px, 10 epochs. One run
(without --data) generates a two-class JPEG dataset (300-500 px photos, so decoding costs what
it costs) and measures, one after the other on the same data, each in its own child process (so
imports and peak RSS are comparable):

  floor        Keras' ResNet50 forward pass alone over the N+M images, already decoded and
               resized in memory, at its best batch size (the issue's floor: the targets use it);
               the same child then times the pass with each BatchNorm folded into its conv
               (trainer/fold.py), the backbone the trainer runs: `floor_folded_s`, the compute no
               trainer run can go below, so trainer_s / floor_folded_s is the trainer's overhead
  trainer      `python -m trainer` end to end, process start to exit (after _SUCCESS)
  keras_guide  Keras' transfer-learning guide: image_dataset_from_directory, cache, augmentation,
               the frozen base called every epoch, pooled head
  seed_recipe  the tutorial this project started from: ImageDataGenerator(rescale=1/255),
               ResNet50 include_top=True, Flatten, Dense(2) (it stays at chance: its own bug;
               Dense(classes) with --data)
  sweep        with --sweep P: one `python -m trainer -m` process running a P-point grid
               (learning rate x dropout) on the same data; its points share one feature cache,
               so the backbone runs once for the whole sweep

--skip leaves rows out (floor, keras_guide, seed_recipe; the trainer always runs). The trainer
row starts from an empty feature cache, so it measures a first run (a miss and the store).

By default every model starts from random weights (no internet here); the compute is the same
as with ImageNet weights. Figures are also ratios to the trainer's time, which hold on a noisy
machine.

--data DIR --weights PATH (together) measure accuracy with real weights on real images: DIR's
train/<class>/* and test/<class>/* folders instead of generated data (--train-images and
--test-images are then not read), and every row loads PATH, Keras' notop ResNet50 .h5 (the
ImageNet one: scripts/dev/fetch_imagenet_weights.py writes it to ~/.cache/trainer-dev) or a
Keras 3 *.weights.h5: the trainer as `model.weights=PATH`, the guide into its base. The class
count comes from the folders; the seed recipe gets a Dense head of that many outputs and keeps
its rescale=1/255 (its bug, the baseline), and its include_top=True model takes the notop
weights layer by layer by name and its 1000-way top from resnet50_fc1000.npz beside PATH (the
fetch script writes it; without one the top stays random, and the figures say so). Each row
reports the classes it trained on and a digest of its conv1 kernel once loaded (the trainer's
is taken as it loads the file, scripts/bench/probe.py, as it folds BatchNorm into its convs
afterwards): equal digests, the same weights. The floor row is skipped in this mode: it reads
only generated JPEGs, and its time does not depend on the weights.

The hidden subcommand `benchmark.py _recipe NAME ...` is what runs inside each child;
`benchmark.py _report FIGURES.json [PNG]` prints a past run's table again. The trainer's phase
times come from the `timings` of the metrics.json it publishes. The code is the package
scripts/bench/: harness.py (run and measure), report.py (table, notes, chart), recipes.py,
probe.py (the trainer, noting the weights it loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.bench import CLASSES, SKIPPABLE  # noqa: E402
from scripts.bench.harness import benchmark, class_folders  # noqa: E402
from scripts.bench.recipes import run_recipe  # noqa: E402
from scripts.bench.report import draw_chart, markdown_table, notes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_recipe":
        return run_recipe(argv[1:])
    if argv and argv[0] == "_report":  # re-render a --json file: _report FIGURES.json [PNG]
        with open(argv[1], encoding="utf-8") as f:
            figures = json.load(f)
        print(markdown_table(figures), notes(figures), sep="\n\n")
        if len(argv) > 2:
            draw_chart(figures, argv[2])
        return 0
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="benchmark-")
    os.makedirs(work, exist_ok=True)
    try:
        figures = benchmark(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(figures), notes(figures), sep="\n\n")
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else "benchmark.png")
    draw_chart(figures, png)
    print(f"\nchart: {png}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
        print(f"figures: {args.json}")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; a bad value exits 2 with argparse's one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train-images", type=int, default=2000, help="N, split over 2 classes (not with --data)"
    )
    parser.add_argument(
        "--test-images", type=int, default=800, help="M, split over 2 classes (not with --data)"
    )
    parser.add_argument("--image-size", type=int, default=224, help="S: square input, pixels")
    parser.add_argument("--epochs", type=int, default=10, help="E: the same for every recipe")
    parser.add_argument(
        "--sweep", type=int, default=0, help="P: add a row, a P-point -m sweep (default: none)"
    )
    parser.add_argument(
        "--skip", default="", help=f"leave out these rows, comma-separated ({', '.join(SKIPPABLE)})"
    )
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--png", help="bar chart (default: beside --json, else benchmark.png)")
    parser.add_argument("--work-dir", help="keep the dataset, logs and outputs here")
    parser.add_argument(
        "--data", help="DIR with train/<class>/ and test/<class>/ images, instead of generated"
    )
    parser.add_argument("--weights", help="notop ResNet50 .h5 every row loads (with --data)")
    args = parser.parse_args(argv)
    check_real_data(parser, args)
    for name in ("train_images", "test_images"):
        if getattr(args, name) < len(CLASSES):
            parser.error(f"--{name.replace('_', '-')} must be at least {len(CLASSES)}")
    if args.image_size < 32:
        parser.error(f"--image-size ({args.image_size}) must be at least 32 (ResNet50's minimum)")
    if args.epochs < 1:
        parser.error(f"--epochs ({args.epochs}) must be at least 1")
    if args.sweep < 0 or args.sweep == 1:
        parser.error(f"--sweep ({args.sweep}) must be 0 (no sweep) or at least 2 points")
    args.skip = [row for row in args.skip.split(",") if row]
    for row in args.skip:
        if row not in SKIPPABLE:
            parser.error(f"--skip {row}: no such row (rows: {', '.join(SKIPPABLE)})")
    if args.data and "floor" not in args.skip:  # see the module docstring
        args.skip.append("floor")
    return args


def check_real_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--data and --weights come together, name what exists, and are made absolute (the rows
    run in the work folder)."""
    if bool(args.data) != bool(args.weights):
        parser.error("--data and --weights go together (real images, real weights)")
    if not args.data:
        return
    args.data = os.path.abspath(os.path.expanduser(args.data))
    args.weights = os.path.abspath(os.path.expanduser(args.weights))
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(args.data, split)):
            parser.error(f"--data {args.data}: no {split}/ folder (train/<class>/, test/<class>/)")
    train, test = (class_folders(os.path.join(args.data, split)) for split in ("train", "test"))
    if train != test:
        parser.error(f"--data {args.data}: train/ has classes {train}, test/ {test}")
    if not os.path.isfile(args.weights) or not args.weights.endswith((".h5", ".hdf5")):
        parser.error(f"--weights {args.weights}: no such .h5 file")


if __name__ == "__main__":
    sys.exit(main())
