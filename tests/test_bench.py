"""The exact-reference benchmark CLI: schema, NFE honesty, tables at their own NFE, seeds, plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.exact import markdown, run_benchmark
from solvers.frechet import sample_frechet_distance as frechet_distance
from solvers.table import save_table, uniform_table
from solvers.schedules import ScheduleSpec, make_sigmas

ROOT = Path(__file__).resolve().parents[1]
# One torch thread in the CLI subprocesses: these runs are tiny, and two threads on a busy 2-core box crawl.
CLI_ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cli_writes_report_plot_and_markdown(tmp_path):
    spec = ScheduleSpec(kind="polynomial", num_steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    table = save_table(uniform_table(make_sigmas(spec), 2, (0.335, 0.665), spec, afs=True), tmp_path / "start.pkl")
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "solvers.bench", "--model", "gmm", "--solvers", "euler,heun,dpmpp3m",
           "--nfe", "3,4", "--num-samples", "24", "--json", str(out), "--table", f"uni={table}", "--seed", "5"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=CLI_ENV)
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
    # one schedule (the default): every row on it, no schedule tags, the table's comparisons at NFEs not run
    assert [s["kind"] for s in report["schedules"]] == ["polynomial"] and report["schedule"]["rho"] == 7.0
    assert all(r["schedule"] == {"kind": "polynomial", "rho": 7.0} and r["best"] for r in rows)
    assert "(poly)" not in proc.stdout and "best handcrafted at NFE 4: " in proc.stdout
    assert report["summary"]["tables"]["uni"]["best_baseline_same_nfe"] is None
    assert report["summary"]["tables"]["uni"]["best_baseline_same_total"] is None
    assert "at equal total evaluations (NFE 11): not run" in proc.stdout
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


# -- several schedules: best per (solver, NFE), comparisons at equal NFE and equal total evaluations ----------
SCHEDULES = ("polynomial", "logsnr", "time_uniform")
TAGS = {"polynomial": "poly", "logsnr": "logsnr", "time_uniform": "uni"}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """One run on three schedules with two uniform tables: ``a`` (4 steps, AFS: NFE 7, 11 total; both NFEs run)
    and ``b`` (3 steps: NFE 6, 9 total; NFE 9 not run). The reference is cached under ``root/.cache/bench``."""
    from bench.exact import bench_schedules

    root = tmp_path_factory.mktemp("multi")
    tables = {}
    for name, steps, afs in (("a", 4, True), ("b", 3, False)):
        spec = ScheduleSpec(kind="polynomial", num_steps=steps + 1, sigma_min=0.002, sigma_max=80.0, rho=7.0)
        tables[name] = str(save_table(uniform_table(make_sigmas(spec), 2, None, spec, afs=afs), root / f"{name}.pkl"))
    specs = bench_schedules(list(SCHEDULES), 0.002, 80.0)
    report = run_benchmark("gmm", ["euler", "heun", "dpmpp3m"], [3, 6, 7, 11], num_samples=16, seed=0, tables=tables,
                           cache_dir=root / ".cache" / "bench", progress=False, schedules=specs)
    return root, report


def test_best_schedule_is_the_argmin_over_schedules(multi):
    _, report = multi
    assert [s["kind"] for s in report["schedules"]] == list(SCHEDULES)
    assert [s["rho"] for s in report["schedules"]] == [7.0, 1.0, 1.0]
    groups = {}
    for row in report["results"]:
        if "table" not in row:
            groups.setdefault((row["solver"], row["nfe"]), []).append(row)
    assert sorted(groups) == sorted((s, n) for s in ("euler", "heun", "dpmpp3m") for n in (3, 6, 7, 11))
    for key, rows in groups.items():
        assert sorted(r["schedule"]["kind"] for r in rows) == sorted(SCHEDULES), key
        (best,) = [r for r in rows if r["best"]]
        assert best["rmse"] == min(r["rmse"] for r in rows)
    assert all(r["best"] for r in report["results"] if "table" in r)


def test_summary_compares_tables_at_equal_nfe_and_equal_total(multi):
    _, report = multi
    baselines = [r for r in report["results"] if "table" not in r]

    def argmin(nfe):
        return min((r for r in baselines if r["nfe"] == nfe), key=lambda r: r["rmse"])

    summary = report["summary"]
    assert [e["nfe"] for e in summary["best_baseline"]] == [3, 6, 7, 11]
    for entry in summary["best_baseline"]:
        row = argmin(entry["nfe"])
        assert (entry["solver"], entry["schedule"], entry["rmse"]) == (row["solver"], row["schedule"], row["rmse"])
    a, b = summary["tables"]["a"], summary["tables"]["b"]
    (row_a,) = [r for r in report["results"] if r["solver"] == "a"]
    assert (a["nfe"], a["total_evals"], a["rmse"]) == (7, 11, row_a["rmse"])
    assert (b["nfe"], b["total_evals"]) == (6, 9)
    for table, field, nfe in ((a, "best_baseline_same_nfe", 7), (a, "best_baseline_same_total", 11),
                              (b, "best_baseline_same_nfe", 6)):
        row, entry = argmin(nfe), table[field]
        assert (entry["nfe"], entry["solver"], entry["schedule"], entry["rmse"]) == (
            nfe, row["solver"], row["schedule"], row["rmse"])
        assert entry["ratio"] == pytest.approx(table["rmse"] / row["rmse"])
    assert b["best_baseline_same_total"] is None
    assert json.loads(json.dumps(summary)) == summary


def test_markdown_shows_schedule_tags_and_comparisons(multi):
    _, report = multi
    text = markdown(report)
    assert "| solver | NFE 3 | NFE 6 | NFE 7 | NFE 11 |" in text and "| a |" in text and "| b |" in text
    for row in report["results"]:
        if row["best"] and "table" not in row:
            assert f"{row['rmse']:.4g} ({TAGS[row['schedule']['kind']]})" in text
    for entry in report["summary"]["best_baseline"]:
        assert (f"best handcrafted at NFE {entry['nfe']}: {entry['solver']} {entry['rmse']:.4g} "
                f"({TAGS[entry['schedule']['kind']]})") in text
    same_total = report["summary"]["tables"]["a"]["best_baseline_same_total"]
    (line_a,) = [line for line in text.splitlines() if line.startswith("- table a ")]
    assert f"at equal total evaluations (NFE 11): {same_total['solver']} {same_total['rmse']:.4g}" in line_a
    (line_b,) = [line for line in text.splitlines() if line.startswith("- table b ")]
    assert "best handcrafted at NFE 6: " in line_b and line_b.endswith("at equal total evaluations (NFE 9): not run")


def test_cli_schedules_option_and_shared_reference_cache(multi):
    root, first = multi
    out = root / "cli.json"
    cmd = [sys.executable, "-m", "solvers.bench", "--solvers", "euler", "--nfe", "3", "--num-samples", "16",
           "--schedules", "polynomial, logsnr", "--json", str(out), "--plot", str(root / "cli.png")]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env=CLI_ENV)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [(s["kind"], s["rho"]) for s in report["schedules"]] == [("polynomial", 7.0), ("logsnr", 1.0)]
    rows = report["results"]
    assert [r["schedule"] for r in rows] == [{"kind": "polynomial", "rho": 7.0}, {"kind": "logsnr", "rho": 1.0}]
    (best,) = [r for r in rows if r["best"]]
    assert best["rmse"] == min(r["rmse"] for r in rows)
    assert f"| euler | {best['rmse']:.4g} ({TAGS[best['schedule']['kind']]}) |" in proc.stdout
    # the reference does not depend on the schedules: the fixture's cached one is reused, not recomputed
    assert len(list((root / ".cache" / "bench").glob("reference-*.pt"))) == 1
    assert report["reference"]["check_max_abs_diff"] == first["reference"]["check_max_abs_diff"]
    same = [r for r in first["results"] if (r["solver"], r["nfe"]) == ("euler", 3) and r["schedule"] in
            [row["schedule"] for row in rows]]
    assert sorted(r["rmse"] for r in same) == pytest.approx(sorted(r["rmse"] for r in rows))


@pytest.mark.parametrize("argv", [["--schedules", "polynomial,logsnr", "--rho", "3"], ["--schedules", "poly"],
                                  ["--schedules", ","]])
def test_cli_rejects_bad_schedule_options(argv, capsys):
    from bench.exact import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "--" in capsys.readouterr().err
