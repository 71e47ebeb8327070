"""One error convention for every entry point (docs/errors.md).

A user error (a bad argument, a missing or hostile file, an option the model does not take) ends the program
with exit status 2 and one ``error:`` line that names the argument or file. A traceback is left for real bugs,
or shown on request with ``--debug`` (or ``EPD_DEBUG=1``). Ctrl-C ends with status 130 and one line; a
closed output pipe (``| head``) ends quietly with status 141.

Every library error that means "the input is wrong" is a :class:`ValueError` (``TableError``, ``LimitError``,
``ConfigError``, ``CheckpointError``, ``ScoreError``), an :class:`OSError` (missing weights are a
``FileNotFoundError`` naming the path), a ``KeyError`` from a registry lookup or an ``UnsafePickleError``.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
import sys
from typing import Any, Callable, Iterable, NoReturn, TypeVar

__all__ = ["ArgumentParser", "USER_ERRORS", "entry_point", "error_line", "debug_requested"]

#: What an entry point reports as one line; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, NotImplementedError,
                                                 pickle.UnpicklingError)

Main = TypeVar("Main", bound=Callable[..., int])


def error_line(err: BaseException) -> str:
    """``err`` as one ``error: ...`` line: newlines joined, an OSError's ``[Errno N]`` prefix and a KeyError's
    quotes dropped."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    elif isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    text = re.sub(r"^\[Errno \d+\] ", "", text)
    parts = [part.strip() for part in text.splitlines() if part.strip()]
    line = ""
    for part in parts:        # "a list:" + items reads as "a list: x; y", not "a list:; x; y"
        line += part if not line else (" " if line.endswith(":") else "; ") + part
    return "error: " + line


def debug_requested(argv: Iterable[str] | None = None) -> bool:
    """``--debug`` among the arguments (``sys.argv`` when ``argv`` is None) or ``EPD_DEBUG`` set to 1."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "--debug" in args or os.environ.get("EPD_DEBUG", "") not in ("", "0")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (what is wrong and where ``--help`` is) and which
    accepts ``--debug`` on every (sub)command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS as default: a subcommand's parser must not overwrite the flag given before the subcommand.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error instead of one line")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def entry_point(main: Main) -> Main:
    """Wrap ``main(argv=None, ...) -> int`` in the convention: user errors -> one line and 2, Ctrl-C -> 130."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        argv = args[0] if args else kwargs.get("argv")
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:       # the reader went away (``| head``): end quietly, as other tools do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        except KeyboardInterrupt:
            if debug_requested(argv):
                raise
            print("error: interrupted", file=sys.stderr)
            return 130
        except USER_ERRORS as err:
            if debug_requested(argv):
                raise
            print(error_line(err), file=sys.stderr)
            return 2

    return run  # type: ignore[return-value]
