"""The LSUN-Bedroom latent diffusion backend (``lsun_ldm``) and its release conversion, on tiny random models.

The release layout is generated here from the semantics of latent-diffusion's ``openaimodel.UNetModel`` and the
taming-style ``Encoder``/``Decoder``/``VectorQuantizer2`` (key names and shapes written from those classes,
independent of the converter's tables); a functional forward pass of the release UNet written from the same
semantics checks the converted diffusers UNet numerically, and diffusers' own LDM converters check the parts they
cover (resnets, resamplers, embeddings, conv in/out of the UNet; the whole encoder/decoder of the first stage).
"""

from __future__ import annotations

import math
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backends import check_backend, load_backend
from backends.compvis_ldm import convert_release, load_converted, quantize_latents
from backends.lightning_checkpoint import read_lightning_checkpoint
from backends.lsun_ldm import ENV_VAR
from backends.testing.lsun_random import save_random_lsun_ldm
from safeio import UnsafePickleError
from solvers.epd import sample_epd
from solvers.schedules import beta_alphas_cumprod, make_sigmas
from solvers.table import load_table
from tools import lsun_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official" / "iccv"
MC, MULT, NRB, ATTN_DS, HEAD = 32, (1, 2, 3, 4), 2, (8, 4, 2), 32
CH, CH_MULT, N_EMBED = 32, (1, 2, 4), 64


# -- the release layout, from the release's classes ------------------------------------------------------------
def release_unet_shapes(mc=MC, mult=MULT, nrb=NRB, attn_ds=ATTN_DS, cin=3, cout=3) -> dict[str, tuple]:
    """openaimodel.UNetModel's state-dict names and shapes (unconditional, conv resampling, no scale-shift)."""
    s: dict[str, tuple] = {}
    temb = 4 * mc

    def conv(name, o, i, k, d=2):
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i) + (k,) * d, (o,)

    def pair(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o):
        pair(f"{name}.in_layers.0", i)
        conv(f"{name}.in_layers.2", o, i, 3)
        s[f"{name}.emb_layers.1.weight"], s[f"{name}.emb_layers.1.bias"] = (o, temb), (o,)
        pair(f"{name}.out_layers.0", o)
        conv(f"{name}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{name}.skip_connection", o, i, 1)

    def attn(name, c):
        pair(f"{name}.norm", c)
        conv(f"{name}.qkv", 3 * c, c, 1, d=1)
        conv(f"{name}.proj_out", c, c, 1, d=1)

    s["time_embed.0.weight"], s["time_embed.0.bias"] = (temb, mc), (temb,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (temb, temb), (temb,)
    conv("input_blocks.0.0", mc, cin, 3)
    chans, ch, ds, idx = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            res(f"input_blocks.{idx}.0", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                attn(f"input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx, ds = idx + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    idx = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            res(f"output_blocks.{idx}.0", ch + chans.pop(), m * mc)
            ch, layers = m * mc, 1
            if ds in attn_ds:
                attn(f"output_blocks.{idx}.1", ch)
                layers = 2
            if level and i == nrb:
                conv(f"output_blocks.{idx}.{layers}.conv", ch, ch, 3)
                ds //= 2
            idx += 1
    pair("out.0", ch)
    conv("out.2", cout, mc, 3)
    return s


def release_first_stage_shapes(ch=CH, ch_mult=CH_MULT, nrb=NRB, z=3, embed=3, n_embed=N_EMBED) -> dict[str, tuple]:
    """VQModelInterface's names and shapes: taming Encoder/Decoder (attn_resolutions []), quantize, 1x1 convs."""
    s: dict[str, tuple] = {}

    def conv(name, o, i, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (o, i, k, k), (o,)

    def pair(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def res(name, i, o):
        pair(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        pair(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def mid(name, c):
        res(f"{name}.block_1", c, c)
        pair(f"{name}.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{part}", c, c, 1)
        res(f"{name}.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder.mid", block_in)
    pair("encoder.norm_out", block_in)
    conv("encoder.conv_out", z, block_in, 3)
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder.mid", block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    pair("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)
    conv("quant_conv", embed, z, 1)
    conv("post_quant_conv", z, embed, 1)
    s["quantize.embedding.weight"] = (n_embed, embed)
    return s


def _random(shapes: dict[str, tuple], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        if len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        else:
            base = 1.0 if name.endswith("weight") and ("norm" in name or "in_layers.0" in name or
                                                        "out_layers.0" in name or name.startswith("out.0")) else 0.0
            out[name] = base + 0.1 * torch.randn(shape, generator=gen)
    return out


def release_state(seed: int = 0, with_buffers: bool = True) -> dict[str, torch.Tensor]:
    """A LatentDiffusion state dict of the LSUN configuration at reduced width, random weights."""
    gen = torch.Generator().manual_seed(seed)
    state = {f"model.diffusion_model.{k}": v for k, v in _random(release_unet_shapes(), gen).items()}
    first = _random(release_first_stage_shapes(), gen)
    first["quantize.embedding.weight"] = torch.randn(N_EMBED, 3, generator=gen)
    state.update({f"first_stage_model.{k}": v for k, v in first.items()})
    if with_buffers:
        betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        state.update(betas=betas.float(), alphas_cumprod=ac.float(), alphas_cumprod_prev=torch.cat([
            torch.ones(1, dtype=torch.float64), ac[:-1]]).float(), sqrt_alphas_cumprod=ac.sqrt().float())
    return state


# -- a functional release UNet, from openaimodel's semantics ------------------------------------------------------
def _gn(x, sd, name):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _res(h, emb, sd, name):
    x = h
    h = F.conv2d(F.silu(_gn(h, sd, f"{name}.in_layers.0")), sd[f"{name}.in_layers.2.weight"],
                 sd[f"{name}.in_layers.2.bias"], padding=1)
    h = h + F.linear(F.silu(emb), sd[f"{name}.emb_layers.1.weight"], sd[f"{name}.emb_layers.1.bias"])[..., None, None]
    h = F.conv2d(F.silu(_gn(h, sd, f"{name}.out_layers.0")), sd[f"{name}.out_layers.3.weight"],
                 sd[f"{name}.out_layers.3.bias"], padding=1)
    if f"{name}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{name}.skip_connection.weight"], sd[f"{name}.skip_connection.bias"])
    return x + h


def legacy_attention(x, sd, name, head_channels=HEAD):
    """openaimodel AttentionBlock with QKVAttentionLegacy: heads split before q/k/v, each head's rows [q; k; v]."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(flat, sd, f"{name}.norm"), sd[f"{name}.qkv.weight"], sd[f"{name}.qkv.bias"])
    heads = c // head_channels
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, -1).split(head_channels, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(head_channels), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    h = F.conv1d(a, sd[f"{name}.proj_out.weight"], sd[f"{name}.proj_out.bias"])
    return (flat + h).reshape(b, c, hh, ww)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def release_unet_forward(sd, x, t, mc=MC, mult=MULT, nrb=NRB, attn_ds=ATTN_DS):
    emb = F.linear(F.silu(F.linear(timestep_embedding(t, mc), sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs, ds, idx = [h], 1, 1
    for level in range(len(mult)):
        for _ in range(nrb):
            h = _res(h, emb, sd, f"input_blocks.{idx}.0")
            if ds in attn_ds:
                h = legacy_attention(h, sd, f"input_blocks.{idx}.1")
            hs.append(h)
            idx += 1
        if level != len(mult) - 1:
            h = F.conv2d(h, sd[f"input_blocks.{idx}.0.op.weight"], sd[f"input_blocks.{idx}.0.op.bias"], stride=2,
                         padding=1)
            hs.append(h)
            idx, ds = idx + 1, ds * 2
    h = _res(legacy_attention(_res(h, emb, sd, "middle_block.0"), sd, "middle_block.1"), emb, sd, "middle_block.2")
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            h = _res(torch.cat([h, hs.pop()], dim=1), emb, sd, f"output_blocks.{idx}.0")
            layer = 1
            if ds in attn_ds:
                h, layer = legacy_attention(h, sd, f"output_blocks.{idx}.1"), 2
            if level and i == nrb:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = F.conv2d(h, sd[f"output_blocks.{idx}.{layer}.conv.weight"],
                             sd[f"output_blocks.{idx}.{layer}.conv.bias"], padding=1)
                ds //= 2
            idx += 1
    return F.conv2d(F.silu(_gn(h, sd, "out.0")), sd["out.2.weight"], sd["out.2.bias"], padding=1)


def _unet_part(state):
    return {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}


def _first_part(state):
    return {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}


@pytest.fixture(scope="module")
def release():
    return release_state()


@pytest.fixture(scope="module")
def converted(release):
    return convert_release(release)


# -- (a) one-to-one conversion ---------------------------------------------------------------------------------
def test_release_layout_converts_one_to_one(release, converted):
    unet_sd, vq_sd = converted.unet.state_dict(), converted.vqvae.state_dict()
    tensors = [v for k, v in release.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))]
    assert sum(v.numel() for v in tensors) == sum(v.numel() for v in unet_sd.values()) + \
        sum(v.numel() for v in vq_sd.values())
    # each diffusers tensor is a release tensor (or, for attention, a slice of one): values are moved, not made
    assert torch.equal(unet_sd["conv_in.weight"], release["model.diffusion_model.input_blocks.0.0.weight"])
    assert torch.equal(vq_sd["quantize.embedding.weight"], release["first_stage_model.quantize.embedding.weight"])
    assert converted.unet.config.block_out_channels == (32, 64, 96, 128)
    assert converted.unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                                      "AttnDownBlock2D")
    assert converted.vqvae.config.num_vq_embeddings == N_EMBED and converted.scale_factor == 1.0
    np.testing.assert_array_equal(converted.alphas_cumprod, release["alphas_cumprod"].numpy())


def test_conversion_names_left_over_and_missing_keys(release):
    extra = dict(release, **{"model.diffusion_model.input_blocks.1.0.stray.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"not mapped: input_blocks\.1\.0\.stray\.weight"):
        convert_release(extra)
    missing = {k: v for k, v in release.items() if k != "first_stage_model.decoder.up.1.upsample.conv.bias"}
    with pytest.raises(ValueError, match=r"decoder\.up\.1\.upsample\.conv\.bias is missing"):
        convert_release(missing)
    with pytest.raises(ValueError, match="cond_stage_model.x"):
        convert_release(dict(release, **{"cond_stage_model.x": torch.zeros(1)}))
    wrong = dict(release, alphas_cumprod=release["alphas_cumprod"] * 0.99)
    with pytest.raises(ValueError, match="not LDM's linear schedule"):
        convert_release(wrong)
    # without the buffers the schedule comes from the formula (LDM's linear = sqrt-linspace squared)
    plain = convert_release(release_state(with_buffers=False))
    np.testing.assert_allclose(plain.alphas_cumprod, release["alphas_cumprod"].numpy(), rtol=1e-6)


def test_ema_weights_are_taken_on_request(release):
    ema = dict(release)
    for k, v in _unet_part(release).items():
        ema["model_ema." + ("diffusion_model." + k).replace(".", "")] = v + 1.0
    ema["model_ema.decay"], ema["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(5)
    plain, averaged = convert_release(ema), convert_release(ema, ema=True)
    assert torch.equal(plain.unet.conv_in.weight, release["model.diffusion_model.input_blocks.0.0.weight"])
    assert torch.equal(averaged.unet.conv_in.weight, release["model.diffusion_model.input_blocks.0.0.weight"] + 1)
    with pytest.raises(ValueError, match="lacks"):
        convert_release(release, ema=True)


# -- (b) diffusers' own converters, for the parts they cover ------------------------------------------------------
def test_agrees_with_diffusers_ldm_converters(release, converted):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    ours = converted.unet.state_dict()
    theirs = convert_ldm_unet_checkpoint(dict(release), dict(converted.unet.config))
    covered = sorted(set(ours) & set(theirs))
    for key in covered:
        assert torch.equal(ours[key], theirs[key]), key
    # diffusers' SD converter covers every resnet, resampler, the time embedding and conv in/out: all but attention
    assert set(covered) == {k for k in ours if ".attentions." not in k}
    # its attention keys keep openaimodel's names (norm/qkv/proj_out of SD's transformer path): none of ours
    assert any(k.endswith("attentions.0.qkv.weight") for k in theirs)
    vq = converted.vqvae.state_dict()
    theirs_vae = convert_ldm_vae_checkpoint(dict(release), dict(converted.vqvae.config))
    covered_vae = sorted(set(vq) & set(theirs_vae))
    for key in covered_vae:
        assert torch.equal(vq[key].reshape(theirs_vae[key].shape), theirs_vae[key]), key
    # the whole encoder/decoder (mid attention included) and both 1x1 convs; only the codebook is ours alone
    assert set(vq) - set(covered_vae) == {"quantize.embedding.weight"}


def test_vq_forward_agrees_with_a_vqmodel_loaded_by_diffusers_converter(release, converted):
    from diffusers import VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs = convert_ldm_vae_checkpoint(dict(release), dict(converted.vqvae.config))
    theirs["quantize.embedding.weight"] = release["first_stage_model.quantize.embedding.weight"]
    other = VQModel.from_config(converted.vqvae.config)
    other.load_state_dict(theirs, strict=True)
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = converted.vqvae.decode(z, force_not_quantize=True).sample
        b = other.eval().decode(z, force_not_quantize=True).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- (c) the release's semantics, re-implemented here ------------------------------------------------------------
def test_unet_matches_the_release_semantics(release, converted):
    sd = _unet_part(release)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([999.0, 417.25])
    with torch.no_grad():
        ref = release_unet_forward(sd, x, t)
        ours = converted.unet(x, t).sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the legacy attention block on its own (the part no diffusers converter maps)
    block = converted.unet.down_blocks[2].attentions[1]
    h = torch.randn(2, 96, 4, 4, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(block(h), legacy_attention(h, sd, "input_blocks.8.1"), rtol=1e-5, atol=1e-5)
    # a head order mistake is caught: swapping two heads' q rows changes the output
    swapped = dict(sd)
    w = sd["input_blocks.8.1.qkv.weight"].clone()
    w[0:32], w[96:128] = sd["input_blocks.8.1.qkv.weight"][96:128], sd["input_blocks.8.1.qkv.weight"][0:32]
    swapped["input_blocks.8.1.qkv.weight"] = w
    assert not torch.allclose(legacy_attention(h, swapped, "input_blocks.8.1"), block(h), atol=1e-4)
    emb = converted.unet.time_proj(t)
    torch.testing.assert_close(emb, timestep_embedding(t, MC))


def test_decode_quantizes_like_taming(converted):
    codebook = converted.vqvae.quantize.embedding.weight
    z = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    quant = quantize_latents(z, codebook)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = codebook[((flat[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)]
    torch.testing.assert_close(quant.permute(0, 2, 3, 1).reshape(-1, 3), nearest, rtol=0, atol=1e-6)
    diffusers_quant = converted.vqvae.quantize(z)[0]
    torch.testing.assert_close(quant, diffusers_quant, rtol=0, atol=1e-6)


# -- (d) the backend ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return save_random_lsun_ldm(tmp_path_factory.mktemp("lsun") / "tiny.safetensors", image_size=16, n_embed=64,
                                seed=5)


@pytest.fixture(scope="module")
def backend(tiny_file):
    return load_backend("lsun_ldm", model_path=str(tiny_file), device="cpu")


def test_backend_contract_and_denoiser(backend):
    assert check_backend(backend) is backend
    assert (backend.name, backend.family, backend.prediction_type, backend.condition_kind) == \
        ("lsun_ldm", "ve", "epsilon", "none")
    assert backend.shape == (3, 16, 16) and backend.encode_prompts(["", ""]) is None
    assert backend.sigma_min == pytest.approx(0.0387590, abs=1e-7)
    assert backend.sigma_max == pytest.approx(83.8225, abs=1e-3)
    with pytest.raises(ValueError, match="unconditional"):
        backend.encode_prompts(["a bedroom"])
    ac = beta_alphas_cumprod("scaled_linear", 0.0015, 0.0195, 1000).astype(np.float64)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    for n in (0, 250, 999):
        sigma = float(np.sqrt((1 - ac[n]) / ac[n]))
        with torch.no_grad():
            eps = backend.unet(x / math.sqrt(1 + sigma ** 2), torch.full((2,), float(n))).sample
            d = backend(x, torch.full((2,), sigma))
        torch.testing.assert_close(d, x - sigma * eps, rtol=1e-5, atol=1e-5 * sigma)
    assert backend.config() == {} and backend.describe()["backend"] == "lsun_ldm"
    assert load_backend("lsun_bedroom_ldm", model_path=backend.info["file"], device="cpu").name == "lsun_ldm"


def test_decode_is_quantize_then_decoder(backend):
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    images = backend.decode(z)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32          # f = 4
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    with torch.no_grad():
        expected = backend.vqvae.decode(z).sample.clamp(-1, 1)        # diffusers' own quantize path
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    # differentiable straight through the quantizer (the distillation's final-step feature loss needs it)
    state = z.clone().requires_grad_(True)
    backend.decode(state).sum().backward()
    assert state.grad is not None and float(state.grad.abs().sum()) > 0


class _Counting:
    def __init__(self, backend):
        self.backend, self.calls, self.rows = backend, 0, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.backend(x, sigma, cond)


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the released ICCV tables are not beside the checkout")
@pytest.mark.parametrize("name", ["00014-lsun_bedroom_ldm-4-5-epd-uni1.0-afs.pkl",
                                  "00030-lsun_bedroom_ldm-4-5-ipndm-uni1.0-afs.pkl"])
def test_released_lsun_tables_sample(backend, name):
    table = load_table(OFFICIAL / name)
    assert table.metadata["backend"] == "lsun_ldm"
    # the table's recorded grid is the backend's default grid
    grid = make_sigmas(backend.default_schedule(table.num_steps, "official")).numpy()
    np.testing.assert_allclose(grid, table.sigmas, rtol=1e-6)
    counter = _Counting(backend)
    x = torch.randn(2, *backend.shape, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = sample_epd(counter, x * float(table.sigmas[0]), table, None)
    count = table.eval_count()
    assert counter.calls == count.sequential == 5 and counter.rows / 2 == count.total
    assert torch.isfinite(out).all() and backend.decode(out).shape == (2, 3, 64, 64)


# -- (e) reading model.ckpt and the file rules ---------------------------------------------------------------------
class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _lightning(state):
    return {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "hyper_parameters": Namespace(lr=2e-6, name="lsun"), "callbacks": {"ModelCheckpoint": {
                "best_model_score": torch.tensor(0.1)}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 2e-6}]}]}


def test_model_ckpt_is_read_without_running_code(tmp_path, release, converted):
    ckpt = tmp_path / "model.ckpt"
    torch.save(_lightning(release), ckpt)
    read = read_lightning_checkpoint(ckpt)
    assert "state_dict" in read.entries and "optimizer_states" in read.entries
    backend = load_backend("lsun_ldm", model_path=str(ckpt), device="cpu")
    for a, b in zip(backend.unet.state_dict().values(), converted.unet.state_dict().values()):
        assert torch.equal(a, b)
    # the CLI converts it once into a pickle-free file that loads to the same weights
    out = tmp_path / "lsun.safetensors"
    assert lsun_cli.main(["convert", str(ckpt), str(out)]) == 0
    again = load_converted(out)
    assert all(torch.equal(a, b) for a, b in zip(again.vqvae.state_dict().values(), converted.vqvae.state_dict().values()))
    assert lsun_cli.main(["show", str(out)]) == 0

    hostile = tmp_path / "hostile.ckpt"
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({**_lightning(release), "callbacks": payload}, hostile)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        read_lightning_checkpoint(hostile)
    with pytest.raises(UnsafePickleError):
        load_backend("lsun_ldm", model_path=str(hostile), device="cpu")
    assert not marker.exists()
    assert lsun_cli.main(["convert", str(hostile), str(tmp_path / "h.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "h.safetensors").exists()


def test_file_errors(tmp_path, monkeypatch, capsys, release):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.ckpt.*lsun_bedrooms\.zip.*latent-diffusion"):
        load_backend("lsun_ldm", device="cpu")
    missing = tmp_path / "nowhere" / "model.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_backend("lsun_ldm", model_path=str(missing))
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_backend("lsun_ldm")
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="legacy"):
        read_lightning_checkpoint(legacy)
    assert lsun_cli.main(["convert", str(missing), str(tmp_path / "o.safetensors")]) == 2
    assert "lsun_bedrooms.zip" in capsys.readouterr().err
    assert lsun_cli.main(["convert", str(legacy), str(tmp_path / "o.pkl")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unconditional"):
        load_backend("lsun_ldm", model_path=str(missing), guidance=2.0)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "epd-solver/edm-network", "version": "1"})
    with pytest.raises(ValueError, match="not a converted latent-diffusion model"):
        load_backend("lsun_ldm", model_path=str(other), device="cpu")
    (tmp_path / "junk.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a torch.save zip archive"):
        load_backend("lsun_ldm", model_path=str(tmp_path / "junk.ckpt"), device="cpu")


def test_random_full_size_matches_the_release_parameter_count():
    """The full-width build is the release architecture: 274.1M UNet and 55.3M autoencoder parameters (counted
    on the original latent-diffusion classes in the one-time parity run, docs/edm.md §5), built on meta."""
    from backends.testing.lsun_random import random_lsun_ldm

    full = random_lsun_ldm("full", device="meta")
    unet, vq = full.unet, full.vqvae
    assert unet.config.block_out_channels == (224, 448, 672, 896) and vq.config.num_vq_embeddings == 8192
    shapes = release_unet_shapes(mc=224)
    assert sum(p.numel() for p in unet.parameters()) == sum(int(np.prod(s)) for s in shapes.values())
    first = release_first_stage_shapes(ch=128, n_embed=8192)
    assert sum(p.numel() for p in vq.parameters()) == sum(int(np.prod(s)) for s in first.values())
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 274.1


# -- distillation with the shipped LSUN config ---------------------------------------------------------------------
def test_lsun_distill_config_trains_on_the_tiny_model(tiny_file, tmp_path, inception_file):
    """configs/distill/lsun_bedroom_ldm-epd-nfe5.yaml (the released run 00014's settings) for two iterations on the
    tiny model, final-step loss on Inception features of the decoded images; the exported table samples."""
    import sample
    from training.distill.config import load_config
    from training.distill.trainer import train

    path = ROOT / "configs" / "distill" / "lsun_bedroom_ldm-epd-nfe5.yaml"
    assert load_config(path).backend.name == "lsun_ldm"
    overrides = [f"outdir={tmp_path}", f"export={tmp_path / 'epd.pkl'}", f"backend.model_path={tiny_file}", "batch=2",
                 "total_kimg=0.004", "teacher.M=1", "teacher.cache=null", "teacher.precompute=0", "device=cpu",
                 "validation.num=0", f"loss.features_path={inception_file}"]
    table, folder = train(path, overrides, progress=False)
    log = [line for line in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(log) >= 2
    assert table.metadata["backend"] == "lsun_ldm" and table.eval_count().sequential == 5
    np.testing.assert_allclose(table.sigmas, load_table(OFFICIAL / "00014-lsun_bedroom_ldm-4-5-epd-uni1.0-afs.pkl")
                               .sigmas, rtol=1e-6)
    rc = sample.main(["--predictor_path", str(tmp_path / "epd.pkl"), "--seeds", "0-1", "--model_path", str(tiny_file),
                      "--outdir", str(tmp_path / "s"), "--device", "cpu", "--no-subdirs"])
    assert rc == 0 and (tmp_path / "s" / "000001.png").is_file()
