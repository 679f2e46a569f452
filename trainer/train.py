"""Compile, fit, callbacks, evaluation."""

from __future__ import annotations

import logging
import sys
import time

import keras
import numpy as np

log = logging.getLogger(__name__)


class EpochLog(keras.callbacks.Callback):
    """One log line per epoch, so log files and `kubectl logs` read well without a progress bar."""

    def __init__(self, total_epochs: int, phase: str):
        super().__init__()
        self.total_epochs = total_epochs
        self.phase = phase
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        log.info(
            "epoch %d/%d (%s): loss %.4f accuracy %.4f | test_loss %.4f test_accuracy %.4f | "
            "lr %.3g | %.1f s",
            epoch + 1,
            self.total_epochs,
            self.phase,
            logs.get("loss", float("nan")),
            logs.get("accuracy", float("nan")),
            logs.get("val_loss", float("nan")),
            logs.get("val_accuracy", float("nan")),
            float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            time.perf_counter() - self.started,
        )


def fit(
    model: keras.Model,
    train_data,
    test_data,
    *,
    learning_rate: float,
    epochs: int,
    initial_epoch: int,
    total_epochs: int,
    log_dir: str,
    phase: str,
    extra_callbacks: list | None = None,
    jit_compile: bool | str = "auto",
    steps_per_epoch: int | None = None,
) -> keras.callbacks.History:
    """(Re)compile `model` with Adam at `learning_rate`, train `epochs` more epochs, evaluating on
    `test_data` after each. Recompiling is what makes changed `trainable` flags take effect."""
    # Inside the model's strategy scope, so the optimizer's variables are distributed like the
    # model's (MirroredStrategy, MultiWorkerMirroredStrategy).
    with model.distribute_strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
            jit_compile=jit_compile,
        )
    callbacks = [
        keras.callbacks.TensorBoard(log_dir, write_graph=False),
        EpochLog(total_epochs, phase),
        *(extra_callbacks or []),
    ]
    return model.fit(
        train_data,
        validation_data=test_data,
        initial_epoch=initial_epoch,
        epochs=initial_epoch + epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        shuffle=False,  # the datasets shuffle themselves, every epoch
        verbose=1 if sys.stdout.isatty() else 0,  # progress bar for people, log lines for logs
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
        "test_loss": float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0)))),
        "confusion_matrix": confusion.tolist(),
        "predicted": predicted,
    }
