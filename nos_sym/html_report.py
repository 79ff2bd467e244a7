"""Self-contained HTML report pages: titled sections of escaped text, tables, figures and math
typeset to inline SVG at build time, and the images and Markdown tables of an output directory.

A page fetches nothing (no script, no font, no stylesheet, no image by URL), so the single file
works offline and when moved. Commands build their sections with the helpers here and hand them
to :func:`build_html` / :func:`write_html`; a command that only writes files into a directory
(plots, ``*.md`` tables) gets a page of them from :func:`write_outputs_html`.

Text is escaped unless it is an :class:`Html` fragment made by this module.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
import xml.etree.ElementTree as etree
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import markdown
from markdown.extensions import Extension
from markdown.inlinepatterns import InlineProcessor
from markdown.treeprocessors import Treeprocessor

__all__ = [
    "Html",
    "Section",
    "build_html",
    "escape",
    "figure_html",
    "figure_svg",
    "image_html",
    "markdown_html",
    "math_html",
    "outputs_section",
    "table_html",
    "write_html",
    "write_outputs_html",
]

IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}


class Html(str):
    """A fragment of HTML built by this module: inserted as it is, never escaped again."""


def escape(value: object) -> Html:
    """``value`` as HTML: an :class:`Html` fragment as it is, anything else as escaped text."""
    return value if isinstance(value, Html) else Html(html.escape(str(value)))


@dataclass(frozen=True)
class Section:
    """One titled part of a page; ``body`` is text or an :class:`Html` fragment."""

    title: str
    body: Html | str


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #111827; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #e5e7eb; padding-bottom: .2rem;
     margin-top: 2rem; }
h3 { font-size: 1.05rem; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #d1d5db; padding: .3rem .6rem; text-align: left;
         vertical-align: middle; }
th { background: #f3f4f6; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, monospace; font-size: .9em; }
code.key { font-size: .75em; word-break: break-all; color: #4b5563; }
svg, img { max-width: 100%; height: auto; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top; }
figcaption { font-size: .85rem; color: #4b5563; max-width: 40rem; }
figure.tree svg { zoom: .7; }  /* every tree at one scale */
.math { display: inline-block; vertical-align: middle; }
.note { color: #4b5563; }
"""


def _anchor(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    anchor, number = base, 1
    while anchor in used:
        number += 1
        anchor = f"{base}-{number}"
    used.add(anchor)
    return anchor


def build_html(title: str, sections: Iterable[Section], intro: Html | str = "") -> str:
    """One self-contained HTML5 page: ``title``, an optional ``intro`` paragraph, a table of
    contents and the sections in order."""
    sections = list(sections)
    used: set[str] = set()
    anchors = [_anchor(section.title, used) for section in sections]
    nav = " ".join(
        f'<a href="#{a}">{escape(s.title)}</a>' for a, s in zip(anchors, sections, strict=True)
    )
    body = "\n".join(
        f'<section id="{a}">\n<h2>{escape(s.title)}</h2>\n{escape(s.body)}\n</section>'
        for a, s in zip(anchors, sections, strict=True)
    )
    lead = f'<p class="note">{escape(intro)}</p>\n' if intro else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon request
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n{lead}<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def write_html(
    path: str | Path, title: str, sections: Iterable[Section], intro: Html | str = ""
) -> Path:
    """Write :func:`build_html`'s page to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(build_html(title, sections, intro), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Tables, figures, math
# --------------------------------------------------------------------------------------------
def table_html(
    header: Sequence[object], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()
) -> Html:
    """A table; cells are text or :class:`Html`; the columns ``numeric`` are right-aligned."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    lines = [
        "<tr>"
        + "".join(
            f'<td class="number">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    ]
    return Html(
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(lines)
        + "\n</tbody>\n</table>"
    )


_SVG_REFERENCE = re.compile(r'(\bid="|href="#|url\(#)')


def _inline_svg(svg: str, css_class: str = "") -> Html:
    """SVG text as an element of the page: without the XML prologue and metadata, its ids
    prefixed by a digest of the picture so that pictures on one page never share an id."""
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
    prefix = "s" + hashlib.sha256(svg.encode()).hexdigest()[:10] + "-"
    svg = _SVG_REFERENCE.sub(lambda match: match.group(1) + prefix, svg)
    if css_class:
        svg = svg.replace("<svg", f'<svg class="{css_class}"', 1)
    return Html(svg.strip())


def _svg_context():
    import matplotlib

    # paths, not fonts, for text (the page must not depend on installed fonts); fixed ids
    return matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "nos_sym"})


def figure_svg(figure) -> Html:
    """A matplotlib ``Figure`` as inline SVG."""
    buffer = io.StringIO()
    with _svg_context():
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return _inline_svg(buffer.getvalue())


def math_html(latex: str, size: float = 16.0) -> Html:
    r"""LaTeX math (without ``$``) typeset by matplotlib's mathtext to inline SVG, whose
    ``<title>`` is the source; what mathtext cannot typeset is shown as its source in ``<code>``."""
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties

    buffer = io.BytesIO()
    try:
        with _svg_context():
            mathtext.math_to_image(
                f"${latex}$", buffer, prop=FontProperties(size=size), format="svg"
            )
    except ValueError:  # mathtext's parse errors
        return Html(f'<code class="math-source">{escape(latex)}</code>')
    svg = _inline_svg(buffer.getvalue().decode(), css_class="math")
    opened = svg.index(">") + 1
    return Html(f"{svg[:opened]}<title>{escape(latex)}</title>{svg[opened:]}")


def figure_html(content: Html | str, caption: str, css_class: str = "") -> Html:
    """``content`` (an inline SVG, an image) in a ``<figure>`` with a caption."""
    kind = f' class="{escape(css_class)}"' if css_class else ""
    return Html(
        f"<figure{kind}>{escape(content)}<figcaption>{escape(caption)}</figcaption></figure>"
    )


def image_html(path: str | Path, caption: str | None = None) -> Html:
    """A PNG or SVG file embedded as a ``data:`` URI (an SVG file from elsewhere is shown as an
    image, never inlined: it cannot run scripts or fetch anything there), with a caption
    (default: the file's name)."""
    path = Path(path)
    label = path.name if caption is None else caption
    return figure_html(Html(f'<img src="{_data_uri(path)}" alt="{escape(label)}">'), label)


def _data_uri(path: Path) -> str:
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot embed {path}: not a {' or '.join(IMAGE_TYPES)} file")
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
class _Math(InlineProcessor):
    """``$...$`` typeset by :func:`math_html`."""

    def handleMatch(self, match, data):  # noqa: N802 (Markdown's API)
        return self.md.htmlStash.store(math_html(match.group(1))), match.start(0), match.end(0)


class _Adapt(Treeprocessor):
    """Fit a Markdown file into a page section: its headings below the section's, local images
    as ``data:`` URIs (remote or missing ones as their alt text), links only to a web, mail or
    relative address."""

    def __init__(self, md, root: Path | None, embedded: set[Path]):
        super().__init__(md)
        self.root, self.embedded = root, embedded

    def _local(self, source: str) -> Path | None:
        if self.root is None or re.match(r"^[a-z][a-z0-9+.-]*:", source, re.IGNORECASE):
            return None
        path = (self.root / source).resolve()
        inside = path.is_relative_to(self.root.resolve())
        return path if inside and path.is_file() and path.suffix.lower() in IMAGE_TYPES else None

    def run(self, root):
        for parent in root.iter():
            for index, child in enumerate(list(parent)):
                if re.fullmatch("h[1-6]", child.tag):
                    child.tag = f"h{min(6, int(child.tag[1]) + 3)}"
                elif child.tag == "img":
                    local = self._local(child.get("src", ""))
                    if local is None:
                        text = etree.Element("span")
                        text.text, text.tail = f"[{child.get('alt', 'image')}]", child.tail
                        parent[index] = text
                    else:
                        child.set("src", _data_uri(local))
                        self.embedded.add(local)
                elif child.tag == "a" and re.match(
                    r"^(?!https?:|mailto:)[a-z][a-z0-9+.-]*:", child.get("href", ""), re.I
                ):
                    del child.attrib["href"]


class _ReportMarkdown(Extension):
    """Tables, ``$math$``, no raw HTML (shown as text), fitted to the page (:class:`_Adapt`)."""

    def __init__(self, root: Path | None, embedded: set[Path]):
        super().__init__()
        self.root, self.embedded = root, embedded

    def extendMarkdown(self, md):  # noqa: N802 (Markdown's API)
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.inlinePatterns.register(_Math(r"(?<![\\$])\$([^$\n]+)\$", md), "math", 175)
        md.treeprocessors.register(_Adapt(md, self.root, self.embedded), "adapt", 0)


def markdown_html(
    text: str, root: str | Path | None = None, embedded: set[Path] | None = None
) -> Html:
    """Markdown (tables, ``$math$``) as HTML. Raw HTML in ``text`` is shown as text; an image
    at a path relative to ``root`` is embedded (and added to ``embedded``), other images are
    replaced by their alt text, so the page fetches nothing."""
    extension = _ReportMarkdown(
        None if root is None else Path(root), set() if embedded is None else embedded
    )
    return Html(markdown.markdown(text, extensions=["tables", extension]))


# --------------------------------------------------------------------------------------------
# An output directory
# --------------------------------------------------------------------------------------------
def outputs_section(out_dir: str | Path, title: str = "Outputs") -> Section:
    """Every ``*.md`` file (rendered) and every PNG/SVG picture (embedded) under ``out_dir``,
    in path order; a picture that a Markdown file shows is not shown again."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: not a directory of outputs")
    files = sorted(
        path
        for path in out_dir.rglob("*")
        if path.is_file() and path.suffix.lower() in {".md", *IMAGE_TYPES}
    )
    embedded: set[Path] = set()
    rendered = {
        path: markdown_html(
            path.read_text(encoding="utf-8", errors="replace"), path.parent, embedded
        )
        for path in files
        if path.suffix.lower() == ".md"
    }
    parts = []
    for path in files:
        name = path.relative_to(out_dir).as_posix()
        if path in rendered:
            parts.append(
                f"<article>\n<h3><code>{escape(name)}</code></h3>\n{rendered[path]}\n</article>"
            )
        elif path.resolve() not in embedded:
            parts.append(image_html(path, name))
    if not parts:
        parts.append(f'<p class="note">no pictures or Markdown files in {escape(out_dir)}</p>')
    return Section(title, Html("\n".join(parts)))


def write_outputs_html(out_dir: str | Path, path: str | Path, title: str | None = None) -> Path:
    """A page of :func:`outputs_section` for ``out_dir``, written to ``path``."""
    out_dir = Path(out_dir)
    return write_html(path, title or f"outputs of {out_dir.name}", [outputs_section(out_dir)])
