"""Every citation of the authors' code resolves inside the repository: ``docs/authors-code.md §N.M`` names a
section heading of that document, and nothing points at a document that a clone does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "authors-code.md"
CITATION = re.compile(r"authors-code\.md\)? §(\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?:(?:, | / )\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?)*)")
OUTSIDE = re.compile(r"\bspec(?:ification)?(?: section)? \d|ARCHITECTURE\.md|reference-behaviour\.md")
# The deliberate uses of the outside document: cross-checks of docs/iccv_table1.json and docs/tpami_tables.json,
# skipped without it.
ALLOWED_OUTSIDE = {"tests/test_reproduce_iccv.py", "tests/test_reproduce_tpami.py", "tests/test_citations.py"}


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    suffixes = {".py", ".md", ".yaml", ".yml", ".sh", ".json", ".toml"}
    return [ROOT / name for name in listed if Path(name).suffix in suffixes and (ROOT / name).is_file()]


def sections() -> set[str]:
    found = set()
    for line in DOC.read_text().splitlines():
        match = re.match(r"#{2,3} (\d+(?:\.\d+)?)\.? ", line)
        if match:
            found.add(match.group(1))
    return found


def cited(text: str) -> list[str]:
    numbers = []
    for match in CITATION.finditer(text):
        for part in re.split(r", | / ", match.group(1)):
            numbers.extend(part.split("-"))
    return numbers


def test_every_citation_names_a_section():
    known = sections()
    assert {"1.1", "4", "9.1", "9.46", "10.1"} <= known, "docs/authors-code.md lost its numbered sections"
    wrong, count = [], 0
    for path in tracked_text_files():
        for number in cited(path.read_text(errors="replace")):
            count += 1
            if number not in known:
                wrong.append(f"{path.relative_to(ROOT)}: §{number}")
    assert count > 100, f"only {count} citations found: the pattern no longer matches how the code cites"
    assert not wrong, "citations of sections docs/authors-code.md does not have:\n" + "\n".join(wrong)


def test_nothing_points_outside_the_repository():
    wrong = [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
             for path in tracked_text_files() if str(path.relative_to(ROOT)) not in ALLOWED_OUTSIDE
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not wrong, "\n".join(wrong)


def test_the_citation_pattern():
    assert cited("(docs/authors-code.md §7.4, 8.5, 9.40) and docs/authors-code.md §9.1-9.2") == \
        ["7.4", "8.5", "9.40", "9.1", "9.2"]
    assert cited("[docs/authors-code.md](docs/authors-code.md) §7.5 / 9.35") == ["7.5", "9.35"]
