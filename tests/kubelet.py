"""A kubelet (and scheduler) for a control plane that has neither, for tests/test_launcher.py.

`Kubelet` registers a Node, binds each pending pod of its namespace to it (pods/binding), runs the
pod's container as a local process (the image's entrypoint, the pod's args and environment, its
volumes mapped to folders under `root`), then writes the pod's terminal status (phase and the
container's exit code), as a real kubelet would; the real Job controller does the rest. It also
serves the pods' logs to the API server (GET /containerLogs/..., the kubelet's own API), so the
pods/log API works. `preempt` names completion indexes whose first pod is preempted: marked
Failed with a DisruptionTarget condition and exit code 143, as GKE does to a Spot VM's pods.
`oom` names indexes whose every pod is OOM-killed: terminated with reason OOMKilled, exit 137.
Both report SIMULATED_RUN_S of running (startedAt that long before finishedAt) without a process.
"""

from __future__ import annotations

import datetime
import http.server
import os
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
SIMULATED_RUN_S = 5  # how long a preempted or OOM-killed pod says it ran


@dataclass
class _Running:
    process: subprocess.Popen
    log: Path
    started: str
    container: str
    image: str


@dataclass
class Kubelet:
    """Plays the kubelet for pods in `namespace`; `entrypoints` maps an image to its command."""

    api: object  # a kubernetes.client.ApiClient
    namespace: str
    root: Path
    entrypoints: dict[str, list[str]]
    env: dict[str, str]  # the node's environment (PYTHONPATH, STORAGE_EMULATOR_HOST, ...)
    preempt: set[int] = field(default_factory=set)
    oom: set[int] = field(default_factory=set)
    started_pods: list[str] = field(default_factory=list)
    preempted_pods: list[str] = field(default_factory=list)
    oom_killed_pods: list[str] = field(default_factory=list)

    def __post_init__(self):
        from kubernetes import client

        self.core = client.CoreV1Api(self.api)
        self.node = f"kubelet-{self.namespace}"
        self.running: dict[str, _Running] = {}
        self.logs: dict[str, Path] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> Kubelet:
        self._serve_logs()
        self.core.create_node(
            {
                "metadata": {"name": self.node},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for running in self.running.values():
            _kill(running.process)
        self.running.clear()
        self.server.shutdown()
        self.server.server_close()
        try:
            self.core.delete_node(self.node)
        except Exception:
            pass
        for error in self.errors:  # shown with a failing test's output
            print(f"test kubelet: {error!r}")

    # -- the pods -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as error:  # recorded for the test; a transient API error is retried
                self.errors.append(error)
            self._stop.wait(0.3)

    def _sync(self) -> None:
        for pod in self.core.list_namespaced_pod(self.namespace).items:
            name = pod.metadata.name
            if pod.metadata.deletion_timestamp is not None:
                self._remove(pod)
            elif pod.spec.node_name is None and pod.status.phase == "Pending":
                self._start(pod)
            elif name in self.running and self.running[name].process.poll() is not None:
                self._finish(pod, self.running.pop(name))

    def _start(self, pod) -> None:
        name = pod.metadata.name
        self.core.create_namespaced_pod_binding(
            name,
            self.namespace,
            {"metadata": {"name": name}, "target": {"kind": "Node", "name": self.node}},
            _preload_content=False,  # the client cannot parse the empty Status it gets back
        )
        index = int(pod.metadata.annotations.get(INDEX_KEY, -1))
        container = pod.spec.containers[0]
        folder = self.root / name
        if index in self.preempt:
            self.preempt.discard(index)
            self.preempted_pods.append(name)
            self._set_status(pod, container, 143, _now(-SIMULATED_RUN_S), preempted=True)
            return
        if index in self.oom:
            self.oom_killed_pods.append(name)
            folder.mkdir(parents=True, exist_ok=True)
            self.logs[name] = folder / "log"
            self.logs[name].write_text("Epoch 1/1 (the test kubelet OOM-kills this pod)\n")
            self._set_status(pod, container, 137, _now(-SIMULATED_RUN_S), reason="OOMKilled")
            return
        volumes = {m.mount_path: folder / m.name for m in container.volume_mounts or []}
        for local in volumes.values():
            local.mkdir(parents=True, exist_ok=True)
        command = (container.command or self.entrypoints[container.image]) + [
            _mapped(a, volumes) for a in container.args or []
        ]
        env = dict(self.env)
        for var in container.env or []:
            env[var.name] = _mapped(_env_value(var, pod), volumes)
        log = folder / "log"
        self.logs[name] = log
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                cwd=_mapped(container.working_dir or str(folder), volumes),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = _now()
        self.running[name] = _Running(process, log, started, container.name, container.image)
        self.started_pods.append(name)
        self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {
                "status": {
                    "phase": "Running",
                    "startTime": started,
                    "containerStatuses": [
                        _container_status(
                            container.name, container.image, {"running": {"startedAt": started}}
                        )
                    ],
                }
            },
        )

    def _finish(self, pod, running: _Running) -> None:
        container = pod.spec.containers[0]
        self._set_status(pod, container, running.process.returncode, running.started)

    def _set_status(
        self, pod, container, code: int, started: str, preempted=False, reason=None
    ) -> None:
        now = _now()
        terminated = {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error")}
        terminated |= {"startedAt": started, "finishedAt": now}
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "startTime": started,
            "containerStatuses": [
                _container_status(container.name, container.image, {"terminated": terminated})
            ],
        }
        if preempted:
            status["conditions"] = [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "message": "the node was preempted (simulated)",
                    "lastTransitionTime": now,
                }
            ]
        self.core.patch_namespaced_pod_status(pod.metadata.name, self.namespace, {"status": status})

    def _remove(self, pod) -> None:
        """A deleted pod: stop its process, then let it go (what a kubelet confirms)."""
        running = self.running.pop(pod.metadata.name, None)
        if running is not None:
            _kill(running.process)
        if pod.spec.node_name is not None:
            try:
                self.core.delete_namespaced_pod(
                    pod.metadata.name, self.namespace, grace_period_seconds=0
                )
            except Exception:  # already gone
                pass

    # -- the kubelet's log endpoint -----------------------------------------------------------

    def _serve_logs(self) -> None:
        kubelet = self
        certs = self.root / "kubelet-pki"
        certs.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
            + ["-subj", "/CN=127.0.0.1", "-keyout", str(certs / "key.pem")]
            + ["-out", str(certs / "cert.pem")],
            check=True,
            capture_output=True,
        )

        class Logs(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # /containerLogs/NAMESPACE/POD/CONTAINER?tailLines=N
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                log = kubelet.logs.get(parts[2]) if parts[0] == "containerLogs" else None
                if log is None or not log.exists():
                    self.send_error(404)
                    return
                lines = log.read_bytes().splitlines(keepends=True)
                tail = parse_qs(url.query).get("tailLines")
                body = b"".join(lines[-int(tail[0]) :] if tail else lines)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Logs)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / "cert.pem", certs / "key.pem")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.log_port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _now(offset_s: float = 0) -> str:
    now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_s)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_status(name: str, image: str, state: dict) -> dict:
    return {
        "name": name,
        "image": image,
        "imageID": "",
        "ready": "running" in state,
        "restartCount": 0,
        "state": state,
    }


def _mapped(value: str, volumes: dict[str, Path]) -> str:
    """A path inside the container as the folder that backs it here."""
    for mount, local in sorted(volumes.items(), key=lambda item: -len(item[0])):
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount) :]
        if "=" in value:  # a Hydra override: key=/scratch/...
            key, _, rest = value.partition("=")
            if rest == mount or rest.startswith(mount + "/"):
                return f"{key}={local}{rest[len(mount) :]}"
    return value


def _env_value(var, pod) -> str:
    """An env var's value; fieldRef resolved from the pod, as the kubelet does."""
    if var.value_from is None:
        return var.value or ""
    path = var.value_from.field_ref.field_path
    meta = pod.metadata
    simple = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "spec.nodeName": pod.spec.node_name or "",
        "spec.serviceAccountName": pod.spec.service_account_name or "",
        "status.podIP": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    for prefix, values in (
        ("metadata.annotations", meta.annotations),
        ("metadata.labels", meta.labels),
    ):
        if path.startswith(prefix + "['"):
            return (values or {}).get(path[len(prefix) + 2 : -2], "")
    raise ValueError(f"fieldRef {path}: not supported by the test kubelet")


def _kill(process: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL after a bounded wait."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
