"""Test guard shared by the pickle-reader tests: while reading an untrusted pickle, nothing may execute code."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys

# Code-running entry points a malicious or persistence-style pickle would reach for.
_ENTRY_POINTS = [(builtins, "exec"), (builtins, "eval"), (builtins, "compile"), (os, "system"), (os, "popen"),
                 (os, "execv"), (os, "execve"), (subprocess, "Popen")]


def forbid_code_execution(monkeypatch, what: str) -> None:
    """Make exec/eval/compile/os.system/Popen/... and imports of new modules (or of the authors' packages
    ``torch_utils``, ``dnnlib``, ``training``) fail the test; call ``monkeypatch.undo()`` afterwards, before
    pytest itself needs compile/import to report."""
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name.split(".")[0] in ("torch_utils", "dnnlib", "training") or name not in sys.modules:
            raise AssertionError(f"reading a {what} imported {name!r}")
        return real_import(name, *args, **kwargs)

    def forbidden(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{name} was called while reading a {what}: {args!r:.200}")
        return refuse

    for target, attr in _ENTRY_POINTS:
        monkeypatch.setattr(target, attr, forbidden(f"{target.__name__}.{attr}"))
    monkeypatch.setattr(builtins, "__import__", guarded_import)
