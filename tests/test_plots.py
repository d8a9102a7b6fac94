"""The figures in utils/plots.py: the series diagram names every chapter, in order, and draws one box each."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from utils import plots  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_series_lists_chapters_00_to_09_in_order() -> None:
    assert [number for number, _, _ in plots.SERIES] == [f"{i:02d}" for i in range(10)]


def test_every_chapter_notebook_is_in_the_series() -> None:
    numbers = {number for number, _, _ in plots.SERIES}
    chapters = {p.name[:2] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert chapters and chapters <= numbers, f"notebooks missing from plots.SERIES: {sorted(chapters - numbers)}"


def test_pipeline_diagram_draws_one_box_per_chapter_in_rows() -> None:
    fig = plots.pipeline_diagram(per_row=5)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if isinstance(p, Rectangle)]
    labels = [t.get_text().split()[0] for t in ax.texts if t.get_text()]
    assert len(boxes) == len(plots.SERIES) and labels == [number for number, _, _ in plots.SERIES]
    assert len({round(b.get_y(), 3) for b in boxes}) == 2  # ten chapters, five to a row
    plt.close(fig)
