"""Staging rate from a GCS emulator on loopback: one download worker against the default.

    python scripts/measure_staging.py [--images 2000] [--workers 1,16] [--latency-ms 10]

Starts fake-gcs-server on 127.0.0.1 (scripts/gcs_emulator.py, which the tests use too), uploads
N small synthetic JPEGs in two class folders, then stages the prefix with each worker count into
an empty cache, and once more into a full cache (nothing to download: the cost of listing and
checking CRC32Cs). It does so straight from the emulator, and again through a loopback proxy
that adds --latency-ms to each request, since a real bucket is a round trip away and loopback
hides what threads overlap. Prints one line per staging: objects, MB, seconds (listing
included), MB/s, objects/s.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.gcs_emulator import Emulator, FaultProxy  # noqa: E402
from trainer import gcs  # noqa: E402
from trainer.synthetic import make_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", default=f"1,{gcs.WORKERS}")
    parser.add_argument("--latency-ms", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="measure-staging-"))
    emulator = Emulator(str(work / "gcs")).start()
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        make_dataset(str(work / "images"), ["a", "b"], args.images // 2, min_size=48, max_size=64)
        files = sorted(p for p in (work / "images").rglob("*.jpg"))
        bucket = emulator.client().create_bucket("measure")
        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(
                lambda p: bucket.blob(
                    f"train/{p.relative_to(work / 'images').as_posix()}"
                ).upload_from_filename(str(p)),
                files,
            ):
                pass
        total = sum(p.stat().st_size for p in files)
        print(f"{len(files)} JPEGs, {total / 1e6:.2f} MB in gs://measure/train (emulator)")
        proxy = FaultProxy(emulator.port, delay=args.latency_ms / 1000)
        for where, url in (("loopback", emulator.url), (f"+{args.latency_ms:g} ms", proxy.url)):
            os.environ["STORAGE_EMULATOR_HOST"] = url
            for workers in [int(w) for w in args.workers.split(",")]:
                cache = work / f"cache-{where}-{workers}"
                for label in ("empty cache", "full cache"):
                    r = gcs.stage_prefix("gs://measure/train", str(cache), "data", workers=workers)
                    print(
                        f"{where:>9} workers={workers:>2} {label}: {r.downloaded} objects, "
                        f"{r.bytes / 1e6:.2f} MB in {r.seconds:.2f} s = "
                        f"{r.mb_per_second:.2f} MB/s, {r.objects_per_second:.0f} objects/s"
                        f" (skipped {r.skipped})"
                    )
        proxy.close()
    finally:
        emulator.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
