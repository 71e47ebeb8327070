"""HPSv2 / HPSv2.1 reward heads (spec 7.4): open_clip ViT-H-14 with the HPS checkpoint, cosine of image and text.

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
  authors' ``to_pil_image`` instead, ``u = trunc(255 * clamp((x + 1) / 2, 0, 1))`` (spec 9.41).
* Text: the open_clip tokenizer of the model config (for ViT-H-14 the bundled-BPE ``SimpleTokenizer``,
  77 tokens, offline).
* ``score = diag(f_img @ f_txt^T)`` with L2-normalised features (cosine similarity), computed in chunks of
  ``batch_size`` under fp16 autocast on CUDA when ``amp`` (as HPSv2), in float32 on the CPU.
  ``normalise(s) = clamp(s, 0, 1)``; HPSv2.1 scores are typically 0.25-0.30.

The image helpers (:func:`images_to_uint8`, :func:`clip_preprocess`) are shared with ``clip_score``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from training.rewards.registry import register_reward, score_in_chunks

__all__ = ["HPSHead", "HPS_FILES", "HPS_URL", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "images_to_uint8",
           "clip_preprocess", "resized_size", "center_crop_box", "load_hps_state_dict", "resolve_device",
           "autocast_context"]

HPS_URL = "https://huggingface.co/xswu/HPSv2"
#: Checkpoint file of each HPS version.
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3   # PIL.Image.Resampling.BICUBIC


# -- shared helpers ---------------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device, amp: bool, dtype: torch.dtype = torch.float16):
    """``torch.autocast(cuda, dtype)`` when ``amp`` on CUDA, otherwise a no-op (float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _amp_dtype(name: str | torch.dtype) -> torch.dtype:
    table = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(name, torch.dtype):
        if name not in (torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be float16 or bfloat16, got {name}")
        return name
    if name not in table:
        raise ValueError(f"amp_dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def images_to_uint8(images: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Float images ``[B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) -> uint8 ``[B, H, W, C]``.

    Default: ``round((clamp(x, -1, 1) + 1) * 127.5)`` (half to even, identical to ``sample.py``'s PNG bytes).
    ``truncate=True``: ``trunc(255 * clamp((x + 1) / 2, 0, 1))``, torchvision ``to_pil_image``'s
    ``mul(255).byte()`` as in the authors' reward (spec 9.41).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"image rewards take float images [B, 1 or 3, H, W] in [-1, 1], got "
                         f"{images.dtype} {tuple(images.shape)}")
    x = images.detach().float()
    if truncate:
        levels = ((x + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    else:
        levels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return levels.permute(0, 2, 3, 1).cpu().numpy()


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """``(H', W')`` after resizing the short side to ``short``: the long side is ``int(short * long / short_in)``
    (torchvision ``Resize(int)``)."""
    if min(height, width) <= 0:
        raise ValueError(f"empty image {height}x{width}")
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top-left ``(top, left)`` of the centred ``crop x crop`` window: ``int(round((H - crop) / 2))``
    (Python's half-to-even ``round``, torchvision ``CenterCrop``)."""
    if height < crop or width < crop:
        raise ValueError(f"cannot center-crop {crop}x{crop} from a {height}x{width} image")
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def clip_preprocess(uint8_images: np.ndarray, size: int = 224, crop: int = 224,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    resample: int = _BICUBIC) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, 3, crop, crop]``: per image PIL resize of the short side to
    ``size`` (``resample``, bicubic by default), center crop ``crop``, RGB, ``/255``, ``(v - mean) / std``."""
    from PIL import Image

    if uint8_images.ndim != 4 or uint8_images.dtype != np.uint8 or uint8_images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [B, H, W, 1 or 3], got {uint8_images.dtype} {uint8_images.shape}")
    if crop > size:
        raise ValueError(f"crop {crop} larger than the resized short side {size} is not supported")
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    out = []
    for array in uint8_images:
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        new_h, new_w = resized_size(image.height, image.width, size)
        if (new_h, new_w) != (image.height, image.width):
            image = image.resize((new_w, new_h), resample=resample)
        top, left = center_crop_box(image.height, image.width, crop)
        image = image.crop((left, top, left + crop, top + crop)).convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        out.append((pixels - mean_t) / std_t)
    return torch.stack(out) if out else torch.zeros(0, 3, crop, crop)


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
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # UnpicklingError / RuntimeError: the file needs more than plain tensors
        raise ValueError(f"could not read {path} with torch.load(weights_only=True): {exc}. Only checkpoints of "
                         f"plain tensors are accepted; pickled code is never executed.") from exc
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no state dict ({{'state_dict': {{...}}}} or a mapping of tensors expected)")
    state = _strip_module(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state-dict entries that are not tensors: {', '.join(bad[:5])}")
    return state


def _check_weights_path(weights_path: str | Path | None, what: str, expected: str, url: str) -> Path:
    if weights_path is None or weights_path == "":
        raise ValueError(f"{what} needs weights_path= a local copy of {expected} (from {url})")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path} (expected {expected}, from {url})")
    return path


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
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.version = version
        self.weights_path = _check_weights_path(weights_path, f"HPS{version}", HPS_FILES[version], HPS_URL)
        self.device = resolve_device(device)
        self.amp = bool(amp)
        self.amp_dtype = _amp_dtype(amp_dtype)
        self.truncate = bool(truncate)
        self.batch_size = int(batch_size)

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
