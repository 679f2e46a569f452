"""Download the d2l hotdog dataset, check its SHA-1 and unpack it to data/hotdog.

    python scripts/fetch_hotdog.py                    # downloads (needs internet), -> data/hotdog
    python scripts/fetch_hotdog.py --zip hotdog.zip   # use a zip you copied in (offline machines)

Result: data/hotdog/{train,test}/{hotdog,not-hotdog}/*.png (2,000 train, 800 test images),
which conf/data/hotdog.yaml points at.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import urllib.request
import zipfile

URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"


class FetchError(Exception):
    """Download, checksum or archive problem; the message names the file."""


def file_digest(path, algorithm: str = "sha1") -> str:
    """The hex digest of a file's bytes (`algorithm`: a hashlib name), read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, path: str) -> None:
    """Fetch `url` to `path` via a .partial file, so an interrupted download never looks done."""
    partial = path + ".partial"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as error:
        raise FetchError(
            f"{url}: download failed ({error}); copy hotdog.zip here and pass --zip"
        ) from error
    os.replace(partial, path)


def unpack(zip_path: str, expected_sha1: str, out_dir: str) -> str:
    """Check the zip's SHA-1, then extract it under `out_dir`; return the dataset folder."""
    actual = file_digest(zip_path)
    if actual != expected_sha1:
        raise FetchError(f"{zip_path}: SHA-1 {actual} does not match {expected_sha1}")
    root = os.path.realpath(out_dir)
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():  # refuse entries that would land outside out_dir
            target = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, target]) != root:
                raise FetchError(f"{zip_path}: unsafe path in archive: {name}")
        archive.extractall(root)
    dataset = os.path.join(out_dir, "hotdog")
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(dataset, split)):
            raise FetchError(f"{zip_path}: no hotdog/{split}/ folder in the archive")
    return dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="folder to unpack into (default: data)")
    parser.add_argument("--zip", help="use this hotdog.zip instead of downloading")
    args = parser.parse_args(argv)
    try:
        zip_path = args.zip
        if zip_path is None:
            os.makedirs(args.out, exist_ok=True)
            zip_path = os.path.join(args.out, "hotdog.zip")
            if not os.path.exists(zip_path):
                print(f"downloading {URL}")
                download(URL, zip_path)
        dataset = unpack(zip_path, SHA1, args.out)
    except (FetchError, OSError, zipfile.BadZipFile) as error:
        print(f"fetch_hotdog: error: {error}", file=sys.stderr)
        return 2
    print(f"hotdog dataset ready in {dataset}/train and {dataset}/test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
