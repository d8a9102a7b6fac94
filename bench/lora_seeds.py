"""How much chapter 03's result depends on the LoRA run's seed, on the shipped base: greedy, sampled and loss.

    .venv/bin/python bench/lora_seeds.py                         # six seeds, about 25 s each on 2 cores
    .venv/bin/python bench/lora_seeds.py --seeds 0 --model DIR --examples 16 --heldout 4 --out /tmp/s.json  # smoke

The base is shipped, so every learner fine-tunes the same weights; what still varies between runs is the LoRA
run's own seed (the adapter's initialisation and the order of the data). For each seed this trains LoRA with
chapter 03's ``training_config`` and ``peft_config`` (no checkpoints or evaluations in between: they do not change
the numbers) and measures, on the held-out split: exact match and per-field accuracy of greedy answers, the
held-out loss on the answers, and the share of *sampled* answers (temperature 0.7 and 1.0, top-p 0.9) that are
well-formed house-format tickets (``utils.evaluation.is_well_formed``, no replacement characters).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.packing import machine  # noqa: E402
from utils import config  # noqa: E402

TEMPERATURES = (0.7, 1.0)
TOP_P = 0.9


def sampled_well_formed(model, tokenizer, conversations: list, temperature: float, seed: int = 0) -> float:
    """Share of sampled answers (one per conversation) that are well-formed tickets without replacement characters."""
    import torch

    from utils.evaluation import is_well_formed
    from utils.metrics import generate
    from utils.prompts import prompt_messages

    torch.manual_seed(seed)
    answers = generate(model, tokenizer, [prompt_messages(c) for c in conversations], do_sample=True,
                       temperature=temperature, top_p=TOP_P)
    return sum(is_well_formed(a.text) and "\ufffd" not in a.text for a in answers) / max(len(answers), 1)


def one_seed(seed: int, model_path: str, workdir: Path, examples: int, heldout: int) -> dict:
    """Chapter 03's LoRA run with ``seed``; its held-out scores."""
    from utils.data import load_chat_jsonl
    from utils.evaluation import field_accuracy
    from utils.metrics import assistant_loss, evaluate_generation
    from utils.models import hardware_report, load_model, load_tokenizer
    from utils.training import make_sft_config, peft_config, train_sft, training_config

    tokenizer = load_tokenizer(model_path)
    train_rows = load_chat_jsonl(config.DATASET_TRAIN)[:examples or None]
    test_rows = load_chat_jsonl(config.DATASET_TEST)[:heldout or None]
    settings = {**training_config(hardware_report(), miniature=True), "eval_strategy": "no", "save_strategy": "no",
                "seed": seed}
    args = make_sft_config(workdir / f"lora-{seed}", settings, progress=False)
    trainer, stats = train_sft(load_model(model_path, training=True), tokenizer, train_rows, test_rows, args,
                               peft=peft_config(miniature=True))
    conversations = [r["messages"] for r in test_rows]
    scores, answers = evaluate_generation(trainer.model, tokenizer, conversations)
    fields = field_accuracy([a.text for a in answers], [c[-1]["content"] for c in conversations])
    return {"seed": seed, "steps": stats["steps"], "train_seconds": stats["wall_seconds"],
            "exact_match": round(scores["exact_match"], 3), "stop_rate": round(scores["stop_rate"], 3),
            "heldout_loss": round(assistant_loss(trainer.model, tokenizer, conversations), 4),
            **{f"well_formed_sampled_t{t}": round(sampled_well_formed(trainer.model, tokenizer, conversations, t), 3)
               for t in TEMPERATURES},
            "field_accuracy": {k: round(v, 3) for k, v in fields.items()}}


def summary(values: list[float]) -> dict[str, float]:
    """min, median and max of a metric over the runs."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2, 3, 4])
    parser.add_argument("--model", default=None, help="base folder (default: the shipped miniature)")
    parser.add_argument("--examples", type=int, default=0, help="LoRA training conversations (default: all)")
    parser.add_argument("--heldout", type=int, default=0, help="test conversations scored (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/bench/lora_seeds.json")
    args = parser.parse_args(argv)

    config.silence_library_noise()
    model_path = args.model or str(config.miniature_dir())
    workdir = config.outputs_dir() / "bench" / "lora-seeds"
    runs = []
    for seed in args.seeds:
        runs.append(one_seed(seed, model_path, workdir, args.examples, args.heldout))
        r = runs[-1]
        print(f"seed {seed}: exact match {r['exact_match']:.3f}, held-out loss {r['heldout_loss']:.3f}, "
              f"well-formed when sampled at T=0.7 {r['well_formed_sampled_t0.7']:.3f}, "
              f"at T=1.0 {r['well_formed_sampled_t1.0']:.3f} ({r['train_seconds']:.0f} s)", flush=True)
    metrics = ["exact_match", "heldout_loss", *(f"well_formed_sampled_t{t}" for t in TEMPERATURES), "train_seconds"]
    result = {"runs": runs, "summary": {m: summary([r[m] for r in runs]) for m in metrics},
              "model": model_path if args.model else "shipped miniature",
              "command": shlex.join([".venv/bin/python", "bench/lora_seeds.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = args.out or config.outputs_dir() / "bench" / "lora_seeds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    s = result["summary"]
    print(f"over {len(runs)} seeds: exact match min {s['exact_match']['min']:.3f} / median "
          f"{s['exact_match']['median']:.3f}; held-out loss max {s['heldout_loss']['max']:.3f}; well-formed at T=0.7 "
          f"min {s['well_formed_sampled_t0.7']['min']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
