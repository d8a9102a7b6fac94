"""Evaluation: greedy generation on held-out prompts, exact match, ROUGE-L, stop rate, held-out loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from utils.prompts import END, Conversation, prompt_messages, reference_answer, render_prompt


@dataclass
class Generation:
    """One model answer: the text before ``<|end|>`` and whether ``<|end|>`` was produced."""

    text: str
    stopped: bool


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference after stripping surrounding whitespace, else 0.0."""
    return float(prediction.strip() == reference.strip())


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge_score``, no download); an empty prediction or reference scores 0."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: list[Conversation], max_new_tokens: int = 48,
             batch_size: int = 32, **generate_kwargs: Any) -> list[Generation]:
    """Answer each prompt (greedy unless sampling kwargs are given), batched with left padding."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    answers: list[Generation] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [render_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            kwargs = {"do_sample": False, **generate_kwargs}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **kwargs)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                stopped = end_id in row
                ids = row[:row.index(end_id)] if stopped else row
                answers.append(Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), stopped))
    finally:
        tokenizer.padding_side = side
    return answers


def score_generations(conversations: list[Conversation], answers: list[Generation]) -> dict[str, float]:
    """Mean exact match, ROUGE-L and stop rate of answers against the conversations' last assistant turns."""
    refs = [reference_answer(c) for c in conversations]
    n = max(len(refs), 1)
    return {
        "exact_match": sum(exact_match(a.text, r) for a, r in zip(answers, refs)) / n,
        "rouge_l": sum(rouge_l(a.text, r) for a, r in zip(answers, refs)) / n,
        "stop_rate": sum(a.stopped for a in answers) / n,
    }


def evaluate_generation(model: Any, tokenizer: Any, conversations: list[Conversation],
                        max_new_tokens: int = 48, batch_size: int = 32) -> tuple[dict[str, float], list[Generation]]:
    """Generate greedy answers for the conversations' prompts and score them."""
    answers = generate(model, tokenizer, [prompt_messages(c) for c in conversations], max_new_tokens, batch_size)
    return score_generations(conversations, answers), answers


@torch.inference_mode()
def assistant_loss(model: Any, tokenizer: Any, conversations: list[Conversation], batch_size: int = 32) -> float:
    """Mean cross-entropy over assistant tokens only (the tokens TRL trains on), via the training template."""
    from trl.chat_template_utils import get_training_chat_template

    template = get_training_chat_template(tokenizer)
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        enc = tokenizer.apply_chat_template(chunk, chat_template=template, return_dict=True, padding=True,
                                            return_assistant_tokens_mask=True, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["assistant_masks"] == 0] = -100
        logits = model(input_ids=enc["input_ids"].to(model.device),
                       attention_mask=enc["attention_mask"].to(model.device)).logits.float()
        shifted = labels[:, 1:].to(model.device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 shifted.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shifted != -100).sum())
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    """``exp(loss)``, the perplexity of a mean token cross-entropy."""
    return math.exp(loss)
