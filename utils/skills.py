"""General-skills chat corpus used to pre-train the miniature Phi-3 before any LoRA.

Phi-3 Mini arrives as a working instruction model; the miniature should too. Six small skills, each a chat
turn with a checkable answer: reading a field from a record, reversing a list, converting metric units,
repeating words (or writing them in capitals), picking the word of a given kind (a colour, a day, a thing) out
of a list, and short forms (number words as digits, weekday codes, 24-hour times). The word lists are a small
everyday English vocabulary (common words, colours, weekdays, office things), as any real pre-training corpus
has; the tokenizer is trained on the same corpus.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from utils.prompts import Conversation

NAMES = ["ana", "bo", "cai", "dev", "eli", "fay", "gus", "hana", "ivo", "jun", "kai", "lea", "max", "nia"]
CITIES = ["oslo", "lima", "kyiv", "rome", "baku", "doha", "riga", "suva", "bern", "cork", "nice", "porto"]
PETS = ["cat", "dog", "owl", "fox", "eel", "yak", "bee", "cod"]
COLORS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]
THINGS = ["mug", "chair", "lamp", "desk", "cable", "monitor", "notebook", "pen", "printer", "projector", "door",
          "heater", "sink", "window", "atlas", "birch", "cedar", "delta"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
COMMON = ("a an and another are at be before blocking book broken by can colour could day delivered did each "
          "for free from get have hi hold i ideally in is it low meeting more need needs new no not of on one ones "
          "our order people please priority repair reserve room rush someone stopped the them this time to urgent "
          "urgently us we when whenever with working you floor also asap box office team week fix send").split()
WORDS = ["sun", "tree", "rock", "wave", "leaf", "star", "rain", "sand", "wind", "snow", "moon", "fire"] + THINGS
UNITS = [("km", "m", "000"), ("m", "cm", "00"), ("kg", "g", "000"), ("l", "ml", "000"), ("cm", "mm", "0")]


def _record(rng: random.Random) -> Conversation:
    fields = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "pet": rng.choice(PETS),
              "color": rng.choice(COLORS), "age": str(rng.randint(10, 89)), "item": rng.choice(THINGS),
              "day": rng.choice(DAYS), "floor": str(rng.randint(1, 9))}
    keys = rng.sample(list(fields), k=rng.randint(3, 5))
    asked = rng.choice(keys)
    record = rng.choice(["; ", " | ", ", "]).join(f"{k}={fields[k]}" for k in keys)
    question = rng.choice(["What is the {k}?", "Give me the {k}.", "Which {k} is listed?", "{k}?"]).format(k=asked)
    return [{"role": "user", "content": f"Record: {record}\n{question}"},
            {"role": "assistant", "content": fields[asked]}]


def _reverse(rng: random.Random) -> Conversation:
    pool = rng.choice([WORDS, COMMON, [str(d) for d in range(10)]])
    items = [rng.choice(pool) for _ in range(rng.randint(3, 5))]
    ask = rng.choice(["Reverse this list: {}", "Reverse: {}", "Write {} backwards, item by item."])
    return [{"role": "user", "content": ask.format(" ".join(items))},
            {"role": "assistant", "content": " ".join(reversed(items))}]


def _convert(rng: random.Random) -> Conversation:
    big, small, zeros = rng.choice(UNITS)
    value = rng.randint(1, 999)
    ask = rng.choice(["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "{v} {a} in {b}?"])
    return [{"role": "user", "content": ask.format(v=value, a=big, b=small)},
            {"role": "assistant", "content": f"{value}{zeros} {small}"}]


def _repeat(rng: random.Random) -> Conversation:
    words = [rng.choice(WORDS + CITIES + COLORS + DAYS + COMMON + NAMES) for _ in range(rng.randint(2, 5))]
    text = " ".join(words)
    if rng.random() < 0.25:
        return [{"role": "user", "content": f"Write in capitals: {text}"}, {"role": "assistant", "content": text.upper()}]
    ask = rng.choice(["Repeat after me: {}", "Say again: {}", "Echo: {}"])
    return [{"role": "user", "content": ask.format(text)}, {"role": "assistant", "content": "OK: " + text}]


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def _short_forms(rng: random.Random) -> Conversation:
    if rng.random() < 0.5:
        n = rng.randrange(len(NUMBER_WORDS))
        word = NUMBER_WORDS[n] if rng.random() < 0.7 else NUMBER_WORDS[n].capitalize()
        ask, answer = rng.choice(["Write {} as digits.", "{} in digits?", "Number: {}"]).format(word), str(n)
    elif rng.random() < 0.5:
        hour = rng.randint(8, 18)
        twelve = f"{hour - 12 if hour > 12 else hour}{'pm' if hour >= 12 else 'am'}"
        ask, answer = rng.choice(["{} in 24-hour time?", "Write {} as hh:mm."]).format(twelve), f"{hour:02d}:00"
    else:
        day = rng.choice(DAYS)
        word = day if rng.random() < 0.6 else day.capitalize()
        ask, answer = rng.choice(["Short form of {}?", "Abbreviate {}.", "Three-letter code for {}?"]).format(word), day[:3]
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]


CATEGORIES = {"color": COLORS, "city": CITIES, "day": DAYS, "pet": PETS, "thing": THINGS, "name": NAMES}


def _pick_category(rng: random.Random) -> Conversation:
    category = rng.choice(list(CATEGORIES))
    others = [w for c, ws in CATEGORIES.items() if c != category for w in ws] + COMMON
    words = rng.sample(others, k=rng.randint(2, 5))
    answer = rng.choice(CATEGORIES[category])
    words.insert(rng.randrange(len(words) + 1), answer)
    ask = rng.choice(["Which word is a {c}: {w}?", "Find the {c} in: {w}", "{w}. Name the {c}."])
    return [{"role": "user", "content": ask.format(c=category, w=" ".join(words))},
            {"role": "assistant", "content": answer}]


SKILLS: dict[str, Callable[[random.Random], Conversation]] = {
    "record_field": _record, "reverse_list": _reverse, "unit_conversion": _convert,
    "repeat": _repeat, "pick_category": _pick_category, "short_forms": _short_forms,
}


HELDOUT_SKILLS = [s for s in SKILLS if s != "short_forms"]


def general_skills_corpus(n: int, seed: int, exclude: set[str] | None = None,
                          skills: list[str] | None = None) -> list[dict]:
    """``n`` conversations (``{"messages", "skill"}``), skills in turn, none whose prompt is in ``exclude``."""
    rng = random.Random(seed)
    excluded = exclude or set()
    rows: list[dict] = []
    names = skills or list(SKILLS)
    for _ in range(100 * n):
        if len(rows) == n:
            return rows
        skill = names[len(rows) % len(names)]
        messages = SKILLS[skill](rng)
        if messages[0]["content"] not in excluded:
            rows.append({"messages": messages, "skill": skill})
    raise ValueError(f"could not draw {n} conversations outside the {len(excluded)} excluded prompts")


def train_test_corpus(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A training corpus and a held-out split whose prompts never occur in training.

    Short forms are facts to know rather than a procedure to generalise, so the held-out split leaves them out.
    """
    train = general_skills_corpus(n_train, seed)
    test = general_skills_corpus(n_test, seed + 1, exclude={r["messages"][0]["content"] for r in train},
                                 skills=HELDOUT_SKILLS)
    return train, test
