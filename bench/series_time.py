"""Where the series' time goes: a per-chapter table from ``outputs/run_times.json`` (written by ``make run``).

With ``scripts/run_series.py --jobs 2`` (the miniature's default) two chapters run at once: each chapter's wall
time is its own, with another chapter beside it, and the series' time is the one in the first line.

    .venv/bin/python bench/series_time.py                       # outputs/run_times.json
    .venv/bin/python bench/series_time.py path/to/run_times.json

``scripts/run_series.py`` records, per notebook, its wall time, the summed time of its cells and its three
slowest cells (with the first line of each). From these the table splits each chapter into:

- **kernel + overhead**: wall time minus the cells' time (starting the kernel, nbclient's round trips);
- **imports/setup, model, training, evaluation**: the cells, sorted by the most expensive kind of call their code
  makes (training before evaluation before model loading; a cell counts as imports/setup only when it does
  nothing else, see ``CATEGORIES``; a cell it cannot place counts as *other*);
- **rest of cells**: cell time not in the cells listed.

``scripts/run_series.py`` records every code cell (``{"cell", "seconds", "starts", "source"}``) in a ``cells``
list, so *rest of cells* is only rounding. Older reports carry only the three slowest cells and their first line
(``slowest_cells``); those are classified by that line alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import config  # noqa: E402

# First match wins, tried on a cell's code without its import lines and comments: a training cell that starts
# with `from trl import SFTTrainer` is training, not imports. A cell left with nothing but imports, `config.` and
# the like is imports/setup.
CATEGORIES: list[tuple[str, re.Pattern]] = [
    ("training", re.compile(r"\.train\(|SFTTrainer\(|Trainer\(|train_sft|train_full|train_loralib|\.fit\(|"
                            r"run_grid|run_experiment", re.I)),
    ("evaluation", re.compile(r"evaluat|metrics|generate|assistant_loss|perplexity|score", re.I)),
    ("model", re.compile(r"load_model|load_adapter|from_pretrained|quantiz|merge|export|build_", re.I)),
    ("imports/setup", re.compile(r"^\s*$|config\.|silence_library_noise|hardware_report", re.I)),
]
IMPORT_OR_COMMENT = re.compile(r"^\s*(import\s|from\s+\S+\s+import\s|#|$)")
COLUMNS = ["kernel + overhead", "imports/setup", "model", "training", "evaluation", "other", "rest of cells"]


def category(source: str) -> str:
    """What a cell mostly does, judged from its code (its import lines and comments set aside)."""
    code = "\n".join(line for line in (source or "").splitlines() if not IMPORT_OR_COMMENT.match(line))
    if not code.strip():
        return "imports/setup"
    return next((name for name, pattern in CATEGORIES if pattern.search(code)), "other")


def _source(cell: dict) -> str:
    return cell.get("source") or cell.get("starts", "")


def breakdown(chapter: dict) -> dict[str, float]:
    """Seconds per column for one chapter's entry of ``run_times.json``."""
    cells = chapter.get("cells") or chapter.get("slowest_cells", [])
    split = dict.fromkeys(COLUMNS, 0.0)
    split["kernel + overhead"] = max(chapter["seconds"] - chapter.get("cells_seconds", 0.0), 0.0)
    for cell in cells:
        split[category(_source(cell))] += cell["seconds"]
    split["rest of cells"] = max(chapter.get("cells_seconds", 0.0) - sum(c["seconds"] for c in cells), 0.0)
    return split


def table(report: dict) -> str:
    """The per-chapter table, with a total row and each column's share of the whole series."""
    names = [c["notebook"] for c in report["chapters"]]
    width = max([len(n) for n in names] + [len("total")])
    rows = [(c["notebook"], c["seconds"], breakdown(c)) for c in report["chapters"]]
    total = {k: sum(r[2][k] for r in rows) for k in COLUMNS}
    grand = sum(r[1] for r in rows)
    head = f"{'chapter':<{width}} {'wall s':>7} " + " ".join(f"{k:>{max(len(k), 7)}}" for k in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, seconds, split in rows + [("total", grand, total)]:
        cells = " ".join(f"{split[k]:>{max(len(k), 7)}.1f}" for k in COLUMNS)
        lines.append(f"{name:<{width}} {seconds:>7.1f} {cells}")
    lines.append(f"{'share':<{width}} {'':>7} " + " ".join(
        f"{(total[k] / grand if grand else 0):>{max(len(k), 7)}.0%}" for k in COLUMNS))
    cpu = {c["notebook"]: c["cpu_seconds"] for c in report["chapters"] if "cpu_seconds" in c}
    if cpu:  # scripts/run_series.py records each chapter's CPU time (its kernel's and its own) since 2026-12-03
        lines.append("CPU s: " + ", ".join(f"{name[:2]} {seconds:.0f}" for name, seconds in cpu.items()))
    return "\n".join(lines)


def slowest(report: dict, n: int = 5) -> str:
    """The series' slowest cells, with their chapter and category."""
    cells = [(c["seconds"], ch["notebook"], c["cell"], c.get("starts", ""), _source(c)) for ch in report["chapters"]
             for c in ch.get("cells") or ch.get("slowest_cells", [])]
    lines = ["slowest cells (of those recorded):"]
    for seconds, notebook, index, starts, source in sorted(cells, reverse=True)[:n]:
        lines.append(f"  {seconds:7.1f} s  {notebook} cell {index:<3} [{category(source)}]  {starts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=None, help="default: outputs/run_times.json")
    args = parser.parse_args(argv)
    path = args.path or config.outputs_dir() / "run_times.json"
    if not path.exists():
        print(f"{path} not found: run `make run` (scripts/run_series.py) first; it writes this file.",
              file=sys.stderr)
        return 1
    report = json.loads(path.read_text())
    cpu = (f" ({report['total_cpu_seconds']:.0f} s CPU, load average {report['load_average'][0]:.1f} at the end)"
           if "total_cpu_seconds" in report else "")  # older reports carry wall time only
    print(f"{path}: {report.get('model', '?')} model, {report.get('total_seconds', 0):.0f} s in all{cpu}, "
          f"finished {report.get('finished', '?')}")
    if report.get("jobs", 1) > 1:  # scripts/run_series.py --jobs, since 2026-12-04
        print(f"{report['jobs']} chapters at a time, {report.get('threads_per_kernel', '?')} torch thread(s) each (a "
              "chapter that runs alone: every core); their times overlap, so the total row adds up to more than the "
              "series took")
    print()
    print(table(report))
    print()
    print(slowest(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
