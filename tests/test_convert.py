"""Converters from Alpaca, ShareGPT, OpenAI chat and CSV files to the series' chat JSONL (``utils/convert.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils import config
from utils.convert import CsvColumns, convert_file
from utils.data import check_chat_jsonl, load_chat_jsonl
from utils.data import main as data_main

SAMPLES = config.DATA_DIR / "samples"
TURN = [{"role": "user", "content": "order 2 pens"}, {"role": "assistant", "content": "ORDER | qty: 2"}]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def converted(tmp_path: Path, name: str, text: str, fmt: str, **kwargs) -> tuple[list[dict], list[str]]:
    """(conversations written, problem lines) of converting ``text`` saved as ``name``."""
    source = write(tmp_path / name, text)
    target = tmp_path / "out.jsonl"
    result = convert_file(source, target, fmt, **kwargs)
    rows = load_chat_jsonl(target) if result.written else []
    if result.written:
        assert check_chat_jsonl(target) == []
    return [r["messages"] for r in rows], [str(p).replace(str(tmp_path) + "/", "") for p in result.problems]


# --- every format, good records ------------------------------------------------------------------------------------

def test_alpaca_jsonl_and_json_array_give_the_same_conversations(tmp_path: Path) -> None:
    records = [{"instruction": "Rewrite as a ticket.", "input": "order 2 pens", "output": "ORDER | qty: 2"},
               {"instruction": "order 3 mugs", "input": "", "output": "ORDER | qty: 3", "system": "Be brief."}]
    from_lines, problems = converted(tmp_path, "a.jsonl", jsonl(records), "alpaca")
    assert problems == []
    from_array, problems = converted(tmp_path, "a.json", json.dumps(records, indent=2), "alpaca")
    assert problems == [] and from_array == from_lines
    assert from_lines == [
        [{"role": "user", "content": "Rewrite as a ticket.\n\norder 2 pens"},
         {"role": "assistant", "content": "ORDER | qty: 2"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "order 3 mugs"},
         {"role": "assistant", "content": "ORDER | qty: 3"}]]


def test_sharegpt_maps_human_gpt_and_system_and_keeps_several_turns(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "a"},
                                {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                                {"from": "gpt", "value": "d"}]}
    for name, text in (("s.jsonl", jsonl([record])), ("s.json", json.dumps([record]))):
        rows, problems = converted(tmp_path, name, text, "sharegpt")
        assert problems == []
        assert [m["role"] for m in rows[0]] == ["system", "user", "assistant", "user", "assistant"]
        assert [m["content"] for m in rows[0]] == ["Be brief.", "a", "b", "c", "d"]


def test_openai_content_given_as_text_parts_is_joined_and_developer_is_the_system(tmp_path: Path) -> None:
    record = {"messages": [{"role": "developer", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "text", "text": "order "},
                                                        {"type": "text", "text": "2 pens"}]},
                           {"role": "assistant", "content": "ORDER | qty: 2"}], "weight": 1}
    for name, text in (("o.jsonl", jsonl([record])), ("o.json", json.dumps([record], indent=1))):
        rows, problems = converted(tmp_path, name, text, "openai")
        assert problems == []
        assert rows == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "order 2 pens"},
                         {"role": "assistant", "content": "ORDER | qty: 2"}]]


def test_csv_named_columns_a_system_prompt_and_quoted_multiline_fields(tmp_path: Path) -> None:
    text = 'id,question,answer\n1,order 2 pens,ORDER | qty: 2\n2,"two lines,\nwith a comma",ok\n'
    rows, problems = converted(tmp_path, "c.csv", text, "csv",
                               columns=CsvColumns("question", "answer", system="Be brief."))
    assert problems == []
    assert rows[1] == [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "two lines,\nwith a comma"}, {"role": "assistant", "content": "ok"}]
    rows, _ = converted(tmp_path, "d.csv", "prompt,response,sys\nhi,hello,Be kind.\nhey,yo,\n", "csv",
                        columns=CsvColumns(system_column="sys"))
    assert rows[0][0] == {"role": "system", "content": "Be kind."} and rows[1][0]["role"] == "user"


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path: Path) -> None:
    text = "\ufeff" + jsonl([{"instruction": "a", "output": "b"}]).replace("\n", "\r\n")
    rows, problems = converted(tmp_path, "bom.jsonl", text, "alpaca")
    assert problems == [] and rows == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    rows, problems = converted(tmp_path, "bom.csv", "\ufeffprompt,response\r\na,b\r\n", "csv")
    assert problems == [] and len(rows) == 1


# --- bad records: one PATH:LINE: reason each, nothing written --------------------------------------------------------

BAD = {
    "alpaca": ("a.jsonl", jsonl([{"instruction": "a", "output": "b"}, {"instruction": "a"},
                                 {"instruction": "a", "output": "  "}, ["not", "an", "object"]]) + "{oops\n",
               ['a.jsonl:2: missing field "output" (found: instruction)', 'a.jsonl:3: "output" is empty',
                "a.jsonl:4: expected a JSON object with \"instruction\" and \"output\", got list",
                "a.jsonl:5: malformed JSON: Expecting property name enclosed in double quotes at column 2"]),
    "sharegpt": ("s.jsonl", jsonl([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                                   {"conversations": [{"from": "humna", "value": "a"}, {"from": "gpt", "value": "b"}]},
                                   {"conversations": [{"from": "human", "value": "a"}]},
                                   {"messages": []}]),
                 ['s.jsonl:2: message 1 has "from" "humna"; expected one of human, gpt, system, user, assistant '
                  '(did you mean "human"?)', "s.jsonl:3: no assistant reply to learn from",
                  's.jsonl:4: missing field "conversations" (found: messages; this looks like --from openai)']),
    "openai": ("o.jsonl", jsonl([{"messages": TURN},
                                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                               TURN[1]]},
                                 {"messages": [TURN[0], {"role": "assistant", "content": None, "tool_calls": []}]},
                                 {"messages": [TURN[0], {"role": "tool", "content": "42"}]},
                                 {"messages": [TURN[1], TURN[0], TURN[1]]}]),
               ['o.jsonl:2: message 1 has a content part of type "image_url"; only text parts '
                '({"type": "text", "text": ...}) can be converted',
                "o.jsonl:3: message 2 has no content (a tool call?); only text messages can be converted",
                'o.jsonl:4: message 2 has role "tool"; expected one of system, developer, user, assistant',
                "o.jsonl:5: the first turn after the system prompt must be a user message"]),
    "csv": ("c.csv", 'prompt,response\nhi,hello\n"two\nlines",\nonly one field\na,b,c\n',
            ['c.csv:3: column "response" is empty', "c.csv:5: fewer fields than the header: no value for response",
             "c.csv:6: 3 fields, the header has 2; quote fields that contain commas"]),
}


@pytest.mark.parametrize("fmt", BAD)
def test_bad_records_are_reported_by_line_and_nothing_is_written(tmp_path: Path, fmt: str) -> None:
    name, text, expected = BAD[fmt]
    target = write(tmp_path / "out.jsonl", "the previous output\n")
    result = convert_file(write(tmp_path / name, text), target, fmt)
    assert [str(p).replace(str(tmp_path) + "/", "") for p in result.problems] == expected
    assert not result.written and target.read_text() == "the previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.jsonl"])  # no staging file left


@pytest.mark.parametrize("fmt", BAD)
def test_skip_bad_writes_the_good_records_and_counts_the_bad(tmp_path: Path, fmt: str) -> None:
    name, text, expected = BAD[fmt]
    target = tmp_path / "out.jsonl"
    result = convert_file(write(tmp_path / name, text), target, fmt, skip_bad=True)
    assert result.written and result.skipped == len(expected)
    assert len(load_chat_jsonl(target)) == result.records - result.skipped == len(result.rows)
    assert check_chat_jsonl(target) == []


def test_json_array_records_are_located_by_the_line_they_start_on(tmp_path: Path) -> None:
    records = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}]
    _, problems = converted(tmp_path, "a.json", json.dumps(records, indent=2), "alpaca")
    assert problems == ['a.json:6: "output" is empty']


def test_a_malformed_json_array_stops_the_file_even_with_skip_bad(tmp_path: Path) -> None:
    source = write(tmp_path / "a.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output"}\n]')
    result = convert_file(source, tmp_path / "out.jsonl", "alpaca", skip_bad=True)
    assert not result.written and not (tmp_path / "out.jsonl").exists()
    assert [str(p).replace(str(tmp_path) + "/", "") for p in result.problems] == [
        "a.json:3: malformed JSON: Expecting ',' delimiter at column 22; nothing after it can be read"]


def test_csv_without_the_named_column_names_the_columns_it_has(tmp_path: Path) -> None:
    _, problems = converted(tmp_path, "c.csv", "question,answer\na,b\n", "csv",
                            columns=CsvColumns("questions", "answer"))
    assert problems == ['c.csv:1: no column "questions" in the header (columns: question, answer); '
                        'did you mean "question"? name it with --prompt-column']


@pytest.mark.parametrize("text, reason", [("", "file is empty"), ("[]", "no records found; expected alpaca records"),
                                          (b"\xff\xfe[", "not valid UTF-8 (byte 0xff); save the file as UTF-8")])
def test_files_that_hold_no_records(tmp_path: Path, text: str | bytes, reason: str) -> None:
    source = tmp_path / "a.json"
    source.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = convert_file(source, tmp_path / "out.jsonl", "alpaca", skip_bad=True)
    assert not result.written and [p.reason for p in result.problems] == [reason]


def test_a_csv_file_read_as_json_is_one_problem_that_names_the_fix(tmp_path: Path) -> None:
    _, problems = converted(tmp_path, "c.csv", "prompt,response\na,b\nc,d\n", "alpaca")
    assert problems == ["c.csv:1: not JSON: expected a JSON array or one JSON object per line (for a CSV file use "
                        "--from csv)"]


def test_the_output_must_not_be_the_input(tmp_path: Path) -> None:
    source = write(tmp_path / "a.jsonl", jsonl([{"instruction": "a", "output": "b"}]))
    with pytest.raises(ValueError, match="overwrite the input"):
        convert_file(source, source, "alpaca")


# --- the command line ------------------------------------------------------------------------------------------------

def test_cli_exit_codes_and_one_line_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = write(tmp_path / "good.jsonl", jsonl([{"instruction": "a", "output": "b"}]))
    bad = write(tmp_path / "bad.jsonl", jsonl([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    out = tmp_path / "out.jsonl"
    assert data_main(["convert", "--from", "alpaca", str(good), str(out)]) == 0
    assert "1 conversations from 1 alpaca records" in capsys.readouterr().err
    assert data_main(["convert", "--from", "alpaca", str(bad), str(tmp_path / "x.jsonl")]) == 1
    captured = capsys.readouterr()
    assert captured.out == f'{bad}:2: missing field "output" (found: instruction)\n'
    assert "nothing written; fix them, or leave them out with --skip-bad" in captured.err
    assert not (tmp_path / "x.jsonl").exists()
    assert data_main(["convert", "--from", "alpaca", "--skip-bad", str(bad), str(tmp_path / "x.jsonl")]) == 0
    assert "1 bad record(s) skipped" in capsys.readouterr().err
    assert data_main(["convert", "--from", "alpaca", str(tmp_path / "missing.json"), str(out)]) == 1
    assert capsys.readouterr().out == f"{tmp_path / 'missing.json'}:0: file not found\n"
    assert data_main(["convert", "--from", "alpaca", "--prompt-column", "q", str(good), str(out)]) == 2
    assert "apply to --from csv only" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        data_main(["convert", "--from", "yaml", str(good), str(out)])
    assert exit_.value.code == 2


def test_cli_as_a_learner_runs_it_prints_no_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", "prompt,response\nhi,\n")
    done = subprocess.run([sys.executable, "-m", "utils.data", "convert", "--from", "csv", str(bad),
                           str(tmp_path / "out.jsonl")], capture_output=True, text=True, cwd=config.PROJECT_ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stdout == f'{bad}:2: column "response" is empty\n'


# --- the shipped files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt, columns", [
    ("requests_alpaca.json", "alpaca", None), ("requests_sharegpt.jsonl", "sharegpt", None),
    ("requests_openai.jsonl", "openai", None), ("requests.csv", "csv", CsvColumns("request", "ticket"))])
def test_the_shipped_samples_convert_to_the_same_tickets(tmp_path: Path, name: str, fmt: str,
                                                         columns: CsvColumns | None) -> None:
    result = convert_file(SAMPLES / name, tmp_path / "out.jsonl", fmt, columns)
    assert result.written and result.problems == []
    answers = [m["content"] for r in load_chat_jsonl(tmp_path / "out.jsonl") for m in r["messages"]
               if m["role"] == "assistant"]
    assert answers[:2] == ["ORDER | item: mug | qty: 3 | color: blue | due: fri",
                           "FIX | item: heater | floor: 2 | priority: high"]


def test_the_office_routing_csv_is_its_generators_output_and_converts() -> None:
    from data import generate_office_routing as generator

    shipped = (config.DATA_DIR / "office_routing.csv").read_text(encoding="utf-8")
    assert shipped == generator.to_csv(generator.generate())
    rows = generator.generate()
    assert len({text for text, _ in rows}) == len(rows) == generator.N_ROWS
    assert {route.split()[0] for _, route in rows} == set(generator.QUEUES)
