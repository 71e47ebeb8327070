"""Backends adapt a model to the denoiser interface ``denoiser(x, sigma, cond) -> x0_hat`` (VE coordinates,
or flow-matching states with ``D = x - sigma v``; ARCHITECTURE.md).

* ``gmm`` / ``digits`` (:mod:`backends.analytic`): exact analytic models, the embedded default.
* ``ldm`` (:mod:`backends.ldm`): Stable Diffusion 1.5; ``sd3`` (:mod:`backends.sd3`); ``flux``
  (:mod:`backends.flux`). They load diffusers pipelines from local paths only, or wrap a pipeline the caller
  already has (:func:`backend_from_pipeline`).
* ``edm`` (:mod:`backends.edm`): NVIDIA's EDM pixel networks (CIFAR-10, FFHQ, AFHQv2, ImageNet-64), from their
  ``.pkl`` read without executing it or from a converted ``.safetensors``; the data-set names are aliases that
  also pick the data set's network. ``lsun_ldm`` (the ICCV LSUN-Bedroom latent model) is not available yet:
  loading it raises :class:`NotImplementedError` (docs/edm.md says what is missing).
* ``digits_edm`` (:mod:`backends.digits_edm`): our small EDM network trained on the digits (16x16), the second
  embedded default; its weights are committed under ``exps/digits_edm/``. ``digits_ddpm``: the same digits
  as an epsilon-predicting discrete-time DDPM (linear betas), committed under ``exps/digits_ddpm/``.
"""

from __future__ import annotations

from typing import Any

from .analytic import ANALYTIC_MODELS, AnalyticDiffusion, make_analytic

__all__ = ["ANALYTIC_MODELS", "AnalyticDiffusion", "make_analytic", "load_backend", "backend_from_pipeline",
           "BACKENDS", "EDM_DATASET_ALIASES", "canonical_backend", "options_from_table"]

BACKENDS = ("ldm", "sd3", "flux", "edm", "digits_edm", "digits_ddpm") + ANALYTIC_MODELS
# Data-set names of the authors' ICCV tables (their dataset_name) that stand for an EDM network.
EDM_DATASET_ALIASES = ("cifar10", "ffhq", "afhqv2", "imagenet64")
_ALIASES = {"sd15": "ldm", "sd1.5": "ldm", "stable-diffusion": "ldm", "sd3-512": "sd3", "sd3-1024": "sd3",
            "flux-dev": "flux", "lsun_bedroom_ldm": "lsun_ldm", **{name: "edm" for name in EDM_DATASET_ALIASES}}


def canonical_backend(name: str) -> str:
    """``sd15`` -> ``ldm`` and similar aliases; unknown names are returned unchanged."""
    return _ALIASES.get(name, name)


# Keys of the authors' ``backend_config`` that describe the grid (the table carries its grid) or are
# informational; they are not loader options.
_GRID_KEYS = {"sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift", "latent_resolution"}


def options_from_table(name: str, backend_config: dict | None, guidance: float | None = None) -> dict:
    """Loader options from a predictor table's ``backend`` / ``backend_config`` / ``guidance_rate``.

    Our tables store :func:`load_backend` options directly. The authors' store diffusers-pipeline settings,
    translated here: ``model_name_or_path``/``model_id`` become the *default* model path (the user's
    --model_path and the $*_MODEL_PATH variables come first), ``torch_dtype`` becomes ``dtype``,
    ``enable_model_cpu_offload`` becomes ``offload``; grid keys are dropped. The SD1.5 tables' resolution of
    1024 is a known error of the release (spec 9.21) and is ignored.
    """
    name = canonical_backend(name)
    options: dict = {}
    for key, value in dict(backend_config or {}).items():
        if key in _GRID_KEYS:
            continue
        if key in ("model_name_or_path", "model_id"):
            options.setdefault("default_model_path", value)
        elif key == "torch_dtype":
            options["dtype"] = str(value).replace("torch.", "")
        elif key == "enable_model_cpu_offload":
            options["offload"] = ("model" if name == "flux" else "sequential") if value else "none"
        elif key == "resolution" and name == "ldm" and value == 1024:
            continue
        else:
            options[key] = value
    if guidance is not None and "guidance" not in options:
        options["guidance"] = float(guidance)
    return options


def load_backend(name: str, **config: Any) -> Any:
    """Build a backend by name from its ``backend_config`` (the dict stored in predictor tables).

    Analytic: ``gmm`` / ``digits`` (or ``analytic`` with ``model=...``), option ``guidance``.
    Text-to-image: ``ldm``/``sd3``/``flux`` with ``model_path`` (a local diffusers folder; SD1.5 also takes a
    single ``.ckpt``/``.safetensors`` plus ``config``), ``device``, ``dtype`` (auto/float16/bfloat16/float32),
    ``offload`` (none/model/sequential), ``guidance``, ``resolution``, ``max_batch``, ``negative_prompt``.
    Pixel EDM: ``edm`` (or a data-set alias, which sets ``dataset``) with ``model_path`` (``.pkl`` or converted
    ``.safetensors``), ``dataset``, ``device``, ``dtype`` (auto/float16/float32), ``max_batch``, ``resolution``
    (:func:`backends.edm.load_edm_backend`). ``digits_edm``: the committed digits network, or ``model_path``
    (:func:`backends.digits_edm.load_digits_edm`), with ``device``, ``dtype``, ``max_batch``, ``guidance``;
    ``digits_ddpm`` likewise (:func:`backends.digits_edm.load_digits_ddpm`).
    Every network backend also takes ``cuda_graphs`` (replay network calls from CUDA graphs) and ``compile``
    (the fast path of :mod:`backends.compile`: compiled network, graphed calls; docs/benchmarks.md).
    """
    if name in EDM_DATASET_ALIASES:
        config.setdefault("dataset", name)
    name = canonical_backend(name)
    if name == "analytic":
        name = config.pop("model", "digits")
    if name in ANALYTIC_MODELS:
        return make_analytic(name, **config)
    if name == "ldm":
        from .ldm import load_sd15

        return load_sd15(**config)
    if name == "sd3":
        from .sd3 import load_sd3

        return load_sd3(**config)
    if name == "flux":
        from .flux import load_flux

        return load_flux(**config)
    if name == "edm":
        from .edm import load_edm_backend

        return load_edm_backend(**config)
    if name == "digits_edm":
        from .digits_edm import load_digits_edm

        return load_digits_edm(**config)
    if name == "digits_ddpm":
        from .digits_edm import load_digits_ddpm

        return load_digits_ddpm(**config)
    if name == "lsun_ldm":
        raise NotImplementedError(
            "the lsun_ldm backend (the ICCV LSUN-Bedroom latent diffusion model, CompVis lsun_bedrooms-ldm-vq-4) "
            "is not implemented: its checkpoint needs a conversion that is not part of this repository; "
            "docs/edm.md ('LSUN-Bedroom') says exactly what is missing")
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")


def backend_from_pipeline(pipe: Any, **config: Any) -> Any:
    """Wrap an already-loaded diffusers pipeline (StableDiffusionPipeline, StableDiffusion3Pipeline or
    FluxPipeline) without reloading anything; ``config`` as in :func:`load_backend` minus the loading keys."""
    kind = type(pipe).__name__
    if kind.startswith("StableDiffusion3"):
        from .sd3 import SD3Backend

        return SD3Backend(pipe, **config)
    if kind.startswith("Flux"):
        from .flux import FluxBackend

        return FluxBackend(pipe, **config)
    if kind.startswith("StableDiffusion"):
        from .ldm import StableDiffusionBackend

        return StableDiffusionBackend(pipe, **config)
    raise ValueError(f"no backend for a {kind}; supported: StableDiffusionPipeline, StableDiffusion3Pipeline, "
                     "FluxPipeline")
