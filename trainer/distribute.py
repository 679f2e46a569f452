"""Choose the tf.distribute strategy from config and environment."""

from __future__ import annotations

import logging

import tensorflow as tf

from trainer import TrainerError

log = logging.getLogger(__name__)


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


def choose_strategy(strategy: str, simulate_devices: int | None) -> tf.distribute.Strategy:
    """`default` (one device), `mirrored` (all local GPUs, or the simulated CPUs), or `auto`."""
    if simulate_devices:
        simulate_cpu_devices(simulate_devices)
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or (
        [d.name for d in tf.config.list_logical_devices("CPU")] if simulate_devices else []
    )
    if strategy == "auto":
        strategy = "mirrored" if len(devices) > 1 else "default"
    if strategy == "default":
        chosen = tf.distribute.get_strategy()
    elif strategy == "mirrored":
        chosen = tf.distribute.MirroredStrategy(devices or None)
    else:
        raise TrainerError(f"distribute.strategy={strategy}: not available in this build yet")
    log.info("strategy: %s, %d replica(s)", strategy, chosen.num_replicas_in_sync)
    return chosen


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes output.dir (always, outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )
