"""PickScore reward head (docs/authors-code.md §7.4): ``pickscore`` = ``exp(logit_scale) * cos(image, text)`` of a
CLIP model.

* Model: a transformers ``CLIPModel`` from a local copy of ``yuvalkirstain/PickScore_v1`` (``weights_path``).
* Processor: image processor and tokenizer from a local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
  (``processor_path``; by default ``weights_path`` when that folder holds a processor). Everything is loaded
  with ``local_files_only=True``; a missing folder is a ``FileNotFoundError`` naming the repo to fetch.
* Images ``[B, C, H, W]`` in ``[-1, 1]`` become uint8 by **rounding** ``(x + 1) / 2 * 255`` (float64,
  :func:`training.rewards.common.images_to_rgb_uint8`) and go to the processor as PIL images (PIL backend by
  default: the authors' transformers 4.x resized with PIL). Device, autocast and processor-folder checks are
  :mod:`training.rewards.common`'s.
  Prompts are tokenised with ``padding=True, truncation=True, max_length=77``.
* Raw score: ``exp(logit_scale) * <f_img / |f_img|, f_txt / |f_txt|>`` (about 21-22 on real data). The
  authors score one image at a time; this head scores a batch at once (the causal CLIP text tower makes the
  extra padding harmless). On CUDA the towers run under fp16 autocast (``amp``); the cosine is float32.
* ``normalise``: ``clamp(score / 26, 0, 1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from training.rewards.common import (PROCESSOR_REPO, autocast_context, has_processor, images_to_pil,
                                     images_to_rgb_uint8, processor_folder, resolve_device)
from training.rewards.registry import prompts_for, register_reward

__all__ = ["PickScoreHead", "images_to_uint8", "images_to_pil", "PICKSCORE_REPO", "PROCESSOR_REPO",
           "PICKSCORE_SCALE"]

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_SCALE = 26.0
#: This head's uint8 rule under its old name (:func:`training.rewards.common.images_to_rgb_uint8`).
images_to_uint8 = images_to_rgb_uint8


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PickScoreHead:
    """PickScore: ``exp(logit_scale) * cos`` of a local PickScore_v1 ``CLIPModel``; normalised by ``/ 26``."""

    name = "pickscore"

    def __init__(self, weights_path: str | Path, processor_path: str | Path | None = None,
                 device: str | torch.device | None = None, amp: bool = True, image_backend: str = "pil",
                 max_length: int = 77):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        weights = Path(weights_path).expanduser() if weights_path else None
        if weights is None or not (weights / "config.json").is_file():
            raise FileNotFoundError(
                f"PickScore weights folder {str(weights_path)!r} not found (it needs config.json and the model "
                f"weights): download the Hugging Face repo {PICKSCORE_REPO!r} to a local folder and pass it "
                f"as weights_path")
        if processor_path is None:
            if not has_processor(weights):
                raise FileNotFoundError(
                    f"no processor in {str(weights)!r} and no processor_path given: download the Hugging Face "
                    f"repo {PROCESSOR_REPO!r} (preprocessor_config.json and tokenizer files) to a local folder "
                    f"and pass it as processor_path")
            processor = weights
        else:
            processor = processor_folder(processor_path, "PickScore")
        self.weights_path, self.processor_path = weights, processor
        self.device = resolve_device(device)
        self.amp = bool(amp)
        self.max_length = int(max_length)
        self.image_processor = AutoImageProcessor.from_pretrained(str(processor), local_files_only=True,
                                                                  backend=image_backend)
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor), local_files_only=True)
        self.model = CLIPModel.from_pretrained(str(weights), local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)

    def preprocess(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pixel_values``, ``input_ids`` and ``attention_mask`` for the model (on the CPU)."""
        prompts = prompts_for(images, prompts)
        pixels = self.image_processor(images=images_to_pil(images), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw PickScore ``[B]`` (float32, CPU)."""
        inputs = {k: v.to(self.device) for k, v in self.preprocess(images, prompts).items()}
        with torch.inference_mode(), autocast_context(self.device, self.amp):
            image_features = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            text_features = _features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                                   attention_mask=inputs["attention_mask"]))
        image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
        text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        scale = self.model.logit_scale.detach().float().exp()
        return (scale * (image_features * text_features).sum(-1)).to("cpu", torch.float32)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """``clamp(score / 26, 0, 1)``."""
        return (torch.as_tensor(scores, dtype=torch.float32) / PICKSCORE_SCALE).clamp(0, 1)


@register_reward("pickscore")
def _make_pickscore(weights_path: str | Path | None = None, processor_path: str | Path | None = None,
                    device: str | None = None, amp: bool = True, image_backend: str = "pil",
                    max_length: int = 77) -> PickScoreHead:
    return PickScoreHead(weights_path=weights_path, processor_path=processor_path, device=device, amp=amp,
                         image_backend=image_backend, max_length=max_length)
