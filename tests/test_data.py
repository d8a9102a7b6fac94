"""Chat JSONL checks: every bad-input class gets a PATH:LINE: reason line; good files pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils import config
from utils.data import DataError, check_chat_jsonl, load_chat_jsonl, summarize

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}


def write(tmp_path: Path, lines: list[str | bytes]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def msgs(*pairs: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"conversation": []}), 'missing field "messages" (found: conversation)'),
    (json.dumps({"messages": "hi"}), '"messages" must be a list'),
    (json.dumps({"messages": []}), '"messages" is empty'),
    (json.dumps({"messages": ["hi"]}), "message 1 must be an object"),
    (json.dumps({"messages": [{"role": "user"}]}), "message 1 is missing content"),
    (msgs(("user", "hi"), ("asistant", "x")), 'message 2 has role "asistant"; expected one of system, user, '
                                              'assistant (did you mean "assistant"?)'),
    (msgs(("user", "hi"), ("system", "x"), ("assistant", "y")), "message 2 is a system message"),
    (msgs(("user", "  "), ("assistant", "y")), "message 1 (user) has empty content"),
    (msgs(("user", "hi"), ("assistant", 3)), "message 2 content must be a string"),
    (msgs(("user", "hi")), "no assistant reply to learn from"),
    (msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "ends with a user message"),
    (msgs(("user", "a"), ("user", "b"), ("assistant", "c")), "two user messages in a row"),
    (msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")), "first turn after the system prompt"),
])
def test_each_bad_record_is_reported_with_path_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    path = write(tmp_path, [json.dumps(GOOD), line])
    problems = check_chat_jsonl(path)
    assert [p.line for p in problems] == [2]
    assert str(problems[0]).startswith(f"{path}:2: ")
    assert fragment in problems[0].reason


def test_non_utf8_bytes_name_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(GOOD), b'{"messages": "\xff"}'])
    (problem,) = check_chat_jsonl(path)
    assert problem.line == 2 and "not valid UTF-8" in problem.reason


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "file is empty" in check_chat_jsonl(empty)[0].reason
    assert check_chat_jsonl(tmp_path / "nope.jsonl")[0].reason == "file not found"


def test_blank_lines_are_skipped_and_good_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(GOOD), "", json.dumps(GOOD)])
    assert check_chat_jsonl(path) == []
    assert len(load_chat_jsonl(path)) == 2


def test_load_raises_with_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, ["{", json.dumps(GOOD), "[]"])
    with pytest.raises(DataError) as err:
        load_chat_jsonl(path)
    assert [p.line for p in err.value.problems] == [1, 3]


def test_summary_counts_roles_and_turns() -> None:
    multi = {"messages": GOOD["messages"] + [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    s = summarize([GOOD, multi])
    assert s["conversations"] == 2 and s["multi_turn"] == 1 and s["with_system_prompt"] == 2
    assert s["messages_by_role"] == {"assistant": 3, "system": 2, "user": 3}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.data", "check", *args], capture_output=True, text=True,
                          cwd=config.PROJECT_ROOT, env={"PATH": "", "PHI3_LAB_OUTPUTS": "/nonexistent-outputs"})


def test_cli_on_shipped_dataset_exits_zero() -> None:
    result = run_cli(str(config.DATASET_TRAIN), str(config.DATASET_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "house_format_train.jsonl: OK" in result.stdout and "conversations      480" in result.stdout


def test_cli_on_bad_file_prints_lines_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, [msgs(("user", "hi"), ("asistant", "x")), "{oops", b"\xfe"])
    before = sorted(tmp_path.iterdir())
    result = run_cli(str(path))
    assert result.returncode == 1
    assert [line.split(": ")[0] for line in result.stdout.splitlines()] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(tmp_path.iterdir()) == before
