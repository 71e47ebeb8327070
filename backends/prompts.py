"""Prompt lists for text-to-image backends: text files (one prompt per line) or CSV files with a
``text``/``prompt``/``caption`` column. One reader for ``sample.py``, both trainers and the scoring CLI."""

from __future__ import annotations

import csv
import io
from pathlib import Path

__all__ = ["read_prompts", "MAX_PROMPT_FILE_BYTES"]

#: MS-COCO's 30k-caption CSV is about 2 MB; a prompt file is read whole, so it is bounded.
MAX_PROMPT_FILE_BYTES = 256 << 20


def shown_prompt(prompt: object, limit: int = 60) -> str:
    """A prompt quoted for an error message, cut to ``limit`` characters (a prompt file can hold one 60 MB line)."""
    text = str(prompt)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts of ``path``: a CSV column when the file ends in ``.csv`` or ``column`` is given (``column``,
    else the first of text/prompt/caption: the MS-COCO caption CSVs the authors use have ``text``), otherwise
    its lines. Surrounding whitespace is stripped and blank entries are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise ValueError(f"{path}: a prompt file of {path.stat().st_size} bytes is over the "
                         f"{MAX_PROMPT_FILE_BYTES >> 20} MiB limit")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); save the prompt file as UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"{path}: holds NUL bytes (byte {text.index(chr(0))}); a prompt file is UTF-8 text")
    if path.suffix.lower() == ".csv" or column:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        names = reader.fieldnames or []
        choices = [column] if column else ["text", "prompt", "caption"]
        name = next((c for c in choices if c in names), None)
        if name is None:
            raise ValueError(f"{path}: CSV needs a {' or '.join(repr(c) for c in choices)} column (has {names})")
        try:
            prompts = [(row[name] or "").strip() for row in reader]
        except csv.Error as err:
            raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
