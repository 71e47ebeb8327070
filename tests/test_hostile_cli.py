"""Careless and hostile command lines: each is refused before anything is sampled, with exit status 2 and one
line that names the argument or file (no traceback, no silent wrong image)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import sample
from backends import load_backend
from backends.prompts import read_prompts
from solvers.core import MAX_SEED_ITEMS, SEED_LIMIT, Seeds, parse_seeds
from solvers.table import save_table, uniform_table

ROOT = Path(__file__).resolve().parents[1]
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
    "seed-items-too-many": (["--seeds", ",".join(map(str, range(MAX_SEED_ITEMS + 1)))], ("--seeds", "items")),
    "batch-zero-with-huge-range": (["--seeds", f"0-{SEED_LIMIT - 1}", "--batch", "0"], ("--batch",)),
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


def test_seed_ranges_stay_lazy_and_32_bit():
    assert list(parse_seeds("4294967295")) == [SEED_LIMIT - 1]
    with pytest.raises(ValueError, match="2\\^32"):
        parse_seeds("4294967290-4294967296")
    every = parse_seeds(f"0-{SEED_LIMIT - 1}")             # 2^32 seeds held as one range, not a list
    assert isinstance(every, Seeds) and len(every) == SEED_LIMIT and every.ranges == [range(SEED_LIMIT)]
    assert every[-1] == SEED_LIMIT - 1 and every[123_456_789] == 123_456_789 and every[:3] == [0, 1, 2]
    overlapping = parse_seeds("10-20,0-15,18,30")           # order kept, duplicates dropped, still ranges
    assert list(overlapping) == list(range(10, 21)) + list(range(10)) + [30]
    assert overlapping.ranges == [range(10, 21), range(0, 10), range(30, 31)]
    assert [overlapping[i] for i in range(len(overlapping))] == list(overlapping)


def test_a_huge_seed_range_streams_instead_of_listing(capsys, tmp_path, monkeypatch):
    """Seeds 0..2^32-1 on a folder where 0-2 exist: the run starts at once (nothing is listed up front); we stop
    it after its first batch by making the writer raise."""
    out = tmp_path / "out"
    assert sample.main(["--predictor_path", TABLE, "--seeds", "0-2", "--outdir", str(out)]) == 0
    capsys.readouterr()
    written = []

    def stop_after_one(path, data):
        written.append(path.name)
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "atomic_write", stop_after_one)
    code = sample.main(["--predictor_path", TABLE, "--seeds", f"0-{SEED_LIMIT - 1}", "--batch", "2",
                        "--outdir", str(out)])
    assert code == 130 and written == ["000003.png"]             # seeds 0-2 skipped, the next one sampled
    assert "error: interrupted" in capsys.readouterr().err


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


def test_a_table_runs_only_on_its_own_model_unless_forced(capsys, tmp_path):
    gmm_table = ROOT / "exps" / "gmm" / "00001-gmm-nfe5" / "table.json"
    argv = ["--predictor_path", str(gmm_table), "--seeds", "0-1", "--outdir", str(tmp_path / "o")]
    _refused(argv + ["--backend", "digits"], capsys, str(gmm_table), "'gmm'", "'digits'", "--force-backend")
    _refused(argv + ["--force-backend"], capsys, "--force-backend", "--backend")
    assert sample.main(argv + ["--backend", "digits", "--force-backend"]) == 0
    captured = capsys.readouterr()
    assert "warning: running the table" in captured.err and "'digits'" in captured.err
    assert len(list((tmp_path / "o").rglob("*.png"))) == 2


def test_the_benchmark_refuses_a_table_of_another_model_unless_forced(capsys, tmp_path):
    from bench.exact import main as bench_main

    digits_table = ROOT / TABLE
    argv = ["--model", "gmm", "--solvers", "euler", "--nfe", "3", "--num-samples", "8", "--batch", "8",
            "--table", f"d={digits_table}", "--no-cache"]
    assert bench_main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: the table --table d=") and "'digits'" in line and "--force-backend" in line
    assert bench_main(argv + ["--force-backend"]) == 0
    assert "warning: running the table --table d=" in capsys.readouterr().err
