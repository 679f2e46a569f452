"""Backbone-pass throughput (images/s): float32 vs mixed_bfloat16, 1 vs N simulated CPU devices.

    python scripts/measure_backbone.py [--images 96] [--image-size 224] [--batch 32] [--devices 2]
        [--rounds 2] [--xla]

All configurations run in one process, side by side, in alternating rounds (the best round
counts), so a busy machine slows them alike. What is timed is the fast path's backbone pass:
`feature_extractor(model).predict` over in-memory pixels (decoding excluded), random weights
(speed does not depend on them). `--batch` is the global batch, split across the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--xla", action="store_true", help="also float32 with jit_compile=True")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)

    from trainer.distribute import simulate_cpu_devices

    simulate_cpu_devices(args.devices)  # before TensorFlow starts; 1-device runs use CPU:0 alone

    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.model import build_model, feature_extractor

    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategies = {1: tf.distribute.OneDeviceStrategy(cpus[0])}
    strategies[args.devices] = tf.distribute.MirroredStrategy(cpus[: args.devices])
    pixels = np.random.default_rng(0).uniform(
        0, 255, (args.images, args.image_size, args.image_size, 3)
    )
    dataset = tf.data.Dataset.from_tensor_slices(pixels.astype("float32")).batch(args.batch)

    configs = [(p, n, False) for p in ("float32", "mixed_bfloat16") for n in strategies]
    if args.xla:
        configs.append(("float32", 1, True))
    extractors = {}
    for policy, devices, xla in configs:
        keras.mixed_precision.set_dtype_policy(policy)
        with strategies[devices].scope():
            model = build_model(2, args.image_size, None, 0.0)
            extractor = feature_extractor(model)
        extractor.jit_compile = xla
        extractor.predict(dataset.take(1), verbose=0)  # trace (and compile) outside the timing
        extractors[(policy, devices, xla)] = extractor
    keras.mixed_precision.set_dtype_policy("float32")

    best = dict.fromkeys(configs, 0.0)
    for _ in range(args.rounds):
        for config in configs:
            started = time.perf_counter()
            extractors[config].predict(dataset, verbose=0)
            rate = args.images / (time.perf_counter() - started)
            best[config] = max(best[config], rate)

    print(
        f"backbone pass, {args.images} images of {args.image_size} px, global batch {args.batch}, "
        f"best of {args.rounds} rounds, {os.cpu_count()} CPU cores"
    )
    print(f"{'precision':<16}{'devices':>8}{'xla':>6}{'images/s':>10}")
    for policy, devices, xla in configs:
        print(f"{policy:<16}{devices:>8}{str(xla):>6}{best[(policy, devices, xla)]:>10.1f}")
    speedup = best[("mixed_bfloat16", 1, False)] / best[("float32", 1, False)]
    print(f"mixed_bfloat16 / float32 on 1 device: {speedup:.2f}x")
    if args.json:
        rows = [
            {"precision": p, "devices": n, "xla": x, "images_per_s": round(best[(p, n, x)], 2)}
            for p, n, x in configs
        ]
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
