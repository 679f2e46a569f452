"""scripts/fetch_hotdog.py: the checksum and unpack steps, on a zip the test makes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import fetch_hotdog  # noqa: E402


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"png bytes")
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_unpack_checks_sha1_and_extracts_the_split_folders(tmp_path):
    archive = tmp_path / "hotdog.zip"
    sha1 = _zip(
        archive,
        [
            "hotdog/train/hotdog/1.png",
            "hotdog/train/not-hotdog/2.png",
            "hotdog/test/hotdog/3.png",
            "hotdog/test/not-hotdog/4.png",
        ],
    )
    dataset = fetch_hotdog.unpack(str(archive), sha1, str(tmp_path / "data"))
    assert dataset == str(tmp_path / "data" / "hotdog")
    assert (tmp_path / "data" / "hotdog" / "test" / "not-hotdog" / "4.png").exists()


def test_wrong_checksum_is_refused_before_extracting(tmp_path):
    archive = tmp_path / "hotdog.zip"
    _zip(archive, ["hotdog/train/a/1.png", "hotdog/test/a/1.png"])
    with pytest.raises(fetch_hotdog.FetchError, match="does not match"):
        fetch_hotdog.unpack(str(archive), "0" * 40, str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_archive_escaping_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    sha1 = _zip(archive, ["../outside.png", "hotdog/train/a/1.png"])
    with pytest.raises(fetch_hotdog.FetchError, match="unsafe path"):
        fetch_hotdog.unpack(str(archive), sha1, str(tmp_path / "data"))
    assert not (tmp_path / "outside.png").exists()


def test_command_line_with_a_local_zip_of_the_wrong_dataset_exits_2(tmp_path):
    archive = tmp_path / "hotdog.zip"
    _zip(archive, ["hotdog/train/a/1.png"])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fetch_hotdog.py"),
            "--zip",
            str(archive),
            "--out",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"fetch_hotdog: error: {archive}: SHA-1")
