"""Convert the chat formats people have into the series' ``{"messages": [...]}`` JSONL.

``python -m utils.data convert --from alpaca|sharegpt|openai|csv IN OUT`` reads

- **alpaca**: ``{"instruction", "input" (optional), "output", "system" (optional)}`` records;
- **sharegpt**: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
- **openai**: OpenAI's chat fine-tuning JSONL, ``{"messages": [{"role", "content"}, ...]}``, content a string or a
  list of text parts (``[{"type": "text", "text": ...}]``);
- **csv**: one conversation per row, from a prompt and a response column (``--prompt-column``,
  ``--response-column``), with an optional system prompt (``--system`` for all rows, or ``--system-column``);

the JSON formats as a JSON array or as JSONL (one record per line). Each record that cannot be converted is
reported as ``IN:LINE: reason``; nothing is written unless every record converts, or with ``skip_bad`` the bad
records are left out and counted. The output is written aside and renamed into place, so an interrupted or failed
conversion never leaves a half-written file, and it passes ``python -m utils.data check``.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.data import Problem, check_chat_jsonl, check_conversation

FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "openai", "csv")
SHAREGPT_ROLES: dict[str, str] = {"human": "user", "gpt": "assistant", "system": "system",
                                  "user": "user", "assistant": "assistant"}
OPENAI_ROLES: dict[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class FileProblem(Problem):
    """A problem that stops the file from being read to its end (never skipped, even with ``skip_bad``)."""


class RecordError(ValueError):
    """Why one input record cannot be converted (the message is the reason a learner reads)."""


@dataclass
class CsvColumns:
    """Which CSV columns hold the prompt, the response and (optionally) a per-row system prompt."""

    prompt: str = "prompt"
    response: str = "response"
    system_column: str | None = None
    system: str | None = None


@dataclass
class Conversion:
    """What a conversion read and produced: the converted rows, the problems (by input line) and the skip count."""

    rows: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    records: int = 0
    skipped: int = 0
    written: bool = False


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{what} is empty")
    return value


SIGNATURES: dict[str, str] = {"alpaca": "instruction", "sharegpt": "conversations", "openai": "messages"}


def _fields_hint(obj: dict, current: str) -> str:
    """The fields a record has, and the format they suggest when it is not ``current``."""
    if not obj:
        return " (the record is empty)"
    likely = next((fmt for fmt, key in SIGNATURES.items() if key in obj and fmt != current), None)
    return f" (found: {', '.join(map(str, obj))}" + (f"; this looks like --from {likely})" if likely else ")")


def _object(record: Any, wanted: str) -> dict:
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object with {wanted}, got {type(record).__name__}")
    return record


def from_alpaca(record: Any) -> list[dict]:
    """An Alpaca record: the instruction (and its input, after a blank line) asks, the output answers."""
    obj = _object(record, '"instruction" and "output"')
    missing = [k for k in ("instruction", "output") if k not in obj]
    if missing:
        names = " and ".join(f'"{k}"' for k in missing)
        raise RecordError(f"missing field {names}" + _fields_hint(obj, "alpaca"))
    prompt = _text(obj["instruction"], '"instruction"')
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError(f'"input" must be a string, got {type(extra).__name__}')
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(obj["output"], '"output"')}]
    system = obj.get("system")
    if system:
        messages.insert(0, {"role": "system", "content": _text(system, '"system"')})
    return messages


def _role(name: Any, roles: dict[str, str], key: str, i: int) -> str:
    if not isinstance(name, str) or name.strip().lower() not in roles:
        close = difflib.get_close_matches(str(name).lower(), list(roles), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise RecordError(f'message {i} has {key} "{name}"; expected one of {", ".join(roles)}{hint}')
    return roles[name.strip().lower()]


def _turns(obj: dict, field: str, fmt: str) -> list:
    """The record's list of turns under ``field``; :class:`RecordError` when it is missing, not a list or empty."""
    if field not in obj:
        raise RecordError(f'missing field "{field}"' + _fields_hint(obj, fmt))
    turns = obj[field]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f'"{field}" must be a non-empty list'
                          + ("" if isinstance(turns, list) else f", got {type(turns).__name__}"))
    return turns


def from_sharegpt(record: Any) -> list[dict]:
    """A ShareGPT record: ``conversations`` turns with ``from`` (human, gpt, system) and ``value``."""
    obj = _object(record, 'a "conversations" list')
    turns = _turns(obj, "conversations", "sharegpt")
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f'message {i} must be an object with "from" and "value"'
                              + (_fields_hint(turn, "sharegpt") if isinstance(turn, dict) else f", got {type(turn).__name__}"))
        role = _role(turn["from"], SHAREGPT_ROLES, '"from"', i)
        messages.append({"role": role, "content": _text(turn["value"], f'message {i} "value"')})
    return messages


def _openai_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return _text(content, f"message {i} content")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RecordError(f'message {i} has a content part of type "{kind}"; only text parts '
                                  '({"type": "text", "text": ...}) can be converted')
            texts.append(part["text"])
        return _text("".join(texts), f"message {i} content")
    if content is None:
        raise RecordError(f"message {i} has no content (a tool call?); only text messages can be converted")
    raise RecordError(f"message {i} content must be a string or a list of text parts, got {type(content).__name__}")


def from_openai(record: Any) -> list[dict]:
    """An OpenAI chat record: ``messages`` with roles system/developer, user, assistant; text content only."""
    obj = _object(record, 'a "messages" list')
    messages = _turns(obj, "messages", "openai")
    out = []
    for i, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict) or "role" not in msg:
            raise RecordError(f'message {i} must be an object with "role" and "content"')
        role = _role(msg["role"], OPENAI_ROLES, "role", i)
        out.append({"role": role, "content": _openai_content(msg.get("content"), i)})
    return out


def from_csv_row(row: dict[str, Any], columns: CsvColumns) -> list[dict]:
    """One CSV row: the prompt and response columns, and a system prompt when one is given."""
    if None in row:
        raise RecordError(f"{len(row[None]) + len(row) - 1} fields, the header has {len(row) - 1}; "
                          "quote fields that contain commas")
    short = [name for name in (columns.prompt, columns.response) if row.get(name) is None]
    if short:
        raise RecordError(f"fewer fields than the header: no value for {', '.join(short)}")
    messages = [{"role": "user", "content": _text(row[columns.prompt], f'column "{columns.prompt}"')},
                {"role": "assistant", "content": _text(row[columns.response], f'column "{columns.response}"')}]
    system = row.get(columns.system_column) if columns.system_column else columns.system
    if system and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


CONVERTERS: dict[str, Callable[[Any], list[dict]]] = {"alpaca": from_alpaca, "sharegpt": from_sharegpt,
                                                       "openai": from_openai}


def _read_text(path: str | Path) -> tuple[str | None, Problem | None]:
    """The file's text (UTF-8, a byte-order mark allowed), or the FileProblem that stops it being read."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None, FileProblem(name, 0, "file not found")
    except IsADirectoryError:
        return None, FileProblem(name, 0, "is a folder, expected a file")
    except OSError as err:
        return None, FileProblem(name, 0, f"cannot read the file ({err.strerror or err})")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        return None, FileProblem(name, line, f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as "
                                             "UTF-8")
    if not text.strip():
        return None, FileProblem(name, 1, "file is empty")
    return text, None


def _json_array(text: str, name: str) -> Iterator[tuple[int, Any] | Problem]:
    """The elements of a JSON array with the line each starts on; a Problem where the JSON is malformed."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield FileProblem(name, err.lineno, f"malformed JSON: {err.msg} at column {err.colno}; "
                                            "nothing after it can be read")
            return
        yield line, value
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            yield FileProblem(name, text.count("\n", 0, pos) + 1, "malformed JSON: expected ',' or ']' after a "
                                                                 "record; nothing after it can be read")
            return


def read_json_records(path: str | Path) -> Iterator[tuple[int, Any] | Problem]:
    """(line, record) pairs of a JSON array, a single JSON object or a JSONL file; Problems for unreadable parts."""
    name = str(path)
    text, problem = _read_text(path)
    if problem:
        yield problem
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_array(text, name)
        return
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):  # one pretty-printed record
            yield text.count("\n", 0, len(text) - len(stripped)) + 1, whole
            return
    if not stripped.startswith("{"):
        yield FileProblem(name, text.count("\n", 0, len(text) - len(stripped)) + 1,
                          "not JSON: expected a JSON array or one JSON object per line (for a CSV file use --from csv)")
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield Problem(name, number, f"malformed JSON: {err.msg} at column {err.colno}")


def read_csv_records(path: str | Path, columns: CsvColumns) -> Iterator[tuple[int, Any] | Problem]:
    """(line, row) pairs of a CSV file with a header; a Problem when the header lacks a named column."""
    name = str(path)
    text, problem = _read_text(path)
    if problem:
        yield problem
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as err:
        yield FileProblem(name, 1, f"unreadable CSV header ({err})")
        return
    wanted = {"--prompt-column": columns.prompt, "--response-column": columns.response,
              "--system-column": columns.system_column}
    for option, column in wanted.items():
        if column is not None and column not in header:
            close = difflib.get_close_matches(column, header, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            yield FileProblem(name, 1, f'no column "{column}" in the header (columns: {", ".join(header) or "none"}); '
                                   f"{hint}name it with {option}")
            return
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield FileProblem(name, reader.line_num, f"unreadable CSV row ({err}); nothing after it can be read")
            return
        yield start, row
        start = reader.line_num + 1


def convert_records(path: str | Path, fmt: str, columns: CsvColumns | None = None) -> Conversion:
    """Read and convert every record of ``path``; each bad record becomes a Problem at its line.

    A record converts when its fields are there and the conversation it gives passes
    :func:`utils.data.check_conversation` (roles, alternation, an assistant reply to learn from).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    name = str(path)
    columns = columns or CsvColumns()
    items = read_csv_records(path, columns) if fmt == "csv" else read_json_records(path)
    result = Conversion()
    for item in items:
        if isinstance(item, Problem):
            result.problems.append(item)
            result.records += not isinstance(item, FileProblem)  # a malformed JSONL line is a record lost
            continue
        line, record = item
        result.records += 1
        try:
            messages = from_csv_row(record, columns) if fmt == "csv" else CONVERTERS[fmt](record)
        except RecordError as err:
            result.problems.append(Problem(name, line, str(err)))
            continue
        reasons = check_conversation({"messages": messages})
        if reasons:
            result.problems += [Problem(name, line, reason) for reason in reasons]
            continue
        result.rows.append({"messages": messages})
        result.lines.append(line)
    if not result.records and not result.problems:
        result.problems.append(FileProblem(name, 1, f"no records found; expected {fmt} records"))
    return result


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def convert_file(source: str | Path, target: str | Path, fmt: str, columns: CsvColumns | None = None,
                 skip_bad: bool = False) -> Conversion:
    """Convert ``source`` (in ``fmt``) to chat JSONL at ``target``, written aside and renamed into place.

    Nothing is written when any record fails, unless ``skip_bad``: then the good records are written and
    ``Conversion.skipped`` counts the bad ones. Problems that stop the file from being read to its end (not UTF-8,
    a malformed JSON array, a missing CSV column) are never skipped. The written file is checked with
    :func:`utils.data.check_chat_jsonl` before it replaces ``target``; what that finds is reported at the input line
    the conversation came from. Check ``Conversion.written`` for the outcome.
    """
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise ValueError(f"{target}: the output would overwrite the input; give another output file")
    result = convert_records(source, fmt, columns)
    if any(isinstance(p, FileProblem) for p in result.problems) or (result.problems and not skip_bad):
        return result
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.writing"
    try:
        _write_jsonl(staging, result.rows)
        late = check_chat_jsonl(staging)  # the validator's last word, mapped back to the input's lines
        if late:
            bad = {p.line for p in late}
            result.problems += [Problem(str(source), result.lines[p.line - 1] if 0 < p.line <= len(result.lines)
                                        else 0, p.reason) for p in late]
            result.problems.sort(key=lambda p: p.line)
            if not skip_bad:
                return result
            kept = [(row, line) for i, (row, line) in enumerate(zip(result.rows, result.lines), start=1)
                    if i not in bad]
            result.rows, result.lines = [r for r, _ in kept], [l for _, l in kept]
            _write_jsonl(staging, result.rows)
        if not result.rows:
            return result
        os.replace(staging, target)
        result.written = True
    finally:
        staging.unlink(missing_ok=True)
    result.skipped = len({p.line for p in result.problems})
    return result


def add_arguments(parser: Any) -> None:
    """The ``convert`` subcommand's arguments (``python -m utils.data convert --help``)."""
    parser.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="the input's format")
    parser.add_argument("source", help="input file: JSON array or JSONL (alpaca, sharegpt, openai), or CSV")
    parser.add_argument("target", help="output chat JSONL file (written only when every record converts)")
    parser.add_argument("--prompt-column", default="prompt", help="csv: the column the user writes (default: prompt)")
    parser.add_argument("--response-column", default="response",
                        help="csv: the column the assistant answers (default: response)")
    parser.add_argument("--system", help="csv: a system prompt for every conversation")
    parser.add_argument("--system-column", help="csv: a column holding each row's system prompt")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out records that cannot be converted (each is still reported) and write the rest")


def run_cli(args: Any) -> int:
    """Run ``convert``: 0 when written, 1 when the data has problems (one ``PATH:LINE: reason`` each), 2 on bad usage."""
    import sys

    if args.fmt != "csv" and (args.system or args.system_column or args.prompt_column != "prompt"
                              or args.response_column != "response"):
        print("python -m utils.data convert: error: --prompt-column, --response-column, --system and "
              "--system-column apply to --from csv only", file=sys.stderr)
        return 2
    if args.system and args.system_column:
        print("python -m utils.data convert: error: give --system or --system-column, not both", file=sys.stderr)
        return 2
    columns = CsvColumns(args.prompt_column, args.response_column, args.system_column, args.system)
    try:
        result = convert_file(args.source, args.target, args.fmt, columns, skip_bad=args.skip_bad)
    except ValueError as err:
        print(f"python -m utils.data convert: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{args.target}:0: cannot write the output ({err.strerror or err}); give a writable path",
              file=sys.stderr)
        return 1
    for problem in result.problems:
        print(problem)
    if not result.written:
        fatal = any(isinstance(p, FileProblem) for p in result.problems)
        hint = "" if fatal or args.skip_bad else "; fix them, or leave them out with --skip-bad"
        print(f"{len(result.problems)} problem(s) found; nothing written{hint}.", file=sys.stderr)
        return 1
    skipped = f", {result.skipped} bad record(s) skipped (listed above)" if result.skipped else ""
    print(f"{args.target}: {len(result.rows)} conversations from {result.records} {args.fmt} records{skipped}",
          file=sys.stderr)
    return 0
