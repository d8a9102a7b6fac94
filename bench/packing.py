"""Padding-free packing vs padded batches: real (non-padding) tokens per second, side by side, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/packing.py                      # all settings, 3 interleaved repeats
    OMP_NUM_THREADS=1 .venv/bin/python bench/packing.py --examples 32 --repeats 1 --out /tmp/p.json  # smoke run

Every setting fine-tunes a fresh LoRA (chapter 03's ``training_config`` and ``peft_config``) on the same
conversations of the house-format train split, from the same base model and seed, then measures the
assistant-token loss on the test split. Settings run in turn (rotated each repeat) so that machine load
falls on all of them alike; throughput is also computed on the process's CPU time, which a busy shared
machine disturbs less than wall-clock time (run single-threaded, ``OMP_NUM_THREADS=1``). Real tokens are
counted from the examples each batch is built from, so padding never counts, whatever the layout; TRL's and
transformers' own counters are recorded next to it.

Before timing, the script checks that the attention implementation keeps packed sequences apart: the logits
of conversations packed into one row (position ids restarting at 0, no attention mask) must equal their
logits computed one by one. It stops if they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import config  # noqa: E402

BASELINE = "padded_fixed"
BATCH = 16

# name -> (SFTConfig settings on top of chapter 03's training_config, what it is)
SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "padded_fixed": ({"per_device_train_batch_size": BATCH, "max_length": 256, "pad_to_multiple_of": 256,
                      "padding_free": False},
                     "every batch padded to max_length 256, as in the Phi-3 cookbook"),
    "dynamic_padding": ({"per_device_train_batch_size": BATCH, "max_length": 256, "padding_free": False},
                        "padded to the longest conversation of each batch (TRL's default)"),
    "padding_free": ({"per_device_train_batch_size": BATCH, "padding_free": True, "max_length": None},
                     "the same 16 conversations per batch, concatenated into one row, no padding"),
    "packing_bfd": ({"per_device_train_batch_size": 4, "packing": True, "packing_strategy": "bfd",
                     "max_length": 256},
                    "conversations packed best-fit-decreasing into rows of 256 tokens, 4 rows per batch"),
}


def machine() -> str:
    """CPU model, core count, threads torch uses, torch version; the GPU's name when there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} using {torch.get_num_threads()} thread(s)"
            f"{gpu}")


def command(argv: list[str] | None) -> str:
    """This run's command line, with the thread setting it ran under."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return threads + shlex.join([".venv/bin/python", "bench/packing.py", *(argv if argv is not None else sys.argv[1:])])


def packed_logits_max_diff(model: Any, sequences: list[list[int]]) -> float:
    """Largest |logit| difference between the sequences packed into one row and each run on its own."""
    import torch

    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in sequences]
        packed = torch.tensor([[t for s in sequences for t in s]])
        positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
    return (together - torch.cat(alone)).abs().max().item()


class CountingCollator:
    """Wraps the trainer's collator and counts, per batch, the conversations and real tokens it is built from."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.real_tokens = self.laid_out_tokens = self.conversations = self.batches = 0

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        self.real_tokens += sum(len(e["input_ids"]) for e in examples)
        self.conversations += sum(len(e["seq_lengths"]) if "seq_lengths" in e else 1 for e in examples)
        self.laid_out_tokens += batch["input_ids"].numel()
        self.batches += 1
        return batch


def train_one(name: str, base: str, tokenizer: Any, train_rows: list[dict], test_convs: list[list[dict]],
              epochs: float, seed: int, workdir: Path) -> dict:
    """Fine-tune a fresh LoRA with one setting; returns its throughput, token counts and held-out loss."""
    from peft import LoraConfig
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from utils.metrics import assistant_loss
    from utils.models import hardware_report, load_model
    from utils.training import peft_config, to_dataset, training_config

    hw = hardware_report()
    settings = {**training_config(hw, miniature=True), "num_train_epochs": epochs, "eval_strategy": "no",
                "save_strategy": "no", "logging_steps": 10**6, **SETTINGS[name][0]}
    for key in ("eval_steps", "save_steps", "save_total_limit"):
        settings.pop(key, None)
    args = SFTConfig(output_dir=str(workdir / name), report_to="none", assistant_only_loss=True,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_pin_memory=False,
                     **settings)
    set_seed(seed)
    model = load_model(base, hardware=hw, training=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(train_rows), processing_class=tokenizer,
                         peft_config=LoraConfig(**peft_config(miniature=True)))
    trainer.remove_callback(PrinterCallback)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    loss = assistant_loss(trainer.model, tokenizer, test_convs)
    trl_tokens = next((e["num_tokens"] for e in reversed(trainer.state.log_history) if "num_tokens" in e), None)
    return {"real_tokens_per_s": counter.real_tokens / seconds, "heldout_loss": loss, "seconds": seconds,
            "real_tokens_per_cpu_s": counter.real_tokens / cpu_seconds, "cpu_seconds": cpu_seconds,
            "real_tokens": counter.real_tokens, "laid_out_tokens": counter.laid_out_tokens,
            "conversations": counter.conversations, "steps": trainer.state.global_step,
            "hf_num_input_tokens_seen": trainer.state.num_input_tokens_seen, "trl_num_tokens": trl_tokens}


def summarize(runs: dict[str, list[dict]], baseline: str) -> dict:
    """Per-setting min/median/max of real tokens/s, the best setting, and its ratio to the baseline per repeat."""
    settings = {}
    for name, rs in runs.items():
        rates = [r["real_tokens_per_s"] for r in rs]
        losses = [r["heldout_loss"] for r in rs]
        cpu_rates = [r["real_tokens_per_cpu_s"] for r in rs]
        first = rs[0]
        settings[name] = {
            "real_tokens_per_s": round(statistics.median(rates), 1),
            "heldout_loss": round(statistics.median(losses), 4),
            "min": round(min(rates), 1), "median": round(statistics.median(rates), 1), "max": round(max(rates), 1),
            "heldout_loss_min": round(min(losses), 4), "heldout_loss_max": round(max(losses), 4),
            "real_tokens_per_cpu_s": {"min": round(min(cpu_rates), 1), "median": round(statistics.median(cpu_rates), 1),
                                      "max": round(max(cpu_rates), 1)},
            "what": SETTINGS[name][1], "sft_config": SETTINGS[name][0],
            "real_tokens": first["real_tokens"], "laid_out_tokens": first["laid_out_tokens"],
            "padding_fraction": round(1 - first["real_tokens"] / first["laid_out_tokens"], 3),
            "conversations": first["conversations"], "steps": first["steps"],
            "hf_num_input_tokens_seen": first["hf_num_input_tokens_seen"], "trl_num_tokens": first["trl_num_tokens"],
            "runs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rs],
        }
    best = max(settings, key=lambda n: settings[n]["median"])
    out = {"settings": settings, "baseline": baseline, "best": best,
           "ratio_best_vs_baseline": round(settings[best]["median"] / settings[baseline]["median"], 3)}
    ratios = [b["real_tokens_per_s"] / a["real_tokens_per_s"] for a, b in zip(runs[baseline], runs[best])]
    out["ratio_per_repeat"] = {"min": round(min(ratios), 3), "median": round(statistics.median(ratios), 3),
                               "max": round(max(ratios), 3), "values": [round(r, 3) for r in ratios]}
    cpu = [b["real_tokens_per_cpu_s"] / a["real_tokens_per_cpu_s"] for a, b in zip(runs[baseline], runs[best])]
    out["ratio_per_repeat_cpu_time"] = {"min": round(min(cpu), 3), "median": round(statistics.median(cpu), 3),
                                        "max": round(max(cpu), 3), "values": [round(r, 3) for r in cpu]}
    on_cpu = {n: s["real_tokens_per_cpu_s"]["median"] for n, s in settings.items()}
    out["best_by_cpu_time"] = max(on_cpu, key=on_cpu.get)
    out["ratio_best_by_cpu_time_vs_baseline"] = round(max(on_cpu.values()) / on_cpu[baseline], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=0, help="training conversations (default: the whole split)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over those conversations")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every setting")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--heldout", type=int, default=0, help="test conversations for the loss (default: all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default=None, help="base model folder (default: the configured model)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each setting")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/bench/packing.json")
    args = parser.parse_args(argv)
    if BASELINE not in args.settings:
        parser.error(f"--settings must include the baseline {BASELINE}")

    config.silence_library_noise()
    from utils.data import load_chat_jsonl
    from utils.models import load_model, load_tokenizer, require_miniature_or_model

    base = args.model or require_miniature_or_model()
    tokenizer = load_tokenizer(base)
    train_rows = load_chat_jsonl(config.DATASET_TRAIN)
    test_convs = [r["messages"] for r in load_chat_jsonl(config.DATASET_TEST)]
    train_rows = train_rows[:args.examples] if args.examples else train_rows
    test_convs = test_convs[:args.heldout] if args.heldout else test_convs

    seqs = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in test_convs[:4]]
    check_model = load_model(base, training=True)
    diff = packed_logits_max_diff(check_model, seqs)
    attn = check_model.config._attn_implementation
    print(f"packed vs separate logits ({attn}): max |diff| = {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise SystemExit(f"{attn} attention mixes packed sequences (max logit difference {diff:.3g}); "
                         "padding-free results would be wrong, stopping.")

    workdir = config.outputs_dir() / "bench" / "packing-runs"
    runs: dict[str, list[dict]] = {n: [] for n in args.settings}
    # untimed warm-up, so that first-call costs (lazy imports, allocator growth) fall on no setting
    for name in [] if args.no_warmup else args.settings:
        train_one(name, base, tokenizer, train_rows[:2 * BATCH], test_convs[:4], 1.0, args.seed, workdir)
    for repeat in range(args.repeats):
        order = args.settings[repeat % len(args.settings):] + args.settings[:repeat % len(args.settings)]
        for name in order:
            r = train_one(name, base, tokenizer, train_rows, test_convs, args.epochs, args.seed, workdir)
            runs[name].append(r)
            print(f"repeat {repeat + 1}/{args.repeats}  {name:<16} {r['real_tokens_per_s']:8.0f} real tokens/s  "
                  f"held-out loss {r['heldout_loss']:.4f}  ({r['seconds']:.1f} s, {r['steps']} steps)", flush=True)

    result = summarize(runs, BASELINE)
    result.update({
        "examples": len(train_rows), "epochs": args.epochs, "repeats": args.repeats,
        "heldout_conversations": len(test_convs), "model": args.model or config.model_tag(),
        "attn_implementation": attn,
        "packed_logits_max_abs_diff": diff,
        "command": command(argv),
        "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    out = args.out or config.outputs_dir() / "bench" / "packing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"\n{'setting':<16} {'real tok/s (median)':>20} {'min':>8} {'max':>8} {'per CPU s':>10} "
          f"{'held-out loss':>14} {'padding':>8}")
    for name, s in result["settings"].items():
        print(f"{name:<16} {s['median']:>20.0f} {s['min']:>8.0f} {s['max']:>8.0f} "
              f"{s['real_tokens_per_cpu_s']['median']:>10.0f} {s['heldout_loss']:>14.4f} {s['padding_fraction']:>8.0%}")
    r = result["ratio_per_repeat"]
    c = result["ratio_per_repeat_cpu_time"]
    print(f"\nbest: {result['best']}, {result['ratio_best_vs_baseline']:.2f}x {BASELINE} "
          f"(per repeat min {r['min']:.2f}, median {r['median']:.2f}, max {r['max']:.2f}; "
          f"on process CPU time min {c['min']:.2f}, median {c['median']:.2f}, max {c['max']:.2f}); "
          f"best by CPU time: {result['best_by_cpu_time']}, {result['ratio_best_by_cpu_time_vs_baseline']:.2f}x "
          f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
