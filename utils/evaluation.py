"""Chapter 06's evaluation loop: score one model variant on the held-out split, per field and per category.

A *variant* is any model that answers the same prompts (base, LoRA adapter, QLoRA adapter, merged models, the
loralib adapter). Each gets the same measurements, so one table compares them; :func:`write_results` stores
them as ``outputs/eval/results.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from utils.metrics import Generation, assistant_loss, generate, perplexity, score_generations
from utils.prompts import Conversation, prompt_messages, reference_answer

REQUIRED_METRICS: tuple[str, ...] = ("eval_loss", "perplexity", "exact_match", "rouge_l", "stop_rate")
RATE_METRICS: tuple[str, ...] = ("exact_match", "rouge_l", "stop_rate", "fields_correct")
REQUIRED_VARIANTS: tuple[str, ...] = ("base", "lora", "qlora", "lora_merged", "qlora_merged")
KIND = "kind"


def parse_ticket(text: str) -> dict[str, str]:
    """The fields of a house-format line ``KIND | key: value | ...`` as ``{"kind": KIND, key: value, ...}``.

    Whatever does not parse is left out: an empty or malformed answer gives ``{}`` or only the fields it has.
    """
    parts = [p.strip() for p in text.strip().split("|")]
    if not parts or not parts[0] or ":" in parts[0]:
        return {}
    fields = {KIND: parts[0]}
    for part in parts[1:]:
        key, sep, value = part.partition(":")
        if sep and key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


# The house format, field by field: each kind of ticket, its fields in order, and what a value of each field looks like.
HOUSE_FORMAT: dict[str, tuple[str, ...]] = {"ORDER": ("item", "qty", "color", "due"),
                                           "BOOK": ("room", "people", "day", "time"),
                                           "FIX": ("item", "floor", "priority")}
FIELD_VALUE = {"item": r"[a-z]+", "color": r"[a-z]+", "room": r"[a-z]+", "qty": r"[0-9]+", "people": r"[0-9]+",
               "floor": r"[0-9]+", "due": r"(mon|tue|wed|thu|fri)", "day": r"(mon|tue|wed|thu|fri)",
               "time": r"[0-9]{2}:[0-9]{2}", "priority": r"(high|low)"}


def is_well_formed(text: str) -> bool:
    """True when ``text`` is one house-format ticket: a known kind, its fields in order, each value of its shape.

    Says nothing about whether the values are the right ones (exact match does); a sampled answer that passes is a
    ticket a downstream system could parse.
    """
    import re

    kind, _, rest = text.strip().partition(" | ")
    if kind not in HOUSE_FORMAT:
        return False
    pattern = r" \| ".join(rf"{key}: {FIELD_VALUE[key]}" for key in HOUSE_FORMAT[kind])
    return re.fullmatch(pattern, rest) is not None


def _field_hits(answers: list[str], references: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    for answer, reference in zip(answers, references):
        got = parse_ticket(answer)
        for key, value in parse_ticket(reference).items():
            totals[key] = totals.get(key, 0) + 1
            hits[key] = hits.get(key, 0) + int(got.get(key) == value)
    return hits, totals


def field_accuracy(answers: list[str], references: list[str]) -> dict[str, float]:
    """Per field of the references (``kind``, ``item``, ``qty``, ...): share of answers with exactly that value."""
    hits, totals = _field_hits(answers, references)
    return {key: hits[key] / totals[key] for key in totals}


def fields_correct(answers: list[str], references: list[str]) -> float:
    """Share of all the references' fields (``kind`` included) that the answers reproduce exactly."""
    hits, totals = _field_hits(answers, references)
    return sum(hits.values()) / max(sum(totals.values()), 1)


MISS_KINDS: tuple[str, ...] = ("right", "one field wrong", "several fields wrong", "extra text", "wrong kind",
                               "no ticket")


def wrong_fields(answer: str, reference: str) -> list[str]:
    """The reference's fields (``kind`` included) that the answer lacks or gives another value, in reference order."""
    got = parse_ticket(answer)
    return [key for key, value in parse_ticket(reference).items() if got.get(key) != value]


def miss_kind(answer: str, reference: str) -> str:
    """How an answer misses its reference, one of :data:`MISS_KINDS`.

    ``right``: equal after stripping whitespace. ``no ticket``: not a line of a known kind (ORDER, BOOK, FIX).
    ``wrong kind``: a ticket of another kind. ``one field wrong`` / ``several fields wrong``: the right kind with
    that many fields missing or with another value. ``extra text``: every field right, but more besides.
    """
    if answer.strip() == reference.strip():
        return "right"
    got = parse_ticket(answer).get(KIND)
    if got not in HOUSE_FORMAT:
        return "no ticket"
    if got != parse_ticket(reference).get(KIND):
        return "wrong kind"
    wrong = len(wrong_fields(answer, reference))
    return "extra text" if wrong == 0 else "one field wrong" if wrong == 1 else "several fields wrong"


def miss_counts(answers: list[str], references: list[str]) -> dict[str, int]:
    """How many answers fall in each of :data:`MISS_KINDS` (every kind present, zeros included)."""
    kinds = [miss_kind(a, r) for a, r in zip(answers, references)]
    return {kind: kinds.count(kind) for kind in MISS_KINDS}


def per_category(conversations: list[Conversation], answers: list[Generation],
                 categories: list[str]) -> dict[str, dict[str, float]]:
    """Exact match, ROUGE-L and stop rate for each category, with its number of conversations ``n``."""
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category, []).append(i)
    return {category: {**score_generations([conversations[i] for i in idx], [answers[i] for i in idx]),
                       "n": len(idx)}
            for category, idx in sorted(groups.items())}


def evaluate_variant(model: Any, tokenizer: Any, conversations: list[Conversation], categories: list[str],
                     max_new_tokens: int = 48, batch_size: int = 32) -> tuple[dict[str, Any], list[Generation]]:
    """Held-out loss and perplexity, greedy answers scored overall, per category and per field; and the answers.

    ``max_new_tokens`` is the token limit: an answer that has not produced ``<|end|>`` by then counts as not
    stopped.
    """
    loss = assistant_loss(model, tokenizer, conversations, batch_size)
    answers = generate(model, tokenizer, [prompt_messages(c) for c in conversations], max_new_tokens, batch_size)
    references = [reference_answer(c) for c in conversations]
    metrics = {"eval_loss": loss, "perplexity": perplexity(loss), **score_generations(conversations, answers),
               "fields_correct": fields_correct([a.text for a in answers], references),
               "per_category": per_category(conversations, answers, categories),
               "field_accuracy": field_accuracy([a.text for a in answers], references)}
    return metrics, answers


def check_results(results: dict[str, Any]) -> list[str]:
    """What is wrong with a results dictionary (empty when it has the shape chapter 06 promises)."""
    problems = [f'missing "{key}"' for key in ("model", "n_test", "variants") if key not in results]
    if problems:
        return problems
    if not isinstance(results["n_test"], int) or results["n_test"] <= 0:
        problems.append(f'"n_test" must be a positive integer, got {results["n_test"]!r}')
    variants = results["variants"]
    problems += [f'variant "{name}" is missing' for name in REQUIRED_VARIANTS if name not in variants]
    for name, metrics in variants.items():
        for key in REQUIRED_METRICS + tuple(k for k in RATE_METRICS if k in metrics and k not in REQUIRED_METRICS):
            value = metrics.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f'{name}: "{key}" must be a finite number, got {value!r}')
            elif key in RATE_METRICS and not 0.0 <= value <= 1.0:
                problems.append(f'{name}: "{key}" is a rate and must lie in [0, 1], got {value}')
            elif key == "perplexity" and value < 1.0:
                problems.append(f'{name}: "perplexity" must be at least 1, got {value}')
    return problems


def write_results(path: Path, model_id: str, n_test: int, variants: dict[str, dict[str, Any]],
                  settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check and write ``{"model", "n_test", "variants"}`` (plus ``settings``) as JSON; returns what was written."""
    results = {"model": model_id, "n_test": n_test, "variants": variants, **({"settings": settings} if settings else {})}
    problems = check_results(results)
    if problems:
        raise ValueError("results not written:\n" + "\n".join(problems))
    from utils.atomic import atomic_write_json

    atomic_write_json(path, results)
    return results
