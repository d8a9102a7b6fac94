"""Chapter 09 as a learner runs it on their own file: through papermill, with parameters, into their output folder.

The stored chapter itself (the office-routing dataset, full steps) is executed by nbval with the other notebooks;
this test runs it the other way a learner will: ``papermill`` with ``-p`` parameters on a small Alpaca JSON file of
another task, a few steps, everything written under a temporary ``PHI3_LAB_OUTPUTS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat

from utils import config
from utils.data import check_chat_jsonl

CHAPTER = config.PROJECT_ROOT / "notebooks" / "09_your_own_task.ipynb"
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]


def learner_file(path: Path) -> Path:
    """A learner's own data: weekday short forms as an Alpaca JSON array (another task, another format)."""
    records = [{"instruction": "Give the three-letter code of the day.", "input": f"{spelling} {n}",
                "output": day[:3]}
               for n in range(8) for day in DAYS for spelling in (day, day.capitalize())]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def test_the_parameters_cell_is_tagged_and_second_after_the_bootstrap() -> None:
    nb = nbformat.read(CHAPTER, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[1].metadata.get("tags") == ["parameters"]
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])] == [code[1]]
    for name in ("DATA_FILE", "DATA_FORMAT", "PROMPT_COLUMN", "RESPONSE_COLUMN", "MODEL", "STEPS", "RUN_NAME"):
        assert f"\n{name} = " in "\n" + code[1].source, name


def test_a_learners_file_through_papermill_writes_only_to_its_output_folder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    learner_file(work / "my_days.json")
    outputs = tmp_path / "outputs"
    project_outputs = config.PROJECT_ROOT / "outputs" / "mine"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHI3_MODEL_ID", "PHI3_LAB_"))}
    env["PHI3_LAB_OUTPUTS"] = str(outputs)
    executed = tmp_path / "09_mine.ipynb"
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(CHAPTER), str(executed), "--cwd", str(work), "--no-progress-bar",
         "-p", "DATA_FILE", "my_days.json", "-p", "DATA_FORMAT", "alpaca", "-p", "STEPS", "4",
         "-p", "RUN_NAME", "mine", "-p", "TEST_SHARE", "0.2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run = outputs / "mine"
    assert check_chat_jsonl(run / "data.jsonl") == []
    stats = json.loads((run / "adapter" / "run_stats.json").read_text())
    assert stats["steps"] == 4 and len(stats["answers"]) == 16  # 80 records, 20 % held out
    assert {a["reference"] for a in stats["answers"]} <= {d[:3] for d in DAYS}
    assert (run / "adapter" / "base_model.json").is_file() and (run / "merged" / "config.json").is_file()
    assert not project_outputs.exists() and not (outputs / "tmp").exists()
    assert sorted(p.name for p in work.iterdir()) == ["my_days.json"]

    nb = nbformat.read(executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'DATA_FORMAT = "alpaca"' in injected[0].source
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "80 alpaca records -> 80 conversations" in printed
    assert str(tmp_path) not in printed  # no absolute paths in what a learner shares
