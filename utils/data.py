"""Load and check chat-instruction JSONL files (one ``{"messages": [...]}`` conversation per line).

``python -m utils.data check PATH [PATH ...]`` prints a one-screen summary and exits 0 when every file is valid,
or prints one ``PATH:LINE: reason`` line per problem and exits 1. It never writes anything.
"""

from __future__ import annotations

import argparse
import difflib
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.prompts import ROLES


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data file, located by path and 1-based line number."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Raised by :func:`load_chat_jsonl` when a file fails the checks; the message lists every problem."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _role_hint(role: Any) -> str:
    close = difflib.get_close_matches(str(role), ROLES, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def check_conversation(obj: Any) -> list[str]:
    """Reasons why one parsed JSONL record is not a usable chat conversation (empty when it is)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object with a \"messages\" list, got {type(obj).__name__}"]
    if "messages" not in obj:
        return ['missing field "messages"' + (f" (found: {', '.join(map(str, obj))})" if obj else "")]
    messages = obj["messages"]
    if not isinstance(messages, list):
        return [f'"messages" must be a list, got {type(messages).__name__}']
    if not messages:
        return ['"messages" is empty']
    reasons: list[str] = []
    for i, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict):
            reasons.append(f"message {i} must be an object with role and content, got {type(msg).__name__}")
            continue
        missing = [k for k in ("role", "content") if k not in msg]
        if missing:
            reasons.append(f"message {i} is missing {' and '.join(missing)}")
            continue
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            reasons.append(f'message {i} has role "{role}"; expected one of {", ".join(ROLES)}{_role_hint(role)}')
        elif role == "system" and i != 1:
            reasons.append(f"message {i} is a system message; only the first message may be one")
        if not isinstance(content, str):
            reasons.append(f"message {i} content must be a string, got {type(content).__name__}")
        elif not content.strip():
            reasons.append(f"message {i} ({role}) has empty content")
    if reasons:
        return reasons
    turns = [m["role"] for m in messages if m["role"] != "system"]
    for i, (a, b) in enumerate(zip(turns, turns[1:]), start=2):
        if a == b:
            reasons.append(f"two {a} messages in a row (turn {i}); user and assistant must alternate")
            break
    if turns and turns[0] != "user":
        reasons.append("the first turn after the system prompt must be a user message")
    if "assistant" not in turns:
        reasons.append("no assistant reply to learn from")
    elif turns[-1] != "assistant":
        reasons.append("the conversation ends with a user message that has no assistant reply")
    return reasons


def check_chat_jsonl(path: str | Path) -> list[Problem]:
    """Every problem in a chat JSONL file, one per line of the file (empty list when the file is valid)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return [Problem(name, 0, "file not found")]
    except IsADirectoryError:
        return [Problem(name, 0, "is a folder, expected a .jsonl file")]
    if not raw.strip():
        return [Problem(name, 1, "file is empty; expected one JSON conversation per line")]
    problems: list[Problem] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(name, number, f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column "
                                                  f"{err.start + 1}); save the file as UTF-8"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(Problem(name, number, f"malformed JSON: {err.msg} at column {err.colno}"))
            continue
        problems += [Problem(name, number, reason) for reason in check_conversation(obj)]
    return problems


def load_chat_jsonl(path: str | Path) -> list[dict]:
    """The file's records, after checking them; raises :class:`DataError` listing every problem."""
    problems = check_chat_jsonl(path)
    if problems:
        raise DataError(problems)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def save_splits(train: list[dict], test: list[dict], folder: Path) -> Any:
    """Write the checked train/test conversations as a ``datasets.DatasetDict`` for the later chapters."""
    from datasets import Dataset, DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})
    splits.save_to_disk(str(folder))
    return splits


def load_splits(folder: Path) -> Any:
    """The ``DatasetDict`` chapter 01 saved; stops with a clear message when chapter 01 has not run yet."""
    from datasets import load_from_disk

    if not (Path(folder) / "dataset_dict.json").exists():
        raise FileNotFoundError(f"{folder} holds no dataset splits: run notebooks/01_data_preparation.ipynb first.")
    return load_from_disk(str(folder))


def summarize(rows: list[dict], tokenizer: Any | None = None) -> dict[str, Any]:
    """Counts of conversations, turns and roles, and length statistics (tokens if a tokenizer is given)."""
    roles = Counter(m["role"] for r in rows for m in r["messages"])
    if tokenizer is not None:
        lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                   for r in rows]
        unit = "tokens"
    else:
        lengths = [sum(len(m["content"].split()) for m in r["messages"]) for r in rows]
        unit = "words"
    return {
        "conversations": len(rows),
        "multi_turn": sum(1 for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1),
        "with_system_prompt": sum(1 for r in rows if r["messages"][0]["role"] == "system"),
        "messages_by_role": dict(sorted(roles.items())),
        "length_unit": unit,
        "length_min": min(lengths), "length_median": statistics.median(lengths), "length_max": max(lengths),
    }


def _summary_lines(path: str, summary: dict[str, Any]) -> list[str]:
    roles = ", ".join(f"{k} {v}" for k, v in summary["messages_by_role"].items())
    return [
        f"{path}: OK",
        f"  conversations      {summary['conversations']} ({summary['multi_turn']} multi-turn, "
        f"{summary['with_system_prompt']} with a system prompt)",
        f"  messages by role   {roles}",
        f"  length ({summary['length_unit']})".ljust(21)
        + f"min {summary['length_min']}, median {summary['length_median']}, max {summary['length_max']}",
    ]


def _load_tokenizer(spec: str | None) -> Any | None:
    from utils import config

    path = spec or (config.model_path() if config.is_miniature() else None)
    if not path or (config.is_miniature() and not spec and not Path(path).exists()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.data", description="Check chat JSONL files.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate files and print a summary")
    check.add_argument("paths", nargs="+", help="chat JSONL files")
    check.add_argument("--tokenizer", help="tokenizer folder or id for token lengths (default: the miniature's, "
                                           "if built; else word counts)")
    args = parser.parse_args(argv)
    problems = [p for path in args.paths for p in check_chat_jsonl(path)]
    if problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem(s) found.", file=sys.stderr)
        return 1
    tokenizer = _load_tokenizer(args.tokenizer)
    for path in args.paths:
        print("\n".join(_summary_lines(path, summarize(load_chat_jsonl(path), tokenizer))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
