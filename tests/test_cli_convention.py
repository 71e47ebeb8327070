"""The one error convention (safeio/cli.py, docs/errors.md): user errors are one line and exit 2, ``--debug``
shows the traceback, Ctrl-C is 130, and every entry point uses it."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from safeio.cli import ArgumentParser, entry_point, error_line

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["sample", "tools.table_cli", "tools.edm_cli", "tools.lsun_cli", "tools.random_pipeline",
                "bench.exact", "bench.gpu_latency", "bench.plot_latency", "training.distill.launch", "training.ppo.launch",
                "training.ppo.export", "training.rewards.score_cli", "training.rewards.fid",
                "training.rewards.pretrained", "scripts.reproduce_iccv", "scripts.reproduce_tpami", "bench.rdpo_step",
                "scripts.train_digits_edm",
                "scripts.distill_digits_edm", "scripts.rdpo_digits_demo", "scripts.distill_smoke_sd15",
                "scripts.gpu_check_backends", "scripts.gpu_check_fast_path"]


def test_error_lines_are_one_line_and_name_things():
    assert error_line(ValueError("a list:\n  x\n  y")) == "error: a list: x; y"
    assert error_line(KeyError("unknown solver 'z'")) == "error: unknown solver 'z'"
    assert error_line(FileNotFoundError(2, "No such file or directory", "/w/x.pkl")) == \
        "error: /w/x.pkl: No such file or directory"
    assert error_line(OSError("[Errno 28] No space left on device")) == "error: No space left on device"
    assert error_line(ValueError()) == "error: ValueError"


def _main_raising(exc: BaseException):
    @entry_point
    def main(argv=None) -> int:
        parser = ArgumentParser(prog="demo")
        sub = parser.add_subparsers(dest="command", required=True)
        sub.add_parser("go").add_argument("--n", type=int, default=1)
        args = parser.parse_args(argv)
        if args.n < 0:
            raise exc
        return 0
    return main


def test_user_errors_exit_2_with_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    main = _main_raising(ValueError("--n must be >= 0"))
    assert main(["go", "--n", "-1"]) == 2
    assert capsys.readouterr().err == "error: --n must be >= 0\n"
    for argv in (["--debug", "go", "--n", "-1"], ["go", "--n", "-1", "--debug"]):    # before or after the command
        with pytest.raises(ValueError, match="--n must be"):
            main(argv)
    monkeypatch.setenv("EPD_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["go", "--n", "-1"])


def test_bugs_keep_their_traceback_and_ctrl_c_is_130(capsys):
    with pytest.raises(ZeroDivisionError):
        _main_raising(ZeroDivisionError("a bug"))(["go", "--n", "-1"])
    assert _main_raising(KeyboardInterrupt())(["go", "--n", "-1"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        _main_raising(ValueError())(["go", "--n", "abc"])
    assert done.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'abc' (see demo go --help)\n"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_uses_the_convention(module):
    main = importlib.import_module(module).main
    assert getattr(main, "__wrapped__", None) is not None, f"{module}.main is not wrapped by safeio.cli.entry_point"
    assert main.__code__.co_filename.endswith(str(Path("safeio") / "cli.py"))


def test_a_closed_pipe_ends_quietly():
    many = " ".join(["exps/digits/epd-nfe3.pkl"] * 400)          # far more output than a pipe buffers
    proc = subprocess.run(f"{sys.executable} -m solvers.table show {many} | head -c 10; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "== exps/di" and proc.stderr == "" and proc.returncode == 141
