"""What the reward heads share, in one place: device and autocast choice, ``[-1, 1]`` -> uint8 conversion, the
CLIP-style image preprocessing, and the checks of local weight files / folders with their error messages.

* Devices: :func:`resolve_device` (``None`` / ``"auto"`` -> ``cuda`` when available, else ``cpu``).
* Autocast: :func:`parse_amp_dtype` (``"float16"`` / ``"bfloat16"`` and aliases) and :func:`autocast_context`
  (``torch.autocast("cuda", dtype)`` when ``amp`` on CUDA, otherwise a no-op: float32).
* uint8, two rules kept apart because they can differ by one level right next to a ``.5`` boundary:

  - :func:`images_to_uint8` (HPS, CLIP score, aesthetic): ``round((clamp(x, -1, 1) + 1) * 127.5)`` in float32
    (half to even; the bytes ``sample.py`` writes to PNG), or with ``truncate=True`` the authors' ``to_pil_image``
    ``trunc(255 * clamp((x + 1) / 2, 0, 1))``; NumPy ``[B, H, W, C]``, channels as given.
  - :func:`images_to_rgb_uint8` (PickScore, MPS, ImageReward): ``round((clamp(x, -1, 1) + 1) / 2 * 255)`` in
    float64 (exact), grey expanded to RGB; a CPU tensor ``[B, H, W, 3]``. :func:`images_to_pil` gives PIL images.

* Preprocessing: :func:`clip_preprocess`, the OpenAI CLIP transform (PIL resize of the short side, long side
  ``int(size * long / short)``, center crop at ``int(round((H - crop) / 2))``, RGB, ``/ 255``, ``(v - mean) / std``
  with the OpenAI CLIP mean/std by default); ``square=True`` resizes straight to ``size x size`` (BLIP).
* Weight files: :func:`check_batch_size`, :func:`check_weights_path` (a local file), :func:`has_processor` /
  :func:`processor_folder` (a local copy of the CLIP ViT-H-14 processor, :data:`PROCESSOR_REPO`) and
  :func:`load_weights_only` (``torch.load(weights_only=True)``: plain tensors only, pickled code never runs).

Light at import time (torch and NumPy; PIL is imported by the functions that use it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from backends.images import to_uint8

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "BICUBIC", "PROCESSOR_REPO", "resolve_device", "parse_amp_dtype",
           "autocast_context", "check_images", "images_to_uint8", "images_to_rgb_uint8", "images_to_pil",
           "resized_size", "center_crop_box", "clip_preprocess", "check_batch_size", "check_weights_path",
           "has_processor", "processor_folder", "load_weights_only"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3   # PIL.Image.Resampling.BICUBIC
#: The processor / tokenizer folder PickScore and MPS read (a local copy of this Hugging Face repo).
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


# -- device and autocast ----------------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None`` or ``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_amp_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float16`` / ``fp16`` / ``half`` or ``bfloat16`` / ``bf16`` (or the dtype itself) -> the torch dtype."""
    table = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(name, torch.dtype):
        if name not in (torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be float16 or bfloat16, got {name}")
        return name
    if name not in table:
        raise ValueError(f"amp_dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def autocast_context(device: torch.device, amp: bool, dtype: torch.dtype = torch.float16):
    """``torch.autocast(cuda, dtype)`` when ``amp`` on CUDA, otherwise a no-op (float32)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# -- [-1, 1] -> uint8 -------------------------------------------------------------------------------------------

def check_images(images: Any) -> torch.Tensor:
    """``images`` if it is a float tensor ``[B, 1 or 3, H, W]``; otherwise a TypeError / ValueError."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"image rewards take float images [B, 1 or 3, H, W] in [-1, 1], got "
                         f"{images.dtype} {tuple(images.shape)}")
    return images


def images_to_uint8(images: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Checked float images ``[B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) -> uint8 ``[B, H, W, C]`` by
    :func:`backends.images.to_uint8` (rounding, the bytes of ``sample.py``'s PNGs; ``truncate=True``: the
    authors' ``to_pil_image`` truncation, docs/authors-code.md §9.41)."""
    return to_uint8(check_images(images), truncate=truncate)


def images_to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` float in ``[-1, 1]`` (C = 1 or 3) -> ``[B, H, W, 3]`` uint8 on the CPU: clamp, then
    ``round((x + 1) / 2 * 255)`` (half to even) in float64."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 1 or 3, H, W] in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype}")
    # float64: float32 arithmetic can land a value on the wrong side of a .5 boundary
    pixels = ((images.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).contiguous()


def images_to_pil(images: torch.Tensor) -> list:
    """``[B, C, H, W]`` in ``[-1, 1]`` -> ``B`` RGB ``PIL.Image`` (:func:`images_to_rgb_uint8`)."""
    from PIL import Image

    return [Image.fromarray(array.numpy()) for array in images_to_rgb_uint8(images)]


# -- CLIP-style preprocessing -----------------------------------------------------------------------------------

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
                    resample: int = BICUBIC, square: bool = False) -> torch.Tensor:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, 3, crop, crop]``: per image PIL resize of the short side to
    ``size`` (``square=True``: straight to ``size x size``; ``resample``, bicubic by default), center crop
    ``crop``, RGB, ``/255``, ``(v - mean) / std``."""
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
        new_h, new_w = (size, size) if square else resized_size(image.height, image.width, size)
        if (new_h, new_w) != (image.height, image.width):
            image = image.resize((new_w, new_h), resample=resample)
        top, left = center_crop_box(image.height, image.width, crop)
        image = image.crop((left, top, left + crop, top + crop)).convert("RGB")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        out.append((pixels - mean_t) / std_t)
    return torch.stack(out) if out else torch.zeros(0, 3, crop, crop)


# -- options and weight files -----------------------------------------------------------------------------------

def check_batch_size(batch_size: int) -> int:
    """``int(batch_size)``, which must be >= 1."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def check_weights_path(weights_path: str | Path | None, what: str, expected: str, url: str) -> Path:
    """``weights_path`` as an existing local file: ValueError when not given, FileNotFoundError when absent (both
    name ``what``, the ``expected`` file and where to get it)."""
    if weights_path is None or weights_path == "":
        raise ValueError(f"{what} needs weights_path= a local copy of {expected} (from {url})")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path} (expected {expected}, from {url})")
    return path


def has_processor(folder: Path) -> bool:
    """Whether ``folder`` holds a CLIP processor: ``preprocessor_config.json`` and tokenizer files."""
    tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    return (folder / "preprocessor_config.json").is_file() and tokenizer


def processor_folder(path: str | Path, head: str) -> Path:
    """``path`` as a folder holding the CLIP-H processor (image config and tokenizer), or a clear error."""
    folder = Path(path).expanduser()
    if not has_processor(folder):
        raise FileNotFoundError(
            f"{head} processor folder {str(path)!r} not found or incomplete (it needs preprocessor_config.json and "
            f"tokenizer files): download the Hugging Face repo {PROCESSOR_REPO!r} to a local folder and pass it "
            f"as processor_path")
    return folder


def load_weights_only(path: Path, holding: str = "files") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; any failure is a ValueError saying that only
    ``holding`` of plain tensors are accepted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # UnpicklingError / RuntimeError: the file needs more than plain tensors
        raise ValueError(f"could not read {path} with torch.load(weights_only=True): {exc}. Only {holding} of "
                         f"plain tensors are accepted; pickled code is never executed.") from exc
