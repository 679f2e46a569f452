"""The trainer's Kubernetes manifests, rendered in code: the one source for pod resources, security
context, podFailurePolicy and the sweep-point variables.

`scripts/submit.py` is a command line over `manifests()`; a Hydra launcher can call the same
functions from an installed package (no template files to ship, no TensorFlow import). The
checked-in `k8s/tfjob.yaml` is `tfjob_example_text()` (`python -m trainer.kube > k8s/tfjob.yaml`;
tests/test_k8s.py fails when they differ).

Exit codes and the Job's podFailurePolicy (README's exit-code table has the same codes):
  2 (bad config or data), 3 (below train.min_accuracy), 5 (train.max_hours reached), 6 (the
    loss, features or predictions went NaN or inf): FailJob, or FailIndex in a sweep (that point
    fails alone); retrying cannot help.
  4 (a peer worker was lost, multi-worker only): Ignore. When one worker is preempted the
    survivors exit 4; without this rule each survivor would use up backoffLimit.
  DisruptionTarget (preemption, eviction; the trainer exits 143 with a backup): Ignore.
  Anything else (1: a crash, 137: out of memory) counts against backoffLimit (per index in a sweep).

The Job's deadline (activeDeadlineSeconds) bounds the whole Job, retries included. Without
`max_hours` it is DEFAULT_DEADLINE_S. With a per-point limit of H hours (the trainer stops itself
after H hours with exit 5), P points and parallelism N, the points run in ceil(P / N) waves and

    activeDeadlineSeconds = ceil(P / N) * (H * 3600 + POINT_MARGIN_S) + JOB_MARGIN_S

POINT_MARGIN_S covers what a point does outside its limit (scheduling, image pull, staging the
data, writing metrics after the stop); JOB_MARGIN_S is slack for the Job as a whole. Retries are
not budgeted: a point preempted late in the last wave can meet the deadline; submitting again with
the same --name and output.dir resumes it from its backup.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from trainer import ExitCode, TrainerError
from trainer.cluster import DEFAULT_PORT as PORT
from trainer.cluster import ENV_INDEX, ENV_JOB_NAME, ENV_PORT, ENV_SERVICE, ENV_WORKERS

CONTAINER = "trainer"  # the container name podFailurePolicy's exit-code rules refer to
SWEEP_ENV = "TRAINER_SWEEP"  # JSON list of every point's overrides
PLACEHOLDER_IMAGE = "ghcr.io/example/trainer:0.1.0"
PLACEHOLDER_GSA = "trainer@PROJECT.iam.gserviceaccount.com"
SERVICE_ACCOUNT = "trainer"


def check_image(image: str, *, flag: str, usage: str | None = None) -> None:
    """Refuse the placeholder image (TrainerError naming `flag`, where the user passes the
    image, and `usage`, how to pass one): a pod that pulls it never starts.
    scripts/submit.py (outside --dry-run) and scripts/tensorboard.sh apply nothing with it."""
    if image == PLACEHOLDER_IMAGE:
        raise TrainerError(
            f"{flag}: {image} is a placeholder: pass {usage or f'{flag} REGISTRY/trainer:TAG'} "
            "(or set TRAINER_IMAGE) with the image you pushed"
        )


# What a retry cannot change: bad config/data, below min_accuracy, max_hours reached, diverged.
EXIT_PERMANENT = [
    int(code)  # YAML's safe dumper writes plain ints only
    for code in (
        ExitCode.USER_ERROR,
        ExitCode.BELOW_MIN_ACCURACY,
        ExitCode.TIME_LIMIT,
        ExitCode.DIVERGED,
    )
]
EXIT_PEER_LOST = int(ExitCode.LOST_PEER)
DEFAULT_DEADLINE_S = 86400
POINT_MARGIN_S = 600
JOB_MARGIN_S = 1800


@dataclass(frozen=True)
class Resources:
    """What one pod asks for; the defaults are submit.py's flag defaults."""

    gpus: int = 1
    accelerator: str = "nvidia-l4"  # GKE's cloud.google.com/gke-accelerator label; "": any node
    cpu: str = "8"
    memory: str = "32Gi"
    scratch: str = "100Gi"  # staged gs:// inputs and the local copy of outputs
    shm: str = "8Gi"  # tf.data and NCCL want more than the default 64 MiB /dev/shm


POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,  # the image's `trainer` user
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}


def sweep_point_overrides(environ: Mapping[str, str] = os.environ) -> list[str]:
    """In a sweep's Indexed Job, this pod's overrides (empty elsewhere)."""
    if SWEEP_ENV not in environ or ENV_INDEX not in environ:
        return []
    return json.loads(environ[SWEEP_ENV])[int(environ[ENV_INDEX])]


def shared_feature_cache(point: list[str], *, sweep_root: str) -> list[str]:
    """A sweep point's overrides with the sweep's shared feature cache, `sweep_root`/features
    (gs://, beside the points' outputs): the first point to reach the backbone pass computes
    the features, the others wait for its claim and load them. The user's own
    storage.feature_cache override wins."""
    if any(o.lstrip("+~").startswith("storage.feature_cache=") for o in point):
        return point
    return [f"storage.feature_cache={sweep_root.rstrip('/')}/features", *point]


# Every path a pod reads or writes -> (the values it may take besides gs://, how to say them).
POD_PATHS = {
    "data.train_dir": ((), ""),
    "data.test_dir": ((None,), " or null (split off data.train_dir)"),
    "output.dir": ((), ""),
    "model.weights": ((None, "imagenet"), ", imagenet (baked into the image) or null"),
}


def check_pod_paths(cfg) -> None:
    """Raise TrainerError naming the first key whose path a pod cannot reach: it sees only gs://
    and what its image holds."""
    for key, (allowed, alternatives) in POD_PATHS.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if value not in allowed and not str(value).startswith("gs://"):
            raise TrainerError(
                f"{key}={value}: a pod sees only gs:// and its image's files: pass "
                f"{key}=gs://BUCKET/...{alternatives}"
            )


def deadline_seconds(*, points: int, parallelism: int, max_hours: float | None) -> int:
    """activeDeadlineSeconds for `points` points run `parallelism` at a time (module docstring)."""
    if max_hours is None:
        return DEFAULT_DEADLINE_S
    waves = math.ceil(points / min(parallelism, points))
    return waves * (math.ceil(max_hours * 3600) + POINT_MARGIN_S) + JOB_MARGIN_S


def pod_failure_policy(*, sweep: bool, workers: int) -> dict:
    """The exit-code rules of the module docstring, for the container CONTAINER."""
    rules = [
        {
            "action": "FailIndex" if sweep else "FailJob",
            "onExitCodes": {
                "containerName": CONTAINER,
                "operator": "In",
                "values": list(EXIT_PERMANENT),
            },
        }
    ]
    if workers > 1:
        rules.append(
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [EXIT_PEER_LOST],
                },
            }
        )
    rules.append({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]})
    return {"rules": rules}


def pod_spec(*, container: str, image: str, args: list[str], env: list[dict], res: Resources):
    """The pod both the Job and the TFJob run: resources, security, volumes."""
    amounts = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        amounts["nvidia.com/gpu"] = res.gpus
    pod = {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 60,  # SIGTERM -> the trainer writes a backup and exits
        "securityContext": copy.deepcopy(POD_SECURITY),
    }
    if res.gpus and res.accelerator:
        pod["nodeSelector"] = {"cloud.google.com/gke-accelerator": res.accelerator}
    if res.gpus:
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    mounts = {"scratch": "/scratch", "tmp": "/tmp", "dshm": "/dev/shm"}
    pod["containers"] = [
        {
            "name": container,
            "image": image,
            "imagePullPolicy": "Always",
            "workingDir": "/scratch",
            "args": args,
            "env": [
                {"name": "TRAINER_CACHE_DIR", "value": "/scratch/cache"},
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                *env,
            ],
            "resources": {"requests": dict(amounts), "limits": dict(amounts)},
            "securityContext": copy.deepcopy(CONTAINER_SECURITY),
            "volumeMounts": [{"name": n, "mountPath": path} for n, path in mounts.items()],
        }
    ]
    pod["volumes"] = [
        {"name": "scratch", "emptyDir": {"sizeLimit": res.scratch}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm}},
    ]
    return pod


def _metadata(name: str, **extra) -> dict:
    labels = {"app.kubernetes.io/name": "trainer", "app.kubernetes.io/instance": name}
    return {"name": name, "labels": labels, **extra}


def service_account(*, gsa: str) -> dict:
    """The identity trainer and TensorBoard pods run as; GKE Workload Identity maps it to `gsa`
    (roles/storage.objectAdmin on the bucket), so no key file exists anywhere:
      gcloud iam service-accounts add-iam-policy-binding GSA --role roles/iam.workloadIdentityUser
        --member "serviceAccount:PROJECT.svc.id.goog[NAMESPACE/trainer]"
    """
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": SERVICE_ACCOUNT,
            "annotations": {"iam.gke.io/gcp-service-account": gsa},
        },
        "automountServiceAccountToken": False,
    }


def headless_service(*, name: str) -> dict:
    """Worker i of a multi-worker run is reachable as NAME-i.NAME:PORT (the trainer's TF_CONFIG)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # workers must find each other before any is ready
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "grpc", "port": PORT, "targetPort": PORT}],
        },
    }


def network_policy(*, name: str) -> dict:
    """Ingress only from pods of the same run on PORT; egress stays open (gs:// needs Google's
    APIs)."""

    def same_run() -> dict:  # a fresh dict each time: YAML would print a shared one as an alias
        return {"matchLabels": {"app.kubernetes.io/instance": name}}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(name),
        "spec": {
            "podSelector": same_run(),
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": same_run()}],
                    "ports": [{"port": PORT, "protocol": "TCP"}],
                }
            ],
        },
    }


def job(
    *,
    name: str,
    image: str,
    points: list[list[str]],
    sweep: bool,
    workers: int = 1,
    parallelism: int = 1,
    max_hours: float | None = None,
    res: Resources = Resources(),
) -> dict:
    """The batch/v1 Job: one run (`points` holds its overrides), one run on `workers` > 1 pods
    (an Indexed Job, index = worker), or a sweep (an Indexed Job, index i runs points[i])."""
    pods = len(points) if sweep else workers  # completions
    at_once = min(parallelism, pods) if sweep else workers
    # No hydra.run.dir: for a gs:// output.dir Hydra's run dir is the local folder the run
    # uploads from (under TRAINER_CACHE_DIR on /scratch), so train.log reaches the bucket too.
    args = [] if sweep else points[0]
    pod = {"restartPolicy": "Never"} | pod_spec(
        container=CONTAINER,
        image=image,
        args=args,
        env=_job_env(name, points, sweep, workers),
        res=res,
    )
    if workers > 1:
        pod["subdomain"] = name  # with headless_service: NAME-i.NAME resolves to worker i
        pod["containers"][0]["ports"] = [{"name": "grpc", "containerPort": PORT}]
    # A sweep counts retries per index, so one bad point does not fail the others.
    spec = {"backoffLimitPerIndex": 2} if sweep else {"backoffLimit": 3}  # crashes, OOMs
    spec["activeDeadlineSeconds"] = deadline_seconds(
        points=len(points) if sweep else 1, parallelism=at_once, max_hours=max_hours
    )
    spec["ttlSecondsAfterFinished"] = 604800
    spec["podFailurePolicy"] = pod_failure_policy(sweep=sweep, workers=workers)
    if sweep or workers > 1:
        spec |= {"completionMode": "Indexed", "completions": pods, "parallelism": at_once}
    spec["template"] = {"metadata": {"labels": _metadata(name)["labels"]}, "spec": pod}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(name), "spec": spec}


def _job_env(name: str, points: list[list[str]], sweep: bool, workers: int) -> list[dict]:
    """What the trainer reads from its environment: its sweep point, or its fellow workers."""
    if sweep:
        return [{"name": SWEEP_ENV, "value": json.dumps(points)}]
    if workers == 1:
        return []
    return [
        {"name": ENV_WORKERS, "value": str(workers)},
        {"name": ENV_SERVICE, "value": name},
        {"name": ENV_PORT, "value": str(PORT)},
        {"name": ENV_JOB_NAME, "value": name},
    ]


def manifests(*, name: str, gsa: str, namespace: str | None = None, **job_args) -> list[dict]:
    """Everything one submission applies, in apply order; `job_args` go to job()."""
    documents = [service_account(gsa=gsa)]
    if job_args.get("workers", 1) > 1:
        documents.append(headless_service(name=name))
    documents += [network_policy(name=name), job(name=name, **job_args)]
    if namespace:  # otherwise kubectl's context decides, as users of kubectl expect
        for document in documents:
            document["metadata"]["namespace"] = namespace
    return documents


def tfjob(*, name: str, image: str, args: list[str], workers: int, res: Resources) -> dict:
    """The same run for Kubeflow's training operator, which sets TF_CONFIG itself. Its ExitCode
    policy retries exit codes >= 128 (143: preempted) and treats 1-127 as permanent: 2, 3, 5 and 6
    as wanted, but also a crash (1) and a lost peer (4); the Job above retries those."""
    pod = pod_spec(container="tensorflow", image=image, args=args, env=[], res=res)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": name},
        "spec": {
            "runPolicy": {
                "backoffLimit": 3,
                "ttlSecondsAfterFinished": 604800,
                "activeDeadlineSeconds": DEFAULT_DEADLINE_S,
            },
            "tfReplicaSpecs": {
                "Worker": {
                    "replicas": workers,
                    "restartPolicy": "ExitCode",
                    "template": {"spec": pod},
                }
            },
        },
    }


TFJOB_HEADER = """\
# For clusters that run Kubeflow's training operator: the same run as a TFJob. The operator sets
# TF_CONFIG itself, and the trainer accepts it unchanged (distribute.strategy=auto -> multi_worker).
# Edit image, overrides and worker count, then: kubectl apply -f k8s/tfjob.yaml
# restartPolicy ExitCode: the operator retries exit codes >= 128 (143: preempted) and treats 1-127
# as permanent: 2, 3, 5 and 6 as wanted, but also a crash (1) and a lost peer (4), which the Job
# scripts/submit.py renders does retry.
# Generated from trainer/kube.py by `python -m trainer.kube > k8s/tfjob.yaml`; edit the code, not
# this file (tests/test_k8s.py checks that they agree).
"""


def tfjob_example_text() -> str:
    """k8s/tfjob.yaml: a two-worker TFJob with placeholder bucket and image."""
    import yaml

    args = [
        "data.train_dir=gs://BUCKET/hotdog/train",
        "data.test_dir=gs://BUCKET/hotdog/test",
        "output.dir=gs://BUCKET/runs/tfjob",
    ]
    manifest = tfjob(
        name="trainer-tfjob", image=PLACEHOLDER_IMAGE, args=args, workers=2, res=Resources()
    )
    return TFJOB_HEADER + yaml.safe_dump(manifest, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.kube`: print k8s/tfjob.yaml (`--help`: what it does)."""
    import argparse

    argparse.ArgumentParser(
        prog="python -m trainer.kube",
        description="Print the Kubeflow TFJob example (k8s/tfjob.yaml) rendered from the same "
        "pod as scripts/submit.py's Jobs: python -m trainer.kube > k8s/tfjob.yaml",
    ).parse_args(argv)
    print(tfjob_example_text(), end="")


if __name__ == "__main__":
    main()
