"""Checks on the chapters as documents: prose a learner can finish, and the Colab bootstrap in first place."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bootstrap_cell  # noqa: E402

CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_WORDS = 1500


def markdown_words(path: Path) -> int:
    """Words of markdown in a notebook, counted as runs of letters, digits and apostrophes."""
    nb = nbformat.read(path, as_version=4)
    return sum(len(re.findall(r"[A-Za-z0-9']+", c.source)) for c in nb.cells if c.cell_type == "markdown")


def test_every_chapter_is_found() -> None:
    assert [p.name[:2] for p in CHAPTERS] == [f"{i:02d}" for i in range(len(CHAPTERS))] and len(CHAPTERS) >= 7


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_prose_a_learner_can_finish(path: Path) -> None:
    words = markdown_words(path)
    assert words <= MAX_WORDS, (f"notebooks/{path.name}: {words} words of markdown, at most {MAX_WORDS}: move build "
                                "history or evidence to docs/BUILD_NOTES.md, or shorten")


def test_word_count_counts_what_it_should(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("It's `SFTConfig` at 0.5, twice."),
                                         nbformat.v4.new_code_cell("not counted at all")])
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert markdown_words(tmp_path / "x.ipynb") == 6


@pytest.mark.parametrize("path", bootstrap_cell.notebooks(), ids=lambda p: p.name)
def test_bootstrap_is_the_first_code_cell(path: Path) -> None:
    first = bootstrap_cell.first_code_cell(nbformat.read(path, as_version=4))
    assert first is not None and first.source == bootstrap_cell.cell_for(path), (
        f"{path.relative_to(ROOT)}: the first code cell is not the Colab bootstrap; "
        "run `python scripts/bootstrap_cell.py --write`")


def readme_memory_table() -> dict[str, list[str]]:
    """The README's memory table: chapter -> its cells (measured, per layer, CPU fp32, GPU 16-bit, smallest GPU)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d\d_\w+", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_each_header_states_the_memory_the_readme_table_gives(path: Path) -> None:
    """A learner reads the chapter's header, not the README: both must say the same about Phi-3 Mini's memory."""
    table = readme_memory_table()
    assert path.stem in table, f"README.md's memory table has no row for {path.stem} (make memory-table)"
    _, _, cpu, gpu, smallest = table[path.stem]
    header = nbformat.read(path, as_version=4).cells[0].source
    line = next((l for l in header.splitlines() if l.startswith("**Phi-3 Mini:**")), "")
    if gpu.startswith("–"):  # runs on the CPU
        assert f"about {float(cpu.split()[0]):.0f} GiB of RAM" in line, (path.name, line)
        return
    assert f"about {float(gpu.split()[0]):.0f} GiB of GPU memory" in line and f"{smallest} or larger" in line, (
        path.name, line)
    if host := re.search(r"host RAM ([\d.]+) GiB", gpu):  # cells that run on the CPU on any machine (chapter 07)
        assert f"about {float(host.group(1)):.0f} GiB of RAM" in line, (path.name, line)
