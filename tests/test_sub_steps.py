"""The authors' sub-stepped heun/dpm (docs/authors-code.md §4, §6.2, §9.5): the inner rho-7 grid
(``solvers.schedules.refine_grid``), the ``inner_steps`` and ``afs_every_step`` baseline options, their
evaluation counts, the refined teacher, and ``sample.py --inner-steps / --afs-every-step``."""

import json
import math

import numpy as np
import pytest
import torch

import sample
from solvers.baselines import sample_dpm2, sample_heun
from solvers.core import seeded_noise
from solvers.registry import SOLVERS, eval_count, get_solver, steps_for_nfe
from solvers.schedules import ScheduleSpec, make_sigmas, polynomial_sigmas, refine_grid, time_uniform_sigmas
from training.distill import teacher_grid, teacher_states

S2 = 0.37


def gaussian_denoiser(x, sigma, cond=None):
    k = S2 / (S2 + sigma.double() ** 2)
    return x * k.view(-1, *([1] * (x.ndim - 1)))


class Counting:
    """A denoiser that counts its calls (one call = one evaluation of the batch)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return gaussian_denoiser(x, sigma)


def start(sigma_max=80.0, batch=3):
    return seeded_noise(range(batch), (1, 4, 4), torch.float64) * sigma_max


GRIDS = {
    "official-time-uniform": time_uniform_sigmas(4, 0.002, 80.0, variant="official"),
    "polynomial": polynomial_sigmas(6, 0.002, 80.0),
    "lsun-like": torch.tensor([83.8225, 8.40799, 1.65677, 0.0387592], dtype=torch.float64),
}


# -- the inner grid -------------------------------------------------------------------------------------------
def _authors_inner(t_c: float, t_n: float, inner: int) -> torch.Tensor:
    """Their get_schedule(inner, sigma_min=t_n, sigma_max=t_c, 'polynomial', rho=7), written out: float32 ends,
    ``(t_c^{1/7} + j/(inner-1) (t_n^{1/7} - t_c^{1/7}))^7`` over the vector of j in float32."""
    hi = torch.tensor(t_c, dtype=torch.float32) ** (1 / 7)
    lo = torch.tensor(t_n, dtype=torch.float32) ** (1 / 7)
    j = torch.arange(inner) / (inner - 1)
    return (hi + j * (lo - hi)) ** 7


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("inner", [3, 4, 5])
def test_refined_grid_is_the_authors_inner_grid(name, inner):
    outer = GRIDS[name]
    fine = refine_grid(outer, inner)
    per = inner - 1
    assert fine.dtype == torch.float64 and len(fine) == per * (len(outer) - 1) + 1
    assert torch.equal(fine[::per], outer.double())                    # the outer points, exactly
    for i in range(len(outer) - 1):
        theirs = _authors_inner(float(outer[i]), float(outer[i + 1]), inner)
        assert torch.equal(fine[i * per + 1:(i + 1) * per], theirs[1:-1].double())   # float32 bits, exactly
    # float64 mode: the same formula in float64; it differs from float32 by rounding only
    exact = refine_grid(outer, inner, dtype="float64")
    for i in range(len(outer) - 1):
        a, b = float(outer[i]) ** (1 / 7), float(outer[i + 1]) ** (1 / 7)
        want = [(a + j / per * (b - a)) ** 7 for j in range(inner)]
        np.testing.assert_allclose(exact[i * per:(i + 1) * per + 1].numpy(), want, rtol=1e-14, atol=0)
    assert torch.equal(exact[::per], outer.double())
    gap = ((fine - exact).abs() / exact).max()
    assert 0 < gap < 1e-6
    assert bool((fine[1:] < fine[:-1]).all())


def test_refine_grid_edges_and_errors():
    outer = GRIDS["polynomial"]
    assert torch.equal(refine_grid(outer, 2), outer)
    to_zero = refine_grid([80.0, 1.0, 0.0], 3, dtype="float64")           # an interval ending at 0
    np.testing.assert_allclose(to_zero.numpy(), [80.0, (80 ** (1 / 7) / 2 + 0.5) ** 7, 1.0, 0.5 ** 7, 0.0],
                               rtol=1e-14)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="inner_steps"):
            refine_grid(outer, bad)
    with pytest.raises(ValueError, match="dtype"):
        refine_grid(outer, 3, dtype="float16")
    with pytest.raises(ValueError, match="decreasing"):
        refine_grid([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="too narrow"):
        refine_grid([1.0, 1.0 - 1e-12], 3)                            # float32 cannot split this interval


# -- baselines with the options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", [sample_heun, sample_dpm2])
@pytest.mark.parametrize("afs", [False, True])
def test_inner_steps_run_the_solver_over_the_refined_grid(solver, afs):
    outer = GRIDS["official-time-uniform"]
    x = start()
    for inner, dtype in ((3, "float32"), (4, "float64")):
        ours = solver(gaussian_denoiser, x, outer, inner_steps=inner, inner_dtype=dtype, afs=afs)
        plain = solver(gaussian_denoiser, x, refine_grid(outer, inner, dtype=dtype), afs=afs)
        assert torch.equal(ours, plain)


def _d(x, t, analytic):
    return x / math.sqrt(1 + t * t) if analytic else (x - gaussian_denoiser(x, torch.tensor([t] * len(x)))) / t


def _explicit(kind: str, x, outer, inner, afs, every):
    """The authors' loop written out: per outer step, sub-steps over the inner grid; AFS replaces the first
    direction of every outer step (``every``) or of the run only."""
    fine = refine_grid(outer, inner).tolist()
    per = inner - 1
    for i in range(len(outer) - 1):
        for k in range(per):
            s, e = fine[i * per + k], fine[i * per + k + 1]
            d = _d(x, s, afs and k == 0 and (every or i == 0))
            if kind == "heun":
                x_e = x + (e - s) * d
                x = x + (e - s) * 0.5 * (d + _d(x_e, e, False))
            else:
                m = math.sqrt(e * s)
                x = x + (e - s) * _d(x + (m - s) * d, m, False)
    return x


@pytest.mark.parametrize("kind", ["heun", "dpm2"])
@pytest.mark.parametrize("inner", [2, 3])
def test_afs_every_step_is_the_authors_loop(kind, inner):
    outer, x = GRIDS["official-time-uniform"], start()
    run = get_solver(kind)
    every = run(gaussian_denoiser, x, outer, afs=True, inner_steps=inner, afs_every_step=True)
    first = run(gaussian_denoiser, x, outer, afs=True, inner_steps=inner)
    # (the solvers turn AFS into a denoiser output D = x - t d and back, which costs a few digits near t = 80)
    torch.testing.assert_close(every, _explicit(kind, x, outer, inner, True, True), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(first, _explicit(kind, x, outer, inner, True, False), rtol=1e-8, atol=1e-8)
    assert float((every - first).abs().max()) > 1e-3
    # without afs the switch changes nothing
    assert torch.equal(run(gaussian_denoiser, x, outer, inner_steps=inner, afs_every_step=True),
                       run(gaussian_denoiser, x, outer, inner_steps=inner))


@pytest.mark.parametrize("kind", ["heun", "dpm2"])
@pytest.mark.parametrize("inner", [2, 3, 4])
@pytest.mark.parametrize("afs,every", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("zero", [False, True])
def test_eval_counts_are_measured(kind, inner, afs, every, zero):
    outer = torch.cat([GRIDS["polynomial"], torch.zeros(1, dtype=torch.float64)]) if zero else GRIDS["polynomial"]
    counter = Counting()
    spec = get_solver(kind).with_options(inner_steps=inner, afs_every_step=every)
    spec(counter, start(), outer, afs=afs)
    assert eval_count(spec, outer, afs=afs).sequential == counter.calls
    assert eval_count(kind, outer, afs=afs, inner_steps=inner, afs_every_step=every).total == counter.calls
    steps = len(outer) - 1
    per_step = 2 * (inner - 1)
    assert counter.calls == per_step * steps - zero - (steps if afs and every else int(afs))


@pytest.mark.parametrize("kind", ["heun", "dpm2"])
@pytest.mark.parametrize("inner", [2, 3, 4])
@pytest.mark.parametrize("every", [False, True])
def test_steps_for_nfe_round_trips(kind, inner, every):
    reachable = set()
    for steps in range(1, 8):
        for afs in (False, True):
            reachable.add(eval_count(kind, np.geomspace(80, 0.002, steps + 1), afs=afs, inner_steps=inner,
                                     afs_every_step=every and afs).sequential)
    for nfe in range(1, 25):
        try:
            steps, afs = steps_for_nfe(kind, nfe, afs=every, inner_steps=inner, afs_every_step=every)
        except ValueError:
            if every:       # with every-step AFS only multiples of the per-step cost are reachable
                assert nfe % (2 * (inner - 1) - 1)
            else:
                assert nfe not in reachable
            continue
        grid = np.geomspace(80, 0.002, steps + 1)
        assert eval_count(kind, grid, afs=afs, inner_steps=inner, afs_every_step=every).sequential == nfe


def test_options_are_checked_and_labelled():
    heun = get_solver("heun")
    assert heun.with_options(inner_steps=3, afs_every_step=True).label == "heun-inner3-afs-every-step"
    assert heun.with_options(inner_steps=2, afs_every_step=False) == heun             # neutral values: the solver
    assert heun.with_options(inner_steps=3).with_options(inner_steps=2) == heun
    assert get_solver("dpm") is SOLVERS["dpm2"] and SOLVERS["dpm2"].sub_stepped
    with pytest.raises(ValueError, match="euler"):
        get_solver("euler").with_options(inner_steps=3)
    with pytest.raises(ValueError, match="unknown"):
        heun.with_options(order=2)
    with pytest.raises(ValueError, match="inner_steps"):
        heun.with_options(inner_steps=1)
    with pytest.raises(ValueError, match="inner_steps"):
        sample_heun(gaussian_denoiser, start(), GRIDS["polynomial"], inner_steps=0)


# -- the teacher ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["heun", "dpm"])
@pytest.mark.parametrize("M,inner", [(1, 3), (3, 3), (0, 4)])
def test_refined_teacher_is_the_plain_solver_over_the_refined_grid(solver, M, inner):
    spec = ScheduleSpec(kind="time_uniform", num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=1.0,
                        variant="official")
    sigmas = make_sigmas(spec).double()
    x = start()
    counter = Counting()
    states = teacher_states(counter, x, sigmas, solver=solver, M=M, schedule=spec, inner_steps=inner)
    assert states.shape == (3, *x.shape)
    assert counter.calls == 2 * (M + 1) * (inner - 1) * 3               # two evaluations per teacher sub-step
    fine = refine_grid(teacher_grid(sigmas, M, spec), inner)             # the refinement, built explicitly
    assert torch.equal(teacher_grid(sigmas, M, spec, inner_steps=inner), fine)
    stride = (M + 1) * (inner - 1)
    assert len(fine) == 3 * stride + 1 and torch.equal(fine[::stride], sigmas)
    for n in range(1, 4):   # the plain solver run to the n-th student point reproduces state n
        plain = get_solver(solver)(gaussian_denoiser, x, fine[: stride * n + 1])
        torch.testing.assert_close(states[n - 1], plain, rtol=0, atol=1e-12)
    wide = teacher_states(gaussian_denoiser, x, sigmas, solver=solver, M=M, schedule=spec)
    assert not torch.allclose(states, wide)                              # the option changes the targets
    exact64 = teacher_states(gaussian_denoiser, x, sigmas, solver=solver, M=M, schedule=spec, inner_steps=inner,
                             inner_dtype="float64")
    assert 0 < float((exact64 - states).abs().max()) < 1e-4


# -- sample.py ---------------------------------------------------------------------------------------------------
def test_sample_cli_runs_the_authors_heun_baseline(tmp_path):
    out = tmp_path / "heun"
    code = sample.main(["--backend", "gmm", "--solver", "heun", "--steps", "3", "--inner-steps", "3", "--afs",
                        "--afs-every-step", "--seeds", "0-1", "--outdir", str(out), "--no-subdirs"])
    assert code == 0
    meta = json.loads((out / "000000.json").read_text())
    assert meta["solver"] == "heun-inner3-afs-every-step" and meta["afs"] is True
    assert meta["solver_options"] == {"inner_steps": 3, "afs_every_step": True}
    assert meta["nfe"]["sequential"] == 3 * 4 - 3                          # each outer step saves one
    plain = tmp_path / "plain"
    assert sample.main(["--backend", "gmm", "--solver", "heun", "--steps", "3", "--seeds", "0", "--outdir",
                        str(plain), "--no-subdirs"]) == 0
    assert "solver_options" not in json.loads((plain / "000000.json").read_text())


@pytest.mark.parametrize("argv,message", [
    (["--solver", "euler", "--steps", "3", "--inner-steps", "3"], "--inner-steps and --afs-every-step apply to"),
    (["--solver", "heun", "--steps", "3", "--afs-every-step"], "give --afs too"),
    (["--solver", "heun", "--steps", "3", "--inner-steps", "1"], "--inner-steps must be >= 2"),
])
def test_sample_cli_refuses_bad_sub_step_flags(tmp_path, capsys, argv, message):
    assert sample.main(["--backend", "gmm", "--seeds", "0", "--outdir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
