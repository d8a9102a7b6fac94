"""Issue 15: nothing accepted that later crashes, nothing silently wrong, nothing half-written, nothing sent out."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from utils import config
from utils.adapters import (AdapterBaseMismatch, base_fingerprint, check_adapter_base, read_record, record_base,
                            tokenizer_size)
from utils.atomic import atomic_folder
from utils.data import DataError, check_chat_jsonl, check_lengths, load_chat_jsonl

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def chat_line(user: str = "hi", assistant: str = "hello") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


# 1. One loading path -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_what_the_check_accepts_the_loader_loads_identically(tmp_path: Path, char: str) -> None:
    path = tmp_path / "chat.jsonl"
    text = f"line one{char}line two"
    lines = [chat_line(text), chat_line("second")]
    path.write_text("\n".join(json.dumps(json.loads(line), ensure_ascii=False) for line in lines) + "\n",
                    encoding="utf-8")
    assert check_chat_jsonl(path) == []
    rows = load_chat_jsonl(path)
    assert [r["messages"][0]["content"] for r in rows] == [text, "second"]


def test_lone_surrogates_are_reported_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    bad = chat_line("ok", "bad SURROGATE here").replace("SURROGATE", "\\ud800")
    path.write_text(chat_line() + "\n" + bad + "\n", encoding="utf-8")
    (problem,) = check_chat_jsonl(path)
    assert str(problem) == (f"{path}:2: message 2 content has an invalid character (lone surrogate \\ud800 at "
                            "column 5); fix the JSON escape")
    with pytest.raises(DataError):
        load_chat_jsonl(path)


def test_a_symlink_loop_is_one_problem_not_an_oserror(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    (problem,) = check_chat_jsonl(loop)
    assert problem.line == 0 and "cannot read the file" in problem.reason
    assert str(problem).startswith(f"{loop}:0: ")


def test_conversations_longer_than_the_context_are_reported_and_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line() + "\n\n" + chat_line("word " * 300) + "\n", encoding="utf-8")
    n = len(tokenizer.apply_chat_template(json.loads(chat_line("word " * 300))["messages"], tokenize=True,
                                          return_dict=True)["input_ids"])
    limit = n - 1
    (problem,) = check_chat_jsonl(path, tokenizer, limit)
    assert str(problem) == (f"{path}:3: conversation is {n} tokens, longer than the model's context of {limit}; "
                            "shorten or split it")
    assert check_chat_jsonl(path, tokenizer, n) == []
    with pytest.raises(DataError, match="conversation is"):
        load_chat_jsonl(path, tokenizer, limit)
    rows = load_chat_jsonl(path)
    with pytest.raises(DataError) as err:
        check_lengths(rows, tokenizer, limit, "train")
    assert str(err.value).startswith(f"train:2: conversation is {n} tokens")
    check_lengths(rows, tokenizer, n, "train")


def test_the_cli_checks_lengths_with_the_models_context(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line("word " * 2000) + "\n", encoding="utf-8")
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    result = subprocess.run([sys.executable, "-m", "utils.data", "check", str(path), "--tokenizer",
                             str(tiny_model_dir)], capture_output=True, text=True, cwd=config.PROJECT_ROOT, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"{path}:1: conversation is" in result.stdout and f"context of {context}" in result.stdout


# 2. Adapters know their base ----------------------------------------------------------------------------------

def _perturbed_copy(source: Path, target: Path, name_part: str = "embed_tokens") -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    key = next(k for k in tensors if name_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained-but-nonzero peft LoRA adapter on the tiny model, with its base recorded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(str(folder))
    record_base(folder, tiny_model_dir)
    return folder


def test_fingerprint_follows_the_weights_not_the_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert base_fingerprint(copy) == base_fingerprint(tiny_model_dir)
    changed = _perturbed_copy(tiny_model_dir, tmp_path / "changed")
    assert base_fingerprint(changed) != base_fingerprint(tiny_model_dir)


def test_sampled_fingerprint_of_large_files_still_sees_a_retrained_tensor(tiny_model_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.adapters as adapters

    monkeypatch.setattr(adapters, "WHOLE_FILE_BYTES", 0)
    monkeypatch.setattr(adapters, "SAMPLE_BYTES", 64)
    changed = _perturbed_copy(tiny_model_dir, tmp_path / "changed")
    assert base_fingerprint(changed) != base_fingerprint(tiny_model_dir)


def test_adapter_on_another_base_stops_naming_both(peft_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from utils.quantization import load_adapter

    other = _perturbed_copy(tiny_model_dir, tmp_path / "rebuilt-base")
    assert read_record(peft_adapter)["base_model"] == str(tiny_model_dir)
    with pytest.raises(AdapterBaseMismatch) as err:
        load_adapter(peft_adapter, str(other))
    message = str(err.value)
    assert str(peft_adapter) in message and str(tiny_model_dir) in message and str(other) in message
    assert "allow_mismatch=True" in message
    with pytest.warns(UserWarning, match="Loading anyway"):
        model = load_adapter(peft_adapter, str(other), allow_mismatch=True)
    assert model is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(peft_adapter, str(tiny_model_dir))
    assert not [w for w in caught if "base" in str(w.message)]


def test_adapters_without_a_record_warn_once(peft_adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-adapter"
    shutil.copytree(peft_adapter, old)
    (old / "base_model.json").unlink()
    with pytest.warns(UserWarning, match="does not record which base"):
        assert check_adapter_base(old, tiny_model_dir) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_adapter_base(old, tiny_model_dir)


def test_a_base_with_a_smaller_vocabulary_is_refused_before_loading(peft_adapter: Path, tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_model_dir, small)
    settings = json.loads((small / "config.json").read_text())
    settings["vocab_size"] = tokenizer_size(peft_adapter) - 10
    (small / "config.json").write_text(json.dumps(settings))
    with pytest.raises(AdapterBaseMismatch, match="has only"):
        check_adapter_base(peft_adapter, small, allow_mismatch=True)


def test_loralib_adapters_record_and_check_their_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from utils.loralib_tools import DEFAULT_TARGETS, add_lora_layers, load_loralib_model, save_lora

    model = add_lora_layers(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4, 8, {"o_proj": None})
    save_lora(model, tmp_path / "loralib", {"r": 4, "lora_alpha": 8, "targets": {"o_proj": None}})
    assert read_record(tmp_path / "loralib")["fingerprint"] == base_fingerprint(tiny_model_dir)
    assert DEFAULT_TARGETS  # the module's defaults are untouched
    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    with pytest.raises(AdapterBaseMismatch):
        load_loralib_model(str(other), tmp_path / "loralib")
    assert load_loralib_model(str(tiny_model_dir), tmp_path / "loralib") is not None


# 3. Atomic saves, no half-written state ------------------------------------------------------------------------

def test_atomic_folder_keeps_the_old_version_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as staging:
            (staging / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_resume_skips_incomplete_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    import torch

    from utils.training import last_complete_checkpoint

    def checkpoint(step: int) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"w": torch.ones(64, 64)}, str(folder / "adapter_model.safetensors"))
        return folder

    assert last_complete_checkpoint(tmp_path) is None
    checkpoint(60)
    good = checkpoint(120)
    (tmp_path / "checkpoint-240").mkdir()  # killed right after mkdir
    cut = checkpoint(180)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed while writing weights
    with pytest.warns(UserWarning) as caught:
        assert last_complete_checkpoint(tmp_path) == good
    assert len(caught) == 2 and all("skipped, incomplete" in str(w.message) for w in caught)


def test_truncated_shipped_weights_give_one_message_naming_file_and_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    from utils.miniature import REPORT_FILE, require_shipped_miniature

    copy = tmp_path / "phi3-miniature"
    shutil.copytree(tiny_model_dir, copy)
    if not (copy / REPORT_FILE).exists():
        (copy / REPORT_FILE).write_text("{}")
    assert require_shipped_miniature(copy) == copy
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    with pytest.raises(config.SettingsError) as err:
        require_shipped_miniature(copy)
    message = str(err.value)
    assert "model.safetensors is damaged" in message and "git checkout --" in message and "make miniature" in message


def test_a_new_run_keeps_the_previous_checkpoints_until_promoted(outputs: Path) -> None:
    from utils.training import fresh_run_dir, promote_run

    previous = outputs / "runs" / "lora" / "checkpoint-60"
    previous.mkdir(parents=True)
    partial = fresh_run_dir("lora")
    assert partial == outputs / "runs" / "lora.partial" and not any(partial.iterdir())
    (partial / "checkpoint-30").mkdir()
    assert previous.exists()
    assert promote_run(partial) == outputs / "runs" / "lora"
    assert sorted(p.name for p in (outputs / "runs").iterdir()) == ["lora"]
    assert [p.name for p in (outputs / "runs" / "lora").iterdir()] == ["checkpoint-30"]


def test_merged_models_are_swapped_in_whole(peft_adapter: Path, tiny_model_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PreTrainedModel

    from utils.quantization import merge_adapter_into_full_precision

    out = tmp_path / "merged"
    merge_adapter_into_full_precision(str(tiny_model_dir), peft_adapter, out)
    before = (out / "model.safetensors").read_bytes()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        merge_adapter_into_full_precision(str(tiny_model_dir), peft_adapter, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# 4. Wrong settings end in one plain message --------------------------------------------------------------------

@pytest.mark.parametrize("case, fragment", [("missing", "no such folder"), ("empty", "the folder is empty"),
                                            ("no_config", "no config.json"), ("file", "is a file")])
def test_a_wrong_model_folder_is_one_settings_error(case: str, fragment: str, tmp_path: Path, outputs: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.models import require_miniature_or_model

    folder = tmp_path / "model"
    if case in ("empty", "no_config"):
        folder.mkdir()
    if case == "no_config":
        (folder / "model.safetensors").write_bytes(b"x")
    if case == "file":
        folder.write_text("x")
    monkeypatch.setenv("PHI3_MODEL_ID", str(folder))
    with pytest.raises(config.SettingsError, match=fragment) as err:
        require_miniature_or_model()
    assert f"PHI3_MODEL_ID={folder}" in str(err.value)


def test_a_hub_id_typo_offline_fails_at_once(outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.models import require_miniature_or_model

    monkeypatch.setenv("PHI3_MODEL_ID", "microsoft/Phi-3-mini-4k-instruc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(config.SettingsError, match="not in the local Hugging Face cache"):
        require_miniature_or_model()
    assert time.perf_counter() - started < 5


def test_a_model_that_is_not_phi3_warns_and_one_without_a_chat_template_stops(
        tiny_model_dir: Path, tmp_path: Path, outputs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.models import require_miniature_or_model

    other = tmp_path / "llama-like"
    shutil.copytree(tiny_model_dir, other)
    settings = json.loads((other / "config.json").read_text())
    settings["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(settings))
    monkeypatch.setenv("PHI3_MODEL_ID", str(other))
    with pytest.warns(UserWarning, match="is a 'llama' model, not Phi-3"):
        assert require_miniature_or_model() == str(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        (other / name).unlink(missing_ok=True)
    with pytest.raises(config.SettingsError, match="has no tokenizer .* and no chat template"):
        require_miniature_or_model()


def test_outputs_pointing_at_a_file_is_one_settings_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "outputs.txt"
    target.write_text("x")
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(target))
    with pytest.raises(config.SettingsError, match="is a file, not a folder"):
        config.check_outputs_dir()
    with pytest.raises(config.SettingsError):
        with config.scratch_dir("x"):
            pass


def test_read_only_outputs_is_one_settings_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:  # root writes into any folder whatever its mode; sysfs refuses even root
        target = Path("/sys/phi3-lab-outputs")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
        target = read_only / "outputs"
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(target))
    with pytest.raises(config.SettingsError, match="cannot write there") as err:
        config.check_outputs_dir()
    assert str(target) in str(err.value) and "PHI3_LAB_OUTPUTS" in str(err.value)


def test_ctrl_c_and_a_wrong_setting_in_a_notebook_cell_print_one_line(capsys: pytest.CaptureFixture) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    assert config.quiet_interrupts() is False
    shell = InteractiveShell.instance()
    try:
        assert config.quiet_interrupts() is True
        shell.run_cell("raise KeyboardInterrupt")
        out = capsys.readouterr()
        assert out.out.strip() == config.INTERRUPT_MESSAGE
        assert "Traceback" not in out.out + out.err
        shell.run_cell("from utils.config import SettingsError\nraise SettingsError('PHI3_MODEL_ID=x: no such folder')")
        out = capsys.readouterr()
        assert out.out.strip() == "SettingsError: PHI3_MODEL_ID=x: no such folder"
        assert "Traceback" not in out.out + out.err
    finally:
        shell.set_custom_exc((), None)
        InteractiveShell.clear_instance()


# 5. Offline by default, no telemetry ---------------------------------------------------------------------------

@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Block sockets and record every attempt to connect (or to start huggingface_hub's telemetry thread)."""
    import huggingface_hub.utils._telemetry as telemetry

    attempts: list[str] = []

    def refuse(what: str):
        def blocked(*args, **kwargs):
            attempts.append(f"{what} {args[1:2] or args[:1]}")
            raise OSError("network blocked by the test")
        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(telemetry, "_start_telemetry_thread", lambda: attempts.append("telemetry thread"))
    return attempts


@pytest.fixture()
def switches_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The libraries as a fresh process would have them without our switches (online, telemetry on, counters on)."""
    import datasets.config
    import huggingface_hub.constants as hub

    for name in [*config.OFFLINE_SWITCHES, *config.NO_TELEMETRY_SWITCHES, "CI", "DISABLE_TELEMETRY"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PHI3_MODEL_ID", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)


def test_offline_switches_are_set_for_the_miniature_and_respect_the_user(switches_unset: None,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    changed = config.apply_offline_switches()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1" and os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] == "false"
    assert os.environ["DO_NOT_TRACK"] == "0" and "DO_NOT_TRACK" not in changed


def test_real_model_keeps_telemetry_off_but_stays_online(switches_unset: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_MODEL_ID", config.REAL_PHI3)
    config.apply_offline_switches()
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_training_and_data_loading_make_no_connection_attempt(switches_unset: None, no_network: list[str],
                                                              tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset, load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.training import make_sft_config, train_sft, training_config
    from utils.models import hardware_report

    config.apply_offline_switches()
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(chat_line(f"q{i}", f"a{i}") for i in range(4)) + "\n", encoding="utf-8")
    rows = load_chat_jsonl(data)
    load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "cache"))
    Dataset.from_list(rows)
    settings = {**training_config(hardware_report(), True), "eval_strategy": "no", "save_strategy": "no"}
    args = make_sft_config(tmp_path / "run", settings, progress=False, max_steps=1)
    train_sft(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir),
              rows, rows[:1], args, peft={"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                          "task_type": "CAUSAL_LM"})
    assert no_network == []


def test_loralib_never_downloads_a_base(no_network: list[str]) -> None:
    from utils.loralib_tools import pretrained_state_dict

    with pytest.raises(config.SettingsError, match="not in the local Hugging Face cache|neither a local folder"):
        pretrained_state_dict("nobody-xyz/not-a-cached-model")
    assert no_network == []


# 6. Nothing written outside the output folder ------------------------------------------------------------------

def test_scratch_dir_lives_under_outputs_and_is_removed(outputs: Path) -> None:
    with config.scratch_dir("merge") as scratch:
        assert scratch == outputs / "tmp" / "merge" and scratch.is_dir()
        (scratch / "big.bin").write_bytes(b"x" * 10)
    assert not scratch.exists() and not (outputs / "tmp").exists()
    with pytest.raises(RuntimeError):
        with config.scratch_dir("merge") as scratch:
            raise RuntimeError("cell failed")
    assert not scratch.exists()
