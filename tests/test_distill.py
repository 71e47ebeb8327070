"""Stage-1 distillation: configs, teacher grids and states, table parameters, the loop, run folders, resume,
the teacher cache, the authors' CLI flags."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backends import BackendBase
from backends.analytic import make_analytic
from solvers.core import seeded_noise
from solvers.epd import sample_epd
from solvers.registry import get_solver
from solvers.schedules import ScheduleSpec, make_sigmas
from solvers.table import load_table
from training.distill import ConfigError, Distiller, TableParameters, load_config, teacher_grid, teacher_states, train
from training.distill.launch import main as launch_main
from training.distill.trainer import TRAIN_SEED_BASE, noise_seeds

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "distill"
OFFICIAL = ROOT.parents[0] / "shared" / "official" / "iccv"


def tiny(tmp_path, *extra):
    """A seconds-long gmm run: 3 grid points, batch 8, 4 iterations, Euler teacher, no validation (the tests of
    validation, comparison and search are in test_recipe_search.py)."""
    return load_config(None, [f"outdir={tmp_path / 'exps'}", "name=tiny", "backend.name=gmm", "student.num_steps=3",
                              "teacher.solver=euler", "teacher.M=2", "batch=8", "total_kimg=0.032", "optim.lr=0.05",
                              "checkpoint_every=1", "schedule.kind=polynomial", "validation.num=0", *extra])


@pytest.fixture(scope="module")
def gmm_model():
    return make_analytic("gmm")


# -- configs ---------------------------------------------------------------------------------------------------
def test_config_layers_and_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("batch: 24\nstudent: {num_steps: 5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("inherit: base.yaml\nstudent: {afs: false}\n")
    config = load_config(child, ["optim.lr=0.3"])
    assert config.batch == 24 and config.student.num_steps == 5 and config.student.afs is False
    assert config.optim.lr == 0.3 and config.teacher.solver == "heun"       # untouched defaults stay
    with pytest.raises(ConfigError, match="optim.lrr|lrr"):
        load_config(None, ["optim.lrr=1"])                                   # misspelt keys are errors
    with pytest.raises(ConfigError, match="loss.backprop"):
        load_config(None, ["loss.backprop=sometimes"])
    with pytest.raises(ConfigError, match="teacher.solver"):
        load_config(None, ["teacher.solver=rk45"])
    with pytest.raises(ConfigError, match="init_positions"):
        load_config(None, ["student.num_points=3"])
    loop = tmp_path / "loop.yaml"
    loop.write_text("inherit: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(loop)
    assert load_config(None, ["backend.model_path=/x/y.pkl"]).backend.model_path == "/x/y.pkl"  # open section


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    names = {f.stem for f in files}
    for dataset in ("cifar10", "ffhq", "imagenet64", "lsun_bedroom_ldm"):
        for solver in ("epd", "ipndm"):
            assert {f"{dataset}-{solver}-nfe{n}" for n in (3, 5, 7, 9)} <= names
    assert {"sd15", "gmm-nfe3", "gmm-nfe5", "gmm-nfe7", "gmm-nfe9", "digits-nfe3", "digits-nfe9"} <= names
    for f in files:
        load_config(f)


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the authors' release is not beside this checkout")
def test_released_setting_configs_match_the_released_tables():
    """Each ICCV config reproduces the settings recorded in the matching official pickle (docs/authors-code.md §6.5)."""
    batches = {"cifar10-epd": [32] * 4, "ffhq-epd": [16] * 4, "imagenet64-epd": [8, 16, 12, 8],
               "lsun_bedroom_ldm-epd": [12, 12, 12, 16]}
    for path in sorted(OFFICIAL.glob("*.pkl")):
        parts = path.name.split("-")
        run, n, nfe, solver = int(parts[0]), int(parts[-5]), int(parts[-4]), parts[-3]
        dataset = "-".join(parts[1:-5])
        official = load_table(path)
        kwargs = official.metadata["init_kwargs"]
        config = load_config(CONFIGS / f"{dataset}-{solver}-nfe{nfe}.yaml")
        assert config.student.solver == kwargs["sampler_stu"] and config.student.num_steps == kwargs["num_steps"] == n
        assert config.student.scale_dir == kwargs["scale_dir"] and config.student.scale_time == kwargs["scale_time"]
        assert config.teacher.solver == kwargs["sampler_tea"] and config.teacher.M == kwargs["M"]
        assert config.schedule.kind == kwargs["schedule_type"] and config.schedule.rho == kwargs["schedule_rho"]
        assert config.student.afs is kwargs["afs"] is True and config.loss.alpha == kwargs["alpha"]
        assert config.optim.lr == (0.1 if run in (16, 28, 29, 30, 31, 32) else 0.2) and config.optim.cosine
        assert config.batch == batches.get(f"{dataset}-{solver}", [16] * 4)[n - 3]
        if dataset != "lsun_bedroom_ldm":   # pixel EDM grids: ours must equal the grid stored in the file
            spec = ScheduleSpec(kind="time_uniform", num_steps=n, sigma_min=config.schedule.sigma_min,
                                sigma_max=config.schedule.sigma_max, rho=1.0, variant=config.schedule.variant)
            np.testing.assert_allclose(make_sigmas(spec).numpy(), official.sigmas, rtol=1e-6)


# -- teacher -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,rho", [("polynomial", 7.0), ("logsnr", 1.0), ("time_uniform", 1.0)])
def test_teacher_grid_is_nested(kind, rho):
    spec = ScheduleSpec(kind=kind, num_steps=5, sigma_min=0.002, sigma_max=80.0, rho=rho)
    student = make_sigmas(spec).double()
    fine = teacher_grid(student, 3, spec)
    assert len(fine) == 4 * 4 + 1
    assert torch.equal(fine[::4], student)                       # the student's points, exactly
    direct = make_sigmas(ScheduleSpec(**{**spec.to_dict(), "num_steps": 17})).double()
    torch.testing.assert_close(fine, direct, rtol=1e-12, atol=0)  # and the family's own finer grid
    assert bool((fine[1:] < fine[:-1]).all())


def test_teacher_grid_without_a_family_subdivides_log_sigma():
    student = torch.tensor([50.0, 5.0, 0.5])
    fine = teacher_grid(student, 1)
    torch.testing.assert_close(fine, torch.tensor([50.0, math.sqrt(250.0), 5.0, math.sqrt(2.5), 0.5], dtype=torch.float64))
    assert torch.equal(teacher_grid(student, 0), student.double())


def test_teacher_states_are_the_solver_on_the_fine_grid(gmm_model):
    spec = ScheduleSpec(kind="polynomial", num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sigmas = make_sigmas(spec).double()
    x = seeded_noise(range(6), gmm_model.shape, torch.float64) * 80.0
    states = teacher_states(gmm_model, x, sigmas, solver="heun", M=2, schedule=spec)
    assert states.shape == (3, 6, 1, 8, 8)
    fine = teacher_grid(sigmas, 2, spec)
    for n in range(1, 4):   # running heun to the n-th student point reproduces state n
        partial = get_solver("heun")(gmm_model, x, fine[: 3 * n + 1])
        torch.testing.assert_close(states[n - 1], partial, rtol=0, atol=1e-12)
    exact = teacher_states(gmm_model, x, sigmas, solver="reference", rtol=1e-8)
    assert float((states[-1] - exact[-1]).pow(2).mean().sqrt()) < 0.1   # heun M=2 is close to the exact solution


# -- table parameters -----------------------------------------------------------------------------------------
def test_table_parameters_maps_and_round_trip():
    uniform = TableParameters(3, 2, init="uniform", init_positions=[0.335, 0.665], scale_dir=0.05, scale_time=0.1)
    values = uniform.effective()
    np.testing.assert_allclose(values["positions"], [[0.335, 0.665]] * 3, rtol=1e-12)
    np.testing.assert_allclose(values["weights"], 0.5)
    np.testing.assert_allclose(values["dir_scales"], 1.0)
    np.testing.assert_allclose(values["time_scales"], 1.0)
    gen = torch.Generator().manual_seed(3)
    random = TableParameters(3, 2, init="random", generator=gen, scale_dir=0.05)
    raw = torch.randn((3, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(random.r_params.detach(), raw)                   # the authors' N(0, 1) draw
    c = random.effective()["dir_scales"]
    assert np.all((c > 0.95) & (c < 1.05)) and random.effective()["time_scales"] is None
    sigmas = [80.0, 5.0, 0.5, 0.002]
    table = random.to_table(sigmas, afs=True)
    again = TableParameters(3, 2, init=table, scale_dir=0.05).to_table(sigmas, afs=True)
    np.testing.assert_allclose(again.positions, table.positions, rtol=1e-10)
    np.testing.assert_allclose(again.weights, table.weights, rtol=1e-10)
    np.testing.assert_allclose(again.dir_scales, table.dir_scales, rtol=1e-10)
    with pytest.raises(ValueError, match="do not match"):
        TableParameters(2, 2, init=table)


# -- the loop ----------------------------------------------------------------------------------------------------
def test_noise_seeds_never_overlap_evaluation_seeds():
    seeds = noise_seeds(0, torch.arange(10_000)) + noise_seeds(12345, torch.arange(10_000))
    assert min(seeds) >= TRAIN_SEED_BASE and max(seeds) < 2 ** 32


def test_training_lowers_the_held_out_error(tmp_path, gmm_model):
    """A short run from the uniform start beats the start on held-out seeds."""
    config = tiny(tmp_path, "student.num_steps=4", "total_kimg=0.4", "batch=16", "optim.lr=0.05",
                  "teacher.solver=ipndm", "teacher.M=8", "loss.steps=last", "checkpoint_every=100")
    table, folder = train(config, progress=False)
    start = TableParameters(3, 2, init="uniform", init_positions=[0.335, 0.665]).to_table(table.sigmas, afs=True)
    x = seeded_noise(range(200), gmm_model.shape, torch.float64) * 80.0
    exact = teacher_states(gmm_model, x, table.sigmas, solver="reference", rtol=1e-7)[-1]

    def rmse(t):
        return float((sample_epd(gmm_model, x, t) - exact).pow(2).mean().sqrt())

    assert rmse(table) < 0.85 * rmse(start)
    losses = [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 25 and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_run_folder_contents_and_table_metadata(tmp_path):
    export = tmp_path / "tables" / "tiny.pkl"
    table, folder = train(tiny(tmp_path, "student.scale_dir=0.05", "student.scale_time=0.05", f"export={export}"),
                          progress=False)
    np.testing.assert_array_equal(load_table(export).positions, table.positions)
    assert folder.parent == tmp_path / "exps" and folder.name == "00001-tiny"
    for name in ("config.yaml", "log.jsonl", "checkpoint.pt", "table.pkl", "table.json", "table.png"):
        assert (folder / name).is_file(), name
    assert load_config(folder / "config.yaml") == tiny(tmp_path, "student.scale_dir=0.05", "student.scale_time=0.05",
                                                       f"export={export}")
    saved = load_table(folder / "table.pkl")
    np.testing.assert_array_equal(saved.positions, table.positions)
    assert saved.dir_scales is not None and saved.time_scales is not None and saved.afs
    meta = saved.metadata
    assert meta["teacher"] == {"solver": "euler", "M": 2} and meta["num_points"] == 2 and meta["alpha"] == 10.0
    assert meta["backend"] == "gmm" and meta["backend_config"] == {}       # what sample.py needs to rebuild it
    assert meta["nfe"] == {"sequential": 3, "total": 5} and meta["schedule"]["kind"] == "polynomial"
    assert meta["training"]["iterations"] == 4 and meta["training"]["seconds"] > 0
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "step_losses", "lr", "positions", "weights", "dir_scales", "time_scales", "seconds"} <= set(records[0])
    _, second = train(tiny(tmp_path), progress=False)
    assert second.name == "00002-tiny"


def test_step_backprop_with_last_step_loss_trains_only_the_last_row(tmp_path):
    detached, _ = train(tiny(tmp_path, "loss.backprop=step", "loss.steps=last", "student.num_steps=4"), progress=False)
    np.testing.assert_allclose(detached.positions[:2], [[0.335, 0.665]] * 2, rtol=1e-12)   # untouched
    assert not np.allclose(detached.positions[2], [0.335, 0.665])
    through, _ = train(tiny(tmp_path, "loss.backprop=trajectory", "loss.steps=last", "student.num_steps=4"),
                       progress=False)
    assert all(not np.allclose(through.positions[n], [0.335, 0.665]) for n in range(3))  # BPTT reaches all rows


def test_authors_rule_uses_the_last_step_only_for_short_pixel_epd(tmp_path):
    def steps(*extra):
        return Distiller(tiny(tmp_path, *extra), tmp_path, progress=False).loss_steps

    assert steps("dataset=cifar10", "student.num_steps=5") == {3}
    assert steps("dataset=cifar10", "student.num_steps=6") == set(range(5))
    assert steps("dataset=cifar10", "student.solver=ipndm", "student.num_steps=5") == set(range(4))
    assert steps("dataset=ms_coco", "student.num_steps=4") == set(range(3))


def test_plugin_student_and_reference_teacher(tmp_path):
    table, _ = train(tiny(tmp_path, "student.solver=ipndm", "student.max_order=2", "teacher.solver=reference",
                          "teacher.rtol=1e-5"), progress=False)
    assert table.solver == "ipndm" and table.max_order == 2
    assert not np.allclose(table.positions, [[0.335, 0.665]] * 2)


def test_nan_gradients_are_cleaned(tmp_path, gmm_model):
    class Poisoned(BackendBase):
        """gmm, except that it returns NaN for one sample at the intermediate points."""
        shape, sigma_min, sigma_max, state_dtype, family = (1, 8, 8), 0.002, 80.0, torch.float64, "ve"

        def __call__(self, x, sigma, cond=None):
            out = gmm_model(x, sigma, cond)
            if x.shape[0] > 8:
                out = out.clone()
                out[0] = float("nan")
            return out

    table, folder = train(tiny(tmp_path), backend=Poisoned(), progress=False)
    assert np.all(np.isfinite(table.positions)) and np.all(np.isfinite(table.weights))


# -- resume ------------------------------------------------------------------------------------------------------
def test_resume_ends_with_the_same_table(tmp_path):
    config = tiny(tmp_path, "total_kimg=0.048", "optim.cosine=true")                  # 6 iterations
    straight, _ = train(config, run_dir=tmp_path / "straight", progress=False)
    _, folder = train(config, run_dir=tmp_path / "broken", progress=False, stop_after=2)
    lines = (folder / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not (folder / "table.pkl").exists()
    with (folder / "log.jsonl").open("a") as handle:                  # a line written after the last checkpoint,
        handle.write(json.dumps({"iteration": 3}) + "\n{\"iterat")     # and one cut by the kill
    resumed, _ = train(None, resume=folder, progress=False)
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_resuming_a_finished_run_rewrites_nothing(tmp_path):
    config = tiny(tmp_path, "total_kimg=0.016")
    first, folder = train(config, run_dir=tmp_path / "done", progress=False)
    written = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    again, _ = train(None, resume=folder, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == written
    assert again.metadata["training"]["seconds"] == first.metadata["training"]["seconds"] is not None
    np.testing.assert_array_equal(again.positions, first.positions)


def test_killed_process_resumes_to_the_same_table(tmp_path):
    """SIGKILL a real run mid-way, resume it from the command line, compare with an uninterrupted run."""
    overrides = ["outdir=" + str(tmp_path / "exps"), "name=kill", "student.num_steps=3", "teacher.solver=euler",
                 "batch=8", "total_kimg=0.2", "checkpoint_every=2", "optim.lr=0.05"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.distill.launch", "--no-progress"]
    for item in overrides:
        cmd += ["--override", item]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = tmp_path / "exps" / "00001-kill"
    deadline = time.time() + 120
    while time.time() < deadline and not (folder / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "table.pkl").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd[:3] + ["--resume", str(folder), "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The uninterrupted run is a process of the same kind, so thread counts (and float summation order) match.
    whole = subprocess.run(cmd + ["--override", "name=straight"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    straight = load_table(tmp_path / "exps" / "00002-straight" / "table.pkl")
    resumed = load_table(folder / "table.pkl")
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 26))


# -- teacher cache -----------------------------------------------------------------------------------------------
def test_teacher_cache_is_reused_and_changes_nothing(tmp_path, gmm_model):
    calls = {"n": 0}

    class Counting(BackendBase):
        shape, sigma_min, sigma_max, state_dtype, family = (1, 8, 8), 0.002, 80.0, torch.float64, "ve"

        def __call__(self, x, sigma, cond=None):
            calls["n"] += 1
            return gmm_model(x, sigma, cond)

        def describe(self):
            return {"backend": "counting-gmm"}

    cache = f"teacher.cache={tmp_path / 'cache'}"
    plain, _ = train(tiny(tmp_path), backend=Counting(), progress=False)
    first_calls = calls["n"]
    cached, _ = train(tiny(tmp_path, cache), backend=Counting(), progress=False)
    calls["n"] = 0
    again, folder = train(tiny(tmp_path, cache, "optim.lr=0.05"), backend=Counting(), progress=False)
    teacher_calls = 4 * 2 * 3             # 4 iterations x 2 student steps x (M + 1) Euler steps
    assert first_calls - calls["n"] == teacher_calls or calls["n"] == first_calls - teacher_calls
    np.testing.assert_array_equal(cached.positions, plain.positions)
    np.testing.assert_array_equal(again.positions, plain.positions)
    assert len(list((tmp_path / "cache").glob("*/0*.pt"))) == 4
    changed, _ = train(tiny(tmp_path, cache, "teacher.M=3"), backend=Counting(), progress=False)
    assert len(list((tmp_path / "cache").glob("*/0*.pt"))) == 8     # another teacher, another key


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_authors_flags_become_overrides(tmp_path, capsys):
    code = launch_main(["--override", "backend.name=gmm", "--override", f"outdir={tmp_path}",
                        "--num_steps", "3", "--sampler_tea", "euler", "--M", "1", "--afs", "False",
                        "--scale_dir", "0.05", "--batch", "8", "--total_kimg", "0.016", "--lr", "0.1", "--coslr",
                        "--desc", "flags", "--no-progress"])
    assert code == 0
    folder = tmp_path / "00001-flags"
    config = load_config(folder / "config.yaml")
    assert (config.student.num_steps, config.teacher.solver, config.teacher.M, config.student.afs) == (3, "euler", 1, False)
    assert (config.student.scale_dir, config.batch, config.optim.lr, config.optim.cosine) == (0.05, 8, 0.1, True)
    out = capsys.readouterr().out
    assert "NFE 4 sequential, 6 total" in out and str(folder) in out


def test_cli_reports_config_errors(tmp_path, capsys):
    assert launch_main(["--override", "loss.steps=some", "--override", f"outdir={tmp_path}"]) == 2
    assert "loss.steps" in capsys.readouterr().err


# -- DDP -------------------------------------------------------------------------------------------------------------
def test_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun with 2 CPU ranks (gloo): every rank ends with the same table, equal to one process with the
    same total batch (each rank draws its own half of the trajectories; gradients are summed)."""
    overrides = [f"outdir={tmp_path / 'exps'}", "name=ddp", "student.num_steps=4", "teacher.solver=euler",
                 "teacher.M=1", "batch=8", "total_kimg=0.032", "optim.lr=0.05", "student.scale_dir=0.05",
                 "conditions.num_classes=10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:             # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "ddp_distill_worker.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (load_table(tmp_path / f"rank{r}.json") for r in (0, 1))
    np.testing.assert_array_equal(rank0.positions, rank1.positions)
    np.testing.assert_array_equal(rank0.weights, rank1.weights)
    single, _ = train(load_config(None, overrides[:1] + ["name=single"] + overrides[2:]), progress=False)
    np.testing.assert_allclose(rank0.positions, single.positions, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rank0.weights, single.weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rank0.dir_scales, single.dir_scales, rtol=1e-9, atol=1e-12)
    assert not np.allclose(single.positions, [[0.335, 0.665]] * 3)          # it did train
    assert rank0.metadata["training"]["world_size"] == 2
    assert load_table(tmp_path / "exps" / "00001-ddp" / "table.pkl").metadata["training"]["world_size"] == 2


# -- final-step feature loss -----------------------------------------------------------------------------------------
def test_final_step_feature_loss_weighting(tmp_path, monkeypatch):
    """The last step uses alpha * feature loss (replacing the data loss, or added to it); no pixel-count factor."""
    import training.features as features

    def fake_factory(kind, weights_path=None, device=None, **_):
        assert kind == "lpips" and weights_path == "weights.pth"
        return lambda s, t: (s.flatten(1).mean(1) - t.flatten(1).mean(1)) ** 2

    monkeypatch.setattr(features, "make_feature_loss", fake_factory)
    student, target = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    data = (student - target).pow(2).flatten(1).mean(1)
    feat = (student.clamp(-1, 1).flatten(1).mean(1) - target.clamp(-1, 1).flatten(1).mean(1)) ** 2  # decoded
    for final, expected in (("features", 4.0 * feat), ("features+data", 4.0 * feat + data)):
        distiller = Distiller(tiny(tmp_path, "loss.features=lpips", "loss.features_path=weights.pth",
                                   "loss.alpha=4", f"loss.final={final}"), tmp_path, progress=False)
        torch.testing.assert_close(distiller._step_loss(student, target, last=True), expected)
        torch.testing.assert_close(distiller._step_loss(student, target, last=False), data)
    with pytest.raises(ValueError, match="features_path"):
        Distiller(tiny(tmp_path, "loss.features=inception"), tmp_path, progress=False)


def test_sample_cli_runs_a_fresh_run_folder(tmp_path):
    """A run folder (or its numeric id) is accepted by sample.py, which rebuilds the backend from the table."""
    import sample

    _, folder = train(tiny(tmp_path), progress=False)
    out = tmp_path / "images"
    assert sample.main(["--predictor_path", str(folder), "--seeds", "0-3", "--outdir", str(out)]) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 4
    sidecar = json.loads(pngs[0].with_suffix(".json").read_text())
    assert sidecar["backend"] == "gmm"


def test_run_ids_are_unique_when_runs_start_together(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from training.distill.trainer import new_run_dir

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda i: new_run_dir(tmp_path, f"run{i % 3}"), range(24)))
    ids = sorted(int(f.name[:5]) for f in folders)
    assert ids == list(range(1, 25)) and all(f.is_dir() for f in folders)


def test_gpu_smoke_script_runs_a_diffusers_unet_on_cpu(tmp_path):
    """The SD1.5 smoke script (run on the GPU machine at full size) trains through a diffusers UNet: here a
    tiny one on CPU, one setting, one timed iteration."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "distill_smoke_sd15.py"), "--tiny", "--device", "cpu",
                           "--iterations", "1", "--settings", "N4-bptt-b2", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    row = report["settings"]["N4-bptt-b2"]
    assert report["latent_shape"] == [4, 8, 8] and report["unet_parameters"] > 0
    assert row["seconds_per_iteration"] > 0 and math.isfinite(row["loss"]) and row["optimizer_steps_per_iteration"] == 3
    assert row["positions_row0"] != pytest.approx([0.335, 0.665], abs=1e-6)   # the table moved


def test_teacher_grid_can_be_chosen(tmp_path):
    """teacher.grid=log splits each student interval uniformly in log sigma instead of refining the student's
    own family; both keep the student's points, and the choice reaches the teacher (other targets)."""
    same = Distiller(tiny(tmp_path, "teacher.M=3"), tmp_path / "a", progress=False)
    log = Distiller(tiny(tmp_path, "teacher.M=3", "teacher.grid=log"), tmp_path / "b", progress=False)
    ids = torch.arange(4)
    x = same._start_states(ids)
    a, b = same._teacher(x, same._conditions(ids)), log._teacher(x, log._conditions(ids))
    assert a.shape == b.shape and not torch.allclose(a, b)
    fine = teacher_grid(same.sigmas, 3)                 # the log-uniform refinement
    steps = np.diff(np.log(fine.numpy()[:4]))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    with pytest.raises(ConfigError, match="teacher.grid"):
        tiny(tmp_path, "teacher.grid=cosine")


# -- the authors' inner teacher refinement (docs/authors-code.md §4, §6.2) ---------------------------------------
def test_inner_steps_settings_are_checked(tmp_path):
    assert tiny(tmp_path).teacher.inner_steps == 2 and tiny(tmp_path).teacher.inner_dtype == "float32"
    for value in ("1", "2.5", "inf", "nan"):
        with pytest.raises(ConfigError, match="teacher.inner_steps.*integer >= 2"):
            tiny(tmp_path, f"teacher.inner_steps={value}")
    with pytest.raises(ConfigError, match="teacher.inner_steps.*number"):
        tiny(tmp_path, "teacher.inner_steps=three")
    with pytest.raises(ConfigError, match="teacher.inner_dtype.*float32, float64"):
        tiny(tmp_path, "teacher.inner_dtype=float16")
    with pytest.raises(ConfigError, match="teacher.inner_steps.*adaptive"):
        tiny(tmp_path, "teacher.solver=reference", "teacher.M=0", "teacher.inner_steps=3")


def test_released_configs_use_the_authors_refined_teacher():
    """heun (EPD) or dpm = our dpm2 with r = 1/2 (plugin), M = 3 (M = 2 for run 00016), 3 inner float32 points."""
    import inspect

    assert get_solver("dpm").name == "dpm2"
    assert inspect.signature(get_solver("dpm").fn).parameters["r"].default == 0.5
    for dataset in ("cifar10", "ffhq", "imagenet64", "lsun_bedroom_ldm"):
        for solver, teacher in (("epd", "heun"), ("ipndm", "dpm")):
            for nfe in (3, 5, 7, 9):
                config = load_config(CONFIGS / f"{dataset}-{solver}-nfe{nfe}.yaml")
                assert (config.teacher.solver, config.teacher.inner_steps, config.teacher.inner_dtype) == \
                    (teacher, 3, "float32")
                assert config.teacher.M == (2 if (dataset, solver, nfe) == ("lsun_bedroom_ldm", "epd", 9) else 3)


def test_inner_steps_reach_the_teacher_the_cache_key_and_the_table(tmp_path):
    cache = f"teacher.cache={tmp_path / 'cache'}"
    plain = Distiller(tiny(tmp_path, "teacher.solver=heun", cache), tmp_path / "a", progress=False)
    inner = Distiller(tiny(tmp_path, "teacher.solver=heun", "teacher.inner_steps=3", cache), tmp_path / "b",
                      progress=False)
    exact = Distiller(tiny(tmp_path, "teacher.solver=heun", "teacher.inner_steps=3", "teacher.inner_dtype=float64",
                           cache), tmp_path / "c", progress=False)
    assert len({plain.cache.folder, inner.cache.folder, exact.cache.folder}) == 3      # three keys
    plain_key = json.loads((plain.cache.folder / "key.json").read_text())["teacher"]
    assert "inner_steps" not in plain_key and "inner_dtype" not in plain_key          # default: the old key
    assert json.loads((inner.cache.folder / "key.json").read_text())["teacher"]["inner_steps"] == 3
    ids = torch.arange(4)
    x = inner._start_states(ids)
    want = teacher_states(inner.backend, x, inner.sigmas, solver="heun", M=2, schedule=inner.schedule, inner_steps=3)
    torch.testing.assert_close(inner._teacher(x, None), want, rtol=0, atol=0)
    assert not torch.allclose(plain._teacher(x, None), want)
    assert inner.metadata()["teacher"] == {"solver": "heun", "M": 2, "inner_steps": 3, "inner_dtype": "float32"}
    assert plain.metadata()["teacher"] == {"solver": "heun", "M": 2}
