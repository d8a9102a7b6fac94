"""Execute the notebook series and report where the results are and how long each chapter took.

    python scripts/run_series.py              # executed copies under outputs/notebooks/ (make run)
    python scripts/run_series.py --in-place   # refresh the stored notebooks in notebooks/ (make notebooks)
    python scripts/run_series.py --only 03 04 # a subset
    python scripts/run_series.py --in-place --solutions   # and the exercises' worked solutions (make notebooks)
    python scripts/run_series.py --jobs 1 --cold          # one by one, in order, each in a kernel started for it:
                                                          # each chapter's time as a learner's Jupyter sees it

On the miniature, two chapters run at once (``--jobs``), each as soon as the chapters whose outputs it reads have
finished (``READS`` in ``scripts/bootstrap_cell.py``): 02, 03, 08 and 09 do not wait for one another, nor 05 for 06.
A chapter's cells still run top to bottom in a kernel of its own, as in Jupyter; what changes is that the series
keeps both CPU cores busy. The miniature's matrices are too small for torch's second thread to halve a chapter's
time, so two chapters with one thread each finish sooner than the same two one after the other with two threads.
Chapter 07 runs with no other beside it (``RUNS_ALONE``): it times ONNX Runtime and llama.cpp, which take every core.

One at a time (``--jobs 1``, and always with a real model, which fills the GPU on its own) the chapters run in
order, and while one runs the next one's kernel is already started and imports the modules that chapter imports
(the modules only: no name is defined in it, and its cells run exactly as they would in a fresh kernel), so the
series does not wait for start-up between chapters (miniature only; ``--cold`` turns it off).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import psutil
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bootstrap_cell import READS  # noqa: E402
from utils import config  # noqa: E402

NOTEBOOKS = config.PROJECT_ROOT / "notebooks"


def cell_seconds(cell: nbformat.NotebookNode) -> float:
    """Wall time of one executed cell from nbclient's timing metadata (0 when absent)."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


WIDGET = "application/vnd.jupyter.widget-view+json"


def strip_volatile(nb: nbformat.NotebookNode) -> None:
    """Drop timing metadata and ipywidgets state (progress bars), join streamed text, so notebooks diff cleanly."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET in data:
                data.pop(WIDGET)
        if cell.cell_type == "code":
            merged: list = []
            for o in cell.outputs:
                if o.get("output_type") == "display_data" and not o.get("data"):
                    continue
                if (merged and o.get("output_type") == "stream" and merged[-1].get("output_type") == "stream"
                        and merged[-1].get("name") == o.get("name")):
                    merged[-1]["text"] += o["text"]
                    continue
                merged.append(o)
            cell.outputs = merged


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_report(path: Path, err: CellExecutionError) -> str:
    """The failing cell's source, the traceback frames in the project's own files, and the error itself.

    nbclient's message holds the whole traceback, deep library frames included; a learner needs the cell that
    failed, where in the project it went wrong, and the last line.
    """
    text = ANSI.sub("", str(err))
    cell = text.split("------------------", 2)[1].strip() if text.count("------------------") >= 2 else ""
    frames = [line.strip() for line in text.splitlines()
              if "File " in line and str(config.PROJECT_ROOT) in line and "/.venv/" not in line]
    last = f"{err.ename}: {err.evalue}"
    lines = [f"\n{path.name} failed in this cell:", *("    " + l for l in cell.splitlines()[:40])]
    if frames:
        lines += ["in the project's code:", *("    " + f for f in frames[-8:])]
    return "\n".join(lines + [last, "(run the notebook in Jupyter to see the full traceback)"])


# Run after a chapter's last cell, in its kernel, and removed before the notebook is saved: the kernel's peak memory.
MEMORY_PROBE = """import json as _json, resource as _resource, sys as _sys
_peak = {"process_mib": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / 1024}
if "torch" in _sys.modules and _sys.modules["torch"].cuda.is_available():
    _peak["cuda_allocated_mib"] = _sys.modules["torch"].cuda.max_memory_allocated() / 2**20
    _peak["cuda_reserved_mib"] = _sys.modules["torch"].cuda.max_memory_reserved() / 2**20
print("PEAK_MEMORY " + _json.dumps(_peak))"""


def peak_memory(cell: nbformat.NotebookNode) -> dict:
    """The memory probe's numbers (MiB) from its executed cell; empty if it printed none."""
    text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
    line = next((l for l in text.splitlines() if l.startswith("PEAK_MEMORY ")), None)
    return {k: round(v) for k, v in json.loads(line.removeprefix("PEAK_MEMORY ")).items()} if line else {}


class CellMemory:
    """Each cell's peak memory, read from outside the kernel: nothing runs in it, so its namespace and execution
    counts stay the notebook's own.

    Before a cell, the kernel's high-water mark is reset (Linux: ``/proc/<pid>/clear_refs``); after it, the mark is
    that cell's exact peak (``peak_mib``). That peak counts the pages of memory-mapped files too: transformers maps a
    safetensors checkpoint and reads its weights in place when their dtype matches, so a model loaded that way is
    page cache, which the system can drop and read again, not memory the kernel allocated. A thread samples the
    kernel's allocated (anonymous) memory every ``interval`` seconds (``anon_peak_mib``), and the resident memory of
    its descendants, the processes a cell starts (a converter, a quantizer; ``children_peak_mib``): those two are
    sampled, not exact. Elsewhere than Linux, only the sampled resident peak is kept.
    """

    def __init__(self, manager: KernelManager, interval: float = 0.05) -> None:
        self.manager, self.interval = manager, interval
        self.cells: dict[int, dict] = {}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._sampled = {"kernel": 0, "anon": 0, "children": 0}

    def _kernel(self) -> psutil.Process | None:
        pid = getattr(self.manager.provisioner, "pid", None)
        try:
            return psutil.Process(pid) if pid else None
        except psutil.Error:
            return None

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        """VmHWM, VmRSS and RssAnon (KiB) from /proc; empty where there is no /proc."""
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return {}
        wanted = ("VmHWM", "VmRSS", "RssAnon")
        return {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in lines if l.startswith(wanted))}

    def _sample(self, kernel: psutil.Process) -> None:
        while not self._stop.wait(self.interval):
            try:
                children = kernel.children(recursive=True)
                self._sampled["kernel"] = max(self._sampled["kernel"], kernel.memory_info().rss)
            except psutil.Error:
                return
            anon = self._status(kernel.pid).get("RssAnon", 0) * 1024
            self._sampled["anon"] = max(self._sampled["anon"], anon)
            resident = 0
            for child in children:
                try:
                    resident += child.memory_info().rss
                except psutil.Error:
                    pass
            self._sampled["children"] = max(self._sampled["children"], resident)

    def on_cell_start(self, cell: nbformat.NotebookNode, cell_index: int, **_: object) -> None:
        kernel = self._kernel()
        if kernel is None or cell.cell_type != "code" or not cell.source.strip():  # nbclient skips an empty cell
            return
        try:
            Path(f"/proc/{kernel.pid}/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        except OSError:
            pass
        self._sampled = {"kernel": 0, "anon": self._status(kernel.pid).get("RssAnon", 0) * 1024, "children": 0}
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample, args=(kernel,), daemon=True)
        self._sampler.start()

    def on_cell_executed(self, cell: nbformat.NotebookNode, cell_index: int, **_: object) -> None:
        kernel = self._kernel()
        if self._sampler is None or kernel is None:
            return
        self._stop.set()
        self._sampler.join()
        self._sampler = None
        status = self._status(kernel.pid)
        peak = status.get("VmHWM", 0) * 1024 or self._sampled["kernel"]
        anon = max(self._sampled["anon"], status.get("RssAnon", 0) * 1024)
        self.cells[cell_index] = {"peak_mib": round(peak / 2**20), "end_mib": round(status.get("VmRSS", 0) / 1024),
                                  **({"anon_peak_mib": round(anon / 2**20)} if anon else {}),
                                  "children_peak_mib": round(self._sampled["children"] / 2**20)}


def kernel_cpu_seconds(manager: KernelManager) -> float:
    """User + system CPU seconds of a chapter's kernel so far, with the processes it started and has reaped (a
    converter, a quantizer); 0 once the kernel is gone.

    On a shared machine wall time grows with the other users' load (and, with ``--jobs 2``, with the other chapter
    running beside it); CPU time much less, so the report keeps both.
    """
    pid = getattr(manager.provisioner, "pid", None)
    try:
        times = psutil.Process(pid).cpu_times() if pid else None
    except psutil.Error:
        return 0.0
    return sum(times[:4]) if times else 0.0  # user, system, children_user, children_system


def start_kernel(path: Path, threads: int | None = None) -> KernelManager:
    """A fresh kernel for the notebook at ``path``, with ``threads`` torch (OpenMP) threads when given and the
    environment does not already say (``OMP_NUM_THREADS``)."""
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(path.parent), env=env)
    return manager


NAME_AS = r"[\w.]+(?:\s+as\s+\w+)?"
IMPORT = re.compile(rf"(?:from\s+([\w.]+)\s+import\b|import\s+({NAME_AS}(?:\s*,\s*{NAME_AS})*))")


def imported_modules(nb: nbformat.NotebookNode) -> list[str]:
    """The modules a notebook's code cells import at column 0 (not inside an ``if``), in order, each once."""
    modules: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            match = IMPORT.match(line)
            if match and match.group(1):
                modules.append(match.group(1))
            elif match:
                modules += [part.split()[0] for part in match.group(2).split(",")]
    return [m for m in dict.fromkeys(modules) if m != "__future__"]


def warm_up_code(modules: list[str]) -> str:
    """Kernel code that imports ``modules`` and leaves the user's namespace as it found it (errors are left for the
    notebook's own import to raise, where the reader sees them)."""
    return (f"def _phi3_lab_warm_up(names={modules!r}):\n"
            "    import importlib\n"
            "    for name in names:\n"
            "        try:\n"
            "            importlib.import_module(name)\n"
            "        except BaseException:\n"
            "            pass\n"
            "_phi3_lab_warm_up()\n"
            "del _phi3_lab_warm_up\n")


class WarmKernel:
    """A kernel for ``path``, started now and importing that notebook's modules in a background thread."""

    def __init__(self, path: Path) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(path.parent))
        code = warm_up_code(imported_modules(nbformat.read(path, as_version=4)))
        self._thread = threading.Thread(target=self._import, args=(code,), daemon=True)
        self._thread.start()

    def _import(self, code: str) -> None:
        client = self.manager.blocking_client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=120)
            msg_id = client.execute(code, silent=True, store_history=False)
            while client.get_shell_msg(timeout=600)["parent_header"].get("msg_id") != msg_id:
                pass
        except Exception:  # noqa: BLE001 - a kernel that cannot warm up is still a kernel; the chapter will tell
            pass
        finally:
            client.stop_channels()

    def ready(self) -> KernelManager:
        """The kernel manager, once the imports are done (or have failed)."""
        self._thread.join()
        return self.manager

    def shutdown(self) -> None:
        self._thread.join(timeout=5)
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)


def execute(path: Path, in_place: bool, out_dir: Path, kernel: WarmKernel | None = None,
            next_path: Path | None = None, threads: int | None = None,
            started_kernels: list[KernelManager] | None = None) -> tuple[dict, WarmKernel | None]:
    """Run one notebook top to bottom, in ``kernel`` if given (else a fresh one, with ``threads`` torch threads
    when given); returns its timing and peak-memory report (raises on a failing cell) and, if ``next_path`` is
    given, the next notebook's warm kernel, started as soon as this one's cells begin. A fresh kernel's manager is
    appended to ``started_kernels``, so that another thread can shut it down (a failed or interrupted series)."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(MEMORY_PROBE))
    # No per-cell timeout: a slow laptop must finish, not fail after ten minutes of pre-training or training.
    started = time.perf_counter()
    manager = kernel.ready() if kernel else start_kernel(path, threads)
    if started_kernels is not None:
        started_kernels.append(manager)
    memory_by_cell = CellMemory(manager)
    client = NotebookClient(nb, km=manager, timeout=None, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_start=memory_by_cell.on_cell_start,
                            on_cell_executed=memory_by_cell.on_cell_executed)
    following = WarmKernel(next_path) if next_path else None
    try:
        client.execute()
    except BaseException:
        if following:
            following.shutdown()
        raise
    finally:
        cpu = kernel_cpu_seconds(manager)
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    total = time.perf_counter() - started
    memory = peak_memory(nb.cells.pop())
    by_cell = [m for i, m in memory_by_cell.cells.items() if i < len(nb.cells)]
    if by_cell and "process_mib" in memory:  # resetting the high-water mark resets ru_maxrss too: the cells' maximum
        memory["process_mib"] = max(memory["process_mib"], *(m["peak_mib"] for m in by_cell))
        memory["children_mib"] = max(m["children_peak_mib"] for m in by_cell)
        if all("anon_peak_mib" in m for m in by_cell):
            memory["anon_mib"] = max(m["anon_peak_mib"] for m in by_cell)
    cells = [(i, cell_seconds(c), "".join(c.source)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    strip_volatile(nb)
    target = path if in_place else out_dir / path.name
    nbformat.write(nb, target)
    recorded = [{"cell": i, "seconds": round(s, 2), "starts": src.splitlines()[0][:60] if src else "", "source": src,
                 **memory_by_cell.cells.get(i, {})} for i, s, src in cells]
    return {"notebook": path.name, "seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
            "cells_seconds": round(sum(c[1] for c in cells), 1),
            "slowest_cells": [{k: c[k] for k in ("cell", "seconds", "starts")}
                              for c in sorted(recorded, key=lambda c: -c["seconds"])[:3]],
            "cells": recorded, "peak_memory_mib": memory, "written": str(target)}, following


class ChapterFailed(Exception):
    """A chapter's cell raised: which notebook, and nbclient's error."""

    def __init__(self, path: Path, error: CellExecutionError) -> None:
        super().__init__(path.name)
        self.path, self.error = path, error


def report_done(report: dict) -> None:
    peak = report["peak_memory_mib"].get("process_mib", 0)
    print(f"  {report['notebook']} done in {report['seconds']:.1f} s ({report['cpu_seconds']:.1f} s CPU), "
          f"peak memory {peak:,} MiB -> {report['written']}", flush=True)


def run_in_order(paths: list[Path], in_place: bool, out_dir: Path, warm_kernels: bool) -> list[dict]:
    """Run the notebooks one by one, in order; with ``warm_kernels``, the next one's kernel starts ahead."""
    reports: list[dict] = []
    warm: WarmKernel | None = None
    for i, path in enumerate(paths):
        print(f"running {path.name} ...", flush=True)
        following = paths[i + 1] if warm_kernels and i + 1 < len(paths) else None
        try:
            report, warm = execute(path, in_place, out_dir, kernel=warm, next_path=following)
        except CellExecutionError as err:
            raise ChapterFailed(path, err) from None
        except BaseException:  # Ctrl-C: no kernel is left behind
            if warm:
                warm.shutdown()
            raise
        reports.append(report)
        report_done(report)
    return reports


def default_jobs() -> int:
    """Two chapters at once on the miniature where there are two CPU cores or more; one at a time otherwise (a
    real model fills the GPU, or the machine's memory, on its own)."""
    return 2 if config.is_miniature() and (os.cpu_count() or 1) >= 2 else 1


def threads_per_kernel(jobs: int) -> int:
    """Torch threads for each of ``jobs`` kernels running at once: the CPU cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // jobs)


def waits_for(paths: list[Path]) -> dict[Path, set[Path]]:
    """For each notebook, the notebooks among ``paths`` that must finish before it starts.

    A chapter waits for the chapters whose outputs it reads (``READS`` in ``scripts/bootstrap_cell.py``, the same
    table that tells a Colab learner what to run first); a chapter it reads that is not in ``paths`` is taken to
    have run already. A worked-solutions notebook waits for every chapter and for the solutions before it, since
    solutions may re-run a chapter's steps into its output folders.
    """
    chapters = {p.name[:2]: p for p in paths if p.parent.name != "solutions"}
    solutions = [p for p in paths if p.parent.name == "solutions"]
    waits = {p: {chapters[n] for n in READS.get(number, []) if n in chapters} for number, p in chapters.items()}
    for i, path in enumerate(solutions):
        waits[path] = set(chapters.values()) | set(solutions[:i])
    return waits


# Chapters that run with no other chapter beside them: 07 runs ONNX Runtime and llama.cpp, which size their own thread
# pools to the machine (not to OMP_NUM_THREADS) and slow down badly when another process holds a core (its llama.cpp
# cell took 93 s instead of 2 beside chapter 08's full grid), and it times them, which a neighbour would distort.
# Such a chapter gets every core, as when the chapters run one at a time.
RUNS_ALONE = {"07"}


def runs_alone(path: Path) -> bool:
    return path.parent.name != "solutions" and path.name[:2] in RUNS_ALONE


def run_side_by_side(paths: list[Path], in_place: bool, out_dir: Path, jobs: int) -> list[dict]:
    """Run up to ``jobs`` notebooks at once, each as soon as what it reads exists (:func:`waits_for`).

    Each kernel gets its share of the CPU cores (:func:`threads_per_kernel`): on the miniature, two chapters with
    one thread each do more in the same time than one chapter with two, whose small matrices keep the second
    thread waiting; and with one thread every time, a chapter's numbers do not depend on which other chapter
    happened to run beside it. Among the notebooks ready to start, the one that more others wait for goes first,
    so that the longest chain (01, 03, 04, 06, 07) is not held up; a chapter in ``RUNS_ALONE`` waits until it can
    run with no other beside it, and nothing starts beside it. The reports come back in ``paths``' order.

    The first failing cell stops the series (:class:`ChapterFailed`), and Ctrl-C stops it too: the other running
    chapters are interrupted, as Jupyter's stop button does, and their kernels shut down.
    """
    waits = waits_for(paths)
    blocking = {p: sum(p in closure(q, waits) for q in paths) for p in paths}
    threads = threads_per_kernel(jobs)
    pending, running, done = list(paths), {}, {}
    finished: queue.Queue = queue.Queue()  # (path, report, error) from the worker threads

    def work(path: Path, kernels: list[KernelManager]) -> None:
        try:
            own = threads_per_kernel(1) if runs_alone(path) else threads  # alone: every core, as --jobs 1 has
            report, _ = execute(path, in_place, out_dir, threads=own, started_kernels=kernels)
            finished.put((path, report, None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which decides
            finished.put((path, None, err))

    try:
        while pending or running:
            ready = [p for p in pending if waits[p] <= done.keys()]
            for path in sorted(ready, key=lambda p: (-blocking[p], paths.index(p))):
                if len(running) >= jobs or any(map(runs_alone, running)) or (running and runs_alone(path)):
                    break
                pending.remove(path)
                print(f"running {path.name} ...", flush=True)
                kernels: list[KernelManager] = []
                running[path] = (threading.Thread(target=work, args=(path, kernels), daemon=True), kernels)
                running[path][0].start()
            if not running:  # a loop in the waits: not with READS as it is
                raise RuntimeError(f"{', '.join(p.name for p in pending)} wait for notebooks that never finish")
            path, report, error = finished.get()
            running.pop(path)
            if isinstance(error, CellExecutionError):
                raise ChapterFailed(path, error) from None
            if error is not None:
                raise error
            done[path] = report
            report_done(report)
    finally:  # a failure or Ctrl-C: interrupt the others, as Jupyter's stop button does; kill what does not stop
        for thread, kernels in running.values():
            for _ in range(30):  # again each second: an interrupt that comes before a cell starts is ignored
                for manager in kernels:
                    with contextlib.suppress(Exception):
                        manager.interrupt_kernel()
                thread.join(timeout=1)
                if not thread.is_alive():
                    break
            for manager in kernels:
                with contextlib.suppress(Exception):  # its own thread may be shutting it down too
                    if thread.is_alive() and manager.has_kernel:
                        manager.shutdown_kernel(now=True)
    return [done[p] for p in paths]


def closure(path: Path, waits: dict[Path, set[Path]]) -> set[Path]:
    """Every notebook ``path`` waits for, directly or through others."""
    seen: set[Path] = set()
    todo = list(waits[path])
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += waits[p]
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-place", action="store_true", help="overwrite notebooks/ with executed copies")
    parser.add_argument("--only", nargs="*", default=[], help="chapter numbers to run, e.g. 00 03")
    parser.add_argument("--solutions", action="store_true",
                        help="after the chapters, run their worked solutions (notebooks/solutions/) too")
    parser.add_argument("--cold", action="store_true",
                        help="start each chapter's kernel when it begins (no warm kernel importing ahead)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="chapters run at once, each after the chapters it reads (default: 2 on the miniature "
                             "with two or more CPU cores, else 1; --jobs 1 runs them one by one, in order)")
    args = parser.parse_args()
    args.only = [n.zfill(2) if re.fullmatch(r"[0-9]", n) else n for n in args.only]  # "3" means chapter 03
    chapters = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    numbers = [p.name[:2] for p in chapters]
    unknown = [n for n in args.only if n not in numbers]
    if unknown or (args.only == [] and "--only" in sys.argv[1:]):
        what = f"no chapter {', '.join(unknown)}" if unknown else "no chapter given"
        print(f"--only: {what}; choose from {' '.join(numbers)} (e.g. --only 00 03)", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print(f"--jobs {args.jobs}: give 1 or more chapters at once (e.g. --jobs 1)", file=sys.stderr)
        return 2
    try:
        out_dir = config.check_outputs_dir() / "notebooks"
        out_dir.mkdir(parents=True, exist_ok=True)
    except config.SettingsError as err:
        print(err, file=sys.stderr)
        return 2
    paths = [p for p in chapters if not args.only or p.name[:2] in args.only]
    if args.solutions:
        paths += [p for p in sorted((NOTEBOOKS / "solutions").glob("[0-9][0-9]_*.ipynb"))
                  if not args.only or p.name[:2] in args.only]
    jobs = args.jobs or default_jobs()
    warm_kernels = config.is_miniature() and not args.cold and jobs == 1
    started = time.perf_counter()
    try:
        reports = (run_in_order(paths, args.in_place, out_dir, warm_kernels) if jobs == 1 else
                   run_side_by_side(paths, args.in_place, out_dir, jobs))
    except ChapterFailed as failed:
        print(failure_report(failed.path, failed.error), file=sys.stderr)
        return 1
    total = time.perf_counter() - started
    summary = {"model": config.model_id(), "jobs": jobs, "threads_per_kernel": os.environ.get(
                   "OMP_NUM_THREADS", threads_per_kernel(jobs) if jobs > 1 else "torch's default"),
               "warm_kernels": warm_kernels, "total_seconds": round(total, 1),
               "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in reports), 1),
               "load_average": [round(x, 2) for x in os.getloadavg()], "chapters": reports,
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (config.outputs_dir() / "run_times.json").write_text(json.dumps(summary, indent=2))
    print(f"\nSeries finished in {total:.0f} s on the {config.model_tag()}.")
    print(f"Results are under {config.outputs_dir()}:")
    for sub in ("notebooks", "models", "data", "adapters", "plots", "eval"):
        if (config.outputs_dir() / sub).exists():
            print(f"  {sub + '/':<11} {config.outputs_dir() / sub}")
    print(f"  timings    {config.outputs_dir() / 'run_times.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
