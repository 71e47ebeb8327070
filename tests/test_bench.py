"""The exact-reference benchmark CLI: schema, NFE honesty, tables at their own NFE, seeds, plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from solvers.bench import frechet_distance, markdown, run_benchmark
from solvers.table import save_table, uniform_table
from solvers.schedules import ScheduleSpec, make_sigmas

ROOT = Path(__file__).resolve().parents[1]


def test_cli_writes_report_plot_and_markdown(tmp_path):
    spec = ScheduleSpec(kind="polynomial", num_steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    table = save_table(uniform_table(make_sigmas(spec), 2, (0.335, 0.665), spec, afs=True), tmp_path / "start.pkl")
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "solvers.bench", "--model", "gmm", "--solvers", "euler,heun,dpmpp3m",
           "--nfe", "3,4", "--num-samples", "24", "--json", str(out), "--table", f"uni={table}", "--seed", "5"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "| solver | NFE 3 | NFE 4 |" in proc.stdout and "| heun |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "gmm" and report["seed"] == 5
    assert {"rtol", "check_max_abs_diff", "fd_to_data"} <= set(report["reference"])
    rows = report["results"]
    for row in rows:
        assert {"solver", "nfe", "rmse", "fd", "sequential_evals", "total_evals", "seconds"} <= set(row)
        assert row["rmse"] > 0 and row["fd"] > 0
    baseline = [r for r in rows if r["solver"] != "uni"]
    assert sorted((r["solver"], r["nfe"]) for r in baseline) == sorted(
        (s, n) for s in ("euler", "heun", "dpmpp3m") for n in (3, 4))
    assert all(r["nfe"] == r["sequential_evals"] == r["total_evals"] for r in baseline)
    (uni,) = [r for r in rows if r["solver"] == "uni"]
    assert uni["nfe"] == 7 and uni["total_evals"] == 11        # 4 steps, AFS: 2*4-1 sequential, 3*4-1 total
    assert (out.with_suffix(".png")).stat().st_size > 10_000
    assert any((tmp_path / ".cache" / "bench").glob("reference-*.pt"))   # reused by the next run


def test_more_steps_help_and_seeds_change_the_noise():
    first = run_benchmark("gmm", ["heun"], [4, 10], num_samples=16, seed=0, cache_dir=None, progress=False)
    rmse = {r["nfe"]: r["rmse"] for r in first["results"]}
    assert rmse[10] < rmse[4] / 3
    other = run_benchmark("gmm", ["heun"], [4], num_samples=16, seed=100, cache_dir=None, progress=False)
    assert other["results"][0]["rmse"] != pytest.approx(rmse[4])
    assert "| heun |" in markdown(first)


def test_frechet_distance_properties():
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = frechet_distance(a, a + np.array([1.0, 0.0, 0.0]))
    assert shifted == pytest.approx(1.0, rel=1e-9)           # a pure mean shift costs |delta|^2
    scaled = frechet_distance(a, 2 * a)                       # covariance I vs 4I: 3 * (1 + 4 - 2*2) = 3
    assert scaled == pytest.approx(3.0, rel=0.05)
