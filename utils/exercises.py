"""Answer checks for the chapters' exercises: each says right or not, with a hint, and returns True when right."""

from __future__ import annotations

from typing import Any

from utils.prompts import Conversation


def _verdict(right: bool, what: str, hint: str) -> bool:
    print(f"right: {what}" if right else f"not quite: {what}. Hint: {hint}")
    return right


def check_loss_share(share: float, tokenizer: Any, conversations: list[Conversation]) -> bool:
    """Chapter 01: the share of all tokens of ``conversations`` that carry loss (assistant tokens, ``<|end|>`` too)."""
    from utils.prompts import assistant_mask

    masks = [assistant_mask(tokenizer, c)[1] for c in conversations]
    expected = sum(map(sum, masks)) / sum(map(len, masks))
    return _verdict(abs(share - expected) < 5e-3, f"{share:.3f} of the tokens carry loss",
                    "count the 1s of assistant_mask over every conversation and divide by the count of all its "
                    "tokens (one total over the split, not a mean of per-conversation shares)")


def expected_peft_lora_parameters(model: Any, r: int, target_modules: list[str] | str = "all-linear") -> int:
    """What ``LoraConfig(r=r, target_modules=...)`` adds to ``model``: r·(in + out) per adapted linear layer.

    ``"all-linear"`` means every linear layer inside the decoder blocks (not ``lm_head``), as peft reads it.
    """
    import torch

    from utils.loralib_tools import expected_lora_parameters

    names = ({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
             if target_modules == "all-linear" else set(target_modules))
    return sum(expected_lora_parameters(model, r, dict.fromkeys(names)).values())


def check_lora_parameters(count: int, model: Any, r: int, target_modules: list[str] | str = "all-linear") -> bool:
    """Chapters 02-03: a predicted number of LoRA parameters for rank ``r`` on ``target_modules`` of ``model``."""
    expected = expected_peft_lora_parameters(model, r, target_modules)
    return _verdict(count == expected, f"{count:,} LoRA parameters at r = {r}",
                    "each adapted layer adds A (r x in) and B (out x r); sum r * (in + out) over the layers the "
                    "targets name, in every decoder layer")


def check_bits_per_weight(bits: float, double_quant: bool, blocksize: int = 64, blocksize2: int = 256) -> bool:
    """Chapter 04: bits a 4-bit NF4 weight costs, codes and block scales together."""
    expected = 4 + (8 / blocksize + 32 / (blocksize * blocksize2) if double_quant else 32 / blocksize)
    return _verdict(abs(bits - expected) < 1e-3, f"{bits:.3f} bits per weight "
                    f"({'with' if double_quant else 'without'} double quantization)",
                    f"4 bits of code, plus one fp32 scale per {blocksize} weights; double quantization stores that "
                    f"scale in 8 bits, with one fp32 scale per {blocksize2} of them")
