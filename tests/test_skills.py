"""The pre-training corpus: checkable answers, the mix it promises, and never the house format itself."""

from __future__ import annotations

import random
import re
from collections import Counter

from utils import config
from utils.data import load_chat_jsonl
from utils.skills import (DAYS, HELDOUT_SKILLS, NUMBER_WORDS, PRETRAIN_MIX, SYNONYMS, TAG_ORDER, _capitals, _synonym,
                          _tag, train_test_corpus)


def _tag_fields(answer: str) -> dict[str, str]:
    return dict(part.split(": ", 1) for part in answer.split(" | "))


def test_tag_answers_are_normalised_and_in_a_fixed_order() -> None:
    rng = random.Random(7)
    for _ in range(300):
        note, answer = (m["content"] for m in _tag(rng))
        fields = _tag_fields(answer)
        assert 2 <= len(fields) <= 4
        assert list(fields) == [k for k in TAG_ORDER if k in fields]
        if "day" in fields:
            assert fields["day"] in {d[:3] for d in DAYS}
            assert re.search(rf"\b({fields['day']})", note.lower())
        if "time" in fields:
            assert re.fullmatch(r"(0[89]|1[0-8]):00", fields["time"])
        if "count" in fields:
            n = int(fields["count"])
            assert re.search(rf"\b({n}|{NUMBER_WORDS[n]})\b", note)
        if "urgency" in fields:
            assert fields["urgency"] in {"high", "low"}
        for kind in ("thing", "color", "room"):
            if kind in fields:
                assert fields[kind] in note.lower()


def test_corpus_follows_the_mix_and_holds_out_unseen_prompts() -> None:
    rounds = 20
    train, test = train_test_corpus(rounds * sum(PRETRAIN_MIX.values()), 30, seed=3)
    counts = Counter(r["skill"] for r in train)
    assert counts == {skill: rounds * weight for skill, weight in PRETRAIN_MIX.items()}
    assert {r["skill"] for r in test} <= set(HELDOUT_SKILLS)
    assert not {r["messages"][0]["content"] for r in test} & {r["messages"][0]["content"] for r in train}


def test_house_format_never_occurs_in_pre_training() -> None:
    train, _ = train_test_corpus(3000, 10)
    text = "\n".join(m["content"] for r in train for m in r["messages"])
    for marker in ("ORDER |", "BOOK |", "FIX |", "item:", "qty:", "due:", "priority:", "people:", "floor:"):
        assert marker not in text, marker
    house_answers = {r["messages"][-1]["content"] for r in load_chat_jsonl(config.DATASET_TEST)}
    assert not house_answers & set(text.splitlines())


def test_capitals_and_synonyms_answer_exactly() -> None:
    rng = random.Random(5)
    common = dict(SYNONYMS)
    for _ in range(200):
        ask, answer = (m["content"] for m in _capitals(rng))
        words = ask.split(": ", 1)[1] if ": " in ask else ask.rsplit(" in ", 1)[0]
        assert answer in (words.upper(), words.lower()) and answer != words
        ask, answer = (m["content"] for m in _synonym(rng))
        assert answer.split() == [common[w] for w in ask.split(": ", 1)[1].split()]


def test_every_word_of_the_house_format_is_written_in_pre_training() -> None:
    """A word the base never writes has an untrained output row: LoRA can make it the argmax but never confident."""
    from utils.miniature import MiniatureSpec

    train, _ = train_test_corpus(MiniatureSpec().pretrain_examples, 10)
    answers = " ".join(r["messages"][-1]["content"] for r in train).split()
    for word in ("ORDER", "BOOK", "FIX", "item", "qty", "due", "people", "floor", "priority", "color", "room",
                 "day", "time"):
        assert word in answers, word


def test_content_match_accepts_the_right_content_in_any_format() -> None:
    from utils.skills import content_match

    tag = ("Label each word in: the sink on Wednesday at 3pm", "thing: sink | day: wed | time: 15:00")
    assert content_match("tag", *tag, "thing: sink | day: wed | time: 15:00")
    assert content_match("tag", *tag, "FIX | item: sink | day: wed | time: 15:00")  # the house format
    assert not content_match("tag", *tag, "FIX | item: sink | day: wed")  # a value missing
    assert not content_match("tag", *tag, "thing: sink | day: thu | time: 15:00")
    pick = ("Which word is a day: urgent ideally wednesday?", "wednesday")
    assert content_match("pick_category", *pick, "wednesday") and content_match("pick_category", *pick, "day: wednesday")
    assert not content_match("pick_category", *pick, "urgent wednesday")  # the whole list is no answer
    assert content_match("pick_category", "send no delivered mug. Name the thing.", "mug", "ORDER | item: mug")
    assert content_match("unit_conversion", "Convert 968 cm to mm.", "9680 mm", "9680")
    assert not content_match("unit_conversion", "Convert 968 cm to mm.", "9680 mm", "968 cm")


def test_content_match_accepts_every_reference_and_few_echoes_of_the_question() -> None:
    from utils.skills import content_match

    _, test = train_test_corpus(600, 200, seed=0)
    rows = [(r["skill"], r["messages"][0]["content"], r["messages"][1]["content"]) for r in test]
    assert all(content_match(skill, q, ref, ref) for skill, q, ref in rows)
    # Copying the question back passes only where a note's words are its normalised values already.
    echoes = sum(content_match(skill, q, ref, q) for skill, q, ref in rows)
    assert echoes < 0.15 * len(rows)
