"""scripts/run_series.py: no per-cell timeout, a failure that names the cell and the project's own frames, the next
chapter's kernel warmed up while the current one runs, and chapters that do not read one another run side by side."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient.exceptions import CellExecutionError

from utils import config


def _runner():
    spec = importlib.util.spec_from_file_location("run_series", config.PROJECT_ROOT / "scripts" / "run_series.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_chapter_reports_its_cell_and_the_project_frame(tmp_path: Path) -> None:
    runner = _runner()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("from utils.evaluation import check_results\n"
                                  "print('about to fail')\n"
                                  "check_results({'model': 'm', 'n_test': 1, 'variants': None})")])
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(CellExecutionError) as caught:
        runner.execute(path, in_place=False, out_dir=tmp_path)
    report = runner.failure_report(path, caught.value)
    assert "99_broken.ipynb failed in this cell:" in report
    assert "check_results({'model': 'm', 'n_test': 1, 'variants': None})" in report
    assert "utils/evaluation.py" in report and ".venv" not in report
    assert report.splitlines()[-2].startswith("TypeError") or "Error" in report.splitlines()[-2]
    assert "\x1b[" not in report and len(report) < 3000


def test_the_series_runner_sets_no_cell_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow laptop must finish a long cell (pre-training, training), not fail after a fixed number of seconds."""
    runner = _runner()
    seen: dict = {}

    class Recorder:
        def __init__(self, nb, **kwargs):
            seen.update(kwargs)

        def execute(self):
            return None

    monkeypatch.setattr(runner, "NotebookClient", Recorder)
    path = tmp_path / "98_ok.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")]), path)
    runner.execute(path, in_place=False, out_dir=tmp_path)
    assert "timeout" in seen and seen["timeout"] is None


def test_each_chapter_reports_its_kernels_peak_memory_and_the_probe_is_not_saved(tmp_path: Path) -> None:
    runner = _runner()
    path = tmp_path / "97_alloc.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = bytearray(300 * 2**20)")]), path)
    (tmp_path / "out").mkdir()
    report, following = runner.execute(path, in_place=False, out_dir=tmp_path / "out")
    assert following is None
    assert report["peak_memory_mib"]["process_mib"] >= 300  # the kernel held 300 MiB at once
    assert report["cpu_seconds"] >= 0.3, "the kernel's CPU time (starting Python and IPython alone takes more)"
    saved = nbformat.read(tmp_path / "out" / "97_alloc.ipynb", as_version=4)
    assert len(saved.cells) == 1 and "PEAK_MEMORY" not in str(saved)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="exact per-cell peaks need Linux's /proc")
def test_each_cell_reports_its_own_peak_and_the_processes_it_starts(tmp_path: Path) -> None:
    """A cell's peak is its own (the high-water mark is reset between cells), what it still holds at its end is
    there too, memory held by a process the cell starts is sampled beside the kernel's, and the pages of a mapped
    file (a safetensors checkpoint read in place) are told apart from allocated memory."""
    runner = _runner()
    path = tmp_path / "95_cells.ipynb"
    child = ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
             "'import time; x = bytearray(200 * 2**20); time.sleep(1.5)'], check=True)")
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\1" * (200 * 2**20))
    mapped = (f"import mmap\nwith open({str(data)!r}, 'rb') as f:\n    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
              "total = sum(m[i] for i in range(0, len(m), 4096))\nm.close()")
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import time\nx = bytearray(300 * 2**20)\ntime.sleep(0.3)  # sampled every 0.05 s\ndel x"),
        nbformat.v4.new_markdown_cell("between"),
        nbformat.v4.new_code_cell("y = bytearray(100 * 2**20)"),
        nbformat.v4.new_code_cell(child),
        nbformat.v4.new_code_cell(mapped)]), path)
    (tmp_path / "out").mkdir()
    report, _ = runner.execute(path, in_place=False, out_dir=tmp_path / "out")
    first, second, third, fourth = report["cells"]
    assert [c["cell"] for c in report["cells"]] == [0, 2, 3, 4]
    assert first["peak_mib"] >= first["end_mib"] + 290, "the first cell freed its 300 MiB"
    assert second["peak_mib"] < first["peak_mib"] - 150, "the second cell's peak does not include the first's"
    assert second["end_mib"] >= first["end_mib"] + 95, "the second cell holds its 100 MiB at its end"
    assert third["children_peak_mib"] >= 150 and first["children_peak_mib"] < 50
    assert first["anon_peak_mib"] >= 290, "allocated memory is sampled as allocated"
    assert fourth["peak_mib"] >= fourth["anon_peak_mib"] + 150, "a mapped file's pages count as resident, not allocated"
    assert report["peak_memory_mib"]["process_mib"] >= 300, "the chapter's peak is its highest cell's"
    assert report["peak_memory_mib"]["children_mib"] == third["children_peak_mib"]


def test_the_modules_a_notebook_imports_are_read_from_its_cells() -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("import markdown_is_not_code"),
        nbformat.v4.new_code_cell("from __future__ import annotations\nimport os, sys as system\n"
                                  "from utils.models import hardware_report\nif True:\n    import indented_is_left\n"
                                  "x = 1  # import not_at_line_start"),
        nbformat.v4.new_code_cell("import os\nimport matplotlib.pyplot as plt\nfrom peft import (LoraConfig,\n"
                                  "    PeftModel)")])
    assert _runner().imported_modules(nb) == ["os", "sys", "utils.models", "matplotlib.pyplot", "peft"]


def test_the_next_chapters_kernel_has_imported_its_modules_but_defines_nothing(tmp_path: Path) -> None:
    """While chapter A runs, chapter B's kernel imports B's modules; B then runs in it from execution count 1, its
    namespace clean, and every kernel is shut down at the end."""
    runner = _runner()
    first, second = tmp_path / "96_first.ipynb", tmp_path / "97_second.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time\ntime.sleep(1)")]), first)
    probe = "import sys\nprint('colorsys' in sys.modules, 'colorsys' in dir())"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(probe),
                                                   nbformat.v4.new_code_cell("import colorsys")]), second)
    (tmp_path / "out").mkdir()
    _, warm = runner.execute(first, in_place=False, out_dir=tmp_path / "out", next_path=second)
    assert warm is not None
    _, none = runner.execute(second, in_place=False, out_dir=tmp_path / "out", kernel=warm)
    assert none is None and not warm.manager.has_kernel
    cell = nbformat.read(tmp_path / "out" / second.name, as_version=4).cells[0]
    assert cell.execution_count == 1
    assert cell.outputs[0]["text"] == "True False\n"

    runner.execute(second, in_place=False, out_dir=tmp_path / "out")  # cold: nothing imported ahead
    cold = nbformat.read(tmp_path / "out" / second.name, as_version=4).cells[0]
    assert cold.outputs[0]["text"] == "False False\n"


def _stamping(name: str, log: Path, seconds: float = 0.0, extra: str = "") -> nbformat.NotebookNode:
    """A notebook that appends (name, start, end, torch-thread setting) to ``log`` around a sleep."""
    code = (f"import json, os, time\nstart = time.time()\n{extra}time.sleep({seconds})\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            f"    f.write(json.dumps([{name!r}, start, time.time(), os.environ.get('OMP_NUM_THREADS')]) + '\\n')")
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])


def test_chapters_wait_for_what_they_read_and_solutions_for_every_chapter_before_them(tmp_path: Path) -> None:
    runner = _runner()
    root = tmp_path / "notebooks"
    paths = [root / n for n in ("01_a.ipynb", "03_b.ipynb", "04_c.ipynb", "06_d.ipynb", "09_e.ipynb")]
    solutions = [root / "solutions" / n for n in ("03_b_solutions.ipynb", "04_c_solutions.ipynb")]
    waits = runner.waits_for(paths + solutions)
    names = {p: sorted(q.name[:2] for q in w) for p, w in waits.items()}
    assert names[paths[0]] == [] and names[paths[4]] == [], "01 and 09 read no earlier chapter"
    assert names[paths[1]] == ["01"] and names[paths[2]] == ["01", "03"]
    assert names[paths[3]] == ["03", "04"], "06 also reads 02, which is not in this run: taken as done"
    assert waits[solutions[0]] == set(paths) and waits[solutions[1]] == set(paths) | {solutions[0]}
    assert runner.closure(paths[3], waits) == {paths[0], paths[1], paths[2]}


def test_side_by_side_runs_what_does_not_wait_together_one_thread_each_and_the_rest_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """02 and 03 both read only 01: they run at the same time; 04 reads 03 and starts only once 03 is done."""
    runner = _runner()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    out.mkdir()

    def meet(me: str, other: str) -> str:  # each waits (up to 60 s) for the other to have started: proof of overlap
        return (f"open({str(tmp_path / me)!r}, 'w').close()\n"
                f"while not os.path.exists({str(tmp_path / other)!r}) and time.time() - start < 60:\n"
                f"    time.sleep(0.05)\n"
                f"assert os.path.exists({str(tmp_path / other)!r}), 'ran alone'\n")

    paths = []
    for name, extra in (("02_a", meet("a", "b")), ("03_b", meet("b", "a")), ("04_c", "")):
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(_stamping(name, log, 0.0, extra), paths[-1])
    reports = runner.run_side_by_side(paths, in_place=False, out_dir=out, jobs=2)
    assert [r["notebook"] for r in reports] == [p.name for p in paths]
    runs = {name: (start, end, threads) for name, start, end, threads in map(json.loads, log.read_text().splitlines())}
    assert runs["04_c"][0] >= runs["03_b"][1], "04 started only after 03 finished"
    assert {threads for _, _, threads in runs.values()} == {"1"}, "two kernels at once on 2 cores: one thread each"
    assert all((out / p.name).exists() for p in paths)


def test_a_failing_chapter_stops_the_series_and_leaves_no_kernel_running(tmp_path: Path) -> None:
    runner = _runner()
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    out.mkdir()
    slow, broken, after = tmp_path / "02_slow.ipynb", tmp_path / "03_broken.ipynb", tmp_path / "04_after.ipynb"
    nbformat.write(_stamping("02_slow", log, 60.0), slow)
    nbformat.write(_stamping("03_broken", log, 0.5, extra="raise ValueError('broken on purpose')\n"), broken)
    nbformat.write(_stamping("04_after", log), after)
    started = time.perf_counter()
    with pytest.raises(runner.ChapterFailed) as caught:
        runner.run_side_by_side([slow, broken, after], in_place=False, out_dir=out, jobs=2)
    assert caught.value.path == broken and "broken on purpose" in str(caught.value.error)
    assert time.perf_counter() - started < 30, "the slow chapter's kernel was shut down, not waited for"
    assert not log.exists(), "neither the slow chapter nor the one after the broken one finished"
    assert not any(p.name.startswith("kernel") for p in psutil.Process().children(recursive=True))


def test_a_chapter_that_times_its_runtimes_runs_with_no_other_beside_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """07 (RUNS_ALONE) starts only when nothing else runs, nothing starts beside it, and it gets every core."""
    runner = _runner()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    out.mkdir()
    paths = []
    for name, seconds in (("07_alone", 1.5), ("08_x", 0.5), ("09_y", 0.5)):
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(_stamping(name, log, seconds), paths[-1])
    runner.run_side_by_side(paths, in_place=False, out_dir=out, jobs=2)
    runs = {name: (start, end, threads) for name, start, end, threads in map(json.loads, log.read_text().splitlines())}
    alone = runs.pop("07_alone")
    assert all(end <= alone[0] or start >= alone[1] for start, end, _ in runs.values()), "nothing beside 07"
    assert alone[2] == "2" and {t for _, _, t in runs.values()} == {"1"}
