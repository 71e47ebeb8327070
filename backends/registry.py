"""One backend registry: name -> factory, aliases, the options each accepts, and the diffusers pipeline
classes it wraps (docs/backends/contract.md).

``load_backend("sdxl", model_path=...)`` finds the entry, checks the options against what its factory (and,
through ``**kwargs``, its backend class) accepts, builds it and checks the result against the Backend contract.
A name of the form ``package.module:factory`` imports ``factory`` and calls it with the options: that is how a
user's own model enters every CLI, config and table (docs/backends/own_model.md).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .analytic import ANALYTIC_MODELS
from .base import check_backend

__all__ = ["BackendEntry", "REGISTRY", "register_backend", "resolve_backend", "backend_entry", "load_backend", "check_table_backend",
           "backend_from_pipeline", "backend_options", "canonical_backend", "backend_names", "options_from_table", "import_object",
           "check_option_values",
           "is_factory_path", "EDM_DATASET_ALIASES", "ANALYTIC_MODELS"]

# Data-set names of the authors' ICCV tables (their dataset_name) that stand for an EDM network.
EDM_DATASET_ALIASES = ("cifar10", "ffhq", "afhqv2", "imagenet64")


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend.

    ``factory``/``backend_class``: ``module:attribute`` paths, imported on first use (diffusers is not
    imported for the analytic models). ``aliases``: other names, each with the options it implies
    (``cifar10`` -> ``edm`` with ``dataset="cifar10"``). ``pipelines``: diffusers pipeline class names that
    :func:`backend_from_pipeline` wraps with ``backend_class``. ``weights``: takes ``model_path``;
    ``network``: a neural network (``compile``/``cuda_graphs`` apply); ``half_dtype``: what ``--use_fp16`` means.
    """

    name: str
    factory: str
    summary: str
    backend_class: str | None = None
    aliases: dict[str, dict] = field(default_factory=dict)
    pipelines: tuple[str, ...] = ()
    weights: bool = True
    network: bool = True
    half_dtype: str = "float16"

    def load_factory(self) -> Callable[..., Any]:
        return import_object(self.factory)

    def accepted_options(self) -> set[str] | None:
        """Keyword options the factory takes (following ``**kwargs`` into the backend class); None: any."""
        return _keywords(self.load_factory(), self.backend_class)


REGISTRY: dict[str, BackendEntry] = {}
_ALIASES: dict[str, tuple[str, dict]] = {}


def register_backend(entry: BackendEntry) -> BackendEntry:
    """Add (or replace) a backend and its aliases."""
    REGISTRY[entry.name] = entry
    for alias, implied in entry.aliases.items():
        _ALIASES[alias] = (entry.name, dict(implied))
    return entry


def is_factory_path(name: str) -> bool:
    """``package.module:factory``: a user's backend factory rather than a registered name."""
    module, sep, attribute = str(name).partition(":")
    return bool(sep and module and attribute) and all(part.isidentifier() for part in module.split(".")) \
        and all(part.isidentifier() for part in attribute.split("."))


def import_object(path: str) -> Any:
    """``package.module:attribute`` -> the object; an ImportError/AttributeError becomes a ValueError naming it."""
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"backend factory {path!r}: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") \
            from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"backend factory {path!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"backend factory {path!r} is not callable")
    return obj


def _keywords(fn: Callable[..., Any], forwarded_to: str | None) -> set[str] | None:
    names: set[str] = set()
    targets: list[Any] = [fn]
    if forwarded_to:
        targets += [klass.__init__ for klass in import_object(forwarded_to).__mro__ if "__init__" in vars(klass)]
    for target in targets:
        params = inspect.signature(target).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self", "pipe", "net"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None if forwarded_to is None else names


def canonical_backend(name: str) -> str:
    """``sd15`` -> ``ldm`` and similar aliases; unknown names (and factory paths) are returned unchanged."""
    return _ALIASES.get(name, (name, {}))[0]


def backend_names() -> list[str]:
    return sorted(REGISTRY)


def backend_entry(name: str) -> BackendEntry | None:
    """The registry entry of a name or alias; None for a factory path."""
    if is_factory_path(name):
        return None
    canonical = canonical_backend(name)
    if canonical not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(backend_names())} (aliases: "
                         f"{', '.join(sorted(_ALIASES))}), or give your own factory as package.module:function "
                         "(docs/backends/own_model.md)")
    return REGISTRY[canonical]


def resolve_backend(name: str, options: dict | None = None) -> tuple[str, BackendEntry | None, dict]:
    """``(canonical name, entry, options with the alias's implied options filled in)``."""
    options = dict(options or {})
    entry = backend_entry(name)
    for key, value in _ALIASES.get(name, ("", {}))[1].items():
        options.setdefault(key, value)
    return (entry.name if entry else name), entry, options


def backend_options(name: str) -> set[str] | None:
    """The loader options a backend (registered name, alias or factory path) accepts; None: any."""
    entry = backend_entry(name)
    return entry.accepted_options() if entry else _keywords(import_object(name), None)


def load_backend(name: str, **options: Any) -> Any:
    """Build a backend by registered name, alias or ``package.module:factory`` from loader options (the dict
    tables store as ``backend_config``); unknown options are refused by name before anything loads."""
    canonical, entry, options = resolve_backend(name, options)
    factory = entry.load_factory() if entry else import_object(name)
    accepted = backend_options(name)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(f"backend {canonical!r} does not take option(s) {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(accepted)) or 'no options'}")
    check_option_values(options, f"backend {canonical!r}")
    return check_backend(factory(**options), f"backend {canonical!r}")


def check_option_values(options: dict, where: str) -> None:
    """Numbers among loader options must be finite (a NaN guidance gives black images, not an error); the
    guidance scale must also be >= 0 (1 is no guidance)."""
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: option {key} = {value} is not a finite number")
    guidance = options.get("guidance")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0):
        raise ValueError(f"{where}: option guidance must be a number >= 0 (1 = no guidance), got {guidance!r}")


def backend_from_pipeline(pipe: Any, **options: Any) -> Any:
    """Wrap an already-loaded diffusers pipeline by its class (subclasses included); ``options`` as in
    :func:`load_backend` minus the loading keys. A pipeline class no entry supports is a ValueError."""
    by_class = {cls: entry for entry in REGISTRY.values() for cls in entry.pipelines}
    for klass in type(pipe).__mro__:
        entry = by_class.get(klass.__name__)
        if entry is not None and entry.backend_class:
            return check_backend(import_object(entry.backend_class)(pipe, **options), f"backend {entry.name!r}")
    raise ValueError(f"no backend wraps a {type(pipe).__name__}; supported pipelines: "
                     f"{', '.join(sorted(by_class))}")


# Keys of the authors' ``backend_config`` that describe the grid (the table carries its grid) or are
# informational; they are not loader options.
_GRID_KEYS = {"sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift", "latent_resolution"}


def check_table_backend(recorded: str | None, name: str | None, source: str, *, force: bool = False) -> str | None:
    """A table is fitted to one model's grid and denoiser: refuse running it on another (``ValueError`` naming the
    table and both models) unless ``force``; with ``force`` the mismatch is returned as a warning line. A table
    that records no backend needs ``name`` given."""
    if recorded is None or not str(recorded):
        if name is None:
            raise ValueError(f"the table {source} records no backend, and a table is only valid for the model it "
                             "was fitted on; name that model with --backend")
        return None
    if name is None or canonical_backend(str(recorded)) == canonical_backend(name):
        return None
    if not force:
        raise ValueError(f"the table {source} was fitted for the {recorded!r} model, not {name!r} (its grid and "
                         "positions belong to that model); --force-backend runs it anyway")
    return (f"warning: running the table {source}, fitted for {recorded!r}, on {name!r} (--force-backend); its "
            "numbers belong to the other model")


def options_from_table(name: str, backend_config: dict | None, guidance: float | None = None) -> dict:
    """Loader options from a predictor table's ``backend`` / ``backend_config`` / ``guidance_rate``.

    Our tables store :func:`load_backend` options directly. The authors' store diffusers-pipeline settings,
    translated here: ``model_name_or_path``/``model_id`` become the *default* model path (the user's
    --model_path and the $*_MODEL_PATH variables come first), ``torch_dtype`` becomes ``dtype``,
    ``enable_model_cpu_offload`` becomes ``offload``; grid keys are dropped. The SD1.5 tables' resolution of
    1024 is a known error of the release (docs/authors-code.md §9.21) and is ignored.
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
        accepted = backend_options(name)
        # No guidance (1.0) needs no option, so a backend that cannot guide still loads the table.
        if float(guidance) != 1.0 or accepted is None or "guidance" in accepted:
            options["guidance"] = float(guidance)
    return options


def _analytic(model: str = "digits", guidance: float = 1.0) -> Any:
    from .analytic import make_analytic

    return make_analytic(model, guidance)


for _entry in (
    BackendEntry("gmm", "backends.analytic:GaussianMixtureDiffusion", "exact Gaussian mixture of the digits",
                 weights=False, network=False),
    BackendEntry("digits", "backends.analytic:EmpiricalDiffusion", "exact empirical digits (memorises)",
                 weights=False, network=False),
    BackendEntry("analytic", "backends.registry:_analytic", "gmm or digits by option model=", weights=False,
                 network=False),
    BackendEntry("ldm", "backends.ldm:load_sd15", "Stable Diffusion 1.x/2.x (epsilon, v or sample prediction)",
                 "backends.ldm:StableDiffusionBackend", pipelines=("StableDiffusionPipeline",),
                 aliases={"sd15": {}, "sd1.5": {}, "stable-diffusion": {}, "sd2": {}, "sd21": {}}),
    BackendEntry("sdxl", "backends.sdxl:load_sdxl", "Stable Diffusion XL", "backends.sdxl:SDXLBackend",
                 pipelines=("StableDiffusionXLPipeline",), aliases={"sd-xl": {}, "stable-diffusion-xl": {}}),
    BackendEntry("sd3", "backends.sd3:load_sd3", "Stable Diffusion 3 / 3.5 (Medium, Large)",
                 "backends.sd3:SD3Backend", pipelines=("StableDiffusion3Pipeline",),
                 aliases={"sd3-512": {}, "sd3-1024": {}, "sd3.5": {}, "sd35": {}}),
    BackendEntry("flux", "backends.flux:load_flux", "FLUX.1-dev and FLUX.1-schnell", "backends.flux:FluxBackend",
                 pipelines=("FluxPipeline",), aliases={"flux-dev": {}, "flux-schnell": {}}, half_dtype="bfloat16"),
    BackendEntry("edm", "backends.edm:load_edm_backend", "NVIDIA EDM pixel networks (.pkl or .safetensors)",
                 aliases={name: {"dataset": name} for name in EDM_DATASET_ALIASES}),
    BackendEntry("digits_edm", "backends.digits_edm:load_digits_edm", "our EDM network on the digits (committed)"),
    BackendEntry("digits_ddpm", "backends.digits_edm:load_digits_ddpm", "our epsilon DDPM on the digits (committed)"),
    BackendEntry("lsun_ldm", "backends.lsun_ldm:load_lsun_ldm",
                 "ICCV LSUN-Bedroom latent diffusion (CompVis model.ckpt or converted .safetensors)",
                 aliases={"lsun_bedroom_ldm": {}}),
):
    register_backend(_entry)
