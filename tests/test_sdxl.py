"""The SDXL backend (backends/sdxl.py) on a tiny random-weight ``StableDiffusionXLPipeline``.

* Parity of our Euler and DPM-Solver++(2M) through ``backend_from_pipeline(pipe)`` with diffusers' SDXL pipeline
  itself, with the harness of tests/test_parity_pipelines.py (its helpers are imported): the pipeline gets our
  prompt embeddings (embeds, pooled, and the zero negative ones of ``force_zeros_for_empty_prompt``) and fixed
  latents, we integrate on the sigma grid its scheduler used from the matching start state, final latents are
  compared at SD1.5's tolerance. SDXL's scheduler uses ``timestep_spacing="leading"``, so Euler's
  ``init_noise_sigma`` is ``sqrt(1 + sigma_0^2)`` (a VP start, unlike SD1.5's linspace Euler): the harness's rule
  "Euler: latents * init_noise_sigma, DPM: latents * sqrt(1 + sigma_0^2)" covers both. The UNet's time input and
  the micro-conditions it receives (``added_cond_kwargs``) are recorded on both sides and compared; with negative
  micro-conditions that differ from the positive ones too, there at batch 1: diffusers 0.42.1 builds the time ids
  of a CFG batch as ``cat([neg, pos]).repeat(B, 1)``, i.e. rows ``neg, pos, neg, pos, ...``, while its latent rows
  are ``B`` unconditional then ``B`` conditional ones, so for ``B > 1`` with negative sizes its rows are
  mismatched (:func:`test_diffusers_mismatches_negative_time_ids_at_batch_2` shows it; ours are aligned).
* EPD (uniform 2-point table) parallel == sequential, with every row of the parallel call carrying the condition
  and the time ids of its image (``b*K + k`` order); ``max_batch`` chunking changes nothing.
* Loading: ``load_backend("sdxl", model_path=DIR)``, one-line errors, the registry's class dispatch, the contract.
* Both stages through the registry name: a short distillation and a short RDPO run (stand-in ``image_contrast``
  reward), each producing a valid table whose metadata names ``sdxl`` and that samples through sample.py.
* bench/gpu_latency.py's ``sdxl`` model on the CPU with the tiny config.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backends import backend_from_pipeline, check_backend, load_backend, options_from_table
from backends.diffusers_base import ModelNotFoundError
from backends.ldm import StableDiffusionBackend
from backends.testing.random_init import PUBLISHED_PARAMETERS, TINY_RESOLUTION, build_pipeline, count_parameters
from backends.sdxl import SDXLBackend, sdxl_time_ids
from solvers.epd import sample_epd
from solvers.table import load_table, save_table, uniform_table
from test_parity_pipelines import (EPD_TOL, PROMPTS, STEPS, TIMESTEP_ATOL, TOL, NetworkRows, RowSpy, TimeRecorder,
                                   initial_noise, make_scheduler, relative_error, solve_ours, vp_start_scale)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = ROOT / "src" / "prompts" / "eval.txt"
RES = TINY_RESOLUTION["sdxl"]
GUIDANCE = 5.0
# SDXL parity tolerance: the SD1.5 one of the harness (2e-5; both are discrete-VP UNets whose VE state starts at
# ~14.6x the noise). Measured (torch 2.14.1, diffusers 0.42.1, 7 steps, batch 2, float32 CPU, `-s` prints them):
# euler 9.8e-7, dpmpp2m 1.65e-6, euler with negative micro-conditions (batch 1) 1.0e-6; UNet time input
# max |ours - theirs| 2.6e-4 steps (integer "leading" timesteps on both solvers); EPD parallel vs sequential and
# chunked vs unchunked 5.9e-7. Changing the micro-conditions moves the result by 1.7e-2 (~850x the tolerance),
# swapping the prompts by 0.09.
SDXL_TOL = TOL["sd15"]
EPD_GRID = [14.6146, 4.0, 1.0, 0.2]
# negative micro-conditions that differ from the positive ones (diffusers: negative_original_size/target_size)
NEGATIVE_SIZES = {"negative_original_size": (16, 16), "negative_target_size": (RES, RES)}


@pytest.fixture(scope="module")
def pipe():
    pipe = build_pipeline("sdxl", "tiny", dtype=torch.float32, device="cpu", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_dir(pipe, tmp_path_factory):
    """The tiny pipeline saved in diffusers format (what ``backends.testing.random_init`` writes)."""
    folder = tmp_path_factory.mktemp("sdxl-tiny") / "sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_backend(pipe, **kwargs) -> SDXLBackend:
    return backend_from_pipeline(pipe, **{"guidance": GUIDANCE, "resolution": RES, **kwargs})


class AddedCondRecorder:
    """Records ``added_cond_kwargs`` (time ids and pooled embeddings) of every UNet call."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.calls, self.handle = unet, [], None

    def _hook(self, module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        self.calls.append({k: v.detach().clone().float() for k, v in added.items()})

    def __enter__(self):
        self.calls = []
        self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_pipeline(pipe, scheduler, cond, noise, recorders, steps: int = STEPS, **call_kwargs):
    """diffusers' SDXL sampling loop with our embeddings and fixed latents; returns (final latents, sigmas)."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        with torch.no_grad():
            for r in recorders:
                r.__enter__()
            try:
                out = pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.neg_embeds,
                           pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=cond.neg_pooled,
                           latents=noise.clone(), height=RES, width=RES, num_inference_steps=steps,
                           guidance_scale=GUIDANCE, output_type="latent", return_dict=False, **call_kwargs)[0]
            finally:
                for r in recorders:
                    r.__exit__()
    finally:
        pipe.scheduler = original
    return out, scheduler.sigmas.detach().clone().float()


# -- parity with diffusers' pipeline ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["euler", "dpmpp2m", "euler-negative-sizes"])
def test_pipeline_parity(pipe, case):
    solver = case.split("-")[0]
    sizes = NEGATIVE_SIZES if case.endswith("negative-sizes") else {}
    prompts = PROMPTS[:1] if sizes else PROMPTS       # batch 1: see the module docstring
    backend = make_backend(pipe, **sizes)
    cond = backend.encode_prompts(prompts)
    assert torch.equal(cond.neg_embeds, torch.zeros_like(cond.embeds))          # force_zeros_for_empty_prompt
    assert torch.equal(cond.neg_pooled, torch.zeros_like(cond.pooled))
    noise = initial_noise(backend, len(prompts))
    scheduler = make_scheduler("sd15", solver, pipe.scheduler)    # the harness's discrete-VP schedulers
    assert scheduler.config.timestep_spacing == "leading"

    their_t, their_added = TimeRecorder(pipe.unet), AddedCondRecorder(pipe.unet)
    theirs, sigmas = run_pipeline(pipe, scheduler, cond, noise, [their_t, their_added], **sizes)
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    init = vp_start_scale(scheduler, solver, sigmas)
    assert float(init) == pytest.approx(float(torch.sqrt(1 + sigmas[0] ** 2)), rel=1e-6)   # "leading": VP start
    start = noise * init

    with torch.no_grad(), TimeRecorder(pipe.unet) as our_t, AddedCondRecorder(pipe.unet) as our_added:
        mine = solve_ours(backend, solver, start, sigmas, cond)
    rel = relative_error(mine, theirs)
    moved = relative_error(theirs, start)
    print(f"sdxl {case:22s} rel={rel:.2e} (final vs start {moved:.2f})")
    assert torch.isfinite(theirs).all() and moved > 0.1
    assert rel < SDXL_TOL, f"sdxl/{case}: relative difference {rel:.3e} vs the diffusers pipeline"

    t_err = np.abs(our_t.array() - their_t.array()).max()
    print(f"     UNet timesteps {np.round(their_t.array(), 3).tolist()}: max |ours - theirs| = {t_err:.2e}")
    assert our_t.array().shape == (STEPS,) and t_err < TIMESTEP_ATOL
    # the UNet saw the same micro-conditions and pooled embeddings, row for row, on every call
    assert len(our_added.calls) == len(their_added.calls) == STEPS
    for a, b in zip(our_added.calls, their_added.calls):
        assert torch.equal(a["time_ids"], b["time_ids"]) and torch.equal(a["text_embeds"], b["text_embeds"])
    first, n = our_added.calls[0]["time_ids"], len(prompts)
    expected_neg = [16.0, 16.0, 0.0, 0.0, RES, RES] if sizes else [RES, RES, 0.0, 0.0, RES, RES]
    assert first[:n].tolist() == [expected_neg] * n and first[n:].tolist() == [[RES, RES, 0.0, 0.0, RES, RES]] * n

    if case == "euler":
        # the conditioning is really tested: other prompts, or other micro-conditions, move the result far
        with torch.no_grad():
            swapped = solve_ours(backend, solver, start, sigmas, backend.encode_prompts(PROMPTS[::-1]))
            resized = solve_ours(make_backend(pipe, original_size=(64, 48), crops_coords_top_left=(8, 0)), solver,
                                 start, sigmas, cond)
        print(f"     prompts swapped {relative_error(swapped, theirs):.2f}, micro-conditions changed "
              f"{relative_error(resized, theirs):.2e}")
        assert relative_error(swapped, theirs) > 0.01 and relative_error(resized, theirs) > 100 * SDXL_TOL


def test_diffusers_mismatches_negative_time_ids_at_batch_2(pipe):
    """The harness note of the module docstring: at batch 2 with negative sizes diffusers' UNet rows of time ids
    are neg, pos, neg, pos against latent rows u, u, c, c; ours are neg, neg, pos, pos."""
    backend = make_backend(pipe, **NEGATIVE_SIZES)
    cond = backend.encode_prompts(PROMPTS)
    noise = initial_noise(backend, 2)
    theirs = AddedCondRecorder(pipe.unet)
    run_pipeline(pipe, make_scheduler("sd15", "euler", pipe.scheduler), cond, noise, [theirs], steps=1,
                 **NEGATIVE_SIZES)
    with torch.no_grad(), AddedCondRecorder(pipe.unet) as mine:
        backend(noise, torch.tensor([2.0, 2.0]), cond)
    neg, pos = list(backend.negative_time_ids), list(backend.time_ids)
    assert theirs.calls[0]["time_ids"].tolist() == [neg, pos, neg, pos]
    assert mine.calls[0]["time_ids"].tolist() == [neg, neg, pos, pos]
    # the pooled embeddings are laid out u, u, c, c on both sides (zeros: force_zeros_for_empty_prompt)
    for calls in (theirs.calls, mine.calls):
        pooled = calls[0]["text_embeds"]
        assert pooled[:2].abs().max() == 0 and bool((pooled[2:].abs().amax(dim=1) > 0).all())


def test_epd_parallel_sequential_rows_and_chunking(pipe):
    backend = make_backend(pipe, **NEGATIVE_SIZES)
    cond = backend.encode_prompts(PROMPTS)
    noise = initial_noise(backend, len(PROMPTS), seed=99)
    table = uniform_table(EPD_GRID, num_points=2)
    start = noise * float(table.sigmas[0])
    batch, steps = len(PROMPTS), len(table.sigmas) - 1
    positive = torch.tensor(backend.time_ids)
    negative = torch.tensor(backend.negative_time_ids)
    assert not torch.equal(positive, negative)

    spy = RowSpy(backend, cond, 2)
    with torch.no_grad():
        with NetworkRows(backend.network) as full, AddedCondRecorder(backend.network) as added:
            parallel = sample_epd(spy, start, table, cond, parallel=True)
        sequential = sample_epd(backend, start, table, cond, parallel=False)
        with NetworkRows(backend.network) as chunked_rows, AddedCondRecorder(backend.network) as chunked_added:
            chunked = sample_epd(make_backend(pipe, max_batch=2, **NEGATIVE_SIZES), start, table, cond, parallel=True)

    assert spy.rows == [batch, batch * 2] * steps and spy.checked == steps            # b*K + k conditions
    assert full.rows == [batch * 2, batch * 2 * 2] * steps
    assert max(chunked_rows.rows) <= 2 and sum(chunked_rows.rows) == sum(full.rows)
    # every call: the negative rows (first half) carry the negative time ids, the positive rows the positive ones
    for call in added.calls + chunked_added.calls:
        ids, half = call["time_ids"], call["time_ids"].shape[0] // 2
        assert torch.equal(ids[:half], negative.expand(half, -1)) and torch.equal(ids[half:], positive.expand(half, -1))
        assert call["text_embeds"][:half].abs().max() == 0 and call["text_embeds"][half:].abs().max() > 0
    rel_seq, rel_chunk = relative_error(sequential, parallel), relative_error(chunked, parallel)
    print(f"sdxl EPD parallel vs sequential {rel_seq:.2e}, chunked vs unchunked {rel_chunk:.2e}")
    assert torch.isfinite(parallel).all() and relative_error(parallel, start) > 0.05
    assert rel_seq < EPD_TOL and rel_chunk < EPD_TOL


# -- the denoiser and its conditions ----------------------------------------------------------------------------
def test_time_ids_rule():
    pos, neg = sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024))
    assert pos == neg == (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)
    pos, neg = sdxl_time_ids((768, 512), (16, 8), (1024, 960), negative_original_size=(512, 512),
                             negative_target_size=(1024, 1024))
    assert pos == (768, 512, 16, 8, 1024, 960) and neg == (512, 512, 0, 0, 1024, 1024)
    # only one negative size given: diffusers keeps the positive vector
    assert sdxl_time_ids((8, 8), (0, 0), (8, 8), negative_original_size=(4, 4))[1] == (8, 8, 0, 0, 8, 8)
    pos, neg = sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024), requires_aesthetics_score=True)
    assert pos == (1024, 1024, 0, 0, 6.0) and neg == (1024, 1024, 0, 0, 2.5)


def test_refiner_config_mismatch_and_non_sdxl_unets_are_refused(pipe):
    refiner_like = type(pipe)(**pipe.components)
    refiner_like.register_to_config(requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="added embedding takes 96 inputs but 5 time ids"):
        make_backend(refiner_like)
    from backends.testing.random_init import build_pipeline as build

    sd15 = build("sd15")
    with pytest.raises(ValueError, match="addition_embed_type 'text_time'"):
        SDXLBackend(type(pipe)(vae=sd15.vae, text_encoder=sd15.text_encoder, text_encoder_2=None,
                               tokenizer=sd15.tokenizer, tokenizer_2=None, unet=sd15.unet, scheduler=pipe.scheduler))


def test_negative_prompt_and_force_zeros(pipe):
    backend = make_backend(pipe, negative_prompt="blurry")
    cond = backend.encode_prompts(PROMPTS)
    _, neg, _, neg_pooled = pipe.encode_prompt(prompt=PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                               negative_prompt=["blurry"] * 2)
    assert torch.equal(cond.neg_embeds, neg) and torch.equal(cond.neg_pooled, neg_pooled) and neg.abs().max() > 0
    no_zeros = type(pipe)(**pipe.components)
    no_zeros.register_to_config(force_zeros_for_empty_prompt=False)
    assert make_backend(no_zeros).encode_prompts(PROMPTS).neg_embeds.abs().max() > 0     # "" really encoded
    unguided = make_backend(pipe, guidance=1.0)
    cond = unguided.encode_prompts(PROMPTS)
    assert not unguided.guided and cond.neg_embeds is None and cond.pooled.shape == (2, 48)


def test_prediction_type_from_the_scheduler_and_the_v_formula(pipe):
    from diffusers import EulerDiscreteScheduler

    eps_backend = make_backend(pipe)
    assert eps_backend.prediction_type == "epsilon"
    v_pipe = type(pipe)(**{**pipe.components,
                           "scheduler": EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                           prediction_type="v_prediction")})
    v_backend = make_backend(v_pipe)
    assert v_backend.prediction_type == "v_prediction" and v_backend.describe()["prediction_type"] == "v_prediction"
    assert make_backend(pipe, prediction_type="v_prediction").config()["prediction_type"] == "v_prediction"
    x = torch.randn(2, *eps_backend.shape, generator=torch.Generator().manual_seed(3)) * 4
    sigma = torch.tensor([6.0, 0.7])
    cond = eps_backend.encode_prompts(PROMPTS)
    with torch.no_grad():
        d_eps, d_v = eps_backend(x, sigma, cond), v_backend(x, sigma, cond)
    s = sigma.view(-1, 1, 1, 1)
    out = (x - d_eps) / s                                 # the (guided) network output, read back from D_eps
    alpha = 1 / torch.sqrt(1 + s * s)
    assert torch.allclose(d_v, alpha ** 2 * x - alpha * s * out, atol=1e-5, rtol=1e-5)


def test_fp16_vae_decodes_in_float32_without_touching_the_pipeline(pipe):
    half = type(pipe)(**{**pipe.components, "vae": copy.deepcopy(pipe.vae).to(torch.float16)})
    backend = make_backend(half)
    assert half.vae.dtype == torch.float16 and backend.decode_vae.dtype == torch.float32
    assert backend.decode_vae is not half.vae
    reference = copy.deepcopy(half.vae).to(torch.float32)      # the fp16 weights, computed in float32
    z = torch.randn(1, *backend.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = backend.decode(z)
        expected = reference.decode(z / 0.13025, return_dict=False)[0].clamp(-1, 1)
    assert image.dtype == torch.float32 and torch.equal(image, expected) and half.vae.dtype == torch.float16
    assert make_backend(pipe).decode_vae is pipe.vae                       # float32 VAE: no copy


# -- loading, registry, contract ---------------------------------------------------------------------------------
def test_load_backend_from_a_saved_folder_matches_the_pipeline(pipe, sdxl_dir, monkeypatch):
    loaded = load_backend("sdxl", model_path=str(sdxl_dir), device="cpu", guidance=GUIDANCE)
    assert isinstance(loaded, SDXLBackend) and loaded.resolution == RES and loaded.guidance == GUIDANCE
    assert check_backend(loaded) is loaded and loaded.condition_kind == "prompt" and loaded.family == "ve"
    assert loaded.default_schedule(5).kind == "discrete" and loaded.sigma_max == pytest.approx(14.6146, rel=1e-5)
    direct = make_backend(pipe)
    x = torch.randn(2, *direct.shape, generator=torch.Generator().manual_seed(1)) * 3
    cond = direct.encode_prompts(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([3.0, 0.5]), loaded.encode_prompts(PROMPTS)),
                           direct(x, torch.tensor([3.0, 0.5]), cond))
    # config() round-trips through a table's backend_config, and the environment variable is honoured
    options = options_from_table("sdxl", {**make_backend(pipe, original_size=64).config()}, None)
    rebuilt = load_backend("stable-diffusion-xl", model_path=str(sdxl_dir), device="cpu", **options)
    assert rebuilt.time_ids == (64.0, 64.0, 0.0, 0.0, RES, RES) and rebuilt.describe()["time_ids"][0] == 64.0
    monkeypatch.setenv("SDXL_MODEL_PATH", str(sdxl_dir))
    assert load_backend("sdxl", device="cpu").pipe.unet.config.addition_embed_type == "text_time"


def test_backend_from_pipeline_dispatches_sdxl(pipe):
    backend = backend_from_pipeline(pipe)
    assert type(backend) is SDXLBackend and not isinstance(backend, StableDiffusionBackend)
    assert backend.name == "sdxl" and backend.guidance == 5.0 and backend.prediction_type == "epsilon"
    assert backend.shape == (4, RES // 2, RES // 2) and check_backend(backend) is backend
    assert isinstance(backend_from_pipeline(build_pipeline("sd15")), StableDiffusionBackend)


def test_missing_paths_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("SDXL_MODEL_PATH", raising=False)
    missing = tmp_path / "no-sdxl-here"
    with pytest.raises(ModelNotFoundError) as err:
        load_backend("sdxl", model_path=str(missing))
    message = str(err.value)
    assert str(missing) in message and "\n" not in message and "stabilityai/stable-diffusion-xl-base-1.0" in message
    with pytest.raises(ModelNotFoundError, match=r"no model path given .*\$SDXL_MODEL_PATH"):
        load_backend("sdxl")
    single = tmp_path / "sd_xl_base_1.0.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="single-file checkpoint; also give backend_config.config"):
        load_backend("sdxl", model_path=str(single))
    with pytest.raises(ValueError, match="does not take option"):
        load_backend("sdxl", model_path=str(missing), max_sequence_length=32)


def test_full_size_parameter_counts_on_meta():
    full = build_pipeline("sdxl", "full", dtype=torch.bfloat16, device="meta")
    modules = {k: v for k, v in full.components.items() if isinstance(v, torch.nn.Module)}
    assert modules.keys() == PUBLISHED_PARAMETERS["sdxl"].keys()
    for name, expected in PUBLISHED_PARAMETERS["sdxl"].items():
        assert abs(count_parameters(modules[name]) / expected - 1) < 0.02, name
    assert count_parameters(full.unet) == 2_567_463_684                   # SDXL base 1.0's UNet exactly
    config = full.unet.config
    assert (config.cross_attention_dim, config.projection_class_embeddings_input_dim) == (2048, 2816)
    assert full.vae.config.scaling_factor == 0.13025 and full.text_encoder_2.config.projection_dim == 1280


# -- both stages on tiny SDXL through the registry name ----------------------------------------------------------
def _assert_valid_table(table, num_steps: int) -> None:
    assert table.num_steps == num_steps and table.num_points == 2 and table.solver == "epd"
    assert np.all((table.positions > 0) & (table.positions < 1))
    np.testing.assert_allclose(table.weights.sum(axis=1), 1.0, atol=1e-6)
    assert table.metadata["backend"] == "sdxl" and table.metadata["guidance_rate"] == GUIDANCE


def _samples(table_path: Path, out: Path) -> dict:
    import sample

    assert sample.main(["--predictor_path", str(table_path), "--seeds", "0", "--prompt", "a cat", "--outdir",
                        str(out), "--no-subdirs", "--device", "cpu"]) == 0
    from PIL import Image

    assert Image.open(out / "000000.png").size == (2 * RES, 2 * RES)     # 32 px, auto-upscaled x2
    return json.loads((out / "000000.json").read_text())


def test_distillation_on_tiny_sdxl_then_sampling(tmp_path, sdxl_dir):
    from training.distill.launch import main as distill_main

    args = ["--config", str(ROOT / "configs" / "distill" / "sdxl.yaml"), "--no-progress"]
    for override in (f"outdir={tmp_path / 'exps'}", "name=tiny-sdxl", f"backend.model_path={sdxl_dir}",
                     f"backend.resolution={RES}", f"conditions.prompt_file={EVAL_PROMPTS}",
                     "student.num_steps=3", "teacher.solver=euler", "teacher.M=2", "batch=2", "batch_gpu=null",
                     "total_kimg=0.004", "optim.lr=0.05", "device=cpu", "validation.num=2", "validation.batch=2",
                     "validation.reference.steps=4", f"validation.cache={tmp_path / 'v'}", "compare.enabled=false"):
        args += ["--override", override]
    assert distill_main(args) == 0
    (folder,) = (tmp_path / "exps").glob("*-tiny-sdxl")
    table = load_table(folder / "table.pkl")
    _assert_valid_table(table, 3)
    meta = table.metadata
    assert meta["backend_config"]["model_path"] == str(sdxl_dir) and meta["model"]["backend"] == "sdxl"
    assert meta["schedule"]["kind"] == "discrete" and table.sigmas[0] == pytest.approx(14.6146, rel=1e-4)
    assert not np.allclose(table.positions, [[1 / 3, 2 / 3]] * 2)          # it trained
    sidecar = _samples(folder / "table.pkl", tmp_path / "samples")
    assert sidecar["backend"] == "sdxl" and sidecar["guidance"] == GUIDANCE and sidecar["nfe"]["sequential"] == 4


def test_rdpo_on_tiny_sdxl_then_sampling(tmp_path, sdxl_dir):
    from training.ppo import train

    backend = load_backend("sdxl", model_path=str(sdxl_dir), device="cpu")
    grid = backend.default_schedule(4).sigmas(backend.alphas_cumprod)
    start = save_table(uniform_table(grid.numpy(), num_points=2, positions=(0.335, 0.665), backend="sdxl",
                                     backend_config={"resolution": RES, "model_path": str(sdxl_dir)},
                                     guidance_rate=GUIDANCE), tmp_path / "start.pkl")
    overrides = [f"run.output_root={tmp_path / 'runs'}", "run.device=cpu", f"data.predictor_snapshot={start}",
                 f"data.prompt_csv={EVAL_PROMPTS}", f"eval.prompts={EVAL_PROMPTS}", f"model.resolution={RES}",
                 "model.num_steps=4", "reward.weights.hps=0", "reward.weights.image_contrast=1",
                 "ppo.rollout_batch_size=4", "ppo.rloo_k=2", "ppo.minibatch_size=2", "ppo.steps=2",
                 "ppo.learning_rate=0.01", "eval.seeds=0-1", "logging.save_interval=2"]
    table, folder = train(ROOT / "training" / "ppo" / "cfgs" / "sdxl.yaml", overrides, progress=False)
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["image_contrast_mean"] <= 1 for r in records)
    saved = load_table(folder / "table-mean.pkl")
    _assert_valid_table(saved, 4)
    assert saved.metadata["backend_config"]["model_path"] == str(sdxl_dir)
    assert saved.metadata["rdpo"]["kind"] == "mean" and np.array_equal(saved.sigmas, load_table(start).sigmas)
    assert not np.allclose(saved.positions, load_table(start).positions)        # the policy moved
    sidecar = _samples(folder / "table-mean.pkl", tmp_path / "samples")
    assert sidecar["backend"] == "sdxl" and sidecar["nfe"]["sequential"] == 6


# -- the GPU latency benchmark's sdxl model, on the CPU ----------------------------------------------------------
def test_latency_benchmark_sdxl_dry_run_on_cpu(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_latency

    with pytest.raises(SystemExit) as done:
        gpu_latency.main(["--help"])
    assert done.value.code == 0 and "sdxl" in capsys.readouterr().out
    assert gpu_latency.CONFIGS["sdxl"] == ("sdxl", 1024, torch.bfloat16)
    out = tmp_path / "bench.json"
    methods = {"diffusers_dpmpp2m_20", "epd_k2_nfe20"}      # our DPM++(2M) path is the parity tests' own
    assert gpu_latency.main(["--models", "sdxl", "--size", "tiny", "--device", "cpu", "--repeats", "1",
                             "--methods", ",".join(sorted(methods)), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["model"] == "sdxl" and result["resolution"] == RES and result["guidance"] == GUIDANCE
    assert set(result["latency_ms"]) == methods and not result["failures"] and result["checks"]["finite"]
    assert result["rows_per_image_call"] == 2 and result["latent_shape"] == [4, RES // 2, RES // 2]
    # the peer really is diffusers' SDXL pipeline with DPM-Solver++(2M) on the same UNet
    pipe = build_pipeline("sdxl", "tiny")
    peer = gpu_latency._peer_pipeline(pipe, "sdxl", compiled=False)
    assert type(peer).__name__ == "StableDiffusionXLPipeline" and peer.unet is pipe.unet
    assert type(peer.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert peer.scheduler.config.algorithm_type == "dpmsolver++" and not peer.scheduler.config.use_flow_sigmas


def test_sample_py_with_the_sdxl_backend_from_the_command_line(tmp_path, sdxl_dir):
    """``sample.py --backend sdxl --model_path DIR --solver ...`` as a user types it; the result equals the
    same baseline run through the API (generate) on the loaded backend."""
    import sample
    from PIL import Image

    from backends.generate import Sampler, generate

    out = tmp_path / "s"
    assert sample.main(["--backend", "sdxl", "--model_path", str(sdxl_dir), "--solver", "dpmpp2m", "--steps", "3",
                        "--seeds", "0-1", "--prompt", "a cat", "--outdir", str(out), "--no-subdirs", "--device",
                        "cpu", "--upscale", "1"]) == 0
    meta = json.loads((out / "000001.json").read_text())
    assert meta["backend"] == "sdxl" and meta["solver"] == "dpmpp2m" and meta["nfe"]["network_rows_per_evaluation"] == 2
    backend = load_backend("sdxl", model_path=str(sdxl_dir), device="cpu")
    images = generate(backend, Sampler.from_solver("dpmpp2m", meta["sigmas"]), [0, 1], ["a cat"])
    want = ((images[1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(Image.open(out / "000001.png")).astype(int) - want.astype(int)).max() <= 1
