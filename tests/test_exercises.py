"""The exercise checks accept the right answer, refuse a wrong one, and print a hint when they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils.exercises import (check_bits_per_weight, check_lora_parameters, check_loss_share,
                             expected_peft_lora_parameters)
from utils.prompts import assistant_mask

CONVERSATIONS = [[{"role": "user", "content": "order two pens"}, {"role": "assistant", "content": "ORDER | qty: 2"}],
                 [{"role": "user", "content": "fix the sink"}, {"role": "assistant", "content": "FIX | item: sink"}]]


def test_bits_per_weight(capsys: pytest.CaptureFixture) -> None:
    assert check_bits_per_weight(4.5, double_quant=False)
    assert check_bits_per_weight(4 + 8 / 64 + 32 / (64 * 256), double_quant=True)
    assert not check_bits_per_weight(4.5, double_quant=True)
    assert "Hint:" in capsys.readouterr().out


def test_lora_parameters_match_peft(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for targets in ("all-linear", ["qkv_proj", "o_proj"]):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        expected = expected_peft_lora_parameters(model, 4, targets)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
        assert peft_model.get_nb_trainable_parameters()[0] == expected
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        assert check_lora_parameters(expected, base, 4, targets) and not check_lora_parameters(expected + 1, base, 4, targets)


def test_loss_share(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    masks = [assistant_mask(tokenizer, c)[1] for c in CONVERSATIONS]
    share = sum(map(sum, masks)) / sum(map(len, masks))
    assert 0 < share < 1
    assert check_loss_share(share, tokenizer, CONVERSATIONS)
    assert not check_loss_share(share + 0.05, tokenizer, CONVERSATIONS)
