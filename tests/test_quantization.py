"""QLoRA helpers: 4-bit memory, 4-bit layers that stay trainable, fp32 adapters, and merges that keep the logits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from utils import config  # noqa: E402
from utils.data import load_chat_jsonl  # noqa: E402
from utils.models import hardware_report, load_model  # noqa: E402
from utils.quantization import (  # noqa: E402
    cpu_packed_layers, load_4bit_model, load_adapter, max_logit_diff, memory_breakdown,
    merge_adapter_into_full_precision, nf4_levels, qlora_precision, scaled_blocks, storage_bytes)
from utils.training import make_sft_config, peft_config, train_sft, training_config  # noqa: E402

ROWS = load_chat_jsonl(config.DATASET_TRAIN)[:32]
CONVERSATIONS = [r["messages"] for r in load_chat_jsonl(config.DATASET_TEST)[:8]]


def test_nf4_levels_span_minus_one_to_one() -> None:
    levels = nf4_levels()
    assert levels.numel() == 16 and torch.all(levels[1:] > levels[:-1])
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).any()
    scaled = scaled_blocks(torch.randn(8, 64))
    assert scaled.abs().max() == 1


def test_4bit_model_holds_less_memory(tiny_model_dir: Path) -> None:
    full = load_model(str(tiny_model_dir))
    four = load_4bit_model(str(tiny_model_dir))
    assert four.get_memory_footprint() < full.get_memory_footprint()
    assert storage_bytes(four) < storage_bytes(full)
    assert memory_breakdown(four)["linear layers"] < memory_breakdown(full)["linear layers"] / 4


def _first_layer_grads(model: torch.nn.Module, enc: dict) -> torch.Tensor:
    model.train()
    model.zero_grad()
    model(**enc, labels=enc["input_ids"]).loss.backward()
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    return layer.lora_A["default"].weight.grad.clone()


def test_4bit_layers_stay_trainable_after_an_evaluation(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tokenizer.apply_chat_template(CONVERSATIONS, return_dict=True, padding=True, return_tensors="pt")
    model = prepare_model_for_kbit_training(load_4bit_model(str(tiny_model_dir)), use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(**peft_config(True)))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    before = _first_layer_grads(model, enc)
    model.eval()
    with torch.no_grad():
        model(**enc)
    assert cpu_packed_layers(model) == 0
    after = _first_layer_grads(model, enc)
    assert before.abs().sum() > 0
    torch.testing.assert_close(after, before)


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A QLoRA adapter trained for a few steps on the tiny model with the chapters' recipe."""
    from peft import prepare_model_for_kbit_training

    out = tmp_path_factory.mktemp("qlora")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_4bit_model(str(tiny_model_dir), training=True)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    settings = training_config(hardware_report(), miniature=True)
    settings.update(per_device_train_batch_size=8, max_steps=6, eval_strategy="no", save_strategy="no",
                    logging_steps=1)
    precision = qlora_precision()
    trainer, _ = train_sft(model, tokenizer, ROWS, ROWS[:8], make_sft_config(out / "run", settings, progress=False),
                           peft=peft_config(True), callbacks=[precision])
    trainer.save_model(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    return out / "adapter", precision


def test_qlora_trains_fp32_adapters(qlora_adapter: tuple[Path, object]) -> None:
    adapter, precision = qlora_adapter
    assert precision.dtypes == ["float32"]
    assert (adapter / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("dequantized", [True, False])
def test_merged_model_matches_the_adapter_model(tiny_model_dir: Path, qlora_adapter: tuple[Path, object],
                                                tmp_path: Path, dequantized: bool) -> None:
    adapter, _ = qlora_adapter
    out = merge_adapter_into_full_precision(str(tiny_model_dir), adapter, tmp_path / "merged", dequantized=dequantized)
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not getattr(merged, "is_loaded_in_4bit", False)
    reference = load_adapter(adapter, str(tiny_model_dir), quantized=dequantized)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert max_logit_diff(merged, reference, tokenizer, CONVERSATIONS) <= 1e-2


def test_merges_are_saved_in_the_training_dtype(tiny_model_dir: Path, qlora_adapter: tuple[Path, object],
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a bf16 GPU a merge is saved in bf16 (7.6 GB for Phi-3 Mini), not fp32 (15 GB), unless asked otherwise."""
    from dataclasses import replace

    import utils.quantization as quantization

    adapter, _ = qlora_adapter
    bf16_machine = replace(quantization.hardware_report(), dtype=torch.bfloat16)
    monkeypatch.setattr(quantization, "hardware_report", lambda: bf16_machine)
    out = merge_adapter_into_full_precision(str(tiny_model_dir), adapter, tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    out = merge_adapter_into_full_precision(str(tiny_model_dir), adapter, tmp_path / "fp32", dtype=torch.float32)
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.float32


def test_cast_trainable_casts_only_the_adapter(qlora_adapter: tuple[Path, object], tiny_model_dir: Path) -> None:
    """Chapter 04's CPU cell: TRL's bf16 adapter back to fp32, the frozen base untouched."""
    from utils.quantization import cast_trainable, trainable_dtypes

    adapter, _ = qlora_adapter
    model = load_adapter(adapter, str(tiny_model_dir), quantized=True)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    cast_trainable(model, torch.bfloat16)
    assert trainable_dtypes(model) == ["bfloat16"]
    assert cast_trainable(model, torch.float32) == ["bfloat16"] and trainable_dtypes(model) == ["float32"]
    assert {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_a_4bit_merge_after_cpu_repacking_scrambles_the_weights(qlora_adapter: tuple[Path, object],
                                                                 tiny_model_dir: Path) -> None:
    """The catastrophic row of chapter 04's merge table: peft's 4-bit merge reads bitsandbytes' CPU inference layout
    as the standard one. A plain 4-bit merge only re-rounds the update; after the repacking the weights are wrong,
    and undoing the repacking first (keep_4bit_layers_trainable) avoids it."""
    from bitsandbytes.functional import dequantize_4bit

    from utils.quantization import keep_4bit_layers_trainable, repack_for_cpu_inference

    adapter, _ = qlora_adapter
    name = "model.layers.0.mlp.gate_up_proj"

    def merged_weight(repack: bool, undo: bool = False) -> torch.Tensor:
        model = load_adapter(adapter, str(tiny_model_dir), quantized=True)
        if repack:
            assert repack_for_cpu_inference(model) > 0 and cpu_packed_layers(model) > 0
        if undo:
            keep_4bit_layers_trainable(model)
            assert cpu_packed_layers(model) == 0
        weight = model.merge_and_unload().get_submodule(name).weight
        return dequantize_4bit(weight.data, weight.quant_state).float()

    reference = load_adapter(adapter, str(tiny_model_dir), quantized=False).merge_and_unload()
    exact = reference.get_submodule(name).weight.float()
    scale = (exact.abs().mean()).item()
    plain, scrambled = merged_weight(False), merged_weight(True)
    assert (plain - exact).abs().mean().item() < 0.2 * scale  # NF4 rounding only
    assert (scrambled - exact).abs().mean().item() > 3 * (plain - exact).abs().mean().item()
    undone = merged_weight(True, undo=True)  # the inverse is bitsandbytes' best effort: scales went through bf16
    assert (undone - exact).abs().mean().item() < 1.5 * (plain - exact).abs().mean().item()
