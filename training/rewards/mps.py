"""MPS reward head (Multi-dimensional Preference Score, Zhang et al., CVPR 2024; github.com/Kwai-Kolors/MPS).

Weights: tensor-only, never a pickled model. The authors load ``MPS_overall_checkpoint.pth`` with ``torch.load(...,
weights_only=False)``: the file is a whole pickled model, so loading it runs code stored in the file
(docs/authors-code.md §8.5, 9.18). This module refuses such files. It reads only a tensor-only state dict, made
**once**, in a trusted and isolated environment (a throw-away container or VM with the MPS code on the path and no
credentials), from the published checkpoint::

    import torch
    m = torch.load("MPS_overall_checkpoint.pth", map_location="cpu", weights_only=False)  # runs the pickle
    torch.save(m.state_dict(), "MPS_overall_state_dict.pt")

and copied to ``weights/MPS_overall_state_dict.pt`` (or ``$MPS_MODEL_PATH``); it is read with
``torch.load(weights_only=True)``. The processor and tokenizer come from a local copy of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the folder PickScore uses; ``processor_path`` or the manifest).

The network (written here from the description of the published code; key names are those of its module tree):

* ``model``: a transformers ``CLIPModel`` (ViT-H-14: vision 1280 x 32 layers, patch 14, 224 px; text 1024 x 24
  layers; projection 1024). Text features: ``text_projection`` of **every** token of ``last_hidden_state``
  (``[B, 77, 1024]``) and of the pooled EOS state (``[B, 1024]``). Image tokens: ``visual_projection`` of the
  vision tower's ``last_hidden_state`` (all 257 tokens, before ``post_layernorm``). Prompts and the condition are
  tokenised with ``padding="max_length"`` to 77 tokens and run **without** an attention mask (as the authors).
* ``cross_model``: 4 CoCa-style layers (dim 1024, 16 heads of 64, ff_mult 4), each a residual multi-query
  cross-attention from the image tokens to the prompt tokens (with a SwiGLU feed-forward in parallel) followed by
  a residual parallel self-attention + SwiGLU block with rotary positions and a causal mask.
* Condition mask: ``s[b, i] = max_j <t[b, i], c[j]>`` over the tokens ``j`` of the fixed condition
  :data:`MPS_CONDITION` (22 aspects) for each prompt token ``i``; ``s`` is divided by its maximum and the
  prompt tokens with ``s <= threshold`` are hidden from the cross-attention (additive ``-inf``).
* ``score = exp(logit_scale) * cos(text_eos, cross_model(image_tokens, text_tokens, mask)[:, 0])``.

Choices and what is not verified:

* ``threshold`` defaults to 0.3 (the value in the spec, 8.5); the public MPS repository's code uses 0.01. Both
  are plain options.
* The authors divide ``s`` by its maximum over the whole batch. Their inference scores one prompt at a time, so
  this head divides by each prompt's own maximum (``mask_norm="prompt"``): a score then does not depend on the
  other prompts of the chunk. ``mask_norm="batch"`` reproduces the batch-wide maximum.
* The self-attention block is causal (as CoCa's; kept from the published code as we know it, ``config={"cross":
  {"causal": False}}`` turns it off). With it, position 0 of the cross-model output, the image feature, does not
  depend on the other 256 image tokens.
* No real converted checkpoint was available when this was written: the architecture, the key names, the causal
  mask and the threshold come from the published code as described to us and are checked only on tiny random
  models. Loading is strict (a mismatching file fails with the missing / unexpected keys listed), so a real file
  with another structure cannot load silently. ``*.embeddings.position_ids`` entries of older transformers are
  accepted and dropped.
* ``normalise(s) = clamp(s / 26, 0, 1)`` (``scale``) is this repository's choice, by analogy with PickScore; the
  authors never mix MPS into the RDPO reward (it is an evaluation metric, docs/authors-code.md §8.5).

Images ``[B, C, H, W]`` in ``[-1, 1]`` become uint8 by rounding and go through the CLIP image processor as PIL
images (:func:`training.rewards.common.images_to_pil`, as PickScore). Scoring is batched (``batch_size``, 4 by
default as the authors' CLI), under fp16 autocast on CUDA when ``amp`` and in float32 on the CPU; scores are
float32 on the CPU, computed without grad.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.rewards.common import (autocast_context, check_batch_size, images_to_pil, processor_folder,
                                     resolve_device)
from training.rewards.registry import register_reward, score_in_chunks

__all__ = ["PickledModelError", "MPSStateDictError", "refuse_pickled_model", "load_mps_state_dict",
           "CONVERSION_HELP", "MPS_CONDITION", "MPS_THRESHOLD", "MPS_SCALE", "MPS_CLIP_CONFIG", "MPS_CROSS_CONFIG",
           "LayerNorm", "Residual", "SwiGLU", "RotaryEmbedding", "rotate_half", "apply_rotary",
           "CrossAttention", "ParallelTransformerBlock", "CrossModel", "MPSNetwork", "build_mps_network",
           "condition_mask", "mps_score", "load_mps_network", "MPSHead"]

CONVERSION_HELP = (
    "Convert it once, in a trusted isolated environment with the MPS code importable: "
    "m = torch.load('MPS_overall_checkpoint.pth', map_location='cpu', weights_only=False); "
    "torch.save(m.state_dict(), 'MPS_overall_state_dict.pt'); then put MPS_overall_state_dict.pt under weights/ "
    "(or set $MPS_MODEL_PATH). See training/rewards/mps.py.")

#: The fixed condition text: 22 aspects of preference.
MPS_CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
                 "instance, texture, quantity, attributes, position, number, location, word, things.")
#: Default mask threshold (docs/authors-code.md §8.5); the public MPS code uses 0.01.
MPS_THRESHOLD = 0.3
#: ``normalise(s) = clamp(s / MPS_SCALE, 0, 1)`` (this repository's choice).
MPS_SCALE = 26.0
#: ``CLIPConfig`` of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (what MPS fine-tunes).
MPS_CLIP_CONFIG: dict[str, Any] = {
    "projection_dim": 1024,
    "logit_scale_init_value": 2.6592,
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "num_channels": 3,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5},
}
#: The condition cross-model of MPS.
MPS_CROSS_CONFIG: dict[str, Any] = {"dim": 1024, "layer_num": 4, "heads": 16, "dim_head": 64, "ff_mult": 4,
                                    "causal": True}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- weights file ------------------------------------------------------------------------------------------------

class PickledModelError(ValueError):
    """The file holds pickled objects other than tensors (a whole model): loading it would run code."""


class MPSStateDictError(ValueError):
    """A tensor-only state dict that does not fit the MPS network (strict load)."""


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the non-allow-listed globals in a checkpoint, read without unpickling (torch >= 2.5)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return list(finder(str(path)))
    except Exception:  # not a zip checkpoint (legacy format): the load error below still says why
        return []


def refuse_pickled_model(path: str | os.PathLike) -> Any:
    """Load ``path`` with ``torch.load(weights_only=True)`` (safe: no code runs) and return the object.

    A file that needs other globals (a pickled ``nn.Module``, like ``MPS_overall_checkpoint.pth``) raises
    :class:`PickledModelError` naming the offending globals and the one-time conversion.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        names = _unsafe_globals(path)
        if names:
            found = f" (it pickles {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
        else:
            reason = _ANSI.sub("", str(err)).strip().splitlines()
            found = f" ({type(err).__name__}: {reason[0][:200] if reason else ''})"
        raise PickledModelError(
            f"{path} is not a tensor-only checkpoint{found}. A pickled model is refused: loading it would run code "
            f"stored in the file. {CONVERSION_HELP}") from None


def load_mps_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The converted MPS state dict (``{name: tensor}``, or wrapped in ``{"state_dict": ...}``), validated."""
    obj = refuse_pickled_model(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise PickledModelError(f"{path} holds {type(obj).__name__}, not a state dict of tensors. {CONVERSION_HELP}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PickledModelError(f"{path}: entries {', '.join(bad[:5])} are not named tensors; expected "
                                f"model.state_dict(). {CONVERSION_HELP}")
    return dict(obj)


# -- the cross model (CoCa-style blocks) -------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """Layer norm with a learnt scale ``gamma`` and a fixed zero shift (the buffer ``beta``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class Residual(nn.Module):
    """``fn(x, ...) + x``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.fn(x, *args, **kwargs) + x


class SwiGLU(nn.Module):
    """Split the last dim in halves ``(value, gate)`` and return ``silu(gate) * value``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class RotaryEmbedding(nn.Module):
    """Rotary angles ``[n, dim]``: position ``p`` times ``inv_freq = 10000^(-2k/dim)``, the half repeated twice."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(n, device=device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq.to(device, torch.float32)[None, :]
        return torch.cat((angles, angles), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the halves of the last dim."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(angles: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin`` (angles ``[n, d]`` broadcast over the leading dims of ``t [..., n, d]``)."""
    return t * angles.cos() + rotate_half(t) * angles.sin()


def _swiglu_ff(dim: int, ff_mult: int, first: bool) -> nn.Sequential:
    inner = ff_mult * dim
    if first:                                  # Linear(dim, 2 inner), SwiGLU, Linear(inner, dim)
        return nn.Sequential(nn.Linear(dim, 2 * inner, bias=False), SwiGLU(), nn.Linear(inner, dim, bias=False))
    return nn.Sequential(SwiGLU(), nn.Linear(inner, dim, bias=False))


class CrossAttention(nn.Module):
    """Multi-query cross-attention (``heads`` query heads, one shared key/value head) from ``x`` to ``context``,
    with an additive mask ``[B, Nx, Nc]`` (0 or -inf) and a parallel SwiGLU feed-forward of the normed ``x``."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, parallel_ff: bool = True, ff_mult: int = 4):
        super().__init__()
        if not parallel_ff:
            raise ValueError("MPS uses CrossAttention with parallel_ff=True")
        self.heads, self.dim_head = int(heads), int(dim_head)
        self.scale = self.dim_head ** -0.5
        self.norm = LayerNorm(dim)
        self.context_norm = nn.Identity()
        self.to_q = nn.Linear(dim, self.heads * self.dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * self.dim_head, bias=False)
        self.to_out = nn.Linear(self.heads * self.dim_head, dim, bias=False)
        self.ff = _swiglu_ff(dim, ff_mult, first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        context = self.context_norm(context)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) * self.scale   # [b, h, n, d]
        k, v = self.to_kv(context).chunk(2, dim=-1)                                          # [b, m, d]
        sim = torch.einsum("bhid,bjd->bhij", q, k)
        if mask is not None:
            sim = sim + mask[:, None].to(sim.dtype)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """Self-attention (multi-query, rotary, causal unless ``causal=False``) and a SwiGLU feed-forward computed in
    parallel from one fused projection of the normed input: ``attn_out(attention) + ff_out(ff)``."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4, causal: bool = True):
        super().__init__()
        self.heads, self.dim_head, self.causal = int(heads), int(dim_head), bool(causal)
        self.scale = self.dim_head ** -0.5
        attn_inner, ff_inner = self.heads * self.dim_head, ff_mult * dim
        self.fused_dims = (attn_inner, self.dim_head, self.dim_head, 2 * ff_inner)
        self.norm = LayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(self.dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = _swiglu_ff(dim, ff_mult, first=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)                        # [b, h, n, d]
        angles = self.rotary_emb(n, x.device)
        q, k = apply_rotary(angles, q), apply_rotary(angles, k)
        q = q * self.scale
        sim = torch.einsum("bhid,bjd->bhij", q, k)
        if self.causal:
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            sim = sim.masked_fill(future, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.attn_out(out) + self.ff_out(ff)


class CrossModel(nn.Module):
    """``layer_num`` pairs ``[Residual(CrossAttention), Residual(ParallelTransformerBlock)]``."""

    def __init__(self, dim: int = 1024, layer_num: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4,
                 causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, parallel_ff=True, ff_mult=ff_mult)),
                           Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult, causal=causal))])
            for _ in range(int(layer_num)))

    def forward(self, query_tokens: torch.Tensor, context_tokens: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = cross_attn(query_tokens, context_tokens, mask)
            query_tokens = self_attn_ff(query_tokens)
        return query_tokens


# -- the network -------------------------------------------------------------------------------------------------

def condition_mask(text_tokens: torch.Tensor, condition_tokens: torch.Tensor, threshold: float = MPS_THRESHOLD,
                   num_queries: int | None = None, mask_norm: str = "prompt") -> torch.Tensor:
    """Additive mask ``[B, num_queries, T]`` (0 = attend, -inf = hidden) of the prompt tokens.

    ``s[b, i] = max_j <text[b, i], condition[j]>``, divided by ``max_i s[b, i]`` (``mask_norm="prompt"``) or by the
    maximum over the whole batch (``"batch"``, the authors' training forward); a token is kept iff the ratio is
    ``> threshold``. Computed in float32. ``condition_tokens`` is ``[1 or B, Tc, d]``.
    """
    if mask_norm not in ("prompt", "batch"):
        raise ValueError(f"mask_norm must be 'prompt' or 'batch', got {mask_norm!r}")
    text = text_tokens.float()
    cond = condition_tokens.float().expand(text.shape[0], -1, -1)
    with torch.autocast(text.device.type, enabled=False):
        sim = torch.einsum("bid,bjd->bji", text, cond).amax(dim=1, keepdim=True)            # [B, 1, T]
    top = sim.amax(dim=-1, keepdim=True) if mask_norm == "prompt" else sim.amax()
    ratio = sim / top
    mask = torch.where(ratio > float(threshold), torch.zeros_like(ratio), torch.full_like(ratio, -math.inf))
    return mask if num_queries is None else mask.expand(-1, int(num_queries), -1)


def mps_score(text_eos: torch.Tensor, image_feature: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * cos(text_eos, image_feature)`` per row, in float32."""
    text = F.normalize(text_eos.float(), dim=-1)
    image = F.normalize(image_feature.float(), dim=-1)
    return logit_scale.detach().float().exp() * (text * image).sum(-1)


class MPSNetwork(nn.Module):
    """``model`` (transformers ``CLIPModel``) + ``cross_model`` (:class:`CrossModel`): the MPS module tree."""

    def __init__(self, clip_config: Any, cross: Mapping[str, Any]):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        self.cross_model = CrossModel(**dict(cross))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def text_features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(all tokens [B, T, d], EOS [B, d])``: the text projection of ``last_hidden_state`` and of the pooled
        EOS state; no attention mask (as the authors)."""
        out = self.model.text_model(input_ids=input_ids)
        projection = self.model.text_projection
        return projection(out.last_hidden_state), projection(out.pooler_output)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + patches, d]``: the visual projection of every token of ``last_hidden_state`` (no post-norm)."""
        out = self.model.vision_model(pixel_values=pixel_values)
        return self.model.visual_projection(out.last_hidden_state)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, condition_ids: torch.Tensor,
                threshold: float = MPS_THRESHOLD, mask_norm: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_eos [B, d], image_feature [B, d])`` for prompts ``input_ids [B, T]`` and images
        ``pixel_values [B, 3, S, S]``; ``condition_ids [1, T]`` is the tokenised condition."""
        text_tokens, text_eos = self.text_features(input_ids)
        image_tokens = self.image_features(pixel_values)
        condition_tokens, _ = self.text_features(condition_ids)
        mask = condition_mask(text_tokens, condition_tokens, threshold, image_tokens.shape[1], mask_norm)
        cross = self.cross_model(image_tokens, text_tokens, mask)
        return text_eos, cross[:, 0, :]


def _merged_configs(config: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    config = dict(config or {})
    unknown = sorted(set(config) - {"clip", "cross"})
    if unknown:
        raise ValueError(f"MPS config takes 'clip' and 'cross', got {', '.join(unknown)}")
    clip_in, cross_in = dict(config.get("clip") or {}), dict(config.get("cross") or {})
    clip = {**MPS_CLIP_CONFIG, **{k: v for k, v in clip_in.items() if k not in ("text_config", "vision_config")}}
    clip["text_config"] = {**MPS_CLIP_CONFIG["text_config"], **dict(clip_in.get("text_config") or {})}
    clip["vision_config"] = {**MPS_CLIP_CONFIG["vision_config"], **dict(clip_in.get("vision_config") or {})}
    unknown = sorted(set(cross_in) - set(MPS_CROSS_CONFIG))
    if unknown:
        raise ValueError(f"unknown cross-model options {', '.join(unknown)} (allowed: {', '.join(MPS_CROSS_CONFIG)})")
    cross = {**MPS_CROSS_CONFIG, **cross_in}
    if int(cross["dim"]) != int(clip["projection_dim"]):
        raise ValueError(f"the cross-model dim ({cross['dim']}) must equal the CLIP projection_dim "
                         f"({clip['projection_dim']})")
    return clip, cross


def build_mps_network(config: Mapping[str, Any] | None = None, device: str | torch.device | None = None) -> MPSNetwork:
    """An MPS network with random weights: ViT-H-14 + the MPS cross-model by default; ``config = {"clip": {...},
    "cross": {...}}`` overrides entries (``clip``: ``CLIPConfig`` keywords, ``text_config`` / ``vision_config``
    merged key by key; ``cross``: ``dim, layer_num, heads, dim_head, ff_mult, causal``). ``device="meta"`` builds
    the shapes only."""
    from transformers import CLIPConfig

    clip, cross = _merged_configs(config)
    clip_config = CLIPConfig(**clip)
    if device is None:
        return MPSNetwork(clip_config, cross)
    with torch.device(device):
        return MPSNetwork(clip_config, cross)


_POSITION_IDS = re.compile(r"(^|\.)embeddings\.position_ids$")


def _check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                      source: str) -> dict[str, torch.Tensor]:
    """``state`` with stray ``*.embeddings.position_ids`` dropped, or MPSStateDictError listing missing /
    unexpected keys and shape mismatches."""
    state = {k: v for k, v in state.items() if k in expected or not _POSITION_IDS.search(k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)}, network {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        def listed(what: str, items: list[str]) -> str:
            more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
            return f"{len(items)} {what}: {', '.join(items[:8])}{more}" if items else f"0 {what}"

        raise MPSStateDictError(
            f"{source} does not match the MPS architecture (strict load; {len(expected)} tensors expected, "
            f"{len(state)} found): {listed('missing keys', missing)}; {listed('unexpected keys', unexpected)}; "
            f"{listed('shape mismatches', shapes)}. Expected the state_dict() of the MPS model (keys 'model.*' of a "
            f"transformers CLIPModel and 'cross_model.layers.N.{{0,1}}.fn.*'); pass config= for another size.")
    return state


def load_mps_network(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                     source: str = "the state dict") -> MPSNetwork:
    """Build the network (shapes on the meta device), check ``state`` strictly against it, then take its tensors
    (``load_state_dict(assign=True)``, no random init), in float32 on the CPU, eval mode, no grad."""
    net = build_mps_network(config, device="meta")
    state = _check_state_dict(state, net.state_dict(), source)
    net.load_state_dict(state, strict=True, assign=True)
    for module in net.modules():     # non-persistent buffers are not in the file: rebuild them
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"MPS: buffer {name!r} of {type(module).__name__} is not in the state dict and "
                                   f"cannot be rebuilt")
            ids = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape)
            module.register_buffer(name, ids, persistent=False)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"MPS: tensors left unloaded: {', '.join(left[:5])}")
    return net.float().eval().requires_grad_(False)


# -- the head ----------------------------------------------------------------------------------------------------

class MPSHead:
    """MPS: ``exp(logit_scale) * cos(text_eos, cross-model image feature)``; ``normalise = clamp(s / scale, 0, 1)``.

    Options: ``device`` (None / ``"auto"``: CUDA if available), ``amp`` (fp16 autocast on CUDA), ``batch_size``,
    ``threshold`` (0.3; the public code has 0.01), ``mask_norm`` (``"prompt"`` / ``"batch"``), ``condition``,
    ``image_backend`` (``"pil"``), ``max_length`` (77) and ``scale`` (26). The factory ``mps`` builds the
    network from the weights file (:func:`load_mps_network`; its ``config`` option sets other sizes, for tests).
    """

    name = "mps"

    def __init__(self, network: MPSNetwork, processor_path: str | os.PathLike, *,
                 weights_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 amp: bool = True, batch_size: int = 4, threshold: float = MPS_THRESHOLD, mask_norm: str = "prompt",
                 condition: str = MPS_CONDITION, image_backend: str = "pil", max_length: int = 77,
                 scale: float = MPS_SCALE):
        from transformers import AutoImageProcessor, AutoTokenizer

        if not isinstance(network, MPSNetwork):
            raise TypeError(f"network must be an MPSNetwork, got {type(network).__name__}")
        batch_size = check_batch_size(batch_size)
        if mask_norm not in ("prompt", "batch"):
            raise ValueError(f"mask_norm must be 'prompt' or 'batch', got {mask_norm!r}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.weights_path = None if weights_path is None else Path(weights_path)
        self.processor_path = processor_folder(processor_path, "MPS")
        self.device = resolve_device(device)
        self.amp, self.batch_size = bool(amp), batch_size
        self.threshold, self.mask_norm, self.condition = float(threshold), mask_norm, str(condition)
        self.scale, self.max_length = float(scale), int(max_length)
        positions = int(network.model.config.text_config.max_position_embeddings)
        if self.max_length > positions:
            raise ValueError(f"max_length {self.max_length} exceeds the text model's {positions} positions")
        self.image_processor = AutoImageProcessor.from_pretrained(str(self.processor_path), local_files_only=True,
                                                                  backend=image_backend)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.processor_path), local_files_only=True)
        self.network = network.to(self.device).eval().requires_grad_(False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``input_ids [N, max_length]`` (``padding="max_length"``, truncated), on the CPU."""
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")["input_ids"]

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` -> processor ``pixel_values`` (uint8 by rounding, PIL), on the CPU."""
        return self.image_processor(images=images_to_pil(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw MPS scores ``[B]`` (float32, CPU), ``batch_size`` images at a time."""
        condition_ids = self.tokenize([self.condition]).to(self.device)

        def chunk(part: torch.Tensor, texts: list[str]) -> torch.Tensor:
            pixels = self.pixels(part).to(self.device)
            ids = self.tokenize(texts).to(self.device)
            with autocast_context(self.device, self.amp):
                text_eos, image_feature = self.network(ids, pixels, condition_ids, self.threshold, self.mask_norm)
            return mps_score(text_eos, image_feature, self.network.logit_scale)

        return score_in_chunks(images, prompts, self.batch_size, chunk)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """``clamp(score / scale, 0, 1)`` (scale 26 by default)."""
        return (torch.as_tensor(scores, dtype=torch.float32) / self.scale).clamp(0, 1)

    def __repr__(self) -> str:
        return (f"MPSHead(weights={str(self.weights_path)!r}, device={self.device}, threshold={self.threshold}, "
                f"mask_norm={self.mask_norm!r}, batch_size={self.batch_size})")


@register_reward("mps")
def _make_mps(weights_path: str | os.PathLike | None = None, processor_path: str | os.PathLike | None = None,
              device: str | torch.device | None = None, root: str | os.PathLike | None = None, amp: bool = True,
              batch_size: int = 4, threshold: float = MPS_THRESHOLD, mask_norm: str = "prompt",
              condition: str = MPS_CONDITION, image_backend: str = "pil", max_length: int = 77,
              scale: float = MPS_SCALE, config: Mapping[str, Any] | None = None) -> MPSHead:
    """The ``mps`` head: weights and processor folder resolved through the manifest (explicit path, then the
    environment variable, then ``<root>/<default>``)."""
    from training.rewards.pretrained import resolve   # at call time: `-m training.rewards.pretrained` stays clean

    path = resolve("mps", weights_path, root=root)
    state = load_mps_state_dict(path)                  # a pickled model is refused before anything else
    network = load_mps_network(state, config, source=str(path))   # strict; takes the file's tensors, no copy
    del state
    processor = resolve("clip_vit_h14_processor", processor_path, root=root)
    return MPSHead(network, processor, weights_path=path, device=device, amp=amp, batch_size=batch_size,
                   threshold=threshold, mask_norm=mask_norm, condition=condition, image_backend=image_backend,
                   max_length=max_length, scale=scale)
