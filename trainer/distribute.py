"""Choose the tf.distribute strategy, the precision and XLA from config, devices and environment.

`distribute.strategy=auto` picks `multi_worker` when the cluster (trainer/cluster.py: TF_CONFIG or
an Indexed Job's TRAINER_WORKERS) has more than one worker, `mirrored` when more than one GPU (or
simulated CPU device) is visible, else `default` (one device). Measurements behind the `auto`
choices, the failure bounds and the exit codes: docs/distributed.md.
"""

from __future__ import annotations

import faulthandler
import logging
import re

import numpy as np
import tensorflow as tf

from trainer import LostPeer, TrainerError
from trainer.cluster import ENV_JOB_NAME, ENV_SERVICE, ENV_WORKERS, Cluster, from_environment

log = logging.getLogger(__name__)

# The Keras releases whose private trainer functions `_patch_keras_for_multi_worker` replaces were
# read and tested (keras-team/keras#20585).
KERAS_PATCH_VERIFIED = ((3, 12), (3, 15))
# How TensorFlow reports, inside a collective, that another worker is gone: its coordination
# service aborts the collectives (Unavailable, Aborted, Cancelled) or one times out.
LOST_PEER_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.DeadlineExceededError,
)


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
    strategy: str,
    simulate_devices: int | None,
    timeout_seconds: int = 600,
    *,
    cluster: Cluster | None = None,
) -> tf.distribute.Strategy:
    """`default` (one device), `mirrored` (all local GPUs, or the simulated CPUs), `multi_worker`
    (TF_CONFIG or the Indexed Job environment), or `auto`, for the `cluster` this process is
    in (default: parsed from the environment). A one-machine strategy in a cluster of several
    is refused, so the strategy always trains in `cluster`. Call before any other TensorFlow
    op: both the simulated devices and the multi-worker runtime must be set up before TF
    starts."""
    if cluster is None:
        cluster = from_environment()
    if simulate_devices:
        simulate_cpu_devices(simulate_devices)
    if strategy == "auto" and cluster.workers > 1:
        strategy = "multi_worker"
    if strategy in ("default", "mirrored") and cluster.workers > 1:
        # Every worker would train alone and each would think it is the chief.
        raise TrainerError(
            f"distribute.strategy={strategy}: TF_CONFIG names {cluster.workers} workers; use "
            "distribute.strategy=auto or multi_worker (or run one worker)"
        )
    if strategy == "multi_worker":
        if cluster.tf_config is None:
            raise TrainerError(
                "distribute.strategy=multi_worker: no cluster found; set TF_CONFIG, or "
                f"{ENV_WORKERS}, {ENV_JOB_NAME}, {ENV_SERVICE} in an Indexed Job"
            )
        chosen = _multi_worker_strategy(cluster, timeout_seconds)
        log.info(
            "strategy: multi_worker, %d replicas (%d workers; this is %s)",
            chosen.num_replicas_in_sync,
            cluster.workers,
            cluster.task,
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


def _multi_worker_strategy(cluster: Cluster, timeout_seconds: int) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy that fails instead of waiting forever for a lost worker.

    Joining blocks inside TensorFlow's C++ code holding the GIL and deaf to SIGTERM, so only
    faulthandler's C watchdog can bound it (exit 1 after `timeout_seconds`); later losses surface
    as collective errors that `lost_peer` turns into exit 4. Details: docs/distributed.md.
    """
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=float(timeout_seconds) if timeout_seconds else None
    )
    _patch_keras_for_multi_worker()
    addresses = cluster.tf_config.get("cluster")
    if timeout_seconds:
        log.info("joining the cluster %s (gives up after %d s)", addresses, timeout_seconds)
        faulthandler.dump_traceback_later(timeout_seconds, exit=True)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except ValueError as error:  # a malformed cluster; a lost worker is a crash (retryable)
        raise TrainerError(
            f"distribute.strategy=multi_worker: cannot use the cluster in TF_CONFIG "
            f"({addresses}): {error}"
        ) from error
    finally:
        faulthandler.cancel_dump_traceback_later()


def lost_peer(error: BaseException) -> LostPeer | None:
    """`error` as LostPeer when it is how TensorFlow reports, inside a multi-worker cluster, that
    another worker is gone (preempted, crashed, unreachable); None for anything else."""
    if not isinstance(error, LOST_PEER_ERRORS) or from_environment().workers < 2:
        return None
    message = getattr(error, "message", None) or str(error)
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    first = re.sub(r"\{\{[^}]*\}\}\s*", "", first)  # TensorFlow's {{function_node ...}} tag
    return LostPeer(f"{type(error).__name__}: {first[:300]}")


def _patch_keras_for_multi_worker() -> None:
    """Work around two Keras 3 bugs that stop `fit`/`evaluate` under MultiWorkerMirroredStrategy
    (keras-team/keras#20585, verified on the KERAS_PATCH_VERIFIED releases):

    - `_maybe_symbolic_build` all-reduces a whole (x, y) batch across workers just to learn its
      shapes and fails on the tuple; the first replica's local batch has the same shapes.
    - step logs (loss, metric results: scalars) are reduced with `axis=0`, which a scalar lacks;
      the cross-replica mean of a scalar is `axis=None`.
    """
    import keras
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer, "_trainer_multi_worker_patch", False):
        return
    _check_keras_for_patch(keras.__version__, tf_trainer)
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


def _check_keras_for_patch(version: str, tf_trainer) -> None:
    """Refuse when the private functions the patch replaces are gone; warn (one line) when this
    Keras is outside the releases the patch was verified on, as it may no longer apply."""
    missing = [
        name
        for name, owner in (
            ("reduce_per_replica", tf_trainer),
            ("TensorFlowTrainer._maybe_symbolic_build", tf_trainer.TensorFlowTrainer),
        )
        if not hasattr(owner, name.rpartition(".")[2])
    ]
    if missing:
        raise TrainerError(
            f"Keras {version}: keras.src.backend.tensorflow.trainer has no "
            f"{', '.join(missing)}, which the multi-worker fix for keras-team/keras#20585 "
            "replaces; use Keras 3.12-3.15 for distribute.strategy=multi_worker"
        )
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    low, high = KERAS_PATCH_VERIFIED
    if not low <= release <= high:
        log.warning(
            "Keras %s: the multi-worker fix for keras-team/keras#20585 was verified on Keras "
            "%d.%d-%d.%d and may no longer apply (or be needed); see docs/distributed.md",
            version,
            *low,
            *high,
        )


def any_worker(strategy: tf.distribute.Strategy, flags) -> np.ndarray:
    """Element by element, whether any worker set the flag (`flags`: booleans): an all-reduce,
    so every worker must call this with as many flags."""
    flags = np.asarray(flags, dtype=np.float32)
    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(flags)), axis=None
    )
    return np.asarray(total) > 0


def every_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """Whether `flag` holds on every worker (an all-reduce: every worker must call this)."""
    return not any_worker(strategy, [not flag])[0]


def mean_over_workers(strategy: tf.distribute.Strategy, arrays: list) -> list[np.ndarray]:
    """Each of `arrays` averaged over the workers (one all-reduce): the same values on every
    worker afterwards, bit for bit, whatever rounding each worker's own computation had. Every
    worker must call this with arrays of the same shapes."""
    arrays = [np.asarray(a) for a in arrays]
    flat = np.concatenate([a.astype(np.float32).ravel() for a in arrays])  # one all-reduce
    mean = strategy.reduce(
        tf.distribute.ReduceOp.MEAN, strategy.run(lambda: tf.constant(flat)), axis=None
    )
    parts = np.split(np.asarray(mean), np.cumsum([a.size for a in arrays])[:-1])
    return [part.reshape(a.shape).astype(a.dtype) for part, a in zip(parts, arrays, strict=True)]


def device_kinds(strategy: tf.distribute.Strategy) -> list[str]:
    """The kinds of device ("CPU", "GPU") this process's replicas run on. The default strategy
    has no `worker_devices` (it raises RuntimeError): it runs on the first GPU, else the CPU."""
    try:
        devices = strategy.extended.worker_devices
    except (AttributeError, RuntimeError):
        devices = [(tf.config.list_logical_devices("GPU") or ["CPU"])[0]]
    kinds = {tf.DeviceSpec.from_string(str(getattr(d, "name", d))).device_type for d in devices}
    return sorted(kind or "CPU" for kind in kinds)


def runtime(strategy: tf.distribute.Strategy) -> dict:
    """What the run resolved (for metrics.json): the strategy, replicas, device kinds, and the
    precision policy in force."""
    import keras

    names = {
        "MirroredStrategy": "mirrored",
        "CollectiveAllReduceStrategy": "multi_worker",
        "MultiWorkerMirroredStrategy": "multi_worker",
    }
    classes = {cls.__name__ for cls in type(strategy).__mro__}
    kind = next((name for cls, name in names.items() if cls in classes), "default")
    return {
        "strategy": kind,
        "replicas": strategy.num_replicas_in_sync,
        "devices": device_kinds(strategy),
        "precision": keras.mixed_precision.global_policy().name,
    }


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _name(value) -> str:
    """An Enum's value (trainer.config.Precision, JitCompile), or a string as given."""
    return str(getattr(value, "value", value)).strip().lower()


def choose_precision(precision) -> str:
    """Set Keras' global dtype policy from `train.precision` and return its name. `auto`:
    mixed_float16 on GPUs of compute capability >= 7.0 (tensor cores), float32 on older GPUs, and
    on CPUs mixed_bfloat16 only with native bf16 instructions, where it measured faster
    (docs/performance.md; without them oneDNN emulates bf16, slower than float32). The model's
    output layer stays float32 in every policy (trainer/model.py)."""
    import keras

    policy = _name(precision)
    why = "train.precision"
    if policy == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            capability = details.get("compute_capability", (0, 0))
            policy = "mixed_float16" if capability >= (7, 0) else "float32"
            why = f"auto: GPU compute capability {capability[0]}.{capability[1]}"
        elif _cpu_has_native_bf16():
            policy, why = "mixed_bfloat16", "auto: CPU with native bf16"
        else:
            policy, why = "float32", "auto: CPU"
    keras.mixed_precision.set_dtype_policy(policy)
    log.info("precision: %s (%s)", policy, why)
    return policy


def choose_jit_compile(jit_compile, strategy: tf.distribute.Strategy | None = None) -> bool | str:
    """`train.jit_compile` as Keras' `compile(jit_compile=...)` takes it: True, False or "auto".
    `auto` is Keras' own choice on GPUs and False without one: Keras' "auto" turns XLA on for
    CPUs too, where it measured slower (docs/distributed.md)."""
    value = _name(jit_compile)
    if value == "auto":
        return "auto" if tf.config.list_logical_devices("GPU") else False
    if value == "false":
        return False
    if (
        strategy is not None
        and strategy.num_replicas_in_sync > 1
        and "GPU" not in device_kinds(strategy)
    ):
        # XLA runs one CPU device; replicas on simulated CPU devices fail with "Trying to access
        # resource ... located in device CPU:1 from device CPU:0".
        log.warning("train.jit_compile=true: XLA cannot span several CPU devices; XLA off")
        return False
    return True
