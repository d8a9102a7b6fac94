"""The shared training recipe: the miniature's pre-training (chapter 00) and one TRL ``SFTConfig`` builder (03, 04)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def to_dataset(rows: list[dict]) -> Any:
    """A ``datasets.Dataset`` with only the ``messages`` column TRL trains on."""
    from datasets import Dataset

    return Dataset.from_list([{"messages": r["messages"]} for r in rows])


def loss_history(trainer: Any) -> list[dict]:
    """The trainer's logged ``step``/``loss``/``eval_loss``/``learning_rate`` entries, for plots and reports."""
    keep = ("step", "epoch", "loss", "eval_loss", "learning_rate")
    return [{k: e[k] for k in keep if k in e} for e in trainer.state.log_history if "loss" in e or "eval_loss" in e]


def padding_free_rows(rows: int, pad_token_id: int) -> Callable[[list[dict]], dict]:
    """A collator that lays a batch out padding-free in ``rows`` rows instead of one (``rows=1`` is the plain
    ``DataCollatorWithFlattening``).

    Each row is ``DataCollatorWithFlattening``'s output for its share of the conversations (positions restarting at
    every conversation, the first label of each masked); shorter rows are filled with pad tokens whose labels are
    -100, so loss and gradients are those of the single row. Why: without FlashAttention, sdpa computes attention
    over a whole row and masks the pairs of tokens from different conversations instead of skipping them, so its
    cost grows with the square of the row's length. On the miniature two rows of eight conversations halve that
    work: one pre-training epoch of 4,800 conversations took 11.3 instead of 12.3 s on 2 CPU cores (medians of
    four interleaved runs each). ``tests/test_training.py`` checks that loss and gradients are unchanged.
    """
    import torch
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening()
    fills = {"input_ids": pad_token_id, "labels": -100, "position_ids": 0}

    def collate(features: list[dict]) -> dict:
        size = -(-len(features) // rows)
        parts = [flatten(features[i:i + size]) for i in range(0, len(features), size)]
        width = max(part["input_ids"].shape[1] for part in parts)
        return {key: torch.cat([torch.nn.functional.pad(part[key], (0, width - part[key].shape[1]), value=fill)
                                for part in parts]) for key, fill in fills.items()}

    return collate


def train_full(model: Any, tokenizer: Any, rows: list[dict], epochs: float, learning_rate: float, seed: int,
               output_dir: Path, progress: bool = True, batch_size: int = 32, rows_per_batch: int = 2) -> list[dict]:
    """Full-parameter training on every token (the miniature's base pre-training); returns the loss history.

    Like real pre-training, the loss covers prompts too, so every word the model reads it also learns to write:
    plain causal-LM training, so ``transformers.Trainer`` with a padding-free layout (``padding_free_rows``: no
    pad tokens inside a row, positions restarting per conversation). Same batches and labels as TRL's
    ``SFTTrainer`` with ``padding_free=True``, 1.2x faster here: no fused LM head or entropy/accuracy metrics on
    every step.
    """
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    conversations = [row["messages"] for row in rows]
    ids = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)["input_ids"]
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
        weight_decay=0.01, logging_steps=100, save_strategy="no", report_to="none", seed=seed,
        disable_tqdm=not progress, dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                      data_collator=padding_free_rows(rows_per_batch, tokenizer.pad_token_id))
    trainer.train()
    return loss_history(trainer)


SETTING_NOTES: dict[str, str] = {
    "learning_rate": "step size; LoRA on 3-14B models: 1e-4 to 3e-4, tiny models tolerate 1e-3 to 1e-2",
    "per_device_train_batch_size": "conversations per step on each device; as large as memory allows",
    "gradient_accumulation_steps": "steps summed before an update; effective batch = batch x accumulation",
    "num_train_epochs": "passes over the data; 1-3 for real models (more overfits), more for tiny ones",
    "lr_scheduler_type": "how the rate decays; cosine or linear are the usual choices",
    "warmup_steps": "rise of the rate at the start; a float is a fraction of all steps (0.03-0.1)",
    "weight_decay": "pull of the weights towards zero; 0 to 0.1, often 0 for LoRA",
    "logging_steps": "how often the training loss is recorded",
    "eval_strategy": "when to measure held-out loss: 'steps', 'epoch' or 'no'",
    "eval_steps": "steps between held-out evaluations",
    "save_strategy": "when to write checkpoints (what resuming starts from)",
    "save_steps": "steps between checkpoints",
    "save_total_limit": "checkpoints kept on disk; older ones are deleted",
    "bf16": "train in bfloat16 (from the hardware report: Ampere+ GPUs)",
    "fp16": "train in float16 with loss scaling (older GPUs)",
    "gradient_checkpointing": "recompute activations in the backward pass: ~30% slower, far less memory",
    "max_steps": "stop after this many steps (here: PHI3_LAB_MAX_STEPS, a short run; its scores mean nothing)",
    "max_length": "tokens per example, longer ones truncated; None with padding_free (check lengths in 01)",
    "padding_free": "concatenate a batch into one row, no pad tokens: 2.5-3x real tokens/s here (bench/)",
    "seed": "makes data order and initialisation repeatable",
    "r": "rank of the update B·A; 8-64 (higher = more capacity, more parameters)",
    "lora_alpha": "scale of the update is alpha / r; commonly r or 2r",
    "lora_dropout": "dropout on the LoRA input; 0 to 0.1",
    "bias": "train biases too? 'none' is usual (Phi-3 has no biases anyway)",
    "task_type": "tells peft which model head to wrap (causal LM)",
    "target_modules": "layers to adapt: 'all-linear' or names like qkv_proj, o_proj, gate_up_proj, down_proj",
}


def training_config(hardware: Any, miniature: bool) -> dict[str, Any]:
    """The chapters' ``training_config``: SFTConfig settings chosen for the model size and the hardware.

    A short run (``PHI3_LAB_MAX_STEPS=N``, see ``utils.config``) stops after N steps and logs, evaluates and
    checkpoints every N // 2 steps (at least every step), so that its curves, checkpoints and resume demo exist.
    """
    import torch

    from utils import config

    settings = {
        "learning_rate": 8e-3 if miniature else 2e-4,
        "per_device_train_batch_size": 8 if miniature else 4,
        "gradient_accumulation_steps": 1 if miniature else 4,
        "num_train_epochs": 4 if miniature else 1,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "weight_decay": 0.0,
        "logging_steps": 10 if miniature else 5,
        "eval_strategy": "steps",
        "eval_steps": 40 if miniature else 10,
        "save_strategy": "steps",
        "save_steps": 40 if miniature else 10,
        "save_total_limit": 2,
        "bf16": hardware.dtype == torch.bfloat16,
        "fp16": hardware.dtype == torch.float16,
        "gradient_checkpointing": not miniature,
        "max_length": None,
        "padding_free": True,
        "seed": 42,
    }
    cap = config.max_steps()
    if cap is not None:
        every = max(1, cap // 2)
        settings |= {"max_steps": cap, "logging_steps": 1, "eval_steps": every, "save_steps": every}
    return settings


def peft_config(miniature: bool) -> dict[str, Any]:
    """The chapters' ``peft_config``: LoRA on every linear layer of Phi-3 (not the embeddings or lm_head)."""
    return {
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0 if miniature else 0.05,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "target_modules": "all-linear",
    }


def describe(settings: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(setting, value, meaning and typical range) rows for a table in the notebooks."""
    return [(k, v, SETTING_NOTES.get(k, "")) for k, v in settings.items()]


def make_sft_config(output_dir: Path, training: dict[str, Any], progress: bool = True,
                    **overrides: Any) -> Any:
    """An ``SFTConfig`` from a ``training_config`` dict: assistant-only loss, TensorBoard logs, real tokens counted."""
    from trl import SFTConfig

    settings = {**training, **overrides}
    return SFTConfig(output_dir=str(output_dir), report_to="tensorboard",
                     assistant_only_loss=True, include_num_input_tokens_seen="non_padding",
                     disable_tqdm=not progress, dataloader_pin_memory=False, **settings)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU), in MiB."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as the values they hold."""
    import torch

    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def train_sft(model: Any, tokenizer: Any, train_rows: list[dict], eval_rows: list[dict], args: Any,
              peft: dict[str, Any] | None = None, resume_from_checkpoint: str | bool | None = None,
              callbacks: list[Any] | None = None) -> tuple[Any, dict]:
    """Fine-tune with TRL's ``SFTTrainer`` (LoRA when ``peft`` is given); returns the trainer and run statistics.

    For scripts and tests (``scripts/finetune.py``, ``bench/``); chapters 03 and 04 write these calls out.
    """
    from peft import LoraConfig
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(train_rows),
                         eval_dataset=to_dataset(eval_rows), processing_class=tokenizer,
                         peft_config=LoraConfig(**peft) if peft else None, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer, run_stats(trainer, result)


def run_stats(trainer: Any, result: Any) -> dict[str, Any]:
    """What a finished run cost: steps, real tokens/s, trainable parameters, peak memory (``result`` from ``train()``).

    Tokens are counted only when the ``SFTConfig`` set ``include_num_input_tokens_seen="non_padding"``.
    """
    trainable, total = count_parameters(trainer.model)
    tokens = trainer.state.num_input_tokens_seen
    runtime = result.metrics["train_runtime"]
    return {
        "wall_seconds": round(runtime, 1), "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "tokens_seen": tokens, "tokens_per_second": round(tokens / runtime, 1),
        "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 3), "peak_memory_mb": round(peak_memory_mb(), 1),
    }


def stop_after(step: int) -> Any:
    """A callback that stops training after ``step`` optimizer steps, as an interruption would."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= step:
                control.should_training_stop = True
                control.should_save = True
            return control

    return StopAfter()


def save_run_stats(folder: Path, stats: dict, history: list[dict]) -> Path:
    """Write a run's statistics and loss history next to its adapter, for the comparison chapters (atomically)."""
    from utils.atomic import atomic_write_json

    return atomic_write_json(Path(folder) / "run_stats.json", {**stats, "history": history})


def checkpoint_problem(folder: Path) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from (None when it can): its ``trainer_state.json`` must
    parse and its weights (``adapter_model.safetensors`` or ``model.safetensors``) must load."""
    import json

    from safetensors import safe_open

    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable ({type(err).__name__})"
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    if not weights:
        return "no adapter_model.safetensors or model.safetensors"
    try:
        with safe_open(str(weights[0]), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as err:  # SafetensorError, OSError: a save cut short
        return f"{weights[0].name} unreadable ({str(err).splitlines()[0][:80]})"
    return None


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` in ``run_dir`` that is complete; skips partial or empty ones (an interrupted save)
    with a one-line warning each. None when there is none."""
    import re
    import warnings

    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"{folder}: skipped, incomplete ({problem}); probably a save that was interrupted",
                      stacklevel=2)
    return None


def fresh_run_dir(name: str) -> Path:
    """``OUTPUTS/runs/NAME.partial``, emptied: where a new run writes its checkpoints, so that the previous run's
    ``OUTPUTS/runs/NAME`` stays intact until :func:`promote_run` swaps the new one in (after its adapter is saved)."""
    import shutil

    from utils import config

    folder = config.check_outputs_dir() / "runs" / f"{name}.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def promote_run(partial: Path, final: Path | None = None) -> Path:
    """Replace the previous run's folder by the finished ``NAME.partial`` one (old moved aside, then deleted)."""
    from utils.atomic import swap_in

    partial = Path(partial)
    if final is None:
        if not partial.name.endswith(".partial"):
            raise ValueError(f"{partial}: expected a NAME.partial folder from fresh_run_dir, or give final=")
        final = partial.with_name(partial.name[: -len(".partial")])
    return swap_in(partial, Path(final))
