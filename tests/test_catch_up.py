"""The workshop's catch-up switch (utils/catch_up.py): stored results of earlier chapters, used only on request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from utils import catch_up, config
from utils.adapters import base_fingerprint
from utils.data import load_splits
from utils.models import require_output

ROOT = config.PROJECT_ROOT
STORED = [result for result in catch_up.RESULTS if result.merged_from is None]


@pytest.fixture()
def switched_on(outputs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty output folder, the offline default, and the switch on."""
    monkeypatch.setenv(catch_up.SWITCH, "1")
    monkeypatch.delenv("PHI3_MODEL_ID", raising=False)
    return outputs


def test_stored_results_belong_to_the_shipped_miniature() -> None:
    manifest = json.loads((catch_up.STORED_DIR / catch_up.MANIFEST).read_text())
    fingerprint = base_fingerprint(config.miniature_dir())
    assert manifest["base_fingerprint"] == fingerprint, "stale: run `make catch-up-results`"
    assert manifest["results"] == {result.path: result.chapter for result in STORED}
    for result in STORED:
        assert (catch_up.STORED_DIR / result.path).exists(), result.path
        if result.path.startswith("adapters/"):
            record = json.loads((catch_up.STORED_DIR / result.path / "base_model.json").read_text())
            assert record["fingerprint"] == fingerprint and not Path(record["base_model"]).is_absolute()
    files = [f for f in catch_up.STORED_DIR.rglob("*") if f.is_file()]
    assert not [f for f in files if f.name == "training_args.bin" or f.name.startswith("cache-")]
    assert sum(f.stat().st_size for f in files) < 3 * 2**20, "keep the tracked stored results small"


def test_switch_off_a_missing_result_names_the_chapter_and_the_switch(outputs: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(catch_up.SWITCH, raising=False)
    with pytest.raises(FileNotFoundError, match=r"run notebooks/03_lora_finetuning.ipynb.*PHI3_LAB_CATCH_UP=1"):
        require_output(config.adapter_dir("lora"), "03_lora_finetuning.ipynb")
    with pytest.raises(FileNotFoundError, match="01_data_preparation"):
        load_splits(config.split_dir())
    assert not outputs.exists() or not any(outputs.iterdir())


def test_switch_on_copies_the_stored_result_and_says_so(switched_on: Path, capsys: pytest.CaptureFixture) -> None:
    stats = require_output(config.adapter_dir("lora") / "run_stats.json", "03_lora_finetuning.ipynb")
    assert json.loads(stats.read_text())["exact_match"] >= 0
    said = capsys.readouterr().out
    assert "adapters/lora was missing" in said and "STORED result of notebooks/03_lora_finetuning.ipynb" in said
    assert not (config.adapter_dir("lora") / "training_args.bin").exists()
    splits = load_splits(config.split_dir())
    assert len(splits["train"]) > 0 and "STORED result of notebooks/01_data_preparation.ipynb" in capsys.readouterr().out
    require_output(config.adapter_dir("lora"), "03_lora_finetuning.ipynb")  # already there: nothing more to say
    assert capsys.readouterr().out == ""


def test_what_the_learner_has_is_never_replaced(switched_on: Path, capsys: pytest.CaptureFixture) -> None:
    mine = config.adapter_dir("qlora")
    mine.mkdir(parents=True)
    (mine / "mine.txt").write_text("my own run")
    assert catch_up.restore(mine / "run_stats.json", "04_qlora_finetuning.ipynb") is False
    assert (mine / "mine.txt").read_text() == "my own run" and capsys.readouterr().out == ""
    with pytest.raises(FileNotFoundError):
        require_output(mine / "run_stats.json", "04_qlora_finetuning.ipynb")


def test_refused_for_another_model(switched_on: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_MODEL_ID", str(tmp_path / "my-phi3"))
    with pytest.raises(config.SettingsError, match="belong to the shipped miniature"):
        require_output(config.adapter_dir("lora"), "03_lora_finetuning.ipynb")
    assert not config.adapter_dir("lora").exists()


def test_a_path_outside_the_stored_results_is_left_to_the_usual_error(switched_on: Path) -> None:
    with pytest.raises(FileNotFoundError, match="06_evaluation"):
        require_output(config.outputs_dir() / "deploy" / "lora_fp32", "06_evaluation.ipynb")


def test_store_round_trip_and_refusal(tmp_path: Path) -> None:
    source = tmp_path / "outputs"
    for result in STORED:
        target = source / result.path
        target.parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (catch_up.STORED_DIR / result.path).is_dir() else shutil.copy2
        copy(catch_up.STORED_DIR / result.path, target)
    (source / "adapters" / "lora" / "training_args.bin").write_bytes(b"pickle")
    paths = catch_up.store(source, tmp_path / "stored")
    assert paths == [result.path for result in STORED]
    assert not (tmp_path / "stored" / "adapters" / "lora" / "training_args.bin").exists()
    assert json.loads((tmp_path / "stored" / catch_up.MANIFEST).read_text()) == \
        json.loads((catch_up.STORED_DIR / catch_up.MANIFEST).read_text())
    record_file = source / "adapters" / "qlora" / "base_model.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "fingerprint": "sha256:another-base"}))
    with pytest.raises(config.SettingsError, match="not trained on the shipped miniature"):
        catch_up.store(source, tmp_path / "stored")
    assert (tmp_path / "stored" / "adapters" / "qlora").exists(), "a refused store leaves the previous copy"


def test_chapter_05_runs_from_an_empty_output_folder(switched_on: Path) -> None:
    """The workshop case: a learner who missed chapters 01-04 runs chapter 05 with the switch on."""
    notebook = ROOT / "notebooks" / "05_inference.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    for path, chapter in (("adapters/lora", "03_lora_finetuning"), ("adapters/qlora", "04_qlora_finetuning"),
                          ("adapters/qlora_merged", "04_qlora_finetuning"),
                          ("adapters/lora_merged", "04_qlora_finetuning"), ("data", "01_data_preparation")):
        assert f"{path} was missing, so this uses the STORED result of notebooks/{chapter}.ipynb" in printed, path
    assert (switched_on / "adapters" / "qlora_merged" / "model.safetensors").is_file()
