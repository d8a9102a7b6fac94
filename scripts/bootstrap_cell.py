"""The Colab bootstrap: the first code cell of every chapter and every solutions notebook, written from this source.

    python scripts/bootstrap_cell.py          # check that every notebook opens with its cell (exit 1 if not)
    python scripts/bootstrap_cell.py --write  # put it there (replacing an older bootstrap cell)

``utils`` cannot be imported before the project is cloned, so the cell cannot live in ``utils``; it is generated
from ``TEMPLATE`` into every notebook. The cells are identical except their first settings line: which chapter
this is, the earlier chapters whose outputs it reads (for the refused-Drive message) and the extra requirement
files it needs (chapter 07's deployment libraries). ``tests/test_colab_bootstrap.py`` checks the copies and runs
the cell under a simulated Colab; ``tests/test_colab_install.py`` runs its real install into Colab's stack.

**The repository address is one setting, ``REPOSITORY`` below.** It is empty until the project is published:
then the cell stops with one line saying what to set. Publish the project (README, *Colab*), set ``REPOSITORY``
to its clone address and run ``python scripts/bootstrap_cell.py --write``: the cells and the Colab badges in the
chapters' title cells then point there. On Colab, ``PHI3_LAB_REPO`` overrides it for one runtime.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ""  # the published clone address, e.g. "https://github.com/OWNER/phi3-lora-lab"; empty: not published
MARKER = "# Colab setup"

# What each chapter reads from earlier chapters' outputs (the README's chapter table; 00 and 05 write nothing).
# A new notebook needs its entry here (and in SOLUTION_READS); --write and the test say so when it is missing.
READS: dict[str, list[str]] = {"00": [], "01": [], "02": ["01"], "03": ["01"], "04": ["01", "03"], "05": ["03", "04"],
                               "06": ["02", "03", "04"], "07": ["01", "03", "04", "06"], "08": ["01"],
                               "09": []}  # 09 reads only the learner's own data file
# What each worked-solutions notebook reads (its title cell says so).
SOLUTION_READS: dict[str, list[str]] = {"00": [], "01": ["01"], "02": ["02"], "03": ["01"], "04": ["01", "04"],
                                        "05": ["03", "04"], "06": ["03", "06"], "07": ["07"], "08": ["08"],
                                        "09": ["09"]}
# Requirement files a chapter needs beyond requirements.txt (the workshop set that chapters 00-06 need).
EXTRAS: dict[str, list[str]] = {"07": ["requirements-deploy.txt"]}

TEMPLATE = '''{marker}: the same cell opens every notebook (scripts/bootstrap_cell.py writes it); elsewhere it does nothing.
# On Colab it clones the project, installs what this notebook needs into Colab's own stack (keeping Colab's torch),
# and keeps outputs/ on Google Drive, because every Colab notebook runs on a fresh machine.
LAB_REPO = "{repository}"  # the project's clone address (README, "Colab"); PHI3_LAB_REPO overrides it
LAB_NOTEBOOK, LAB_NEEDS, LAB_EXTRAS = {notebook!r}, {needs!r}, {extras!r}
import os
import sys

# (Notebooks that scripts/run_series.py runs from a runtime this cell has set up inherit its setup and skip it.)
if "google.colab" in sys.modules and os.environ.setdefault("PHI3_LAB_SETUP_PID", str(os.getpid())) == str(os.getpid()):
    import importlib.metadata as _md
    import re
    import shutil
    import subprocess

    class LabSetupError(Exception):
        def _render_traceback_(self):  # IPython shows this one line, not a traceback
            return [f"Colab setup stopped: {{self}}"]

    def _versions():
        return {{re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in _md.distributions()}}

    def _last_line(text):
        return (text.strip().splitlines() or ["no message"])[-1]

    LAB_REPO = os.environ.get("PHI3_LAB_REPO") or LAB_REPO
    LAB_HOME = os.environ.get("PHI3_LAB_HOME", "/content/phi3-lora-lab")
    if not os.path.isdir(LAB_HOME):
        if not LAB_REPO:
            raise LabSetupError("no repository address: set LAB_REPO at the top of this cell (or the PHI3_LAB_REPO "
                                "environment variable) to the project's git clone address, then run this cell again.")
        shutil.rmtree(LAB_HOME + ".partial", ignore_errors=True)  # an interrupted earlier clone
        clone = subprocess.run(["git", "clone", "--quiet", "--depth", "1", LAB_REPO, LAB_HOME + ".partial"],
                               capture_output=True, text=True)
        if clone.returncode:
            raise LabSetupError(f"could not clone {{LAB_REPO}} ({{_last_line(clone.stderr)}}): check the address "
                                "and that this runtime reaches the internet, then run this cell again.")
        os.rename(LAB_HOME + ".partial", LAB_HOME)
    before = _versions()
    files = [arg for name in ["requirements.txt", *LAB_EXTRAS] for arg in ("-r", os.path.join(LAB_HOME, name))]
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *files], capture_output=True, text=True)
    if pip.returncode:
        raise LabSetupError(f"pip could not install the project's libraries ({{_last_line(pip.stderr)}}); "
                            "check that this runtime reaches the internet, then run this cell again.")
    after = _versions()
    loaded = {{os.path.realpath(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)}}
    stale = [n for n, v in sorted(before.items()) if after.get(n, v) != v  # changed, with a file this kernel loaded
             and any(os.path.realpath(f.locate()) in loaded for f in _md.distribution(n).files or [])]
    if stale:
        print(f"Updated {{', '.join(stale)}}, which this runtime had already loaded: restarting the runtime now. "
              "When it is back, run this cell again (it skips what is done).", flush=True)
        os.kill(os.getpid(), 9)
    os.chdir(os.path.join(LAB_HOME, "notebooks"))
    if LAB_HOME not in sys.path:
        sys.path.insert(0, LAB_HOME)
    if LAB_HOME not in os.environ.get("PYTHONPATH", "").split(os.pathsep):  # for run_series.py's kernels
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LAB_HOME, os.environ.get("PYTHONPATH")) if p)
    from google.colab import drive

    try:
        drive.mount("/content/drive")
        os.environ.setdefault("PHI3_LAB_OUTPUTS", "/content/drive/MyDrive/phi3-lora-lab-outputs")
    except Exception as err:
        if LAB_NEEDS:
            print(f"Google Drive is not mounted ({{err}}), and this fresh runtime has none of the outputs of chapters "
                  f"{{', '.join(LAB_NEEDS)}} that {{LAB_NOTEBOOK}} reads: run them here first with `!python "
                  f"../scripts/run_series.py --only {{' '.join(LAB_NEEDS)}}`, or run this cell again and allow Drive.")
        else:
            print(f"Google Drive is not mounted ({{err}}): what {{LAB_NOTEBOOK}} writes stays on this runtime and "
                  "vanishes with it, out of reach of later chapters; run this cell again and allow Drive to keep it.")
    print(f"Colab setup done: the project in {{LAB_HOME}}, outputs in "
          f"{{os.environ.get('PHI3_LAB_OUTPUTS', os.path.join(LAB_HOME, 'outputs'))}}.")'''


def chapters() -> list[Path]:
    """Every chapter notebook, in reading order."""
    return sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def solutions() -> list[Path]:
    """Every worked-solutions notebook, in reading order."""
    return sorted((PROJECT_ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))


def notebooks() -> list[Path]:
    """Every notebook that opens with the bootstrap: the chapters, then the solutions."""
    return chapters() + solutions()


def chain(reads: list[str]) -> list[str]:
    """The chapters to run, in order, so that every chapter in ``reads`` finds what it reads."""
    needed: set[str] = set()
    todo = list(reads)
    while todo:
        chapter = todo.pop()
        if chapter not in needed:
            needed.add(chapter)
            todo += READS.get(chapter, [])
    return sorted(needed)


def settings(path: Path) -> tuple[str, list[str], list[str]]:
    """(name shown to the learner, chapters to run first, extra requirement files) for one notebook."""
    number, solution = path.name[:2], path.parent.name == "solutions"
    reads = (SOLUTION_READS if solution else READS).get(number)
    if reads is None:
        raise SystemExit(f"scripts/bootstrap_cell.py: {path.relative_to(PROJECT_ROOT)} has no entry in "
                         f"{'SOLUTION_READS' if solution else 'READS'}; add what it reads from earlier chapters")
    name = f"solutions {number}" if solution else f"chapter {number}"
    return name, chain(reads), EXTRAS.get(number, [])


def cell_for(path: Path) -> str:
    """The bootstrap cell's source for the notebook at ``path``."""
    name, needs, extras = settings(path)
    return TEMPLATE.format(marker=MARKER, repository=REPOSITORY, notebook=name, needs=needs, extras=extras)


def badge_url(path: Path) -> str | None:
    """The Colab badge's target for ``path`` when ``REPOSITORY`` is a GitHub address, else None."""
    match = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(?:\.git)?/?", REPOSITORY)
    if not match:
        return None
    return f"https://colab.research.google.com/github/{match[1]}/blob/main/{path.relative_to(PROJECT_ROOT).as_posix()}"


BADGE = re.compile(r"\(https://colab\.research\.google\.com/github/[^)\s]+\)")


def is_bootstrap(cell: nbformat.NotebookNode) -> bool:
    """True for this bootstrap cell or an older one (any code cell that tests for ``google.colab``)."""
    return cell.cell_type == "code" and (cell.source.startswith(MARKER) or '"google.colab" in sys.modules' in cell.source)


def first_code_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """The notebook's first code cell, or None."""
    return next((c for c in nb.cells if c.cell_type == "code"), None)


def write(path: Path) -> bool:
    """Put the cell right after the title cell of the notebook at ``path`` (older bootstrap cells removed, the
    cell id of the one it replaces kept) and point its Colab badge at ``REPOSITORY``; True if changed."""
    nb = nbformat.read(path, as_version=4)
    cell, changed = cell_for(path), False
    url = badge_url(path)
    if url and nb.cells and nb.cells[0].cell_type == "markdown" and BADGE.search(nb.cells[0].source):
        title = BADGE.sub(f"({url})", nb.cells[0].source)
        changed, nb.cells[0].source = title != nb.cells[0].source, title
    first = first_code_cell(nb)
    if not (first is not None and first.source == cell and nb.cells.index(first) <= 1):
        old = [c for c in nb.cells if is_bootstrap(c)]
        nb.cells = [c for c in nb.cells if not is_bootstrap(c)]
        new = nbformat.v4.new_code_cell(cell)
        if old:
            new.id = old[0].get("id", new.id)
        nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0, new)
        changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def problems() -> list[str]:
    """``PATH: reason`` for every notebook whose first code cell is not its bootstrap cell."""
    out = []
    for path in notebooks():
        first = first_code_cell(nbformat.read(path, as_version=4))
        if first is None or first.source != cell_for(path):
            out.append(f"{path.relative_to(PROJECT_ROOT)}: the first code cell is not the Colab bootstrap; "
                       "run `python scripts/bootstrap_cell.py --write`")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the cell into every chapter and solutions notebook")
    args = parser.parse_args(argv)
    if args.write:
        for path in notebooks():
            if write(path):
                print("wrote", path.relative_to(PROJECT_ROOT))
    found = problems()
    print("\n".join(found) or f"all {len(notebooks())} notebooks open with the Colab bootstrap")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
