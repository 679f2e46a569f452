"""What a run's figures say: the markdown table, the notes under it (targets met or missed, the
trainer's phases, the machine) and the bar chart."""

from __future__ import annotations

import os

ROWS = (
    ("floor", "floor: backbone forward pass only"),
    ("floor_folded", "the same, BatchNorm folded (the trainer's backbone)"),
    ("trainer", "trainer (`python -m trainer`)"),
    ("keras_guide", "Keras transfer-learning guide"),
    ("seed_recipe", "seed tutorial recipe"),
    ("sweep", "sweep: N-point grid, one `python -m trainer -m`"),
)
# (row, "<=" or ">=", factor, the row it is compared with): the targets.
RATIO_TARGETS = (
    ("trainer", "<=", None, "floor"),  # None: the floor target, which depends on the size
    ("keras_guide", ">=", 8, "trainer"),
    ("seed_recipe", ">=", 10, "trainer"),
    ("sweep", "<=", 2.5, "trainer"),
)


def _rows(figures: dict) -> list[tuple[str, str]]:
    """The rows this run measured (skipped ones and a sweep not asked for are left out)."""
    rows = [(key, label) for key, label in ROWS if f"{key}_s" in figures]
    return [
        (key, label.replace("N-point", f"{figures['sweep_points']}-point"))
        if key == "sweep"
        else (key, label)
        for key, label in rows
    ]


def _ratio(figures: dict, key: str, unit: str, digits: int = 2) -> str:
    value, trainer = figures.get(f"{key}_{unit}"), figures.get(f"trainer_{unit}")
    return "-" if value is None or not trainer else f"{value / trainer:.{digits}f}"


def markdown_table(figures: dict) -> str:
    """Seconds, images/s, ratios to the trainer (wall and CPU), CPU cores kept busy, accuracy,
    peak RSS: one row per contender. A row whose cores-busy figure is far below the machine's
    core count was starved by other processes, and its wall seconds are inflated."""
    lines = [
        f"{figures['train_images']} train + {figures['test_images']} test images"
        f"{_classes(figures)}, {figures['image_size']} px, {figures['epochs']} epochs, "
        f"ResNet50 with {_weights(figures)}",
        "",
        "| run | seconds | images/s | x trainer | CPU s | x trainer (CPU) | cores busy "
        "| test accuracy | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_table_row(figures, key=key, label=label) for key, label in _rows(figures)]
    return "\n".join(lines)


def _classes(figures: dict) -> str:
    """' in C classes from DIR' for a --data run; '' for generated data (two classes)."""
    return f" in {figures['classes']} classes from {figures['data']}" if "data" in figures else ""


def _weights(figures: dict) -> str:
    """What the rows' ResNet50 started from: 'random init', or the weights file --weights named."""
    if "data" not in figures:
        return "random init"
    return f"the weights of {os.path.basename(figures['weights'])}"


def weights_check(figures: dict) -> list[str]:
    """A --data run's lines on what each row trained on: its class count and its conv1 kernel
    digest after loading (equal digests: the same weights), and the seed recipe's top."""
    if "data" not in figures:
        return []
    rows = [r for r in ("trainer", "keras_guide", "seed_recipe") if f"{r}_conv1_digest" in figures]
    digests = {figures[f"{row}_conv1_digest"] for row in rows}
    classes = {figures[f"{row}_classes"] for row in rows}
    same = "the same weights" if len(digests) == 1 else "NOT the same weights"
    lines = [
        f"Weights: conv1 kernel digest after loading, {same}: "
        + ", ".join(f"{row} {figures[f'{row}_conv1_digest']}" for row in rows),
        f"Classes trained on ({figures['classes']} folders"
        f"{'' if classes == {figures['classes']} else ', NOT every row'}): "
        + ", ".join(f"{row} {figures[f'{row}_classes']}" for row in rows),
    ]
    if "seed_recipe_top" in figures:
        lines.append(f"The seed recipe's 1000-way top: {figures['seed_recipe_top']}.")
    return lines


def _table_row(figures: dict, *, key: str, label: str) -> str:
    images = figures["train_images"] + figures["test_images"]
    seconds, cpu_s = figures[f"{key}_s"], figures.get(f"{key}_cpu_s")
    accuracy, rss = figures.get(f"{key}_accuracy"), figures.get(f"{key}_peak_rss_mb")
    if key in ("floor", "floor_folded"):
        label = f"{label} (batch {figures['floor_batch_size']})"
    rate = "-" if key == "sweep" else f"{images / seconds:.1f}"  # a sweep reads them P times
    return (
        f"| {label} | {seconds:.1f} | {rate} | {_ratio(figures, key, 's')} | "
        f"{'-' if cpu_s is None else f'{cpu_s:.0f}'} | {_ratio(figures, key, 'cpu_s')} | "
        f"{'-' if cpu_s is None else f'{cpu_s / seconds:.2f}'} | "
        f"{'-' if accuracy is None else f'{accuracy:.3f}'} | "
        f"{'-' if rss is None else f'{rss:.0f}'} |"
    )


def floor_target(figures: dict) -> float:
    """trainer_s / floor_s may be 1.15 at the default size (2,000 + 800 images, 224 px), 1.5
    elsewhere."""
    images = figures["train_images"] + figures["test_images"]
    return 1.15 if (images, figures["image_size"]) == (2800, 224) else 1.5


def ratio_checks(figures: dict, *, unit: str) -> list[tuple[str, bool]]:
    """(target, met) of each ratio target whose two rows were measured, in `unit` (s, cpu_s)."""
    checks = []
    for left, op, factor, right in RATIO_TARGETS:
        factor = factor or floor_target(figures)
        a, b = figures.get(f"{left}_{unit}"), figures.get(f"{right}_{unit}")
        if a is None or b is None:
            continue
        ok = a <= factor * b if op == "<=" else a >= factor * b
        checks.append((f"{left}_{unit} {op} {factor} x {right}_{unit}", ok))
    return checks


def target_checks(figures: dict) -> list[tuple[str, bool]]:
    """(target, met) of every target the run can be judged by."""
    export_s = figures.get("trainer_export_s")
    return [
        *ratio_checks(figures, unit="s"),
        ("trainer accuracy >= 0.95", figures["trainer_accuracy"] >= 0.95),
        ("trainer peak RSS < 3 GB", figures["trainer_peak_rss_mb"] < 3 * 1024),
        *([("trainer_export_s <= 5", export_s <= 5)] if export_s is not None else []),
        *((f"(by CPU time) {text}", ok) for text, ok in ratio_checks(figures, unit="cpu_s")),
    ]


def notes(figures: dict) -> str:
    """How to read the table, the targets checked, the trainer's phases, the machine."""
    fig = figures
    images = fig["train_images"] + fig["test_images"]
    folded = fig.get("floor_folded_s")
    overhead = (
        [
            f"Not a target: trainer_s / floor_folded_s = {fig['trainer_s'] / folded:.2f} (the "
            "trainer against its own backbone's bare forward pass, folded BatchNorm; "
            f"Keras' pass takes {fig['floor_s'] / folded:.2f}x as long)"
        ]
        if folded
        else []
    )
    lines = [
        f"images/s = {images} dataset images / seconds (end to end; the floor: its forward pass "
        "alone). CPU s = user + system seconds of the run's process, all threads; cores busy = "
        "CPU s / seconds. "
        + (
            "Every row loaded --weights (the floor is skipped with --data: its time does not "
            "depend on the weights)."
            if "data" in fig
            else "Every model has random weights (no download); the compute is the ImageNet one."
        ),
        f"Targets (trainer_s <= 1.15 x floor_s at the default size, 2,000 + 800 images, 224 px;"
        f" <= 1.5 x elsewhere; skipped rows: {', '.join(fig.get('skipped', [])) or 'none'}):",
        *(f"  [{'met' if ok else 'MISSED'}] {text}" for text, ok in target_checks(fig)),
        *overhead,
        *weights_check(fig),
        "Trainer phases (s, from its metrics.json timings; the rest of its process time last):",
        *(f"  {k}: {v}" for k, v in fig["trainer_phases_s"].items()),
        f"Machine: {fig['machine']}.",
        f"Load average (1, 5, 15 min) at start {_load(fig['load_average']['start'])}, "
        f"at end {_load(fig['load_average']['end'])}: above the core count means other "
        "processes shared the CPU during the run.",
    ]
    return "\n".join(lines)


def _load(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def draw_chart(figures: dict, path: str) -> None:
    """A horizontal bar chart of seconds per run, labelled with the ratio to the trainer (Pillow,
    already a dependency, so the benchmark needs nothing more)."""
    from PIL import Image, ImageDraw

    width, bar_h, gap, left, top = 1100, 44, 22, 330, 70
    rows = _rows(figures)
    height = top + len(rows) * (bar_h + gap) + 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _fonts()
    title = (
        f"Seconds to a trained model: {figures['train_images']} + {figures['test_images']} "
        f"images, {figures['image_size']} px, {figures['epochs']} epochs (lower is better)"
    )
    draw.text((20, 20), title, fill="black", font=font)
    scale = (width - left - 300) / max(figures[f"{key}_s"] for key, _ in rows)
    for i, (key, label) in enumerate(rows):
        y = top + i * (bar_h + gap)
        draw.text((20, y + 12), label.replace("`", ""), fill="black", font=small)
        _bar(draw, figures, key=key, box=(left, y, scale, bar_h), font=small)
    footer = [
        f"ResNet50 with {_weights(figures)} everywhere"
        if "data" in figures
        else "ResNet50 with random init everywhere (no download): the same compute as ImageNet "
        "weights",
        figures["machine"],
    ]
    for i, line in enumerate(footer):
        draw.text((20, height - 48 + 20 * i), line, fill="#555555", font=small)
    image.save(path)


def _fonts():
    """(title font, label font): Pillow's default font at two sizes."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=18), ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default(), ImageFont.load_default()


def _bar(draw, figures: dict, *, key: str, box: tuple, font) -> None:
    """Row `key`'s bar from (left, y), `scale` pixels a second, and its figures beside it."""
    colours = {"floor": "#9e9e9e", "trainer": "#2e7d32", "keras_guide": "#1565c0"}
    left, y, scale, bar_h = box
    seconds = figures[f"{key}_s"]
    draw.rectangle(
        (left, y, left + max(2, seconds * scale), y + bar_h), fill=colours.get(key, "#c62828")
    )
    text = (
        f"{seconds:.{0 if seconds >= 10 else 1}f} s  ({_ratio(figures, key, 's')}x;"
        f" CPU {_ratio(figures, key, 'cpu_s')}x)"
    )
    accuracy = figures.get(f"{key}_accuracy")
    if accuracy is not None:
        text += f"  acc {accuracy:.2f}"
    draw.text((left + seconds * scale + 8, y + 12), text, fill="black", font=font)
