"""sample.py on the embedded default: images, sidecars, grid, resume, batch invariance, conditioning."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from backends.analytic import load_digits_data

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "exps" / "digits" / "uniform-start-nfe9.pkl"


def run(*args):
    return sample.main([str(a) for a in args])


def test_parse_seeds():
    assert sample.parse_seeds("0-3,7,5-6,3") == [0, 1, 2, 3, 7, 5, 6]
    for bad in ("", "a-b", "5-2", "1,,x"):
        with pytest.raises(ValueError):
            sample.parse_seeds(bad)


def test_demo_command_writes_images_sidecars_and_grid(tmp_path):
    out = tmp_path / "digits"
    proc = subprocess.run([sys.executable, "sample.py", "--predictor_path", str(START), "--seeds", "0-11", "--grid",
                           "--outdir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "NFE 9 sequential" in proc.stdout and str(out) in proc.stdout
    pngs = sorted((out / "000000").glob("*.png"))
    assert [p.name for p in pngs] == [f"{s:06d}.png" for s in range(12)]
    meta = json.loads((out / "000000" / "000004.json").read_text())
    assert meta["seed"] == 4 and meta["nfe"] == {"sequential": 9, "total": 14, "network_rows_per_evaluation": 1} and meta["solver"] == "epd"
    assert meta["table"]["path"].endswith("uniform-start-nfe9.pkl")
    assert Image.open(out / "grid.png").size[0] > 64 * 3
    assert Image.open(pngs[0]).size == (64, 64)


def test_resume_skips_existing_and_batch_size_does_not_change_images(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("--predictor_path", START, "--seeds", "3-8", "--batch", "6", "--outdir", a, "--no-subdirs") == 0
    assert run("--predictor_path", START, "--seeds", "3-8", "--batch", "1", "--outdir", b, "--no-subdirs") == 0
    for seed in range(3, 9):
        assert np.array_equal(np.asarray(Image.open(a / f"{seed:06d}.png")), np.asarray(Image.open(b / f"{seed:06d}.png")))
    stamp = (a / "000005.png").stat().st_mtime_ns
    assert run("--predictor_path", START, "--seeds", "3-9", "--outdir", a, "--no-subdirs") == 0
    assert (a / "000005.png").stat().st_mtime_ns == stamp and (a / "000009.png").is_file()


def test_prompts_condition_the_digit_and_baselines_run(tmp_path):
    out = tmp_path / "threes"
    assert run("--backend", "digits", "--solver", "heun", "--steps", "12", "--seeds", "0-7", "--prompt", "3",
               "--outdir", out, "--no-subdirs", "--upscale", "1") == 0
    images, labels = load_digits_data()
    flat = images.reshape(len(images), -1).numpy()
    for seed in range(8):
        img = np.asarray(Image.open(out / f"{seed:06d}.png"), dtype=np.float64) / 127.5 - 1
        nearest = np.argmin(((flat - img.reshape(1, -1)) ** 2).sum(1))
        assert labels[nearest] == 3
        assert json.loads((out / f"{seed:06d}.json").read_text())["prompt"] == "3"
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n7\n")
    assert run("--backend", "gmm", "--solver", "dpmpp2m", "--steps", "6", "--seeds", "10-13", "--prompt-file", prompts,
               "--outdir", tmp_path / "pf", "--no-subdirs") == 0
    paired = [json.loads((tmp_path / "pf" / f"{s:06d}.json").read_text())["prompt"] for s in range(10, 14)]
    assert paired == ["1", "7", "1", "7"]                    # by position in the seed list, cycling


def test_clear_errors(tmp_path, capsys):
    assert run("--seeds", "0-1", "--outdir", tmp_path) == 2
    assert "either --predictor_path" in capsys.readouterr().err
    assert run("--predictor_path", tmp_path / "missing.pkl", "--outdir", tmp_path) == 2
    assert "no predictor table" in capsys.readouterr().err
    assert run("--predictor_path", START, "--model_path", "x.ckpt", "--outdir", tmp_path) == 2
    assert "takes no weights" in capsys.readouterr().err
    assert run("--backend", "gmm", "--solver", "nope", "--steps", "3", "--outdir", tmp_path) == 2
    assert "unknown solver" in capsys.readouterr().err


def test_numeric_ids_resolve_to_the_newest_table(tmp_path):
    run_dir = tmp_path / "00007-digits-test"
    run_dir.mkdir()
    (run_dir / "table.pkl").write_bytes(START.read_bytes())
    assert sample.resolve_predictor_path("7", tmp_path) == run_dir / "table.pkl"
    with pytest.raises(FileNotFoundError):
        sample.resolve_predictor_path("8", tmp_path)
    per_model = tmp_path / "gmm" / "00008-gmm-nfe5"
    per_model.mkdir(parents=True)
    (per_model / "table.pkl").write_bytes(START.read_bytes())
    assert sample.resolve_predictor_path("8", tmp_path) == per_model / "table.pkl"
    (tmp_path / "digits" / "00008-digits-nfe5").mkdir(parents=True)
    with pytest.raises(ValueError, match="ambiguous"):
        sample.resolve_predictor_path("8", tmp_path)


def test_torchrun_splits_seeds_across_ranks_with_identical_images(tmp_path):
    common = ["sample.py", "--predictor_path", str(START), "--seeds", "0-6", "--prompt-file",
              str(ROOT / "src" / "prompts" / "digits.txt"), "--no-subdirs", "--batch", "2"]
    single = subprocess.run([sys.executable, *common, "--outdir", str(tmp_path / "one")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *common, "--outdir", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert multi.returncode == 0, multi.stderr
    assert "rank 0: sampled 4 images" in multi.stdout and "rank 1: sampled 3 images" in multi.stdout
    for seed in range(7):
        one = json.loads((tmp_path / "one" / f"{seed:06d}.json").read_text())
        two = json.loads((tmp_path / "two" / f"{seed:06d}.json").read_text())
        assert one["prompt"] == two["prompt"] == str(seed % 10)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / f"{seed:06d}.png")),
                              np.asarray(Image.open(tmp_path / "two" / f"{seed:06d}.png")))


def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path):
    """Images, sidecars and the grid are written atomically but not 0600 (the temporary file's mode)."""
    import os

    umask = os.umask(0o022)
    try:
        assert run("--backend", "digits", "--solver", "euler", "--steps", "3", "--seeds", "0-1", "--grid",
                   "--no-subdirs", "--outdir", tmp_path) == 0
    finally:
        os.umask(umask)
    for name in ("000000.png", "000001.json", "grid.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
