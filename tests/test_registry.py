"""The Backend contract, the registry and the one generation sequence (docs/backends/contract.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends import (BackendBase, backend_from_pipeline, backend_options, check_backend, load_backend,
                      options_from_table, resolve_backend)
from backends.generate import Sampler, generate, generate_batches, initial_state
from solvers.core import seeded_noise
from solvers.epd import sample_epd
from solvers.registry import get_solver
from solvers.schedules import polynomial_sigmas
from solvers.table import load_table


class Tiny(BackendBase):
    """A VE model whose denoiser shrinks toward zero: enough to exercise the contract."""

    name = "tiny"
    shape = (1, 4, 4)
    state_dtype = torch.float64

    def __call__(self, x, sigma, cond=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s * s)


def make_tiny(scale: float = 1.0) -> Tiny:
    """A factory in this module, so ``tests.test_registry:make_tiny`` names it."""
    return Tiny()


def test_every_registered_analytic_backend_meets_the_contract():
    for name in ("gmm", "digits", "digits_edm", "digits_ddpm"):
        backend = load_backend(name)
        assert check_backend(backend) is backend
        assert backend.flow is False and backend.condition_kind == "label"
    assert load_backend("digits_ddpm").alphas_cumprod is not None and load_backend("gmm").alphas_cumprod is None
    assert load_backend("gmm").prediction_type == "exact" and load_backend("digits_ddpm").prediction_type == "epsilon"


def test_check_backend_names_every_missing_member():
    class Half:
        shape = (1, 2, 2)

        def __call__(self, x, sigma, cond=None):
            return x

    with pytest.raises(TypeError, match="missing name, family, prediction_type.*encode_prompts, decode"):
        check_backend(Half())

    class Wrong(Tiny):
        family = "vp"

    with pytest.raises(TypeError, match="family 'vp'"):
        check_backend(Wrong())


def test_options_are_checked_against_the_factory_before_loading():
    # ldm's loader would import diffusers and look for weights; the option check comes first
    with pytest.raises(ValueError, match="does not take option\\(s\\) colour.*model_path"):
        load_backend("ldm", colour="blue")
    accepted = backend_options("sdxl")
    assert {"model_path", "guidance", "max_batch", "compile", "negative_prompt"} <= accepted
    assert backend_options("gmm") == {"guidance", "ridge"}
    name, entry, options = resolve_backend("cifar10")
    assert name == "edm" and options == {"dataset": "cifar10"} and entry.name == "edm"
    assert resolve_backend("sd15")[0] == "ldm" and resolve_backend("flux-schnell")[0] == "flux"


def test_a_factory_path_loads_a_users_backend():
    backend = load_backend("tests.test_registry:make_tiny", scale=2.0)
    assert type(backend).__name__ == "Tiny" and backend.name == "tiny"
    with pytest.raises(ValueError, match="does not take option\\(s\\) size"):
        load_backend("tests.test_registry:make_tiny", size=3)
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        load_backend("tests.test_registry:nothing")
    with pytest.raises(TypeError, match="does not implement the Backend contract"):
        load_backend("tests.test_registry:seeded_noise", seeds=[0], shape=(1,))


def test_no_guidance_is_dropped_for_a_factory_that_cannot_guide():
    assert options_from_table("tests.test_registry:make_tiny", {}, 1.0) == {}
    assert options_from_table("tests.test_registry:make_tiny", {}, 2.0) == {"guidance": 2.0}   # then refused
    assert options_from_table("gmm", {}, 1.0) == {"guidance": 1.0}


def test_backend_from_pipeline_dispatches_on_the_class():
    class NotAPipeline:
        pass

    with pytest.raises(ValueError, match="no backend wraps a NotAPipeline; supported pipelines: FluxPipeline, "
                                         "StableDiffusion3Pipeline, StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline"):
        backend_from_pipeline(NotAPipeline())


def test_generate_equals_the_solver_loop_and_is_batch_independent():
    backend = load_backend("gmm")
    table = load_table("exps/gmm/epd-nfe5.pkl")
    seeds, prompts = list(range(5)), ["3", "", "7", "1", "0"]
    images = generate(backend, Sampler.from_table(table), seeds, prompts, batch=2)
    x = seeded_noise(seeds, backend.shape, torch.float64) * float(table.sigmas[0])
    direct = backend.decode(sample_epd(backend, x, table, backend.encode_prompts(prompts)))
    torch.testing.assert_close(images, direct.float(), rtol=0, atol=0)
    one = generate(backend, Sampler.from_table(table), seeds[3:4], prompts[3:4], batch=7)
    torch.testing.assert_close(one, images[3:4], rtol=0, atol=0)
    sigmas = polynomial_sigmas(7, backend.sigma_min, backend.sigma_max, 7.0)
    states = generate(backend, Sampler.from_solver("dpmpp2m", sigmas), seeds, prompts, decode=False)
    want = get_solver("dpmpp2m")(backend, seeded_noise(seeds, backend.shape, torch.float64) * float(sigmas[0]),
                                 sigmas, backend.encode_prompts(prompts))
    torch.testing.assert_close(states, want, rtol=0, atol=0)
    batches = list(generate_batches(backend, Sampler.from_table(table), seeds, prompts, batch=2))
    assert [b.seeds for b in batches] == [[0, 1], [2, 3], [4]] and batches[0].labels == [3, -1]


def test_flow_models_start_from_the_noise_itself():
    class Flow(Tiny):
        family = "flow"

    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(initial_state(Flow(), noise, 1.0), noise)
    assert torch.equal(initial_state(Tiny(), noise, 80.0), noise * 80.0)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        next(generate_batches(Tiny(), Sampler.from_solver("euler", np.array([80.0, 1.0])), [0], batch=0))


def test_a_failed_launch_leaves_no_run_folder(tmp_path, capsys):
    from training.distill.launch import main

    outdir = tmp_path / "exps"
    code = main(["--config", "configs/distill/gmm-nfe3.yaml", "--no-progress",
                 "--override", f"outdir={outdir}", "--override", "backend.name=tests.test_registry:make_tiny",
                 "--override", "schedule.kind=discrete"])
    assert code == 2 and "discrete needs a discrete-time model" in capsys.readouterr().err
    assert not outdir.exists() or not any(outdir.rglob("config.yaml"))
