"""Backends adapt a model to the denoiser interface ``denoiser(x, sigma, cond) -> x0_hat`` (VE coordinates).

Only the exact analytic models ship so far (:mod:`backends.analytic`); they are the default everywhere.
"""

from .analytic import ANALYTIC_MODELS, AnalyticDiffusion, make_analytic

__all__ = ["ANALYTIC_MODELS", "AnalyticDiffusion", "make_analytic", "load_backend"]


def load_backend(name: str, **config):
    """Build a backend by name. ``gmm`` / ``digits`` (or ``analytic`` with ``model=...``)."""
    if name == "analytic":
        name = config.pop("model", "digits")
    if name in ANALYTIC_MODELS:
        return make_analytic(name, **config)
    raise ValueError(f"backend {name!r} is not available in this build; available: analytic ({', '.join(ANALYTIC_MODELS)})")
