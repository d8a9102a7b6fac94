"""Load and check chat-instruction JSONL files (one ``{"messages": [...]}`` conversation per line).

``python -m utils.data check PATH [PATH ...]`` prints a one-screen summary and exits 0 when every file is valid,
or prints one ``PATH:LINE: reason`` line per problem and exits 1. It never writes anything.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import statistics
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
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
        elif not _has_visible(content):
            shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in content if not c.isspace()}))[:60]
            reasons.append(f"message {i} ({role}) has no visible characters (only whitespace and {shown}); write "
                           "its text or remove the message")
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


# Characters that show nothing: format characters (zero-width space U+200B, word joiner, BOM ...), controls,
# separators, lone combining marks, and the letters that render blank (Hangul fillers, the Braille blank).
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _has_visible(text: str) -> bool:
    return any(not (c.isspace() or c in _BLANK_LETTERS or unicodedata.category(c) in _INVISIBLE_CATEGORIES)
               for c in text)


def _invalid_characters(messages: list[dict], controls: re.Pattern[str] | None) -> list[str]:
    """Lone surrogates (from JSON escapes like ``"\\ud800"``): valid JSON, but no tokenizer can encode them; and the
    tokenizer's control tokens (``<|user|>``, ``<|end|>`` ...) written as text, which would be encoded as the
    tokens themselves, so a line of data could forge a turn or end a conversation early."""
    reasons = []
    for i, msg in enumerate(messages, start=1):
        match = _SURROGATE.search(msg["content"])
        if match:
            reasons.append(f"message {i} content has an invalid character (lone surrogate "
                           f"\\u{ord(match.group()):04x} at column {match.start() + 1}); fix the JSON escape")
        match = controls.search(msg["content"]) if controls is not None else None
        if match:
            reasons.append(f'message {i} content holds "{match.group()}" at column {match.start() + 1}, one of the '
                           "tokenizer's control tokens: it would be encoded as that token and could forge a turn; "
                           "remove it or write it differently")
    return reasons


_SURROGATE = re.compile("[\ud800-\udfff]")


def control_tokens(tokenizer: Any | None = None) -> list[str]:
    """The tokenizer's own special tokens (its added tokens marked special, and ``all_special_tokens``), longest
    first; without a tokenizer, those of the shipped miniature, which carries Phi-3's special tokens."""
    if tokenizer is None:
        return list(_miniature_control_tokens())
    tokens = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    tokens |= set(getattr(tokenizer, "all_special_tokens", []))
    return sorted((t for t in tokens if t), key=lambda t: (-len(t), t))


@functools.lru_cache(maxsize=1)
def _miniature_control_tokens() -> tuple[str, ...]:
    from utils import config

    try:
        data = json.loads((config.miniature_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    tokens = {t["content"] for t in data.get("added_tokens", []) if t.get("special") and t.get("content")}
    return tuple(sorted(tokens, key=lambda t: (-len(t), t)))


def _control_pattern(tokenizer: Any | None) -> re.Pattern[str] | None:
    tokens = control_tokens(tokenizer)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


# One conversation per line: Phi-3's longest context (128k tokens) is about 0.5 MB of text, so a longer line cannot be
# trained on; refusing it before parsing keeps the check fast and small (a 50 MB line took minutes and gigabytes).
MAX_LINE_BYTES = 2 * 2**20
_READ_CHUNK = 2**20


def _lines(f: Any) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for each line of a binary file, read once (a pipe or ``/dev/stdin`` works); a line over
    :data:`MAX_LINE_BYTES` comes as ``None`` and is skipped without being held in memory."""
    number = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := f.readline(_READ_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line


def _parse(path: str | Path, controls: re.Pattern[str] | None = None) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """The one reader the checker and the loader share: (line number, record) pairs and the problems found.

    The file is read once, line by line. JSONL lines end at ``\\n`` only (``\\r\\n`` works too: JSON ignores the
    ``\\r``); characters such as U+2028, U+0085 or ``\\x0b`` inside a JSON string are content, not line breaks
    (``str.splitlines`` would split there). Only records that pass every check are returned.
    """
    name = str(path)
    records: list[tuple[int, Any]] = []
    problems: list[Problem] = []
    seen_content = False
    try:
        with open(path, "rb") as f:
            for number, line in _lines(f):
                if line is None:
                    seen_content = True
                    problems.append(Problem(name, number, f"line is longer than {MAX_LINE_BYTES // 2**20} MiB, far "
                                                          "beyond any Phi-3 context; shorten or split the conversation"))
                    continue
                if not line.strip():
                    continue
                seen_content = True
                problem, obj = _parse_line(line)
                if problem:
                    problems.append(Problem(name, number, problem))
                    continue
                reasons = check_conversation(obj) or _invalid_characters(obj["messages"], controls)
                problems += [Problem(name, number, reason) for reason in reasons]
                if not reasons:
                    records.append((number, obj))
    except FileNotFoundError:
        return [], [Problem(name, 0, "file not found")]
    except IsADirectoryError:
        return [], [Problem(name, 0, "is a folder, expected a .jsonl file")]
    except OSError as err:
        return [], [Problem(name, 0, f"cannot read the file ({err.strerror or err}); give a readable .jsonl file")]
    if not seen_content:
        return [], [Problem(name, 1, "file is empty; expected one JSON conversation per line")]
    return records, problems


def _parse_line(line: bytes) -> tuple[str | None, Any]:
    """(problem, parsed record) of one JSONL line; the problem is None when it is valid JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return (f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); save the file as UTF-8",
                None)
    try:
        return None, json.loads(text)
    except json.JSONDecodeError as err:
        return f"malformed JSON: {err.msg} at column {err.colno}", None
    except RecursionError:
        return "JSON nested too deeply to be a conversation; expected {\"messages\": [{\"role\": ..., \"content\": ...}]}", None
    except ValueError as err:  # an integer of thousands of digits (Python's int limit)
        return f"malformed JSON: {str(err).split(';')[0]}", None


def token_lengths(conversations: list[list[dict]], tokenizer: Any) -> list[int]:
    """Tokens of each conversation as training sees it: rendered with the tokenizer's chat template."""
    if not conversations:
        return []
    encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
    return [len(ids) for ids in encoded["input_ids"]]


def _length_problems(name: str, numbered: list[tuple[int, Any]], tokenizer: Any, max_tokens: int) -> list[Problem]:
    lengths = token_lengths([obj["messages"] for _, obj in numbered], tokenizer)
    return [Problem(name, number, f"conversation is {n} tokens, longer than the model's context of {max_tokens}; "
                                  "shorten or split it")
            for (number, _), n in zip(numbered, lengths) if n > max_tokens]


def read_chat_jsonl(path: str | Path, tokenizer: Any | None = None,
                    max_tokens: int | None = None) -> tuple[list[dict], list[Problem]]:
    """(valid conversations, every problem) of a chat JSONL file, reading it once (so a pipe works).

    Content holding one of the tokenizer's control tokens (:func:`control_tokens`; the miniature's, which are
    Phi-3's, without a ``tokenizer``) is a problem. With a ``tokenizer`` and ``max_tokens`` (the model's context,
    ``max_position_embeddings``), conversations longer than the context are problems too.
    """
    records, problems = _parse(path, _control_pattern(tokenizer))
    if tokenizer is not None and max_tokens is not None:
        problems += _length_problems(str(path), records, tokenizer, max_tokens)
        problems.sort(key=lambda p: p.line)
    return [obj for _, obj in records], problems


def check_chat_jsonl(path: str | Path, tokenizer: Any | None = None, max_tokens: int | None = None) -> list[Problem]:
    """Every problem in a chat JSONL file, one per line of the file (empty list when the file is valid); see
    :func:`read_chat_jsonl`."""
    return read_chat_jsonl(path, tokenizer, max_tokens)[1]


def load_chat_jsonl(path: str | Path, tokenizer: Any | None = None, max_tokens: int | None = None) -> list[dict]:
    """The file's records, read exactly as :func:`check_chat_jsonl` reads them; raises :class:`DataError` listing
    every problem (over-long conversations too, when ``tokenizer`` and ``max_tokens`` are given)."""
    rows, problems = read_chat_jsonl(path, tokenizer, max_tokens)
    if problems:
        raise DataError(problems)
    return rows


def check_lengths(rows: list[dict], tokenizer: Any, max_tokens: int, source: str) -> None:
    """Refuse conversations longer than the model's context: :class:`DataError` with one ``SOURCE:N: conversation
    is T tokens, longer than ...`` line each (N is the row's 1-based position: the file's line number when the
    rows come from a JSONL file without blank lines)."""
    problems = _length_problems(source, list(enumerate(rows, start=1)), tokenizer, max_tokens)
    if problems:
        raise DataError(problems)


def context_length(model_path: str) -> int | None:
    """The model's context (``max_position_embeddings`` of its config), or None when the config cannot be read."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(model_path).max_position_embeddings)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def save_splits(train: list[dict], test: list[dict], folder: Path) -> Any:
    """Write the checked train/test conversations as a ``datasets.DatasetDict`` for the later chapters.

    Written aside and swapped in whole (``utils.atomic.atomic_folder``): an interrupted write or a full disk leaves
    the previous splits (or none), never a part that later chapters would read as whole.
    """
    from datasets import Dataset, DatasetDict

    from utils.atomic import atomic_folder

    splits = DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})
    with atomic_folder(folder) as staging:
        splits.save_to_disk(str(staging))
    return splits


def load_splits(folder: Path) -> Any:
    """The ``DatasetDict`` chapter 01 saved; stops with a clear message when chapter 01 has not run yet.

    In a short run (``PHI3_LAB_HELDOUT=N``) the test split is its first N conversations.
    """
    from datasets import load_from_disk

    from utils import config

    from utils import catch_up

    if not (Path(folder) / "dataset_dict.json").exists() and not catch_up.restore(folder, "01_data_preparation.ipynb"):
        raise FileNotFoundError(f"{folder} holds no dataset splits: run notebooks/01_data_preparation.ipynb first "
                                f"(or set {catch_up.SWITCH}=1 to use its stored result).")
    splits = load_from_disk(str(folder))
    limit = config.heldout_limit()
    if limit is not None and limit < len(splits["test"]):
        splits["test"] = splits["test"].select(range(limit))
    return splits


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


def _load_tokenizer(spec: str | None) -> tuple[Any | None, int | None, str | None]:
    """(tokenizer, context length, why not) for the check: ``--tokenizer`` or the configured model's, if readable."""
    from utils import config

    path = spec or config.model_path()
    if not spec and not config.is_miniature() and not Path(path).is_dir():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "tokenizer_config.json"), str):
            return None, None, f"{path} is not downloaded yet"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        return None, None, f"no tokenizer could be loaded from {path} ({str(err).splitlines()[0][:120]})"
    return tokenizer, context_length(path), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.data", description="Check chat JSONL files, or convert "
                                     "other formats to them.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate files and print a summary")
    check.add_argument("paths", nargs="+", help="chat JSONL files")
    check.add_argument("--tokenizer", help="tokenizer folder or id for token lengths and the context check "
                                           "(default: the configured model's; else word counts)")
    check.add_argument("--max-tokens", type=int, help="longest conversation allowed (default: the model's "
                                                      "max_position_embeddings)")
    from utils import convert

    convert.add_arguments(sub.add_parser("convert", help="convert alpaca, sharegpt, openai or csv data to chat JSONL"))
    args = parser.parse_args(argv)
    if args.command == "convert":
        return convert.run_cli(args)
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    tokenizer, context, why = _load_tokenizer(args.tokenizer)
    if why and args.tokenizer:  # asked for by name: checking without it would answer another question
        print(f"--tokenizer {args.tokenizer}: {why}; give a tokenizer folder or a downloaded hub id, or leave "
              "--tokenizer out", file=sys.stderr)
        return 2
    max_tokens = args.max_tokens or context
    read = {path: read_chat_jsonl(path, tokenizer, max_tokens) for path in dict.fromkeys(args.paths)}
    problems = [p for _, found in read.values() for p in found]
    if why:
        print(f"note: lengths not checked against the model's context: {why}", file=sys.stderr)
    if problems:
        for p in problems:
            print(p)
        print(f"{len(problems)} problem(s) found.", file=sys.stderr)
        return 1
    for path, (rows, _) in read.items():
        print("\n".join(_summary_lines(path, summarize(rows, tokenizer))))
        if max_tokens:
            print(f"  context            every conversation fits in {max_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
