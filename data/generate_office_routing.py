"""Generate the capstone's dataset: office requests routed to a work queue and an urgency, as a two-column CSV.

Deterministic: ``python data/generate_office_routing.py`` rewrites ``office_routing.csv`` byte for byte. See
``OFFICE_ROUTING_CARD.md`` for what the data is and why. It is shipped as CSV on purpose, the way a learner's own
data usually arrives (a spreadsheet export): chapter 09 converts it with ``python -m utils.data convert``.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 909
N_ROWS = 400

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = ["red", "blue", "green", "black", "white"]
ROOMS = ["atlas", "birch", "cedar", "delta", "oak", "pine"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]
HIGH = ["asap", "it is urgent", "urgently please", "this is blocking us", "right now", "top priority"]
LOW = ["when you can", "no rush", "low priority", "whenever someone is free", "any time", "next week is fine"]

# The queue depends on what is asked, not on the thing: a sink can be repaired or cleaned, a desk ordered, moved or
# cleaned. So the model must read the request's verb phrase, not only look up the object.
QUEUES: dict[str, tuple[list[str], list[str]]] = {
    "repair": (["printer", "projector", "door", "heater", "sink", "window", "lamp", "monitor"], [
        "The {thing} in {room} is broken",
        "Our {thing} stopped working",
        "Can someone fix the {thing} on floor {floor}",
        "The {thing} does not work any more",
        "{thing} broken in the {room} room",
        "Please repair the {thing} near {room}",
    ]),
    "order": (["mug", "pen", "notebook", "cable", "chair", "desk", "lamp", "monitor"], [
        "We need {count} new {thing}s",
        "Please order {count} {color} {thing}s",
        "Can we get {count} more {thing}s for {room}",
        "We are out of {thing}s, {count} would do",
        "Buy {count} {thing}s for the {room} team",
        "Could you send us {count} {color} {thing}s",
    ]),
    "clean": (["sink", "desk", "window", "door", "chair", "mug"], [
        "The {thing} in {room} is dirty",
        "Someone spilled coffee on the {thing}",
        "Please clean the {thing} on floor {floor}",
        "The {thing} in the {room} room needs a wipe",
        "Can the {thing} near {room} be cleaned",
        "Sticky {thing} on floor {floor}, please clean it",
    ]),
    "move": (["desk", "chair", "lamp", "monitor", "printer", "projector", "heater"], [
        "Please move the {thing} to {room}",
        "Can the {thing} go to the {room} room",
        "We need the {thing} moved to floor {floor}",
        "Carry {count} {thing}s from {room} to {room2}",
        "Move our {thing} next to the {room} room",
        "The {thing} should go up to floor {floor}",
    ]),
}
WHEN = ["", "", " before {day}", " by {day}", " on {day}"]


def request(rng: random.Random) -> tuple[str, str]:
    """One request and its route (``"<queue> <urgency>"``, e.g. ``"repair high"``)."""
    queue = rng.choice(list(QUEUES))
    things, templates = QUEUES[queue]
    high = rng.random() < 0.5
    room, room2 = rng.sample(ROOMS, 2)
    count = rng.randint(2, 9)
    text = rng.choice(templates).format(
        thing=rng.choice(things), room=room.capitalize() if rng.random() < 0.3 else room, room2=room2,
        floor=rng.randint(1, 5), count=NUMBER_WORDS[count] if rng.random() < 0.5 else count,
        color=rng.choice(COLORS))
    text += rng.choice(WHEN).format(day=rng.choice(DAYS))
    urgency = rng.choice(HIGH if high else LOW)
    text = rng.choice([f"{text}, {urgency}.", f"{text}. {urgency.capitalize()}.", f"{text} - {urgency}"])
    return text[0].upper() + text[1:], f"{queue} {'high' if high else 'low'}"


def generate(n: int = N_ROWS, seed: int = SEED) -> list[tuple[str, str]]:
    """``n`` (request, route) rows; no request text occurs twice, so no split can leak one into the other."""
    rng = random.Random(seed)
    rows: dict[str, str] = {}
    while len(rows) < n:
        text, route = request(rng)
        rows.setdefault(text, route)
    return list(rows.items())


def to_csv(rows: list[tuple[str, str]]) -> str:
    """The rows under a ``request,route`` header, quoted where needed, ``\\n`` line ends."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["request", "route"])
    writer.writerows(rows)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "office_routing.csv", help="the CSV file to write")
    args = parser.parse_args()
    rows = generate()
    args.out.write_text(to_csv(rows), encoding="utf-8")
    print(f"wrote {len(rows)} requests to {args.out}")


if __name__ == "__main__":
    main()
