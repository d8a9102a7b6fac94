"""loralib helpers: identical outputs at step 0, only LoRA trainable, safetensors round trip, merged == unmerged."""

from __future__ import annotations

import json
from pathlib import Path

import loralib as lora
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from utils.loralib_tools import (DEFAULT_TARGETS, META_FILE, QV_ONLY, add_lora_layers, count_lora_parameters,
                                 delta_weight, expected_lora_parameters, load_loralib_model, logits,
                                 lora_factors_figure, lora_keys, max_logit_diff, qkv_sizes, read_meta, save_lora)

R, ALPHA = 4, 8
CHATS = [[{"role": "user", "content": "order 3 pens by fri"}, {"role": "assistant", "content": "ORDER | item: pen"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: 1 2 3"},
          {"role": "assistant", "content": "3 2 1"}]]


@pytest.fixture()
def batch(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tok.apply_chat_template(CHATS, return_dict=True, padding=True, return_tensors="pt")


def wrapped(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = add_lora_layers(AutoModelForCausalLM.from_pretrained(path), R, ALPHA, DEFAULT_TARGETS)
    lora.mark_only_lora_as_trainable(model)
    return model


def trained(path: Path) -> torch.nn.Module:
    """A wrapped model whose B factors are no longer zero (as after some training)."""
    model = wrapped(path).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model


def test_outputs_identical_at_step_zero(tiny_model_dir: Path, batch: dict) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = wrapped(tiny_model_dir)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, lora.MergedLinear)
    assert type(model.model.layers[0].self_attn.o_proj) is lora.Linear
    assert type(model.model.layers[1].mlp.gate_up_proj) is torch.nn.Linear
    assert max_logit_diff(base, model.eval(), batch) == 0.0
    assert max_logit_diff(base, model.train(), batch) == 0.0


def test_only_lora_parameters_are_trainable(tiny_model_dir: Path) -> None:
    model = wrapped(tiny_model_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert count_lora_parameters(model) == expected_lora_parameters(model, R, DEFAULT_TARGETS)
    qkv = model.model.layers[0].self_attn.qkv_proj
    q, k, v = qkv_sizes(model.config)
    assert q == k == v == model.config.hidden_size
    assert qkv.lora_A.shape == (2 * R, q) and qkv.lora_B.shape == (q + v, R)
    assert qkv.lora_ind.tolist() == [True] * q + [False] * k + [True] * v
    assert "lora_ind" not in "".join(model.state_dict())


def test_k_slice_is_never_updated(tiny_model_dir: Path, batch: dict) -> None:
    model = trained(tiny_model_dir)
    qkv = model.model.layers[0].self_attn.qkv_proj
    before = qkv.weight.detach().clone()
    model.eval()
    delta = qkv.weight.detach() - before
    q, k, _ = qkv_sizes(model.config)
    assert delta[q:q + k].abs().max() == 0 and delta[:q].abs().max() > 0 and delta[q + k:].abs().max() > 0


def test_save_reload_round_trip_gives_identical_logits(tiny_model_dir: Path, batch: dict, tmp_path: Path) -> None:
    model = trained(tiny_model_dir)
    meta = {"r": R, "lora_alpha": ALPHA, "targets": DEFAULT_TARGETS}
    path = save_lora(model, tmp_path / "adapter", meta)
    saved = load_file(str(path))
    assert set(saved) == set(lora_keys(model)) and all(".lora_A" in k or ".lora_B" in k for k in saved)
    assert json.loads((tmp_path / "adapter" / META_FILE).read_text())["targets"]["qkv_proj"] == QV_ONLY
    reloaded = load_loralib_model(tiny_model_dir, tmp_path / "adapter")
    assert not reloaded.training and reloaded.model.layers[0].self_attn.qkv_proj.merged
    assert max_logit_diff(model.eval(), reloaded, batch) <= 1e-6
    assert max_logit_diff(model.train(), reloaded.train(), batch) <= 1e-6
    assert reloaded.generation_config.eos_token_id == model.generation_config.eos_token_id


def test_save_lora_writes_the_given_lora_state_dict_and_refuses_base_weights(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    model = trained(tiny_model_dir)
    tensors = lora.lora_state_dict(model)
    path = save_lora(model, tmp_path / "adapter", {"r": R, "lora_alpha": ALPHA, "targets": DEFAULT_TARGETS},
                     tensors=tensors)
    saved = load_file(str(path))
    assert set(saved) == set(tensors) and all(torch.equal(saved[k], tensors[k].cpu()) for k in saved)
    with pytest.raises(ValueError, match="lora_state_dict"):
        save_lora(model, tmp_path / "full", {"r": R}, tensors=model.state_dict())
    assert not (tmp_path / "full").exists()


def test_merged_equals_unmerged(tiny_model_dir: Path, batch: dict) -> None:
    model = trained(tiny_model_dir)
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    unmerged = logits(model.train(), batch)
    merged = logits(model.eval(), batch)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, weight)
    assert max_logit_diff(unmerged, merged, batch) <= 1e-5 * unmerged.abs().max().item()
    model.train()
    assert torch.allclose(model.model.layers[0].mlp.down_proj.weight, weight, atol=1e-6)


def test_update_is_zero_at_step_zero_and_the_figure_shows_it(tiny_model_dir: Path) -> None:
    model = wrapped(tiny_model_dir)
    assert delta_weight(model.model.layers[0].self_attn.qkv_proj).abs().max() == 0
    fig = lora_factors_figure(model.model.layers[0].self_attn.o_proj, "step 0")
    assert len(fig.axes) == 4 and "max |·| 0" in fig.axes[3].get_title()


def test_grouped_query_attention_is_refused_with_a_reason(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir, num_key_value_heads=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="grouped-query attention"):
        add_lora_layers(model, R, ALPHA, DEFAULT_TARGETS)
    add_lora_layers(model, R, ALPHA, {"qkv_proj": None})


def test_unknown_target_names_the_real_layers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="qkv_proj"):
        add_lora_layers(model, R, ALPHA, {"q_proj": None})


def test_missing_adapter_names_chapter_02(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="02_lora_from_scratch"):
        read_meta(tmp_path)


def test_peft_on_the_same_modules_adapts_q_k_and_v(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    expected = expected_lora_parameters(base, R, dict.fromkeys(DEFAULT_TARGETS))
    peft_model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(DEFAULT_TARGETS)))
    assert count_lora_parameters(peft_model) == expected
    qkv = peft_model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert qkv.lora_B["default"].weight.shape[0] == sum(qkv_sizes(base.config))
