"""The teaching guide (docs/teaching/) agrees with itself and with the chapters it points to."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "teaching"


def timetable() -> list[dict]:
    """The schedule's timetable rows: start (minutes), minutes, teaching + exercise split, what."""
    rows = []
    for line in (GUIDE / "schedule.md").read_text().splitlines():
        match = re.match(r"^\| (\d):(\d\d) \| ?(\d*)(?: \((\d+) \+ (\d+)\))? ?\| ([^|]+) \|", line)
        if match:
            hours, mins, minutes, teach, exercise, what = match.groups()
            rows.append({"start": int(hours) * 60 + int(mins), "minutes": int(minutes) if minutes else 0,
                         "split": (int(teach), int(exercise)) if teach else None, "what": what.strip()})
    return rows


def test_the_timetable_adds_up_to_three_hours() -> None:
    rows = timetable()
    assert rows and rows[0]["start"] == 0 and rows[-1]["what"] == "End"
    for row, following in zip(rows, rows[1:]):
        assert row["start"] + row["minutes"] == following["start"], f"{row['what']}: the next row starts elsewhere"
        if row["split"]:
            assert sum(row["split"]) == row["minutes"], row["what"]
    assert rows[-1]["start"] == 180 == sum(row["minutes"] for row in rows)


def test_core_chapters_and_their_notes_agree() -> None:
    notes = (GUIDE / "instructor-notes.md").read_text()
    taught = [row for row in timetable() if re.search(r"\[(\d\d) ·", row["what"])]
    assert [re.search(r"\[(\d\d) ·", row["what"]).group(1) for row in taught] == ["00", "01", "02", "03", "04",
                                                                                   "05", "06"]
    for row in taught:
        number = re.search(r"\[(\d\d) ·", row["what"]).group(1)
        teach, exercise = row["split"]
        heading = re.search(rf"^## {number} · .*\((\d+) minutes: (\d+) \+ (\d+)\)$", notes, re.M)
        assert heading, f"instructor-notes.md has no section for chapter {number} with its minutes"
        assert tuple(map(int, heading.groups())) == (row["minutes"], teach, exercise), f"chapter {number}"


def headings(chapter: Path) -> list[str]:
    """A chapter's section headings, without markdown's backticks."""
    cells = json.loads(chapter.read_text())["cells"]
    text = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    return [line.lstrip("#").strip().replace("`", "") for line in text.splitlines() if line.startswith("##")]


def test_every_section_named_as_core_or_optional_exists_in_its_chapter() -> None:
    notes = (GUIDE / "instructor-notes.md").read_text()
    for section in re.split(r"^## ", notes, flags=re.M)[1:]:
        number = section[:2]
        if not number.isdigit():
            continue
        titles = headings(next((ROOT / "notebooks").glob(f"{number}_*.ipynb")))
        block = re.search(r"\*\*Core:\*\*(.*?)\*\*Stumbling", section, re.S).group(1)
        names = [" ".join(n.split()).replace("`", "") for n in re.findall(r"(?<!\*)\*([^*]+)\*(?!\*)", block)]
        assert len(names) >= 3, f"chapter {number}: no sections named"
        for name in names:
            assert any(title.startswith(name) for title in titles), f"chapter {number} has no section {name!r}"


def test_links_point_to_files_that_exist() -> None:
    for page in GUIDE.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).resolve().exists(), f"{page.name}: broken link {target}"


def test_every_chapter_is_in_the_schedule() -> None:
    schedule = (GUIDE / "schedule.md").read_text()
    for chapter in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"notebooks/{chapter.name}" in schedule or chapter.name.startswith("09"), chapter.name
    assert "09 · Your own task" in schedule
