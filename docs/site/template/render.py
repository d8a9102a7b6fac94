"""Render the workshop site from the MyST content server (the `render` hook of template.yml).

jupyter-book 2 parses the stored notebooks and markdown (it never executes them here), serves the result as JSON
at CONTENT_CDN, and runs this script with BUILD_DIRECTORY set. The script writes one static HTML page per
document, with a sidebar in the table of contents' order, each chapter's solutions one click away, and every
image and downloadable notebook copied under build/. Standard library only, so it runs offline anywhere; with
latex2mathml installed (requirements-site.txt) formulas become MathML.
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

CDN = os.environ["CONTENT_CDN"].rstrip("/")
OUT = Path(os.environ["BUILD_DIRECTORY"])
ASSETS = "build"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
UNKNOWN: set[str] = set()


def fetch(path: str) -> bytes:
    with urllib.request.urlopen(CDN + path, timeout=60) as response:
        return response.read()


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def math(tex: str, block: bool) -> str:
    """TeX as MathML, which browsers render natively (no script, nothing to download); as code without latex2mathml."""
    try:
        from latex2mathml.converter import convert

        rendered = convert(tex, display="block" if block else "inline")
    except Exception:  # noqa: BLE001 - not installed, or TeX it does not know: show the source
        return f'<pre class="math">{esc(tex)}</pre>' if block else f'<code class="math">{esc(tex)}</code>'
    return f'<div class="math">{rendered}</div>' if block else rendered



# MyST node kinds that become one HTML element around their children, and nothing more.
WRAPPED = {"tableRow": "tr", "blockquote": "blockquote", "details": "details", "summary": "summary",
           "container": "figure", "caption": "figcaption", "legend": "figcaption"}

class Site:
    """The pages, their slugs and where their sources live, from the content server's config.json."""

    def __init__(self, config: dict[str, Any]) -> None:
        project = config["projects"][0]
        self.title: str = project.get("title", "")
        self.repo: str = (project.get("github") or "").rstrip("/")
        self.index: str = project["index"]
        self.entries: list[dict[str, Any]] = [{"slug": self.index, "level": 0}] + [
            page for page in project.get("pages", []) if page.get("slug")
        ]
        self.docs: dict[str, dict[str, Any]] = {}
        for entry in self.entries:
            self.docs[entry["slug"]] = json.loads(fetch(f"/content/{entry['slug']}.json"))
            entry["title"] = self.docs[entry["slug"]]["frontmatter"].get("title") or entry.get("title") or entry["slug"]
        self.by_location = {doc["location"]: slug for slug, doc in self.docs.items()}
        self.copied: dict[str, str] = {}

    def href(self, slug: str) -> str:
        return "index.html" if slug == self.index else f"{slug}.html"

    def asset(self, url: str) -> str:
        """Copy a file the content server holds (an image, a notebook) under build/ and return its relative URL."""
        if url not in self.copied:
            name = posixpath.basename(urllib.parse.urlparse(url).path)
            (OUT / ASSETS).mkdir(parents=True, exist_ok=True)
            (OUT / ASSETS / name).write_bytes(fetch(url))
            self.copied[url] = f"{ASSETS}/{name}"
        return self.copied[url]

    def partner(self, slug: str) -> tuple[str, str] | None:
        """A chapter's solutions page or a solutions page's chapter: (slug, label), or None."""
        location = self.docs[slug]["location"]
        match = re.fullmatch(r"/notebooks/(\d\d_\w+?)\.ipynb", location)
        if match:
            other = self.by_location.get(f"/notebooks/solutions/{match.group(1)}_solutions.ipynb")
            return (other, "Solutions to this chapter's exercises") if other else None
        match = re.fullmatch(r"/notebooks/solutions/(\d\d_\w+?)_solutions\.ipynb", location)
        if match:
            other = self.by_location.get(f"/notebooks/{match.group(1)}.ipynb")
            return (other, "Back to the chapter") if other else None
        return None


class Renderer:
    """MyST AST (mdast) to HTML for one page."""

    def __init__(self, site: Site, slug: str) -> None:
        self.site = site
        self.slug = slug
        self.location = site.docs[slug]["location"]

    def link(self, node: dict[str, Any]) -> str:
        url: str = node.get("url", "")
        source: str = node.get("urlSource", url)
        if node.get("internal") or node["type"] == "crossReference":
            page, _, fragment = url.partition("#")
            target = page.lstrip("/") or self.slug
            if target in self.site.docs:
                anchor = fragment or (node.get("html_id", "") if node["type"] == "crossReference" else "")
                return self.site.href(target) + (f"#{anchor}" if anchor else "")
        if re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("#"):
            return url
        # A file of the repository that is not a page of the site: link to it in the repository.
        base = posixpath.dirname(self.location)
        path = posixpath.normpath(posixpath.join(base, source)).lstrip("/")
        return f"{self.site.repo}/blob/main/{path}" if self.site.repo else source

    def image(self, node: dict[str, Any]) -> str:
        url = node.get("url", "")
        if url in ("", "/undefined") or not url.startswith("/"):
            src = node.get("urlSource", url)  # a remote image mystmd could not fetch offline (the Colab badge)
        else:
            src = self.site.asset(url)
        alt = esc(node.get("alt", ""))
        width = f' style="width:{esc(node["width"])}"' if node.get("width") else ""
        return f'<img src="{esc(src)}" alt="{alt}"{width}>'

    def output(self, node: dict[str, Any]) -> str:
        data = node.get("jupyter_data") or {}
        kind = data.get("output_type")
        if kind == "stream":
            text = ANSI.sub("", data.get("text", ""))
            css = "stderr" if data.get("name") == "stderr" else "stdout"
            return f'<pre class="output {css}">{esc(text)}</pre>'
        if kind == "error":
            text = ANSI.sub("", "\n".join(data.get("traceback", [])))
            return f'<pre class="output error">{esc(text)}</pre>'
        bundle = data.get("data") or {}
        for mime in ("image/png", "image/jpeg", "image/svg+xml", "image/gif"):
            if mime in bundle and bundle[mime].get("path"):
                return f'<div class="output image"><img src="{esc(self.site.asset(bundle[mime]["path"]))}" alt="figure output"></div>'
        if "text/html" in bundle:
            return f'<div class="output html">{bundle["text/html"].get("content", "")}</div>'
        if "text/markdown" in bundle:
            return f'<pre class="output">{esc(bundle["text/markdown"].get("content", ""))}</pre>'
        if "text/plain" in bundle:
            return f'<pre class="output">{esc(ANSI.sub("", bundle["text/plain"].get("content", "")))}</pre>'
        return ""

    def children(self, node: dict[str, Any]) -> str:
        return "".join(self.node(child) for child in node.get("children", []))

    def node(self, node: dict[str, Any]) -> str:  # noqa: C901 - one dispatch table, read top to bottom
        kind = node.get("type")
        inner = self.children
        if kind in ("root", "mystDirective", "mystRole", "include"):
            return inner(node)
        if kind == "block":
            css = "cell code" if node.get("kind") == "notebook-code" else "cell"
            first = (node.get("children") or [{}])[0]
            if first.get("type") == "code" and first.get("value", "").startswith("# Colab setup"):
                return f'<details class="{css}"><summary>The Colab setup cell (does nothing outside Colab)</summary>{inner(node)}</details>'
            return f'<div class="{css}">{inner(node)}</div>'
        if kind == "heading":
            depth = min(max(int(node.get("depth", 2)), 1), 6)
            ident = node.get("html_id") or node.get("identifier")
            attr = f' id="{esc(ident)}"' if ident else ""
            return f"<h{depth}{attr}>{inner(node)}</h{depth}>"
        if kind == "paragraph":
            return f"<p>{inner(node)}</p>"
        if kind == "text":
            return esc(node.get("value", ""))
        if kind in ("emphasis", "strong", "delete", "subscript", "superscript", "underline", "smallcaps"):
            tag = {"emphasis": "em", "strong": "strong", "delete": "del", "subscript": "sub",
                   "superscript": "sup", "underline": "u", "smallcaps": "span"}[kind]
            return f"<{tag}>{inner(node)}</{tag}>"
        if kind == "inlineCode":
            return f"<code>{esc(node.get('value', ''))}</code>"
        if kind == "code":
            lang = esc(node.get("lang", ""))
            return f'<pre class="source"><code class="language-{lang}">{esc(node.get("value", ""))}</code></pre>'
        if kind in ("link", "crossReference"):
            href = self.link(node)
            external = ' rel="noopener"' if href.startswith("http") else ""
            return f'<a href="{esc(href)}"{external}>{inner(node)}</a>'
        if kind == "image":
            return self.image(node)
        if kind == "list":
            tag = "ol" if node.get("ordered") else "ul"
            start = f' start="{int(node["start"])}"' if node.get("ordered") and node.get("start", 1) != 1 else ""
            return f"<{tag}{start}>{inner(node)}</{tag}>"
        if kind == "listItem":
            if node.get("checked") is not None:
                box = "&#9745; " if node["checked"] else "&#9744; "
                return f"<li>{box}{inner(node)}</li>"
            return f"<li>{inner(node)}</li>"
        if kind in WRAPPED:
            tag = WRAPPED[kind]
            return f"<{tag}>{inner(node)}</{tag}>"
        if kind == "table":
            return f'<div class="table"><table>{inner(node)}</table></div>'
        if kind == "tableCell":
            tag = "th" if node.get("header") else "td"
            align = f' style="text-align:{esc(node["align"])}"' if node.get("align") else ""
            return f"<{tag}{align}>{inner(node)}</{tag}>"
        if kind == "thematicBreak":
            return "<hr>"
        if kind == "break":
            return "<br>"
        if kind == "admonition":
            css = esc(node.get("kind", "note"))
            return f'<aside class="admonition {css}">{inner(node)}</aside>'
        if kind == "admonitionTitle":
            return f'<p class="admonition-title">{inner(node)}</p>'
        if kind in ("math", "inlineMath"):
            return math(node.get("value", ""), block=kind == "math")
        if kind == "html":
            return node.get("value", "")
        if kind == "outputs":
            return f'<div class="outputs">{inner(node)}</div>' if node.get("children") else ""
        if kind == "output":
            return self.output(node)
        if kind in ("comment", "mystComment", "mystTarget", "footnoteDefinition"):
            return ""
        if kind == "footnoteReference":
            return f"<sup>[{esc(node.get('label', ''))}]</sup>"
        if kind in ("definitionList",):
            return f"<dl>{inner(node)}</dl>"
        if kind == "definitionTerm":
            return f"<dt>{inner(node)}</dt>"
        if kind == "definitionDescription":
            return f"<dd>{inner(node)}</dd>"
        UNKNOWN.add(str(kind))
        if "value" in node and not node.get("children"):
            return esc(node["value"])
        return inner(node)


def sidebar(site: Site, current: str) -> str:
    items = []
    for entry in site.entries:
        css = ["level-%d" % entry.get("level", 1)]
        if entry["slug"] == current:
            css.append("current")
        items.append(f'<li class="{" ".join(css)}"><a href="{site.href(entry["slug"])}">{esc(entry["title"])}</a></li>')
    return f'<nav class="toc"><p class="site-title"><a href="index.html">{esc(site.title)}</a></p><ul>{"".join(items)}</ul></nav>'


def page(site: Site, position: int) -> str:
    slug = site.entries[position]["slug"]
    doc = site.docs[slug]
    front = doc["frontmatter"]
    title = front.get("title") or slug
    body = Renderer(site, slug).node(doc["mdast"])
    top = []
    partner = site.partner(slug)
    if partner:
        top.append(f'<a class="button partner" href="{site.href(partner[0])}">{esc(partner[1])} &rarr;</a>')
    for export in front.get("exports", []):
        if export.get("format") == "ipynb" and export.get("url"):
            top.append(f'<a class="button" href="{esc(site.asset(export["url"]))}" download="{esc(export.get("filename", ""))}">Download the notebook</a>')
    if doc.get("kind") == "Notebook":
        top.append('<span class="note">Outputs as stored in the repository and checked by CI (not re-executed for this site).</span>')
    bar = f'<div class="actions">{"".join(top)}</div>' if top else ""
    nav = []
    if position > 0:
        prev = site.entries[position - 1]
        nav.append(f'<a class="prev" href="{site.href(prev["slug"])}">&larr; {esc(prev["title"])}</a>')
    if position + 1 < len(site.entries):
        nxt = site.entries[position + 1]
        nav.append(f'<a class="next" href="{site.href(nxt["slug"])}">{esc(nxt["title"])} &rarr;</a>')
    heading = "" if front.get("content_includes_title") else f"<h1>{esc(title)}</h1>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · {esc(site.title)}</title>"
        f'<link rel="icon" href="data:,"><link rel="stylesheet" href="{ASSETS}/site.css"></head>'
        f'<body>{sidebar(site, slug)}<main><article class="{esc(doc.get("kind", "").lower())}">'
        f'{heading}{bar}{body}</article><footer class="pager">{"".join(nav)}</footer></main></body></html>\n'
    )


def main() -> int:
    site = Site(json.loads(fetch("/config.json")))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ASSETS).mkdir(parents=True, exist_ok=True)
    (OUT / ASSETS / "site.css").write_bytes((Path(__file__).parent / "site.css").read_bytes())
    for position, entry in enumerate(site.entries):
        (OUT / site.href(entry["slug"])).write_text(page(site, position), encoding="utf-8")
    report = f"render.py: wrote {len(site.entries)} pages and {len(site.copied)} files\n"
    if UNKNOWN:
        report += f"render.py: node types rendered by their children only: {', '.join(sorted(UNKNOWN))}\n"
    (OUT.parent / "render-report.txt").write_text(report)  # mystmd does not show a render command's output
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
