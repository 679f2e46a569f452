"""`python -m scripts.bench.probe RESULT [overrides]`: `python -m trainer [overrides]`, which
also writes RESULT, {"conv1_digest": ...}, the kernel_digest of the conv1 kernel its backbone
holds once `model.weights` is loaded.

The trainer folds each BatchNorm into its conv before it runs (trainer/fold.py), so neither
its outputs nor its SavedModel hold the kernel it loaded; the digest is taken as the file is
loaded, in trainer.model.load_weights. That module imports TensorFlow, which the trainer imports
late on purpose (its start-up is measured), so it is wrapped as it is imported, not imported
here. Everything else is the trainer's own run, start to exit.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import runpy
import sys

MODULE = "trainer.model"


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds trainer.model as Python would, and wraps its load_weights once it is executed."""

    def __init__(self, result: str):
        self.result = result

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # once: the lookup below must not find this finder again
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.load_weights = _recording(module.load_weights, result=self.result)

        spec.loader.exec_module = exec_module
        return spec


def _recording(load_weights, *, result: str):
    """`load_weights` that then writes the backbone's conv1 kernel digest to `result`."""
    from scripts.bench import kernel_digest

    def load_and_record(backbone, path):
        load_weights(backbone, path)
        digest = kernel_digest(backbone.get_layer("conv1_conv").kernel)
        with open(result, "w", encoding="utf-8") as f:
            json.dump({"conv1_digest": digest}, f)

    return load_and_record


def main() -> None:
    result, overrides = sys.argv[1], sys.argv[2:]
    sys.meta_path.insert(0, _WrapOnImport(result))
    sys.argv = ["trainer", *overrides]  # runpy sets argv[0] to trainer/__main__.py
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
