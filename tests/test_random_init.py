"""Random-weight diffusers pipelines built offline (backends/testing/random_init.py).

Tiny pipelines: build, save, reload offline (network disabled), identical weights, run 2 steps end to end.
SD1.5: original-LDM single-file round trip (.safetensors and .ckpt). Full sizes: parameter counts on the meta
device (nothing allocated) and the LDM key mapping checked against diffusers' own LDM -> diffusers converters.
"""

from __future__ import annotations

import socket

import pytest
import torch

from backends.testing.random_init import (
    MODELS,
    TINY_RESOLUTION,
    build_clip_tokenizer,
    build_pipeline,
    build_t5_tokenizer,
    count_parameters,
    ldm_state_dict,
    save_random_pipeline,
    write_ldm_single_file,
)

from tools.random_pipeline import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

PROMPT = "a red cube on a wooden table"


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (env and the already-imported constants) and no network connections at all."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    try:
        import diffusers.utils.constants as diffusers_constants

        monkeypatch.setattr(diffusers_constants, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, name: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), name
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"
    assert not any(p.is_meta for p in b.parameters()), name


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _latent_shape(model: str, pipe, res: int) -> tuple[int, ...]:
    side = res // pipe.vae_scale_factor
    if model == "flux":  # FluxPipeline returns packed latents: 2x2 patches -> tokens of 4*C channels
        return (1, (side // 2) ** 2, pipe.transformer.config.in_channels)
    return (1, pipe.vae.config.latent_channels, side, side)


@pytest.mark.parametrize("model", MODELS)
def test_tiny_build_save_reload_run(model, tmp_path, offline):
    pipe = build_pipeline(model, "tiny")
    n_params = sum(count_parameters(m) for m in _modules(pipe).values())
    assert 0 < n_params < 5_000_000
    assert all(not m.training for m in _modules(pipe).values())

    path = save_random_pipeline(model, tmp_path / model, "tiny")
    assert (path / "model_index.json").is_file()
    loaded = type(pipe).from_pretrained(str(path), local_files_only=True)
    assert type(loaded) is type(pipe)
    assert _modules(loaded).keys() == _modules(pipe).keys()
    for name, module in _modules(pipe).items():
        other = getattr(loaded, name)
        assert type(other) is type(module)
        _assert_same_weights(module, other, name)      # same seed: save_random_pipeline == build_pipeline
        if hasattr(module, "register_to_config"):       # diffusers models
            assert _public(module.config) == _public(other.config), name
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    for name in [k for k in pipe.components if k.startswith("tokenizer")]:
        tok, tok2 = getattr(pipe, name), getattr(loaded, name)
        assert tok2(PROMPT).input_ids == tok(PROMPT).input_ids and len(tok2) == len(tok), name

    res = TINY_RESOLUTION[model]
    for output_type in ("latent", "pt"):
        out = loaded(PROMPT, num_inference_steps=2, height=res, width=res, output_type=output_type,
                     generator=torch.Generator().manual_seed(0)).images
        expected = _latent_shape(model, loaded, res) if output_type == "latent" else (1, 3, res, res)
        assert tuple(out.shape) == expected and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_build_is_reproducible_and_leaves_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = build_pipeline("flux", seed=1), build_pipeline("flux", seed=1), build_pipeline("flux", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_default_dtype() == torch.float32
    for name in _modules(a):
        _assert_same_weights(getattr(a, name), getattr(b, name), name)
    sa, sc = a.transformer.state_dict(), c.transformer.state_dict()
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_in_bfloat16():
    pipe = build_pipeline("sd3", dtype=torch.bfloat16)
    for name, module in _modules(pipe).items():
        assert all(p.dtype == torch.bfloat16 for p in module.parameters()), name
    assert torch.get_default_dtype() == torch.float32


@pytest.fixture(scope="module")
def sd15_tiny(tmp_path_factory):
    """A tiny SD1.5 pipeline and the folder it was saved to with save_pretrained."""
    pipe = build_pipeline("sd15", "tiny")
    folder = tmp_path_factory.mktemp("sd15-tiny")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd15_ldm_single_file_round_trip(suffix, sd15_tiny, tmp_path, offline):
    from diffusers import StableDiffusionPipeline

    pipe, folder = sd15_tiny
    file = write_ldm_single_file(pipe, tmp_path / f"v1-5-random{suffix}")

    state = ldm_state_dict(pipe)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in state)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4           # LDM: 1x1 convs
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state

    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)
    assert _public(loaded.unet.config) == _public(pipe.unet.config)
    assert loaded.safety_checker is None
    if suffix == ".safetensors":
        out = loaded(PROMPT, num_inference_steps=2, height=32, width=32, output_type="pt").images
        assert tuple(out.shape) == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_sd15_full_ldm_key_mapping_matches_diffusers_converters():
    """On the meta device: our diffusers -> LDM names, fed to diffusers' LDM -> diffusers converters, come back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from backends.testing.random_init import _unet_to_ldm, _vae_to_ldm

    pipe = build_pipeline("sd15", "full", device="meta")
    unet, vae = pipe.unet.state_dict(), pipe.vae.state_dict()
    ldm_unet, ldm_vae = _unet_to_ldm(unet, pipe.unet.config), _vae_to_ldm(vae, pipe.vae.config)
    assert (len(ldm_unet), len(ldm_vae), len(pipe.text_encoder.state_dict())) == (686, 248, 196)
    for key in ("output_blocks.11.0.skip_connection.weight", "input_blocks.3.0.op.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "middle_block.1.proj_in.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.weight", "out.2.weight"):
        assert key in ldm_unet, key
    back = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm_unet.items()},
                                       dict(pipe.unet.config))
    assert back.keys() == unet.keys() and all(back[k].shape == unet[k].shape for k in unet)
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm_vae.items()}, dict(pipe.vae.config))
    assert back.keys() == vae.keys() and all(back[k].shape == vae[k].shape for k in vae)


# published parameter counts (millions); built on the meta device, so nothing is allocated
FULL_COUNTS = {
    "sd15": {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1},
    "sd3": {"transformer": 2028.0, "vae": 83.8, "text_encoder": 123.7, "text_encoder_2": 694.7,
            "text_encoder_3": 4762.0},
    "flux": {"transformer": 11901.0, "vae": 83.8, "text_encoder": 123.1, "text_encoder_2": 4762.0},
    "sdxl": {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7},
}


@pytest.mark.parametrize("model", MODELS)
def test_full_size_parameter_counts_on_meta(model):
    pipe = build_pipeline(model, "full", dtype=torch.bfloat16, device="meta")
    modules = _modules(pipe)
    assert modules.keys() == FULL_COUNTS[model].keys()
    for name, expected in FULL_COUNTS[model].items():
        module = modules[name]
        assert all(p.is_meta for p in module.parameters()), name
        got = count_parameters(module) / 1e6
        assert abs(got - expected) / expected < 0.02, (name, got, expected)
    assert torch.get_default_dtype() == torch.float32


def test_tokenizers():
    full = build_clip_tokenizer("full")
    assert len(full) == 49408 and full.model_max_length == 77
    # the real CLIP ids of this prompt
    assert full("a photo of an astronaut riding a horse").input_ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320,
                                                                       4558, 49407]
    tiny = build_clip_tokenizer("tiny", pad_token="!")
    assert tiny.pad_token_id == 0 and tiny.eos_token_id == len(tiny) - 1 and tiny.bos_token_id == len(tiny) - 2
    t5, t5b = build_t5_tokenizer(), build_t5_tokenizer()
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id, t5.model_max_length) == (0, 1, 2, 512)
    assert t5.get_vocab() == t5b.get_vocab()                  # deterministic
    ids = t5(PROMPT).input_ids
    assert ids[-1] == 1 and 2 not in ids


def test_cli(tmp_path, capsys, offline):
    out = tmp_path / "flux"
    assert main(["--model", "flux", "--size", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformer" in printed and "total" in printed
    from diffusers import FluxPipeline

    assert isinstance(FluxPipeline.from_pretrained(str(out), local_files_only=True), FluxPipeline)
