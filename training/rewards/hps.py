"""HPSv2 / HPSv2.1 reward heads (docs/authors-code.md §7.4): open_clip ViT-H-14 with the HPS checkpoint, cosine
of image and text.

* Registered as ``hps`` (= HPSv2.1, the authors' default), ``hpsv21`` (HPSv2.1) and ``hpsv2`` (HPSv2). The three
  share one model class; only the checkpoint differs (``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``,
  https://huggingface.co/xswu/HPSv2). The architecture is built from open_clip's ``ViT-H-14`` config with
  ``pretrained=None`` (nothing is ever downloaded) and the checkpoint is loaded into it **strictly**.
* The checkpoint is read with ``torch.load(weights_only=True)`` (plain tensors only; a file that needs pickled
  code is refused), ``{"state_dict": {...}}`` or a bare state dict, with any ``module.`` prefixes stripped.
* Preprocessing reproduces HPSv2's evaluation transform (open_clip ``image_transform(224, is_train=False)``):
  ``x in [-1, 1]`` -> uint8 -> PIL -> resize the short side to 224 (PIL bicubic; long side
  ``int(224 * long / short)``) -> center crop 224 (offsets ``int(round((H - 224) / 2))``, as torchvision) ->
  RGB -> ``[0, 1]`` -> ``(v - mean) / std`` with the OpenAI CLIP mean/std. The uint8 step rounds,
  ``u = round((x + 1) * 127.5)`` (the same bytes ``sample.py`` writes to PNG); ``truncate=True`` reproduces the
  authors' ``to_pil_image`` instead, ``u = trunc(255 * clamp((x + 1) / 2, 0, 1))`` (docs/authors-code.md §9.41).
* Text: the open_clip tokenizer of the model config (for ViT-H-14 the bundled-BPE ``SimpleTokenizer``,
  77 tokens, offline).
* ``score = diag(f_img @ f_txt^T)`` with L2-normalised features (cosine similarity), computed in chunks of
  ``batch_size`` under fp16 autocast on CUDA when ``amp`` (as HPSv2), in float32 on the CPU.
  ``normalise(s) = clamp(s, 0, 1)``; HPSv2.1 scores are typically 0.25-0.30.

The image, device and weight-file helpers live in :mod:`training.rewards.common` (shared by every head);
``OPENAI_CLIP_MEAN``, ``OPENAI_CLIP_STD``, ``images_to_uint8``, ``clip_preprocess``, ``resized_size``,
``center_crop_box``, ``resolve_device`` and ``autocast_context`` are re-exported here under their old names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from training.rewards.common import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, autocast_context, center_crop_box,
                                     check_batch_size, check_weights_path, clip_preprocess, images_to_uint8,
                                     load_weights_only, parse_amp_dtype, resized_size, resolve_device)
from training.rewards.registry import register_reward, score_in_chunks

__all__ = ["HPSHead", "HPS_FILES", "HPS_URL", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "images_to_uint8",
           "clip_preprocess", "resized_size", "center_crop_box", "load_hps_state_dict", "resolve_device",
           "autocast_context"]

HPS_URL = "https://huggingface.co/xswu/HPSv2"
#: Checkpoint file of each HPS version.
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


# -- checkpoint -------------------------------------------------------------------------------------------------

def _strip_module(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = str(key)
        while name.startswith("module."):
            name = name[len("module."):]
        if name in out:
            raise ValueError(f"duplicate key {name!r} after stripping 'module.' prefixes")
        out[name] = value
    return out


def load_hps_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an HPS checkpoint: ``torch.load(path, map_location="cpu", weights_only=True)`` of
    ``{"state_dict": {...}}`` (or a bare state dict); ``module.`` prefixes are stripped."""
    path = Path(path)
    blob = load_weights_only(path, "checkpoints")
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no state dict ({{'state_dict': {{...}}}} or a mapping of tensors expected)")
    state = _strip_module(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state-dict entries that are not tensors: {', '.join(bad[:5])}")
    return state


def _resolve_model_name(model_name: str, model_config: Mapping[str, Any] | None) -> str:
    """Register ``model_config`` (if any) in open_clip's config table and return the name to build."""
    import open_clip.factory as factory

    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model_name must be an open_clip config name (no hub or folder schema), got {model_name!r}")
    if model_config is None:
        if model_name not in factory._MODEL_CONFIGS:
            raise ValueError(f"unknown open_clip model config {model_name!r}")
        return model_name
    config = json.loads(json.dumps(dict(model_config)))
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("model_config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    if model_name == "ViT-H-14":   # the default: give a custom config its own name
        digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
        model_name = f"hps-custom-{digest}"
    existing = factory._MODEL_CONFIGS.get(model_name)
    if existing is not None and existing != config:
        raise ValueError(f"open_clip already has a different config named {model_name!r}")
    factory._MODEL_CONFIGS[model_name] = config
    return model_name


# -- head -------------------------------------------------------------------------------------------------------

class HPSHead:
    """HPSv2 / HPSv2.1: ``score = cos(f_img, f_txt)`` (open_clip ViT-H-14 + HPS weights); ``normalise = clamp(., 0, 1)``.

    Options: ``weights_path`` (the HPS checkpoint), ``version`` (``"v2.1"``/``"v2"``, names the expected file),
    ``device`` (``"auto"``), ``amp`` (fp16 autocast on CUDA), ``amp_dtype``, ``truncate`` (authors' uint8
    truncation), ``batch_size`` (chunk size), and for tests ``model_name`` / ``model_config`` (an open_clip config
    standing in for ViT-H-14).
    """

    def __init__(self, weights_path: str | Path | None = None, *, version: str = "v2.1", name: str = "hps",
                 device: str | torch.device = "auto", amp: bool = True, amp_dtype: str | torch.dtype = "float16",
                 truncate: bool = False, batch_size: int = 8, model_name: str = "ViT-H-14",
                 model_config: Mapping[str, Any] | None = None):
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {sorted(HPS_FILES)}, got {version!r}")
        batch_size = check_batch_size(batch_size)
        self.name = name
        self.version = version
        self.weights_path = check_weights_path(weights_path, f"HPS{version}", HPS_FILES[version], HPS_URL)
        self.device = resolve_device(device)
        self.amp = bool(amp)
        self.amp_dtype = parse_amp_dtype(amp_dtype)
        self.truncate = bool(truncate)
        self.batch_size = batch_size

        import open_clip

        self.model_name = _resolve_model_name(model_name, model_config)
        state = load_hps_state_dict(self.weights_path)
        model = open_clip.create_model(self.model_name, pretrained=None, precision="fp32", device="cpu")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{self.weights_path} does not match the open_clip {self.model_name!r} architecture "
                             f"(strict load): {exc}") from exc
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        image_size = getattr(model.visual, "image_size", 224)
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in ``[-1, 1]`` -> normalised ``[B, 3, 224, 224]`` float32 (CPU), as HPSv2."""
        return clip_preprocess(images_to_uint8(images, truncate=self.truncate), self.image_size, self.image_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities ``[B]`` (float32, CPU) of each image with its prompt."""
        def chunk(part: torch.Tensor, texts: list[str]) -> torch.Tensor:
            pixels = self.preprocess(part).to(self.device)
            tokens = self.tokenizer(texts).to(self.device)
            with autocast_context(self.device, self.amp, self.amp_dtype):
                img = self.model.encode_image(pixels, normalize=True)
                txt = self.model.encode_text(tokens, normalize=True)
                return torch.diagonal(img @ txt.T).float()

        return score_in_chunks(images, prompts, self.batch_size, chunk)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """``clamp(score, 0, 1)``."""
        return scores.clamp(0, 1)

    def __repr__(self) -> str:
        return (f"HPSHead(name={self.name!r}, version={self.version!r}, weights={str(self.weights_path)!r}, "
                f"device={self.device}, amp={self.amp}, truncate={self.truncate})")


@register_reward("hps")
def _make_hps(weights_path: str | Path | None = None, **options: Any) -> HPSHead:
    return HPSHead(weights_path, version="v2.1", name="hps", **options)


@register_reward("hpsv21")
def _make_hpsv21(weights_path: str | Path | None = None, **options: Any) -> HPSHead:
    return HPSHead(weights_path, version="v2.1", name="hpsv21", **options)


@register_reward("hpsv2")
def _make_hpsv2(weights_path: str | Path | None = None, **options: Any) -> HPSHead:
    return HPSHead(weights_path, version="v2", name="hpsv2", **options)
