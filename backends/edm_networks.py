"""The pixel-space networks of NVIDIA's EDM release (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"), re-implemented so that the released weights load strictly.

Module trees, attribute names and constructor keywords follow the released ``.pkl`` files, so that
``state_dict()`` keys equal theirs and a network can be rebuilt from the ``init_kwargs`` a pickle records:

* :class:`SongUNet`: the DDPM++ / NCSN++ U-Net of Song et al. (score SDE), used by the CIFAR-10, FFHQ-64 and
  AFHQv2-64 checkpoints (``edm-cifar10-32x32-uncond-vp.pkl``, ``edm-ffhq-64x64-uncond-vp.pkl``, ...).
* :class:`DhariwalUNet`: the ADM U-Net of Dhariwal & Nichol, used by ``edm-imagenet-64x64-cond-adm.pkl``.
* Preconditioners (EDM paper, Table 1), ``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))``:

  ========== ======================= ========================== ===================== ===========================
  class      c_skip                  c_out                      c_in                  c_noise
  ========== ======================= ========================== ===================== ===========================
  VPPrecond  1                       -s                         1/sqrt(s^2+1)         (M-1) t(s), VP time t
  VEPrecond  1                       s                          1                     log(s/2)
  iDDPM      1                       -s                         1/sqrt(s^2+1)         M-1-argmin_j |s - u_j|
  EDM        sd^2/(s^2+sd^2)         s sd/sqrt(s^2+sd^2)        1/sqrt(s^2+sd^2)      log(s)/4
  ========== ======================= ========================== ===================== ===========================

  VP: ``s(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``, ``t(s) = (sqrt(beta_min^2 + 2 beta_d log(1+s^2))
  - beta_min) / beta_d`` with beta_d = 19.9, beta_min = 0.1, M = 1000, and the net's range
  ``[s(epsilon_t = 1e-5), s(1)]``. iDDPM: the ``u`` grid of Nichol & Dhariwal's cosine schedule
  (``u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1}/abar_j, C_1) - 1)``, ``abar_j = sin(pi/2 j/(M (C_2+1)))^2``);
  its net predicts 2 x channels (eps and a variance), of which the first half is used. EDM: sigma_data = 0.5.

The inner network lives under the attribute ``model`` (state-dict keys ``model.<unet keys>``; iDDPM adds the
buffer ``u``). Precision: parameters stay float32; with ``use_fp16`` the network body runs in float16 on CUDA
only (the preconditioning, the attention softmax and ``D`` stay float32), as in the release.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding", "SongUNet",
           "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "DDPMPrecond", "PRECOND_CLASSES",
           "NETWORK_CLASSES", "ARCHITECTURE_RANGES", "ARCHITECTURE_LISTS", "MAX_DISCRETE_STEPS",
           "check_architecture", "build_precond", "tiny_precond"]


def _init_weight(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial values: xavier/kaiming, uniform/normal (only matters for training from scratch)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}")


# --- layers -----------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """``y = x W^T + b``; the weights are cast to the input's dtype (fp16 bodies keep fp32 parameters)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """A same-padded convolution with optional 2x up/down-sampling by a separable FIR ``resample_filter``.

    ``kernel = 0`` makes a pure resampler (no weights). The filter ``f f^T / (sum f)^2`` is a buffer
    (present only when resampling). Up-sampling is a transposed grouped convolution with ``4 f f^T``, down-
    sampling a strided grouped convolution; ``fused_resample`` folds the resampling into the convolution's
    padding as the release does (the NCSN++ residual encoder).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight) \
            if kernel else None
        self.bias = nn.Parameter(_init_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (4 * f).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (4 * f).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, channels // min_channels_per_group)`` groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


def _attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax_k(q . k / sqrt(C))`` per head, in float32 (``q``, ``k``: [N, C, L])."""
    scores = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(q.shape[1]))
    return scores.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """Residual block: GroupNorm-SiLU-Conv, a noise-embedding injection (added, or scale-and-shift with
    ``adaptive_scale``), GroupNorm-SiLU-Dropout-Conv, a skip path (1x1 or resampling conv when the shape changes),
    times ``skip_scale``; then optional multi-head self-attention, again residual and scaled.

    Attention heads: ``num_heads`` if given, else ``out_channels // channels_per_head`` (0 heads: none).
    The qkv projection's channels are laid out as ``[head, channel, (q, k, v)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None
                                                  else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, float(skip_scale), adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            batch, channels = x.shape[:2]
            q, k, v = self.qkv(self.norm2(x)).reshape(batch * self.num_heads, channels // self.num_heads, 3, -1).unbind(2)
            attended = torch.einsum("nqk,nck->ncq", _attention_weights(q, k), v)
            x = (self.proj(attended.reshape(*x.shape)) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding ``[cos(x w_i), sin(x w_i)]``, ``w_i = max_positions^(-i/n)`` with
    ``n = C/2 - 1`` (``endpoint``) or ``C/2``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]`` with fixed ``f ~ N(0, scale^2)`` (buffer)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# --- U-Nets -----------------------------------------------------------------------------------------------
class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``, standard encoder/decoder) and NCSN++ (``'fourier'``, residual
    encoder, skip decoder, filter [1, 3, 3, 1]) U-Net. Encoder keys ``enc.{res}x{res}_{conv,down,block<i>,aux_*}``,
    decoder keys ``dec.{res}x{res}_{in0,in1,up,block<i>,aux_*}``; the output is the decoder's ``aux`` path.
    Class labels (one-hot, ``[B, label_dim]``) enter the noise embedding scaled by ``sqrt(label_dim)``."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be fourier or positional (got {embedding_type!r})")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be standard, skip or residual (got {encoder_type!r})")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be standard or skip (got {decoder_type!r})")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=init_attn)

        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional" \
            else FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)   # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, layer in self.enc.items():
            if "aux_down" in name:
                aux = layer(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + layer(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        aux, hidden = None, None
        for name, layer in self.dec.items():
            if "aux_up" in name:
                aux = layer(aux)
            elif "aux_norm" in name:
                hidden = layer(x)
            elif "aux_conv" in name:
                hidden = layer(F.silu(hidden))
                aux = hidden if aux is None else hidden + aux
            else:
                if x.shape[1] != layer.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) as in EDM's ImageNet-64 model: adaptive scale/shift blocks, attention
    heads of 64 channels at ``attn_resolutions``, class labels through a bias-free linear map added to the
    embedding. Keys ``map_*``, ``enc.*``, ``dec.*``, ``out_norm``, ``out_conv``."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, init_mode="kaiming_normal",
                                  init_weight=math.sqrt(augment_dim)) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


NETWORK_CLASSES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# --- preconditioners -------------------------------------------------------------------------------------------
class _Precond(nn.Module):
    """Shared body: ``D(x, s) = c_skip x + c_out F((c_in x).to(dtype), c_noise, labels)[:, :img_channels]``.

    ``class_labels``: one-hot (or soft) ``[B, label_dim]`` floats; None gives the zero vector (the release's
    behaviour). ``init_kwargs`` keeps the constructor keywords (what :func:`build_precond` needs to rebuild it).
    """

    default_model_type = "SongUNet"
    output_factor = 1          # the network predicts output_factor * img_channels channels

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 model_type: str | None = None, **model_kwargs: Any):
        super().__init__()
        model_type = model_type or self.default_model_type
        if model_type not in NETWORK_CLASSES:
            raise ValueError(f"unknown model_type {model_type!r}; known: {', '.join(NETWORK_CLASSES)}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.model_type = bool(use_fp16), model_type
        self.model = NETWORK_CLASSES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                                 out_channels=img_channels * self.output_factor, label_dim=label_dim,
                                                 **model_kwargs)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(c_skip, c_out, c_in, c_noise)`` for float32 ``sigma`` of any shape (same shape out)."""
        raise NotImplementedError

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        """The noise levels the network can represent (identity except for iDDPM's discrete grid)."""
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, **model_kwargs: Any) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = class_labels.to(device=x.device, dtype=torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        return c_skip * x + c_out * out[:, :self.img_channels].to(torch.float32)


def _record_kwargs(obj: _Precond, frame_locals: dict, model_kwargs: dict) -> None:
    names = [p for p in inspect.signature(type(obj).__init__).parameters if p not in ("self", "model_kwargs")]
    obj.init_kwargs = {**{n: frame_locals[n] for n in names}, **model_kwargs}


class VPPrecond(_Precond):
    """Variance-preserving (DDPM++ VP) preconditioning, EDM Table 1 "VP"; sigma range ``[s(epsilon_t), s(1)]``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        _record_kwargs(self, locals(), model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        with torch.device("cpu"):      # real numbers even when the network is laid out on the meta device
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def sigma(self, t: Any) -> torch.Tensor:
        """``s(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Any) -> torch.Tensor:
        """VP time ``t(s) = (sqrt(beta_min^2 + 2 beta_d log(1 + s^2)) - beta_min) / beta_d``."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma))


class VEPrecond(_Precond):
    """Variance-exploding (NCSN++ VE) preconditioning, EDM Table 1 "VE"."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        _record_kwargs(self, locals(), model_kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(_Precond):  # noqa: N801 - the released class name
    """Improved-DDPM (ADM, cosine schedule) preconditioning, EDM Table 1 "iDDPM": the network sees the index of
    the nearest of M discrete noise levels ``u`` (a buffer); it predicts eps and a variance, the first half used."""

    default_model_type = "DhariwalUNet"
    output_factor = 2

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",  # noqa: N803
                 **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        _record_kwargs(self, locals(), model_kwargs)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        with torch.device("cpu"):      # real numbers even when the network is laid out on the meta device
            u = torch.zeros(self.M + 1)
            for j in range(self.M, 0, -1):
                ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=self.C_1)
                u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min = float(u[self.M - 1])
        self.sigma_max = float(u[0])

    def alpha_bar(self, j: Any) -> torch.Tensor:
        """``sin(pi/2 * j / (M (C_2 + 1)))^2``."""
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def _nearest(self, sigma: torch.Tensor) -> torch.Tensor:
        flat = sigma.to(device=self.u.device, dtype=torch.float32).reshape(-1, 1)
        return (flat - self.u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape).to(sigma.device)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return self.u[self._nearest(sigma).to(self.u.device)].to(device=sigma.device, dtype=sigma.dtype)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_noise = self.M - 1 - self._nearest(sigma).to(torch.float32)
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise


class EDMPrecond(_Precond):
    """The EDM paper's own preconditioning (Table 1 "ours", sigma_data = 0.5)."""

    default_model_type = "DhariwalUNet"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        _record_kwargs(self, locals(), model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sd2 = self.sigma_data ** 2
        return (sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt(),
                1 / (sd2 + sigma ** 2).sqrt(), sigma.log() / 4)


class DDPMPrecond(_Precond):
    """A discrete-time epsilon-predicting DDPM (Ho et al. 2020; the parameterisation of SD1.5 and most community
    checkpoints) in VE coordinates: ``D(x, s) = x - s eps(x / sqrt(s^2 + 1), t(s))`` with ``t(s)`` the fractional
    training timestep of the beta schedule (:class:`solvers.schedules.VPDiscreteMap`, exactly n at sigma_n and
    differentiable in between). Not one of NVIDIA's classes: ours, for ``digits_ddpm`` (backends/digits_edm.py).
    The noise range is the schedule's own, ``[sigma_0, sigma_{M-1}]``; ``alphas_cumprod`` gives its discrete grid."""

    default_model_type = "SongUNet"

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
                 num_timesteps: int = 1000, model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        _record_kwargs(self, locals(), model_kwargs)
        from solvers.schedules import VPDiscreteMap, beta_alphas_cumprod

        with torch.device("cpu"):      # real numbers even when the network is laid out on the meta device
            self.alphas_cumprod = beta_alphas_cumprod(beta_schedule, float(beta_start), float(beta_end),
                                                      int(num_timesteps))
            self.vp = VPDiscreteMap(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = self.vp.sigma_min, self.vp.sigma_max

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_noise = self.vp.timestep(sigma).to(torch.float32)
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def epsilon(self, x_vp: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The raw noise prediction ``eps(x_t, t)`` at VP states and integer (or fractional) timesteps: what the
        DDPM loss ``|eps - eps(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2`` trains."""
        labels = None if self.label_dim == 0 else (
            torch.zeros([1, self.label_dim], device=x_vp.device) if class_labels is None
            else class_labels.to(device=x_vp.device, dtype=torch.float32).reshape(-1, self.label_dim))
        out = self.model(x_vp.to(torch.float32), timesteps.to(torch.float32).flatten(), class_labels=labels)
        return out[:, :self.img_channels].to(torch.float32)


PRECOND_CLASSES: dict[str, type[_Precond]] = {"VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
                                              "iDDPMPrecond": iDDPMPrecond, "EDMPrecond": EDMPrecond,
                                              "DDPMPrecond": DDPMPrecond}


#: Discretisation steps (``M`` of VP / iDDPM, ``num_timesteps`` of DDPM): the released networks use 1000; iDDPM's
#: grid is a Python loop over M at construction, so an untrusted value must be bounded before anything is built.
MAX_DISCRETE_STEPS = 10_000
#: The integer constructor arguments an untrusted file may give, with their allowed range. The released networks
#: (docs/edm.md) use resolution 32-64, 3 channels, up to 1000 labels, 128-192 model channels, 3-4 blocks per
#: level and 4 levels; ours (the digits networks) resolution 8, 1 channel. Each bound is several times that, and
#: keeps the layout on the meta device, which is a Python loop over levels x blocks, to a fraction of a second.
ARCHITECTURE_RANGES: dict[str, tuple[int, int]] = {
    "img_resolution": (1, 1024), "img_channels": (1, 16), "label_dim": (0, 100_000), "augment_dim": (0, 64),
    "model_channels": (1, 1024), "channel_mult_emb": (1, 16), "num_blocks": (1, 16), "channel_mult_noise": (1, 16),
    "M": (1, MAX_DISCRETE_STEPS), "num_timesteps": (1, MAX_DISCRETE_STEPS),
}
#: Sequence arguments: (most items, range of each item).
ARCHITECTURE_LISTS: dict[str, tuple[int, tuple[int, int]]] = {
    "channel_mult": (8, (1, 16)), "attn_resolutions": (8, (1, 1024)), "resample_filter": (8, (0, 16)),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_architecture(class_name: str, init_args: Sequence[Any], kwargs: dict) -> None:
    """Refuse recorded constructor arguments outside :data:`ARCHITECTURE_RANGES` / :data:`ARCHITECTURE_LISTS`
    (``ValueError`` naming the argument) before anything is built."""
    positional = ("img_resolution", "img_channels", "label_dim")     # the leading parameters of every class
    if len(init_args) > len(positional):
        raise ValueError(f"{class_name} takes at most {len(positional)} positional arguments; the file records "
                         f"{len(init_args)}")
    kwargs = {**dict(zip(positional, init_args)), **kwargs}
    for key, (lo, hi) in ARCHITECTURE_RANGES.items():
        value = kwargs.get(key)
        if value is not None and not (_is_int(value) and lo <= int(value) <= hi):
            extra = " (the released networks use 1000)" if key in ("M", "num_timesteps") else ""
            raise ValueError(f"{key} = {value!r} is outside {lo}..{hi}{extra}")
    for key, (most, (lo, hi)) in ARCHITECTURE_LISTS.items():
        value = kwargs.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) > most or (not value and key != "attn_resolutions"):
            raise ValueError(f"{key} must be a list of 1..{most} integers (got {type(value).__name__} of "
                             f"{len(value) if isinstance(value, (list, tuple)) else '?'} items)")
        if not all(_is_int(v) and lo <= int(v) <= hi for v in value):
            raise ValueError(f"{key} = {list(value)[:10]!r}: each item must be an integer in {lo}..{hi}")


def build_precond(class_name: str, init_args: Sequence[Any] = (), init_kwargs: dict | None = None,
                  device: str = "cpu") -> _Precond:
    """Construct ``class_name`` (one of :data:`PRECOND_CLASSES`) from recorded constructor arguments, checked by
    :func:`check_architecture` first. ``device="meta"`` lays the network out without allocating it (shapes only)."""
    cls = PRECOND_CLASSES.get(class_name)
    if cls is None:
        raise ValueError(f"unknown EDM network class {class_name!r}; this reader knows {', '.join(PRECOND_CLASSES)}")
    kwargs = dict(init_kwargs or {})
    check_architecture(class_name, init_args, kwargs)
    try:
        with torch.device(device):
            return cls(*init_args, **kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {class_name} from the recorded arguments {list(init_args)} / "
                         f"{sorted(kwargs)}: {err}") from None


def tiny_precond(precond: str = "VPPrecond", model_type: str | None = None, img_resolution: int = 8,
                 img_channels: int = 3, label_dim: int = 0, seed: int = 0, **model_kwargs: Any) -> _Precond:
    """A small random network of the released architectures for tests and smoke runs (no weights needed).

    Defaults: 16 (SongUNet) or 64 (DhariwalUNet, one attention head) channels, two levels, one block, attention at
    the lower level. Every parameter is redrawn from N(0, 0.2^2) (the release's zero-initialised output layers
    would make F = 0), so the output depends on every layer, labels included.
    """
    model_type = model_type or PRECOND_CLASSES[precond].default_model_type
    song = model_type == "SongUNet"
    defaults = dict(model_channels=16 if song else 64, channel_mult=[1, 2] if song else [1, 1], num_blocks=1,
                    attn_resolutions=[img_resolution // 2], dropout=0.0)
    if song:
        defaults.update(channel_mult_emb=2)
    torch.manual_seed(seed)
    net = build_precond(precond, (), dict(img_resolution=img_resolution, img_channels=img_channels,
                                          label_dim=label_dim, model_type=model_type, **{**defaults, **model_kwargs}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return net.eval().requires_grad_(False)
