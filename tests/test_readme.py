"""What README.md states about the code itself: the read path's files and sizes, and the links to
docs/, checked against the tree (a trim or a merge that forgets the README fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_read_path_sizes_are_the_files_line_counts():
    section = README.split("## The read path", 1)[1].split("\n## ", 1)[0]
    files = re.findall(r"^\| ((?:train|data)/\S+\.py) \((\d+)\) \|", section, re.M)
    assert len(files) >= 10
    for path, lines in files:
        assert len((ROOT / path).read_text().splitlines()) == int(lines), path
    count, total = re.search(r"\((\d+) files, ([\d,]+) lines\)", section).groups()
    assert int(count) == len(files)
    assert int(total.replace(",", "")) == sum(int(n) for _, n in files)


def test_linked_docs_exist():
    links = set(re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", README))
    assert "docs/architecture.md" in links
    for link in links:
        assert (ROOT / link).is_file(), link
