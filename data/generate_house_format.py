"""Generate the house-format dataset: free-form office requests rewritten as one fixed-format ticket line.

Deterministic: ``python data/generate_house_format.py`` rewrites ``house_format_train.jsonl`` and
``house_format_test.jsonl`` byte for byte. See ``DATA_CARD.md`` for what the data is and why.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 2024
N_TRAIN, N_TEST = 480, 120

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]
DAYS = {"mon": "Monday", "tue": "Tuesday", "wed": "Wednesday", "thu": "Thursday", "fri": "Friday"}
ITEMS = ["mug", "chair", "lamp", "desk", "cable", "monitor", "notebook", "pen"]
COLORS = ["red", "blue", "green", "black", "white"]
ROOMS = ["atlas", "birch", "cedar", "delta"]
BROKEN = ["printer", "projector", "door", "heater", "sink", "window"]
HIGH = ["asap", "it is urgent", "urgently please", "this is blocking us"]
LOW = ["when you can", "no rush", "low priority", "whenever someone is free"]
SYSTEM_PROMPTS = [
    "You rewrite office requests in the house format.",
    "Answer with exactly one house-format ticket line.",
    "You are the facilities desk. Reply only with the ticket in house format.",
]
FOLLOW_UPS = ["And another one: ", "Also: ", "One more please. ", ""]


def number(rng: random.Random, n: int) -> str:
    """A count as digits or as an English word."""
    return NUMBER_WORDS[n] if rng.random() < 0.5 else str(n)


def day_text(rng: random.Random, day: str) -> str:
    """A weekday as the full name, lower case, or the three-letter code."""
    return rng.choice([DAYS[day], DAYS[day].lower(), day])


def time_text(rng: random.Random, hour: int) -> str:
    """An hour between 9 and 17 as 3pm, 3 pm or 15:00."""
    twelve = hour - 12 if hour > 12 else hour
    suffix = "pm" if hour >= 12 else "am"
    return rng.choice([f"{twelve}{suffix}", f"{twelve} {suffix}", f"{hour:02d}:00"])


def order(rng: random.Random) -> tuple[str, str]:
    item, color, day, qty = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(list(DAYS)), rng.randint(1, 9)
    q, d = number(rng, qty), day_text(rng, day)
    request = rng.choice([
        f"Please order {q} {color} {item}s by {d}.",
        f"Could you get us {q} {item}s in {color}? Need them by {d}.",
        f"We need {q} new {item}s, {color} ones, before {d}.",
        f"order {q} {item}s ({color}) for {d}",
        f"Can I have {q} {color} {item}s delivered by {d}?",
        f"By {d} we need {q} {item}s. Colour: {color}.",
    ])
    return request, f"ORDER | item: {item} | qty: {qty} | color: {color} | due: {day}"


def book(rng: random.Random) -> tuple[str, str]:
    room, day, people, hour = rng.choice(ROOMS), rng.choice(list(DAYS)), rng.randint(2, 12), rng.randint(9, 17)
    p, d, t = number(rng, people), day_text(rng, day), time_text(rng, hour)
    request = rng.choice([
        f"Book the {room} room for {p} people on {d} at {t}.",
        f"Can you reserve {room.capitalize()} on {d} at {t}? We are {p}.",
        f"I need a room for {p} on {d}, {t}, ideally {room}.",
        f"reserve {room} {d} {t} for {p} people",
        f"Please hold the {room} room at {t} on {d} for a meeting of {p}.",
    ])
    return request, f"BOOK | room: {room} | people: {people} | day: {day} | time: {hour:02d}:00"


def fix(rng: random.Random) -> tuple[str, str]:
    thing, floor, high = rng.choice(BROKEN), rng.randint(1, 5), rng.random() < 0.5
    f, urgency = number(rng, floor), rng.choice(HIGH if high else LOW)
    request = rng.choice([
        f"The {thing} on floor {f} is broken, {urgency}.",
        f"Could someone fix the {thing} on floor {f}? {urgency.capitalize()}.",
        f"{thing} not working on floor {f} - {urgency}",
        f"Floor {f}: the {thing} needs a repair, {urgency}.",
        f"Hi, our {thing} (floor {f}) stopped working. {urgency.capitalize()}.",
    ])
    return request, f"FIX | item: {thing} | floor: {floor} | priority: {'high' if high else 'low'}"


KINDS = {"order": order, "book": book, "fix": fix}


def conversation(rng: random.Random) -> tuple[dict, list[str]]:
    """One conversation (optional system prompt, one or two requests) and the user texts it contains."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = 2 if rng.random() < 0.2 else 1
    users: list[str] = []
    category = ""
    for turn in range(turns):
        category = rng.choice(list(KINDS))
        request, answer = KINDS[category](rng)
        prefix = rng.choice(FOLLOW_UPS) if turn else ""
        users.append(request)
        messages += [{"role": "user", "content": prefix + request}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "category": category}, users


def generate(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """Train and test conversations; no request text in the test split occurs anywhere in training."""
    rng = random.Random(seed)
    train: list[dict] = []
    test: list[dict] = []
    seen: set[str] = set()
    while len(train) < n_train:
        row, users = conversation(rng)
        train.append(row)
        seen.update(users)
    while len(test) < n_test:
        row, users = conversation(rng)
        if seen.isdisjoint(users):
            test.append(row)
            seen.update(users)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, keys in a stable order."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the two JSONL files")
    args = parser.parse_args()
    train, test = generate()
    write_jsonl(args.out / "house_format_train.jsonl", train)
    write_jsonl(args.out / "house_format_test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test conversations to {args.out}")


if __name__ == "__main__":
    main()
