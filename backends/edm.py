"""NVIDIA EDM pixel-space networks (CIFAR-10, FFHQ-64, AFHQv2-64, ImageNet-64) as denoisers (docs/authors-code.md §5.2).

The preconditioned network already is the denoiser of docs/backends/contract.md in VE coordinates,
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (:mod:`backends.edm_networks`), on images in [-1, 1];
:class:`EDMBackend` adds the interface around it:

* ``backend(x, sigma, cond)``: ``sigma`` a scalar or ``[B]``; ``cond`` the class labels of a class-conditional
  net, as integers ``[B]`` (label -1: the zero label vector the release feeds when no label is given) or
  one-hot / soft rows ``[B, label_dim]``; ``None`` for unconditional nets. Labels are per image, so the
  solvers' ``repeat_condition(cond, K)`` (``repeat_interleave`` along dim 0, row ``b*K + k``) routes them to
  the K parallel points of image b; the authors forgot this for class labels (docs/authors-code.md §9.1-9.2).
* Class labels for sampling: a fixed label per image, or (EDM ``generate.py``'s rule) a random label per seed
  drawn by that seed's generator right after its noise (:func:`class_labels_for_seeds`; the same seed always
  gets the same label, whatever the batch). EDM draws on the GPU, so its labels are not bit-identical to ours.
* Noise range: ``sigma_min, sigma_max = max(0.002, net.sigma_min), min(80, net.sigma_max)``, the range the
  ICCV code sets for these nets (docs/authors-code.md §3.2) clamped to the network's own as EDM's sampler does
  (docs/authors-code.md §9.16); for the released VP/ADM nets (VP range 0.001..152, EDMPrecond 0..inf) this is exactly
  0.002..80. It only feeds :meth:`EDMBackend.default_schedule` (EDM's polynomial rho = 7 grid); tables run on their
  recorded grids and the denoiser never clamps sigma.
* Precision: the ODE state and ``D`` are float32; ``use_fp16`` runs the network body in float16 on CUDA only.

Networks load from a local file only (:func:`load_edm_backend`): NVIDIA's ``.pkl`` through the code-free reader
of :mod:`backends.edm_checkpoint`, or our converted ``.safetensors``; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import BackendBase
from .compile import CompiledCall
from .cuda_graphs import GraphedCall
from .edm_checkpoint import load_edm
from .prompts import shown_prompt

__all__ = ["EDMBackend", "EDMDataset", "EDM_DATASETS", "load_edm_backend", "class_labels_for_seeds",
           "edm_model_path", "file_sha256", "EDM_SIGMA_MIN", "EDM_SIGMA_MAX", "NVIDIA_EDM_URL"]

EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
NVIDIA_EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
WEIGHTS_DIR = Path("weights") / "edm"


@dataclass(frozen=True)
class EDMDataset:
    """The released network the ICCV runs used for a data set, and how to find it locally
    (docs/authors-code.md §5.2)."""

    checkpoint: str        # NVIDIA's file name
    env: str               # environment variable holding a local path
    resolution: int
    channels: int
    label_dim: int


EDM_DATASETS: dict[str, EDMDataset] = {
    "cifar10": EDMDataset("edm-cifar10-32x32-uncond-vp.pkl", "EDM_CIFAR10_PATH", 32, 3, 0),
    "ffhq": EDMDataset("edm-ffhq-64x64-uncond-vp.pkl", "EDM_FFHQ_PATH", 64, 3, 0),
    "afhqv2": EDMDataset("edm-afhqv2-64x64-uncond-vp.pkl", "EDM_AFHQV2_PATH", 64, 3, 0),
    "imagenet64": EDMDataset("edm-imagenet-64x64-cond-adm.pkl", "EDM_IMAGENET64_PATH", 64, 3, 1000),
}


def class_labels_for_seeds(seeds: Sequence[int], num_classes: int, shape: Sequence[int]) -> torch.Tensor:
    """One random label per seed, ``[len(seeds)]`` int64: the seed's generator (the one
    :func:`solvers.core.seeded_noise` uses) first draws the noise of ``shape``, then the label, as EDM's
    ``generate.py`` draws latents and then labels from each seed's generator."""
    labels = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) % (1 << 32))
        torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
        labels.append(int(torch.randint(int(num_classes), (), generator=gen)))
    return torch.tensor(labels, dtype=torch.long)


class EDMBackend(BackendBase):
    """A preconditioned EDM network (``VPPrecond``/``VEPrecond``/``iDDPMPrecond``/``EDMPrecond``, or our discrete-time
    ``DDPMPrecond``) as a denoiser.

    ``max_batch`` splits larger calls (such as the B*K rows of a parallel EPD step) into chunks. ``info`` is
    what the loader recorded (checkpoint file, sha256, constructor keywords). ``cuda_graphs`` replays each
    network call from a CUDA graph per batch shape; ``compile`` runs the network through ``torch.compile``
    as well (the fast path of :mod:`backends.compile`; implies ``cuda_graphs``).
    """

    name = "edm"
    family = "ve"
    uses_cfg = False
    guidance = 1.0
    state_dtype = torch.float32
    save_upscale = 1               # images are saved at the network's resolution (FID needs it)

    def __init__(self, net: torch.nn.Module, *, dataset: str | None = None, max_batch: int | None = None,
                 info: dict | None = None, cuda_graphs: bool = False, compile: bool = False):
        self.net = net
        self.compiled = bool(compile)
        self._net_call = (CompiledCall(net, name=f"the {self.name} {type(net).__name__}", device=self.device)
                          if compile else net)
        self.graphs = GraphedCall(self._net_call, name=f"the {self.name} network call") if cuda_graphs or compile else None
        self.dataset = dataset
        self.max_batch = None if not max_batch else int(max_batch)
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.info = dict(info or {})
        self.condition_kind = "label" if int(net.label_dim) else "none"
        # A discrete-time network (DDPMPrecond) keeps its own range and offers its own grid ("discrete").
        self.alphas_cumprod = getattr(net, "alphas_cumprod", None)
        self.prediction_type = "edm" if self.alphas_cumprod is None else "epsilon"
        if self.alphas_cumprod is not None:
            self.sigma_min, self.sigma_max = float(net.sigma_min), float(net.sigma_max)
        else:
            self.sigma_min = max(EDM_SIGMA_MIN, float(getattr(net, "sigma_min", 0.0)))
            self.sigma_max = min(EDM_SIGMA_MAX, float(getattr(net, "sigma_max", float("inf"))))

    # -- what sample.py and the trainers read -------------------------------------------------------------
    @property
    def network(self) -> torch.nn.Module:
        return self.net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The network body's compute dtype on this device."""
        return torch.float16 if self.net.use_fp16 and self.device.type == "cuda" else torch.float32

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.net.img_channels), int(self.net.img_resolution), int(self.net.img_resolution))

    @property
    def num_classes(self) -> int:
        """``label_dim`` of the network (0: unconditional)."""
        return int(self.net.label_dim)

    @property
    def net_sigma_range(self) -> tuple[float, float]:
        """The network's own ``(sigma_min, sigma_max)`` (VP: s(1e-5), s(1); EDMPrecond: 0, inf)."""
        return float(getattr(self.net, "sigma_min", 0.0)), float(getattr(self.net, "sigma_max", float("inf")))

    # -- conditions -----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> torch.Tensor | None:
        """Class labels from prompts: ``"207"`` is class 207; an empty prompt takes a random label from its
        seed (:func:`class_labels_for_seeds`, needs ``seeds``). Unconditional nets take empty prompts and
        return None."""
        prompts = [str(p or "").strip() for p in prompts]
        if not self.num_classes:
            named = [p for p in prompts if p]
            if named:
                raise ValueError(f"this EDM network is unconditional; it takes no prompt or class (got {named[0]!r})")
            return None
        labels = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                if seeds is None:
                    raise ValueError("a class-conditional EDM network needs a class per image, or seeds to draw "
                                     "random classes from")
                labels.append(int(class_labels_for_seeds([seeds[i]], self.num_classes, self.shape)[0]))
                continue
            if not prompt.lstrip("-").isdigit() or not -1 <= int(prompt) < self.num_classes:
                raise ValueError(f"class {shown_prompt(prompt)} is not a label in -1..{self.num_classes - 1}")
            labels.append(int(prompt))
        return torch.tensor(labels, dtype=torch.long)

    def _label_rows(self, cond: Any, batch: int, device: torch.device) -> torch.Tensor | None:
        if not self.num_classes:
            if cond is not None:
                raise ValueError("this EDM network is unconditional; pass cond=None")
            return None
        if cond is None:
            raise ValueError(f"this EDM network is class-conditional ({self.num_classes} classes): pass labels [B] "
                             "or one-hot rows [B, label_dim]")
        cond = torch.as_tensor(cond, device=device)
        if cond.ndim == 1 or (cond.ndim == 2 and cond.shape[1] == 1 and not cond.is_floating_point()):
            labels = cond.reshape(-1).long()
            if labels.shape[0] != batch:
                raise ValueError(f"got {labels.shape[0]} labels for a batch of {batch}")
            # The range check reads the labels on the host: skipped while a CUDA graph is captured (the
            # sampler's labels were checked when they were made), where reading them would be an error.
            if not (labels.is_cuda and torch.cuda.is_current_stream_capturing()):
                if bool(((labels < -1) | (labels >= self.num_classes)).any()):
                    raise ValueError(f"labels must be in -1..{self.num_classes - 1}")
            # One-hot rows by comparison (label -1 matches no column: the zero row), with no data-dependent
            # indexing, so the call never waits for the device.
            return (labels[:, None] == torch.arange(self.num_classes, device=device)).float()
        if cond.ndim != 2 or cond.shape != (batch, self.num_classes):
            raise ValueError(f"label rows must have shape [{batch}, {self.num_classes}] (got {tuple(cond.shape)})")
        return cond.float()

    # -- the denoiser -------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Any = None) -> torch.Tensor:
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        labels = self._label_rows(cond, batch, x.device)
        step = self.max_batch or batch
        call = self._net_call if self.graphs is None else self.graphs
        outputs = [call(x[lo:lo + step], sigma[lo:lo + step], None if labels is None else labels[lo:lo + step])
                   for lo in range(0, batch, step)]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """States are images already: float32, clamped to [-1, 1]."""
        return x.float().clamp(-1, 1)

    # -- metadata ---------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """What :func:`backends.load_backend` needs to rebuild this backend (besides the weights' path)."""
        return {"dataset": self.dataset} if self.dataset else {}

    def describe(self) -> dict:
        """Identity of the network for caches and metadata (class, constructor, checkpoint hash)."""
        source = self.info.get("source") or {}
        return {"backend": self.name, "class": type(self.net).__name__, "model_type": self.net.model_type,
                "dataset": self.dataset, "checkpoint": source.get("path"), "sha256": source.get("sha256"),
                "file_sha256": self.info.get("file_sha256"),
                "init_kwargs": self.info.get("init_kwargs", getattr(self.net, "init_kwargs", None)),
                "parameters": sum(p.numel() for p in self.net.parameters()), "shape": list(self.shape),
                "label_dim": self.num_classes, "use_fp16": bool(self.net.use_fp16),
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


def edm_model_path(model_path: str | os.PathLike | None = None, dataset: str | None = None,
                   default_model_path: str | None = None) -> Path:
    """Where the network file is: ``model_path``, else ``$EDM_<DATASET>_PATH``, else ``default_model_path``,
    else ``weights/edm/<NVIDIA name>.safetensors`` (a converted copy) or ``weights/edm/<NVIDIA name>.pkl``.
    A missing file gives one :class:`FileNotFoundError` naming it and where NVIDIA publishes the network."""
    spec = EDM_DATASETS.get(dataset) if dataset else None
    candidates: list[Path] = []
    chosen = model_path or (os.environ.get(spec.env) if spec else None) or default_model_path
    if chosen:
        candidates.append(Path(chosen).expanduser())
    elif spec:
        stem = Path(spec.checkpoint).stem
        candidates += [WEIGHTS_DIR / f"{stem}.safetensors", WEIGHTS_DIR / spec.checkpoint]
    for path in candidates:
        if path.is_file():
            return path
    name = spec.checkpoint if spec else "the EDM network (.pkl or converted .safetensors)"
    where = " or ".join(str(p) for p in candidates) if candidates else "no path given"
    hint = f"--model_path FILE, backend_config.model_path or ${spec.env}" if spec else "--model_path FILE"
    raise FileNotFoundError(
        f"EDM network not found ({where}). It is {name}, published by NVIDIA with the EDM code release "
        f"(NVlabs/edm, {NVIDIA_EDM_URL}); nothing is downloaded at run time: fetch it where you have network "
        f"access, optionally convert it once (python -m backends.edm_checkpoint convert IN.pkl OUT.safetensors), "
        f"and pass {hint}. See docs/edm.md.")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_edm_backend(model_path: str | os.PathLike | None = None, *, dataset: str | None = None,
                     default_model_path: str | None = None, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = "auto", max_batch: int | None = None,
                     resolution: int | None = None, guidance: float | None = None, cuda_graphs: bool = False,
                     compile: bool = False) -> EDMBackend:
    """Load an EDM network from a local ``.pkl`` (read without executing it) or converted ``.safetensors``.

    ``dataset`` (cifar10, ffhq, afhqv2, imagenet64) picks the default file and environment variable
    (:data:`EDM_DATASETS`) and checks the network's resolution and classes against the data set's.
    ``dtype``: ``auto`` keeps the checkpoint's ``use_fp16``; ``float16``/``fp16`` or ``float32`` set it (float16
    only takes effect on CUDA). ``resolution``, when given, must equal the network's. ``guidance`` is accepted
    for table metadata and must be 0 or 1 (the released nets have no classifier-free guidance).
    ``cuda_graphs`` / ``compile``: the graphed and compiled network call (:class:`EDMBackend`).
    """
    if dataset is not None and dataset not in EDM_DATASETS:
        raise ValueError(f"unknown EDM data set {dataset!r}; known: {', '.join(EDM_DATASETS)}")
    if guidance not in (None, 0, 0.0, 1, 1.0):
        raise ValueError(f"guidance {guidance} was asked for, but the EDM networks have no classifier-free guidance")
    path = edm_model_path(model_path, dataset, default_model_path)
    net, config = load_edm(path)
    spec = EDM_DATASETS.get(dataset) if dataset else None
    if spec is not None:
        found = (int(net.img_resolution), int(net.img_channels), int(net.label_dim))
        wanted = (spec.resolution, spec.channels, spec.label_dim)
        if found != wanted:
            raise ValueError(f"{path} is a {found[0]}x{found[0]}x{found[1]} network with {found[2]} classes, but "
                             f"{dataset} needs {wanted[0]}x{wanted[0]}x{wanted[1]} with {wanted[2]} classes "
                             f"({spec.checkpoint})")
    if resolution is not None and int(resolution) != int(net.img_resolution):
        raise ValueError(f"{path} is a {net.img_resolution}x{net.img_resolution} network; resolution {resolution} "
                         "was asked for")
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float16: "float16", torch.float32: "float32"}.get(dtype, str(dtype))
    if dtype in ("float16", "fp16", "half"):
        net.use_fp16 = True
    elif dtype in ("float32", "fp32"):
        net.use_fp16 = False
    elif dtype not in (None, "auto"):
        raise ValueError(f"EDM networks run in float16 or float32 (got dtype {dtype!r})")
    place = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recorded = (config.get("source") or {}).get("sha256") if path.suffix == ".pkl" else None
    info = {**config, "file": str(path), "file_sha256": recorded or file_sha256(path)}
    return EDMBackend(net.to(place), dataset=dataset, max_batch=max_batch, info=info, cuda_graphs=cuda_graphs,
                      compile=compile)
