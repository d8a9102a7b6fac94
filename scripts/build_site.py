"""Build the workshop website from the stored, executed notebooks (``make site``); nothing is re-executed.

    python scripts/build_site.py            # outputs/site/html/index.html (open it, or serve the folder)

It stages the README (the front page), the chapters in order with their solutions beneath them, and the teaching
guide under outputs/site/src/, writes the table of contents into myst.yml there, and runs jupyter-book 2 (MyST)
with the project's own site template (docs/site/template/), which renders the pages without downloading a web
theme, so the build works offline. The finished site replaces outputs/site/html/ only once it is complete.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import config  # noqa: E402

ROOT = config.PROJECT_ROOT
TEMPLATE = ROOT / "docs" / "site" / "template"
TEACHING = ROOT / "docs" / "teaching"
REPOSITORY = "https://github.com/phi3-lora-lab/phi3-lora-lab"
CHAPTER = re.compile(r"^\d\d_\w+\.ipynb$")


def site_dir() -> Path:
    """Where the site is built: outputs/site/ (html/ is the finished site, src/ the staged sources)."""
    return config.outputs_dir() / "site"


def chapters() -> list[Path]:
    """The chapter notebooks in reading order (notebooks/NN_*.ipynb)."""
    return sorted(path for path in (ROOT / "notebooks").glob("*.ipynb") if CHAPTER.match(path.name))


def teaching_pages() -> list[Path]:
    """The teaching guide's pages: the schedule, the instructor notes, catching up, then any others by name."""
    order = ["schedule.md", "instructor-notes.md", "catch-up.md"]
    return sorted(TEACHING.glob("*.md"), key=lambda page: (order.index(page.name) if page.name in order
                                                           else len(order), page.name))


def table_of_contents() -> list[dict]:
    """README first, each chapter followed by its solutions, then the teaching guide."""
    toc: list[dict] = [{"file": "README.md"}]
    for chapter in chapters():
        entry: dict = {"file": f"notebooks/{chapter.name}"}
        solutions = ROOT / "notebooks" / "solutions" / f"{chapter.stem}_solutions.ipynb"
        if solutions.exists():
            entry["children"] = [{"file": f"notebooks/solutions/{solutions.name}"}]
        toc.append(entry)
    guide = teaching_pages()
    if guide:
        toc.append({"file": f"docs/teaching/{guide[0].name}",
                    "children": [{"file": f"docs/teaching/{page.name}"} for page in guide[1:]]})
    return toc


def myst_yml(toc: list[dict]) -> str:
    """The project's myst.yml (JSON is valid YAML): title, repository, toc and the offline site template."""
    project = {"title": "Phi-3 LoRA Lab", "github": REPOSITORY, "toc": toc}
    config_doc = {"version": 1, "project": project, "site": {"template": str(TEMPLATE)}}
    return json.dumps(config_doc, indent=1) + "\n"


def stage(src: Path, toc: list[dict]) -> None:
    """Copy what the site shows into src/, keeping the repository's layout so relative links still resolve."""
    shutil.rmtree(src, ignore_errors=True)

    def files(entries: list[dict]):
        for entry in entries:
            yield entry["file"]
            yield from files(entry.get("children", []))

    for relative in files(toc):
        target = src / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    (src / "myst.yml").write_text(myst_yml(toc), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    if not jupyter_book.exists():
        print("build_site: jupyter-book is not installed in this environment; run `make site` "
              "(it installs requirements-site.txt into .venv)", file=sys.stderr)
        return 2
    if shutil.which("node") is None:
        print("build_site: jupyter-book 2 needs Node.js 18 or newer on PATH (Debian: apt-get install nodejs npm)",
              file=sys.stderr)
        return 2
    out = site_dir()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"build_site: another build is running in {out}; wait for it to finish", file=sys.stderr)
            return 1
        started = time.monotonic()
        toc = table_of_contents()
        src = out / "src"
        stage(src, toc)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("BASE_URL", None)
        log = out / "build.log"
        with open(log, "w") as handle:
            result = subprocess.run([str(jupyter_book), "build", "--html"], cwd=src, env=env,
                                    stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        built = src / "_build" / "html"
        if result.returncode != 0 or not (built / "index.html").exists():
            print(log.read_text()[-3000:], file=sys.stderr)
            print(f"build_site: jupyter-book failed (exit {result.returncode}); full log in {log}", file=sys.stderr)
            return 1
        report = src / "_build" / "render-report.txt"
        if report.exists():
            print(report.read_text(), end="")
        final = out / "html"
        previous = out / "html.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            final.rename(previous)
        shutil.move(str(built), final)
        shutil.rmtree(previous, ignore_errors=True)
        pages = len(list(final.glob("*.html")))
        shown = final.relative_to(config.PROJECT_ROOT) if final.is_relative_to(config.PROJECT_ROOT) else final
        print(f"site: {pages} pages in {shown}/ ({time.monotonic() - started:.0f} s); open {shown}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
