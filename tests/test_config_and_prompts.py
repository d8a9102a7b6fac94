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


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_short_run_setting_stops_with_what_to_change(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    for name, read in (("PHI3_LAB_MAX_STEPS", config.max_steps), ("PHI3_LAB_HELDOUT", config.heldout_limit)):
        monkeypatch.setenv(name, value)
        with pytest.raises(config.SettingsError, match=f"{name}={value}: must be a whole number"):
            read()
        monkeypatch.delenv(name)


def test_a_short_run_caps_steps_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.models import hardware_report
    from utils.training import training_config

    monkeypatch.delenv("PHI3_LAB_MAX_STEPS", raising=False)
    monkeypatch.delenv("PHI3_LAB_HELDOUT", raising=False)
    full = training_config(hardware_report(), miniature=False)
    assert "max_steps" not in full and config.capped_steps(48) == 48 and "short run" not in config.model_tag()
    monkeypatch.setenv("PHI3_LAB_MAX_STEPS", "3")
    short = training_config(hardware_report(), miniature=False)
    # every step logged, evaluations and checkpoints before the end: the curves and the resume demo still exist
    assert short["max_steps"] == 3 and short["logging_steps"] == 1 and short["eval_steps"] == short["save_steps"] == 1
    assert config.capped_steps(48) == 3 and config.model_tag().endswith("(short run)")


def test_a_short_run_evaluates_the_first_heldout_conversations(monkeypatch: pytest.MonkeyPatch, outputs: Path) -> None:
    from datasets import Dataset, DatasetDict

    from utils.data import load_splits

    rows = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(10)]
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}).save_to_disk(outputs / "data")
    monkeypatch.setenv("PHI3_LAB_HELDOUT", "4")
    splits = load_splits(outputs / "data")
    assert len(splits["train"]) == 10 and [r["messages"][0]["content"] for r in splits["test"]] == list("0123")


REFLOWED_PHI3 = """{%- for message in messages -%}
    {%- if message['role'] in ('system', 'user', 'assistant') -%}
        {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"""


def test_a_phi3_template_spelled_differently_still_masks_like_phi3(tiny_model_dir: Path) -> None:
    """TRL only patches templates it knows byte for byte; a re-spelled Phi-3 template must not stop the chapters."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template

    from utils.prompts import assistant_mask, ensure_trainable_template, phi3_chat_template

    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "order pens"},
            {"role": "assistant", "content": "ORDER"}]
    reference = assistant_mask(AutoTokenizer.from_pretrained(tiny_model_dir), chat)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = REFLOWED_PHI3
    with pytest.raises(ValueError):
        get_training_chat_template(tokenizer)  # the failure the chapters had
    assert ensure_trainable_template(tokenizer).chat_template == phi3_chat_template()
    assert assistant_mask(tokenizer, chat) == reference


def test_a_template_of_another_format_stops_with_a_clear_message(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from utils.prompts import ensure_trainable_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(config.SettingsError, match="my-model: its chat template is not Phi-3's format"):
        ensure_trainable_template(tokenizer, name="my-model")
