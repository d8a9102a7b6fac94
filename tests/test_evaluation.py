"""Chapter 06's evaluation helpers on hand-checkable cases, plus one small real run on the tiny miniature."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from utils.evaluation import (MISS_KINDS, REQUIRED_VARIANTS, check_results, evaluate_variant, field_accuracy,
                              fields_correct, miss_counts, miss_kind, parse_ticket, per_category, write_results,
                              wrong_fields)
from utils.metrics import Generation, score_generations

BOOK = "BOOK | room: atlas | people: 4 | day: thu | time: 10:00"
FIX = "FIX | item: door | floor: 4 | priority: low"


def conversation(answer: str, request: str = "a request") -> list[dict]:
    return [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]


def test_perfect_answer_scores_one_and_empty_answer_zero():
    convs = [conversation(BOOK)]
    assert score_generations(convs, [Generation(BOOK, True)]) == {"exact_match": 1.0, "rouge_l": 1.0,
                                                                   "stop_rate": 1.0}
    assert score_generations(convs, [Generation("", True)]) == {"exact_match": 0.0, "rouge_l": 0.0,
                                                                 "stop_rate": 1.0}


def test_whitespace_is_stripped_and_missing_end_is_not_stopped():
    scores = score_generations([conversation(BOOK)] * 2, [Generation(f"  {BOOK}\n", True), Generation(BOOK, False)])
    assert scores["exact_match"] == 1.0
    assert scores["stop_rate"] == 0.5


def test_parse_ticket():
    assert parse_ticket(FIX) == {"kind": "FIX", "item": "door", "floor": "4", "priority": "low"}
    assert parse_ticket("") == {}
    assert parse_ticket("item: door") == {}
    assert parse_ticket("FIX | item door | floor: 4") == {"kind": "FIX", "floor": "4"}


def test_field_accuracy_counts_each_reference_field():
    answers = [FIX, "FIX | item: window | floor: 4 | priority: high", ""]
    references = [FIX, FIX, "FIX | item: sink | floor: 2 | priority: low"]
    assert field_accuracy(answers, references) == {"kind": pytest.approx(2 / 3), "item": pytest.approx(1 / 3),
                                                   "floor": pytest.approx(2 / 3), "priority": pytest.approx(1 / 3)}
    mixed = field_accuracy([BOOK, BOOK], [BOOK, FIX])
    assert mixed["kind"] == 0.5 and mixed["room"] == 1.0 and mixed["item"] == 0.0
    assert fields_correct(answers, references) == pytest.approx(6 / 12)
    assert fields_correct([FIX], [FIX]) == 1.0 and fields_correct([""], [FIX]) == 0.0


def test_per_category_splits_the_scores():
    convs = [conversation(BOOK), conversation(FIX), conversation(FIX)]
    answers = [Generation(BOOK, True), Generation(FIX, True), Generation("", False)]
    table = per_category(convs, answers, ["book", "fix", "fix"])
    assert table["book"] == {"exact_match": 1.0, "rouge_l": 1.0, "stop_rate": 1.0, "n": 1}
    assert table["fix"]["exact_match"] == 0.5 and table["fix"]["stop_rate"] == 0.5 and table["fix"]["n"] == 2


def metrics(**overrides) -> dict:
    return {"eval_loss": 0.5, "perplexity": math.exp(0.5), "exact_match": 0.25, "rouge_l": 0.75, "stop_rate": 1.0,
            **overrides}


def test_write_results_shape_and_ranges(tmp_path: Path):
    path = tmp_path / "eval" / "results.json"
    variants = {name: metrics() for name in REQUIRED_VARIANTS}
    write_results(path, "miniature", 3, variants)
    saved = json.loads(path.read_text())
    assert saved["model"] == "miniature" and saved["n_test"] == 3 and set(saved["variants"]) == set(REQUIRED_VARIANTS)
    assert check_results(saved) == []


@pytest.mark.parametrize("broken, expected", [
    ({"lora": metrics(exact_match=1.5)}, 'lora: "exact_match" is a rate'),
    ({"lora": metrics(stop_rate=-0.1)}, 'lora: "stop_rate" is a rate'),
    ({"lora": metrics(fields_correct=2.0)}, 'lora: "fields_correct" is a rate'),
    ({"lora": metrics(eval_loss=float("nan"))}, 'lora: "eval_loss" must be a finite number'),
    ({"lora": {k: v for k, v in metrics().items() if k != "rouge_l"}}, 'lora: "rouge_l" must be a finite number'),
])
def test_write_results_refuses_bad_values(tmp_path: Path, broken: dict, expected: str):
    variants = {name: metrics() for name in REQUIRED_VARIANTS} | broken
    with pytest.raises(ValueError, match=expected):
        write_results(tmp_path / "results.json", "miniature", 3, variants)
    assert not (tmp_path / "results.json").exists()


def test_missing_variant_is_reported():
    variants = {name: metrics() for name in REQUIRED_VARIANTS if name != "qlora"}
    assert check_results({"model": "m", "n_test": 3, "variants": variants}) == ['variant "qlora" is missing']


def test_evaluate_variant_on_the_tiny_miniature(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils import config
    from utils.data import load_chat_jsonl

    rows = load_chat_jsonl(config.DATASET_TEST)[:3]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result, answers = evaluate_variant(model, tokenizer, [r["messages"] for r in rows], [r["category"] for r in rows],
                                       max_new_tokens=8)
    assert len(answers) == 3 and all(isinstance(a, Generation) for a in answers)
    assert result["eval_loss"] > 0 and result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert all(0.0 <= result[k] <= 1.0 for k in ("exact_match", "rouge_l", "stop_rate"))
    assert sum(c["n"] for c in result["per_category"].values()) == 3
    assert set(result["per_category"]) == {r["category"] for r in rows}
    assert "kind" in result["field_accuracy"] and 0.0 <= result["fields_correct"] <= 1.0
    assert check_results({"model": str(tiny_model_dir), "n_test": 3,
                          "variants": dict.fromkeys(REQUIRED_VARIANTS, result)}) == []


def test_well_formed_means_one_house_format_ticket_whatever_its_values() -> None:
    from utils.evaluation import is_well_formed

    good = ["ORDER | item: mug | qty: 3 | color: blue | due: fri", "BOOK | room: oak | people: 12 | day: mon | time: 09:00",
            "FIX | item: sink | floor: 2 | priority: low"]
    assert all(is_well_formed(t) for t in good)
    bad = ["", "\ufffdS | room: cedar", "FIX | item: sink | floor: 2", "FIX | floor: 2 | item: sink | priority: low",
           "FIX | item: sink | floor: two | priority: low", "ORDER | item: mug | qty: 3 | color: blue | due: friday",
           "BOOK | room: oak | people: 1 | day: mon | time: 9am", "fix | item: sink | floor: 2 | priority: low",
           good[0] + " | extra: 1"]
    assert not any(is_well_formed(t) for t in bad)


REF = "BOOK | room: atlas | people: 4 | day: thu | time: 10:00"


@pytest.mark.parametrize("answer, kind, wrong", [
    (REF + "  ", "right", []),
    ("BOOK | room: atlas | people: 5 | day: thu | time: 10:00", "one field wrong", ["people"]),
    ("BOOK | room: atlas | people: 5 | day: thu", "several fields wrong", ["people", "time"]),
    (REF + " | time: 11:00", "extra text", []),
    ("FIX | item: door | floor: 4 | priority: low", "wrong kind", ["kind", "room", "people", "day", "time"]),
    ("room: atlas | day: thu | time: 10:00", "no ticket", ["kind", "room", "people", "day", "time"]),
    ("", "no ticket", ["kind", "room", "people", "day", "time"]),
    ("MEMO | room: atlas", "no ticket", ["kind", "people", "day", "time"]),
])
def test_miss_kind_names_how_an_answer_misses(answer: str, kind: str, wrong: list[str]) -> None:
    assert miss_kind(answer, REF) == kind and kind in MISS_KINDS
    assert wrong_fields(answer, REF) == wrong


def test_miss_counts_has_every_kind_and_adds_up() -> None:
    answers = [REF, REF.replace("4", "5"), "", "FIX | item: door"]
    counts = miss_counts(answers, [REF] * len(answers))
    assert list(counts) == list(MISS_KINDS) and sum(counts.values()) == len(answers)
    assert counts["right"] == counts["one field wrong"] == counts["no ticket"] == counts["wrong kind"] == 1
