"""Every file the README and docs/ point to exists: markdown links, and the docs/, scripts/ and top-level
files they name in backticks."""
import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)\)")  # [text](target), not a web address (filtered below)
NAMED_FILE = re.compile(r"`((?:docs|scripts)/[\w./-]+|[a-z_]+\.(?:py|cpp))`")  # `docs/x.md`, `model.py`


def pointed_to(page) -> list:
    text = page.read_text()
    links = [(page.parent / target) for target in LINK.findall(text) if "://" not in target]
    named = [ROOT / name for name in NAMED_FILE.findall(text)]
    return links + named


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_file_a_page_points_to_exists(page):
    missing = [str(path.relative_to(ROOT)) for path in pointed_to(page) if not path.resolve().exists()]
    assert not missing, f"{page.name} points to files that do not exist: {missing}"


def test_the_check_finds_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [the notes](notes.md) and `scripts/no_such_script.py`.")
    assert [path.name for path in pointed_to(page) if not path.exists()] == ["notes.md", "no_such_script.py"]
