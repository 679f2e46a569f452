"""The cluster this process trains in, parsed once from TF_CONFIG or a Kubernetes Indexed Job.

No TensorFlow here: the answers (how many workers, which shard is ours, are we the chief) are
needed before TensorFlow starts, and by tests that must stay fast.

Kubeflow's TFJob sets TF_CONFIG, which wins and is used unchanged. Without it, an Indexed Job
plus a headless Service gives pod i the stable name `<job>-<i>.<service>`, and the trainer
derives TF_CONFIG from these variables (see docs/distributed.md):

    JOB_COMPLETION_INDEX  set by Kubernetes in every Indexed Job pod: this worker's index
    TRAINER_WORKERS       number of workers (the Job's completions and parallelism)
    TRAINER_JOB_NAME      the Job's name (pod i's hostname is <job>-<i>)
    TRAINER_SERVICE       the headless Service named as the pods' subdomain
    TRAINER_PORT          the gRPC port every worker listens on (default 2222)

TRAINER_WORKERS is the switch: JOB_COMPLETION_INDEX alone (a sweep run as an Indexed Job) does
not make a cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from trainer import TrainerError

ENV_INDEX = "JOB_COMPLETION_INDEX"
ENV_WORKERS = "TRAINER_WORKERS"
ENV_JOB_NAME = "TRAINER_JOB_NAME"
ENV_SERVICE = "TRAINER_SERVICE"
ENV_PORT = "TRAINER_PORT"
DEFAULT_PORT = 2222
# MultiWorkerMirroredStrategy trains on these task types; Kubeflow may add a `chief`.
TRAINING_TASKS = ("chief", "worker")


@dataclass(frozen=True)
class Cluster:
    """Where this process stands: `workers` training tasks (chief included), this one's `index`
    into the input shards (the chief is 0, then the workers in order) and whether it is the
    `chief`, the one task that writes output.dir. `tf_config` is None outside a cluster."""

    workers: int = 1
    index: int = 0
    chief: bool = True
    tf_config: dict | None = None

    @property
    def task(self) -> str:
        """How TF_CONFIG names this task ("worker 1", "chief 0"), for log lines."""
        task = (self.tf_config or {}).get("task", {})
        return f"{task.get('type', 'worker')} {task.get('index', 0)}"


def from_environment(env: MutableMapping[str, str] | None = None) -> Cluster:
    """The cluster described by TF_CONFIG or the Indexed Job variables in `env` (default:
    os.environ); a derived TF_CONFIG is written back to `env` for TensorFlow to read."""
    return parse(resolve_tf_config(env))


def parse(tf_config: dict | None) -> Cluster:
    """A TF_CONFIG dict as a Cluster; TrainerError (exit 2) naming what is malformed."""
    if not tf_config:
        return Cluster()
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    if not isinstance(cluster, dict) or not all(isinstance(v, list) for v in cluster.values()):
        raise TrainerError(f"TF_CONFIG: 'cluster' must map task types to address lists: {cluster}")
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    if chiefs + workers == 0:
        return Cluster(tf_config=tf_config)
    task = task if isinstance(task, dict) else {}
    task_type, index = task.get("type"), task.get("index")
    if task_type not in TRAINING_TASKS:
        raise TrainerError(
            f"TF_CONFIG: task type {task_type!r}: must be chief or worker (this trainer runs no "
            "parameter servers or evaluators)"
        )
    size = chiefs if task_type == "chief" else workers
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise TrainerError(
            f"TF_CONFIG: task index {index!r}: must be an integer below the {size} "
            f"'{task_type}' address(es) in 'cluster'"
        )
    return Cluster(
        workers=chiefs + workers,
        index=0 if task_type == "chief" else chiefs + index,
        chief=task_type == "chief" or (index == 0 and chiefs == 0),
        tf_config=tf_config,
    )


def resolve_tf_config(env: MutableMapping[str, str] | None = None) -> dict | None:
    """TF_CONFIG as given (Kubeflow), else one derived from the Indexed Job environment and
    written to TF_CONFIG for TensorFlow to read; None if neither."""
    env = os.environ if env is None else env
    if env.get("TF_CONFIG"):
        try:
            config = json.loads(env["TF_CONFIG"])
        except json.JSONDecodeError as error:
            raise TrainerError(f"TF_CONFIG: not valid JSON ({error})") from error
        if not isinstance(config, dict):
            raise TrainerError("TF_CONFIG: must be a JSON object with 'cluster' and 'task'")
        return config
    config = indexed_job_tf_config(env)
    if config is not None:
        env["TF_CONFIG"] = json.dumps(config)
    return config


def indexed_job_tf_config(env: Mapping[str, str]) -> dict | None:
    """TF_CONFIG for this pod of a Kubernetes Indexed Job, or None outside one (no TRAINER_WORKERS)
    or with a single worker. Worker i is addressed as `<job>-<i>.<service>:<port>`."""
    if not env.get(ENV_WORKERS):
        return None
    workers = _int_env(env, ENV_WORKERS, 1)
    if workers == 1:
        return None
    if ENV_INDEX not in env:
        raise TrainerError(
            f"{ENV_WORKERS}={workers} but {ENV_INDEX} is not set: run the workers as a Kubernetes "
            "Indexed Job (completionMode: Indexed), or set TF_CONFIG yourself"
        )
    index = _int_env(env, ENV_INDEX, 0)
    if index >= workers:
        raise TrainerError(f"{ENV_INDEX}={index}: must be below {ENV_WORKERS}={workers}")
    for name in (ENV_JOB_NAME, ENV_SERVICE):
        if not env.get(name):
            raise TrainerError(
                f"{name} is not set: with {ENV_WORKERS}={workers} the trainer needs the Job's name "
                f"({ENV_JOB_NAME}) and its headless Service ({ENV_SERVICE}) to address the workers"
            )
    port = _int_env(env, ENV_PORT, 1) if env.get(ENV_PORT) else DEFAULT_PORT
    job, service = env[ENV_JOB_NAME], env[ENV_SERVICE]
    return {
        "cluster": {"worker": [f"{job}-{i}.{service}:{port}" for i in range(workers)]},
        "task": {"type": "worker", "index": index},
    }


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int:
    value = env.get(name, "")
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TrainerError(f"{name}={value!r}: must be an integer >= {minimum}")
    return number
