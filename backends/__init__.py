"""Backends adapt a model to the Backend contract (:mod:`backends.base`, docs/backends/contract.md): a
denoiser ``backend(x, sigma, cond) -> x0_hat`` in VE coordinates (or flow-matching states with
``D = x - sigma v``) plus its conditions, decoding and default grid. :mod:`backends.registry` maps names to
factories; ``package.module:factory`` names a user's own (docs/backends/own_model.md).

* ``gmm`` / ``digits`` (:mod:`backends.analytic`): exact analytic models, the embedded default.
* ``ldm`` (SD1.x/2.x, epsilon, v or sample prediction), ``sdxl``, ``sd3`` (SD3/3.5), ``flux`` (FLUX.1-dev and
  schnell): diffusers pipelines from local paths only, or one the caller already has (:func:`backend_from_pipeline`).
* ``edm`` (:mod:`backends.edm`): NVIDIA's EDM pixel networks; the data-set names are aliases that pick the
  data set's network.
* ``lsun_ldm`` (:mod:`backends.lsun_ldm`, alias ``lsun_bedroom_ldm``): the ICCV LSUN-Bedroom latent diffusion
  model, CompVis' ``model.ckpt`` read code-free and converted to diffusers parts (:mod:`backends.compvis_ldm`).
* ``digits_edm`` / ``digits_ddpm`` (:mod:`backends.digits_edm`): our small networks trained on the digits.
* :mod:`backends.adapters`: public helpers that wrap a plain network (eps/v/x0 on a discrete VP schedule,
  EDM-preconditioned, flow velocity) as a backend.
"""

from __future__ import annotations

from .analytic import AnalyticDiffusion, make_analytic
from .base import Backend, BackendBase, check_backend
from .registry import (ANALYTIC_MODELS, EDM_DATASET_ALIASES, REGISTRY, BackendEntry, backend_entry,
                       backend_from_pipeline, backend_names, backend_options, canonical_backend, check_table_backend,
                       is_factory_path, load_backend,
                       options_from_table, register_backend, resolve_backend)

__all__ = ["Backend", "BackendBase", "check_backend", "BackendEntry", "REGISTRY", "register_backend",
           "backend_entry", "resolve_backend", "load_backend", "backend_from_pipeline", "backend_options", "canonical_backend",
           "backend_names", "check_table_backend", "is_factory_path", "options_from_table", "ANALYTIC_MODELS", "EDM_DATASET_ALIASES",
           "AnalyticDiffusion", "make_analytic", "BACKENDS"]

BACKENDS = tuple(backend_names())
