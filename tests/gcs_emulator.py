"""Fixtures around the GCS emulator and fault proxy of scripts/gcs_emulator.py. A test module
gets the fixtures `emulator`, `spare_emulator`, `proxy` and `gcs_bucket` with

    pytest_plugins = ["tests.gcs_emulator"]
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from scripts.gcs_emulator import Emulator, FaultProxy


@pytest.fixture(scope="session")
def emulator():
    """One emulator for the session; STORAGE_EMULATOR_HOST points at it while it runs."""
    server = _started()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
    Path(f"{server.root}.log").unlink(missing_ok=True)
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


def _started(attempts: int = 3) -> Emulator:
    """An emulator on a free port. Another program on the machine (another clone's tests) may
    take the port between our choosing it and the server binding it: then a fresh port."""
    for attempt in range(attempts):
        server = Emulator()
        try:
            return server.start()
        except RuntimeError:
            shutil.rmtree(server.root, ignore_errors=True)
            Path(f"{server.root}.log").unlink(missing_ok=True)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def spare_emulator(tmp_path):
    """An emulator of the test's own, free to be stopped and started again."""
    server = Emulator(str(tmp_path / "gcs"))
    yield server
    server.stop()


@pytest.fixture
def proxy(emulator, monkeypatch):
    """A fault-injecting proxy in front of the emulator; the code under test talks to it."""
    server = FaultProxy(emulator.port)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    yield server
    server.close()


@pytest.fixture
def gcs_bucket(emulator) -> str:
    """A new, empty bucket for one test; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    emulator.client().create_bucket(name)
    return name
