"""The benchmark behind scripts/benchmark.py: `harness` runs and measures each row in its own
process, `report` prints the table and notes and draws the chart, `recipes` are the rows that
are not the trainer (the floor, Keras' guide, the seed tutorial), run inside those children,
and `probe` runs the trainer as `python -m trainer` does, noting the conv1 kernel it loaded.

What the --json file holds is defined here once, and `kernel_digest`, which every row uses to
name the weights it loaded; tests/test_benchmark.py imports both.
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(REPO, "scripts", "benchmark.py")  # the children run `ENTRY _recipe NAME`
CLASSES = ["hotdog", "not-hotdog"]
RECIPES = ("floor", "keras_guide", "seed_recipe")
SKIPPABLE = RECIPES  # every row but the trainer's

# Keys of the --json file, in its order. FIGURE_KEYS are the contract (positive
# numbers; accuracies in 0..1); CONTEXT_KEYS say how the figures were made, so a reader of the
# file alone can judge them; SWEEP_KEYS come with --sweep. A skipped row's keys are left out.
FIGURE_KEYS = (
    "floor_s",
    "trainer_s",
    "trainer_peak_rss_mb",
    "trainer_accuracy",
    "keras_guide_s",
    "keras_guide_accuracy",
    "seed_recipe_s",
    "seed_recipe_accuracy",
    "trainer_backbone_s",
    "trainer_head_s",
    "trainer_export_s",
    "trainer_startup_s",
)
SWEEP_KEYS = (
    "sweep_s",
    "sweep_points",
    "sweep_cpu_s",
    "sweep_peak_rss_mb",
    "sweep_backbone_passes",
)
CONTEXT_KEYS = (
    "floor_folded_s",
    "trainer_feature_cache",
    "skipped",
    "floor_batch_size",
    "floor_cpu_s",
    "floor_folded_cpu_s",
    "trainer_cpu_s",
    "keras_guide_cpu_s",
    "seed_recipe_cpu_s",
    "keras_guide_peak_rss_mb",
    "seed_recipe_peak_rss_mb",
    "trainer_phases_s",
    "train_images",
    "test_images",
    "image_size",
    "epochs",
    "weights",
    "machine",
    "load_average",
    "started_utc",
    "dataset_generation_s",
)
# With --data DIR --weights PATH: the folders' class count, and what each row trained on and
# loaded (its class count; kernel_digest of its conv1 kernel once the weights were in), so a
# reader can check that every row ran on the same classes with the same weights.
REAL_KEYS = (
    "data",
    "classes",
    "trainer_classes",
    "keras_guide_classes",
    "seed_recipe_classes",
    "trainer_conv1_digest",
    "keras_guide_conv1_digest",
    "seed_recipe_conv1_digest",
    "seed_recipe_top",
)
KEYS = FIGURE_KEYS + SWEEP_KEYS + CONTEXT_KEYS + REAL_KEYS


def kernel_digest(kernel) -> str:
    """The first 12 hex digits of the SHA-256 of `kernel` as float32 bytes (C order): equal
    digests, the same values. Takes a NumPy array or a Keras variable."""
    import hashlib

    import numpy as np

    array = np.ascontiguousarray(np.asarray(kernel, dtype=np.float32))
    return hashlib.sha256(array.tobytes()).hexdigest()[:12]
