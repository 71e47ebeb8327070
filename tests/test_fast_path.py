"""The fast sampling path on the CPU: torch.compile through the real backend code and sample.py, its one-line
fallbacks, the compile cache, and the pieces the GPU path's whole-loop graphs rest on (argument trees,
device constants made once, the sampler wrapper's bookkeeping)."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from backends.compile import CompiledCall, compile_unavailable, use_compile_cache
from backends.cuda_graphs import GraphedSampler, _flatten, _rebuild, error_summary, to_device
from backends.diffusers_base import PromptCondition
from backends.edm import EDMBackend
from backends.edm_checkpoint import save_edm
from backends.edm_networks import EDMPrecond
from solvers.core import as_tensor, reuse_device_constants
from solvers.epd import sample_epd
from solvers.table import save_table, uniform_table

needs_cxx = pytest.mark.skipif(compile_unavailable("cpu") is not None,
                               reason=f"inductor cannot compile on this CPU: {compile_unavailable('cpu')}")


def _micro_edm() -> EDMPrecond:
    """A class-conditional EDM network small enough to compile on two CPU cores in well under a minute."""
    torch.manual_seed(0)
    return EDMPrecond(8, 1, label_dim=3, model_type="SongUNet", model_channels=8, channel_mult=(1,), num_blocks=1,
                      attn_resolutions=(), channel_mult_emb=2, dropout=0.0).eval()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One compile cache for the module, as a user's .cache/compile: later compilations of the same graphs
    find it filled."""
    before = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    folder = use_compile_cache(tmp_path_factory.mktemp("compile-cache"))
    yield folder
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@needs_cxx
def test_compiled_edm_backend_and_sample_py_match_eager(tmp_path, compile_cache, capsys):
    """sample.py --compile on an EDM network (the real loader, backend and CompiledCall) writes the images of
    the eager run, and the compiled backend's calls equal the eager ones to float32 rounding."""
    net = _micro_edm()
    weights = save_edm(net, tmp_path / "micro.safetensors")
    grid = np.geomspace(80.0, 0.02, 4)
    table = uniform_table(grid, num_points=2, backend="edm")
    table_path = save_table(table, tmp_path / "table.pkl")
    common = ["--predictor_path", str(table_path), "--backend", "edm", "--model_path", str(weights),
              "--seeds", "0-2", "--class", "1", "--device", "cpu", "--no-subdirs"]
    assert sample.main(common + ["--outdir", str(tmp_path / "eager")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)          # a silent fallback to eager would fail here
        assert sample.main(common + ["--outdir", str(tmp_path / "fast"), "--compile",
                                     "--compile-cache", str(compile_cache)]) == 0
    assert "first batch in" in capsys.readouterr().out
    for seed in range(3):
        eager = np.asarray(Image.open(tmp_path / "eager" / f"{seed:06d}.png"), dtype=np.int16)
        fast = np.asarray(Image.open(tmp_path / "fast" / f"{seed:06d}.png"), dtype=np.int16)
        assert np.abs(eager - fast).max() <= 1                  # uint8 rounding of float32-equal states
    assert any(compile_cache.rglob("*")), "the compile cache stayed empty"

    eager_backend, fast_backend = EDMBackend(net), EDMBackend(net, compile=True)
    x = torch.randn(3, 1, 8, 8) * 80.0
    labels = torch.tensor([0, 2, -1])
    with torch.no_grad():
        reference = sample_epd(eager_backend, x, table, labels)
        compiled = sample_epd(fast_backend, x, table, labels)
    assert fast_backend._net_call.active
    assert torch.allclose(compiled, reference, rtol=1e-4, atol=1e-4)


def test_compile_falls_back_to_eager_with_one_warning():
    def breaks_graph(x):
        if x.sum() > 0:          # a data-dependent branch: no full graph exists
            return x * 2
        return x * 3

    call = CompiledCall(breaks_graph, name="the test function", device="cpu")
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="torch.compile of the test function is not used: compilation failed"):
        assert torch.equal(call(x), x * 2)
    assert not call.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(call(-x), -x * 3)                    # eager from then on, without more warnings


def test_compile_unavailable_without_a_compiler(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in compile_unavailable("cpu")
    with pytest.warns(RuntimeWarning, match="no C.. compiler on the PATH"):
        call = CompiledCall(lambda x: x + 1, name="f", device="cpu")
    assert torch.equal(call(torch.zeros(2)), torch.ones(2)) and not call.active
    assert compile_unavailable("mps") is not None


def test_compile_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = use_compile_cache(tmp_path / "a" / "b")
    assert folder.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
    monkeypatch.setenv("EPD_COMPILE_CACHE", str(tmp_path / "env"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_compile_cache() == tmp_path / "env"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        use_compile_cache(blocker / "cache")


def test_sample_py_compile_flags_are_checked(tmp_path, capsys):
    assert sample.main(["--backend", "digits", "--solver", "euler", "--steps", "3", "--compile",
                        "--outdir", str(tmp_path)]) == 2
    assert "--compile applies to network backends" in capsys.readouterr().err
    assert sample.main(["--backend", "digits", "--solver", "euler", "--steps", "3", "--compile-cache",
                        str(tmp_path), "--outdir", str(tmp_path)]) == 2
    assert "give --compile too" in capsys.readouterr().err


# --- what the whole-loop graphs rest on ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Cond:
    embeds: torch.Tensor
    pooled: torch.Tensor | None
    prompts: tuple = ()


def test_argument_trees_flatten_and_rebuild():
    cond = _Cond(torch.ones(2, 3), None, ("a", "b"))
    leaves: list = []
    structure = _flatten((torch.zeros(1), cond, {"k": [torch.ones(1), 2.5, "s"]}), leaves)
    assert len(leaves) == 3
    hash(structure)                                            # usable as a graph signature
    rebuilt = _rebuild((torch.zeros(1), cond, {"k": [torch.ones(1), 2.5, "s"]}),
                       iter([torch.full((1,), 7.0), torch.full((2, 3), 8.0), torch.full((1,), 9.0)]))
    assert rebuilt[1].prompts == ("a", "b") and rebuilt[1].pooled is None
    assert float(rebuilt[1].embeds[0, 0]) == 8.0 and float(rebuilt[2]["k"][0]) == 9.0 and rebuilt[2]["k"][1] == 2.5
    other: list = []
    assert _flatten((torch.zeros(2), cond, {"k": [torch.ones(1), 2.5, "s"]}), other) != structure   # shape counts
    moved = to_device(PromptCondition(embeds=torch.ones(1, 2), prompts=("p",)), torch.device("cpu"))
    assert moved.prompts == ("p",) and torch.equal(moved.embeds, torch.ones(1, 2))


def test_device_constants_are_made_once_per_value():
    like = torch.zeros(1)
    table = np.array([[0.25, 0.5], [0.75, 1.0]])
    outside = as_tensor(table, like)
    assert as_tensor(table, like) is not outside               # no memo outside the block
    with reuse_device_constants() as memo:
        first = as_tensor(table, like)
        assert as_tensor(table.copy(), like) is first          # the same value: the same device tensor
        assert as_tensor(table + 1, like) is not first         # another value: another copy
        assert as_tensor(torch.tensor([1.0, 2.0]), like) is as_tensor([1.0, 2.0], like)
        with reuse_device_constants() as inner:                # nested blocks share one memo
            assert inner is memo and as_tensor(table, like) is first
    assert len(memo) == 3 and torch.equal(first, torch.tensor(table, dtype=torch.float32))
    weights = torch.ones(2, requires_grad=True)
    with reuse_device_constants():
        assert as_tensor(weights, torch.zeros(1, dtype=torch.float64)).requires_grad is False
    assert as_tensor(weights, like).requires_grad              # gradients flow outside capture blocks


def test_graphed_sampler_off_cuda_is_the_sampler():
    seen = []

    def sampler(x, cond):
        seen.append(cond)
        return x * 2

    graphed = GraphedSampler(sampler)
    cond = PromptCondition(embeds=torch.ones(1, 2), prompts=("a prompt",))
    assert torch.equal(graphed(torch.ones(3), cond), torch.full((3,), 2.0))
    assert seen[0] is cond and graphed.replays == 0             # CPU: called as it is, prompts kept


def test_error_summary_skips_the_wrapper_line():
    err = RuntimeError("backend='inductor' raised:\nLoweringException: no lowering for foo\n  more")
    assert error_summary(err) == "RuntimeError: LoweringException: no lowering for foo"
    assert error_summary(ValueError("")) == "ValueError: "


def test_compile_needs_the_pipeline_on_the_gpu():
    from backends import backend_from_pipeline
    from backends.testing.random_init import build_pipeline

    pipe = build_pipeline("sd15", "tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)
    pipe.unet._hf_hook = object()                               # what accelerate's offload leaves behind
    with pytest.raises(ValueError, match="offload none"):
        backend_from_pipeline(pipe, resolution=32, compile=True)
    del pipe.unet._hf_hook
    backend = backend_from_pipeline(pipe, resolution=32, compile=True)
    assert backend.compiled and backend.graphs is not None and len(backend._text_graphs) == 1
    with torch.no_grad():
        backend.encode_prompts(["a cat"])
    assert "forward" not in pipe.text_encoder.__dict__          # the pipeline's own module is left as it was


def test_ci_has_a_cxx_compiler():
    """CI must be able to compile (.ci/run installs g++ where it is missing); skip only outside CI."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI a missing compiler only skips the compile test")
    assert shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
