"""``digits_edm`` and ``digits_ddpm``: our own small networks trained on the bundled digits, the embedded defaults
that are real trained denoisers.

``digits_ddpm`` is the other kind of model people bring: an epsilon-predicting discrete-time DDPM with linear
betas 1e-4..0.02 over 1000 steps (the parameterisation of SD1.5 and most community checkpoints;
:class:`~backends.edm_networks.DDPMPrecond` around the same U-Net), trained by ``scripts/train_digits_edm.py
--kind ddpm`` and committed as ``exps/digits_ddpm/network.safetensors``. Its noise range is its schedule's,
sigma 0.01..157, and it offers its own ``discrete`` grid. Everything below applies to both.

The analytic ``digits`` model (:mod:`backends.analytic`) is exact but memorises; this one is a real trained
denoiser: an :class:`~backends.edm_networks.EDMPrecond` (sigma_data 0.5) around a class-conditional
:class:`~backends.edm_networks.SongUNet`, trained by ``scripts/train_digits_edm.py`` on the 1797 scikit-learn
digits upsampled bilinearly from 8x8 to 16x16, in [-1, 1] (the last :data:`HELDOUT` images held out). Its
weights are committed as ``exps/digits_edm/network.safetensors`` (written by :func:`backends.edm_checkpoint.save_edm`;
``exps/digits_edm/MODEL_CARD.md`` says how it was trained).

It runs through :class:`~backends.edm.EDMBackend` with the conventions of the analytic digits backend:

* prompts name the digit (``"7"``, ``"a handwritten 7"``); ``""`` is unconditional, exactly as
  :meth:`backends.analytic.AnalyticDiffusion.encode_prompts`;
* ``cond`` is a label tensor ``[B]`` (-1: unconditional, the zero label vector the network was trained on with
  label dropout) or ``None`` (every image unconditional); one-hot rows ``[B, 10]`` are accepted too;
* ``guidance`` != 1 gives classifier-free guidance in one batched call over ``[uncond, cond]``.

The state and ``D`` are float32 (the network's precision); the noise range is EDM's 0.002..80.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .analytic import AnalyticDiffusion, load_digits_data
from .edm import EDMBackend, load_edm_backend

__all__ = ["DigitsEDMBackend", "DigitsDDPMBackend", "load_digits_edm", "load_digits_ddpm", "digits_edm_path",
           "digits_images", "digits_split", "DEFAULT_NETWORK", "DEFAULT_DDPM_NETWORK", "ENV_VAR", "DDPM_ENV_VAR",
           "HELDOUT", "RESOLUTION", "NUM_CLASSES"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NETWORK = ROOT / "exps" / "digits_edm" / "network.safetensors"
ENV_VAR = "DIGITS_EDM_PATH"
DEFAULT_DDPM_NETWORK = ROOT / "exps" / "digits_ddpm" / "network.safetensors"
DDPM_ENV_VAR = "DIGITS_DDPM_PATH"
HELDOUT = 297          # the last 297 of the 1797 digits are never trained on
RESOLUTION = 16
NUM_CLASSES = 10


def digits_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits, bilinearly upsampled from 8x8 to ``resolution`` (``align_corners=False``), as float32
    ``[1797, 1, R, R]`` in [-1, 1], and their labels ``[1797]`` (int64)."""
    images, labels = load_digits_data()
    images = images.float()
    if resolution != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                                 align_corners=False)
    return images.clamp(-1, 1).contiguous(), labels


def digits_split(resolution: int = RESOLUTION) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images, labels), "heldout": (images, labels)}``: the first 1500 digits and the last 297."""
    images, labels = digits_images(resolution)
    cut = len(images) - HELDOUT
    return {"train": (images[:cut], labels[:cut]), "heldout": (images[cut:], labels[cut:])}


class DigitsEDMBackend(EDMBackend):
    """An EDM network on the digits with the analytic digits backend's prompt and condition conventions."""

    name = "digits_edm"
    save_upscale = None             # sample.py then saves 16x16 images 4x upscaled (64 px), like the 8x8 digits

    def __init__(self, net: torch.nn.Module, *, max_batch: int | None = None, info: dict | None = None,
                 guidance: float = 1.0, cuda_graphs: bool = False, compile: bool = False):
        super().__init__(net, dataset=None, max_batch=max_batch, info=info, cuda_graphs=cuda_graphs, compile=compile)
        if int(net.label_dim) != NUM_CLASSES:
            raise ValueError(f"digits_edm needs a network with {NUM_CLASSES} classes (this one has {net.label_dim})")
        self.guidance = float(guidance)
        self.uses_cfg = self.guided

    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``"7"`` or ``"a handwritten 7"`` -> 7, ``""`` -> -1 (unconditional); ``seeds`` is ignored."""
        return AnalyticDiffusion.encode_prompts(self, prompts)   # the analytic digits' rule, verbatim

    def _labels(self, cond: Any, batch: int, device: torch.device) -> torch.Tensor:
        if cond is None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        return torch.as_tensor(cond, device=device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        batch = x.shape[0]
        labels = self._labels(cond, batch, x.device)
        # All-unconditional batches skip the guidance rows; on a GPU that test would wait for the device, so
        # there the guided call always runs (the unconditional rows' result is the same).
        if not self.guided or labels.is_floating_point() or (not labels.is_cuda and not bool((labels >= 0).any())):
            return super().__call__(x, sigma, labels)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        labels = labels.reshape(-1).long()
        both = super().__call__(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                torch.cat([torch.full_like(labels, -1), labels]))
        uncond, conditional = both.chunk(2)
        keep = (labels >= 0).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(keep, uncond + self.guidance * (conditional - uncond), uncond)

    def config(self) -> dict:
        return {"guidance": self.guidance} if self.guided else {}

    def describe(self) -> dict:
        return {**super().describe(), "backend": self.name, "guidance": self.guidance}


class DigitsDDPMBackend(DigitsEDMBackend):
    """The digits DDPM (:class:`~backends.edm_networks.DDPMPrecond`) with the digits conventions."""

    name = "digits_ddpm"


_KINDS = {"digits_edm": (DEFAULT_NETWORK, ENV_VAR, "EDMPrecond", DigitsEDMBackend, ""),
          "digits_ddpm": (DEFAULT_DDPM_NETWORK, DDPM_ENV_VAR, "DDPMPrecond", DigitsDDPMBackend, " --kind ddpm")}


def digits_edm_path(model_path: str | os.PathLike | None = None, default_model_path: str | None = None,
                    kind: str = "digits_edm") -> Path:
    """``model_path``, else ``$DIGITS_EDM_PATH`` (``$DIGITS_DDPM_PATH``), else ``default_model_path``, else the
    committed ``exps/<kind>/network.safetensors``; a missing file is a :class:`FileNotFoundError` naming it."""
    default, env, _, _, flag = _KINDS[kind]
    chosen = model_path or os.environ.get(env) or default_model_path
    path = Path(chosen).expanduser() if chosen else default
    if not path.is_file():
        raise FileNotFoundError(
            f"the {kind} network {path} is missing. It is committed to the repository as "
            f"exps/{kind}/network.safetensors; to make one, run `python scripts/train_digits_edm.py{flag} --out "
            f"exps/{kind}` (a GPU is advisable), or point model_path / ${env} at another file.")
    return path


def _load(kind: str, model_path: Any, default_model_path: Any, device: Any, dtype: Any, max_batch: int | None,
          resolution: int | None, guidance: float | None, cuda_graphs: bool, compile: bool) -> DigitsEDMBackend:
    path = digits_edm_path(model_path, default_model_path, kind)
    _, _, precond, cls, _ = _KINDS[kind]
    base = load_edm_backend(path, device=device, dtype=dtype, max_batch=max_batch, resolution=resolution)
    if int(base.net.img_channels) != 1:
        raise ValueError(f"{path} is not a digits network (it has {base.net.img_channels} channels, not 1)")
    if type(base.net).__name__ != precond:
        raise ValueError(f"{path} holds a {type(base.net).__name__}; the {kind} backend needs a {precond}")
    return cls(base.net, max_batch=max_batch, info=base.info, guidance=1.0 if guidance is None else float(guidance),
               cuda_graphs=cuda_graphs, compile=compile)


def load_digits_edm(model_path: str | os.PathLike | None = None, *, default_model_path: str | None = None,
                    device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
                    max_batch: int | None = None, resolution: int | None = None,
                    guidance: float | None = None, cuda_graphs: bool = False,
                    compile: bool = False) -> DigitsEDMBackend:
    """Load the digits EDM network (:func:`digits_edm_path`) through :func:`backends.edm.load_edm_backend`.
    ``device`` defaults to CUDA when available; ``dtype`` auto/float16/float32 as for ``edm``."""
    return _load("digits_edm", model_path, default_model_path, device, dtype, max_batch, resolution, guidance,
                 cuda_graphs, compile)


def load_digits_ddpm(model_path: str | os.PathLike | None = None, *, default_model_path: str | None = None,
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
                     max_batch: int | None = None, resolution: int | None = None,
                     guidance: float | None = None, cuda_graphs: bool = False,
                     compile: bool = False) -> DigitsEDMBackend:
    """Load the digits DDPM (``exps/digits_ddpm/network.safetensors`` or ``$DIGITS_DDPM_PATH``), as
    :func:`load_digits_edm`."""
    return _load("digits_ddpm", model_path, default_model_path, device, dtype, max_batch, resolution, guidance,
                 cuda_graphs, compile)
