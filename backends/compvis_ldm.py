"""CompVis latent-diffusion release weights (``lsun_bedrooms-ldm-vq-4``) as diffusers ``UNet2DModel`` + ``VQModel``.

The release's ``state_dict`` (a Lightning ``model.ckpt``, read code-free by :mod:`backends.lightning_checkpoint`)
holds ``model.diffusion_model.*`` (``ldm.modules.diffusionmodules.openaimodel.UNetModel``),
``first_stage_model.*`` (``VQModelInterface``: taming-style ``Encoder``/``Decoder``, ``quantize.embedding`` of
``VectorQuantizer2``, ``quant_conv``, ``post_quant_conv``), the schedule buffers (``betas``,
``alphas_cumprod``, ...) and possibly ``model_ema.*`` (LitEma: the UNet's names with the dots removed).
:func:`convert_release` maps it one-to-one onto diffusers modules and loads them strictly: every release tensor
is used once, every diffusers tensor is filled, shapes agree; anything else is a :class:`ValueError` naming the
keys. What the mapping has to get right (docs/edm.md §5):

* openaimodel's ``QKVAttentionLegacy``: the ``qkv`` 1x1 conv's ``3C`` output channels are laid out per head,
  ``[q_h, k_h, v_h]`` blocks of ``C/H`` channels one head after another, so ``to_q`` takes rows
  ``h*3c .. h*3c+c`` of every head h; the scale ``1/sqrt(sqrt(c))`` on q and k is diffusers' ``c^-1/2``;
* timestep embedding ``[cos, sin]`` of ``t * 10000^(-i/half)``: diffusers ``flip_sin_to_cos=True, freq_shift=0``;
* ``input_blocks`` ``1 + l(n+1) + j`` are level l's resnets/attentions, ``1 + l(n+1) + n`` its downsampler;
  ``output_blocks`` ``k(n+1) + j`` are ``up_blocks[k]`` (the levels reversed), the skip features concatenated
  after the hidden state in both codes; GroupNorm(32, eps 1e-5) everywhere;
* the first stage's mid-block attention uses 1x1 convs (``q``, ``k``, ``v``, ``proj_out``): squeezed to linear
  weights; the decoder's ``up[i]`` is diffusers' ``up_blocks[n-1-i]``.

Decoding reproduces ``LatentDiffusion.decode_first_stage`` for a ``VQModelInterface``: ``z / scale_factor`` is
quantized to its nearest codebook vector (:func:`quantize_latents`, taming's distance formula) before
``post_quant_conv`` and the decoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from solvers.schedules import beta_alphas_cumprod

__all__ = ["ReleaseUNet", "ReleaseFirstStage", "LSUN_UNET", "LSUN_FIRST_STAGE", "LSUN_LINEAR_BETAS",
           "ConvertedLDM", "unet2d_config", "vqmodel_config", "infer_unet", "infer_first_stage",
           "convert_unet_state", "convert_first_stage_state", "split_release_state", "convert_release",
           "build_unet", "build_vqmodel", "check_layout", "load_strict", "quantize_latents", "check_alphas_cumprod",
           "save_converted", "load_converted", "load_model_file", "FORMAT", "UNET_PREFIX", "FIRST_STAGE_PREFIX"]

FORMAT = "epd-solver/compvis-ldm"
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
#: ``linear_start``, ``linear_end``, ``timesteps`` of lsun_bedrooms-ldm-vq-4.yaml. LDM's "linear" schedule squares a
#: linspace of sqrt(beta) (``make_beta_schedule``), which is diffusers' (and our) ``scaled_linear``.
LSUN_LINEAR_BETAS = (0.0015, 0.0195, 1000)
# Buffers of LatentDiffusion besides the networks (register_schedule), recognised and not converted.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar", "scale_factor")


@dataclass(frozen=True)
class ReleaseUNet:
    """``openaimodel.UNetModel`` parameters (unconditional, no scale-shift norm, conv resampling, legacy attention);
    ``attention_resolutions`` are downsampling factors."""

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 224
    attention_resolutions: tuple[int, ...] = (8, 4, 2)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_head_channels: int = 32
    image_size: int = 64


@dataclass(frozen=True)
class ReleaseFirstStage:
    """``VQModelInterface`` parameters (``ddconfig`` flattened; ``attn_resolutions`` must be empty)."""

    embed_dim: int = 3
    n_embed: int = 8192
    z_channels: int = 3
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2


LSUN_UNET = ReleaseUNet()
LSUN_FIRST_STAGE = ReleaseFirstStage()


def unet2d_config(r: ReleaseUNet) -> dict:
    """The diffusers ``UNet2DModel`` config equivalent to ``r``."""
    levels = len(r.channel_mult)
    attn = [2 ** level in r.attention_resolutions for level in range(levels)]
    return dict(sample_size=r.image_size, in_channels=r.in_channels, out_channels=r.out_channels,
                center_input_sample=False, time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                block_out_channels=tuple(r.model_channels * m for m in r.channel_mult),
                layers_per_block=r.num_res_blocks, mid_block_scale_factor=1, downsample_padding=1,
                downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
                attention_head_dim=r.num_head_channels, norm_num_groups=32, norm_eps=1e-5,
                resnet_time_scale_shift="default", add_attention=True)


def vqmodel_config(f: ReleaseFirstStage) -> dict:
    """The diffusers ``VQModel`` config equivalent to ``f``."""
    levels = len(f.ch_mult)
    return dict(in_channels=f.in_channels, out_channels=f.out_ch, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(f.ch * m for m in f.ch_mult),
                layers_per_block=f.num_res_blocks, act_fn="silu", latent_channels=f.z_channels,
                sample_size=f.resolution, num_vq_embeddings=f.n_embed, norm_num_groups=32,
                vq_embed_dim=f.embed_dim, scaling_factor=1.0, norm_type="group", mid_block_add_attention=True)


def build_unet(r: ReleaseUNet, device: str | torch.device | None = None) -> torch.nn.Module:
    from diffusers import UNet2DModel

    with torch.device(device or "cpu"):
        return UNet2DModel(**unet2d_config(r))


def build_vqmodel(f: ReleaseFirstStage, device: str | torch.device | None = None) -> torch.nn.Module:
    from diffusers import VQModel

    with torch.device(device or "cpu"):
        return VQModel(**vqmodel_config(f))


# -- architecture from the tensors' shapes -----------------------------------------------------------------------
def _shape(state: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"{where}: tensor {key} is missing (not the latent-diffusion UNet/VQ layout)")
    return tuple(int(n) for n in np.shape(state[key]))


def infer_unet(state: Mapping[str, Any], num_head_channels: int = 32, where: str = "the UNet") -> ReleaseUNet:
    """The ``UNetModel`` parameters a release state dict (keys without ``model.diffusion_model.``) was built with,
    read from its shapes; ``num_head_channels`` cannot be read from shapes (32 in the release)."""
    conv_in = _shape(state, "input_blocks.0.0.weight", where)
    model_channels, in_channels = conv_in[0], conv_in[1]
    out_channels = _shape(state, "out.2.weight", where)[0]
    index, level, mult, attn = 1, 0, [], []
    num_res_blocks = 0
    while f"input_blocks.{index}.0.in_layers.2.weight" in state:
        j = 0
        while f"input_blocks.{index}.0.in_layers.2.weight" in state:
            channels = _shape(state, f"input_blocks.{index}.0.in_layers.2.weight", where)[0]
            if j == 0:
                mult.append(channels // model_channels)
                attn.append(f"input_blocks.{index}.1.qkv.weight" in state)
            index, j = index + 1, j + 1
        num_res_blocks = j
        if f"input_blocks.{index}.0.op.weight" not in state:
            break
        index, level = index + 1, level + 1
    if not mult:
        raise ValueError(f"{where}: no input blocks found")
    return ReleaseUNet(in_channels, out_channels, model_channels,
                       tuple(2 ** i for i, a in enumerate(attn) if a)[::-1], num_res_blocks, tuple(mult),
                       num_head_channels, 64)


def infer_first_stage(state: Mapping[str, Any], resolution: int = 256,
                      where: str = "the first stage") -> ReleaseFirstStage:
    """``VQModelInterface`` parameters from the shapes of its tensors (keys without ``first_stage_model.``)."""
    conv_in = _shape(state, "encoder.conv_in.weight", where)
    ch, in_channels = conv_in[0], conv_in[1]
    mult, level = [], 0
    while f"encoder.down.{level}.block.0.conv1.weight" in state:
        mult.append(_shape(state, f"encoder.down.{level}.block.0.conv1.weight", where)[0] // ch)
        level += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in state:
        blocks += 1
    n_embed, embed_dim = _shape(state, "quantize.embedding.weight", where)
    z_channels = _shape(state, "post_quant_conv.weight", where)[0]
    out_ch = _shape(state, "decoder.conv_out.weight", where)[0]
    if not mult:
        raise ValueError(f"{where}: no encoder blocks found")
    return ReleaseFirstStage(embed_dim, n_embed, z_channels, resolution, in_channels, out_ch, ch, tuple(mult), blocks)


# -- the key mapping ------------------------------------------------------------------------------------------------
class _Taker:
    """Moves release tensors to diffusers names, each release key used exactly once."""

    def __init__(self, state: Mapping[str, Any], where: str):
        self.state = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                      for k, v in state.items()}
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}
        self.where = where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ValueError(f"{self.where}: release tensor {key} is missing")
        if key in self.used:
            raise ValueError(f"{self.where}: release tensor {key} mapped twice")
        self.used.add(key)
        return self.state[key]

    def move(self, src: str, dst: str, names: tuple[str, ...] = ("weight", "bias"), squeeze: bool = False) -> None:
        for name in names:
            value = self.get(f"{src}.{name}")
            if squeeze and name == "weight":
                value = value.reshape(value.shape[0], value.shape[1])
            self.out[f"{dst}.{name}"] = value

    def leftover(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _resblock_unet(t: _Taker, src: str, dst: str) -> None:
    t.move(f"{src}.in_layers.0", f"{dst}.norm1")
    t.move(f"{src}.in_layers.2", f"{dst}.conv1")
    t.move(f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
    t.move(f"{src}.out_layers.0", f"{dst}.norm2")
    t.move(f"{src}.out_layers.3", f"{dst}.conv2")
    if f"{src}.skip_connection.weight" in t.state:
        t.move(f"{src}.skip_connection", f"{dst}.conv_shortcut")


def _legacy_attention(t: _Taker, src: str, dst: str, head_channels: int) -> None:
    """openaimodel AttentionBlock (QKVAttentionLegacy) -> diffusers Attention: split the per-head [q, k, v] rows."""
    t.move(f"{src}.norm", f"{dst}.group_norm")
    weight, bias = t.get(f"{src}.qkv.weight"), t.get(f"{src}.qkv.bias")
    channels = weight.shape[1]
    if channels % head_channels:
        raise ValueError(f"{t.where}: {src} has {channels} channels, not a multiple of {head_channels} per head")
    heads = channels // head_channels
    w = weight.reshape(heads, 3, head_channels, channels)
    b = bias.reshape(heads, 3, head_channels)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        t.out[f"{dst}.{name}.weight"] = w[:, i].reshape(channels, channels).contiguous()
        t.out[f"{dst}.{name}.bias"] = b[:, i].reshape(channels).contiguous()
    t.move(f"{src}.proj_out", f"{dst}.to_out.0", squeeze=True)


def convert_unet_state(state: Mapping[str, Any], r: ReleaseUNet) -> dict[str, torch.Tensor]:
    """Release UNet tensors (without ``model.diffusion_model.``) -> ``UNet2DModel`` state dict; every key used."""
    t = _Taker(state, "the UNet")
    n, levels = r.num_res_blocks, len(r.channel_mult)
    attn = [2 ** level in r.attention_resolutions for level in range(levels)]
    t.move("time_embed.0", "time_embedding.linear_1")
    t.move("time_embed.2", "time_embedding.linear_2")
    t.move("input_blocks.0.0", "conv_in")
    for level in range(levels):
        for j in range(n):
            index = 1 + level * (n + 1) + j
            _resblock_unet(t, f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}")
            if attn[level]:
                _legacy_attention(t, f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}",
                                  r.num_head_channels)
        if level < levels - 1:
            t.move(f"input_blocks.{1 + level * (n + 1) + n}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
    _resblock_unet(t, "middle_block.0", "mid_block.resnets.0")
    _legacy_attention(t, "middle_block.1", "mid_block.attentions.0", r.num_head_channels)
    _resblock_unet(t, "middle_block.2", "mid_block.resnets.1")
    for k in range(levels):
        level = levels - 1 - k
        for j in range(n + 1):
            index = k * (n + 1) + j
            _resblock_unet(t, f"output_blocks.{index}.0", f"up_blocks.{k}.resnets.{j}")
            sub = 1
            if attn[level]:
                _legacy_attention(t, f"output_blocks.{index}.1", f"up_blocks.{k}.attentions.{j}", r.num_head_channels)
                sub = 2
            if level > 0 and j == n:
                t.move(f"output_blocks.{index}.{sub}.conv", f"up_blocks.{k}.upsamplers.0.conv")
    t.move("out.0", "conv_norm_out")
    t.move("out.2", "conv_out")
    if t.leftover():
        raise ValueError(f"the UNet: {len(t.leftover())} release tensor(s) not mapped: {_names(t.leftover())}")
    return t.out


def _resblock_vq(t: _Taker, src: str, dst: str) -> None:
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")):
        t.move(f"{src}.{a}", f"{dst}.{b}")
    if f"{src}.nin_shortcut.weight" in t.state:
        t.move(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")


def _mid_vq(t: _Taker, src: str, dst: str) -> None:
    _resblock_vq(t, f"{src}.block_1", f"{dst}.resnets.0")
    t.move(f"{src}.attn_1.norm", f"{dst}.attentions.0.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        t.move(f"{src}.attn_1.{a}", f"{dst}.attentions.0.{b}", squeeze=True)
    _resblock_vq(t, f"{src}.block_2", f"{dst}.resnets.1")


def convert_first_stage_state(state: Mapping[str, Any], f: ReleaseFirstStage) -> dict[str, torch.Tensor]:
    """Release first-stage tensors (without ``first_stage_model.``) -> ``VQModel`` state dict; every key used."""
    t = _Taker(state, "the first stage")
    levels = len(f.ch_mult)
    t.move("encoder.conv_in", "encoder.conv_in")
    for i in range(levels):
        for j in range(f.num_res_blocks):
            _resblock_vq(t, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            t.move(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _mid_vq(t, "encoder.mid", "encoder.mid_block")
    t.move("encoder.norm_out", "encoder.conv_norm_out")
    t.move("encoder.conv_out", "encoder.conv_out")
    t.move("decoder.conv_in", "decoder.conv_in")
    _mid_vq(t, "decoder.mid", "decoder.mid_block")
    for i in range(levels):
        k = levels - 1 - i
        for j in range(f.num_res_blocks + 1):
            _resblock_vq(t, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}")
        if i > 0:
            t.move(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    t.move("decoder.norm_out", "decoder.conv_norm_out")
    t.move("decoder.conv_out", "decoder.conv_out")
    t.move("quant_conv", "quant_conv")
    t.move("post_quant_conv", "post_quant_conv")
    t.move("quantize.embedding", "quantize.embedding", names=("weight",))
    if t.leftover():
        attn = [k for k in t.leftover() if ".attn." in k]
        hint = " (attention at encoder/decoder resolutions, attn_resolutions != [], is not supported)" if attn else ""
        raise ValueError(f"the first stage: {len(t.leftover())} release tensor(s) not mapped{hint}: "
                         f"{_names(t.leftover())}")
    return t.out


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")


def split_release_state(state: Mapping[str, Any], *, ema: bool = False) -> tuple[dict, dict, dict]:
    """``(unet, first_stage, buffers)`` of a release state dict, prefixes removed. With ``ema`` the UNet comes from
    the LitEma copy (``model_ema.<name without dots>``). Keys outside the known layout raise ValueError."""
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    first = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    buffers = {k: v for k, v in state.items() if k in SCHEDULE_BUFFERS}
    ema_keys = {k for k in state if k.startswith(EMA_PREFIX)}
    unknown = sorted(set(state) - set(buffers) - ema_keys - {k for k in state if k.startswith(UNET_PREFIX)}
                     - {k for k in state if k.startswith(FIRST_STAGE_PREFIX)})
    if unknown:
        raise ValueError(f"the checkpoint has {len(unknown)} tensor(s) outside the latent-diffusion LatentDiffusion "
                         f"layout (model.diffusion_model., first_stage_model., model_ema., schedule buffers; an "
                         f"unconditional model has no cond_stage_model): {_names(unknown)}")
    if not unet or not first:
        raise ValueError("the checkpoint has no model.diffusion_model.* or no first_stage_model.* tensors: not a "
                         "latent-diffusion LatentDiffusion checkpoint")
    if ema:
        flat = {EMA_PREFIX + ("diffusion_model." + k).replace(".", ""): k for k in unet}
        if len(flat) != len(unet):
            raise ValueError("the EMA names of the UNet are ambiguous")
        missing = sorted(set(flat) - ema_keys)
        if missing:
            raise ValueError(f"ema=True but the checkpoint lacks {len(missing)} EMA tensor(s): {_names(missing)}")
        unet = {name: state[key] for key, name in flat.items()}
    return unet, first, buffers


def check_alphas_cumprod(values: Any, betas: tuple[float, float, int] = LSUN_LINEAR_BETAS) -> np.ndarray:
    """The file's ``alphas_cumprod`` (float32), checked against LDM's linear schedule (sqrt-linspace squared)."""
    found = np.asarray(values, dtype=np.float64).reshape(-1)
    expected = beta_alphas_cumprod("scaled_linear", betas[0], betas[1], betas[2]).astype(np.float64)
    if found.shape != expected.shape or not np.allclose(found, expected, rtol=1e-5, atol=1e-7):
        worst = float(np.max(np.abs(found - expected))) if found.shape == expected.shape else float("nan")
        raise ValueError(f"the checkpoint's alphas_cumprod ({found.size} values, max deviation {worst:.3g}) is not "
                         f"LDM's linear schedule {betas[0]} -> {betas[1]} over {betas[2]} steps of the release")
    return found.astype(np.float32)


def check_layout(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> dict:
    """Every name and shape of ``model``'s state dict matches ``tensors`` (ValueError naming the keys otherwise);
    works on a meta-device model, so untrusted parameters are checked before any allocation."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {len(missing)}: {_names(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)}: {_names(unexpected)}"] if unexpected else [])
        raise ValueError(f"{what}: the converted tensors do not match {type(model).__name__} ({'; '.join(parts)})")
    bad = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{what}: shape mismatch for {len(bad)} tensor(s): {_names(bad)}")
    return expected


def load_strict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    """:func:`check_layout`, then ``load_state_dict(strict=True)``; eval mode, no gradients."""
    expected = check_layout(model, tensors, what)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
    return model.eval().requires_grad_(False)


def _build_loaded(r: "ReleaseUNet", f: "ReleaseFirstStage", unet_t: Mapping[str, torch.Tensor],
                  vq_t: Mapping[str, torch.Tensor], where: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Both networks, built for real only after their meta-device twins matched the tensors."""
    try:
        check_layout(build_unet(r, "meta"), unet_t, f"{where} (UNet)")
        check_layout(build_vqmodel(f, "meta"), vq_t, f"{where} (first stage)")
    except (TypeError, RuntimeError) as err:     # diffusers refuses some configs while building
        raise ValueError(f"{where}: {err}") from None
    return (load_strict(build_unet(r), unet_t, f"{where} (UNet)"),
            load_strict(build_vqmodel(f), vq_t, f"{where} (first stage)"))


@dataclass
class ConvertedLDM:
    """The converted model: diffusers ``unet`` and ``vqvae``, ``alphas_cumprod`` (float32 [1000]), the latent
    ``scale_factor`` and the release parameters and provenance (``config``)."""

    unet: torch.nn.Module
    vqvae: torch.nn.Module
    alphas_cumprod: np.ndarray
    scale_factor: float = 1.0
    config: dict = field(default_factory=dict)


def convert_release(state: Mapping[str, Any], *, ema: bool = False, num_head_channels: int = 32,
                    source: dict | None = None) -> ConvertedLDM:
    """A release state dict (``model.ckpt``'s ``state_dict``) -> :class:`ConvertedLDM`, loaded strictly.
    ``alphas_cumprod`` comes from the file when present (checked against the linear betas), else the formula."""
    unet_state, first_state, buffers = split_release_state(state, ema=ema)
    r = infer_unet(unet_state, num_head_channels)
    f = infer_first_stage(first_state)
    unet, vqvae = _build_loaded(r, f, convert_unet_state(unet_state, r), convert_first_stage_state(first_state, f),
                                "the checkpoint")
    if "alphas_cumprod" in buffers:
        alphas = check_alphas_cumprod(buffers["alphas_cumprod"])
    else:
        alphas = beta_alphas_cumprod("scaled_linear", *LSUN_LINEAR_BETAS)
    scale = float(np.asarray(buffers["scale_factor"]).reshape(())) if "scale_factor" in buffers else 1.0
    config = {"unet": asdict(r), "first_stage": asdict(f), "scale_factor": scale, "ema": bool(ema),
              "source": dict(source or {})}
    return ConvertedLDM(unet, vqvae, alphas, scale, config)


def quantize_latents(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each latent vector ``z[b, :, h, w]`` replaced by its nearest codebook row, with taming ``VectorQuantizer2``'s
    distance ``|z|^2 + |e|^2 - 2 z.e`` and its straight-through form ``z + (e - z)`` (LDM's decode_first_stage)."""
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    e = codebook.to(flat.dtype)
    d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
    chosen = e[d.argmin(1)]
    out = flat + (chosen - flat).detach()       # the value of the code, the gradient of z (straight through)
    return out.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


# -- the pickle-free file -------------------------------------------------------------------------------------------
def save_converted(model: ConvertedLDM, path: str | Path) -> Path:
    """Write ``model`` as one safetensors file (``unet.*``, ``vqvae.*``, ``alphas_cumprod``) whose header's
    ``config`` JSON holds the release parameters, scale factor and provenance. Written atomically."""
    from safetensors.torch import save

    from safeio import atomic_write

    tensors = {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in model.unet.state_dict().items()}
    tensors.update({f"vqvae.{k}": v.detach().to("cpu").contiguous() for k, v in model.vqvae.state_dict().items()})
    tensors["alphas_cumprod"] = torch.as_tensor(np.asarray(model.alphas_cumprod, dtype=np.float32))
    config = {**model.config, "scale_factor": float(model.scale_factor)}
    path = Path(path)
    atomic_write(path, save(tensors, metadata={"format": FORMAT, "version": "1", "config": json.dumps(config)}))
    return path


def _params(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: the header's {cls.__name__} is not a mapping")
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in cls.__dataclass_fields__}
    if set(data) - set(known):
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {sorted(set(data) - set(known))}")
    for key, value in known.items():
        items = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in items):
            raise ValueError(f"{where}: {cls.__name__}.{key} = {value!r} is not a positive integer (list)")
    return cls(**known)


def load_converted(path: str | Path) -> ConvertedLDM:
    """Read a file written by :func:`save_converted` (no pickle); the networks are rebuilt from the header's
    parameters, checked on the meta device against the stored names and shapes, then loaded strictly."""
    from safetensors import safe_open

    from safeio.limits import check_size, check_structure

    from .lightning_checkpoint import MAX_CHECKPOINT_BYTES

    path = Path(path)
    check_size(path.stat().st_size, MAX_CHECKPOINT_BYTES, str(path), "converted latent-diffusion model")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if header.get("format") != FORMAT or header.get("version") != "1":
        raise ValueError(f"{path}: not a converted latent-diffusion model (header format {header.get('format')!r}, "
                         f"version {header.get('version')!r}); convert model.ckpt with "
                         "`python -m tools.lsun_cli convert model.ckpt OUT.safetensors`")
    try:
        config = json.loads(header.get("config", ""))
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: invalid config JSON in the header ({type(err).__name__})") from None
    check_structure(config, str(path))
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the header's config is not a mapping")
    r = _params(ReleaseUNet, config.get("unet"), str(path))
    f = _params(ReleaseFirstStage, config.get("first_stage"), str(path))
    unet_t = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
    vq_t = {k[6:]: v for k, v in tensors.items() if k.startswith("vqvae.")}
    other = sorted(set(tensors) - {f"unet.{k}" for k in unet_t} - {f"vqvae.{k}" for k in vq_t} - {"alphas_cumprod"})
    if other or "alphas_cumprod" not in tensors:
        raise ValueError(f"{path}: unexpected tensors {_names(other)}" if other else f"{path}: no alphas_cumprod")
    alphas = check_alphas_cumprod(tensors["alphas_cumprod"].numpy())
    scale = float(config.get("scale_factor", 1.0))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"{path}: scale_factor {scale} is not a positive number")
    unet, vqvae = _build_loaded(r, f, unet_t, vq_t, str(path))
    return ConvertedLDM(unet, vqvae, alphas, scale, config)


def load_model_file(path: str | Path, *, ema: bool = False) -> ConvertedLDM:
    """A converted ``.safetensors`` file, or the release's ``model.ckpt`` (read code-free, converted in memory)."""
    from .lightning_checkpoint import read_lightning_checkpoint

    path = Path(path)
    if path.suffix == ".safetensors":
        if ema:
            raise ValueError(f"{path}: ema applies to model.ckpt; a converted file holds the weights chosen at "
                             "conversion")
        return load_converted(path)
    checkpoint = read_lightning_checkpoint(path)
    # Only the tensors used are read: the EMA copy stays in the file unless asked for (its names still count).
    wanted = [k for k in checkpoint.state_dict if ema or not k.startswith(EMA_PREFIX)]
    state: dict[str, Any] = {**checkpoint.state_dict, **checkpoint.arrays(wanted)}
    return convert_release(state, ema=ema, source={"path": path.name, "format": "latent-diffusion model.ckpt",
                                                   "entries": checkpoint.entries})
