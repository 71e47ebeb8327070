"""Prompt lists for text-to-image backends: text files (one prompt per line) or CSV files with a
``text``/``prompt``/``caption`` column. One reader for ``sample.py``, both trainers and the scoring CLI."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["read_prompts"]


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts of ``path``: a CSV column when the file ends in ``.csv`` or ``column`` is given (``column``,
    else the first of text/prompt/caption: the MS-COCO caption CSVs the authors use have ``text``), otherwise
    its lines. Surrounding whitespace is stripped and blank entries are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() == ".csv" or column:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            names = reader.fieldnames or []
            choices = [column] if column else ["text", "prompt", "caption"]
            name = next((c for c in choices if c in names), None)
            if name is None:
                raise ValueError(f"{path}: CSV needs a {' or '.join(repr(c) for c in choices)} column (has {names})")
            prompts = [(row[name] or "").strip() for row in reader]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
