"""How far each way of merging a QLoRA adapter moves the model: on the miniature and on a Phi-3-Mini-shaped stand-in.

    .venv/bin/python bench/merge_error.py               # both models; writes docs/merge_error.json (chapter 04 shows it)
    .venv/bin/python bench/merge_error.py --steps 10    # a quicker, smaller stand-in adapter

Chapter 04 measures the merges on the model it trains (the miniature by default). What a merge into the 4-bit model
costs depends on how large the adapter's update is next to NF4's steps, and so on the weights' shapes and the recipe.
This script measures the same merges on both models:

- the miniature, with chapter 04's adapter (``outputs/adapters/qlora``, the full recipe; run chapter 04 first);
- a stand-in with Phi-3 Mini's real widths and vocabulary and 2 random layers (``utils/standin.py``, built under
  ``outputs/standin/`` if missing), with an adapter trained here with chapter 04's calls, its CPU workarounds and the
  real model's recipe (``utils.training``: learning rate, rank, cosine schedule) for ``--steps`` steps, as many as
  the recipe's one epoch takes on the real model (480 conversations, 16 a step), but 4 conversations a step
  instead of 16 to fit a 2-core CPU: Adam's steps have the same size whatever the batch, so the adapter's
  magnitude, which is what the merges round, is comparable.

For each: the adapter on the 4-bit base as trained is the reference; each merge is compared with it on the first
``--conversations`` held-out conversations (max and mean |Δ logit|, held-out loss on them), and ``update error`` is
how much of the update ``BA`` a 4-bit merge loses to rounding: ||Q(W + BA) - (W + BA)|| / ||BA|| over every adapted
layer, with W the NF4 weights and Q bitsandbytes' NF4 round trip (peft's 4-bit merge computes exactly Q(W + BA)).
CPU, fp32. Timings are not recorded: this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402

OUT = config.PROJECT_ROOT / "docs" / "merge_error.json"


def train_standin_adapter(base: str, steps: int, out: Path) -> dict:
    """A QLoRA adapter on ``base`` with chapter 04's calls and the real model's recipe, ``steps`` steps; its settings."""
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from utils.adapters import record_base
    from utils.data import load_splits
    from utils.models import hardware_report, load_tokenizer
    from utils.quantization import bnb_config, cast_trainable, keep_4bit_layers_trainable
    from utils.training import peft_config, training_config

    hw = hardware_report()
    settings = {**training_config(hw, miniature=False), "max_steps": steps, "eval_strategy": "no",
                "save_strategy": "no", "logging_steps": max(steps // 5, 1), "gradient_accumulation_steps": 1}
    lora = peft_config(miniature=False)
    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config(hw), dtype=hw.dtype,
                                                 device_map=hw.device)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    args = SFTConfig(**settings, output_dir=str(out / "run"), assistant_only_loss=True, report_to="none",
                     dataloader_pin_memory=False, disable_tqdm=True)
    splits = load_splits(config.split_dir())
    trainer = SFTTrainer(model=model, args=args, train_dataset=splits["train"].select_columns(["messages"]),
                         processing_class=tokenizer, peft_config=LoraConfig(**lora))
    keep_4bit_layers_trainable(trainer.model)  # chapter 04's CPU workarounds
    cast_trainable(trainer.model, torch.float32)
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    record_base(out / "adapter", base)
    return {"steps": steps, "learning_rate": settings["learning_rate"], "rank": lora["r"],
            "batch": settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)}


def update_error(adapter: Path, base: str) -> float:
    """||Q(W + BA) - (W + BA)|| / ||BA|| over every adapted 4-bit layer: what a merge into 4 bits loses of the update."""
    from bitsandbytes.functional import dequantize_4bit

    from utils.quantization import load_adapter, roundtrip_4bit

    model = load_adapter(adapter, base, quantized=True)
    lost, size = 0.0, 0.0
    for module in model.modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.get_base_layer().weight
            w = dequantize_4bit(weight.data, weight.quant_state).float()
            delta = module.get_delta_weight("default").float()
            lost += (roundtrip_4bit(w + delta) - (w + delta)).pow(2).sum().item()
            size += delta.pow(2).sum().item()
    return (lost / size) ** 0.5


def merge_rows(name: str, base: str, adapter: Path, conversations: list, trained: dict) -> list[dict]:
    """Chapter 04's merge table for one model: each merge against the adapter on the 4-bit base."""
    from peft import PeftModel

    from utils.metrics import assistant_loss
    from utils.models import load_model, load_tokenizer, release_memory
    from utils.quantization import load_adapter, logits_on, merge_adapter_into_full_precision, repack_for_cpu_inference

    tokenizer = load_tokenizer(base)
    as_trained = load_adapter(adapter, base, quantized=True)
    reference = logits_on(as_trained, tokenizer, conversations)
    rows = [{"model": name, "merge": "adapter on the 4-bit base, as trained", "max |Δ logit|": 0.0,
             "mean |Δ logit|": 0.0, "held-out loss": assistant_loss(as_trained, tokenizer, conversations)}]
    del as_trained
    release_memory()

    def in_4bit(repacked: bool = False):
        adapted = load_adapter(adapter, base, quantized=True)
        if repacked:
            repack_for_cpu_inference(adapted)
        return adapted.merge_and_unload()

    with tempfile.TemporaryDirectory() as scratch:
        merges = {"merge_and_unload() on the 4-bit model": in_4bit,
                  "the same, after bitsandbytes' CPU repacking": lambda: in_4bit(repacked=True),
                  "into the original weights, 16-bit": lambda: PeftModel.from_pretrained(
                      load_model(base), str(adapter)).merge_and_unload(),
                  "into the dequantized NF4 weights, 16-bit": lambda: load_model(str(merge_adapter_into_full_precision(
                      base, adapter, Path(scratch) / "merged", dequantized=True)))}
        for label, load in merges.items():
            merged = load()
            gap = (logits_on(merged, tokenizer, conversations) - reference).abs()
            rows.append({"model": name, "merge": label, "max |Δ logit|": gap.max().item(),
                         "mean |Δ logit|": gap.mean().item(),
                         "held-out loss": assistant_loss(merged, tokenizer, conversations)})
            del merged, gap
            release_memory()
    error = update_error(adapter, base)
    for row in rows:
        row.update({"update error of a 4-bit merge": error, **{f"adapter {k}": v for k, v in trained.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps of the stand-in's adapter")
    parser.add_argument("--conversations", type=int, default=32, help="held-out conversations compared")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the stand-in")
    args = parser.parse_args()

    from utils.data import load_splits
    from utils.miniature import require_shipped_miniature
    from utils.standin import build_standin, standin_dir

    torch.manual_seed(0)
    conversations = [r["messages"] for r in load_splits(config.split_dir())["test"]][:args.conversations]
    miniature_adapter = config.adapter_dir("qlora")
    if not (miniature_adapter / "adapter_config.json").exists():
        print(f"{miniature_adapter} is missing: run notebooks/04_qlora_finetuning.ipynb first", file=sys.stderr)
        return 1
    stats = json.loads((miniature_adapter / "run_stats.json").read_text()) if (
        miniature_adapter / "run_stats.json").exists() else {}
    rows = merge_rows("miniature (chapter 04's adapter)", str(require_shipped_miniature()), miniature_adapter,
                      conversations, {"steps": stats.get("steps", "chapter 04")})
    standin = standin_dir(args.layers)
    if not (standin / "config.json").exists():
        build_standin(standin, layers=args.layers)
    with tempfile.TemporaryDirectory() as scratch:
        trained = train_standin_adapter(str(standin), args.steps, Path(scratch))
        rows += merge_rows(f"Phi-3-Mini-shaped stand-in, {args.layers} random layers", str(standin),
                           Path(scratch) / "adapter", conversations, trained)
    report = {"command": f"python bench/merge_error.py --steps {args.steps} --conversations {args.conversations}",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": f"CPU ({platform.machine()}), fp32", "rows": rows}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(OUT)
    for row in rows:
        print(f"{row['model'][:28]:28s} {row['merge'][:48]:48s} max {row['max |Δ logit|']:8.4f} "
              f"mean {row['mean |Δ logit|']:.4f} loss {row['held-out loss']:.4f}")
    print(f"update error of a 4-bit merge: {rows[0]['update error of a 4-bit merge']:.3f} (miniature), "
          f"{rows[-1]['update error of a 4-bit merge']:.3f} (stand-in)\nwritten to {OUT.relative_to(config.PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
