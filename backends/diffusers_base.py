"""What the diffusers-based backends (SD1.5, SD3, FLUX) share: local-only loading, prompt conditions,
classifier-free guidance in one batched call, per-call batch limits, dtype handling and VAE decoding.

A backend wraps a diffusers pipeline object (loaded from a local folder, or handed over by the user) and exposes the
Backend contract (docs/backends/contract.md), ``backend(x, sigma, cond) -> x0_hat``, plus ``encode_prompts``, ``decode``
and ``default_schedule``. Subclasses only say how their network's raw output becomes ``D`` (docs/authors-code.md §5.1,
5.3, 5.4). dtype policy: the ODE state and ``D`` stay float32 (or whatever dtype the state has); only the network runs
in the pipeline's dtype (fp16/bf16). The authors integrate SD3/FLUX states in fp16/bf16 (docs/authors-code.md §1.4,
9.14); we do not.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from solvers.schedules import ScheduleSpec

from .base import BackendBase
from .compile import CompiledCall
from .cuda_graphs import GraphedCall

__all__ = ["PromptCondition", "DiffusersBackend", "ModelNotFoundError", "resolve_model_path", "load_pipeline",
           "load_local_pipeline", "SINGLE_FILE_SUFFIXES",
           "resolve_dtype"]

HOW_TO_GET = ("Weights are never downloaded at run time. Download the model once where you have network access, "
              "e.g. `huggingface-cli download {repo} --local-dir DIR`, copy DIR here, and pass it as "
              "--model_path DIR (or backend_config.model_path).")


class ModelNotFoundError(FileNotFoundError):
    """A model folder or file is missing; the message names the path and how to provide it."""


@dataclass(frozen=True)
class PromptCondition:
    """Encoded prompts, one row per image: text embeddings, optional pooled embeddings, and the same for the
    negative (unconditional) prompt when classifier-free guidance is on. ``prompts`` keeps the raw text."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    prompts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        return self.neg_embeds is not None

    def _map(self, tensor_fn: Any, prompt_fn: Any) -> "PromptCondition":
        return replace(self, **{name: None if getattr(self, name) is None else tensor_fn(getattr(self, name))
                                for name in ("embeds", "pooled", "neg_embeds", "neg_pooled")},
                       prompts=tuple(prompt_fn(self.prompts)))

    def repeat_interleave(self, repeats: int) -> "PromptCondition":
        """Each row ``repeats`` times, in ``b * repeats + k`` order: the parallel EPD call's
        (docs/authors-code.md §1.1, 9.1-9.2)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0),
                         lambda p: [q for q in p for _ in range(repeats)])

    def select(self, rows: slice) -> "PromptCondition":
        return self._map(lambda t: t[rows], lambda p: p[rows] if p else ())

    def take(self, index: Sequence[int]) -> "PromptCondition":
        """Rows ``index`` (repeats allowed), in that order."""
        order = torch.as_tensor(list(index), dtype=torch.long)
        return self._map(lambda t: t[order.to(t.device)], lambda p: [p[i] for i in index] if p else ())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptCondition":
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda p: p)


def resolve_dtype(value: str | torch.dtype | None, device: torch.device, accelerated: torch.dtype) -> torch.dtype:
    """``auto``: ``accelerated`` (fp16/bf16) on CUDA, float32 elsewhere; else a torch dtype or its name."""
    if isinstance(value, torch.dtype):
        return value
    if value in (None, "auto"):
        return accelerated if device.type == "cuda" else torch.float32
    names = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if value not in names:
        raise ValueError(f"unknown dtype {value!r}; use auto, {', '.join(names)}")
    return names[value]


def resolve_model_path(path: str | os.PathLike | None, *, repo: str, env: str | None = None,
                       default: str | None = None) -> Path:
    """A local diffusers folder (with ``model_index.json``) or single file; never the network.

    Precedence: ``path`` (the user's flag), then the environment variable ``env``, then ``default`` (e.g. the
    model id recorded in a predictor table). A value may be a folder, a file, or a Hugging Face repo id that is
    already in the local HF cache. Missing components of a folder are reported by name.
    """
    if path is None and env:
        path = os.environ.get(env) or None
    if path is None:
        path = default
    if path is None:
        where = f" or set ${env}" if env else ""
        raise ModelNotFoundError(f"no model path given for {repo}: pass --model_path DIR{where}. "
                                 + HOW_TO_GET.format(repo=repo))
    candidate = Path(path).expanduser()
    if not candidate.exists():
        cached = _hf_cache_snapshot(str(path))
        if cached is None:
            raise ModelNotFoundError(f"model path {candidate} does not exist (and {path!r} is not in the local "
                                     f"Hugging Face cache). " + HOW_TO_GET.format(repo=repo))
        candidate = cached
    if candidate.is_dir():
        index = candidate / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(f"{candidate} is not a diffusers pipeline folder: {index} is missing. "
                                     + HOW_TO_GET.format(repo=repo))
        components = json.loads(index.read_text())
        missing = [name for name, spec in components.items()
                   if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None
                   and not (candidate / name).is_dir()]
        if missing:
            raise ModelNotFoundError(f"{candidate} lacks the component folder(s) {', '.join(missing)} listed in "
                                     f"model_index.json. " + HOW_TO_GET.format(repo=repo))
    return candidate


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None


def load_pipeline(pipeline_cls: Any, path: Path, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained(path, local_files_only=True)`` with a readable error on failure."""
    try:
        return pipeline_cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load {pipeline_cls.__name__} from {path}: {err}") from err


SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")


def load_local_pipeline(pipeline_cls: Any, path: Path, config: str | None, torch_dtype: torch.dtype, *, repo: str,
                        label: str, **kwargs: Any) -> Any:
    """A pipeline from a local diffusers folder, or from a single ``.ckpt``/``.safetensors`` checkpoint together
    with ``config``: a local diffusers folder of the same architecture that supplies the component configs,
    tokenizers and scheduler (diffusers would otherwise fetch them). ``label`` names the model in messages."""
    if not path.is_file():
        return load_pipeline(pipeline_cls, Path(path), torch_dtype, **kwargs)
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelNotFoundError(f"{path}: a single-file checkpoint must end in .ckpt or .safetensors")
    if config is None:
        raise ModelNotFoundError(
            f"{path} is a single-file checkpoint; also give backend_config.config = a local diffusers {label} "
            f"folder (its configs, tokenizers and scheduler are needed, and never downloaded), e.g. "
            f"--backend-config '{{\"config\": \"weights/{repo.split('/')[-1]}\"}}'")
    config_dir = resolve_model_path(config, repo=repo)
    try:
        return pipeline_cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                             torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load {path} with config {config_dir}: {err}") from err


def place_pipeline(pipe: Any, device: torch.device, offload: str) -> None:
    """Move the pipeline to ``device``, or enable CPU offload (``model``: whole components, ``sequential``:
    layer by layer; both keep the GPU memory low at a speed cost)."""
    if offload in (None, "none", False):
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"offload must be none, model or sequential (got {offload!r})")


class DiffusersBackend(BackendBase):
    """Base class of the text-to-image backends. Subclasses set ``name``, ``family``, ``network`` and implement
    :meth:`_denoise` (one network call, no guidance), :meth:`_encode` and :meth:`default_schedule`.

    ``guidance``: CFG scale (SD1.5/SD3: ``D = D_u + g (D_c - D_u)`` from one batched call over [uncond, cond];
    as the map from the network output to D is affine in the output, guiding D is guiding eps or v).
    ``max_batch``: the most rows one network call may take (CFG rows included, so with guidance a call holds
    at least one [negative, positive] pair); larger batches, such as the B*K rows of a parallel EPD step, are
    split into several calls instead of running out of memory.
    ``cuda_graphs``: replay each guided network call from a CUDA graph captured per batch shape
    (:mod:`backends.cuda_graphs`; on CUDA under ``torch.no_grad()`` only, eager otherwise). At small batches
    the eager call is bound by kernel-launch overhead, which the graph removes; results equal the eager path
    to within the network dtype's rounding.
    ``compile``: the fast path (:mod:`backends.compile`). The network runs inductor's kernels (static shapes,
    compiled once per call signature) replayed from per-call CUDA graphs, the VAE decoder is compiled and
    graphed too, and the text encoders' forwards are replayed from graphs (they run once per batch; their
    compilation would cost more start-up than it saves). The pipeline object itself is not modified: the
    text encoders' graphed forwards are swapped in only while :meth:`encode_prompts` runs.
    ``fuse_qkv``: diffusers' ``fuse_qkv_projections()`` on the network (one matrix product for an attention's
    q, k and v, as diffusers' speed guide does; the same values up to the order of floating-point sums). It
    changes the network object, so every user of the pipeline sees it.
    """

    name = "diffusers"
    family = "ve"
    condition_kind = "prompt"
    uses_cfg = True
    default_guidance = 1.0

    def __init__(self, pipe: Any, *, guidance: float | None = None, resolution: int | None = None,
                 max_batch: int | None = None, negative_prompt: str = "", state_dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool = False, compile: bool = False, fuse_qkv: bool = False):
        self.pipe = pipe
        if fuse_qkv:
            fuse = getattr(self.network, "fuse_qkv_projections", None)
            if fuse is None:
                raise ValueError(f"fuse_qkv=True: the {type(self.network).__name__} of the {self.name} backend has "
                                 "no fuse_qkv_projections() in this diffusers version")
            fuse()
        self.fused_qkv = bool(fuse_qkv)
        self.compiled = bool(compile)
        if self.compiled and any(hasattr(m, "_hf_hook") for m in pipe.components.values()):
            raise ValueError("compile=True needs the whole pipeline on the GPU (offload none): offloading moves "
                             "weights during every call, which neither a compiled nor a graphed call can do")
        self.graphs = GraphedCall(self._guided, name=f"the {self.name} network call") if cuda_graphs or compile else None
        self._network_call = (CompiledCall(self.network, name=f"the {self.name} {type(self.network).__name__}",
                                           device=self.device) if compile else self.network)
        vae_decode = lambda z: self.decode_vae.decode(z, return_dict=False)[0]  # noqa: E731 - one expression
        self._vae_decode = (GraphedCall(CompiledCall(vae_decode, name=f"the {self.name} VAE decoder",
                                                     device=self.device), name=f"the {self.name} VAE decoder")
                            if compile else vae_decode)
        self._text_graphs = [(module, GraphedCall(module.forward, name=f"the {self.name} {type(module).__name__}"))
                             for module in self._text_encoders()] if compile else []
        self.guidance = float(self.default_guidance if guidance is None else guidance)
        self.max_batch = None if not max_batch else int(max_batch)
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.negative_prompt = negative_prompt
        self.state_dtype = state_dtype
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or self.default_resolution())
        multiple = self.vae_scale_factor * self.latent_multiple
        if self.resolution % multiple:
            raise ValueError(f"{self.name}: resolution {self.resolution} must be a multiple of {multiple}")

    # -- what subclasses provide ----------------------------------------------------------------------------
    latent_multiple = 1

    @property
    def network(self) -> torch.nn.Module:
        raise NotImplementedError

    def default_resolution(self) -> int:
        raise NotImplementedError

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                 pooled: torch.Tensor | None) -> torch.Tensor:
        """``D(x, sigma)`` for one chunk, without guidance; ``x``/``sigma`` in the state dtype."""
        raise NotImplementedError

    def _encode(self, prompts: list[str], negative: list[str] | None) -> PromptCondition:
        raise NotImplementedError

    def default_schedule(self, num_steps: int, variant: str = "correct") -> ScheduleSpec:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def decode_vae(self) -> torch.nn.Module:
        """The VAE :meth:`decode` runs: the pipeline's (SDXL substitutes a float32 copy of an fp16 one)."""
        return self.pipe.vae

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    @property
    def shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.vae_scale_factor
        return (self.latent_channels, size, size)

    @property
    def guided(self) -> bool:
        return self.uses_cfg and self.guidance != 1.0

    def run_network(self, *args: Any, **kwargs: Any) -> Any:
        """One raw call of :attr:`network` (compiled on the fast path); subclasses' :meth:`_denoise` use it."""
        return self._network_call(*args, **kwargs)

    def _text_encoders(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]

    @contextmanager
    def _graphed_text_encoders(self) -> Iterator[None]:
        """The text encoders' forwards replaced by their graphed versions for the duration of the block."""
        previous = [module.__dict__.get("forward") for module, _ in self._text_graphs]
        for module, graphed in self._text_graphs:
            module.forward = graphed
        try:
            yield
        finally:
            for (module, _), before in zip(self._text_graphs, previous):
                if before is None:
                    del module.forward     # back to the class's forward
                else:
                    module.forward = before

    def encode_prompts(self, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> PromptCondition:
        """Text embeddings for each prompt (and the negative prompt when guidance is on), on the device
        (``seeds`` unused: text conditions do not depend on the noise). A prompt that comes several times (an
        RDPO group, a prompt file shorter than the seeds) is encoded once and its rows repeated."""
        prompts = [str(p) for p in prompts]
        position: dict[str, int] = {}
        index = [position.setdefault(p, len(position)) for p in prompts]
        unique = list(position)
        negative = [self.negative_prompt] * len(unique) if self.guided else None
        with torch.no_grad(), self._graphed_text_encoders():
            cond = self._encode(unique, negative)
        if len(unique) < len(prompts):
            cond = cond.take(index)
        return replace(cond, prompts=tuple(prompts))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: PromptCondition | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError(f"the {self.name} backend needs a condition: use backend.encode_prompts(prompts)")
        batch = x.shape[0]
        if len(cond) != batch:
            raise ValueError(f"condition has {len(cond)} rows but the batch has {batch}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        cond = cond.to(device=x.device)
        guided = self.guided and cond.has_negative
        rows = self.max_batch or batch * (2 if guided else 1)
        step = max(1, rows // 2) if guided else rows
        outputs = []
        for lo in range(0, batch, step):
            part = cond.select(slice(lo, lo + step))
            args = (x[lo:lo + step], sigma[lo:lo + step], part.embeds, part.pooled,
                    part.neg_embeds if guided else None, part.neg_pooled if guided else None)
            outputs.append(self._guided(*args) if self.graphs is None else self.graphs(*args, key=self.guidance))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _guided(self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None,
                neg_embeds: torch.Tensor | None, neg_pooled: torch.Tensor | None) -> torch.Tensor:
        """``D`` of one chunk: one network call, over [negative, positive] rows when ``neg_embeds`` is given."""
        if neg_embeds is None:
            return self._denoise(x, sigma, embeds, pooled)
        both = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([neg_embeds, embeds]),
                             None if pooled is None else torch.cat([neg_pooled, pooled]))
        uncond, conditional = both.chunk(2)
        return uncond + self.guidance * (conditional - uncond)

    def vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """ODE-state latents -> what the VAE decoder takes: ``z / scaling_factor + shift_factor``."""
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return x / config.scaling_factor + shift

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], float32 ``[B, 3, H, W]`` (chunked by ``max_batch``; differentiable)."""
        vae = self.decode_vae
        step = self.max_batch or x.shape[0]
        images = [self._vae_decode(self.vae_latents(x[lo:lo + step]).to(device=self.device, dtype=vae.dtype))
                  for lo in range(0, x.shape[0], step)]
        return torch.cat(images).float().clamp(-1, 1)

    def config(self) -> dict:
        """What :func:`backends.load_backend` needs to rebuild this backend (without the weights' path)."""
        return {"resolution": self.resolution, "guidance": self.guidance}

    def describe(self) -> dict:
        """Identity of the model for caches and metadata."""
        network = self.network
        return {"backend": self.name, "class": type(network).__name__,
                "name_or_path": getattr(getattr(self.pipe, "config", None), "_name_or_path", None),
                "parameters": sum(p.numel() for p in network.parameters()), **self.config()}
