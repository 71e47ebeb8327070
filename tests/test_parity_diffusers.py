"""Parity of the baseline solvers (solvers/baselines.py) with diffusers' schedulers, in float64.

Each diffusers scheduler is an independent implementation of the same solver. We run it on the exact
analytic GMM model through a fake epsilon-predicting "UNet", run our solver on the very same sigma grid
(``scheduler.sigmas`` in float64) from the very same initial state, and compare the final states:
``rel = max|ours - diffusers| / max|diffusers|``.

Harness details:

* Schedulers are built like Stable Diffusion's (``scaled_linear`` betas 0.00085..0.012, 1000 training steps,
  epsilon prediction). After ``set_timesteps`` their ``sigmas`` (and KDPM2's interpolated ``sigmas_interpol``,
  recomputed with diffusers' own formula from the float64 grid) are made float64, so the scheduler's own
  arithmetic runs in float64.
* The fake UNet sees what a real one sees, the VP-scaled input ``x_VP = x_VE / sqrt(1 + sigma^2)``, and answers
  ``eps = (x_VE - D(x_VE, sigma)) / sigma``. The sigma it is evaluated at is read from the scheduler's state
  (``step_index``, ``state_in_first_order``, ``sigmas`` / ``sigmas_interpol``); the sequence of evaluation
  sigmas is also checked against the one our solver uses.
* Euler/Heun/KDPM2 keep the sample in VE coordinates (``scale_model_input`` divides by ``sqrt(sigma^2 + 1)``);
  DPMSolverMultistep and UniPC keep it in VP coordinates, ``x_VP = x_VE / sqrt(1 + sigma^2)``. The grids end in
  sigma = 0, where both coordinates coincide. Both sides start from the same VE state ``noise * sigma_0``
  (not the pipelines' ``noise * init_noise_sigma``: that is a pipeline convention, not part of the solver).
* EulerDiscreteScheduler.step and DPMSolverMultistepScheduler.step cast the sample to float32 ("upcast", which
  for a float64 sample is a downcast), rounding the state to float32 on every step. For the float64 parity
  tests we make ``torch.float32`` mean float64 inside those two scheduler modules while stepping; a separate
  test runs the untouched schedulers and checks the 1e-5 bound there.
"""

from __future__ import annotations

import copy
import sys
from functools import lru_cache

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    UniPCMultistepScheduler,
)

from backends.analytic import make_analytic
from solvers.baselines import sample_dpm2, sample_dpmpp, sample_euler, sample_heun, sample_unipc

# diffusers' set_timesteps trips numpy-2 DeprecationWarnings (thousands per KDPM2 scheduler); not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DTYPE = torch.float64
STEPS = (5, 10, 15, 20)          # < 15 and >= 15: both sides of DPM-Solver++'s lower_order_final threshold
KARRAS = (False, True)
TOL_FLOAT64 = 1e-10              # all-float64 runs (measured: ~1e-15)
TOL_FLOAT32_STATE = 1e-5         # untouched diffusers that rounds the state to float32 each step

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")

# name -> (scheduler class, extra scheduler config, our solver, our solver kwargs, VP state?)
CASES = {
    "euler": (EulerDiscreteScheduler, {}, sample_euler, {}, False),
    "heun": (HeunDiscreteScheduler, {}, sample_heun, {}, False),
    "dpm2": (KDPM2DiscreteScheduler, {}, sample_dpm2, {}, False),
    "dpmpp2m": (DPMSolverMultistepScheduler,
                dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                     final_sigmas_type="zero"),
                sample_dpmpp, dict(order=2, lower_order_final=True), True),
    "dpmpp3m": (DPMSolverMultistepScheduler,
                dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="midpoint", lower_order_final=True,
                     final_sigmas_type="zero"),
                sample_dpmpp, dict(order=3, lower_order_final=True), True),
    "unipc2": (UniPCMultistepScheduler,
               dict(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
                    final_sigmas_type="zero"),
               sample_unipc, dict(order=2, lower_order_final=True, use_corrector=True), True),
    "unipc3": (UniPCMultistepScheduler,
               dict(solver_order=3, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
                    final_sigmas_type="zero"),
               sample_unipc, dict(order=3, lower_order_final=True, use_corrector=True), True),
}

# Scheduler modules whose step() rounds the sample to float32.
FLOAT32_STATE = ("euler", "dpmpp2m", "dpmpp3m")


class _Float64Torch:
    """``torch`` as seen by one diffusers scheduler module, except that ``torch.float32`` is float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture(scope="module")
def model():
    return make_analytic("gmm")


@pytest.fixture(scope="module")
def start():
    gen = torch.Generator().manual_seed(1234)
    noise = torch.randn(4, 1, 8, 8, generator=gen, dtype=DTYPE)
    cond = torch.tensor([3, -1, 7, 0], dtype=torch.long)        # conditional and unconditional samples
    return noise, cond


@lru_cache(maxsize=None)
def _prototype(name: str, karras: bool):
    """Construction runs set_timesteps(1000) (slow for Heun/KDPM2), so build once and deep-copy."""
    cls, extra, *_ = CASES[name]
    return cls(**SD_BETAS, use_karras_sigmas=karras, **extra)


def make_scheduler(name: str, steps: int, karras: bool):
    sched = copy.deepcopy(_prototype(name, karras))
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    sched.sigmas = sched.sigmas.to(DTYPE)
    if hasattr(sched, "sigmas_interpol"):
        # KDPM2's log-midpoints, recomputed in float64 with set_timesteps' own formula.
        base = torch.unique_consecutive(sched.sigmas)
        interpol = base.log().lerp(base.roll(1).log(), 0.5).exp()
        full = torch.cat([interpol[:1], interpol[1:].repeat_interleave(2), interpol[-1:]])
        assert full.shape == sched.sigmas_interpol.shape
        torch.testing.assert_close(full[1:], sched.sigmas_interpol[1:].to(DTYPE), rtol=1e-6, atol=0)
        sched.sigmas_interpol = full
    return sched


def current_sigma(sched) -> torch.Tensor:
    """The sigma the scheduler's next ``step`` treats the model output as evaluated at."""
    i = sched.step_index
    if isinstance(sched, KDPM2DiscreteScheduler) and not sched.state_in_first_order:
        return sched.sigmas_interpol[i]
    # Euler, DPM-Solver++, UniPC: sigmas[i]; Heun: sigmas[i] in both stages (grid stored as s0, s1, s1, s2, ...).
    return sched.sigmas[i]


def run_diffusers(sched, model, x_ve: torch.Tensor, cond: torch.Tensor, vp: bool):
    """The diffusers sampling loop with a fake epsilon UNet; returns the final (sigma = 0) state and the
    sigmas the model was evaluated at."""
    sigma0 = sched.sigmas[0]
    sample = x_ve / torch.sqrt(1 + sigma0 ** 2) if vp else x_ve.clone()
    seen = []
    for t in sched.timesteps:
        model_input = sched.scale_model_input(sample, t)
        if sched.step_index is None:             # DPM/UniPC's scale_model_input does not set it; step would
            sched._init_step_index(t)
        sigma = current_sigma(sched)
        seen.append(sigma)
        if not vp:                               # VE sample: the UNet input must be the VP-scaled state
            torch.testing.assert_close(model_input, sample / torch.sqrt(1 + sigma ** 2), rtol=1e-15, atol=0)
        x_eval = model_input * torch.sqrt(1 + sigma ** 2)                       # back to VE coordinates
        sig_b = sigma.expand(x_eval.shape[0])
        eps = (x_eval - model(x_eval, sig_b, cond)) / sigma
        sample = sched.step(eps, t, sample).prev_sample
    assert sched.sigmas[-1] == 0
    return sample, torch.stack(seen)


def run_ours(name: str, sched, model, x_ve: torch.Tensor, cond: torch.Tensor):
    _, _, solver, kwargs, _ = CASES[name]
    grid = torch.unique_consecutive(sched.sigmas)       # Heun/KDPM2 store interior sigmas twice
    if name in ("heun", "dpm2"):
        assert len(grid) == sched.num_inference_steps + 1
    else:
        assert torch.equal(grid, sched.sigmas)
    seen = []

    def denoiser(x, sigma, c):
        assert x.dtype == DTYPE and sigma.shape == (x.shape[0],)
        seen.append(sigma[0])
        return model(x, sigma, c)

    return solver(denoiser, x_ve.clone(), grid, cond, **kwargs), torch.stack(seen)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def parity(name: str, steps: int, karras: bool, model, start, float64_state: bool) -> float:
    noise, cond = start
    sched = make_scheduler(name, steps, karras)
    x_ve = noise * sched.sigmas[0]
    vp = CASES[name][4]
    with pytest.MonkeyPatch.context() as mp:
        if float64_state and name in FLOAT32_STATE:
            mp.setattr(sys.modules[type(sched).__module__], "torch", _Float64Torch())
        ref, ref_sigmas = run_diffusers(sched, model, x_ve, cond, vp)
    ours, our_sigmas = run_ours(name, sched, model, x_ve, cond)
    assert ref.dtype == DTYPE and ours.dtype == DTYPE and torch.isfinite(ref).all()
    # Same model evaluations at the same noise levels (KDPM2's midpoint: sqrt(a b) vs exp(lerp(log)) -> ulps).
    assert our_sigmas.shape == ref_sigmas.shape
    torch.testing.assert_close(our_sigmas, ref_sigmas, rtol=1e-13, atol=0)
    rel = relative_error(ours, ref)
    print(f"{name:8s} steps={steps:2d} karras={karras!s:5s} float64_state={float64_state!s:5s} rel={rel:.2e}")
    return rel


@pytest.mark.parametrize("karras", KARRAS, ids=["default", "karras"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(CASES))
def test_parity_float64(name, steps, karras, model, start):
    rel = parity(name, steps, karras, model, start, float64_state=True)
    assert rel < TOL_FLOAT64, f"{name}: relative error {rel:.3e} vs diffusers"


@pytest.mark.parametrize("karras", KARRAS, ids=["default", "karras"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", FLOAT32_STATE)
def test_parity_untouched_diffusers(name, steps, karras, model, start):
    """Without the float64 patch diffusers rounds the state to float32 each step; still well inside 1e-5."""
    rel = parity(name, steps, karras, model, start, float64_state=False)
    assert rel < TOL_FLOAT32_STATE, f"{name}: relative error {rel:.3e} vs diffusers"


def test_float64_patch_is_what_removes_the_float32_rounding(model, start):
    """Guards the harness: the patch must matter (else the float32 path was never taken) and must not leak."""
    import diffusers.schedulers.scheduling_euler_discrete as euler_module

    rounded = parity("euler", 10, False, model, start, float64_state=False)
    exact = parity("euler", 10, False, model, start, float64_state=True)
    assert exact < TOL_FLOAT64 < rounded
    assert euler_module.torch is torch
