"""solvers.k_diffusion: our samplers in k-diffusion's calling convention (docs/backends/k_diffusion.md).

1. Called the k-diffusion way on the analytic GMM (float64) they equal our native path exactly; callback, bar
   and the EPD grid rule.
2. Through k-diffusion itself: its ``DiscreteEpsDDPMDenoiser`` around a tiny random-weight diffusers UNet that
   predicts epsilon; our Euler/Heun/DPM-2/DPM++(2M) equal k-diffusion's own samplers, our DPM++(3M) differs
   from k-diffusion's (eta = 0) 3M only in its second-order warm-up step, and EPD equals the native path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backends import load_backend
from solvers import k_diffusion as kd
from solvers.core import seeded_noise
from solvers.epd import sample_epd as native_epd
from solvers.registry import get_solver
from solvers.schedules import polynomial_sigmas
from solvers.table import load_table, uniform_table

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "exps" / "gmm" / "epd-nfe5.pkl"
KEYS = {"x", "i", "sigma", "sigma_hat", "denoised"}
# k-diffusion-like name -> registry name
BASELINES = {"euler": "euler", "heun": "heun", "dpm_2": "dpm2", "dpmpp_2m": "dpmpp2m", "dpmpp_3m": "dpmpp3m",
             "unipc": "unipc", "ipndm": "ipndm"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is as fast, and avoids OpenMP's spinning threads stalling
    on a busy 2-core machine (it made this file's run time vary by 5x). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 1. the convention on the analytic model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def gmm():
    model = load_backend("gmm")
    assert model.shape == (1, 8, 8) and model.state_dtype == torch.float64
    return model


def k_model(backend):
    """The analytic denoiser as a k-diffusion model: ``model(x, sigma[B], **extra_args)``."""
    def model(x, sigma, cond=None):
        assert sigma.shape == (x.shape[0],), "sigma must reach the model as a [B] tensor (sigma * s_in)"
        return backend(x, sigma, cond)
    return model


LABELS = torch.tensor([3, -1, 7])     # per-sample class labels, -1 unconditional


def noise(batch=3):
    return seeded_noise(range(batch), (1, 8, 8), torch.float64)


GRID = polynomial_sigmas(6, 0.002, 80.0).to(torch.float64)
GRID_ZERO = torch.cat([GRID, GRID.new_zeros(1)])


def test_names_and_registry():
    assert set(kd.SAMPLERS) == set(BASELINES) | {"epd"}
    assert set(kd.__all__) >= {f"sample_{name}" for name in kd.SAMPLERS} | {"SAMPLERS"}
    for name, fn in kd.SAMPLERS.items():
        assert fn.__name__ == f"sample_{name}" and getattr(kd, fn.__name__) is fn
        assert "k-diffusion convention" in fn.__doc__


@pytest.mark.parametrize("sigmas", [GRID_ZERO, GRID], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("cond", [None, LABELS], ids=["uncond", "labels"])
def test_baselines_equal_native(gmm, name, sigmas, cond):
    x = noise() * sigmas[0]
    native = get_solver(BASELINES[name])(gmm, x, sigmas, cond)
    extra = None if cond is None else {"cond": cond}
    ours = kd.SAMPLERS[name](k_model(gmm), x, sigmas, extra_args=extra, disable=True)
    assert torch.isfinite(native).all()
    assert torch.equal(ours, native)


def test_options_reach_the_solver(gmm):
    x = noise() * GRID_ZERO[0]
    native = get_solver("dpmpp3m")(gmm, x, GRID_ZERO, None, afs=True, lower_order_final=False)
    ours = kd.sample_dpmpp_3m(k_model(gmm), x, GRID_ZERO, disable=True, afs=True, lower_order_final=False)
    assert torch.equal(ours, native)
    assert not torch.equal(ours, kd.sample_dpmpp_3m(k_model(gmm), x, GRID_ZERO, disable=True))


@pytest.mark.parametrize("name", ["heun", "unipc"])
def test_callback_is_k_diffusions(gmm, name):
    """Once per step, k-diffusion's keys, ``x`` the state where ``denoised`` was evaluated."""
    x = noise() * GRID_ZERO[0]
    native_reports, reports = [], []
    get_solver(BASELINES[name])(gmm, x, GRID_ZERO, LABELS, callback=native_reports.append)
    kd.SAMPLERS[name](k_model(gmm), x, GRID_ZERO, {"cond": LABELS}, callback=reports.append, disable=True)
    assert len(reports) == len(GRID_ZERO) - 1
    states = [x] + [r["x"] for r in native_reports[:-1]]     # native reports the state after each step
    for i, (report, native, state) in enumerate(zip(reports, native_reports, states)):
        assert set(report) == KEYS and report["i"] == i
        assert float(report["sigma"]) == float(report["sigma_hat"]) == float(GRID_ZERO[i])
        assert torch.equal(report["x"], state) and torch.equal(report["denoised"], native["denoised"])
    assert torch.equal(reports[0]["denoised"], gmm(x, GRID_ZERO[0].expand(3), LABELS))


def test_disable_hides_the_bar(gmm, capsys):
    x = noise() * GRID_ZERO[0]
    kd.sample_euler(k_model(gmm), x, GRID_ZERO, disable=True)
    kd.sample_epd(k_model(gmm), x, None, disable=True, table=TABLE)
    assert capsys.readouterr().err == ""
    kd.sample_euler(k_model(gmm), x, GRID_ZERO, disable=False)
    err = capsys.readouterr().err
    assert f"{len(GRID_ZERO) - 1}/{len(GRID_ZERO) - 1}" in err


def test_extra_args_repeat_only_per_sample_tensors():
    labels, text = torch.tensor([1, 2]), torch.arange(12.0).view(2, 3, 2)
    shared, options = torch.ones(5), {"transformer_options": {"patches": [1]}}
    extra = kd.ExtraArgs({"cond": labels, "ctx": text, "shared": shared, "scale": 7.5, "opts": options}, 2)
    rep = extra.repeat_interleave(3)
    assert rep.batch == 6 and rep.kwargs["cond"].tolist() == [1, 1, 1, 2, 2, 2]
    assert torch.equal(rep.kwargs["ctx"], text.repeat_interleave(3, dim=0))
    assert rep.kwargs["shared"] is shared and rep.kwargs["scale"] == 7.5 and rep.kwargs["opts"] is options


@pytest.fixture(scope="module")
def table():
    assert TABLE.is_file(), f"{TABLE} is missing"
    return load_table(TABLE)


def test_epd_equals_native_on_the_tables_grid(gmm, table):
    x = noise() * float(table.sigmas[0])
    native = native_epd(gmm, x, table, LABELS)
    grid = torch.tensor(table.sigmas)
    with_zero = torch.cat([grid, grid.new_zeros(1)])
    for sigmas in (None, grid, with_zero, with_zero.float(), table.sigmas.tolist() + [0.0]):
        reports = []
        ours = kd.sample_epd(k_model(gmm), x, sigmas, {"cond": LABELS}, callback=reports.append, disable=True,
                             table=table)
        assert torch.equal(ours, native)      # a trailing 0 adds no denoising step, as in sample.py
        assert [r["i"] for r in reports] == list(range(len(table.sigmas) - 1))
        assert all(set(r) == KEYS for r in reports) and torch.equal(reports[0]["x"], x)
    from_path = kd.sample_epd(k_model(gmm), x, None, {"cond": LABELS}, disable=True, table=str(TABLE))
    assert torch.equal(from_path, native)
    batches = []

    def one_batch(xs, sigma, cond=None):
        batches.append(xs.shape[0])
        return gmm(xs, sigma, cond)

    serial = kd.sample_epd(one_batch, x, None, {"cond": LABELS}, disable=True, table=table, parallel=False)
    assert torch.equal(serial, native_epd(gmm, x, table, LABELS, parallel=False)) and set(batches) == {3}
    torch.testing.assert_close(serial, native, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["other", "shifted", "truncated", "nonzero-tail"])
def test_epd_refuses_other_grids(gmm, table, kind):
    grid = np.asarray(table.sigmas, dtype=np.float64)
    shifted = grid.copy()
    shifted[1] *= 1 + 1e-4
    sigmas = {"other": polynomial_sigmas(len(grid), 0.002, 80.0).numpy(),   # same length and ends, EDM's rho=7
              "shifted": shifted,                                            # one value off by 1e-4
              "truncated": grid[:-1],                                        # a prefix of the table's grid
              "nonzero-tail": np.r_[grid, 1e-3]}[kind]                       # one more sigma > 0
    x = noise() * float(grid[0])
    with pytest.raises(ValueError, match="fitted on its own sigma grid") as err:
        kd.sample_epd(k_model(gmm), x, torch.tensor(sigmas), disable=True, table=table)
    assert "6.95024" in str(err.value) and "table sigmas" in str(err.value) and "given sigmas" in str(err.value)


# -- 2. through k-diffusion itself ------------------------------------------------------------------------
def _import_k_diffusion():
    """``(k_diffusion.sampling, k_diffusion.external, bare)``, ``bare`` telling whether the bare package was used.

    ``import k_diffusion`` runs its ``__init__``, which imports every submodule, the training and evaluation
    ones too (scikit-image, jsonmerge, clean-fid, clip, dctorch, einops; clip also needs ``pkg_resources``,
    gone from current setuptools). We install none of them, so when that import fails the package is set up
    as a bare package object (its spec, its ``__path__``, no ``__init__`` run) and the two numeric modules
    are imported from it: the same files, needing only torchsde, torchdiffeq, scipy, pillow, safetensors and
    torchvision. Missing k-diffusion skips, except in CI (``make install`` installs it there).
    """
    if importlib.util.find_spec("k_diffusion") is None:
        if os.environ.get("CI"):
            pytest.fail("k-diffusion is not installed: `make install` installs it (docs/backends/k_diffusion.md)")
        pytest.importorskip("k_diffusion", reason="k-diffusion is not installed; `make install` installs it")
    bare = False
    try:
        import k_diffusion  # noqa: F401  (works when all of its extras are installed)
    except ImportError:
        _forget_k_diffusion()
        sys.modules["k_diffusion"] = importlib.util.module_from_spec(importlib.util.find_spec("k_diffusion"))
        bare = True
    return (pytest.importorskip("k_diffusion.sampling", reason="k_diffusion.sampling does not import"),
            pytest.importorskip("k_diffusion.external", reason="k_diffusion.external does not import"), bare)


def _forget_k_diffusion() -> None:
    for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
        del sys.modules[name]


class _EpsUNet(torch.nn.Module):
    """What ``DiscreteEpsDDPMDenoiser`` calls: ``inner_model(x * c_in, t, **extra_args) -> eps``."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.unet(x, t, **kwargs).sample


@pytest.fixture(scope="module")
def kdiff():
    sampling, external, bare = _import_k_diffusion()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).to(torch.float64).eval()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2   # SD's scaled_linear
    model = external.DiscreteEpsDDPMDenoiser(_EpsUNet(unet), torch.cumprod(1 - betas, 0), quantize=False)
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)      # per-sample encoder_hidden_states
    start = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    yield {"sampling": sampling, "model": model, "extra": {"encoder_hidden_states": context}, "noise": start}
    if bare:
        _forget_k_diffusion()          # leave no half-initialised package behind for later imports


def _grids(kdiff):
    model, sampling = kdiff["model"], kdiff["sampling"]
    karras = sampling.get_sigmas_karras(6, float(model.sigma_min), float(model.sigma_max)).to(torch.float64)
    return {"get_sigmas": model.get_sigmas(6), "karras": karras}


# Euler and Heun do the very same float operations as k-diffusion (Heun's step to 0 is Euler in both): equal
# bit for bit. DPM-2 and DPM++(2M) are the same formulas arranged differently (midpoint sqrt(s s') vs
# exp(lerp(log)); D + (D - D_old)/(2r) vs (1 + 1/2r) D - D_old/2r; log(1/s) vs -log s): measured at most
# 3.2e-16 and 9.7e-16 of max|x| in float64 on these grids; the bound leaves a factor ~100.
TOLERANCE = {"euler": 0.0, "heun": 0.0, "dpm_2": 1e-13, "dpmpp_2m": 1e-13}


@pytest.mark.parametrize("grid", ["get_sigmas", "karras"])
@pytest.mark.parametrize("name", list(TOLERANCE))
def test_equals_k_diffusion_samplers(kdiff, name, grid):
    model, extra = kdiff["model"], kdiff["extra"]
    sigmas = _grids(kdiff)[grid]
    assert sigmas[-1] == 0 and sigmas.dtype == torch.float64
    x = kdiff["noise"] * sigmas[0]
    ref_reports, reports = [], []
    ref = getattr(kdiff["sampling"], f"sample_{name}")(model, x, sigmas, extra_args=extra,
                                                       callback=ref_reports.append, disable=True)
    ours = kd.SAMPLERS[name](model, x, sigmas, extra_args=extra, callback=reports.append, disable=True)
    scale = ref.abs().max().item()
    assert torch.isfinite(ref).all() and scale > 1e-3
    assert (ours - ref).abs().max().item() <= TOLERANCE[name] * scale
    assert len(reports) == len(ref_reports) == len(sigmas) - 1
    for mine, theirs in zip(reports, ref_reports):
        assert set(mine) == set(theirs) == KEYS and mine["i"] == theirs["i"]
        assert float(mine["sigma"]) == float(theirs["sigma"]) and float(mine["sigma_hat"]) == float(theirs["sigma_hat"])
        for key in ("x", "denoised"):
            assert (mine[key] - theirs[key]).abs().max().item() <= TOLERANCE[name] * scale


def test_dpmpp_2m_without_final_zero(kdiff):
    """On a grid ending at sigma_min, our default ``lower_order_final`` makes the last of < 15 steps first
    order, k-diffusion keeps it second order (documented); without it the two agree to rounding."""
    model, extra = kdiff["model"], kdiff["extra"]
    sigmas = model.get_sigmas(6)[:-1]
    x = kdiff["noise"] * sigmas[0]
    ref = kdiff["sampling"].sample_dpmpp_2m(model, x, sigmas, extra_args=extra, disable=True)
    scale = ref.abs().max().item()
    same = kd.sample_dpmpp_2m(model, x, sigmas, extra, disable=True, lower_order_final=False)
    assert (same - ref).abs().max().item() <= 1e-13 * scale
    default = kd.sample_dpmpp_2m(model, x, sigmas, extra, disable=True)
    assert (default - ref).abs().max().item() > 1e-4 * scale


def test_dpmpp_3m_differs_from_k_diffusion_only_in_the_warm_up(kdiff):
    """A genuine difference, documented: our 3M's second-order warm-up step is 2M's "midpoint" update
    ``- 0.5 expm1(-h) D1`` (diffusers), k-diffusion's ``sample_dpmpp_3m_sde`` (eta = 0) uses
    ``+ (expm1(-h)/h + 1) D1`` there, with ``D1 = (D_1 - D_0)/r``; both second order, their third-order steps
    are the same formula. (With fewer than 15 steps our default ``lower_order_final`` also lowers the order of
    the second-to-last step, so that comparison runs with ``lower_order_final=False``.)"""
    model, extra = kdiff["model"], kdiff["extra"]
    sigmas = model.get_sigmas(6)
    x = kdiff["noise"] * sigmas[0]
    ref, ours = [], []
    kdiff["sampling"].sample_dpmpp_3m_sde(model, x, sigmas, extra_args=extra, callback=ref.append, disable=True,
                                           eta=0.0, noise_sampler=lambda sigma, sigma_next: None)
    kd.sample_dpmpp_3m(model, x, sigmas, extra, callback=ours.append, disable=True, lower_order_final=False)
    scale = x.abs().max().item()
    for step in (0, 1):        # the state before step 1 comes from a first-order step: the same in both
        assert (ours[step]["x"] - ref[step]["x"]).abs().max().item() <= 1e-13 * scale
    lam = lambda s: -torch.log(s)  # noqa: E731
    h, h_0 = lam(sigmas[2]) - lam(sigmas[1]), lam(sigmas[1]) - lam(sigmas[0])
    phi = torch.expm1(-h)
    d1 = (ours[1]["denoised"] - ours[0]["denoised"]) / (h_0 / h)
    expected = (-0.5 * phi - (phi / h + 1)) * d1
    gap = ours[2]["x"] - ref[2]["x"]
    assert expected.abs().max().item() > 1e-3 * scale            # a real difference, not rounding
    assert (gap - expected).abs().max().item() <= 1e-12 * scale  # and exactly the warm-up formula's


def test_epd_on_the_wrapped_model(kdiff):
    """EPD in the k-diffusion convention on k-diffusion's wrapper equals the native sampler with a denoiser
    built from the same wrapper; per-sample ``extra_args`` are repeated for the B*K point batch."""
    model, extra = kdiff["model"], kdiff["extra"]
    sigmas = model.get_sigmas(5)                                   # ends in 0
    table = uniform_table(sigmas[:-1].numpy(), num_points=2)
    x = kdiff["noise"] * sigmas[0]
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return model(*args, **kwargs)

    reports = []
    ours = kd.sample_epd(counted, x, sigmas, extra, callback=reports.append, disable=True, table=table)
    native = native_epd(lambda xs, sigma, cond: model(xs, sigma, encoder_hidden_states=cond), x, table,
                        extra["encoder_hidden_states"])
    assert torch.isfinite(native).all() and torch.equal(ours, native)
    assert calls == [2, 4] * (len(sigmas) - 2) and len(reports) == len(sigmas) - 2
    with pytest.raises(ValueError, match="fitted on its own sigma grid"):
        kd.sample_epd(model, x, model.get_sigmas(6), extra, disable=True, table=table)
