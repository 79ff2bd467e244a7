"""The documentation: every relative link resolves, and the README stays a short front door."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
FRONT_COMMANDS = ("bash scripts/run.sh", "bash scripts/test.sh")

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', '-1'… for
    repeats."""
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        plain = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(plain, 0)
        seen[plain] = count + 1
        result.add(plain if count == 0 else f"{plain}-{count}")
    return result


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a Markdown page whose file (or heading) does not exist."""
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
            continue
        path_part, _, fragment = target.partition("#")
        path = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(root)})")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text()):
            broken.append(f"{target} (no heading #{fragment} in {path.relative_to(root)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_is_a_short_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    commands = [line.split("#")[0].strip() for line in lines if line.startswith("bash ")]
    assert tuple(commands[:2]) == FRONT_COMMANDS
    first_command = next(i for i, line in enumerate(lines) if line.startswith("bash "))
    assert not any(line.startswith("#") for line in lines[1:first_command]), (
        "the two commands come before any section"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# Shape of a rule", {"shape-of-a-rule"}),
        ("## Presets (`nos_sym.presets`)", {"presets-nos_sympresets"}),
        ("## Search runs (`nos-sym search`)", {"search-runs-nos-sym-search"}),
        ("## bench_step (cpu)\n## bench_step (cpu)", {"bench_step-cpu", "bench_step-cpu-1"}),
        ("```\n# not a heading\n```\n## Real", {"real"}),
    ],
)
def test_anchors_follow_github(text: str, expected: set[str]) -> None:
    assert anchors(text) == expected


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n[ok](#top) `[code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
        "[web](https://example.org/x) [bad](missing.md) [badanchor](#nowhere)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "missing.md (no file missing.md)",
        "#nowhere (no heading #nowhere in page.md)",
    ]
