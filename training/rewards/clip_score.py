"""CLIP-score and LAION-aesthetic reward heads (docs/authors-code.md §7.4, 8.5), on OpenAI CLIP ViT-L/14 from a
local folder.

* ``clip``: ``score = cos(E_img(x), E_txt(p))``, the cosine of the projected CLIP image and text embeddings
  (text truncated to 77 tokens: ``<bos>`` + 75 tokens + ``<eos>``); ``normalise(s) = clamp(s, 0, 1)``.
* ``aesthetic``: the LAION aesthetic predictor v2, ``score = MLP(e / |e|)`` with ``e = E_img(x)`` the projected
  CLIP image embedding and ``MLP`` = Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
  Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) in eval mode (``d`` = the CLIP projection dim,
  768 for ViT-L/14); scores are about 5.x; ``normalise(s) = clamp(s / 10, 0, 1)``.

The CLIP model is ``transformers.CLIPModel`` + ``CLIPTokenizer`` loaded with ``local_files_only=True`` from a
local copy of ``openai/clip-vit-large-patch14`` (https://huggingface.co/openai/clip-vit-large-patch14); one copy
per ``(folder, device)`` is cached and shared by both heads (:func:`clear_cache` forgets them). Image
preprocessing is the original OpenAI CLIP transform that ImageReward's ``CLIPScore`` and the LAION predictor use
(:func:`training.rewards.common.clip_preprocess`: uint8 with rounding, PIL bicubic resize of the short side, center
crop, CLIP mean/std), with the size, crop, mean, std and resampling read from the folder's
``preprocessor_config.json`` (CLIP defaults when absent). The predictor file ``sac+logos+ava1-l14-linearMSE.pth``
(https://github.com/christophschuhmann/improved-aesthetic-predictor) is a state dict ``layers.{0,2,4,6,7}.
{weight,bias}``, read with ``weights_only=True``; a common key prefix (e.g. ``module.``) is stripped.
Both heads run the CLIP model under fp16 autocast on CUDA when ``amp`` (the MLP stays float32) and in float32 on
the CPU, in chunks of ``batch_size``.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.rewards.common import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, autocast_context, check_batch_size,
                                     check_weights_path, clip_preprocess, images_to_uint8, load_weights_only,
                                     parse_amp_dtype, resolve_device)
from training.rewards.registry import register_reward, score_in_chunks

__all__ = ["CLIPBundle", "CLIPScoreHead", "AestheticHead", "AestheticMLP", "load_clip_bundle",
           "load_aesthetic_state_dict", "processor_settings", "clear_cache", "CLIP_URL", "AESTHETIC_URL",
           "AESTHETIC_FILE"]

CLIP_URL = "https://huggingface.co/openai/clip-vit-large-patch14"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
_LOCK = threading.Lock()
_BUNDLES: dict[tuple[str, str], "CLIPBundle"] = {}


@dataclass
class CLIPBundle:
    """A local CLIP model, its tokenizer and preprocessing settings, on one device."""

    model: Any
    tokenizer: Any
    device: torch.device
    size: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int
    max_length: int

    def pixels(self, images: torch.Tensor, truncate: bool = False) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` -> normalised pixels ``[B, 3, crop, crop]`` on the device."""
        return clip_preprocess(images_to_uint8(images, truncate=truncate), self.size, self.crop, self.mean,
                               self.std, self.resample).to(self.device)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[B, d]`` (``visual_projection(pooler_output)``, not normalised)."""
        out = self.model.vision_model(pixel_values=pixels)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.model.visual_projection(pooled)

    def embed(self, images: torch.Tensor, prompts: Sequence[str] | None, *, truncate: bool, amp: bool,
              amp_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(image_embeds, text_embeds or None)`` of images in ``[-1, 1]`` (and prompts), the towers under
        :func:`autocast_context`."""
        pixels = self.pixels(images, truncate)
        with autocast_context(self.device, amp, amp_dtype):
            img = self.image_embeds(pixels)
            txt = None if prompts is None else self.text_embeds(prompts)
        return img, txt

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings ``[B, d]`` of prompts truncated to ``max_length`` tokens."""
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device))
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.model.text_projection(pooled)


def _side(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value and int(value["height"]) == int(value["width"]):
            return int(value["height"])
    raise ValueError(f"unsupported {what} {value!r} in preprocessor_config.json (an int, "
                     f"{{'shortest_edge': n}} or a square {{'height', 'width'}} expected)")


def processor_settings(folder: str | Path) -> dict[str, Any]:
    """Preprocessing of a CLIP folder: ``{size, crop, mean, std, resample}`` from ``preprocessor_config.json``
    (OpenAI CLIP's 224 / 224 / CLIP mean, std / bicubic when the file is absent). Only the shortest-edge resize +
    center crop + rescale 1/255 + normalise pipeline is supported."""
    settings: dict[str, Any] = {"size": 224, "crop": 224, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
                                "resample": 3}
    file = Path(folder) / "preprocessor_config.json"
    if not file.is_file():
        return settings
    cfg = json.loads(file.read_text(encoding="utf-8"))
    for flag in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
        if cfg.get(flag, True) is False:
            raise ValueError(f"{file}: {flag}=false is not supported")
    if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        raise ValueError(f"{file}: rescale_factor must be 1/255")
    if "size" in cfg:
        settings["size"] = _side(cfg["size"], "size")
    if "crop_size" in cfg:
        settings["crop"] = _side(cfg["crop_size"], "crop_size")
    for key in ("mean", "std"):
        if cfg.get(f"image_{key}") is not None:
            settings[key] = tuple(float(v) for v in cfg[f"image_{key}"])
    if cfg.get("resample") is not None:
        settings["resample"] = int(cfg["resample"])
    return settings


def load_clip_bundle(clip_path: str | Path | None, device: str | torch.device = "auto") -> CLIPBundle:
    """``CLIPModel`` (float32, eval) + ``CLIPTokenizer`` from a local folder (``local_files_only=True``), cached
    per ``(folder, device)``."""
    if clip_path is None or clip_path == "":
        raise ValueError(f"the CLIP heads need a local copy of openai/clip-vit-large-patch14 ({CLIP_URL})")
    folder = Path(clip_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP folder not found: {folder} (a local copy of openai/clip-vit-large-patch14, "
                                f"from {CLIP_URL})")
    dev = resolve_device(device)
    key = (str(folder.resolve()), str(dev))
    with _LOCK:
        if key in _BUNDLES:
            return _BUNDLES[key]
        from transformers import CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        model = model.to(dev).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        settings = processor_settings(folder)
        max_length = min(77, int(model.config.text_config.max_position_embeddings))
        bundle = CLIPBundle(model=model, tokenizer=tokenizer, device=dev, max_length=max_length, **settings)
        _BUNDLES[key] = bundle
        return bundle


def clear_cache() -> None:
    """Forget the cached CLIP models."""
    with _LOCK:
        _BUNDLES.clear()


class _CLIPBundleHead:
    """What both CLIP heads share: the autocast / uint8 / chunk options and the embeddings of a chunk."""

    bundle: CLIPBundle

    def _set_options(self, amp: bool, amp_dtype: str | torch.dtype, truncate: bool, batch_size: int) -> None:
        self.amp, self.amp_dtype = bool(amp), parse_amp_dtype(amp_dtype)
        self.truncate, self.batch_size = bool(truncate), batch_size

    def _embed(self, images: torch.Tensor, prompts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.bundle.embed(images, prompts, truncate=self.truncate, amp=self.amp, amp_dtype=self.amp_dtype)


class CLIPScoreHead(_CLIPBundleHead):
    """CLIP score: ``cos(E_img, E_txt)`` of OpenAI CLIP ViT-L/14; ``normalise = clamp(., 0, 1)``."""

    name = "clip"

    def __init__(self, weights_path: str | Path | None = None, *, device: str | torch.device = "auto",
                 amp: bool = True, amp_dtype: str | torch.dtype = "float16", truncate: bool = False,
                 batch_size: int = 8):
        batch_size = check_batch_size(batch_size)
        self.bundle = load_clip_bundle(weights_path, device)
        self._set_options(amp, amp_dtype, truncate, batch_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities ``[B]`` (float32, CPU)."""
        def chunk(part: torch.Tensor, texts: list[str]) -> torch.Tensor:
            img, txt = self._embed(part, texts)
            return (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)

        return score_in_chunks(images, prompts, self.batch_size, chunk)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """``clamp(score, 0, 1)``."""
        return scores.clamp(0, 1)


class AestheticMLP(nn.Module):
    """The LAION aesthetic-predictor-v2 head: ``d -> 1024 -> 128 -> 64 -> 16 -> 1`` (no activations), dropout
    0.2 / 0.2 / 0.1 between the first layers (inactive in eval mode)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = int(input_size)
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


_MLP_KEY = re.compile(r"^(.*?)(?:layers\.)?(\d+)\.(weight|bias)$")


def load_aesthetic_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the predictor file with ``torch.load(weights_only=True)`` (a state dict, optionally wrapped in
    ``{"state_dict": ...}``) and map keys ``<prefix>layers.N.weight`` / ``<prefix>N.weight`` to
    ``layers.N.weight``; all keys must share one prefix."""
    path = Path(path)
    blob = load_weights_only(path, "files")
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no state dict")
    out: dict[str, torch.Tensor] = {}
    prefixes = set()
    for key, value in state.items():
        match = _MLP_KEY.match(str(key))
        if match is None or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: unexpected entry {key!r} (keys like 'layers.0.weight' expected)")
        prefixes.add(match.group(1))
        out[f"layers.{match.group(2)}.{match.group(3)}"] = value
    if len(prefixes) != 1 or len(out) != len(state):
        raise ValueError(f"{path}: keys do not share one prefix ({sorted(prefixes)})")
    return out


class AestheticHead(_CLIPBundleHead):
    """LAION aesthetic v2: ``MLP(e / |e|)`` with ``e`` the projected CLIP image embedding; ``normalise =
    clamp(score / 10, 0, 1)``. The MLP input size follows the CLIP projection dim (768 for ViT-L/14)."""

    name = "aesthetic"

    def __init__(self, weights_path: str | Path | None = None, *, clip_path: str | Path | None = None,
                 device: str | torch.device = "auto", amp: bool = True, amp_dtype: str | torch.dtype = "float16",
                 truncate: bool = False, batch_size: int = 32):
        batch_size = check_batch_size(batch_size)
        path = check_weights_path(weights_path, "the aesthetic predictor", AESTHETIC_FILE, AESTHETIC_URL)
        self.bundle = load_clip_bundle(clip_path, device)
        dim = int(self.bundle.model.config.projection_dim)
        mlp = AestheticMLP(dim)
        try:
            mlp.load_state_dict(load_aesthetic_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not fit the aesthetic MLP with input size {dim}: {exc}") from exc
        self.mlp = mlp.to(self.bundle.device).eval().requires_grad_(False)
        self.weights_path = path
        self._set_options(amp, amp_dtype, truncate, batch_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Predicted aesthetic scores ``[B]`` (float32, CPU); the prompts are not used."""
        def chunk(part: torch.Tensor, texts: list[str]) -> torch.Tensor:
            emb, _ = self._embed(part, None)
            return self.mlp(F.normalize(emb.float(), dim=-1))[:, 0]

        return score_in_chunks(images, prompts, self.batch_size, chunk)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """``clamp(score / 10, 0, 1)``."""
        return (scores / 10).clamp(0, 1)


@register_reward("clip")
def _make_clip(weights_path: str | Path | None = None, **options: Any) -> CLIPScoreHead:
    return CLIPScoreHead(weights_path, **options)


@register_reward("aesthetic")
def _make_aesthetic(weights_path: str | Path | None = None, **options: Any) -> AestheticHead:
    return AestheticHead(weights_path, **options)
