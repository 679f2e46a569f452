"""Generate a small image-folder dataset whose classes are clearly separable.

The built-in demo, the tests and the benchmark use it (nothing here can download data):

    python -m trainer.synthetic data/demo                  # data/demo/{train,test}/{class}/*.jpg
    python -m trainer.synthetic OUT --train 1000 --test 400 --min-size 300 --max-size 500

Each class has its own palette and shape (warm discs, cool squares, ...) over a noisy textured
background, so even a randomly initialised backbone separates them while the pictures still
vary in position, scale, brightness and size like photos do.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (foreground colour, shape) per class, in class order; more classes reuse them in new mixes.
PALETTES = [
    ((220, 60, 40), "disc"),
    ((40, 90, 220), "square"),
    ((60, 190, 70), "triangle"),
    ((230, 200, 40), "ring"),
]


def make_image(label: int, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """One picture of class `label`."""
    colour, shape = PALETTES[label % len(PALETTES)]
    base = np.asarray(colour, dtype=np.float32) * 0.35 + rng.uniform(60, 120)
    noise = rng.normal(0, 25, size=(height // 8 + 1, width // 8 + 1, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        r = int(min(width, height) * rng.uniform(0.15, 0.35))
        cx, cy = int(rng.uniform(r, width - r)), int(rng.uniform(r, height - r))
        shade = tuple(int(np.clip(c * rng.uniform(0.8, 1.15), 0, 255)) for c in colour)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "disc":
            draw.ellipse(box, fill=shade)
        elif shape == "square":
            draw.rectangle(box, fill=shade)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=shade)
        else:
            draw.ellipse(box, outline=shade, width=max(2, r // 4))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def make_dataset(
    root: str,
    classes: list[str],
    per_class: int,
    *,
    min_size: int = 48,
    max_size: int = 64,
    seed: int = 0,
    fmt: str = "JPEG",
) -> list[str]:
    """Write `per_class` images per class under root/<class>/; return the file paths."""
    rng = np.random.default_rng(seed)
    suffix = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif"}[fmt]
    paths = []
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            path = os.path.join(root, name, f"{name}_{i:05d}{suffix}")
            options = {"quality": 90} if fmt == "JPEG" else {}
            make_image(label, w, h, rng).save(path, fmt, **options)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to create: OUT/train/<class>/ and OUT/test/<class>/")
    parser.add_argument("--classes", default="hotdog,not-hotdog", help="comma-separated names")
    parser.add_argument("--train", type=int, default=150, help="training images per class")
    parser.add_argument("--test", type=int, default=50, help="test images per class")
    parser.add_argument("--min-size", type=int, default=56)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    n = 0
    for split, per_class, seed in (
        ("train", args.train, args.seed),
        ("test", args.test, args.seed + 1),
    ):
        n += len(
            make_dataset(
                os.path.join(args.out, split),
                classes,
                per_class,
                min_size=args.min_size,
                max_size=args.max_size,
                seed=seed,
            )
        )
    print(f"wrote {n} images of {len(classes)} classes to {args.out}/train and {args.out}/test")


if __name__ == "__main__":
    main()
