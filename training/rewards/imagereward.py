"""ImageReward v1.0 reward head (docs/authors-code.md §7.4, 8.5, 9.40): ``imagereward``, a BLIP image-text model
plus an MLP.

The model is written here in plain torch (no ImageReward/BLIP package needed) with BLIP's parameter layout:

* ``visual_encoder``: ViT-L/16 (224 px, width 1024, 24 blocks, 16 heads, MLP ratio 4, qkv bias, LayerNorm
  eps 1e-6, exact GELU), output = the final-normed token sequence ``[B, 1 + (224/16)^2, 1024]``;
* ``text_encoder``: BLIP's "med" BERT-base (hidden 768, 12 layers, 12 heads, intermediate 3072, LayerNorm
  eps 1e-12, absolute positions, **no** token-type embeddings, no pooler) with a cross-attention to the
  image tokens (keys/values from width 1024) after the self-attention of every layer; the self-attention is
  bidirectional (BLIP's "multimodal" mode);
* ``mlp.layers``: ``Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
  Linear(64, 16), Linear(16, 1)`` (dropout inactive at inference).

Forward (as ImageReward's ``score``): the text ``[CLS] prompt [SEP]`` (bert-base-uncased WordPiece plus BLIP's
``[DEC]`` and ``[ENC]`` tokens, 35 tokens, padded to ``max_length``, truncated) attends to the image tokens;
the hidden state of its first token goes through the MLP, giving ``reward``; the raw score is
``(reward - mean) / std`` with the model constants ``mean = 0.16717362830052426``,
``std = 1.0333394966054072``. ``enc_token=True`` puts ``[ENC]`` in place of ``[CLS]`` (BLIP's retrieval
training does this; ImageReward's inference, as we understand it, does not).

Offset (docs/authors-code.md §9.40): the authors' vendored copy adds ``3 * std`` (= 3.1000) to every score and their
``reward_multi`` divides that by 10. By default the raw score here is the **published** one (no offset);
``authors_offset=True`` adds ``AUTHORS_OFFSET = 3 * std`` to it (what their ``score_imagereward`` CLI
reports). ``normalise`` is ``clamp((score + 3 * std) / 10, 0, 1)`` with the offset added only when the raw
score lacks it, so the normalised reward equals the authors' whichever the flag.

Images ``[B, C, H, W]`` in ``[-1, 1]`` become uint8 by rounding, then as ImageReward's CLIP-style transform:
resize the short side to 224 (PIL bicubic), centre-crop 224, ``/ 255``, normalise with the OpenAI CLIP
mean/std (``square_resize=True`` resizes straight to 224 x 224 instead, BLIP's own transform; the two agree
on square images). The official ``ImageReward.pt`` is a plain state dict (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.*`` and unused ``blip.*`` parts): :func:`load_imagereward_state_dict` reads
it with ``weights_only=True`` and :func:`load_official_weights` maps and checks it strictly.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.rewards.common import (BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, autocast_context, clip_preprocess,
                                     images_to_rgb_uint8, resolve_device)
from training.rewards.registry import prompts_for, register_reward

__all__ = ["ImageRewardConfig", "ImageRewardModel", "BlipVisionEncoder", "BlipTextEncoder", "RewardMLP",
           "ImageRewardHead", "load_imagereward_state_dict", "map_official_keys", "to_official_key",
           "load_official_weights", "load_blip_tokenizer", "imagereward_preprocess", "IMAGEREWARD_MEAN",
           "IMAGEREWARD_STD", "AUTHORS_OFFSET", "CLIP_MEAN", "CLIP_STD", "IMAGEREWARD_REPO", "TOKENIZER_REPO",
           "OFFICIAL_PREFIXES", "IGNORED_OWN_KEYS"]

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
AUTHORS_OFFSET = 3 * IMAGEREWARD_STD
NORMALISE_SCALE = 10.0
CLIP_MEAN = OPENAI_CLIP_MEAN
CLIP_STD = OPENAI_CLIP_STD
IMAGEREWARD_REPO = "THUDM/ImageReward"
TOKENIZER_REPO = "google-bert/bert-base-uncased"
MLP_HIDDEN = (1024, 128, 64, 16)

# official prefix -> this module's prefix; official keys under no prefix here are ignored (text decoder, ...)
OFFICIAL_PREFIXES = {"blip.visual_encoder.": "visual_encoder.", "blip.text_encoder.": "text_encoder.",
                     "mlp.": "mlp."}
# buffers of the official model that carry no learned state (BERT's arange of positions)
IGNORED_OWN_KEYS = ("text_encoder.embeddings.position_ids",)


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the model (defaults: ImageReward v1.0); ``from_overrides`` takes a partial mapping."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    pad_token_id: int = 0
    max_length: int = 35

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None = None) -> "ImageRewardConfig":
        """Defaults with ``overrides`` applied; unknown keys are a ValueError."""
        overrides = dict(overrides or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ImageReward config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        config = cls(**overrides)
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        if config.vision_width % config.vision_heads or config.text_hidden % config.text_heads:
            raise ValueError("widths must be multiples of their head counts")
        if config.max_length > config.max_positions:
            raise ValueError(f"max_length {config.max_length} exceeds max_positions {config.max_positions}")
        return config


# -- vision: BLIP's VisionTransformer layout ------------------------------------------------------------------

class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _VitAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _VitMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _VitAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _VitMlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionEncoder(nn.Module):
    """ViT with a class token; returns the final-normed tokens ``[B, 1 + P, width]``."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        width = config.vision_width
        self.image_size = config.image_size
        self.patch_embed = _PatchEmbed(config.patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (config.image_size // config.patch_size) ** 2, width))
        self.blocks = nn.ModuleList(_VitBlock(width, config.vision_heads, config.vision_mlp_ratio)
                                    for _ in range(config.vision_layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected pixel_values [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed[:, :x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# -- text: BLIP's "med" BERT with cross-attention in every layer ----------------------------------------------

class _BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.query(x).view(b, n, self.heads, d).transpose(1, 2)
        k = self.key(context).view(b, context.shape[1], self.heads, d).transpose(1, 2)
        v = self.value(context).view(b, context.shape[1], self.heads, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)


class _BertResidualOutput(nn.Module):
    """``LayerNorm(dense(h) + residual)`` (BERT's ``SelfOutput`` / ``Output``)."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.self = _BertSelfAttention(hidden, heads, kv_width)
        self.output = _BertResidualOutput(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        hidden, heads = config.text_hidden, config.text_heads
        self.attention = _BertAttention(hidden, heads, hidden)
        self.crossattention = _BertAttention(hidden, heads, config.vision_width)
        self.intermediate = _BertIntermediate(hidden, config.text_intermediate)
        self.output = _BertResidualOutput(config.text_intermediate, hidden)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor | None, image: torch.Tensor,
                image_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, x, self_mask)
        x = self.crossattention(x, image, image_mask)
        return self.output(self.intermediate(x), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.text_hidden, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.text_hidden)
        self.LayerNorm = nn.LayerNorm(config.text_hidden, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class _BertEncoder(nn.Module):
    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(config) for _ in range(config.text_layers))


class BlipTextEncoder(nn.Module):
    """Bidirectional BERT whose every layer cross-attends to image tokens; returns ``[B, L, hidden]``."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        self.embeddings = _BertEmbeddings(config)
        self.encoder = _BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        self_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        image_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()[:, None, None, :]
        image = encoder_hidden_states.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, self_mask, image, image_mask)
        return x


class RewardMLP(nn.Module):
    """``layers``: Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
    Dropout(0.1), Linear(64, 16), Linear(16, 1)."""

    def __init__(self, d_in: int):
        super().__init__()
        h1, h2, h3, h4 = MLP_HIDDEN
        self.layers = nn.Sequential(nn.Linear(d_in, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
                                    nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP image + text encoders and the reward MLP; ``forward`` gives the MLP output ``[B]`` (before
    ``(r - mean) / std``)."""

    def __init__(self, config: ImageRewardConfig | None = None):
        super().__init__()
        self.config = config or ImageRewardConfig()
        self.visual_encoder = BlipVisionEncoder(self.config)
        self.text_encoder = BlipTextEncoder(self.config)
        self.mlp = RewardMLP(self.config.text_hidden)

    def text_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state ``[B, hidden]`` of the first text token after attending to the image."""
        image = self.visual_encoder(pixel_values)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        return self.text_encoder(input_ids, attention_mask, image, image_mask)[:, 0, :]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.text_features(pixel_values, input_ids, attention_mask).float())[:, 0]


# -- weights --------------------------------------------------------------------------------------------------

def load_imagereward_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``ImageReward.pt`` (a plain state dict) with ``weights_only=True``; a pickle carrying code (a
    pickled module, a custom class, ``__reduce__`` tricks) is refused with a ValueError, never run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ImageReward weights {str(path)!r} not found: download ImageReward.pt from "
                                f"the Hugging Face repo {IMAGEREWARD_REPO!r} and pass it as weights_path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"refusing to load {str(path)!r}: it is not a plain tensor state dict (its pickle "
                         f"references code, which weights_only=True will not run): {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"{str(path)!r} is not a state dict of tensors (entries {', '.join(bad[:5])})")
    return dict(obj)


def map_official_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys -> :class:`ImageRewardModel` keys (``blip.visual_encoder.`` -> ``visual_encoder.``,
    ``blip.text_encoder.`` -> ``text_encoder.``, ``mlp.`` kept). Returns the mapped dict and the sorted
    official keys left out (other ``blip.*`` parts such as the text decoder, and ``IGNORED_OWN_KEYS``)."""
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        for official, own in OFFICIAL_PREFIXES.items():
            if key.startswith(official):
                new = own + key[len(official):]
                if new in IGNORED_OWN_KEYS:
                    ignored.append(key)
                else:
                    mapped[new] = value
                break
        else:
            ignored.append(key)
    return mapped, sorted(ignored)


def to_official_key(key: str) -> str:
    """:class:`ImageRewardModel` key -> the official key it is read from."""
    for official, own in OFFICIAL_PREFIXES.items():
        if key.startswith(own):
            return official + key[len(own):]
    raise ValueError(f"{key!r} is not an ImageRewardModel key")


def load_official_weights(model: ImageRewardModel, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load an official-layout state dict into ``model`` strictly: a missing key is a KeyError naming it,
    an unknown key under a used prefix or a shape mismatch a ValueError. Returns the ignored official keys."""
    mapped, ignored = map_official_keys(state)
    expected = model.state_dict()
    missing = [to_official_key(k) for k in expected if k not in mapped]
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"ImageReward weights lack {len(missing)} required key(s): {', '.join(missing[:10])}{more}")
    unexpected = sorted(to_official_key(k) for k in mapped if k not in expected)
    if unexpected:
        raise ValueError(f"ImageReward weights have unknown key(s) under the used prefixes (layout mismatch?): "
                         f"{', '.join(unexpected[:10])}")
    wrong = [f"{to_official_key(k)} {tuple(mapped[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(mapped[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"ImageReward weights have wrong shapes (file != model): {'; '.join(wrong[:10])}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items()}, strict=True)
    return ignored


# -- tokenizer and images -------------------------------------------------------------------------------------

def load_blip_tokenizer(path: str | Path):
    """BLIP's tokenizer from a local bert-base-uncased folder (``vocab.txt``): the WordPiece tokenizer plus
    ``[DEC]`` as bos and ``[ENC]`` as an extra special token (30522 + 2 = 30524 ids for bert-base-uncased)."""
    folder = Path(path).expanduser() if path else None
    if folder is None or not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"BERT tokenizer folder {str(path)!r} not found (it needs vocab.txt): download "
                                f"the Hugging Face repo {TOKENIZER_REPO!r} (bert-base-uncased) to a local folder "
                                f"and pass it as tokenizer_path")
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


def imagereward_preprocess(images: torch.Tensor, image_size: int = 224, square_resize: bool = False) -> torch.Tensor:
    """``[B, C, H, W]`` in ``[-1, 1]`` -> ``[B, 3, S, S]`` float32: uint8 by rounding, PIL bicubic resize of the
    short side to ``S`` and centre crop (or straight to ``S x S``), ``/ 255``, OpenAI CLIP mean/std
    (:func:`training.rewards.common.clip_preprocess` of :func:`~training.rewards.common.images_to_rgb_uint8`)."""
    return clip_preprocess(images_to_rgb_uint8(images).numpy(), image_size, image_size, CLIP_MEAN, CLIP_STD,
                           BICUBIC, square=square_resize)


# -- the head -------------------------------------------------------------------------------------------------

class ImageRewardHead:
    """ImageReward v1.0: raw score ``(mlp(blip(image, prompt)) - mean) / std`` (``+ 3 * std`` with
    ``authors_offset``); ``normalise`` = ``clamp((score + 3 * std) / 10, 0, 1)`` (the authors' value)."""

    name = "imagereward"

    def __init__(self, weights_path: str | Path, tokenizer_path: str | Path, device: str | torch.device | None = None,
                 amp: bool = False, authors_offset: bool = False, enc_token: bool = False,
                 square_resize: bool = False, config: Mapping[str, Any] | None = None):
        self.config = ImageRewardConfig.from_overrides(config)
        self.tokenizer = load_blip_tokenizer(tokenizer_path)
        if len(self.tokenizer) > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} ids, more than the model's vocab_size "
                             f"{self.config.vocab_size}")
        state = load_imagereward_state_dict(weights_path)
        model = ImageRewardModel(self.config)
        self.ignored_keys = load_official_weights(model, state)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.amp = bool(amp)
        self.authors_offset = bool(authors_offset)
        self.enc_token = bool(enc_token)
        self.square_resize = bool(square_resize)
        self.enc_token_id = int(self.tokenizer.convert_tokens_to_ids("[ENC]"))

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[B, max_length]`` (``[ENC]`` first with ``enc_token``)."""
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.config.max_length, return_tensors="pt")
        input_ids = text["input_ids"].clone()
        if self.enc_token:
            input_ids[:, 0] = self.enc_token_id
        return input_ids, text["attention_mask"]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw scores ``[B]`` (float32, CPU)."""
        prompts = prompts_for(images, prompts)
        pixels = imagereward_preprocess(images, self.config.image_size, self.square_resize).to(self.device)
        input_ids, attention_mask = (t.to(self.device) for t in self.tokenize(prompts))
        with torch.inference_mode():
            with autocast_context(self.device, self.amp):
                features = self.model.text_features(pixels, input_ids, attention_mask)
            reward = self.model.mlp(features.float())[:, 0].double()
        score = (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        if self.authors_offset:
            score = score + AUTHORS_OFFSET
        return score.to("cpu", torch.float32)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """``clamp((score [+ 3 * std]) / 10, 0, 1)``: the offset is added here when the raw score lacks it."""
        scores = torch.as_tensor(scores, dtype=torch.float32)
        offset = 0.0 if self.authors_offset else AUTHORS_OFFSET
        return ((scores + offset) / NORMALISE_SCALE).clamp(0, 1)


@register_reward("imagereward")
def _make_imagereward(weights_path: str | Path | None = None, tokenizer_path: str | Path | None = None,
                      device: str | None = None, amp: bool = False, authors_offset: bool = False,
                      enc_token: bool = False, square_resize: bool = False,
                      config: Mapping[str, Any] | None = None) -> ImageRewardHead:
    if weights_path is None:
        raise FileNotFoundError(f"imagereward needs weights_path: ImageReward.pt from the Hugging Face repo "
                                f"{IMAGEREWARD_REPO!r}")
    return ImageRewardHead(weights_path=weights_path, tokenizer_path=tokenizer_path, device=device, amp=amp,
                           authors_offset=authors_offset, enc_token=enc_token, square_resize=square_resize,
                           config=config)

