"""Choose the tf.distribute strategy, the precision and XLA from config, devices and environment.

`distribute.strategy=auto` picks `multi_worker` when TF_CONFIG (or the Indexed Job environment
below) names more than one worker, `mirrored` when more than one GPU (or simulated CPU device)
is visible, else `default` (one device).

Multi-worker on Kubernetes without an operator: an Indexed Job plus a headless Service gives pod
i the stable name `<job>-<i>.<service>`. From these variables the trainer builds TF_CONFIG:

    JOB_COMPLETION_INDEX  set by Kubernetes in every Indexed Job pod: this worker's index
    TRAINER_WORKERS       number of workers (the Job's completions and parallelism)
    TRAINER_JOB_NAME      the Job's name (pod i's hostname is <job>-<i>)
    TRAINER_SERVICE       the headless Service named as the pods' subdomain
    TRAINER_PORT          the gRPC port every worker listens on (default 2222)

TRAINER_WORKERS is the switch: JOB_COMPLETION_INDEX alone (a sweep run as an Indexed Job) does
not make a cluster. A TF_CONFIG already in the environment (Kubeflow's TFJob sets one) wins and
is used unchanged. See docs/distributed.md.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
from collections.abc import Mapping, MutableMapping

import tensorflow as tf

from trainer import TrainerError

log = logging.getLogger(__name__)

ENV_INDEX = "JOB_COMPLETION_INDEX"
ENV_WORKERS = "TRAINER_WORKERS"
ENV_JOB_NAME = "TRAINER_JOB_NAME"
ENV_SERVICE = "TRAINER_SERVICE"
ENV_PORT = "TRAINER_PORT"
DEFAULT_PORT = 2222

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")

# Backbone pass (ResNet50 feature extraction) on the development machine, 2 CPU cores of an AMD
# EPYC with AVX512_BF16, measured side by side in one run by scripts/measure_backbone.py
# (64 images of 224 px, global batch 32, best of 3 rounds, images/s):
#
#   precision        1 device   2 simulated devices   1 device + XLA
#   float32            22.3           21.9                 20.6
#   mixed_bfloat16     32.3           31.6                  -
#
# mixed_bfloat16 is 1.45x faster, so `auto` takes it on CPUs with native bf16 instructions
# (without them oneDNN emulates bf16, slower than float32). Two simulated devices share the same
# two cores and gain nothing; XLA on CPU is slower, so jit_compile=auto leaves it off there.
BF16_CPU_SPEEDUP = 1.45


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int:
    value = env.get(name, "")
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TrainerError(f"{name}={value!r}: must be an integer >= {minimum}")
    return number


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


def resolve_tf_config(env: MutableMapping[str, str] | None = None) -> dict | None:
    """The cluster this process belongs to: TF_CONFIG as given (Kubeflow), else one derived from
    the Indexed Job environment and written to TF_CONFIG for TensorFlow to read; None if neither."""
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


def cluster_workers(tf_config: dict | None) -> int:
    """How many training tasks (chief + workers) the cluster in `tf_config` has."""
    cluster = (tf_config or {}).get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def simulate_cpu_devices(count: int) -> None:
    """Split the CPU into `count` logical devices so the multi-replica path runs without GPUs.
    Must happen before TensorFlow initializes its devices."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as error:
        raise TrainerError(
            f"distribute.simulate_devices={count}: TensorFlow's devices were already "
            f"initialized in this process ({error})"
        ) from error


def choose_strategy(
    strategy: str, simulate_devices: int | None, timeout_seconds: int = 600
) -> tf.distribute.Strategy:
    """`default` (one device), `mirrored` (all local GPUs, or the simulated CPUs), `multi_worker`
    (TF_CONFIG or the Indexed Job environment), or `auto`. Call before any other TensorFlow op:
    both the simulated devices and the multi-worker runtime must be set up before TF starts."""
    tf_config = resolve_tf_config()
    workers = cluster_workers(tf_config)
    if simulate_devices:
        simulate_cpu_devices(simulate_devices)
    if strategy == "auto" and workers > 1:
        strategy = "multi_worker"
    if strategy in ("default", "mirrored") and workers > 1:
        # Every worker would train alone and each would think it is the chief.
        raise TrainerError(
            f"distribute.strategy={strategy}: TF_CONFIG names {workers} workers; use "
            "distribute.strategy=auto or multi_worker (or run one worker)"
        )
    if strategy == "multi_worker":
        if tf_config is None:
            raise TrainerError(
                "distribute.strategy=multi_worker: no cluster found; set TF_CONFIG, or "
                f"{ENV_WORKERS}, {ENV_JOB_NAME}, {ENV_SERVICE} in an Indexed Job"
            )
        chosen = _multi_worker_strategy(tf_config, timeout_seconds)
        task = tf_config.get("task", {})
        log.info(
            "strategy: multi_worker, %d replicas (%d workers; this is %s %s)",
            chosen.num_replicas_in_sync,
            workers,
            task.get("type"),
            task.get("index"),
        )
        return chosen

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or (
        [d.name for d in tf.config.list_logical_devices("CPU")] if simulate_devices else []
    )
    if strategy == "auto":
        strategy = "mirrored" if len(devices) > 1 else "default"
    if strategy == "default":
        chosen = tf.distribute.get_strategy()
    else:
        chosen = tf.distribute.MirroredStrategy(devices or None)
    log.info("strategy: %s, %d replica(s)", strategy, chosen.num_replicas_in_sync)
    return chosen


def _multi_worker_strategy(tf_config: dict, timeout_seconds: int) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy that fails instead of waiting forever for a lost worker.

    Three bounds. Start-up: joining waits for every worker inside TensorFlow's C++ code, holding
    the GIL, with no timeout that fired here and deaf to SIGTERM; faulthandler's watchdog (a C
    thread) then prints where it hung and exits with code 1 after `timeout_seconds`. A worker
    that crashes or is killed later stops sending heartbeats; the coordination service notices
    in about 10 s and aborts every collective. A worker that hangs while still alive: each
    collective op gives up after `timeout_seconds`. Either error ends the other processes with
    a non-zero exit code.
    """
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=float(timeout_seconds) if timeout_seconds else None
    )
    _patch_keras_for_multi_worker()
    cluster = tf_config.get("cluster")
    if timeout_seconds:
        log.info("joining the cluster %s (gives up after %d s)", cluster, timeout_seconds)
        faulthandler.dump_traceback_later(timeout_seconds, exit=True)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except ValueError as error:  # a malformed cluster; a lost worker is a crash (retryable)
        raise TrainerError(
            f"distribute.strategy=multi_worker: cannot use the cluster in TF_CONFIG "
            f"({cluster}): {error}"
        ) from error
    finally:
        faulthandler.cancel_dump_traceback_later()


def _patch_keras_for_multi_worker() -> None:
    """Work around two Keras 3 bugs that stop `fit`/`evaluate` under MultiWorkerMirroredStrategy
    (keras-team/keras#20585, still present in 3.15):

    - `_maybe_symbolic_build` all-reduces a whole (x, y) batch across workers just to learn its
      shapes and fails on the tuple; the first replica's local batch has the same shapes.
    - step logs (loss, metric results: scalars) are reduced with `axis=0`, which a scalar lacks;
      the cross-replica mean of a scalar is `axis=None`.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_trainer_multi_worker_patch", False):
        return
    original_reduce = tf_trainer.reduce_per_replica

    def local_value(value):
        return value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=tree.map_structure(local_value, data_batch))

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy
        ):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer._trainer_multi_worker_patch = True


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes output.dir (always, outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


def worker_shard(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """(number of workers, this worker's index): how the input files are split between machines.
    (1, 0) outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return 1, 0
    count = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if resolver.task_type == "chief":
        return count, 0
    return count, resolver.task_id + (1 if "chief" in cluster else 0)


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str) -> str:
    """Set Keras' global dtype policy from `train.precision` and return its name. `auto`:
    mixed_float16 on GPUs of compute capability >= 7.0 (tensor cores), float32 on older GPUs, and
    on CPUs whatever measured faster (see BF16_CPU_SPEEDUP). The model's output layer stays
    float32 in every policy (trainer/model.py)."""
    import keras

    if precision not in PRECISIONS:
        raise TrainerError(f"train.precision={precision}: must be one of {', '.join(PRECISIONS)}")
    policy, why = precision, "train.precision"
    if precision == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            capability = details.get("compute_capability", (0, 0))
            policy = "mixed_float16" if capability >= (7, 0) else "float32"
            why = f"auto: GPU compute capability {capability[0]}.{capability[1]}"
        elif _cpu_has_native_bf16() and BF16_CPU_SPEEDUP > 1.0:
            policy = "mixed_bfloat16"
            why = f"auto: CPU with native bf16, measured {BF16_CPU_SPEEDUP:.2f}x faster"
        else:
            policy, why = "float32", "auto: CPU"
    keras.mixed_precision.set_dtype_policy(policy)
    log.info("precision: %s (%s)", policy, why)
    return policy


def choose_jit_compile(
    jit_compile: str, strategy: tf.distribute.Strategy | None = None
) -> bool | str:
    """`train.jit_compile` as Keras' `compile(jit_compile=...)` takes it: True, False or "auto".
    `auto` is Keras' own choice on GPUs and False without one: Keras' "auto" turns XLA on for
    CPUs too, where it measured no faster (BF16_CPU_SPEEDUP's table: 20.6 against 22.3 images/s
    in float32; an earlier 18.7 against 33.6 was tf.data's autotuner, see trainer/data.py)."""
    value = str(jit_compile).strip().lower()
    if value not in ("auto", "true", "false"):
        raise TrainerError(f"train.jit_compile={jit_compile}: must be auto, true or false")
    if value == "auto":
        return "auto" if tf.config.list_logical_devices("GPU") else False
    if value == "false":
        return False
    devices = getattr(getattr(strategy, "extended", None), "worker_devices", ())
    if strategy is not None and strategy.num_replicas_in_sync > 1 and "GPU" not in str(devices):
        # XLA runs one CPU device; replicas on simulated CPU devices fail with "Trying to access
        # resource ... located in device CPU:1 from device CPU:0".
        log.warning("train.jit_compile=true: XLA cannot span several CPU devices; XLA off")
        return False
    return True
