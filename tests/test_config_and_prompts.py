"""Config switches by environment variable; prompt helpers split conversations the way evaluation needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils import config
from utils.prompts import prompt_messages, reference_answer


def test_default_is_the_offline_miniature(monkeypatch: pytest.MonkeyPatch, outputs: Path) -> None:
    monkeypatch.delenv("PHI3_MODEL_ID", raising=False)
    assert config.is_miniature() and config.model_path() == str(config.PROJECT_ROOT / "models" / "phi3-miniature")
    assert not outputs.exists(), "reading the config must not create folders"


def test_phi3_model_id_switches_the_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_MODEL_ID", config.REAL_PHI3)
    assert not config.is_miniature() and config.model_path() == config.REAL_PHI3


def test_every_output_path_is_under_the_outputs_folder(outputs: Path) -> None:
    for path in (config.split_dir(), config.adapter_dir("lora")):
        assert outputs in path.parents


def test_prompt_is_everything_before_the_last_answer() -> None:
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert prompt_messages(chat) == chat[:3] and reference_answer(chat) == "d"


def test_quiet_libraries_still_show_the_trainers_progress(tmp_path: Path) -> None:
    """Silencing transformers' logging must not switch the trainer's progress display to a dict per logging step."""
    from transformers import TrainingArguments

    config.silence_library_noise()
    assert TrainingArguments(output_dir=str(tmp_path)).disable_tqdm is False
