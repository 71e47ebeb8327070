"""The model variants beyond SD1.5 / SD3-Medium / FLUX.1-dev, on tiny random pipelines
(:mod:`backends.testing.random_variants`): SD2.1-768-v (v-prediction), an SD with a sample (x0) predicting
scheduler, SD3.5-Medium, SD3.5-Large and FLUX.1-schnell.

* Parity of our Euler and DPM-Solver++(2M) *through* ``backend_from_pipeline(pipe)`` with the diffusers
  pipeline itself, reusing the harness of tests/test_parity_pipelines.py (its module docstring explains
  each detail: same grid read from the scheduler, same prompt embeddings, VE <-> VP start for SD, float flow
  timesteps for DPM) and its tolerances. One addition for FLUX.1-schnell's DPM run: FluxPipeline always
  passes a dynamic ``mu`` to the scheduler, which FlowMatchEuler ignores under a static shift but
  DPMSolverMultistep asserts on, so :class:`StaticShiftDPM` drops it when ``use_dynamic_shifting`` is off
  (schnell's grid is the static ``shift=1.0``, exactly what FlowMatchEuler uses).
* EPD (uniform 2-point table) parallel == sequential through each variant's backend.
* Full-size configs on the meta device give the published parameter counts.
* The v / sample conversion is exact: a network whose output is the exact v (or x0, or eps) of a known x0
  gives ``D == x0`` to 1e-12 in float64, through the real backend and its real UNet call.
* Options: prediction type from the scheduler config / overridden / recorded; SD3.5 variant detection,
  defaults and resolution limit; FLUX.1-schnell's guidance, max_sequence_length and static shift.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import test_parity_pipelines as harness
from backends import backend_from_pipeline, load_backend
from backends.flux import MAX_SEQUENCE_LENGTH
from backends.testing.random_init import build_pipeline
from backends.testing.random_variants import (PUBLISHED_PARAMETERS, STORED_PARAMETERS, TINY_RESOLUTION, VARIANT_BASE,
                                      VARIANTS, stored_parameters, variant_configs)
from backends.sd3 import VARIANT_GUIDANCE, sd3_variant
from solvers.baselines import sample_dpmpp, sample_euler
from solvers.epd import sample_epd
from solvers.schedules import make_sigmas
from solvers.table import uniform_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

NAMES = ("sd21_v", "sd_sample", "sd35_medium", "sd35_large", "flux_schnell")
PREDICTION = {"sd21_v": "v_prediction", "sd_sample": "sample", "sd35_medium": "flow", "sd35_large": "flow",
              "flux_schnell": "flow"}
# Guidance of each backend: the harness's for its base model, none for schnell (no guidance input; the
# pipeline is still given the harness's 3.5, which it ignores for a transformer without guidance_embeds).
GUIDANCE = {"sd21_v": 7.5, "sd_sample": 7.5, "sd35_medium": 4.5, "sd35_large": 4.5, "flux_schnell": None}
# Final-latent tolerance, rel = max|ours - diffusers| / max|diffusers| (float32 CPU): the harness's (2e-5) except
# for sample (x0) prediction. Measured with torch 2.14.1, diffusers 0.42.1, 7 steps, batch 2 (see the report
# printed with -s): sd21_v euler 6.7e-6, dpmpp2m 3.2e-6; sd_sample euler 4.6e-5, dpmpp2m 2.6e-5; sd35_medium,
# sd35_large, flux_schnell <= 1e-6.
# Why sample prediction is larger: the UNet time input differs by up to TIMESTEP_ATOL training steps between us
# and diffusers (the harness's docstring: log-alpha vs linear-sigma interpolation, float64 vs float32
# alphas_cumprod). An eps model's last steps see that error damped by sigma (D = x - sigma eps, sigma -> 0); an
# x0 model's D *is* the network output, so the final latent carries it undamped. In float64 with the time input
# snapped to diffusers' integer DPM timesteps the difference falls to 3.8e-7
# (test_sample_prediction_residual_is_the_time_input), so it is the time map, not the conversion. 1e-4 still
# sits 15x below the int64-truncated-time effect (1.5e-3) and >1000x below reading the UNet as epsilon.
TOL = {name: harness.TOL[base] for name, base in VARIANT_BASE.items()} | {"sd_sample": 1e-4}
# EPD parallel vs sequential: the harness's 1e-5 except sample prediction (batching B vs B*K rows changes the
# UNet's float32 rounding, undamped as above). Measured: sd_sample 1.9e-5, the others <= 2e-6.
EPD_TOL = {name: harness.EPD_TOL for name in VARIANT_BASE} | {"sd_sample": 5e-5}
EXACT_TOL = 1e-12
# Significant digits of the published figures (2.5B, 8.1B, 12B, 865.9M).
PUBLISHED_DIGITS = {"sd35_medium": 2, "sd35_large": 2, "flux_schnell": 2, "sd21_v": 4}


class StaticShiftDPM(harness.FloatTimestepDPM):
    """The harness's float-timestep flow DPM, ignoring the ``mu`` FluxPipeline passes when the scheduler has a
    static shift (as FlowMatchEulerDiscreteScheduler does; module docstring)."""

    def set_timesteps(self, *args, mu=None, **kwargs):
        super().set_timesteps(*args, mu=mu if self.config.use_dynamic_shifting else None, **kwargs)


@pytest.fixture(scope="module")
def pipes():
    """One tiny random pipeline of each variant for the module (tests swap schedulers in and restore them)."""
    out = {}
    for name in NAMES:
        pipe = VARIANTS[name]("tiny", dtype=torch.float32, device="cpu", seed=0)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return out


def make_backend(pipe, name: str, **kwargs):
    extra = {} if VARIANT_BASE[name] == "sd15" else {"max_sequence_length": harness.MAX_SEQ}
    return backend_from_pipeline(pipe, guidance=GUIDANCE[name], resolution=TINY_RESOLUTION[name], **extra,
                                 **kwargs)


def make_scheduler(name: str, solver: str, original):
    scheduler = harness.make_scheduler(VARIANT_BASE[name], solver, original)
    if isinstance(scheduler, harness.FloatTimestepDPM) and not scheduler.config.use_dynamic_shifting:
        scheduler = StaticShiftDPM.from_config(scheduler.config)
    return scheduler


@pytest.mark.parametrize("solver", harness.SOLVERS)
@pytest.mark.parametrize("name", NAMES)
def test_variant_pipeline_parity(pipes, name, solver):
    pipe, base = pipes[name], VARIANT_BASE[name]
    backend = make_backend(pipe, name)
    assert backend.prediction_type == PREDICTION[name]
    cond = backend.encode_prompts(harness.PROMPTS)
    noise = harness.initial_noise(backend, len(harness.PROMPTS))
    scheduler = make_scheduler(name, solver, pipe.scheduler)
    if base == "sd15":      # the swapped-in scheduler predicts what the UNet does
        assert scheduler.config.prediction_type == PREDICTION[name]
    network = backend.network

    theirs_rec = harness.TimeRecorder(network)
    theirs, sigmas = harness.run_pipeline(pipe, base, scheduler, cond, noise, theirs_rec)
    assert sigmas.shape == (harness.STEPS + 1,) and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    if name == "flux_schnell":      # static, unshifted grid: the pipeline's linspace(1, 1/N, N) (Euler)
        assert backend.flow_shift() == (1.0, None)
        if solver == "euler":
            expected = np.linspace(1.0, 1.0 / harness.STEPS, harness.STEPS)
            assert np.allclose(sigmas[:-1].double().numpy(), expected, rtol=0, atol=1e-6)

    if base == "sd15":
        start = noise * harness.vp_start_scale(scheduler, solver, sigmas)
    else:
        start = noise

    def ours_from(condition):
        return harness.solve_ours(backend, solver, start, sigmas, condition)

    with torch.no_grad():
        with harness.TimeRecorder(network) as ours_rec:
            ours = ours_from(cond)
        swapped = ours_from(backend.encode_prompts(harness.PROMPTS[::-1])) if solver == "euler" else None
    assert torch.isfinite(theirs).all() and theirs.shape == ours.shape == start.shape
    rel = harness.relative_error(ours, theirs)
    moved = harness.relative_error(theirs, start)
    print(f"{name:12s} {solver:8s} rel={rel:.2e}  (final vs start {moved:.2f})")
    assert moved > 0.1, "the latents barely changed: the network's output would not be tested"
    if swapped is not None:
        prompt_effect = harness.relative_error(swapped, theirs)
        print(f"             prompts swapped: {prompt_effect:.2f}")
        assert prompt_effect > 0.01, "swapping the prompts barely matters: the conditioning is untested"
    assert rel < TOL[name], f"{name}/{solver}: relative difference {rel:.3e} vs the diffusers pipeline"
    their_t, our_t = theirs_rec.array(), ours_rec.array()
    assert their_t.shape == our_t.shape == (harness.STEPS,)
    if base == "sd15":
        assert np.abs(our_t - their_t).max() < harness.TIMESTEP_ATOL
    else:
        assert np.abs(our_t / their_t - 1).max() < harness.FLOW_TIMESTEP_RTOL


def test_wrong_prediction_type_is_visible(pipes):
    """Guards the parity test: the v-prediction UNet read as epsilon misses diffusers by far more than TOL."""
    name, pipe = "sd21_v", pipes["sd21_v"]
    wrong = make_backend(pipe, name, prediction_type="epsilon")
    cond = wrong.encode_prompts(harness.PROMPTS)
    noise = harness.initial_noise(wrong, len(harness.PROMPTS))
    scheduler = make_scheduler(name, "euler", pipe.scheduler)
    theirs, sigmas = harness.run_pipeline(pipe, "sd15", scheduler, cond, noise, harness.TimeRecorder(wrong.network))
    with torch.no_grad():
        ours = sample_euler(wrong, noise * scheduler.init_noise_sigma, sigmas, cond)
    rel = harness.relative_error(ours, theirs)
    print(f"sd21_v read as epsilon: rel={rel:.2e}")
    assert rel > 1000 * TOL[name]


def test_sample_prediction_residual_is_the_time_input():
    """sd_sample's larger parity residual is the UNet time map alone: in float64, with our fractional timestep
    snapped to diffusers' integer DPM timesteps, our DPM-Solver++(2M) matches the pipeline to ~1e-7."""
    name = "sd_sample"
    pipe = VARIANTS[name]("tiny", dtype=torch.float64, device="cpu", seed=0)
    pipe.set_progress_bar_config(disable=True)
    backend = make_backend(pipe, name)
    exact_time = backend.vp.timestep
    backend.vp.timestep = lambda sigma: torch.round(exact_time(sigma))
    cond = backend.encode_prompts(harness.PROMPTS)
    noise = harness.initial_noise(backend, len(harness.PROMPTS)).double()
    scheduler = make_scheduler(name, "dpmpp2m", pipe.scheduler)
    recorder = harness.TimeRecorder(backend.network)
    theirs, sigmas = harness.run_pipeline(pipe, "sd15", scheduler, cond, noise, recorder)
    sigmas = scheduler.sigmas.double()
    with torch.no_grad(), harness.TimeRecorder(backend.network) as ours_rec:
        ours = sample_dpmpp(backend, noise * torch.sqrt(1 + sigmas[0] ** 2), sigmas, cond, order=2,
                            lower_order_final=True)
    assert np.array_equal(ours_rec.array(), recorder.array())
    rel = harness.relative_error(ours, theirs)
    print(f"sd_sample float64, integer time input: rel={rel:.2e}")
    assert rel < 2e-6


@pytest.mark.parametrize("name", NAMES)
def test_variant_epd_parallel_equals_sequential(pipes, name):
    backend = make_backend(pipes[name], name)
    cond = backend.encode_prompts(harness.PROMPTS)
    table = uniform_table(harness.EPD_GRIDS[VARIANT_BASE[name]], num_points=harness.NUM_POINTS)
    start = harness.initial_noise(backend, len(harness.PROMPTS), seed=99) * float(table.sigmas[0])
    flow = backend.family == "flow"
    steps = len(table.sigmas) - 1
    spy = harness.RowSpy(backend, cond, harness.NUM_POINTS)
    with torch.no_grad():
        parallel = sample_epd(spy, start, table, cond, parallel=True, flow=flow)
        sequential = sample_epd(backend, start, table, cond, parallel=False, flow=flow)
    batch = len(harness.PROMPTS)
    assert spy.rows == [batch, batch * harness.NUM_POINTS] * steps and spy.checked == steps
    rel_seq = harness.relative_error(sequential, parallel)
    moved = harness.relative_error(parallel, start)
    print(f"{name:12s} EPD parallel vs sequential {rel_seq:.2e}, final vs start {moved:.2f}")
    assert torch.isfinite(parallel).all() and moved > 0.05
    assert rel_seq < EPD_TOL[name], f"{name}: EPD parallel vs sequential {rel_seq:.3e}"


def test_full_size_parameter_counts():
    """Each full-size variant, built on the meta device, has its published size (within the published figure's
    rounding) and exactly the count recorded in STORED_PARAMETERS; the structural features are there."""
    for name, components in STORED_PARAMETERS.items():
        pipe = VARIANTS[name]("full", device="meta")
        for component, exact in components.items():
            module = getattr(pipe, component)
            assert all(p.device.type == "meta" for p in module.parameters())
            count = stored_parameters(module)
            print(f"{name:12s} {component:12s} {count:,}")
            assert count == exact, (name, component, count)
            published = PUBLISHED_PARAMETERS[name].get(component)
            if published is not None:     # rounded to the published figure's significant digits
                assert float(f"{count:.{PUBLISHED_DIGITS[name]}g}") == published, (name, component, count)
    medium = variant_configs("sd35_medium", "full")["transformer"]
    large = variant_configs("sd35_large", "full")["transformer"]
    assert medium["qk_norm"] == large["qk_norm"] == "rms_norm"
    assert medium["dual_attention_layers"] == list(range(13)) and large["dual_attention_layers"] == []
    assert (medium["num_layers"], medium["pos_embed_max_size"]) == (24, 384)
    assert (large["num_layers"], large["num_attention_heads"], large["pos_embed_max_size"]) == (38, 38, 192)
    schnell = variant_configs("flux_schnell", "full")
    assert schnell["transformer"]["guidance_embeds"] is False
    assert schnell["scheduler"]["use_dynamic_shifting"] is False and schnell["scheduler"]["shift"] == 1.0
    unet = variant_configs("sd21_v", "full")["unet"]
    assert unet["use_linear_projection"] and unet["cross_attention_dim"] == 1024 and unet["sample_size"] == 96
    # The tiny ones keep the structural features.
    tiny = {n: variant_configs(n, "tiny") for n in NAMES}
    assert tiny["sd35_medium"]["transformer"]["dual_attention_layers"] and \
        tiny["sd35_medium"]["transformer"]["qk_norm"] == "rms_norm"
    assert tiny["sd35_large"]["transformer"]["qk_norm"] == "rms_norm" and \
        not tiny["sd35_large"]["transformer"]["dual_attention_layers"]
    assert tiny["flux_schnell"]["transformer"]["guidance_embeds"] is False
    assert tiny["sd21_v"]["unet"]["use_linear_projection"]


# -- exact conversion --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd21_float64():
    pipe = VARIANTS["sd21_v"]("tiny", dtype=torch.float64, device="cpu", seed=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_exact_prediction_gives_exact_denoiser(sd21_float64, prediction_type):
    """The real UNet runs, and a forward hook replaces its output by the exact eps / v / x0 of a known x0 at the
    sigma of each row (v = alpha eps - alpha sigma x0, Salimans & Ho 2022): D must be x0 to 1e-12 (float64).
    The hook also checks the UNet input is the VP state ``alpha x`` and its time the map's timestep."""
    backend = backend_from_pipeline(sd21_float64, guidance=1.0, prediction_type=prediction_type)
    assert backend.prediction_type == prediction_type and backend.dtype == torch.float64
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([backend.sigma_max, 7.3, 1.0, 0.21, backend.sigma_min], dtype=torch.float64)
    x0 = torch.randn(sigma.numel(), *backend.shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps
    alpha = 1.0 / torch.sqrt(1.0 + s * s)
    exact = {"epsilon": eps, "v_prediction": alpha * eps - alpha * s * x0, "sample": x0}[prediction_type]
    seen = {}

    def replace_output(module, args, kwargs, output):
        sample = args[0]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen["input"] = float((sample - alpha * x).abs().max())
        seen["time"] = float((timestep.double() - backend.vp.timestep(sigma)).abs().max())
        return (exact.clone(),)

    handle = backend.network.register_forward_hook(replace_output, with_kwargs=True)
    try:
        with torch.no_grad():
            denoised = backend(x, sigma, backend.encode_prompts(["a photo"] * sigma.numel()))
    finally:
        handle.remove()
    err = float((denoised - x0).abs().max())
    print(f"{prediction_type:12s} max|D - x0| = {err:.1e}, input {seen['input']:.1e}, time {seen['time']:.1e}")
    assert denoised.dtype == torch.float64 and err < EXACT_TOL
    assert seen["input"] < EXACT_TOL and seen["time"] < 1e-3    # the UNet time input is float32


# -- options -------------------------------------------------------------------------------------------------
def test_prediction_type_from_config_override_and_record(pipes, tmp_path):
    sd21, sample = make_backend(pipes["sd21_v"], "sd21_v"), make_backend(pipes["sd_sample"], "sd_sample")
    assert (sd21.prediction_type, sample.prediction_type) == ("v_prediction", "sample")
    for backend in (sd21, sample):
        assert backend.config()["prediction_type"] == backend.describe()["prediction_type"] == backend.prediction_type
    override = make_backend(pipes["sd_sample"], "sd_sample", prediction_type="v_prediction")
    assert override.prediction_type == "v_prediction" and override.config()["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        make_backend(pipes["sd21_v"], "sd21_v", prediction_type="flow")
    # Through the real loading code (a saved folder with its DDIM scheduler config), under the sd21 alias.
    pipes["sd21_v"].save_pretrained(tmp_path / "sd21v", safe_serialization=True)
    loaded = load_backend("sd21", model_path=str(tmp_path / "sd21v"), device="cpu", dtype="float32")
    assert loaded.prediction_type == "v_prediction" and loaded.default_resolution() == 32
    assert load_backend("sd21", model_path=str(tmp_path / "sd21v"), device="cpu", dtype="float32",
                        prediction_type="epsilon").prediction_type == "epsilon"


def test_zero_terminal_snr_is_refused(pipes):
    from diffusers import DDIMScheduler

    pipe = pipes["sd21_v"]
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, rescale_betas_zero_snr=True)
    try:
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            make_backend(pipe, "sd21_v")
    finally:
        pipe.scheduler = original


def test_sd35_variants(pipes):
    sd3 = build_pipeline("sd3", "tiny")
    expected = {"sd35_medium": "sd3.5-medium", "sd35_large": "sd3.5-large"}
    assert sd3_variant(sd3.transformer.config) == "sd3-medium"
    for name, variant in expected.items():
        pipe = pipes[name]
        assert sd3_variant(pipe.transformer.config) == variant
        assert sd3_variant(variant_configs(name, "full")["transformer"]) == variant
        backend = backend_from_pipeline(pipe)      # defaults
        assert backend.guidance == VARIANT_GUIDANCE[variant] and backend.describe()["variant"] == variant
        assert backend.default_resolution() == 32 and backend.shape == (16, 16, 16)
        assert backend.prediction_type == backend.describe()["prediction_type"] == "flow"
        assert backend.flow_shift() == (3.0, None)
    assert VARIANT_GUIDANCE["sd3.5-large"] == 3.5 and backend_from_pipeline(sd3).guidance == 4.5
    assert backend_from_pipeline(pipes["sd35_large"], guidance=2.0).guidance == 2.0
    # The position embedding's extent: tiny SD3/SD3.5-Large cover 32 patches (128 px), SD3.5-Medium 64 (256 px).
    assert backend_from_pipeline(pipes["sd35_medium"], resolution=256).shape == (16, 128, 128)
    with pytest.raises(ValueError, match="position embedding"):
        backend_from_pipeline(pipes["sd35_large"], resolution=256)
    backend_from_pipeline(pipes["sd35_large"], resolution=128)


def test_flux_schnell_options(pipes):
    schnell_pipe = pipes["flux_schnell"]
    schnell = backend_from_pipeline(schnell_pipe)
    assert schnell.guidance == 1.0 and not schnell.guided and not schnell.embedded_guidance
    assert schnell.max_sequence_length == MAX_SEQUENCE_LENGTH[False] == 256
    assert schnell.config()["max_sequence_length"] == 256 and schnell.describe()["variant"] == "schnell"
    assert schnell.prediction_type == schnell.describe()["prediction_type"] == "flow"
    assert schnell.default_resolution() == 1024
    assert backend_from_pipeline(schnell_pipe, guidance=1.0).guidance == 1.0
    for bad in (3.5, 0.0):
        with pytest.raises(ValueError, match="no guidance input"):
            backend_from_pipeline(schnell_pipe, guidance=bad)
    cond = schnell.encode_prompts(["a red cube"])
    assert cond.embeds.shape[1] == 256         # the default length reached the T5 encoder
    assert backend_from_pipeline(schnell_pipe, max_sequence_length=64).encode_prompts(["a"]).embeds.shape[1] == 64
    # Static shift 1.0 from the scheduler config: both grid variants equal what the scheduler itself gives.
    assert schnell.flow_shift() == (1.0, None)
    for n in (4, 7):
        reference = FlowMatchEulerDiscreteScheduler.from_config(schnell_pipe.scheduler.config)
        reference.set_timesteps(n)
        official = make_sigmas(schnell.default_schedule(n, "official"))
        assert np.allclose(official.numpy(), reference.sigmas[:-1].double().numpy(), rtol=0, atol=1e-7)
        correct = make_sigmas(schnell.default_schedule(n, "correct"))
        assert np.allclose(correct.numpy(), np.linspace(1.0, 1e-3, n), rtol=0, atol=1e-12)
    assert abs(schnell.sigma_min - 1e-3) < 1e-12
    # FLUX.1-dev keeps embedded guidance 3.5, 512 tokens and dynamic shifting.
    dev = backend_from_pipeline(build_pipeline("flux", "tiny"))
    assert dev.embedded_guidance and dev.guidance == 3.5 and dev.max_sequence_length == 512
    assert dev.describe()["variant"] == "dev" and dev.flow_shift()[0] is None
