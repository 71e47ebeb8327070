"""Random-weight pipelines of the model variants the backends support beyond SD1.5 / SD3-Medium / FLUX.1-dev,
built offline by :func:`backends.testing.random_init.build_pipeline` and then swapping the components that differ.

=============  =========================  =================================================================
variant        pipeline                   what differs from its base (``VARIANT_BASE``)
=============  =========================  =================================================================
sd35_medium    StableDiffusion3Pipeline   MMDiT-X: QK RMS-norm, dual attention in layers 0..12,
                                          ``pos_embed_max_size`` 384 (24 layers, 24 heads; 2.5B)
sd35_large     StableDiffusion3Pipeline   QK RMS-norm, 38 layers of 38 heads (inner dim 2432; 8.1B)
flux_schnell   FluxPipeline               no guidance embedding (``guidance_embeds=False``); scheduler
                                          ``use_dynamic_shifting=False, shift=1.0`` (12B)
sd21_v         StableDiffusionPipeline    SD2.1-768-v: linear-projection UNet with per-block head counts
                                          (5, 10, 20, 20), cross-attention 1024, OpenCLIP-H text encoder
                                          (23 layers, pad ``!``), DDIM scheduler ``prediction_type="v_prediction"``
sd_sample      StableDiffusionPipeline    SD1.5 with a ``prediction_type="sample"`` (x0) scheduler
=============  =========================  =================================================================

``size="tiny"`` keeps each variant's structural features at toy width (the SD3.5 ones keep QK-norm and dual
attention, schnell lacks the guidance embedder, sd21_v keeps linear projections, upcast attention, per-block
head counts and the gelu/``!``-padded text encoder) and runs at :data:`TINY_RESOLUTION` pixels on a CPU in
seconds. ``size="full"`` is the published configuration; with ``device="meta"`` nothing is allocated, which is
how :data:`PUBLISHED_PARAMETERS` is checked (counting what a checkpoint stores, :func:`stored_parameters`:
SD3.5-Medium's 2.5B includes its 384x384x1536 position-embedding buffer).

Each builder is ``name(size="tiny", *, dtype=torch.float32, device="cpu", seed=0)``; :data:`VARIANTS` maps the
names to them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .random_init import _clip_text_config, _construct_on, _finish, build_clip_tokenizer, build_pipeline, pipeline_configs
from .random_init import TINY_RESOLUTION as _BASE_TINY_RESOLUTION

__all__ = ["VARIANT_BASE", "VARIANTS", "TINY_RESOLUTION", "PUBLISHED_PARAMETERS", "STORED_PARAMETERS",
           "variant_configs", "build_variant", "stored_parameters", "sd35_medium", "sd35_large", "flux_schnell",
           "sd21_v", "sd_sample"]

#: The random_init model each variant starts from.
VARIANT_BASE = {"sd35_medium": "sd3", "sd35_large": "sd3", "flux_schnell": "flux", "sd21_v": "sd15",
                "sd_sample": "sd15"}

#: Image side (pixels) of each tiny variant: its base's (latents 16x16).
TINY_RESOLUTION = {name: _BASE_TINY_RESOLUTION[base] for name, base in VARIANT_BASE.items()}

#: Published sizes (the releases' rounded figures) of the component that defines each full-size variant.
PUBLISHED_PARAMETERS = {"sd35_medium": {"transformer": 2.5e9}, "sd35_large": {"transformer": 8.1e9},
                        "flux_schnell": {"transformer": 12e9}, "sd21_v": {"unet": 865.9e6}}

#: Exact :func:`stored_parameters` of those components as built here (diffusers 0.42 / transformers 5.23);
#: within the rounding of :data:`PUBLISHED_PARAMETERS`. A change means the config changed.
STORED_PARAMETERS = {"sd35_medium": {"transformer": 2_469_663_936}, "sd35_large": {"transformer": 8_146_280_768},
                     "flux_schnell": {"transformer": 11_891_178_560},
                     "sd21_v": {"unet": 865_910_724, "text_encoder": 340_387_840}}

# Which components each variant rebuilds (the rest, tokenizers included, come from the base pipeline).
_SWAPPED = {"sd35_medium": ("transformer",), "sd35_large": ("transformer",), "flux_schnell": ("transformer",),
            "sd21_v": ("unet", "text_encoder"), "sd_sample": ()}

# SD2.1's published scheduler (a DDIMScheduler); only betas and prediction_type matter to the ldm backend.
_SD2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, trained_betas=None,
                      prediction_type="v_prediction")


def _check(name: str) -> None:
    if name not in VARIANT_BASE:
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANT_BASE)}")


def _sd35_transformer(base: dict[str, Any], size: str, large: bool) -> dict[str, Any]:
    """SD3.5 transformer config: Large is 38 layers x 38 heads, Medium SD3's 24 x 24 plus dual attention in the
    first 13 layers and twice SD3's position-embedding extent (tiny: 3 layers; Large 3 x 3, Medium 2 dual)."""
    full = size == "full"
    if large:
        layers = heads = 38 if full else 3
        extent, dual = base["pos_embed_max_size"], []
    else:
        layers, heads = (24, 24) if full else (3, base["num_attention_heads"])
        extent, dual = 2 * base["pos_embed_max_size"], list(range(13 if full else 2))
    return dict(base, num_layers=layers, num_attention_heads=heads, pos_embed_max_size=extent,
                caption_projection_dim=heads * base["attention_head_dim"], dual_attention_layers=dual,
                qk_norm="rms_norm")


def _sd21_unet(base: dict[str, Any], size: str, text_dim: int) -> dict[str, Any]:
    """SD2.1-768-v UNet: linear projections, upcast attention, per-block head counts, 96x96 latents."""
    heads = [5, 10, 20, 20] if size == "full" else [2, 4, 4]
    return dict(base, sample_size=96 if size == "full" else base["sample_size"], attention_head_dim=heads,
                cross_attention_dim=text_dim, use_linear_projection=True, upcast_attention=True)


def _clip_h_config(size: str) -> dict[str, Any]:
    """OpenCLIP ViT-H/14 text tower as SD2 uses it (penultimate layer: 23 of 24 layers; gelu; pad ``!``)."""
    config = _clip_text_config(size, "G", pad_token="!")
    if size == "full":
        config.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      projection_dim=512)
    return config


def variant_configs(name: str, size: str = "tiny") -> dict[str, dict[str, Any]]:
    """Per-component configs of a variant: its base's :func:`~backends.testing.random_init.pipeline_configs` with the
    differing entries replaced (``scheduler`` included)."""
    _check(name)
    cfg = {key: dict(value) for key, value in pipeline_configs(VARIANT_BASE[name], size).items()}
    if name in ("sd35_medium", "sd35_large"):
        cfg["transformer"] = _sd35_transformer(cfg["transformer"], size, large=name == "sd35_large")
        cfg["scheduler"] = dict(num_train_timesteps=1000, shift=3.0)
    elif name == "flux_schnell":
        cfg["transformer"]["guidance_embeds"] = False
        cfg["scheduler"] = dict(cfg["scheduler"], shift=1.0, use_dynamic_shifting=False)
    elif name == "sd21_v":
        cfg["text_encoder"] = _clip_h_config(size)
        cfg["unet"] = _sd21_unet(cfg["unet"], size, cfg["text_encoder"]["hidden_size"])
        cfg["scheduler"] = dict(_SD2_SCHEDULER)
    else:
        cfg["scheduler"] = dict(_SD2_SCHEDULER, prediction_type="sample")
    return cfg


def _module(name: str, component: str, config: dict[str, Any]) -> torch.nn.Module:
    import diffusers
    import transformers

    if component == "transformer":
        cls = diffusers.SD3Transformer2DModel if VARIANT_BASE[name] == "sd3" else diffusers.FluxTransformer2DModel
        return cls(**config)
    if component == "unet":
        return diffusers.UNet2DConditionModel(**config)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))


def _scheduler(name: str, config: dict[str, Any]) -> Any:
    import diffusers

    if VARIANT_BASE[name] == "sd15":
        return diffusers.DDIMScheduler.from_config(config)
    return diffusers.FlowMatchEulerDiscreteScheduler(**config)


def build_variant(name: str, size: str = "tiny", *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", seed: int = 0) -> Any:
    """The variant's pipeline: ``build_pipeline(VARIANT_BASE[name], size, ...)`` with the components of
    :data:`_SWAPPED` rebuilt from :func:`variant_configs` (seeded with ``seed + 1`` in a forked RNG state, on
    ``device`` in ``dtype``; ``"meta"`` allocates nothing) and the variant's scheduler."""
    _check(name)
    pipe = build_pipeline(VARIANT_BASE[name], size, dtype=dtype, device=device, seed=seed)
    cfg = variant_configs(name, size)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else [], device_type="cuda"):
        torch.manual_seed(seed + 1)
        with _construct_on(device, dtype):
            modules = {component: _module(name, component, cfg[component]) for component in _SWAPPED[name]}
    modules = {component: _finish(module, device, dtype) for component, module in modules.items()}
    if name == "sd21_v":
        modules["tokenizer"] = build_clip_tokenizer(size, pad_token="!")
    pipe.register_modules(**modules, scheduler=_scheduler(name, cfg["scheduler"]))
    return pipe


def stored_parameters(module: torch.nn.Module) -> int:
    """Number of values a checkpoint of ``module`` stores: parameters plus persistent buffers (such as SD3's
    fixed sin-cos position embedding); works on the meta device."""
    return sum(t.numel() for t in module.state_dict().values())


def sd35_medium(size: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seed: int = 0) -> Any:
    """SD3.5-Medium (``StableDiffusion3Pipeline``, MMDiT-X) with random weights."""
    return build_variant("sd35_medium", size, dtype=dtype, device=device, seed=seed)


def sd35_large(size: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0) -> Any:
    """SD3.5-Large (``StableDiffusion3Pipeline``) with random weights."""
    return build_variant("sd35_large", size, dtype=dtype, device=device, seed=seed)


def flux_schnell(size: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0) -> Any:
    """FLUX.1-schnell (``FluxPipeline`` without guidance embedding, unshifted static grid) with random weights."""
    return build_variant("flux_schnell", size, dtype=dtype, device=device, seed=seed)


def sd21_v(size: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
           seed: int = 0) -> Any:
    """SD2.1-768-v (``StableDiffusionPipeline``, v-prediction) with random weights."""
    return build_variant("sd21_v", size, dtype=dtype, device=device, seed=seed)


def sd_sample(size: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              seed: int = 0) -> Any:
    """SD1.5 architecture with a sample (x0) predicting scheduler config, random weights."""
    return build_variant("sd_sample", size, dtype=dtype, device=device, seed=seed)


#: Variant name -> builder.
VARIANTS: dict[str, Callable[..., Any]] = {"sd35_medium": sd35_medium, "sd35_large": sd35_large,
                                           "flux_schnell": flux_schnell, "sd21_v": sd21_v, "sd_sample": sd_sample}
