"""Careless and hostile command lines: each is refused before anything is sampled, with exit status 2 and one
line that names the argument or file (no traceback, no silent wrong image)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sample
from backends import load_backend
from backends.prompts import read_prompts
from solvers.core import MAX_SEEDS, SEED_LIMIT, parse_seeds
from solvers.table import save_table, uniform_table

TABLE = "exps/digits/epd-nfe9.pkl"


def _refused(argv, capsys, *words):
    code = sample.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


CASES = {   # name -> (extra argv, words the error line must hold)
    "guidance-nan": (["--backend-config", '{"guidance": NaN}'], ("guidance", "finite")),
    "guidance-inf": (["--backend-config", '{"guidance": Infinity}'], ("guidance", "finite")),
    "guidance-negative": (["--backend-config", '{"guidance": -2}'], ("guidance", ">= 0")),
    "class-negative": (["--class", "-1"], ("--class",)),
    "device-unknown": (["--device", "tpu9"], ("--device", "tpu9")),
    "seed-2^32": (["--seeds", str(SEED_LIMIT)], ("2^32",)),
    "seeds-too-many": (["--seeds", "0-999999999"], ("more than",)),
    "batch-zero-before-seeds": (["--seeds", "0-999999999", "--batch", "0"], ("--batch",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_exit_2_with_one_line(case, capsys, tmp_path):
    extra, words = CASES[case]
    argv = ["--predictor_path", TABLE, "--outdir", str(tmp_path / "out")]
    if "--seeds" not in extra:
        argv += ["--seeds", "0-1"]
    _refused(argv + extra, capsys, *words)
    assert not list((tmp_path / "out").rglob("*.png"))


def test_output_folder_problems_are_found_before_sampling(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _refused(["--predictor_path", TABLE, "--seeds", "0-1", "--outdir", str(a_file)], capsys, "--outdir", "is a file")
    _refused(["--predictor_path", TABLE, "--seeds", "0-1", "--outdir", str(a_file / "sub")], capsys, "--outdir")


def test_a_prompt_file_that_is_not_utf8_is_named(capsys, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe\xfa a cat\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(bad)
    _refused(["--predictor_path", TABLE, "--seeds", "0-1", "--prompt-file", str(bad), "--outdir", str(tmp_path / "o")],
             capsys, str(bad), "UTF-8")


def test_a_table_without_a_backend_needs_one_named(capsys, tmp_path):
    path = save_table(uniform_table(np.array([80.0, 5.0, 0.5, 0.002])), tmp_path / "anonymous.pkl")
    _refused(["--predictor_path", str(path), "--seeds", "0-1", "--outdir", str(tmp_path / "o")], capsys,
             "records no backend", "--backend")
    assert sample.main(["--predictor_path", str(path), "--backend", "gmm", "--seeds", "0-1",
                        "--outdir", str(tmp_path / "o")]) == 0          # named: the user's deliberate choice
    capsys.readouterr()


def test_seed_limits_are_checked_before_the_list_is_built():
    assert parse_seeds("4294967295") == [SEED_LIMIT - 1]
    with pytest.raises(ValueError, match="2\\^32"):
        parse_seeds("4294967290-4294967296")
    with pytest.raises(ValueError, match="more than"):
        parse_seeds(f"0-{SEED_LIMIT - 1}")                  # refused at once, not after building a list
    assert len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS


def test_backend_options_must_be_finite():
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="guidance"):
            load_backend("digits", guidance=bad)
    assert load_backend("digits", guidance=2.0).guidance == 2.0


def test_scorers_ignore_hidden_files_a_killed_writer_left(tmp_path):
    from training.rewards.score_cli import list_images

    (tmp_path / "000000.png").write_bytes(b"x")
    (tmp_path / ".000001.png").write_bytes(b"")                  # an older writer's temporary name
    (tmp_path / ".000002.png.k3j.tmp").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["000000.png"]
