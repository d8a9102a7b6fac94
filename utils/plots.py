"""Matplotlib figures the chapters show; each is also saved as a PNG under ``outputs/plots/``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from utils import config


def save(fig: Figure, name: str) -> Path:
    """Save a figure as ``outputs/plots/<name>.png`` and return the path."""
    folder = config.outputs_dir() / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# The series in reading order: (chapter number, title, what it hands on). Chapter 09 is the capstone.
SERIES: tuple[tuple[str, str, str], ...] = (
    ("00", "setup", "miniature base"), ("01", "data", "splits"), ("02", "LoRA", "loralib"),
    ("03", "LoRA", "peft + TRL"), ("04", "QLoRA", "4-bit NF4"), ("05", "inference", "adapters, merges"),
    ("06", "evaluation", "results.json"), ("07", "deployment", "ONNX, GGUF"),
    ("08", "learning and", "forgetting"), ("09", "your own task", "capstone"))


def pipeline_diagram(per_row: int = 5) -> Figure:
    """The series as rows of boxes in reading order, ``per_row`` to a row; QLoRA and the capstone highlighted."""
    rows = -(-len(SERIES) // per_row)
    fig, ax = plt.subplots(figsize=(11, 1.25 * rows + 0.1))
    width, gap, height, row_gap = 1.5, 0.45, 0.8, 0.45
    fill = {"04": "#fde2c8", "09": "#d5ecd4"}
    for i, (number, title, hands_on) in enumerate(SERIES):
        row, col = divmod(i, per_row)
        x, y = col * (width + gap), -row * (height + row_gap)
        ax.add_patch(plt.Rectangle((x, y), width, height, fc=fill.get(number, "#dbe9f6"), ec="#345"))
        ax.text(x + width / 2, y + height / 2, f"{number} {title}\n{hands_on}", ha="center", va="center", fontsize=9)
        if i == len(SERIES) - 1:
            continue
        if col < per_row - 1:
            ax.annotate("", xy=(x + width + gap, y + height / 2), xytext=(x + width, y + height / 2),
                        arrowprops={"arrowstyle": "->", "color": "#345"})
        else:  # last box of a row: down into the gap, back left, and down into the next row's first box
            mid = y - row_gap / 2
            ax.plot([x + width / 2, x + width / 2, width / 2], [y, mid, mid], color="#345", lw=1)
            ax.annotate("", xy=(width / 2, y - row_gap), xytext=(width / 2, mid),
                        arrowprops={"arrowstyle": "->", "color": "#345", "shrinkA": 0, "shrinkB": 0})
    ax.set_xlim(-0.1, per_row * (width + gap) - gap + 0.1)
    ax.set_ylim(-(rows - 1) * (height + row_gap) - 0.1, height + 0.1)
    ax.axis("off")
    return fig


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 30,
              marks: dict[str, float] | None = None) -> Figure:
    """A histogram with optional labelled vertical lines (e.g. a max length)."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=bins, color="#4c72b0", alpha=0.85)
    for label, x in (marks or {}).items():
        ax.axvline(x, color="#c44e52", ls="--")
        ax.text(x, ax.get_ylim()[1] * 0.9, f" {label}", color="#c44e52", fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    return fig


def training_curves(history: list[dict], title: str) -> Figure:
    """Training loss, held-out loss and learning rate against the optimizer step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    lrs = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    if train:
        left.plot(*zip(*train), label="train loss", color="#4c72b0")
    if evals:
        left.plot(*zip(*evals), "o-", label="held-out loss", color="#c44e52")
    left.set(xlabel="step", ylabel="loss (assistant tokens)", title=title, yscale="log")
    left.legend()
    if lrs:
        right.plot(*zip(*lrs), color="#55a868")
    right.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    return fig


def bars(table: dict[str, dict[str, float]], metrics: Sequence[str], title: str) -> Figure:
    """Grouped bars: one group per metric, one bar per variant (rates in [0, 1])."""
    variants = list(table)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(len(variants), 1)
    for j, variant in enumerate(variants):
        xs = [i + j * width for i in range(len(metrics))]
        ax.bar(xs, [table[variant].get(m, 0.0) for m in metrics], width, label=variant)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics)
    ax.set(ylim=(0, 1.05), title=title)
    ax.legend(fontsize=8, ncol=min(len(variants), 5), loc="lower center", bbox_to_anchor=(0.5, 1.1))
    fig.tight_layout()
    return fig
