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


def pipeline_diagram() -> Figure:
    """The series as a row of boxes: which chapter produces what the next one reads."""
    steps = ["00 setup\nminiature base", "01 data\nsplits", "02 LoRA\nloralib", "03 LoRA\npeft + TRL",
             "04 QLoRA\n4-bit NF4", "05 inference\nadapters", "06 evaluation\nresults.json"]
    fig, ax = plt.subplots(figsize=(11, 1.6))
    for i, label in enumerate(steps):
        ax.add_patch(plt.Rectangle((i * 1.5, 0), 1.2, 1, fc="#dbe9f6" if i != 4 else "#fde2c8", ec="#345"))
        ax.text(i * 1.5 + 0.6, 0.5, label, ha="center", va="center", fontsize=8.5)
        if i < len(steps) - 1:
            ax.annotate("", xy=(i * 1.5 + 1.5, 0.5), xytext=(i * 1.5 + 1.2, 0.5),
                        arrowprops={"arrowstyle": "->", "color": "#345"})
    ax.set_xlim(-0.1, len(steps) * 1.5 - 0.2)
    ax.set_ylim(-0.1, 1.1)
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
