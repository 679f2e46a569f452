"""The launcher's side of the Kubernetes API: connect, create an Indexed Job, wait for it, read
what became of each index, delete. Everything goes through the official `kubernetes` client.

What a user needs in the namespace is the Role in docs/kubernetes-launcher.md (create, get,
list, watch, delete Jobs; get and list pods; get pods/log; get serviceaccounts). Errors a user
can fix (no kubeconfig, an unreachable cluster, a refusal by RBAC) become one LauncherError line;
the launcher prints it and exits 2.
"""

import logging
import time
from dataclasses import dataclass

from trainer import ExitCode

log = logging.getLogger(__name__)

INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # a pod's index (label and annotation)
JOB_NAME_KEY = "batch.kubernetes.io/job-name"
LOG_LINES = 20  # of a failed point's last pod, shown and carried in its JobReturn
CONNECT_TIMEOUT_S = 15


class LauncherError(Exception):
    """A problem the user can fix before or while launching; one line."""

    exit_code = ExitCode.USER_ERROR


@dataclass
class IndexOutcome:
    """What became of one index of a finished Job."""

    succeeded: bool
    exit_code: int | None = None  # of its last pod; None when no pod ever ran
    pod: str | None = None  # its last pod
    # its last container's termination reason (OOMKilled, Error), or, when no pod ran, the
    # Job's (the deadline)
    reason: str = ""
    seconds: float | None = None  # the run time of all its pods (a preempted one's too)
    pods: int = 0


def _say(error: Exception) -> str:
    """An API error in one line: status and the server's message, not the whole response."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        import json

        try:
            message = json.loads(error.body or "{}").get("message", "")
        except ValueError:
            message = ""
        return f"{error.status} {error.reason}: {message}".rstrip(": ")
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class Cluster:
    """One namespace of the cluster the kubeconfig points at."""

    def __init__(self, namespace: str | None):
        try:
            from kubernetes import client, config
        except ImportError as error:
            raise LauncherError(
                "hydra/launcher=kubernetes needs the kubernetes client: "
                "pip install 'trainer[kubernetes]'"
            ) from error
        try:
            config.load_kube_config()
            _, context = config.list_kube_config_contexts()
        except (config.ConfigException, OSError, TypeError) as error:
            raise LauncherError(
                f"no usable kubeconfig ({str(error).splitlines()[0]}): set KUBECONFIG or run "
                "`gcloud container clusters get-credentials CLUSTER`"
            ) from error
        self.namespace = namespace or context.get("context", {}).get("namespace") or "default"
        self.server = client.Configuration.get_default_copy().host
        self.batch = client.BatchV1Api()
        self.core = client.CoreV1Api()

    def check_access(self, service_account: str) -> None:
        """Fail fast when the cluster is unreachable, RBAC refuses us, or the pods' service
        account is missing (the Job controller would then retry creating pods forever)."""
        from kubernetes.client.exceptions import ApiException

        where = f"namespace {self.namespace} on {self.server}"
        try:
            self.batch.list_namespaced_job(
                self.namespace, limit=1, _request_timeout=CONNECT_TIMEOUT_S
            )
        except ApiException as error:
            if error.status in (401, 403):
                raise LauncherError(
                    f"the cluster refused to list Jobs in {where} ({_say(error)}): "
                    "ask for the Role in docs/kubernetes-launcher.md"
                ) from error
            raise LauncherError(f"cannot list Jobs in {where}: {_say(error)}") from error
        except Exception as error:  # urllib3's connection errors, timeouts, TLS
            raise LauncherError(
                f"cannot reach the cluster at {self.server}: {_say(error)}"
            ) from error
        try:
            self.core.read_namespaced_service_account(
                service_account, self.namespace, _request_timeout=CONNECT_TIMEOUT_S
            )
        except ApiException as error:
            if error.status == 404:
                raise LauncherError(
                    f"hydra.launcher.service_account={service_account}: no such service account "
                    f"in namespace {self.namespace}: any scripts/submit.py run creates it, or "
                    "pass hydra.launcher.gsa=GSA_EMAIL once to have the launcher create it"
                ) from error
            if error.status != 403:  # 403: not ours to read; the pods will tell
                raise LauncherError(f"cannot read service accounts: {_say(error)}") from error

    def ensure_service_account(self, manifest: dict) -> None:
        """Create the pods' service account (Workload Identity annotation included) if missing."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespaced_service_account(self.namespace, manifest)
            log.info("created service account %s", manifest["metadata"]["name"])
        except ApiException as error:
            if error.status != 409:  # 409: it exists already, which is what we want
                raise LauncherError(f"cannot create the service account: {_say(error)}") from error

    def create_job(self, manifest: dict) -> str:
        """Create the Job; return its name."""
        from kubernetes.client.exceptions import ApiException

        try:
            # Strict: a field the server does not know is an error, not silently dropped
            self.batch.create_namespaced_job(self.namespace, manifest, field_validation="Strict")
        except ApiException as error:
            raise LauncherError(
                f"cannot create Job {manifest['metadata']['name']} in namespace "
                f"{self.namespace}: {_say(error)}"
            ) from error
        return manifest["metadata"]["name"]

    def delete_job(self, name: str) -> None:
        """Delete the Job and, in the background, its pods; a Job already gone is fine."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(
                name,
                self.namespace,
                body=client.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=CONNECT_TIMEOUT_S,
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def wait(self, name: str, *, poll_seconds: float, progress) -> object:
        """Watch the Job until it is Complete or Failed; return its last state. A watch that
        expires, breaks or is refused (410 Gone) is re-opened from a fresh read, so a laptop
        that sleeps or changes networks loses nothing. `progress(job)` sees every change."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        outage, said = None, set()
        while True:
            try:
                job = self.batch.read_namespaced_job(
                    name, self.namespace, _request_timeout=CONNECT_TIMEOUT_S
                )
                if outage is not None:
                    log.info("cluster reachable again after %.0f s", time.monotonic() - outage)
                    outage = None
                progress(job)
                if finished(job):
                    return job
                stream = watch.Watch().stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    field_selector=f"metadata.name={name}",
                    resource_version=job.metadata.resource_version,
                    timeout_seconds=max(1, int(poll_seconds)),
                    _request_timeout=poll_seconds + CONNECT_TIMEOUT_S,
                )
                for event in stream:
                    if event["type"] == "DELETED":
                        raise LauncherError(f"Job {name} was deleted while the sweep waited for it")
                    progress(event["object"])
                    if finished(event["object"]):
                        return event["object"]
                self._say_why_pods_wait(name, said)  # the watch expired: a moment to look
            except ApiException as error:
                if error.status == 404:
                    raise LauncherError(
                        f"Job {name} was deleted while the sweep waited for it"
                    ) from error
                if error.status in (401, 403):
                    raise LauncherError(
                        f"the cluster refused to read Job {name}: {_say(error)}"
                    ) from error
                outage = self._retry_later(error, outage, poll_seconds)  # 410 Gone, 5xx
            except LauncherError:
                raise
            except Exception as error:  # connection reset, timeout, the laptop slept
                outage = self._retry_later(error, outage, poll_seconds)

    def _say_why_pods_wait(self, name: str, said: set) -> None:
        """Once per pod and reason, why a pod of the Job is not running (an image that cannot be
        pulled, no node that fits it): the Job itself would wait in silence until its deadline."""
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.core.list_namespaced_pod(
                self.namespace,
                label_selector=f"{JOB_NAME_KEY}={name}",
                _request_timeout=CONNECT_TIMEOUT_S,
            ).items
        except ApiException:
            return  # the next watch tells us whether the cluster is still there
        for pod in pods:
            for why in _waiting_reasons(pod):
                if (pod.metadata.name, why) not in said:
                    said.add((pod.metadata.name, why))
                    log.warning("pod %s is not running: %s", pod.metadata.name, why)

    @staticmethod
    def _retry_later(error: Exception, outage: float | None, poll_seconds: float) -> float:
        if outage is None:
            log.warning("watch interrupted (%s); retrying every %.0f s", _say(error), poll_seconds)
            outage = time.monotonic()
        time.sleep(min(poll_seconds, 5))
        return outage

    def outcomes(self, job) -> dict[int, IndexOutcome]:
        """Index -> what became of it, from the finished Job and its pods."""
        completed = parse_indexes(job.status.completed_indexes)
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_NAME_KEY}={job.metadata.name}"
        ).items
        by_index: dict[int, list] = {}
        for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp):
            index = (pod.metadata.annotations or {}).get(INDEX_KEY)
            if index is not None:
                by_index.setdefault(int(index), []).append(pod)
        why = next(
            (f"{c.reason}: {c.message}" for c in job.status.conditions or [] if c.type == "Failed"),
            "",
        )
        results = {}
        for index in range(job.spec.completions):
            tries = by_index.get(index, [])
            last = _terminated(tries[-1]) if tries else None
            ran = [t.seconds for t in map(_terminated, tries) if t and t.seconds is not None]
            results[index] = IndexOutcome(
                succeeded=index in completed,
                exit_code=last.exit_code if last else None,
                pod=tries[-1].metadata.name if tries else None,
                reason=last.reason if last else why,
                seconds=sum(ran) if ran else None,
                pods=len(tries),
            )
        return results

    def log_tail(self, pod: str, container: str, lines: int = LOG_LINES) -> str:
        """The last `lines` lines a pod's container wrote (the pods/log API)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                container=container,
                tail_lines=lines,
                _request_timeout=CONNECT_TIMEOUT_S,
            )
        except (ApiException, OSError) as error:
            return f"(no log from pod {pod}: {_say(error)})"


def finished(job) -> bool:
    """True once the Job controller has marked the Job Complete or Failed (every pod is done)."""
    return any(
        c.type in ("Complete", "Failed") and c.status == "True"
        for c in (job.status.conditions or [])
    )


def parse_indexes(text: str | None) -> set[int]:
    """Kubernetes' compressed index list ("0,2-4") as a set."""
    indexes: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        first, _, last = part.partition("-")
        indexes.update(range(int(first), int(last or first) + 1))
    return indexes


def _waiting_reasons(pod) -> list[str]:
    """What keeps a pod from running, beyond the usual moments of starting."""
    reasons = [
        f"{c.reason}: {c.message}"
        for c in pod.status.conditions or []
        if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
    ]
    for status in pod.status.container_statuses or []:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason not in (None, "ContainerCreating"):
            reasons.append(f"{waiting.reason}: {waiting.message or ''}".rstrip(": "))
    return reasons


@dataclass
class Terminated:
    """A pod's (only) container as it ended."""

    exit_code: int
    reason: str  # the kubelet's: Completed, Error, OOMKilled, ...
    seconds: float | None


def _terminated(pod) -> Terminated | None:
    """How a pod's (only) container ended, if it did."""
    if pod is None:
        return None
    for status in pod.status.container_statuses or []:
        done = status.state.terminated if status.state else None
        if done is not None:
            seconds = None
            if done.started_at and done.finished_at:
                seconds = (done.finished_at - done.started_at).total_seconds()
            return Terminated(done.exit_code, done.reason or "", seconds)
    return None
