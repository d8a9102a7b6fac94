"""Issue 24: nothing scattered, nothing overwritten, nothing forged, and a full disk is one line."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest

from utils import config
from utils.data import check_chat_jsonl, load_chat_jsonl

SCRIPT = config.PROJECT_ROOT / "scripts" / "finetune.py"
RUN_SERIES = config.PROJECT_ROOT / "scripts" / "run_series.py"
TORCH_DISK_FULL = ("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                   "file write failed")


def chat_line(user: str = "hi", assistant: str = "hello") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]},
                      ensure_ascii=False)


def _script():
    spec = importlib.util.spec_from_file_location("finetune_script_rel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PHI3_MODEL_ID", "PHI3_LAB_MAX_STEPS", "PHI3_LAB_HELDOUT")}
    return {**env, "PHI3_LAB_OUTPUTS": str(tmp_path / "outputs"), "CUDA_VISIBLE_DEVICES": "", **extra}


# 1. Settings that scatter or overwrite ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_an_empty_or_blank_output_setting_means_the_default(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", value)
    assert config.outputs_dir() == config.PROJECT_ROOT / "outputs"


def test_a_relative_output_setting_is_taken_from_the_project_not_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", "my-outputs")
    for cwd in (tmp_path, config.PROJECT_ROOT / "notebooks"):
        monkeypatch.chdir(cwd)
        assert config.outputs_dir() == config.PROJECT_ROOT / "my-outputs"


def test_a_tilde_output_setting_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", "~/lab")
    monkeypatch.chdir(tmp_path)
    assert config.outputs_dir() == tmp_path.resolve() / "lab"
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("value", ["notebooks", "notebooks/..", "utils/x", "data", "./models/out",
                                   str(config.PROJECT_ROOT / "notebooks"), str(config.PROJECT_ROOT)])
def test_an_output_setting_on_the_projects_own_files_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(config.PROJECT_ROOT / "notebooks")  # where a chapter's kernel runs
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", value)
    with pytest.raises(config.SettingsError, match="PHI3_LAB_OUTPUTS=.*write over the project's own files"):
        config.outputs_dir()


@pytest.mark.parametrize("value", ["..", "../outputs", "x/../../y"])
def test_a_relative_output_setting_that_leaves_the_project_is_refused(value: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(config.PROJECT_ROOT / "notebooks")  # from here ".." was the project itself
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", value)
    with pytest.raises(config.SettingsError, match="relative value is taken from the project folder.*absolute path"):
        config.outputs_dir()


def test_run_series_refuses_an_output_folder_on_the_notebooks_and_writes_nothing(tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (config.PROJECT_ROOT / "notebooks").glob("*.ipynb")}
    result = subprocess.run([sys.executable, str(RUN_SERIES), "--only", "00"], capture_output=True, text=True,
                            env={**_env(tmp_path), "PHI3_LAB_OUTPUTS": ".."}, cwd=config.PROJECT_ROOT / "notebooks",
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "PHI3_LAB_OUTPUTS=.." in result.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("only", [["99"], ["3a"], []])
def test_run_series_refuses_a_selection_that_matches_no_chapter(only: list[str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(RUN_SERIES), "--only", *only], capture_output=True, text=True,
                            env=_env(tmp_path), cwd=config.PROJECT_ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "choose from 00 01" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("value", ["²", "١٢", "1_0", "1e3", "100001", "9" * 30, "-1", "0"])
def test_numeric_settings_take_ascii_whole_numbers_within_bounds(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_MAX_STEPS", value)
    with pytest.raises(config.SettingsError, match=r"PHI3_LAB_MAX_STEPS=.*whole number from 1 to 100,000"):
        config.max_steps()


def test_numeric_settings_keep_working_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_MAX_STEPS", f" {config.MAX_STEPS_LIMIT} ")
    assert config.max_steps() == config.MAX_STEPS_LIMIT


@pytest.mark.parametrize("value", ["10000000", "١٢", "²", "0"])
def test_finetune_refuses_absurd_or_unicode_step_counts(value: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        _script().parse_args(["--max-steps", value])
    assert exit_.value.code == 2
    assert "--max-steps" in capsys.readouterr().err


@pytest.mark.parametrize("typo", ["miniatur", "Miniature", "minature"])
def test_a_typo_of_miniature_is_refused_at_once_with_the_fix(typo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(config.SettingsError, match='did you mean "miniature"'):
        config.check_model_spec(typo)
    assert time.perf_counter() - started < 5


def test_a_one_letter_typo_of_a_phi3_id_is_refused_online_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(config.SettingsError, match='did you mean "microsoft/Phi-3-mini-4k-instruct"'):
        config.check_model_spec("microsoft/Phi-3-mini-4k-instruc")
    assert config.check_model_spec("someone/Phi-3-mini-4k-instruct-house") == "someone/Phi-3-mini-4k-instruct-house"


# 2. Concurrent and repeated runs ----------------------------------------------------------------------------------

def _finetune(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = _script().main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished two-step run of scripts/finetune.py (checkpoints at steps 1 and 2), in a subprocess."""
    tmp = tmp_path_factory.mktemp("finished")
    train, test = tmp / "train.jsonl", tmp / "test.jsonl"
    lines = config.DATASET_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("".join(lines[:16]), encoding="utf-8")
    test.write_text("".join(config.DATASET_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:2]),
                    encoding="utf-8")
    run = tmp / "run"
    args = ["--model", str(tiny_model_dir), "--data", str(train), "--eval-data", str(test), "--output-dir", str(run),
            "--max-new-tokens", "2"]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                            env=_env(tmp, PHI3_LAB_MAX_STEPS="2"), cwd=config.PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": run, "args": args, "tmp": tmp}


def test_a_second_run_into_a_locked_output_folder_is_refused(finished: dict, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.atomic import folder_lock

    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))
    other = finished["tmp"] / "busy"
    with folder_lock(other):  # the first run holds it
        code, err = _finetune(capsys, *finished["args"][:-4], "--output-dir", str(other), "--max-steps", "1")
    assert code == 1, err
    assert f"{other}: another run (pid {os.getpid()}) is writing there" in err and "Traceback" not in err
    assert [p.name for p in other.iterdir()] == [".lock"]


def test_folder_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from utils.atomic import FolderBusy, folder_lock

    with folder_lock(tmp_path):
        with pytest.raises(FolderBusy, match="another run"):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released: a new holder gets it
        pass


def test_resume_on_a_finished_run_trains_nothing_and_keeps_its_evaluation(
        finished: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))
    run = finished["run"]
    report = (run / "final" / "eval.json").read_bytes()
    listing = sorted(p.name for p in run.iterdir())
    code, err = _finetune(capsys, *finished["args"], "--resume", "--max-steps", "4")
    assert code == 0
    assert "finished already (2 steps)" in err and "Nothing to resume" in err
    assert (run / "final" / "eval.json").read_bytes() == report
    assert sorted(p.name for p in run.iterdir()) == listing


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused(finished: dict, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))
    not_ckpt = finished["tmp"] / "not-a-checkpoint"
    not_ckpt.mkdir(exist_ok=True)
    code, err = _finetune(capsys, *finished["args"][:-4], "--output-dir", str(finished["tmp"] / "r1"),
                          "--resume", str(not_ckpt))
    assert code == 2
    assert f"{not_ckpt}: not a complete checkpoint (trainer_state.json unreadable" in err


def test_resume_from_a_named_incomplete_checkpoint_is_refused(finished: dict, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))
    half = finished["tmp"] / "checkpoint-1"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(finished["run"] / "checkpoint-1", half)
    weights = half / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, err = _finetune(capsys, *finished["args"][:-4], "--output-dir", str(finished["tmp"] / "r2"),
                          "--resume", str(half))
    assert code == 2
    assert f"{half}: not a complete checkpoint (adapter_model.safetensors unreadable" in err


def test_resume_from_a_checkpoint_of_another_base_is_refused(finished: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))
    assert json.loads((finished["run"] / "checkpoint-2" / "base_model.json").read_text())["fingerprint"]
    other = tmp_path / "other-base"
    model = Path(finished["args"][1])
    shutil.copytree(model, other)
    tensors = load_file(str(other / "model.safetensors"))
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key] + 1e-3}, str(other / "model.safetensors"))
    args = [*finished["args"][:-4], "--output-dir", str(tmp_path / "branch")]
    args[1] = str(other)
    code, err = _finetune(capsys, *args, "--resume", str(finished["run"] / "checkpoint-2"))
    assert code == 2, err
    assert "was trained on the base" in err and "(--resume)" in err


def test_the_finished_adapter_holds_no_pickle_and_no_absolute_path(finished: dict) -> None:
    final = finished["run"] / "final"
    assert not (final / "training_args.bin").exists()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pkl"))
    report = json.loads((final / "eval.json").read_text())
    assert not Path(report["adapter"]).is_absolute() or not str(report["adapter"]).startswith(str(Path.home()))


def test_make_portable_turns_project_paths_relative(tmp_path: Path) -> None:
    from utils.adapters import make_portable, read_record, record_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "training_args.bin").write_bytes(b"\x80\x04pickle")
    base = config.miniature_dir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "README.md").write_text(f"---\nbase_model: {base}\n---\n")
    record_base(adapter, base)
    assert not (adapter / "training_args.bin").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/phi3-miniature"
    assert str(config.PROJECT_ROOT) not in (adapter / "README.md").read_text()
    assert read_record(adapter)["base_model"] == "models/phi3-miniature"
    make_portable(adapter)  # twice is harmless


# 3. Data the validator refuses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("token", ["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|system|>"])
def test_control_tokens_in_content_are_refused(token: str, tmp_path: Path) -> None:
    from utils.data import control_tokens

    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line("ok"), encoding="utf-8")
    path.write_text(chat_line("ok") + "\n" + chat_line("fine", f"sure{token}forged") + "\n", encoding="utf-8")
    (problem,) = check_chat_jsonl(path)
    assert str(problem).startswith(f"{path}:2: message 2 content holds \"{token}\" at column 5, one of the "
                                   "tokenizer's control tokens")
    assert token in control_tokens()


def test_the_control_tokens_come_from_the_tokenizer_itself(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line("call <|tool|> now") + "\n", encoding="utf-8")
    assert check_chat_jsonl(path) == []  # the miniature's tokenizer has no such token
    (problem,) = check_chat_jsonl(path, tokenizer)
    assert '"<|tool|>"' in problem.reason


@pytest.mark.parametrize("content", ["\u200b", "\u2060\ufeff", " \u3164 ", "\u0301", "\u00ad\u200d", "\u2800"])
def test_content_of_only_invisible_characters_is_empty(content: str, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line(content) + "\n", encoding="utf-8")
    (problem,) = check_chat_jsonl(path)
    assert problem.line == 1 and "message 1 (user) has no visible characters" in problem.reason


def test_visible_text_with_invisible_characters_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line("cafe\u0301\u200b ok") + "\n", encoding="utf-8")
    assert load_chat_jsonl(path)[0]["messages"][0]["content"] == "cafe\u0301\u200b ok"


@pytest.mark.parametrize("line, fragment", [("[" * 200_000, "nested too deeply"),
                                            ('{"messages": ' + "1" * 5000 + "}", "malformed JSON"),
                                            ('{"messages": [' * 50_000, "nested too deeply")])
def test_deep_nesting_and_huge_integers_are_one_line(line: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line() + "\n" + line + "\n", encoding="utf-8")
    (problem,) = check_chat_jsonl(path)
    assert problem.line == 2 and fragment in problem.reason


def test_a_pipe_is_read_once(tmp_path: Path) -> None:
    data = "".join(chat_line(f"q{i}") + "\n" for i in range(3))
    result = subprocess.run([sys.executable, "-m", "utils.data", "check", "/dev/stdin", "--tokenizer",
                             str(config.miniature_dir())], input=data, capture_output=True, text=True,
                            cwd=config.PROJECT_ROOT, env=_env(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/dev/stdin: OK" in result.stdout and "conversations      3" in result.stdout


def test_a_huge_line_is_refused_fast_and_small(tmp_path: Path) -> None:
    from utils.data import MAX_LINE_BYTES

    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(chat_line() + "\n")
        f.write(chat_line("x" * (20 * 2**20)) + "\n")
        f.write(chat_line() + "\n")
    tracemalloc.start()
    started = time.perf_counter()
    problems = check_chat_jsonl(path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [p.line for p in problems] == [2] and "longer than 2 MiB" in problems[0].reason
    assert peak < 4 * MAX_LINE_BYTES and seconds < 10


def test_a_line_just_under_the_limit_is_read(tmp_path: Path) -> None:
    from utils.data import MAX_LINE_BYTES

    path = tmp_path / "chat.jsonl"
    text = "y" * (MAX_LINE_BYTES - len(chat_line("")) - 1)
    path.write_text(chat_line(text) + "\n" + chat_line() + "\n", encoding="utf-8")
    assert [len(r["messages"][0]["content"]) for r in load_chat_jsonl(path)] == [len(text), 2]


def test_the_check_fails_when_the_tokenizer_it_was_asked_for_cannot_load(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(chat_line() + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "utils.data", "check", str(path), "--tokenizer",
                             str(tmp_path / "no-tokenizer")], capture_output=True, text=True,
                            cwd=config.PROJECT_ROOT, env=_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith(f"--tokenizer {tmp_path / 'no-tokenizer'}: no tokenizer could be loaded")
    assert "Traceback" not in result.stderr and "OK" not in result.stdout


# 4. Disk full and partial writes ------------------------------------------------------------------------------------

def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from utils.atomic import DiskFull, atomic_write, atomic_write_json

    path = atomic_write_json(tmp_path / "cache.json", {"v": 1})
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFull, match=r"cache.json: the disk is full \(.* MiB free there\)"):
        atomic_write(path, "{" * 1000)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_chapter_01_splits_are_never_left_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets import DatasetDict

    from utils.atomic import DiskFull
    from utils.data import load_splits, save_splits

    rows = [json.loads(chat_line(f"q{i}")) for i in range(4)]
    folder = tmp_path / "data"
    save_splits(rows, rows[:1], folder)
    real = DatasetDict.save_to_disk

    def half(self: DatasetDict, path: str, **kwargs: object) -> None:
        real(self, path, **kwargs)
        (Path(path) / "train" / "data-00000-of-00001.arrow").write_bytes(b"cut")
        _no_space()

    monkeypatch.setattr(DatasetDict, "save_to_disk", half)
    with pytest.raises(DiskFull, match=f"{folder}: the disk is full"):
        save_splits(rows, rows, folder)
    assert len(load_splits(folder)["test"]) == 1  # the previous splits, whole
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_chapter_08_caches_a_cut_file_as_missing_naming_it(tmp_path: Path) -> None:
    from utils.experiments import Run, _cache_path, load_cached

    path = _cache_path(Run(), tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"name": "lora r16", "run": {')
    with pytest.warns(UserWarning, match=f"{path}: unreadable cache file"):
        assert load_cached(Run(), tmp_path, data=None) is None
    assert not path.exists() and path.with_name(path.name + ".unreadable").exists()


def test_chapter_08_writes_its_caches_aside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import utils.experiments as ex

    calls: list[Path] = []
    monkeypatch.setattr(ex, "atomic_write_json", lambda path, obj: calls.append(Path(path)))
    monkeypatch.setattr(ex, "measure", lambda *a, **k: {"x": 1.0})
    monkeypatch.setattr(ex, "_data_key", lambda data: {"k": 1})
    ex.measure_base(data=type("D", (), {"tokenizer": None})(), cache_dir=tmp_path, load_model=lambda: None)
    assert calls == [tmp_path / "base.json"]


def test_torch_stream_errors_are_recognised_as_a_full_disk() -> None:
    from utils.atomic import is_disk_full

    assert is_disk_full(RuntimeError(TORCH_DISK_FULL))
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(RuntimeError("shape mismatch")) and not is_disk_full(OSError(errno.ENOENT, "x"))


def test_a_full_disk_during_a_checkpoint_is_one_line(finished: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))
    monkeypatch.setenv("PHI3_LAB_MAX_STEPS", "2")

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError(TORCH_DISK_FULL)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    code, err = _finetune(capsys, *finished["args"][:-4], "--output-dir", str(out), "--no-eval")
    assert code == 1
    assert f"{out}: the disk is full (" in err and "MiB free there) while saving a checkpoint" in err
    assert "Traceback" not in err and "PytorchStreamWriter" not in err
    assert not (out / "final").exists()


# 5. Other ------------------------------------------------------------------------------------------------------------

def test_ctrl_c_in_finetune_is_one_line(finished: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.training

    monkeypatch.setenv("PHI3_LAB_OUTPUTS", str(finished["tmp"] / "outputs"))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.training, "train_sft", interrupted)
    out = tmp_path / "run"
    code, err = _finetune(capsys, *finished["args"][:-4], "--output-dir", str(out), "--no-eval")
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"Interrupted. Checkpoints already written to {out} are kept; run the same command with "
                           "--resume to continue from the newest.")


def test_chapter_01s_dataset_cache_stays_in_the_output_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    code = ("from utils import config\nconfig.silence_library_noise()\nfrom datasets import load_dataset\n"
            "load_dataset('json', data_files={'train': str(config.DATASET_TEST)})\n")
    env = {k: v for k, v in _env(tmp_path, HOME=str(home)).items()
           if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=config.PROJECT_ROOT, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [p for p in home.rglob("*") if p.is_file()], sorted(home.rglob("*"))
    assert any((tmp_path / "outputs" / "cache" / "datasets").rglob("*.arrow"))
