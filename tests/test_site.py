"""The workshop website (`make site`), opened in a real browser: headless Chromium driven by Playwright.

The site is built from the stored notebooks (scripts/build_site.py), served on 127.0.0.1, and every page is opened:
each chapter page has its title, one figure per plot the stored notebook holds and a link to its solutions; no
internal link is broken, no image is missing, and the console shows no error except the Colab badge, an external
image that cannot load on an offline machine. `make test-site` runs this file; CI installs Debian's chromium.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_site  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLAB_BADGE = "colab.research.google.com/assets/colab-badge.svg"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.site,  # make test-site runs these (after installing requirements-site.txt); make test leaves them out
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium; "
                                                ".ci/run installs it)"),
    pytest.mark.skipif(not (Path(sys.executable).parent / "jupyter-book").exists(),
                       reason="jupyter-book is not installed: run `make test-site` (installs requirements-site.txt)"),
]


def stored_figures(notebook: Path) -> int:
    """How many image outputs the stored notebook holds."""
    cells = json.loads(notebook.read_text())["cells"]
    return sum(1 for cell in cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))


def notebook_title(notebook: Path) -> str:
    """The chapter's title: the first markdown heading of the stored notebook."""
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            match = re.search(r"^# (.+)$", "".join(cell["source"]), re.M)
            if match:
                return match.group(1).strip()
    raise AssertionError(f"{notebook} has no title")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site from the stored notebooks (no execution) and return its folder."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_site.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    html = build_site.site_dir() / "html"
    assert (html / "index.html").is_file()
    return html


@pytest.fixture(scope="module")
def server(site: Path):
    """Serve the built site on 127.0.0.1 (a free port), as a reader's browser would get it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def visits(site: Path, server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Open every page of the site in headless Chromium; per page its title, headings, images, links, errors."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run `make test-site`")
    results: dict[str, dict] = {}
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS)
        try:
            for page_file in sorted(site.glob("*.html")):
                page = browser.new_page()
                errors: list[str] = []
                failed: list[str] = []
                page.on("console", lambda m, errors=errors: errors.append(
                    f"{m.text} [{m.location.get('url', '')}]") if m.type == "error" else None)
                page.on("pageerror", lambda e, errors=errors: errors.append(f"page error: {e}"))
                page.on("requestfailed", lambda r, failed=failed: failed.append(r.url))
                page.on("response", lambda r, failed=failed: failed.append(r.url) if r.status >= 400 else None)
                response = page.goto(server + page_file.name, wait_until="load")
                # Every image settled (loaded or failed), the offline Colab badge included, so its error shows too.
                page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
                page.wait_for_timeout(200)
                images = page.eval_on_selector_all(
                    "article img", "els => els.map(e => ({src: e.currentSrc || e.src, ok: e.complete && "
                    "e.naturalWidth > 0}))")
                links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
                results[page_file.name] = {
                    "status": response.status if response else None,
                    "title": page.title(),
                    "h1": page.eval_on_selector_all("article h1", "els => els.map(e => e.textContent)"),
                    "images": images, "links": links, "errors": errors, "failed": failed,
                    "partner": page.eval_on_selector_all("a.partner", "els => els.map(e => e.href)"),
                }
                page.close()
        finally:
            browser.close()
    return results


def chapter_pages(visits: dict[str, dict]) -> dict[Path, str]:
    """Each chapter and solutions notebook, mapped to the page whose <h1> is its title."""
    notebooks = build_site.chapters() + sorted((ROOT / "notebooks" / "solutions").glob("*_solutions.ipynb"))
    pages = {}
    for notebook in notebooks:
        title = notebook_title(notebook)
        found = [name for name, visit in visits.items() if visit["h1"] == [title]]
        assert len(found) == 1, f"{notebook.name}: expected one page titled {title!r}, found {found}"
        pages[notebook] = found[0]
    return pages


def test_every_page_loads_with_its_title(visits: dict[str, dict]) -> None:
    assert "index.html" in visits
    for name, visit in visits.items():
        assert visit["status"] == 200, name
        assert visit["title"].strip() and len(visit["h1"]) == 1, f"{name}: no title"
    assert visits["index.html"]["h1"] == ["Phi-3 LoRA Lab"], "the README is the front page"


def test_chapters_in_order_with_figures_and_solutions(site: Path, visits: dict[str, dict]) -> None:
    pages = chapter_pages(visits)
    sidebar = [Path(urllib.parse.urlparse(link).path).name for link in visits["index.html"]["links"]]
    chapters = build_site.chapters()
    positions = [sidebar.index(pages[chapter]) for chapter in chapters]
    assert positions == sorted(positions), "chapters out of order in the table of contents"
    for notebook, name in pages.items():
        visit = visits[name]
        figures = [image for image in visit["images"] if COLAB_BADGE not in image["src"]]
        assert len(figures) == stored_figures(notebook), f"{name}: figures on the page vs in {notebook.name}"
        assert all(image["ok"] for image in figures), f"{name}: a figure did not load"
    for chapter in chapters:
        solutions = ROOT / "notebooks" / "solutions" / f"{chapter.stem}_solutions.ipynb"
        if solutions.exists():
            partner = [Path(urllib.parse.urlparse(link).path).name for link in visits[pages[chapter]]["partner"]]
            assert partner == [pages[solutions]], f"{chapter.name}: its solutions are not one click away"


def test_teaching_guide_is_part_of_the_site(visits: dict[str, dict]) -> None:
    guide = sorted((ROOT / "docs" / "teaching").glob("*.md"))
    assert guide, "docs/teaching/ is empty"
    titles = {visit["h1"][0] for visit in visits.values()}
    for page in guide:
        title = re.search(r"^# (.+)$", page.read_text(), re.M).group(1).strip()
        assert title in titles, f"{page.name} ({title!r}) is not in the site"


def test_no_broken_internal_link_or_missing_image(site: Path, server: str, visits: dict[str, dict]) -> None:
    for name, visit in visits.items():
        for link in visit["links"]:
            if not link.startswith(server):
                continue
            target = site / urllib.parse.unquote(urllib.parse.urlparse(link).path).lstrip("/")
            assert target.is_file(), f"{name}: broken internal link {link}"
            fragment = urllib.parse.urlparse(link).fragment
            if fragment and target.suffix == ".html":
                assert f'id="{fragment}"' in target.read_text(), f"{name}: no anchor #{fragment} in {target.name}"
        missing = [i["src"] for i in visit["images"] if not i["ok"] and COLAB_BADGE not in i["src"]]
        assert not missing, f"{name}: images that did not load: {missing}"
        failed = [url for url in visit["failed"] if COLAB_BADGE not in url]
        assert not failed, f"{name}: requests that failed: {failed}"


def test_no_console_error_but_the_offline_colab_badge(visits: dict[str, dict]) -> None:
    for name, visit in visits.items():
        if any(COLAB_BADGE in image["src"] and not image["ok"] for image in visit["images"]):
            assert any(COLAB_BADGE in e for e in visit["errors"]), f"{name}: the badge failed, yet no console error"
        unexplained = [e for e in visit["errors"] if not ("Failed to load resource" in e and COLAB_BADGE in e)]
        assert not unexplained, f"{name}: console errors: {unexplained}"
