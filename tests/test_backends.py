"""The SD1.5 / SD3 / FLUX backends on tiny random-weight pipelines saved to disk and loaded through the real
loading code: local-only loading and its errors, table metadata translation, the denoiser maths (VE map,
differentiable time, packing), dtype policy, and the sampling CLIs end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_flux
import sample_sd3
from backends import backend_from_pipeline, load_backend, options_from_table
from backends.diffusers_base import ModelNotFoundError, PromptCondition
from backends.flux import latent_image_ids, pack_latents, unpack_latents
from backends.testing.random_init import TINY_RESOLUTION
from solvers.core import repeat_condition
from solvers.schedules import discrete_sigmas, flowmatch_sigmas
from solvers.table import load_table, save_table, uniform_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official" / "tpami"
NAMES = {"sd15": "ldm", "sd3": "sd3", "flux": "flux"}


def official(name: str) -> Path:
    """An authors' release table from ../shared/official (skipped where it is not beside the checkout)."""
    path = OFFICIAL / name
    if not path.is_file():
        pytest.skip(f"the authors' released tables are not beside this checkout ({path})")
    return path


@pytest.fixture(scope="module")
def backends(tiny_model_dirs):
    return {model: load_backend(NAMES[model], model_path=str(path), device="cpu", resolution=TINY_RESOLUTION[model])
            for model, path in tiny_model_dirs.items()}


# -- loading -----------------------------------------------------------------------------------------------
def test_missing_paths_give_one_clear_error_each(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.delenv("SD3_MODEL_PATH", raising=False)
    with pytest.raises(ModelNotFoundError, match="no model path given .*--model_path"):
        load_backend("sd3")
    with pytest.raises(ModelNotFoundError, match="does not exist .*never downloaded"):
        load_backend("sd3", model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_backend("flux", model_path="black-forest-labs/FLUX.1-dev-not-cached")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json is missing"):
        load_backend("ldm", model_path=str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["sd3"], broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ModelNotFoundError, match="lacks the component folder\\(s\\) text_encoder_3"):
        load_backend("sd3", model_path=str(broken))
    ckpt = tmp_path / "v1-5.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="single-file checkpoint; also give backend_config.config"):
        load_backend("ldm", model_path=str(ckpt))
    with pytest.raises(ValueError, match="unknown backend 'sd7'.*package.module:function"):
        load_backend("sd7")
    with pytest.raises(ValueError, match="cannot import 'no_such_package.models'"):
        load_backend("no_such_package.models:make_backend")


def test_environment_variable_then_table_default(tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("FLUX_MODEL_PATH", str(tiny_model_dirs["flux"]))
    backend = load_backend("flux", default_model_path="black-forest-labs/FLUX.1-dev", device="cpu",
                           resolution=TINY_RESOLUTION["flux"])
    assert backend.name == "flux" and backend.family == "flow"
    monkeypatch.delenv("FLUX_MODEL_PATH")
    backend = load_backend("flux", default_model_path=str(tiny_model_dirs["flux"]), device="cpu",
                           resolution=TINY_RESOLUTION["flux"])
    assert backend.shape[0] == 16


def test_single_file_sd15_loads_the_same_weights(tmp_path, tiny_model_dirs, backends):
    from diffusers import StableDiffusionPipeline

    from backends.testing.random_init import write_ldm_single_file

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dirs["sd15"]), local_files_only=True)
    ckpt = write_ldm_single_file(pipe, tmp_path / "tiny-sd15.safetensors")
    single = load_backend("ldm", model_path=str(ckpt), config=str(tiny_model_dirs["sd15"]), device="cpu",
                          resolution=TINY_RESOLUTION["sd15"])
    x = torch.randn(2, *single.shape) * 3
    cond = single.encode_prompts(["a red cube", "a cat"])
    with torch.no_grad():
        assert torch.allclose(single(x, torch.tensor([3.0, 0.5]), cond),
                              backends["sd15"](x, torch.tensor([3.0, 0.5]), cond), atol=1e-5)


def test_official_table_metadata_becomes_loader_options():
    sd3 = load_table(official("sd3-512-best.pkl")).metadata
    options = options_from_table(sd3["backend"], sd3["backend_config"], sd3["guidance_rate"])
    assert options == {"default_model_path": "stabilityai/stable-diffusion-3-medium-diffusers", "resolution": 512,
                       "guidance": 4.5}
    flux = load_table(official("flux-best.pkl")).metadata
    options = options_from_table(flux["backend"], flux["backend_config"], flux["guidance_rate"])
    assert options == {"default_model_path": "black-forest-labs/FLUX.1-dev", "dtype": "bfloat16", "offload": "none",
                       "resolution": 1024, "guidance": 3.5}
    sd15 = load_table(official("sd15-best.pkl")).metadata
    # 1024 px: docs/authors-code.md §9.21
    assert options_from_table("ldm", sd15["backend_config"], 7.5) == {"guidance": 7.5}


# -- denoiser maths ------------------------------------------------------------------------------------------
def test_sd15_grid_range_and_timestep_map(backends):
    sd15 = backends["sd15"]
    assert sd15.sigma_max == pytest.approx(14.6146, rel=1e-5) and sd15.sigma_min == pytest.approx(0.0291675, rel=1e-5)
    grid = sd15.default_schedule(11, "official").sigmas(sd15.alphas_cumprod).numpy()
    assert np.allclose(grid, discrete_sigmas(11, variant="official").numpy(), rtol=1e-6)
    ac = sd15.alphas_cumprod.astype(np.float64)
    sigma_n = torch.tensor(np.sqrt((1 - ac) / ac)[[0, 250, 999]])
    assert torch.allclose(sd15.vp.timestep(sigma_n), torch.tensor([0.0, 250.0, 999.0], dtype=torch.float64), atol=1e-6)


def test_time_scale_gradient_reaches_the_unet_time_input(backends):
    """The learned time scale a multiplies the evaluation sigma; its gradient must flow through the fractional
    timestep into the UNet's time embedding (the authors' map is not differentiable there)."""
    sd15 = backends["sd15"]
    cond = sd15.encode_prompts(["a house"])
    x = torch.randn(1, *sd15.shape, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor(1.0, requires_grad=True)
    (grad,) = torch.autograd.grad(sd15(x, torch.tensor([2.0]) * scale, cond).sum(), scale)
    with torch.no_grad():    # central difference; the step is small against the time embedding's frequencies
        plus, minus = (sd15(x, torch.tensor([2.0 * (1 + s)]), cond).sum() for s in (1e-4, -1e-4))
    fd = ((plus - minus) / 2e-4).item()
    assert grad.item() == pytest.approx(fd, rel=2e-2)
    # Without the time path (timestep detached) the gradient is different: the time path carries real signal.
    original = sd15.vp.timestep
    try:
        sd15.vp.timestep = lambda sigma: original(sigma.detach())
        (grad_no_time,) = torch.autograd.grad(sd15(x, torch.tensor([2.0]) * scale, cond).sum(), scale)
    finally:
        del sd15.vp.timestep
    # the time path's share is model-dependent (a few % to tens of % on the tiny UNet); without it the
    # derivative misses the finite difference by more than the 2 % tolerance above
    assert abs(grad_no_time.item() - fd) > 0.02 * abs(fd)


def test_flux_packing_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    ids = latent_image_ids(8, 6, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


def test_flow_grids_and_sigma_range(backends):
    sd3, flux = backends["sd3"], backends["flux"]
    assert sd3.flow_shift() == (3.0, None) and sd3.sigma_max == 1.0
    assert sd3.sigma_min == pytest.approx(0.0029940, rel=1e-4)
    official = sd3.default_schedule(11, "official").sigmas().numpy()
    assert official[-1] == pytest.approx(0.0089286, rel=1e-4)                # twice shifted (docs/authors-code.md §9.9)
    assert np.allclose(sd3.default_schedule(11).sigmas().numpy(), flowmatch_sigmas(11, 3.0).numpy())
    shift, mu = flux.flow_shift()
    seq = (flux.shape[-1] // 2) ** 2
    assert shift is None and mu == pytest.approx(0.5 + 0.65 / 3840 * (seq - 256))


def test_conditions_repeat_in_b_k_order_and_select(backends):
    cond = backends["sd3"].encode_prompts(["one", "two"])
    rep = repeat_condition(cond, 3)
    assert isinstance(rep, PromptCondition) and rep.prompts == ("one",) * 3 + ("two",) * 3
    for name in ("embeds", "pooled", "neg_embeds", "neg_pooled"):
        assert torch.equal(getattr(rep, name)[3], getattr(cond, name)[1])
    assert rep.select(slice(2, 4)).prompts == ("one", "two")



@pytest.mark.parametrize("model", ["sd15", "sd3", "flux"])
def test_fused_qkv_projections_give_the_same_denoiser(backends, tiny_model_dirs, model):
    plain = backends[model]
    fused = load_backend(NAMES[model], model_path=str(tiny_model_dirs[model]), device="cpu",
                         resolution=TINY_RESOLUTION[model], fuse_qkv=True)
    assert fused.fused_qkv and fused.pipe is not plain.pipe
    x = torch.randn(2, *plain.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.3]) if plain.flow else torch.tensor([5.0, 0.5])
    cond = plain.encode_prompts(["a red cube", "a blue ball"])
    torch.testing.assert_close(fused(x, sigma, cond), plain(x, sigma, cond), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["sd15", "sd3", "flux"])
def test_a_repeated_prompt_is_encoded_once(backends, model, monkeypatch):
    backend = backends[model]
    seen: list[list[str]] = []
    encode = backend._encode
    monkeypatch.setattr(backend, "_encode", lambda prompts, negative: (seen.append(list(prompts)),
                                                                        encode(prompts, negative))[1])
    cond = backend.encode_prompts(["b", "a", "b", "b"])
    assert seen == [["b", "a"]] and cond.prompts == ("b", "a", "b", "b") and len(cond) == 4
    alone = {p: backend.encode_prompts([p]) for p in ("a", "b")}
    for row, prompt in enumerate(cond.prompts):
        for name in ("embeds", "pooled", "neg_embeds", "neg_pooled"):
            value = getattr(cond, name)
            if value is not None:
                torch.testing.assert_close(value[row], getattr(alone[prompt], name)[0], rtol=1e-5, atol=1e-6)

def test_state_stays_float32_while_the_backbone_runs_in_half(tiny_model_dirs):
    backend = load_backend("sd3", model_path=str(tiny_model_dirs["sd3"]), device="cpu", dtype="bfloat16",
                           resolution=TINY_RESOLUTION["sd3"])
    assert backend.dtype == torch.bfloat16
    x = torch.randn(1, *backend.shape)
    with torch.no_grad():
        out = backend(x, torch.tensor([0.7]), backend.encode_prompts(["a cat"]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_flux_rejects_a_negative_prompt_and_pipeline_objects_are_reused(tiny_model_dirs):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_model_dirs["flux"]), local_files_only=True)
    with pytest.raises(ValueError, match="no classifier-free guidance batch"):
        backend_from_pipeline(pipe, negative_prompt="blurry", resolution=TINY_RESOLUTION["flux"])
    backend = backend_from_pipeline(pipe, resolution=TINY_RESOLUTION["flux"])
    assert backend.pipe is pipe and not backend.guided
    with pytest.raises(ValueError, match="multiple of"):
        backend_from_pipeline(pipe, resolution=TINY_RESOLUTION["flux"] + 2)


# -- CLIs ---------------------------------------------------------------------------------------------------
def _table(backend, name: str, path: Path, num_steps: int = 4) -> Path:
    grid = backend.default_schedule(num_steps).sigmas(backend.alphas_cumprod)
    table = uniform_table(grid.numpy(), num_points=2, backend=name,
                          backend_config={"resolution": backend.resolution}, guidance_rate=backend.guidance)
    return save_table(table, path)


@pytest.mark.parametrize("model", ["sd15", "sd3", "flux"])
def test_cli_end_to_end_images_sidecars_and_resume(model, tmp_path, tiny_model_dirs, backends, capsys):
    table = _table(backends[model], NAMES[model], tmp_path / f"{model}.pkl")
    out = tmp_path / "out"
    script = {"sd15": sample, "sd3": sample_sd3, "flux": sample_flux}[model]
    parser = script.parser() if script is not sample else None
    args = ["--predictor_path", str(table), "--model_path", str(tiny_model_dirs[model]), "--seeds", "0-2",
            "--prompt-file", str(ROOT / "src" / "prompts" / "eval.txt"), "--outdir", str(out), "--batch", "2",
            "--device", "cpu", "--no-subdirs", "--grid"]
    assert sample.main(args, parser=parser) == 0
    text = capsys.readouterr().out
    assert "NFE 6 sequential" in text and "9 total per image" in text
    prompts = (ROOT / "src" / "prompts" / "eval.txt").read_text().splitlines()
    for seed in range(3):
        image = Image.open(out / f"{seed:06d}.png")
        assert image.size == (64, 64) and image.mode == "RGB"      # 32 px tiny images, auto-upscaled x2
        meta = json.loads((out / f"{seed:06d}.json").read_text())
        assert meta["prompt"] == prompts[seed] and meta["backend"] == NAMES[model] and meta["seed"] == seed
        assert meta["nfe"]["sequential"] == 6 and meta["nfe"]["total"] == 9
        assert meta["nfe"]["network_rows_per_evaluation"] == (1 if model == "flux" else 2)
    assert (out / "grid.png").is_file()
    stamp = (out / "000001.png").stat().st_mtime_ns
    assert sample.main(args, parser=parser) == 0
    assert "sampled 0 images" in (out_text := capsys.readouterr().out) and "3 of 3 were already there" in out_text
    assert (out / "000001.png").stat().st_mtime_ns == stamp


def test_same_seed_same_image_whatever_the_batch(tmp_path, tiny_model_dirs, backends):
    table = _table(backends["sd3"], "sd3", tmp_path / "sd3.pkl", num_steps=3)
    common = ["--predictor_path", str(table), "--model_path", str(tiny_model_dirs["sd3"]), "--seeds", "5-7",
              "--prompt", "a lighthouse", "--device", "cpu", "--no-subdirs"]
    assert sample.main(common + ["--batch", "3", "--outdir", str(tmp_path / "a")]) == 0
    assert sample.main(common + ["--batch", "1", "--max-batch", "2", "--outdir", str(tmp_path / "b")]) == 0
    for seed in (5, 6, 7):
        a = np.asarray(Image.open(tmp_path / "a" / f"{seed:06d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / f"{seed:06d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1          # float32 batch-size rounding may flip a pixel by one level


def test_baseline_solvers_on_the_backends_default_grid(tmp_path, tiny_model_dirs, capsys):
    out = tmp_path / "dpm"
    assert sample.main(["--backend", "sd15", "--solver", "dpmpp2m", "--steps", "3", "--model_path",
                        str(tiny_model_dirs["sd15"]), "--resolution", str(TINY_RESOLUTION["sd15"]), "--seeds", "0",
                        "--prompt", "a cat", "--outdir", str(out), "--no-subdirs", "--device", "cpu"]) == 0
    meta = json.loads((out / "000000.json").read_text())
    assert meta["solver"] == "dpmpp2m" and meta["nfe"] == {"sequential": 3, "total": 3,
                                                           "network_rows_per_evaluation": 2}
    assert meta["sigmas"][0] == pytest.approx(14.6146, rel=1e-4) and len(meta["sigmas"]) == 4


def test_cli_bad_inputs_give_one_clear_error_each(tmp_path, tiny_model_dirs, backends, capsys):
    table = _table(backends["sd3"], "sd3", tmp_path / "sd3.pkl")
    base = ["--outdir", str(tmp_path / "o"), "--device", "cpu"]
    cases = [
        (["--predictor_path", str(table), "--model_path", str(tmp_path / "missing")], "does not exist"),
        (["--predictor_path", str(table), "--seeds", "3-1"], "end before start"),
        (["--predictor_path", str(table), "--seeds", "a"], "bad seed item"),
        (["--predictor_path", str(table), "--backend", "flux"], "fitted for the 'sd3' model"),
        (["--predictor_path", str(table), "--resolution", "1024"], "fitted at resolution 32"),
        (["--predictor_path", str(table), "--backend-config", "[1]"], "must be a JSON object"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases.append((["--predictor_path", str(table), "--prompt-file", str(empty)], "no prompts"))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,caption_text\n1,a cat\n")
    cases.append((["--predictor_path", str(table), "--prompt-file", str(bad_csv)], "needs a 'text'"))
    for args, message in cases:
        assert sample.main(args + base) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, (args, err)


def test_distillation_through_a_text_to_image_backend_then_sampling(tmp_path, tiny_model_dirs, capsys):
    """Stage 1 loads the SD3 backend by name from its config, fits a table on the flow-matching grid, and
    sample.py rebuilds the same backend from the table's metadata alone."""
    from training.distill import load_config, train

    config = load_config(None, [
        f"outdir={tmp_path / 'exps'}", "name=tiny-sd3", "backend.name=sd3",
        f"backend.model_path={tiny_model_dirs['sd3']}", f"backend.resolution={TINY_RESOLUTION['sd3']}",
        "guidance.type=cfg", "guidance.rate=4.5", f"conditions.prompt_file={ROOT / 'src' / 'prompts' / 'eval.txt'}",
        "schedule.kind=flowmatch", "student.num_steps=3", "student.afs=false", "teacher.solver=euler", "teacher.M=2",
        "batch=2", "total_kimg=0.004", "optim.lr=0.05", "device=cpu", "validation.num=2", "validation.reference.steps=4",
        f"validation.cache={tmp_path / 'v'}", "compare.solvers=[euler]"])
    table, folder = train(config, progress=False)
    meta = table.metadata
    # validation and the comparison run in flow coordinates too, on the model's flow-matching grid
    comparison = json.loads((folder / "comparison.json").read_text())
    assert {r["schedule"]["kind"] for r in comparison["results"] if r["solver"] == "euler"} == {"flowmatch"}
    assert meta["validation"]["best_rmse"] > 0 and meta["comparison"]["best_baseline_same_nfe"]["nfe"] == 4
    assert meta["backend"] == "sd3" and meta["backend_config"]["model_path"] == str(tiny_model_dirs["sd3"])
    assert meta["guidance_rate"] == 4.5 and meta["schedule"]["kind"] == "flowmatch" and table.sigmas[0] == 1.0
    assert not np.allclose(table.positions, [[1 / 3, 2 / 3]] * 2)          # it trained
    out = tmp_path / "samples"
    assert sample.main(["--predictor_path", str(folder / "table.pkl"), "--seeds", "0", "--prompt", "a cat",
                        "--outdir", str(out), "--no-subdirs", "--device", "cpu"]) == 0
    sidecar = json.loads((out / "000000.json").read_text())
    assert sidecar["backend"] == "sd3" and sidecar["guidance"] == 4.5 and sidecar["nfe"]["sequential"] == 4


def test_gpu_check_script_runs_on_tiny_models(tmp_path):
    """The script behind the README's GPU table, on a tiny FLUX on CPU (it must not rot between GPU runs)."""
    import subprocess
    import sys

    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_check_backends.py", "--models", "flux", "--size", "tiny",
                           "--device", "cpu", "--repeats", "1", "--nfe", "4", "--root", str(tmp_path / "models"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["model"] == "flux" and result["epd_k2"]["sequential_evaluations"] == 4
    assert result["epd_k2"]["network_rows_per_image"] == 6 and result["dpmpp2m"]["network_rows_per_image"] == 4
    assert result["epd_k2"]["finite"] and not (tmp_path / "models" / "flux").exists()


def test_the_authors_sd15_table_runs_unchanged(tmp_path, tiny_model_dirs):
    """An official ++ table (code-free reader) drives the SD1.5 backend: backend, guidance and grid from the file."""
    out = tmp_path / "official"
    assert sample.main(["--predictor_path", str(official("sd15-best.pkl")), "--model_path",
                        str(tiny_model_dirs["sd15"]), "--seeds", "0", "--prompt", "a cat", "--outdir", str(out),
                        "--no-subdirs", "--device", "cpu"]) == 0
    meta = json.loads((out / "000000.json").read_text())
    assert meta["backend"] == "ldm" and meta["guidance"] == 7.5 and meta["nfe"] == {
        "sequential": 20, "total": 30, "network_rows_per_evaluation": 2}
    assert meta["sigmas"][0] == pytest.approx(14.6146, rel=1e-5) and meta["table"]["path"].endswith("sd15-best.pkl")
