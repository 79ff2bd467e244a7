"""The self-contained HTML report: its structure (html.parser), math for every preset, the
outputs of a directory, and the page in a real headless Chromium."""

from __future__ import annotations

import collections
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nos_sym.controller.report import run_sections, write_report_html
from nos_sym.controller.search import leaderboard
from nos_sym.dsl import parse
from nos_sym.html_report import (
    Html,
    Section,
    build_html,
    escape,
    markdown_html,
    math_html,
    outputs_section,
    table_html,
    write_html,
    write_outputs_html,
)
from nos_sym.presets import PRESETS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Page(HTMLParser):
    """What a test needs to know about a page: its elements in order with their attributes,
    the id attributes, the ancestors of each element, and the text."""

    VOID = {"meta", "link", "img", "br", "hr", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict, tuple[str, ...]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(self.stack)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(self.stack)))

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        self.text.append(data)

    def count(self, tag: str, inside: str | None = None) -> int:
        return sum(t == tag and (inside is None or inside in s) for t, _, s in self.elements)

    def attributes(self, name: str) -> list[str]:
        return [a[name] for _, a, _ in self.elements if a.get(name) is not None]


def _section(html: str, anchor: str) -> str:
    start = html.index(f'<section id="{anchor}">')
    return html[start : html.index("</section>", start)]


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """An output directory as a later command would leave it: a PNG, an SVG, a Markdown table
    that shows the PNG and has math, raw HTML and a remote image, and a nested folder."""
    from matplotlib.figure import Figure

    out = tmp_path / "outputs"
    (out / "nested").mkdir(parents=True)
    figure = Figure(figsize=(2, 1.5))
    figure.subplots().plot([0, 1, 2], [0.2, 0.6, 0.7])
    figure.savefig(out / "curve.png", dpi=50)
    figure.savefig(out / "nested" / "curve.svg")
    (out / "table.md").write_text(
        "# Transfer\n\n| rule | Δ | reward |\n| --- | --- | --- |\n"
        "| `m v id sqrt div` | $\\hat{m}$ | 0.82 |\n| <script>alert(1)</script> | x | 0.1 |\n\n"
        "![the curve](curve.png) ![remote](https://example.org/a.png) [bad](javascript:alert(1))\n"
    )
    return out


# --------------------------------------------------------------------------------------------
# The run's page
# --------------------------------------------------------------------------------------------
def test_run_page_structure(run_dir, tmp_path):
    path = write_report_html(run_dir, tmp_path / "report.html")
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    board = leaderboard(run_dir, n=10)
    leader = Page(_section(html, "leaderboard"))
    # a row per distinct non-degenerate rule, an <svg> of Δ in each, its key and minimal DSL
    assert leader.count("tr", inside="tbody") == len(board) == 6
    assert leader.count("svg", inside="td") == len(board)
    for entry in board:
        assert entry["key"] in html and escape(parse(entry["dsl"]).dsl) in html
    # accounting: samples = evaluated + from_store + degenerate
    assert "8 = 6 + 1 + 1" in _section(html, "accounting")
    assert Page(_section(html, "reward-per-controller-step")).count("svg") == 1
    assert Page(_section(html, "best-rules-trees")).count("svg") == 3
    assert "synthetic" in _section(html, "config")
    # self-contained: no script, nothing fetched by URL, no id twice, the run's name escaped
    assert page.count("script") == 0
    links = page.attributes("src") + page.attributes("href")
    assert not [link for link in links if link.startswith(("http:", "https:", "//"))]
    ids = collections.Counter(page.attributes("id"))
    assert not [name for name, times in ids.items() if times > 1]
    assert "<b>" not in html and "search run run <b>&amp;" in "".join(page.text)


def test_empty_run_page(run_dir, tmp_path):
    (run_dir / "samples.jsonl").write_text("")
    html = write_report_html(run_dir, tmp_path / "empty.html").read_text(encoding="utf-8")
    assert html.count("no rule evaluated yet") == 2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_typesets_to_svg(name):
    latex = parse(PRESETS[name]).latex()
    fragment = math_html(latex)
    assert fragment.startswith("<svg") and f"<title>{escape(latex)}</title>" in fragment


@pytest.mark.parametrize(
    "latex, shown",
    [
        (r"\notamacro{x}", r"\notamacro{x}"),  # mathtext cannot: the source, in <code>
        (r"\frac{<}{", r"\frac{&lt;}{"),  # unbalanced, and escaped
    ],
)
def test_math_that_mathtext_cannot_typeset_is_shown_as_source(latex, shown):
    assert math_html(latex) == f'<code class="math-source">{shown}</code>'


# --------------------------------------------------------------------------------------------
# The page builder
# --------------------------------------------------------------------------------------------
def test_text_is_escaped_and_fragments_are_not():
    page = build_html(
        "a <title> & more",
        [
            Section("<i>text</i>", "<b>text</b>"),
            Section("a table", table_html(["<h>"], [["<c>"], [Html("<em>kept</em>")]])),
        ],
    )
    assert "<b>" not in page and "&lt;b&gt;text&lt;/b&gt;" in page
    assert "<title>a &lt;title&gt; &amp; more</title>" in page
    assert "<th>&lt;h&gt;</th>" in page and "<td>&lt;c&gt;</td>" in page
    assert "<td><em>kept</em></td>" in page


def test_sections_get_distinct_anchors(tmp_path):
    path = write_html(tmp_path / "p.html", "t", [Section("Same", "1"), Section("Same", "2")])
    assert Page(path.read_text()).attributes("id") == ["same", "same-2"]


def test_markdown_tables_math_and_no_raw_html(outputs):
    embedded: set[Path] = set()
    fragment = markdown_html((outputs / "table.md").read_text(), outputs, embedded)
    page = Page(fragment)
    assert page.count("table") == 1 and page.count("tr", inside="tbody") == 2
    assert page.count("svg", inside="td") == 1  # $\hat{m}$
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment
    sources = page.attributes("src")
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert "example.org" not in fragment and "[remote]" in fragment  # a remote image is not fetched
    assert "javascript:" not in fragment
    assert embedded == {(outputs / "curve.png").resolve()}


def test_outputs_page_embeds_every_picture_once(outputs, tmp_path):
    html = write_outputs_html(outputs, tmp_path / "outputs.html").read_text(encoding="utf-8")
    page = Page(html)
    sources = page.attributes("src")
    assert sorted(source.split(";")[0] for source in sources) == [
        "data:image/png",  # curve.png, shown by table.md, not again
        "data:image/svg+xml",  # nested/curve.svg, as an image (never inlined)
    ]
    assert "nested/curve.svg" in html and "<h3><code>table.md</code></h3>" in html


def test_outputs_of_a_missing_directory(tmp_path):
    with pytest.raises(NotADirectoryError, match="nowhere: not a directory"):
        outputs_section(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no pictures or Markdown files" in outputs_section(empty).body


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------
def test_page_in_headless_chromium(run_dir, outputs, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup_browser.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra)")
    path = write_html(
        tmp_path / "report.html",
        "a run and its outputs",
        [*run_sections(run_dir), outputs_section(outputs)],
    )
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on(
                "request",
                lambda r: r.url.startswith(("file:", "data:")) or problems.append(r.url),
            )
            page.goto(path.as_uri(), wait_until="load")
            boxes = page.eval_on_selector_all(
                "svg, img",
                """nodes => nodes.map(node => {
                    const box = node.getBoundingClientRect();
                    const loaded = node.tagName !== 'IMG' || node.naturalWidth > 0;
                    return [node.closest('section').id, box.width, box.height, loaded];
                })""",
            )
            page.screenshot(path=tmp_path / "report.png", full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert len(boxes) == 6 + 1 + 3 + 1 + 2  # Δ per rule, the curve, 3 trees, $\hat{m}$, 2 images
    assert [box for box in boxes if not (box[1] > 0 and box[2] > 0 and box[3])] == []
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_rows_carry_the_minimal_form_and_markdown_escapes_bars(run_dir):
    from nos_sym.controller.rundir import leaderboard, leaderboard_markdown
    from nos_sym.dsl import parse

    rows = leaderboard(run_dir, 50)
    assert rows and all(row["minimal_dsl"] == parse(row["dsl"]).minimal_dsl for row in rows)
    row = {**rows[0], "latex": r"\left|g\right|", "minimal_dsl": "g g abs id keep"}
    table = leaderboard_markdown([row]).splitlines()
    assert table[2].count(" | ") == 4 and r"\left\|g\right\|" in table[2]
