"""Compile, fit, callbacks (per-epoch log, backups, SIGTERM, time limit), evaluation."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass

import keras
import numpy as np

from trainer import Diverged, Interrupted, Preempted, TimeLimitReached

log = logging.getLogger(__name__)


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch, so log files and `kubectl logs` read well without a progress bar."""

    def __init__(self, total_epochs: int, phase: str, evaluates: str = "test"):
        super().__init__()
        self.total_epochs = total_epochs
        self.phase = phase
        self.evaluates = evaluates
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        log.info(
            "epoch %d/%d (%s): loss %.4f accuracy %.4f | %s_loss %.4f %s_accuracy %.4f | "
            "lr %.3g | %.1f s",
            epoch + 1,
            self.total_epochs,
            self.phase,
            logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")),
            self.evaluates,
            logs.get("val_loss", float("nan")),
            self.evaluates,
            logs.get("val_accuracy", float("nan")),
            float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            time.perf_counter() - self.started,
        )


class _StopSignals:
    """SIGTERM (preemption, eviction) and SIGINT (Ctrl-C) stop the job at the next safe point:
    a training step's end (so the backup written on the way out is consistent), a prediction
    batch's end, or a phase boundary (`check`). The handler itself only records which signal
    arrived: an exception raised from it at an arbitrary point lands inside Keras or autograph,
    which catch or wrap it (seen as a crash building a model, and as a signal lost while
    tracing). A second Ctrl-C does not wait: it raises KeyboardInterrupt, which `__main__`
    turns into the same one line."""

    def __init__(self):
        self.requested = None  # the name of the signal that arrived (SIGTERM, SIGINT)

    def install(self) -> None:
        """(Re)install the handler. TensorFlow's multi-worker runtime installs a C-level SIGTERM
        handler of its own (its preemption notifier) when the strategy is created, which
        `signal.getsignal` does not show: install after that, and again before each fit."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # not a background job's
                signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C again: stop now
        self.requested = signal.Signals(signum).name

    def stopped(self, detail: str = "") -> Preempted:
        """The error that ends the run for the signal that arrived: Interrupted (exit 130) for
        Ctrl-C, Preempted (exit 143) for SIGTERM; `detail` is added to its message."""
        kind = Interrupted if self.requested == "SIGINT" else Preempted
        return kind(f"{self.requested} received{detail}")

    def check(self) -> None:
        """Raise Preempted (or Interrupted) if a stop signal arrived: call between phases."""
        if self.requested:
            raise self.stopped()

    @contextlib.contextmanager
    def during_fit(self):
        self.install()
        self.check()
        yield


SIGTERM = _StopSignals()  # the name is older than Ctrl-C's handling


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore, plus: the epoch being trained is recorded from its first step
    (Keras only advances it at epoch end, so a mid-epoch backup after a resume would point back
    to epoch 0), a save on demand, and a log line when a run resumes."""

    def __init__(self, backup_dir: str, every_steps: int, phase: str):
        super().__init__(backup_dir, save_freq=every_steps or "epoch", double_checkpoint=True)
        self.phase = phase

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        resumed = getattr(self.model, "_initial_epoch", None)
        if resumed:
            log.info(
                "resuming %s from the backup in %s at epoch %d",
                self.phase,
                self.backup_dir,
                resumed + 1,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_end(self, logs=None):
        """Keras removes the backup once `fit` returns; a fit stopped before its last epoch
        (`stop_training`: train.max_hours) keeps it, saved as of now, for the rerun to resume."""
        if not self.model.stop_training:
            super().on_train_end(logs)
            return
        self._save_model()
        log.info("%s stopped early: backup kept in %s", self.phase, self.backup_dir)

    def save_now(self) -> None:
        self._save_model()


class StopPredictingOnSigterm(keras.callbacks.Callback):
    """`predict` (the backbone pass, evaluation on images) stops after the batch in which
    SIGTERM (or Ctrl-C) arrived: nothing to save, and a backbone pass can take minutes."""

    def on_predict_batch_end(self, batch, logs=None):
        SIGTERM.check()


class StopOnSigterm(keras.callbacks.Callback):
    """After the step in which SIGTERM (or Ctrl-C) arrived: write the backup, flush
    TensorBoard, stop."""

    def __init__(self, backup: Backup, tensorboard: keras.callbacks.TensorBoard):
        super().__init__()
        self.backup = backup
        self.tensorboard = tensorboard

    def on_train_batch_end(self, batch, logs=None):
        if SIGTERM.requested:
            self.backup.save_now()
            for name in ("_train_writer", "_val_writer"):  # Keras keeps its writers private
                writer = self.tensorboard.__dict__.get(name)
                if writer is not None:
                    writer.flush()
            raise SIGTERM.stopped(f"; backup written to {self.backup.backup_dir}")


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Diverged (exit 6) at the first step whose loss is NaN or infinite: the weights it leaves
    are no model. Under tf.distribute the loss is the same on every worker, so all stop."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise Diverged(
                f"the training loss became {float(loss)} in epoch {self.epoch + 1}, step "
                f"{batch + 1} ({self.phase}): lower train.learning_rate or check the inputs;"
                " nothing exported"
            )


class AgreeOnWeights(keras.callbacks.Callback):
    """At the end of training, the model's weights replaced by their mean over the workers of
    `strategy` (one all-reduce, trainer/distribute.py): for a model each worker trained alone on
    the same data (the head on cached features, trainer/phases.py), identical bit for bit on
    every worker afterwards. Listed before the backup, so a peer lost by then (the all-reduce
    fails, exit 4) leaves the backup for the retry to resume from."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    def on_train_end(self, logs=None):
        from trainer.distribute import mean_over_workers

        self.model.set_weights(mean_over_workers(self.strategy, self.model.get_weights()))


class KeepBest(keras.callbacks.Callback):
    """Fine-tuning keeps its best epoch: the weights with the highest validation accuracy, the
    starting weights (phase 1's end, `baseline` their accuracy) included, are the model's at the
    end of training. `best_epoch`: that epoch (1-based, of the whole run); 0: phase 1's end."""

    def __init__(self, baseline: float):
        super().__init__()
        self.baseline = baseline
        self.best = baseline
        self.best_epoch = 0
        self.weights = None

    def on_train_begin(self, logs=None):
        self.weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        accuracy = (logs or {}).get("val_accuracy")
        if accuracy is not None and accuracy > self.best:
            self.best, self.best_epoch = float(accuracy), epoch + 1
            self.weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        self.model.set_weights(self.weights)
        log.info(
            "fine-tuning keeps %s (validation accuracy %.4f)",
            f"epoch {self.best_epoch}" if self.best_epoch else "phase 1's end",
            self.best,
        )


class TimeLimit(keras.callbacks.Callback):
    """`train.max_hours`: once the limit has passed (counted from `started`, a
    time.perf_counter() taken at run start), stop training after the current step (one worker) or
    epoch (several); `reached` tells the job to evaluate, write metrics and skip the export. One
    instance serves every training phase."""

    def __init__(self, max_hours: float | None, started: float, strategy=None, workers: int = 1):
        super().__init__()
        self.max_hours = max_hours
        self.deadline = None if max_hours is None else started + max_hours * 3600
        self.strategy = strategy  # the run's: the head on cached features trains outside it
        self.workers = workers
        self.reached = False

    def on_train_batch_end(self, batch, logs=None):
        if self.workers == 1 and self._passed():
            self._stop()

    def on_epoch_end(self, epoch, logs=None):
        # Each worker's clock passes the limit at its own step, and a worker that stopped alone
        # would leave the others waiting in a collective: with several workers they agree (one
        # all-reduce an epoch) and all stop after the same epoch.
        if self.workers > 1 and self.deadline is not None and self._agreed():
            self._stop()

    def _passed(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def _agreed(self) -> bool:
        from trainer.distribute import any_worker

        return bool(any_worker(self.strategy, [self._passed()])[0])

    def _stop(self) -> None:
        if not self.reached:
            log.info("train.max_hours=%g reached: training stops here", self.max_hours)
        self.reached = True
        self.model.stop_training = True

    def check(self, metrics_uri: str) -> None:
        """Raise TimeLimitReached (exit 5) if the limit stopped training."""
        if self.reached:
            raise TimeLimitReached(
                f"train.max_hours={self.max_hours} reached: training stopped early, metrics "
                f"written to {metrics_uri} (stopped_at_time_limit: true), model not exported"
            )


@dataclass(frozen=True)
class Phase:
    """One call of `fit`: its `name` in the log, its learning rate, its `epochs` after
    `initial_epoch`, and where its backups go (None: no backups, no resume)."""

    name: str
    learning_rate: float
    epochs: int
    initial_epoch: int = 0
    backup_dir: str | None = None
    callbacks: tuple = ()  # this phase's own, after the run's
    # Steps in one call of the compiled step (Keras' steps_per_execution); the callbacks run
    # after each call. It must divide the phase's steps per epoch.
    steps_per_execution: int = 1
    evaluates: str = "test"  # what its validation data is: test | validation (the log's name)


@dataclass(frozen=True)
class Training:
    """What every phase of a run shares: its epochs in all (for the log), the TensorBoard
    folder, how often backups are written (`backup_every_steps`, 0: at each epoch's end), the
    run's own callbacks, and XLA (`jit_compile`)."""

    total_epochs: int
    log_dir: str
    backup_every_steps: int = 0
    callbacks: tuple = ()
    jit_compile: bool | str = "auto"


def fit(
    model: keras.Model,
    train_data,
    test_data,
    *,
    phase: Phase,
    training: Training,
    steps_per_epoch: int | None = None,
) -> keras.callbacks.History:
    """(Re)compile `model` with Adam at the phase's learning rate, train its epochs, evaluating
    on `test_data` after each. Recompiling is what makes changed `trainable` flags take effect.
    With a backup folder, the state is backed up every `training.backup_every_steps` (0: every
    epoch) and a run that finds a backup there resumes from it."""
    # Inside the model's strategy scope, so the optimizer's variables are distributed like the
    # model's (MirroredStrategy, MultiWorkerMirroredStrategy).
    with model.distribute_strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(phase.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
            jit_compile=training.jit_compile,
            steps_per_execution=phase.steps_per_execution,
        )
    tensorboard = keras.callbacks.TensorBoard(training.log_dir, write_graph=False)
    callbacks = [
        tensorboard,
        EpochLog(training.total_epochs, phase.name, evaluates=phase.evaluates),
        StopOnNonFiniteLoss(phase.name),
        *training.callbacks,
        *phase.callbacks,
    ]
    if phase.backup_dir is not None:
        backup = Backup(phase.backup_dir, training.backup_every_steps, phase.name)
        callbacks += [backup, StopOnSigterm(backup, tensorboard)]
    with SIGTERM.during_fit():
        return model.fit(
            train_data,
            validation_data=test_data,
            initial_epoch=phase.initial_epoch,
            epochs=phase.initial_epoch + phase.epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            shuffle=False,  # the datasets shuffle themselves, every epoch
            verbose=1 if sys.stdout.isatty() else 0,  # progress bar for people, lines for logs
        )


def predict_in_batches(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """`model(x)` batch by batch on this process alone, in order, as float32: no tf.distribute
    collectives, so every worker can run it (the head on cached features costs milliseconds)."""
    parts = [
        keras.ops.convert_to_numpy(model(np.asarray(x[lo : lo + batch_size]), training=False))
        for lo in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)


def evaluate(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Accuracy, mean cross-entropy and the confusion matrix (rows: true, columns: predicted)."""
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return {
        "test_accuracy": float(np.mean(predicted == labels)),
        # 0.0 - x, not -x: a perfect model's loss is 0.0, not -0.0 (metrics.json, the sweep table)
        "test_loss": float(0.0 - np.mean(np.log(np.clip(picked, 1e-7, 1.0)))),
        "confusion_matrix": confusion.tolist(),
        "predicted": predicted,
    }
