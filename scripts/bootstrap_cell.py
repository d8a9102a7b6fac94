"""The Colab bootstrap: the first code cell of every chapter, written from this one source.

    python scripts/bootstrap_cell.py          # check that every chapter opens with the cell below (exit 1 if not)
    python scripts/bootstrap_cell.py --write  # put it there (replacing an older bootstrap cell)

``utils`` cannot be imported before the project is cloned, so the cell cannot live in ``utils``; it is copied,
identical, into every chapter, and ``tests/test_colab_bootstrap.py`` checks the copies and runs the cell under a
simulated Colab.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/phi3-lora-lab/phi3-lora-lab"
MARKER = "# Colab setup"

CELL = f'''{MARKER} (the same cell opens every chapter; elsewhere it does nothing). On Colab it clones the project,
# installs its pinned libraries while keeping Colab's own torch (requirements.txt lists no torch), and keeps
# outputs/ on Google Drive, because every Colab notebook runs on a fresh machine.
import os
import sys

if "google.colab" in sys.modules:
    LAB_REPO = os.environ.get("PHI3_LAB_REPO", "{REPOSITORY}")
    LAB_HOME = os.environ.get("PHI3_LAB_HOME", "/content/phi3-lora-lab")
    if not os.path.isdir(LAB_HOME):
        !git clone --depth 1 {{LAB_REPO}} {{LAB_HOME}}
    %pip install -q -r {{LAB_HOME}}/requirements.txt
    os.chdir(os.path.join(LAB_HOME, "notebooks"))
    sys.path.insert(0, LAB_HOME)
    from google.colab import drive

    try:
        drive.mount("/content/drive")
        os.environ.setdefault("PHI3_LAB_OUTPUTS", "/content/drive/MyDrive/phi3-lora-lab-outputs")
    except Exception as err:
        print(f"Google Drive is not mounted ({{err}}). Outputs stay on this runtime under {{LAB_HOME}}/outputs and "
              "vanish with it: run the chapters in order in this runtime, or re-run this cell and allow Drive access.")'''


def chapters() -> list[Path]:
    """Every chapter notebook, in reading order."""
    return sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def is_bootstrap(cell: nbformat.NotebookNode) -> bool:
    """True for this bootstrap cell or an older one (any code cell that tests for ``google.colab``)."""
    return cell.cell_type == "code" and (cell.source.startswith(MARKER) or '"google.colab" in sys.modules' in cell.source)


def first_code_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """The notebook's first code cell, or None."""
    return next((c for c in nb.cells if c.cell_type == "code"), None)


def write(path: Path) -> bool:
    """Put ``CELL`` right after the title cell of the notebook at ``path`` (older bootstrap cells removed); True if changed."""
    nb = nbformat.read(path, as_version=4)
    first = first_code_cell(nb)
    if first is not None and first.source == CELL and nb.cells.index(first) <= 1:
        return False
    nb.cells = [c for c in nb.cells if not is_bootstrap(c)]
    at = 1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0
    nb.cells.insert(at, nbformat.v4.new_code_cell(CELL))
    nbformat.write(nb, path)
    return True


def problems() -> list[str]:
    """``PATH: reason`` for every chapter whose first code cell is not ``CELL``."""
    out = []
    for path in chapters():
        first = first_code_cell(nbformat.read(path, as_version=4))
        if first is None or first.source != CELL:
            out.append(f"{path.relative_to(PROJECT_ROOT)}: the first code cell is not the Colab bootstrap; "
                       "run `python scripts/bootstrap_cell.py --write`")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the cell into every chapter")
    args = parser.parse_args(argv)
    if args.write:
        for path in chapters():
            if write(path):
                print("wrote", path.relative_to(PROJECT_ROOT))
    found = problems()
    print("\n".join(found) or f"all {len(chapters())} chapters open with the Colab bootstrap")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
