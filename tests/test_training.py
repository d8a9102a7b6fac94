"""The shared TRL recipe: LoRA trains only the adapter, and an interrupted run resumes to the same end state."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils import config
from utils.data import load_chat_jsonl
from utils.models import hardware_report
from utils.training import (describe, make_sft_config, padding_free_rows, peft_config, stop_after, train_sft,
                            training_config)

ROWS = load_chat_jsonl(config.DATASET_TRAIN)[:48]


def small_config(**overrides: object) -> dict:
    settings = training_config(hardware_report(), miniature=True)
    settings.update(per_device_train_batch_size=8, num_train_epochs=2, eval_strategy="no", save_steps=6,
                    logging_steps=1, save_total_limit=None)
    settings.update(overrides)
    return settings


def run(model_dir: Path, out: Path, **kwargs: object) -> tuple:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = make_sft_config(out, small_config(), progress=False)
    return train_sft(model, tokenizer, ROWS, ROWS[:8], args, peft=peft_config(True), **kwargs)


def loss_and_grads(model, batch: dict) -> tuple[float, list]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_padding_free_rows_keep_loss_and_gradients(tiny_model_dir: Path) -> None:
    """Two or three padding-free rows give the single row's loss and gradients; the rows keep conversations apart."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.apply_chat_template([r["messages"] for r in ROWS[:7]], return_dict=True)["input_ids"]
    features = [{"input_ids": x} for x in ids]
    one = padding_free_rows(1, tokenizer.pad_token_id)(features)
    assert one["input_ids"].shape == (1, sum(map(len, ids)))
    loss, grads = loss_and_grads(model, one)
    for rows in (2, 3):
        batch = padding_free_rows(rows, tokenizer.pad_token_id)(features)
        assert batch["input_ids"].shape[0] == rows
        assert (batch["labels"] != -100).sum() == (one["labels"] != -100).sum()
        rows_loss, rows_grads = loss_and_grads(model, batch)
        assert abs(rows_loss - loss) < 1e-5
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, rows_grads))
    # Control: the same two rows without restarting positions let conversations see each other.
    batch = padding_free_rows(2, tokenizer.pad_token_id)(features)
    mixed = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}
    assert abs(loss_and_grads(model, mixed)[0] - loss) > 1e-3


def test_every_setting_is_explained() -> None:
    settings = {**training_config(hardware_report(), True), **peft_config(True)}
    assert all(note for _, _, note in describe(settings))


def test_lora_trains_only_the_adapter_and_loss_falls(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer, stats = run(tiny_model_dir, tmp_path / "run")
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert 0 < stats["trainable_percent"] < 100 and stats["tokens_per_second"] > 0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("interrupt_at", [6])
def test_resume_reaches_the_same_final_state(tiny_model_dir: Path, tmp_path: Path, interrupt_at: int) -> None:
    full, _ = run(tiny_model_dir, tmp_path / "full")
    cut, _ = run(tiny_model_dir, tmp_path / "cut", callbacks=[stop_after(interrupt_at)])
    assert cut.state.global_step == interrupt_at
    resumed, _ = run(tiny_model_dir, tmp_path / "cut", resume_from_checkpoint=True)
    assert resumed.state.global_step == full.state.global_step
    final = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e][-1]  # noqa: E731
    assert final(resumed) == pytest.approx(final(full), rel=1e-4, abs=1e-5)
