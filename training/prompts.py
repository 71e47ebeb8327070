"""Prompt lists: text files (one prompt per line) or CSV files with a ``text``/``prompt``/``caption`` column."""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["read_prompts"]


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Lines of a .txt file (blank lines skipped), or a .csv column: ``column`` if given, else the first of
    text/prompt/caption (the MS-COCO caption CSVs the authors use have ``text``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            names = reader.fieldnames or []
            choices = [column] if column else ["text", "prompt", "caption"]
            name = next((c for c in choices if c in names), None)
            if name is None:
                raise ValueError(f"{path}: CSV needs a {' or '.join(repr(c) for c in choices)} column (has {names})")
            prompts = [row[name] for row in reader]
    else:
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
