"""LoRA and QLoRA training throughput, model FLOP utilisation and peak memory at Phi-3 Mini's real shape.

    .venv/bin/python bench/gpu_shape.py                 # one GPU: Phi-3 Mini's shape, bf16, < 8 minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu_shape.py --scale tiny   # CPU, scaled down, same code path

The model is a randomly initialised ``Phi3ForCausalLM`` built from Phi-3 Mini 4k's published configuration
(hidden 3072, 32 layers, 32 heads, intermediate 8192, vocab 32064, sliding window 2047): nothing is
downloaded, and throughput does not depend on what the weights are. Its size is first counted on the
``meta`` device (3.82B parameters). For LoRA (bf16 base) and QLoRA (NF4 base with double quantization, bf16
compute) it trains LoRA r=16 on every linear layer of the decoder, with AdamW, on random tokens, and
measures for each sequence length, attention implementation (sdpa, eager) and gradient checkpointing
setting, at growing batch sizes until memory runs out or throughput stops growing:

- training tokens/s (timed steps after warm-up steps, with the device synchronised);
- model FLOP utilisation: the FLOPs the model needs per token, times tokens/s, over this GPU's *measured*
  dense matmul rate (``torch.matmul`` of two large bf16 matrices), not the datasheet's. Per token LoRA
  needs 2N for the forward pass over the N frozen matmul weights, 2N for the input gradients in the
  backward pass (no weight gradients), 6 per LoRA parameter, and for attention 4·d·S_eff per layer forward
  and twice that backward (S_eff: keys a query sees under the causal sliding-window mask). Recomputation
  under gradient checkpointing and 4-bit dequantisation are work the model does not need, so they lower MFU;
- peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak resident memory).

It stops with an error on a non-finite or implausible loss, tokens/s <= 0 or MFU > 100%. ``--scale tiny``
(chosen automatically without CUDA) runs the same functions on CPU at hidden 64, 2 layers, sequence 64,
fp32, with bitsandbytes' CPU 4-bit kernels for QLoRA; ``tests/test_bench.py`` runs it that way.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from utils import config  # noqa: E402
from utils.standin import PHI3_MINI_CONFIG  # noqa: E402

PHI3_MINI = PHI3_MINI_CONFIG  # microsoft/Phi-3-mini-4k-instruct config.json, as the stand-in uses it
PHI3_MINI_PARAMETERS = 3_821_079_552
TINY = {**PHI3_MINI, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
        "original_max_position_embeddings": 256, "sliding_window": 47, "eos_token_id": 0, "pad_token_id": 0,
        "bos_token_id": 1}
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # = "all-linear" for Phi-3 (not lm_head)


@dataclass
class Plan:
    """What one scale measures: shape, device, precision, sequence lengths and the batch sizes to try."""

    shape: dict
    device: str
    dtype: torch.dtype
    batches: dict[int, list[int]]  # sequence length -> batch sizes, tried in order
    warmup_steps: int
    timed_steps: int
    matmul_n: int
    budget_s: float
    grid: list[tuple[int, str, bool]] = field(default_factory=list)  # (seq_len, attention, checkpointing)


def make_plan(scale: str) -> Plan:
    """The Phi-3 Mini plan for one GPU, or the tiny CPU plan that exercises the same code."""
    if scale == "full":
        batches = {2048: [1, 2, 4, 8, 16], 512: [4, 8, 16, 32, 64]}
        plan = Plan(PHI3_MINI, "cuda", torch.bfloat16, batches, warmup_steps=2, timed_steps=3, matmul_n=8192,
                    budget_s=420)
    else:
        batches = {64: [2, 4], 32: [4]}
        plan = Plan(TINY, "cpu", torch.float32, batches, warmup_steps=1, timed_steps=2, matmul_n=256,
                    budget_s=20)
    long, short = max(batches), min(batches)
    plan.grid = [(long, "sdpa", False), (long, "sdpa", True), (short, "sdpa", False), (short, "sdpa", True),
                 (long, "eager", False), (long, "eager", True)]
    return plan


def phi3_config(shape: dict) -> Any:
    """A ``Phi3Config`` of the given shape (Phi-3 Mini's rope: default, theta 10000)."""
    from transformers import Phi3Config

    return Phi3Config(**shape)


def count_on_meta(shape: dict) -> dict[str, int]:
    """Parameter counts from a model built on the ``meta`` device (no memory, no initialisation)."""
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(phi3_config(shape))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"total": total, "embedding": embedding, "matmul": matmul}


def matmul_flops_per_s(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """This device's measured dense matmul rate (FLOP/s) for ``n x n`` matrices: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        torch.matmul(a, b)
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def sync(device: str) -> None:
    """Wait for queued device work, so that wall-clock times are real."""
    if device == "cuda":
        torch.cuda.synchronize()


def quantize_nf4(model: Any, compute_dtype: torch.dtype, device: str) -> Any:
    """Replace the decoder's linear layers by bitsandbytes NF4 ``Linear4bit`` (double quantization), as
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` does;
    ``lm_head`` stays in ``compute_dtype`` like transformers leaves it."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name in LORA_TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q)._quantize(device)
                setattr(parent, name, q)
                del child
    model.is_loaded_in_4bit = True
    return model


def build(plan: Plan, method: str) -> Any:
    """A randomly initialised Phi-3 of the plan's shape on its device, quantized for QLoRA, with LoRA r=16."""
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3ForCausalLM

    from utils.training import peft_config

    torch.manual_seed(0)
    with torch.device(plan.device):
        model = Phi3ForCausalLM._from_config(phi3_config(plan.shape), dtype=plan.dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "qlora":
        quantize_nf4(model, plan.dtype, plan.device)
    lora = {**peft_config(miniature=False), "target_modules": LORA_TARGETS}
    model = get_peft_model(model, LoraConfig(**lora))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(plan.dtype)
    return model


def flops_per_token(params: dict[str, int], lora_params: int, shape: dict, seq_len: int) -> float:
    """Model FLOPs per trained token for LoRA: 4N over frozen matmuls, 6 per LoRA weight, causal attention."""
    window = shape.get("sliding_window") or seq_len
    seen = sum(min(i + 1, window) for i in range(seq_len)) / seq_len
    attention_forward = 4 * shape["hidden_size"] * seen * shape["num_hidden_layers"]
    return 4 * params["matmul"] + 6 * lora_params + 3 * attention_forward


def peak_memory_mb(device: str) -> float:
    """Peak memory since the last reset: CUDA allocations, or the process's peak RSS on CPU (never reset)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free(device: str) -> None:
    """Release what a finished or failed measurement left behind."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_steps(model: Any, optimizer: Any, batch: int, seq_len: int, plan: Plan) -> tuple[float, list[float]]:
    """Warm-up then timed optimizer steps on random tokens; returns (seconds of the timed steps, all losses)."""
    ids = torch.randint(0, plan.shape["vocab_size"], (batch, seq_len), device=plan.device)
    losses, started = [], 0.0
    for step in range(plan.warmup_steps + plan.timed_steps):
        if step == plan.warmup_steps:
            sync(plan.device)
            started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(plan.device)
    return time.perf_counter() - started, [x.item() for x in losses]


class Implausible(RuntimeError):
    """A measurement that cannot be right: the benchmark stops rather than record it."""


def check(row: dict, vocab: int) -> None:
    """Fail loudly on a non-finite or absurd loss, non-positive throughput or MFU above 100%."""
    bad = [x for x in row["losses"] if not math.isfinite(x) or x > 3 * math.log(vocab) or x <= 0]
    if bad:
        raise Implausible(f"loss {bad[0]} for {row}: training is broken (random tokens should give ~ln(vocab) "
                          f"= {math.log(vocab):.1f})")
    if not row["tokens_per_s"] > 0:
        raise Implausible(f"tokens/s {row['tokens_per_s']} <= 0 for {row}")
    if not 0 < row["mfu"] <= 1.0:
        raise Implausible(f"MFU {row['mfu']:.1%} outside (0, 100%] for {row}: the FLOP count or the timing is wrong")


def measure(model: Any, method: str, seq_len: int, attn: str, checkpointing: bool, batch: int, plan: Plan,
            params: dict, lora_params: int, peak_flops: float) -> dict:
    """One (method, sequence length, attention, checkpointing, batch) point; status 'oom' if it did not fit."""
    row: dict[str, Any] = {"method": method, "seq_len": seq_len, "attention": attn,
                           "gradient_checkpointing": checkpointing, "batch": batch}
    model.base_model.model.set_attn_implementation(attn)
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.base_model.model.gradient_checkpointing_disable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, losses = run_steps(model, optimizer, batch, seq_len, plan)
    except torch.OutOfMemoryError:
        row["status"] = "oom"
        return row
    finally:
        del optimizer
        free(plan.device)
    tokens_per_s = batch * seq_len * plan.timed_steps / seconds
    row.update({"status": "ok", "tokens_per_s": round(tokens_per_s, 1),
                "step_s": round(seconds / plan.timed_steps, 4),
                "mfu": round(tokens_per_s * flops_per_token(params, lora_params, plan.shape, seq_len) / peak_flops, 4),
                "peak_memory_mb": round(peak_memory_mb(plan.device), 1), "losses": [round(x, 4) for x in losses]})
    check(row, plan.shape["vocab_size"])
    return row


def run(plan: Plan, methods: list[str]) -> dict:
    """Every method over the plan's grid and batch sizes; each method gets an equal share of the time budget, and
    always its first measurement (a loaded machine that builds the model slowly still measures every method)."""
    params = count_on_meta(plan.shape)
    if plan.shape is PHI3_MINI and params["total"] != PHI3_MINI_PARAMETERS:
        raise Implausible(f"{params['total']:,} parameters; Phi-3 Mini has {PHI3_MINI_PARAMETERS:,}: wrong shape")
    peak_flops = matmul_flops_per_s(plan.device, plan.dtype, plan.matmul_n)
    rows: list[dict] = []
    built: dict[str, dict] = {}
    for method in methods:
        started = time.perf_counter()
        model = build(plan, method)
        lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        nf4 = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
                  for m in model.modules())
        if nf4 != (len(LORA_TARGETS) * plan.shape["num_hidden_layers"] if method == "qlora" else 0):
            raise Implausible(f"{method}: {nf4} NF4 layers; expected every decoder linear layer quantized for QLoRA "
                              "and none for LoRA")
        built[method] = {"lora_parameters": lora_params, "nf4_layers": nf4}
        measured = False
        for seq_len, attn, checkpointing in plan.grid:
            previous = 0.0
            for batch in plan.batches[seq_len]:
                if measured and time.perf_counter() - started > plan.budget_s / len(methods):
                    rows.append({"method": method, "seq_len": seq_len, "attention": attn,
                                 "gradient_checkpointing": checkpointing, "batch": batch,
                                 "status": "skipped (time budget)"})
                    break
                row = measure(model, method, seq_len, attn, checkpointing, batch, plan, params, lora_params,
                              peak_flops)
                rows.append(row)
                measured = True
                print(format_row(row), flush=True)
                if row["status"] != "ok" or row["tokens_per_s"] < 1.03 * previous:
                    break
                previous = row["tokens_per_s"]
        del model
        free(plan.device)
    return {"parameters": params, "matmul_flops_per_s": peak_flops, "models": built, "results": rows}


def format_row(row: dict) -> str:
    """One line of the progress table."""
    head = (f"{row['method']:<6} seq {row['seq_len']:>5} {row['attention']:<6} "
            f"ckpt {'on ' if row['gradient_checkpointing'] else 'off'} batch {row['batch']:>3}")
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    return (f"{head}  {row['tokens_per_s']:>10.0f} tok/s  MFU {row['mfu']:6.1%}  "
            f"peak {row['peak_memory_mb']:>9.0f} MiB  loss {row['losses'][-1]:.3f}")


def best_rows(rows: list[dict]) -> dict[str, dict]:
    """The fastest measured point per method and sequence length."""
    best: dict[str, dict] = {}
    for row in rows:
        key = f"{row['method']}@{row['seq_len']}"
        if row["status"] == "ok" and row["tokens_per_s"] > best.get(key, {}).get("tokens_per_s", 0):
            best[key] = row
    return best


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["full", "tiny"], default=None,
                        help="full: Phi-3 Mini on one GPU; tiny: CPU, scaled down (default without CUDA)")
    parser.add_argument("--methods", nargs="*", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds of measuring (shared equally by the methods) after which the rest is skipped; "
                             "default 420 on a GPU, 20 tiny")
    parser.add_argument("--out", type=Path, default=None, help="default: outputs/bench/gpu_shape.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    scale = args.scale or ("full" if torch.cuda.is_available() else "tiny")
    if scale == "full" and not torch.cuda.is_available():
        parser.error("--scale full needs a CUDA GPU; use --scale tiny on CPU")
    plan = make_plan(scale)
    if args.budget_s is not None:
        plan.budget_s = args.budget_s
    config.silence_library_noise()

    result = run(plan, args.methods)
    params = result["parameters"]
    print(f"{params['total'] / 1e6:,.1f}M parameters ({params['matmul'] / 1e6:,.1f}M in matmuls); measured "
          f"matmul rate {result['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s ({plan.dtype})")
    result.update({
        "scale": scale, "shape": plan.shape, "dtype": str(plan.dtype).replace("torch.", ""),
        "device": device_name(plan.device), "best": best_rows(result["results"]),
        "plan": {k: v for k, v in asdict(plan).items() if k not in ("shape", "dtype")},
        "seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "command": shlex.join([".venv/bin/python", "bench/gpu_shape.py", *(argv if argv is not None
                                                                            else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    out = args.out or config.outputs_dir() / "bench" / "gpu_shape.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"{len(result['results'])} measurements in {result['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
