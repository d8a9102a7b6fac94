"""scripts/finetune.py: a real two-process DDP run on CPU, and a clear exit 2 for every kind of bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utils import config

SCRIPT = config.PROJECT_ROOT / "scripts" / "finetune.py"
CPU_2PROC = config.PROJECT_ROOT / "configs" / "accelerate" / "ddp_cpu_2proc.yaml"
STEPS = 6


def _env(tmp_path: Path) -> dict[str, str]:
    """The test's environment: CPU only, outputs under tmp_path, the miniature as the configured model."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PHI3_MODEL_ID")}
    env.update(PHI3_LAB_OUTPUTS=str(tmp_path / "outputs"), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(source: Path, target: Path, lines: int) -> Path:
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]), encoding="utf-8")
    return target


def _script_module():
    spec = importlib.util.spec_from_file_location("finetune_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Six LoRA steps on 64 house-format conversations, two processes (gloo DDP on CPU) via accelerate launch."""
    tmp = tmp_path_factory.mktemp("ddp")
    train = _slice(config.DATASET_TRAIN, tmp / "train.jsonl", 64)
    test = _slice(config.DATASET_TEST, tmp / "test.jsonl", 4)
    run = tmp / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
           "--main_process_port", str(_free_port()), str(SCRIPT), "--model", str(tiny_model_dir),
           "--data", str(train), "--eval-data", str(test), "--output-dir", str(run),
           "--max-steps", str(STEPS), "--logging-steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), cwd=config.PROJECT_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return run, result


def test_both_ranks_train_and_the_loss_goes_down(two_process_run) -> None:
    run, result = two_process_run
    assert "rank 0/2 ready" in result.stdout and "rank 1/2 ready" in result.stdout
    state = json.loads((run / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == STEPS and len(losses) == STEPS
    assert losses[0] > losses[-1]
    checkpoint = run / f"checkpoint-{STEPS}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


def test_progress_bar_and_adapter_come_from_the_main_process_only(two_process_run) -> None:
    run, result = two_process_run
    assert result.stderr.count(f" 0/{STEPS} [") == 1
    adapters = [p.relative_to(run) for p in run.rglob("adapter_model.safetensors")
                if not p.parent.name.startswith("checkpoint-")]
    assert adapters == [Path("final/adapter_model.safetensors")]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]


def test_evaluation_is_written_next_to_the_adapter(two_process_run) -> None:
    run, _ = two_process_run
    report = json.loads((run / "final" / "eval.json").read_text())
    assert report["processes"] == 2 and report["distributed"] == "DDP" and report["method"] == "lora"
    assert report["train"]["steps"] == STEPS
    assert report["eval"]["n_eval"] == 4
    assert 0 < report["eval"]["assistant_loss"] < 20
    assert {"exact_match", "rouge_l", "stop_rate"} <= report["eval"].keys()


def test_saved_adapter_loads_on_the_base_and_generates(two_process_run, tiny_model_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = two_process_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "final"))
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(run / "final")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Order two red chairs by Friday."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


BAD_JSONL = ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
             '{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "x"}]}\n'
             '{not json\n')


@pytest.mark.parametrize("case", ["missing_data", "missing_eval", "unknown_method", "model_not_a_folder",
                                  "model_is_a_file", "invalid_data", "resume_without_checkpoint"])
def test_bad_input_stops_with_exit_2_and_a_clear_message(case: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_JSONL, encoding="utf-8")
    args, expected = {
        "missing_data": (["--data", str(tmp_path / "nope.jsonl")], [f"{tmp_path / 'nope.jsonl'}: file not found (--data)"]),
        "missing_eval": (["--eval-data", str(tmp_path / "gone.jsonl")], [f"{tmp_path / 'gone.jsonl'}: file not found"]),
        "unknown_method": (["--method", "dora"], ["invalid choice: 'dora'"]),
        "model_not_a_folder": (["--model", str(tmp_path / "no-such-model")],
                               [f"{tmp_path / 'no-such-model'}: no such folder (--model)"]),
        "model_is_a_file": (["--model", str(bad)], [f"{bad}: is a file, expected a model folder"]),
        "invalid_data": (["--data", str(bad)], [f'{bad}:2: message 2 has role "asistant"', f"{bad}:3: malformed JSON"]),
        "resume_without_checkpoint": (["--resume", "--output-dir", str(tmp_path / "run")],
                                      [f"{tmp_path / 'run'}: no checkpoint-* folder to resume from"]),
    }[case]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                            env=_env(tmp_path), cwd=config.PROJECT_ROOT, timeout=300)  # a hang guard only
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for line in expected:
        assert line in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_hub_ids_are_not_mistaken_for_missing_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(config.PROJECT_ROOT)
    looks_local = _script_module().looks_local
    assert not looks_local("microsoft/Phi-3-mini-4k-instruct")
    assert looks_local("./models/phi3") and looks_local("/abs/model") and looks_local("outputs/models/x")
    assert looks_local("data/model")


def test_qlora_script_trains_exactly_as_chapter_04(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`finetune.py --method qlora` and chapter 04's cells (prepare_model_for_kbit_training, SFTTrainer, then the CPU
    cell: 4-bit layers kept trainable, fp32 adapter) give the same losses step for step, and the saved adapter is fp32."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from utils.data import load_chat_jsonl
    from utils.models import hardware_report
    from utils.quantization import cast_trainable, keep_4bit_layers_trainable
    from utils.training import peft_config, to_dataset, training_config

    steps = 6
    train = _slice(config.DATASET_TRAIN, tmp_path / "train.jsonl", 32)
    test = _slice(config.DATASET_TEST, tmp_path / "test.jsonl", 4)
    run = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--method", "qlora", "--model", str(tiny_model_dir), "--data", str(train),
           "--eval-data", str(test), "--output-dir", str(run), "--max-steps", str(steps), "--logging-steps", "1",
           "--no-eval"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=config.PROJECT_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((run / "trainer_state.json").read_text())
    script_losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    with safe_open(str(run / "final" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}

    # Chapter 04, as its cells write it (CPU: fp32 compute dtype).
    hw = hardware_report()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=hw.dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, dtype=hw.dtype,
                                                 device_map="cpu")
    model.config.use_cache = False
    settings = training_config(hw, miniature=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    args = SFTConfig(**{**settings, "max_steps": steps, "logging_steps": 1}, output_dir=str(tmp_path / "ch04"),
                     assistant_only_loss=True, report_to="none", use_cpu=True, disable_tqdm=True,
                     dataloader_pin_memory=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(load_chat_jsonl(train)),
                         eval_dataset=to_dataset(load_chat_jsonl(test)), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                         peft_config=LoraConfig(**peft_config(miniature=True)))
    keep_4bit_layers_trainable(trainer.model)  # chapter 04's "CPU only" cell
    cast_trainable(trainer.model, torch.float32)
    trainer.train()
    chapter_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(script_losses) == len(chapter_losses) == steps
    assert torch.allclose(torch.tensor(script_losses), torch.tensor(chapter_losses), atol=1e-4), (script_losses,
                                                                                                  chapter_losses)
