"""The shipped house-format dataset: reproducible, valid, disjoint splits, the promised mix."""

from __future__ import annotations

import json
import re

from data.generate_house_format import generate
from utils import config
from utils.data import load_chat_jsonl

DAY = "(mon|tue|wed|thu|fri)"
FORMAT = re.compile(rf"^(ORDER \| item: \w+ \| qty: \d \| color: \w+ \| due: {DAY}"
                    rf"|BOOK \| room: \w+ \| people: \d+ \| day: {DAY} \| time: \d\d:00"
                    r"|FIX \| item: \w+ \| floor: \d \| priority: (low|high))$")


def test_files_are_exactly_what_the_generator_writes() -> None:
    train, test = generate()
    for rows, path in ((train, config.DATASET_TRAIN), (test, config.DATASET_TEST)):
        assert path.read_text(encoding="utf-8") == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_sizes_mix_and_answer_format() -> None:
    train, test = load_chat_jsonl(config.DATASET_TRAIN), load_chat_jsonl(config.DATASET_TEST)
    assert len(train) >= 400 and len(test) >= 100
    for rows in (train, test):
        assert any(r["messages"][0]["role"] == "system" for r in rows)
        assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)
        assert {r["category"] for r in rows} == {"order", "book", "fix"}
        assert all(FORMAT.match(m["content"]) for r in rows for m in r["messages"] if m["role"] == "assistant")


def test_no_test_request_is_seen_in_training() -> None:
    train, test = load_chat_jsonl(config.DATASET_TRAIN), load_chat_jsonl(config.DATASET_TEST)
    seen = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    asked = {m["content"] for r in test for m in r["messages"] if m["role"] == "user"}
    assert not any(a == s or a.endswith(s) or s.endswith(a) for a in asked for s in seen)
