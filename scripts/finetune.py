"""LoRA or QLoRA fine-tuning of Phi-3 (or the offline miniature) as a script: one process, DDP or FSDP.

    python scripts/finetune.py                       # one process: chapter 03's LoRA run on the house format
    python scripts/finetune.py --method qlora        # chapter 04's recipe: 4-bit NF4 base, LoRA on top
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 scripts/finetune.py
    accelerate launch --config_file configs/accelerate/ddp_cpu_2proc.yaml scripts/finetune.py --max-steps 6

The settings are the chapters' own ``training_config`` and ``peft_config`` (``utils.training``). Every process
trains on its share of each batch; only the main process shows progress, writes checkpoints and the final
adapter (``OUTPUT_DIR/final``), then evaluates that adapter as chapter 06 does and writes
``OUTPUT_DIR/final/eval.json``. Bad input stops with a one-line message and exit code 2 before any model is
loaded; a second run into the same output folder (it is locked) or a full disk stops with one line and exit code 1,
Ctrl-C with one line and 130. ``--resume`` continues from the newest complete checkpoint, and on a finished run
says so and trains nothing. docs/SCALE_OUT.md explains the launch recipes and which combinations are known to work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402
from utils.data import context_length, read_chat_jsonl  # noqa: E402
from utils.atomic import FolderBusy, atomic_write_json, disk_full_message, folder_lock, is_disk_full  # noqa: E402
from utils.miniature import REPORT_FILE, require_shipped_miniature  # noqa: E402
from utils.training import checkpoint_problem, last_complete_checkpoint  # noqa: E402

METHODS = ("lora", "qlora")
QUANT_STORAGE = ("auto", "uint8", "bfloat16", "float16", "float32")
MAX_PROBLEMS_SHOWN = 20
MAX_BATCH = 4096  # conversations per process and step; beyond this no GPU holds Phi-3 Mini's activations
MAX_NEW_TOKENS = 4096  # Phi-3 Mini's context: a longer answer cannot be generated
FINAL = "final"
EVAL_FILE = "eval.json"


class InputError(Exception):
    """Bad command-line input: reported as one line per problem, exit code 2, before any heavy work."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="finetune.py", description=__doc__.splitlines()[0],
        epilog="Launch with `accelerate launch [--config_file configs/accelerate/...yaml] scripts/finetune.py ...` "
               "for several processes; see docs/SCALE_OUT.md.")
    parser.add_argument("--method", choices=METHODS, default="lora",
                        help="lora: 16/32-bit base (chapter 03); qlora: 4-bit NF4 base (chapter 04)")
    parser.add_argument("--model", help="local folder or hub id of a Phi-3 checkpoint, or 'miniature' "
                                        f"(default: PHI3_MODEL_ID, now {config.model_id()!r})")
    parser.add_argument("--data", type=Path, default=config.DATASET_TRAIN, help="training chat JSONL")
    parser.add_argument("--eval-data", type=Path, default=config.DATASET_TEST,
                        help="held-out chat JSONL for the loss during training and the final evaluation")
    parser.add_argument("--output-dir", type=Path,
                        help="checkpoints, logs and final/ (default: OUTPUTS/runs/METHOD-MODEL)")
    parser.add_argument("--max-steps", type=whole_number("--max-steps", config.MAX_STEPS_LIMIT),
                        help=f"stop after this many optimizer steps, 1 to {config.MAX_STEPS_LIMIT:,} (default: epochs)")
    parser.add_argument("--logging-steps", type=whole_number("--logging-steps", config.MAX_STEPS_LIMIT),
                        help="log the loss every N steps (default: training_config)")
    parser.add_argument("--per-device-batch-size", type=whole_number("--per-device-batch-size", MAX_BATCH),
                        help="conversations per process and step (default: training_config); the effective batch "
                             "is this x gradient accumulation x processes")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the last checkpoint in the output folder, or from CHECKPOINT")
    parser.add_argument("--quant-storage", choices=QUANT_STORAGE, default="auto",
                        help="qlora: dtype the 4-bit weights are packed in; auto = the compute dtype under FSDP "
                             "(FSDP shards only float tensors), else uint8")
    parser.add_argument("--max-new-tokens", type=whole_number("--max-new-tokens", MAX_NEW_TOKENS), default=48,
                        help="answer length in the final evaluation")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    return parser.parse_args(argv)


def whole_number(flag: str, limit: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``limit`` in ASCII digits (``int()`` alone takes "١٢" or "1_0")."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,20}", text.strip()) or not 1 <= int(text) <= limit:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 1 to {limit:,}")
        return int(text)
    parse.__name__ = flag  # argparse names the option's type in its message
    return parse


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun / accelerate launch set them; (0, 0, 1) for one process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def fsdp_launched() -> bool:
    """True when ``accelerate launch`` runs this script with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def looks_local(spec: str) -> bool:
    """True when a ``--model`` value is meant as a folder, not a hub id like ``microsoft/Phi-3-mini-4k-instruct``.

    A path starting with ``.``, ``/`` or ``~``, one with more than one separator, or ``name/...`` where ``name``
    is a folder here; ``org/model`` with no such local folder is taken as a hub id.
    """
    if spec.startswith((".", "/", "~")):
        return True
    parts = spec.split(os.sep)
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def resolve_model(spec: str | None) -> tuple[str, bool]:
    """(what ``from_pretrained`` gets, whether it is the miniature); the miniature is the shipped one in models/."""
    spec = spec or config.model_id()
    if spec == config.MINIATURE:
        return str(config.miniature_dir()), True
    path = Path(spec).expanduser()
    return (str(path) if path.exists() else spec), (path / REPORT_FILE).is_file()


def default_output_dir(method: str, model: str, miniature: bool) -> Path:
    tag = "miniature" if miniature else Path(model.rstrip("/")).name
    return config.outputs_dir() / "runs" / f"{method}-{tag}"


def read_data(path: Path, flag: str, tokenizer: Any | None = None,
              max_tokens: int | None = None) -> tuple[list[dict], list[str]]:
    """(conversations, problems) of a data file, read once (so ``/dev/stdin`` or a pipe works): ``PATH:LINE: reason``
    lines (``PATH: reason (FLAG)`` when it cannot be read at all); with a tokenizer and the model's context,
    conversations longer than the context too (training refuses them), and the tokenizer's control tokens in text."""
    rows, problems = read_chat_jsonl(path, tokenizer, max_tokens)
    lines = [f"{p.path}: {p.reason} ({flag})" if p.line == 0 else str(p) for p in problems]
    if len(lines) > MAX_PROBLEMS_SHOWN:
        lines = lines[:MAX_PROBLEMS_SHOWN] + [f"... and {len(lines) - MAX_PROBLEMS_SHOWN} more problem(s) in {path}; "
                                              f"`python -m utils.data check {path}` lists them all"]
    return rows, lines


def tokenizer_and_context(model: str) -> tuple[Any | None, int | None, str | None]:
    """(tokenizer, context length, problem) of the model, read without loading its weights (cheap)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as err:
        return None, None, f"{model}: no tokenizer could be loaded ({str(err).splitlines()[0][:120]})"
    if not getattr(tokenizer, "chat_template", None):
        return None, None, f"{model}: the tokenizer has no chat template; use a Phi-3 checkpoint or add one"
    return tokenizer, context_length(model), None


def output_problem(output_dir: Path, flag: str) -> str | None:
    """Why the output folder cannot be written (None when it can); checks the nearest existing folder, writes nothing."""
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing}: is a file, so {output_dir} cannot be created ({flag}); give a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing}: not writable, so {output_dir} cannot be written ({flag}); give a folder you can write to"
    return None


def finished_run(output_dir: Path) -> dict | None:
    """The report (``final/eval.json``) of a run in ``output_dir`` that finished: its adapter saved and no checkpoint
    newer than the steps it records; None when the run has not finished."""
    final = output_dir / FINAL
    if not (final / "adapter_model.safetensors").is_file():
        return None
    try:
        report = json.loads((final / EVAL_FILE).read_text())
        steps = int(report["train"]["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return {"train": {}}  # the adapter is saved, its report is not: finished training all the same
    newest = last_complete_checkpoint(output_dir)
    if newest is not None and int(newest.name.split("-")[1]) > steps:
        return None  # a later run into this folder got further than the saved adapter
    return report


def check_inputs(args: argparse.Namespace, model: str, miniature: bool, output_dir: Path) -> Path | bool | None:
    """Raise :class:`InputError` listing every problem with the command line's files, folders and data (lengths
    against the model's context included), all before any model weights load. Returns what to resume from: the
    newest complete checkpoint for ``--resume``, the given folder, or None. The data read is kept in
    ``args.train_rows`` and ``args.eval_rows``."""
    problems: list[str] = []
    spec = args.model or config.model_id()
    flag = "--model" if args.model else "PHI3_MODEL_ID"
    model_ok = False
    if spec != config.MINIATURE and looks_local(spec) and not Path(model).is_dir():
        what = "is a file, expected a model folder" if Path(model).exists() else "no such folder"
        problems.append(f"{model}: {what} ({flag})")
    elif miniature:
        try:
            require_shipped_miniature(Path(model))
            model_ok = True
        except (FileNotFoundError, config.SettingsError) as err:
            problems.append(str(err))
    else:
        try:
            config.check_model_spec(model, flag)
            model_ok = True
        except config.SettingsError as err:
            problems.append(str(err))
    tokenizer = max_tokens = None
    if model_ok:
        tokenizer, max_tokens, problem = tokenizer_and_context(model)
        problems += [problem] if problem else []
    args.train_rows, found = read_data(args.data, "--data", tokenizer, max_tokens)
    problems += found
    args.eval_rows, found = read_data(args.eval_data, "--eval-data", tokenizer, max_tokens)
    problems += found
    problem = output_problem(output_dir, "--output-dir" if args.output_dir else "PHI3_LAB_OUTPUTS")
    problems += [problem] if problem else []
    resume: Path | bool | None = None
    if isinstance(args.resume, str):
        resume = Path(args.resume)
        if not resume.is_dir():
            problems.append(f"{args.resume}: no such checkpoint folder (--resume)")
        elif (why := checkpoint_problem(resume)) is not None:
            problems.append(f"{args.resume}: not a complete checkpoint ({why}) (--resume); give a checkpoint-N "
                            "folder of an earlier run, or --resume alone for the newest complete one")
        elif not problem and finished_run(output_dir) is not None:
            problems.append(f"{output_dir}: the run there finished already ({FINAL}/ holds its adapter), so resuming "
                            f"from {args.resume} would overwrite it (--resume); give another --output-dir")
    elif args.resume and not problem:
        resume = last_complete_checkpoint(output_dir)
        if resume is None:
            some = "complete " if any(output_dir.glob("checkpoint-*")) else ""
            problems.append(f"{output_dir}: no {some}checkpoint-* folder to resume from (--resume; give "
                            "--output-dir of the earlier run)")
    if resume and model_ok and not problems:
        from utils.adapters import check_adapter_base

        try:  # checkpoints record their base as the final adapter does: resuming onto another base is refused
            check_adapter_base(resume, model)
        except config.SettingsError as err:
            problems.append(f"{err} (--resume)")
    if problems:
        raise InputError("\n".join(problems))
    return resume


def storage_dtype(choice: str, compute_dtype: Any, fsdp: bool) -> Any:
    """The ``bnb_4bit_quant_storage`` dtype: FSDP needs a float type equal to the rest of the model's."""
    import torch

    if choice == "auto":
        return compute_dtype if fsdp else torch.uint8
    return getattr(torch, choice)


def quantization_config(compute_dtype: Any, quant_storage: Any) -> Any:
    """Chapter 04's QLoRA setting: NF4 weights, double quantization, matmuls in the hardware's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)


def load_base(model: str, hardware: Any, quant: Any | None, dtype: Any, fsdp: bool, training: bool) -> Any:
    """The base model on this process's device: ``utils.models.load_model`` unless several GPUs share the work.

    ``load_model`` places a CUDA model on GPU 0; under DDP every rank needs its own GPU (``LOCAL_RANK``) and
    under FSDP no device map at all (FSDP moves each shard to its GPU itself).
    """
    from utils.models import load_model

    _, local_rank, world_size = world()
    if hardware.device != "cuda" or (world_size == 1 and not fsdp):
        return load_model(model, hardware, training=training, quantization_config=quant, dtype=dtype)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": hardware.attn_implementation}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if not fsdp:
        kwargs["device_map"] = {"": local_rank}
    base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if training:
        base.config.use_cache = False
    return base


def evaluate_adapter(model: str, adapter: Path, method: str, hardware: Any, eval_rows: list[dict],
                     max_new_tokens: int) -> dict[str, Any]:
    """Chapter 06's evaluation of a saved adapter: greedy answers scored against references, and held-out loss."""
    import torch
    from peft import PeftModel

    from utils.adapters import check_adapter_base
    from utils.metrics import assistant_loss, evaluate_generation, perplexity
    from utils.models import load_model, load_tokenizer
    from utils.prompts import prompt_messages, reference_answer

    check_adapter_base(adapter, model)
    quant = quantization_config(hardware.dtype, torch.uint8) if method == "qlora" else None
    tuned = PeftModel.from_pretrained(load_model(model, hardware, quantization_config=quant), str(adapter))
    tokenizer = load_tokenizer(str(adapter))
    conversations = [r["messages"] for r in eval_rows]
    scores, answers = evaluate_generation(tuned, tokenizer, conversations, max_new_tokens=max_new_tokens)
    loss = assistant_loss(tuned, tokenizer, conversations)
    examples = [{"prompt": prompt_messages(c)[-1]["content"], "reference": reference_answer(c), "answer": a.text}
                for c, a in zip(conversations[:3], answers)]
    return {**scores, "assistant_loss": loss, "perplexity": perplexity(loss), "n_eval": len(conversations),
            "examples": examples}


INTERRUPTED = ("Interrupted. Checkpoints already written to {out} are kept; run the same command with --resume to "
               "continue from the newest.")


def main(argv: list[str] | None = None) -> int:
    """Parse, check, lock the output folder, train, evaluate; one line and exit 2 for bad input, 1 for a full disk
    or a folder another run is writing, 130 for Ctrl-C."""
    args = parse_args(argv)
    rank = world()[0]
    say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)
    output_dir = None
    try:
        model, miniature = resolve_model(args.model)
        output_dir = args.output_dir or default_output_dir(args.method, model, miniature)
        if args.resume is True and (done := finished_run(output_dir)) is not None:
            steps = done["train"].get("steps")
            say(f"{output_dir}: the run there finished already{f' ({steps} steps)' if steps else ''}; {FINAL}/ holds "
                f"its adapter{'' if 'eval' not in done else f' and {FINAL}/{EVAL_FILE} its evaluation'}. Nothing to "
                "resume; to train again, give another --output-dir.")
            return 0
        resume = check_inputs(args, model, miniature, output_dir)
        if rank != 0:
            return train(args, model, miniature, output_dir, resume)
        with folder_lock(output_dir, "wait for it to finish, or give another --output-dir"):
            return train(args, model, miniature, output_dir, resume)
    except (InputError, config.SettingsError) as err:
        say(str(err))
        return 2
    except FolderBusy as err:
        say(str(err))
        return 1
    except KeyboardInterrupt:
        say(INTERRUPTED.format(out=output_dir or "the output folder"))
        return 130
    except Exception as err:
        if not is_disk_full(err):
            raise
        say(disk_full_message(output_dir or config.outputs_dir(), "saving a checkpoint or the adapter")
            + "; checkpoints cut short are skipped by --resume")
        return 1


def train(args: argparse.Namespace, model: str, miniature: bool, output_dir: Path, resume: Path | None) -> int:
    """Train, save ``final/`` (aside, then swapped in), evaluate; run in every process of a launch."""
    rank, local_rank, world_size = world()
    import torch

    fsdp = fsdp_launched()
    cpu = not torch.cuda.is_available()
    if fsdp and cpu:
        if rank == 0:
            print("FSDP needs GPUs (accelerate builds no FSDP plugin on CPU); on CPU launch with "
                  "configs/accelerate/ddp_cpu_2proc.yaml instead", file=sys.stderr)
        return 2
    if cpu and world_size > 1:
        # Without this accelerate sees no GPU and no CPU flag, and every process would train alone (no gloo group).
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if rank != 0:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()

    import shutil

    from utils.adapters import portable_path, record_base, record_base_callback
    from utils.atomic import staging_path, swap_in
    from utils.models import hardware_report, load_tokenizer
    from utils.training import make_sft_config, peft_config, train_sft, training_config

    hardware = hardware_report()
    training = training_config(hardware, miniature)
    overrides: dict[str, Any] = {}
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.logging_steps:
        overrides["logging_steps"] = args.logging_steps
    if args.per_device_batch_size:
        overrides["per_device_train_batch_size"] = args.per_device_batch_size
    if cpu:
        overrides["use_cpu"] = True
    if world_size > 1 and not fsdp:
        overrides["ddp_find_unused_parameters"] = False
    if args.method == "qlora" and hardware.device == "cuda" and not fsdp:
        # As chapter 04: optimizer state paged to CPU memory under pressure (not with FSDP: docs/SCALE_OUT.md).
        overrides["optim"] = "paged_adamw_8bit"
    sft_args = make_sft_config(output_dir, training, progress=True, **overrides)

    quant, dtype = None, hardware.dtype
    if args.method == "qlora":
        storage = storage_dtype(args.quant_storage, hardware.dtype, fsdp)
        quant = quantization_config(hardware.dtype, storage)
        if storage.is_floating_point:
            dtype = storage
    base = load_base(model, hardware, quant, dtype, fsdp, training=True)
    callbacks = []
    if args.method == "qlora" and not fsdp:
        # Chapter 04's recipe, step for step. Under FSDP the fp32 upcasts below would break the one-dtype-per-shard
        # rule, so FSDP keeps TRL's defaults.
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=training["gradient_checkpointing"])
        if hardware.device == "cpu":  # chapter 04's CPU-only workarounds; a GPU run is the plain recipe
            from utils.quantization import keep_4bit_layers_trainable, qlora_precision

            keep_4bit_layers_trainable(base)  # bitsandbytes' CPU inference repacking would cut the backward pass
            callbacks.append(qlora_precision())  # fp32 adapter: on a CPU, TRL's bf16 one rounds late updates away
    print(f"rank {rank}/{world_size} ready: {args.method} on {base.device}"
          f"{' (FSDP)' if fsdp else ' (DDP)' if world_size > 1 else ''}", flush=True)

    tokenizer = load_tokenizer(model)
    train_rows, eval_rows = args.train_rows, args.eval_rows  # read once by check_inputs (a pipe cannot be re-read)
    callbacks.append(record_base_callback(model))  # every checkpoint knows its base: --resume onto another refuses
    trainer, stats = train_sft(base, tokenizer, train_rows, eval_rows, sft_args, peft=peft_config(miniature),
                               resume_from_checkpoint=str(resume) if resume else None, callbacks=callbacks)
    final = output_dir / FINAL
    if trainer.is_fsdp_enabled:
        # A sharded state dict is not an adapter file; gather the full (adapter-only) state dict to save it.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    # Every rank takes part in saving (FSDP gathers the shards), into a hidden sibling folder; the main process
    # records the base and swaps it in, so an interrupted save leaves the previous final/ whole.
    staging = staging_path(final)
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()
    is_main = trainer.is_world_process_zero()
    if is_main:
        record_base(staging, model)
        swap_in(staging, final)
    del trainer, base
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not is_main:
        return 0

    report: dict[str, Any] = {"method": args.method, "model": portable_path(model), "adapter": portable_path(final.absolute()),
                              "train_data": portable_path(args.data.absolute()),
                              "eval_data": portable_path(args.eval_data.absolute()),
                              "processes": world_size, "distributed": "FSDP" if fsdp else "DDP" if world_size > 1
                              else "none", "device": hardware.device, "train": stats}
    if not args.no_eval:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report["eval"] = evaluate_adapter(model, final, args.method, hardware, eval_rows, args.max_new_tokens)
    atomic_write_json(final / EVAL_FILE, report)
    summary = report.get("eval", {})
    print(f"adapter: {final}  steps {stats['steps']}, train loss {stats['train_loss']:.3f}"
          + (f", held-out loss {summary['assistant_loss']:.3f}, exact match {summary['exact_match']:.2f}"
             if summary else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
