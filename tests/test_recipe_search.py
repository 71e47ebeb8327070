"""Held-out validation, the comparison with the handcrafted solvers, and the recipe search of Stage 1
(training/distill/validation.py, training/distill/search.py; docs/distill/recipe.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from solvers.core import seeded_noise
from solvers.epd import sample_epd
from solvers.reference import reference_solution
from solvers.registry import get_solver, steps_for_nfe
from solvers.schedules import ScheduleSpec, make_sigmas
from solvers.table import load_table
from training.distill import search as search_module
from training.distill.config import ConfigError, load_config
from training.distill.trainer import TRAIN_SEED_BASE, train
from training.distill.validation import VALIDATION_SEED_BASE, ValidationSet

ROOT = Path(__file__).resolve().parents[1]


def small(tmp_path, *extra):
    """A seconds-long gmm run with validation: 3 grid points, batch 8, 6 iterations, 16 validation trajectories."""
    return load_config(None, [f"outdir={tmp_path / 'exps'}", "name=small", "backend.name=gmm", "student.num_steps=3",
                              "teacher.solver=euler", "teacher.M=2", "batch=8", "total_kimg=0.048", "optim.lr=0.05",
                              "checkpoint_every=1", "schedule.kind=polynomial", "validation.num=16",
                              "validation.every=2", "validation.reference.rtol=1e-5",
                              f"validation.cache={tmp_path / 'vcache'}", "compare.solvers=[euler,dpmpp2m,ipndm]",
                              *extra])


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_validation_seeds_are_disjoint_from_training_and_benchmarks():
    # training seeds are TRAIN_SEED_BASE + (...) % TRAIN_SEED_BASE, i.e. in [2^31, 2^32); benchmarks count from 0
    assert VALIDATION_SEED_BASE + 10**6 < TRAIN_SEED_BASE
    assert VALIDATION_SEED_BASE > 10**8


def test_validation_scores_are_logged_and_the_best_parameters_are_exported(tmp_path):
    table, folder = train(small(tmp_path), progress=False)
    logged = records(folder)
    scored = {r["iteration"]: r["val_rmse"] for r in logged if "val_rmse" in r}
    assert sorted(scored) == [2, 4, 6]                      # every 2 iterations and at the end
    best_iteration = min(scored, key=scored.get)
    meta = table.metadata["validation"]
    assert meta["best_iteration"] == best_iteration and meta["best_rmse"] == pytest.approx(scored[best_iteration])
    # the exported table is the best one: sampling it on the validation trajectories gives the logged score
    from backends import make_analytic

    model = make_analytic("gmm")
    noise = seeded_noise([VALIDATION_SEED_BASE + j for j in range(16)], (1, 8, 8), torch.float64)
    sigmas = table.sigmas
    ref = reference_solution(model, noise * float(sigmas[0]), float(sigmas[0]), [float(sigmas[-1])], rtol=1e-5)
    out = sample_epd(model, noise * float(sigmas[0]), table)
    rmse = float((out - ref.states[float(sigmas[-1])]).pow(2).mean().sqrt())
    assert rmse == pytest.approx(scored[best_iteration], rel=1e-9)
    assert (folder / "table.png").is_file() and (folder / "summary.json").is_file()


def test_last_selection_exports_the_final_parameters(tmp_path):
    best, _ = train(small(tmp_path, "validation.select=best"), run_dir=tmp_path / "a", progress=False)
    last, folder = train(small(tmp_path, "validation.select=last"), run_dir=tmp_path / "b", progress=False)
    plain, _ = train(small(tmp_path, "validation.num=0"), run_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(last.positions, plain.positions)   # validation never changes training
    assert last.metadata["validation"]["selected"] == "last"
    if best.metadata["validation"]["best_iteration"] != 6:
        assert not np.array_equal(best.positions, last.positions)


def test_patience_stops_a_run_that_no_longer_improves(tmp_path, monkeypatch):
    scores = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    monkeypatch.setattr(ValidationSet, "rmse", lambda self, denoiser, table: next(scores))
    table, folder = train(small(tmp_path, "validation.every=1", "validation.patience=2", "compare.enabled=false"),
                          progress=False)
    assert [r["iteration"] for r in records(folder)] == [1, 2, 3]
    meta = table.metadata["validation"]
    assert meta["stopped_early"] and meta["best_iteration"] == 1 and meta["best_rmse"] == 0.5
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["iteration"] == 3 and saved["best"]["iteration"] == 1


def test_resume_keeps_the_best_parameters(tmp_path):
    config = small(tmp_path, "validation.every=1")
    straight, _ = train(config, run_dir=tmp_path / "straight", progress=False)
    _, folder = train(config, run_dir=tmp_path / "broken", progress=False, stop_after=3)
    resumed, _ = train(None, resume=folder, progress=False)
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    assert resumed.metadata["validation"]["best_iteration"] == straight.metadata["validation"]["best_iteration"]


def test_comparison_with_the_handcrafted_solvers(tmp_path, capsys):
    table, folder = train(small(tmp_path), progress=False)
    comparison = json.loads((folder / "comparison.json").read_text())
    summary = comparison["summary"]["tables"]["table"]
    same = summary["best_baseline_same_nfe"]
    assert same["nfe"] == 3 and summary["best_baseline_same_total"]["nfe"] == 5     # 2 steps x 3 - AFS
    # the best baseline at NFE 3 is the lowest of every solver on every grid, each measured independently here
    from backends import make_analytic

    model = make_analytic("gmm")
    noise = seeded_noise([VALIDATION_SEED_BASE + j for j in range(16)], (1, 8, 8), torch.float64)
    start, end = float(table.sigmas[0]), float(table.sigmas[-1])
    ref = reference_solution(model, noise * start, start, [end], rtol=1e-5).states[end]
    errors = {}
    for solver in ("euler", "dpmpp2m", "ipndm"):
        steps, afs = steps_for_nfe(solver, 3)
        for kind, rho in (("time_uniform", 1.0), ("polynomial", 7.0), ("logsnr", 1.0)):
            sigmas = make_sigmas(ScheduleSpec(kind=kind, num_steps=steps + 1, sigma_min=end, sigma_max=start, rho=rho))
            out = get_solver(solver)(model, noise * start, sigmas, afs=afs)
            errors[(solver, kind)] = float((out - ref).pow(2).mean().sqrt())
    best = min(errors, key=errors.get)
    assert (same["solver"], same["schedule"]["kind"]) == best
    assert same["rmse"] == pytest.approx(errors[best], rel=1e-9)
    assert same["ratio"] == pytest.approx(summary["rmse"] / errors[best], rel=1e-9)
    stored = load_table(folder / "table.pkl").metadata["comparison"]
    assert stored["best_baseline_same_nfe"]["solver"] == same["solver"]
    verdict = json.loads((folder / "summary.json").read_text())["verdict"]
    word = "WINS" if same["ratio"] < 1 else "LOSES"
    assert word in verdict[0] and f"{same['rmse']:.4g}" in verdict[0]
    captured = capsys.readouterr()
    assert verdict[0] in captured.out + captured.err                  # printed as the run's last lines


def test_a_losing_table_says_so_in_its_last_lines(tmp_path):
    # one iteration at a tiny learning rate: the uniform start, far worse than DPM-Solver++ at the same NFE
    out = subprocess.run([sys.executable, "-m", "training.distill.launch", "--no-progress",
                          "--override", f"outdir={tmp_path}", "--override", "total_kimg=0.008",
                          "--override", "batch=8", "--override", "student.num_steps=3",
                          "--override", "teacher.solver=euler", "--override", "optim.lr=1e-6",
                          "--override", "validation.num=16", "--override", "validation.reference.rtol=1e-5",
                          "--override", f"validation.cache={tmp_path / 'v'}",
                          "--override", "compare.solvers=[dpmpp2m]"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "the table LOSES at the same NFE (3)" in text and "dpmpp2m" in text


def test_config_errors_name_the_setting(tmp_path):
    for override, key in (("validation.num=-1", "validation.num"), ("validation.select=worst", "validation.select"),
                          ("validation.reference.solver=nope", "validation.reference.solver"),
                          ("compare.schedules=[cosine]", "compare.schedules"),
                          ("teacher.precompute=64", "teacher.precompute"),
                          ("search.loss_steps=[some]", "search.loss_steps")):
        extra = ["search.enabled=true"] if key.startswith("search") else []
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override, *extra])
    out = subprocess.run([sys.executable, "-m", "training.distill.launch", "--search", "--override",
                          "validation.num=0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "validation.num" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_precomputed_teacher_gives_the_same_run(tmp_path):
    cache = f"teacher.cache={tmp_path / 'cache'}"
    plain, _ = train(small(tmp_path, "validation.num=0"), run_dir=tmp_path / "a", progress=False)
    pre, folder = train(small(tmp_path, "validation.num=0", cache, "teacher.precompute=32"), run_dir=tmp_path / "b",
                        progress=False)
    np.testing.assert_allclose(pre.positions, plain.positions, rtol=1e-10)   # batched solves: rounding only
    np.testing.assert_allclose(pre.weights, plain.weights, rtol=1e-10)
    assert len(list((tmp_path / "cache").glob("*/0*.pt"))) == 6


# -- the search ------------------------------------------------------------------------------------------------
def search_config(tmp_path, *extra):
    return small(tmp_path, "search.enabled=true", "search.schedules=[time_uniform,polynomial]",
                 "search.loss_steps=[all,last]", "search.kimg=0.016", f"teacher.cache={tmp_path / 'cache'}",
                 f"export={tmp_path / 'export.pkl'}", *extra)


def test_search_tries_every_candidate_and_trains_the_best(tmp_path):
    table, folder = train(search_config(tmp_path), progress=False)
    state = json.loads((folder / "search.json").read_text())
    labels = [c["label"] for c in state["candidates"]]
    assert labels == ["time_uniform-all", "time_uniform-last", "polynomial7-all", "polynomial7-last"]
    scores = {c["label"]: c["val_rmse"] for c in state["candidates"]}
    assert state["chosen"] == min(scores, key=scores.get)
    chosen = next(c for c in state["candidates"] if c["label"] == state["chosen"])
    final_config = (folder / "final" / "config.yaml").read_text()
    assert f"kind: {chosen['overrides']['schedule.kind']}" in final_config
    assert float(load_config(folder / "final" / "config.yaml").total_kimg) == 0.048      # the full budget
    for index, label in enumerate(labels):                                  # each candidate ran the short budget
        sub = folder / "candidates" / f"{index:02d}-{label}"
        assert len(records(sub)) == 2 and (sub / "summary.json").is_file()
    assert table.metadata["schedule"]["kind"] == chosen["overrides"]["schedule.kind"]
    assert state["kept"] == "search" and load_table(tmp_path / "export.pkl").metadata["run"] == "final"
    assert (folder / "search.png").is_file() and state["seconds"]["total_over_final"] > 1
    # candidates of one grid share the teacher cache; the final run reuses its grid's short-run prefix
    assert len(list((tmp_path / "cache").glob("*/0*.pt"))) == 6 + 2


def test_search_keeps_a_better_existing_export(tmp_path):
    good, _ = train(search_config(tmp_path, "total_kimg=0.096"), progress=False)
    before = (tmp_path / "export.pkl").read_bytes()
    table, folder = train(search_config(tmp_path, "total_kimg=0.016", "optim.lr=1e-6", "search.lr=[1e-6]"),
                          progress=False)
    state = json.loads((folder / "search.json").read_text())
    existing, final = state["existing"]["val_rmse"], state["final"]["val_rmse"]
    assert (state["kept"] == "existing") == (existing <= final)
    assert state["kept"] == "existing"                       # a run that hardly trains loses to the good one
    assert (tmp_path / "export.pkl").read_bytes() == before
    kept = json.loads((folder / "existing-comparison.json").read_text())["summary"]["tables"]["table"]
    assert kept["rmse"] == pytest.approx(existing, rel=1e-9) and state["existing"]["verdict"]
    np.testing.assert_array_equal(load_table(folder / "table.pkl").positions, good.positions)


def test_a_killed_search_resumes_where_it_stopped(tmp_path, monkeypatch):
    straight, _ = train(search_config(tmp_path, "export=null"), run_dir=tmp_path / "straight", progress=False)
    original = search_module._run
    calls = []

    def dying(config, folder, *args, **kwargs):
        calls.append(folder.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(config, folder, *args, **kwargs)

    monkeypatch.setattr(search_module, "_run", dying)
    with pytest.raises(KeyboardInterrupt):
        train(search_config(tmp_path, "export=null"), run_dir=tmp_path / "broken", progress=False)
    monkeypatch.setattr(search_module, "_run", original)
    first = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "broken" / "candidates").glob("*/summary.json")}
    assert len(first) == 2
    resumed, _ = train(None, resume=tmp_path / "broken", progress=False)
    again = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "broken" / "candidates").glob("*/summary.json")}
    assert len(again) == 4 and {k: again[k] for k in first} == first        # the finished ones were not rerun
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    np.testing.assert_array_equal(resumed.weights, straight.weights)


def test_class_conditional_validation_draws_labels_per_trajectory(tmp_path):
    # labels are drawn per validation trajectory (not from a training id) and split with the noise in chunks
    table, folder = train(small(tmp_path, "conditions.num_classes=10", "validation.batch=5"), progress=False)
    from training.distill.trainer import Distiller

    distiller = Distiller(load_config(folder / "config.yaml"), folder, progress=False)
    validation = distiller.validation_set()
    assert validation.cond.shape == (16,) and len(set(validation.cond.tolist())) > 1
    assert table.metadata["validation"]["best_rmse"] == pytest.approx(validation.rmse(distiller.backend, table))
