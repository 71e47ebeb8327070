"""Bring your own model (backends/adapters.py, docs/backends/own_model.md).

End to end through the string form ``own_model_example:make_backend`` (tests/own_model_example.py: a tiny random
epsilon CNN on linear betas, weights in a tmp ``.safetensors``): sample.py, the benchmark on the model's own
discrete grid, and a short distillation whose table samples without ``--backend``. Then the adapters themselves:
exact prediction conversions, the index convention, EDM preconditioning, flow D, guidance rows, chunking, the
contract check and the weights loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backends import check_backend, load_backend
from backends.adapters import (DiscreteVPBackend, EDMDenoiserBackend, FlowBackend, edm_preconditioning,
                               load_state_dict_network)
from solvers.core import seeded_noise
from solvers.schedules import VPDiscreteMap, discrete_sigmas, make_sigmas
from solvers.table import load_table

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent          # holds own_model_example.py, the user's module
FACTORY = "own_model_example:make_backend"
BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def example():
    """The user's module, imported from its folder put on sys.path (as PYTHONPATH does for the CLIs)."""
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(HERE))
    import own_model_example

    yield own_model_example
    patch.undo()


@pytest.fixture(scope="module")
def weights(example, tmp_path_factory) -> Path:
    """A random TinyEpsNet state dict (weights halved so the samples stay tame) in a .safetensors file."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = example.TinyEpsNet()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    path = tmp_path_factory.mktemp("own_model") / "net.safetensors"
    save_file(net.state_dict(), str(path))
    return path


def _env() -> dict:
    path = os.pathsep.join([str(HERE), str(ROOT)])
    return {"PYTHONPATH": path, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def _sidecars(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


# -- the factory string, end to end ------------------------------------------------------------------------------
def test_factory_string_builds_a_discrete_vp_backend(example, weights):
    backend = load_backend(FACTORY, model_path=str(weights), device="cpu")
    assert isinstance(backend, DiscreteVPBackend) and check_backend(backend) is backend
    np.testing.assert_allclose(backend.alphas_cumprod, ALPHAS_CUMPROD, rtol=1e-12)
    vp = VPDiscreteMap(ALPHAS_CUMPROD)
    assert backend.sigma_min == pytest.approx(vp.sigma_min) and backend.sigma_max == pytest.approx(vp.sigma_max)
    assert 0.0099 < backend.sigma_min < 0.0101 and 150 < backend.sigma_max < 160
    assert backend.condition_kind == "none" and backend.encode_prompts(["", ""]) is None
    assert backend.default_schedule(5).kind == "discrete"
    info = backend.describe()
    assert info["file_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["adapter"] == "DiscreteVPBackend" and info["prediction_type"] == "epsilon"
    x = seeded_noise(range(3), backend.shape) * 10
    assert backend(x, 10.0).shape == x.shape
    with pytest.raises(ValueError, match="does not take option"):
        load_backend(FACTORY, model_path=str(weights), resolution=64)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_backend(FACTORY, model_path=str(weights.parent / "nowhere.safetensors"))


def test_sample_cli_with_factory_string(example, weights, tmp_path):
    out = tmp_path / "samples"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--backend", FACTORY, "--model_path", str(weights),
           "--solver", "euler", "--steps", "6", "--seeds", "0-3", "--outdir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.rglob("*.png"))) == 4
    sidecars = _sidecars(out)
    assert len(sidecars) == 4 and {s["seed"] for s in sidecars} == {0, 1, 2, 3}
    for sidecar in sidecars:
        assert sidecar["backend"] == FACTORY and sidecar["backend_config"]["model_path"] == str(weights)
        # the default grid of a discrete-time model is its own discrete grid
        np.testing.assert_allclose(sidecar["sigmas"], discrete_sigmas(7, ALPHAS_CUMPROD).numpy(), rtol=1e-9)


def test_bench_with_factory_string_uses_the_models_own_discrete_grid(example, weights, tmp_path, monkeypatch):
    import bench.exact as bench
    import solvers.schedules as schedules

    backend = load_backend(FACTORY, model_path=str(weights), device="cpu")
    original = schedules.discrete_sigmas
    calls: list[tuple] = []

    def recording(num_steps, alphas_cumprod=None, *args, **kwargs):
        grid = original(num_steps, alphas_cumprod, *args, **kwargs)
        calls.append((None if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64), grid))
        return grid

    monkeypatch.setattr(schedules, "discrete_sigmas", recording)
    monkeypatch.setattr(bench, "discrete_sigmas", recording, raising=False)
    monkeypatch.chdir(tmp_path)
    report_path = tmp_path / "bench.json"
    rc = bench.main(["--model", FACTORY, "--model-path", str(weights), "--device", "cpu",
                     "--schedules", "polynomial,discrete", "--solvers", "euler,dpmpp2m", "--nfe", "4,6",
                     "--num-samples", "8", "--batch", "8", "--ref-steps", "64", "--json", str(report_path),
                     "--no-cache"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["model"] == FACTORY
    specs = {s["kind"]: s for s in report["schedules"]}
    assert set(specs) == {"polynomial", "discrete"}
    assert specs["discrete"]["sigma_max"] == pytest.approx(backend.sigma_max)       # 157, not SD1.5's 14.6
    rows = report["results"]
    assert sorted((r["solver"], r["nfe"], r["schedule"]["kind"]) for r in rows) == sorted(
        (s, n, k) for s in ("euler", "dpmpp2m") for n in (4, 6) for k in ("polynomial", "discrete"))
    assert all(np.isfinite(r["rmse"]) and r["rmse"] > 0 for r in rows)
    # a model without a data set: no Frechet distance anywhere; the reference is a fine solve on the network
    assert all(r["fd"] is None for r in rows)
    assert all(v is None for v in (report["reference"].get("fd_to_data") or {}).values())
    assert report["reference"]["steps"] == 64 and "check_rmse_diff" in report["reference"]
    # every discrete grid is built from the model's alphas_cumprod, never Stable Diffusion 1.5's default
    assert calls, "the benchmark built no discrete grid"
    for alphas, grid in calls:
        assert alphas is not None, "a discrete grid fell back to SD1.5's alphas_cumprod"
        np.testing.assert_array_equal(alphas, backend.alphas_cumprod)
        torch.testing.assert_close(grid, original(len(grid), backend.alphas_cumprod), rtol=1e-12, atol=0)
        assert not torch.allclose(grid, original(len(grid)), rtol=1e-3)


def test_distill_from_yaml_then_sample_the_table_without_backend(example, weights, tmp_path, monkeypatch):
    from training.distill.launch import main as launch

    import sample

    monkeypatch.chdir(tmp_path)
    export = tmp_path / "own-nfe3.pkl"
    config = tmp_path / "own.yaml"
    config.write_text(f"""
name: own-nfe3
outdir: {tmp_path / 'exps'}
backend: {{name: "{FACTORY}", model_path: "{weights}"}}
schedule: {{kind: discrete, rho: 1.0}}
student: {{solver: epd, num_steps: 3, num_points: 2, afs: true, scale_dir: 0.1, scale_time: 0.1}}
teacher: {{solver: heun, M: 3, cache: null}}
optim: {{lr: 0.05}}
batch: 4
total_kimg: 0.012
validation: {{num: 8, every: 2, batch: 8, reference: {{solver: dpmpp3m, steps: 16}}, cache: null}}
compare: {{solvers: [euler, dpmpp2m]}}
plot: false
export: {export}
""")
    assert launch(["--config", str(config), "--no-progress"]) == 0
    table = load_table(export)
    assert table.metadata["backend"] == FACTORY
    assert table.metadata["backend_config"] == {"model_path": str(weights)}
    assert table.metadata["training"]["iterations"] == 3 and table.num_steps == 3
    np.testing.assert_allclose(np.asarray(table.sigmas, dtype=np.float64),
                               discrete_sigmas(3, ALPHAS_CUMPROD).numpy(), rtol=1e-9)

    out = tmp_path / "table-samples"
    assert sample.main(["--predictor_path", str(export), "--seeds", "0-1", "--outdir", str(out)]) == 0
    sidecars = _sidecars(out)
    assert len(sidecars) == 2 and len(list(out.rglob("*.png"))) == 2
    for sidecar in sidecars:
        assert sidecar["backend"] == FACTORY and sidecar["solver"] == "epd"
        assert sidecar["table"]["path"] == str(export) and sidecar["nfe"]["sequential"] == 3


# -- the adapters ------------------------------------------------------------------------------------------------
SIGMAS = torch.tensor([0.02, 0.5, 3.7, 40.0, 150.0], dtype=torch.float64)


def _oracle(prediction_type: str, x0: torch.Tensor, vp: VPDiscreteMap):
    """The network that predicts exactly for the data point ``x0``: from ``x_vp = alpha x`` at index t it
    recovers sigma, then eps = (x - x0)/sigma, and returns eps, v = alpha eps - alpha sigma x0, or x0."""
    def network(x_vp: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(vp.sigma((t.double().numpy() + 1) / vp.num_train_timesteps)).reshape(-1, 1, 1, 1)
        alpha = 1 / (1 + sigma ** 2).sqrt()
        eps = (x_vp / alpha - x0) / sigma
        return {"epsilon": eps, "v_prediction": alpha * eps - alpha * sigma * x0, "sample": x0.expand_as(x_vp)}[
            prediction_type]
    return network


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_are_exact(prediction_type):
    x0 = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vp = VPDiscreteMap(ALPHAS_CUMPROD)
    backend = DiscreteVPBackend(_oracle(prediction_type, x0, vp), betas=BETAS, prediction_type=prediction_type,
                                shape=(1, 4, 4), dtype=torch.float64)
    check_backend(backend)
    noise = torch.randn(len(SIGMAS), 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = x0 + SIGMAS.reshape(-1, 1, 1, 1) * noise
    torch.testing.assert_close(backend(x, SIGMAS), x0.expand_as(x), rtol=1e-9, atol=1e-9)


def test_timestep_input_follows_the_index_convention():
    seen: list[torch.Tensor] = []

    def network(x_vp, t, cond=None):
        seen.append(t.clone())
        return torch.zeros_like(x_vp)

    n = np.array([0, 1, 500, 999])
    sigma_n = torch.tensor(np.sqrt((1 - ALPHAS_CUMPROD[n]) / ALPHAS_CUMPROD[n]))
    x = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    for timestep_input, expected in (("index", n), ("unit", (n + 1) / 1000), (lambda i: i / 1000, n / 1000)):
        backend = DiscreteVPBackend(network, alphas_cumprod=ALPHAS_CUMPROD, shape=(1, 2, 2),
                                    timestep_input=timestep_input)
        backend(x, sigma_n)
        assert seen[-1].dtype == torch.float32
        np.testing.assert_allclose(seen[-1].numpy(), expected, rtol=1e-5, atol=1e-4)
    backend = DiscreteVPBackend(network, alphas_cumprod=ALPHAS_CUMPROD, shape=(1, 2, 2))
    assert backend.sigma_min == pytest.approx(float(sigma_n[0]))          # t = 0
    assert backend.sigma_max == pytest.approx(float(sigma_n[-1]))         # t = N-1
    with pytest.raises(ValueError, match="exactly one of betas and alphas_cumprod"):
        DiscreteVPBackend(network, betas=BETAS, alphas_cumprod=ALPHAS_CUMPROD, shape=(1, 2, 2))
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteVPBackend(network, betas=BETAS, shape=(1, 2, 2), prediction_type="flow")


def test_edm_preconditioning_equals_edm_networks():
    from backends.edm_networks import tiny_precond

    net = tiny_precond("EDMPrecond", "SongUNet", img_resolution=8, img_channels=1, label_dim=0, seed=3)
    raw = EDMDenoiserBackend(lambda x, c_noise, cond: net.model(x, c_noise, class_labels=None), shape=(1, 8, 8))
    wrapped = EDMDenoiserBackend(lambda x, sigma, cond: net(x, sigma), shape=(1, 8, 8), preconditioned=True)
    assert raw.prediction_type == "edm" and wrapped.prediction_type == "sample"
    x = seeded_noise(range(4), (1, 8, 8)) * 3
    sigma = torch.tensor([0.01, 0.5, 2.0, 50.0])
    with torch.no_grad():
        expected = net(x, sigma)
        torch.testing.assert_close(raw(x, sigma), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrapped(x, sigma), expected)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(torch.tensor(0.5), 0.5)       # at sigma = sigma_data
    assert (float(c_skip), float(c_out), float(c_in)) == pytest.approx((0.5, 0.5 / 2 ** 0.5, 2 ** 0.5))
    assert float(c_noise) == pytest.approx(np.log(0.5) / 4)


def test_flow_backend_is_x_minus_sigma_v():
    seen: list[torch.Tensor] = []

    def velocity(x, t, cond=None):
        seen.append(t.clone())
        return 0.5 * x + t.reshape(-1, 1, 1, 1) / 1000

    backend = check_backend(FlowBackend(velocity, shape=(1, 4, 4), shift=3.0))
    assert backend.family == "flow" and backend.flow and backend.prediction_type == "flow"
    assert backend.sigma_max == 1.0 and backend.sigma_min == pytest.approx(3e-3 / (1 + 2e-3))
    assert backend.flow_shift() == (3.0, None)
    spec = backend.default_schedule(5)
    assert spec.kind == "flowmatch" and spec.shift == 3.0
    grid = make_sigmas(spec)
    assert float(grid[0]) == pytest.approx(1.0) and float(grid[-1]) == pytest.approx(backend.sigma_min)
    x = seeded_noise(range(3), (1, 4, 4))
    sigma = torch.tensor([0.9, 0.4, 0.05])
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(backend(x, sigma), x - s * (0.5 * x + s))
    torch.testing.assert_close(seen[-1], 1000 * sigma)


def _label_network(calls: list):
    """Outputs the label (+2) it was given, everywhere: guidance arithmetic becomes visible."""
    def network(x, t, labels):
        calls.append(labels.clone())
        return (labels.float() + 2).reshape(-1, *([1] * (x.ndim - 1))).expand_as(x).clone()
    return network


def test_guidance_is_one_batched_call_over_uncond_and_cond():
    calls: list[torch.Tensor] = []
    backend = DiscreteVPBackend(_label_network(calls), betas=BETAS, prediction_type="sample", shape=(1, 2, 2),
                                num_classes=10, guidance=3.0)
    assert backend.condition_kind == "label" and backend.guided and backend.config() == {"guidance": 3.0}
    labels = backend.encode_prompts(["2", "", "5"])
    assert labels.tolist() == [2, -1, 5]
    out = backend(torch.zeros(3, 1, 2, 2), 1.0, labels)
    assert len(calls) == 1 and calls[0].tolist() == [-1, -1, -1, 2, -1, 5]
    # D = D_u + g (D_c - D_u), D_u = 1 (label -1): 1 + 3 (4 - 1), 1, 1 + 3 (7 - 1)
    assert out[:, 0, 0, 0].tolist() == [10.0, 1.0, 19.0]
    backend(torch.zeros(3, 1, 2, 2), 1.0, None)                   # all unconditional: one plain call
    assert calls[-1].tolist() == [-1, -1, -1]
    nulled = DiscreteVPBackend(_label_network(calls), betas=BETAS, prediction_type="sample", shape=(1, 2, 2),
                               num_classes=10, guidance=3.0, null_label=10)
    nulled(torch.zeros(2, 1, 2, 2), 1.0, torch.tensor([4, -1]))
    assert calls[-1].tolist() == [10, 10, 4, 10]
    with pytest.raises(ValueError, match="0..9"):
        backend.encode_prompts(["12"])
    with pytest.raises(ValueError, match="class-conditional"):
        DiscreteVPBackend(_label_network(calls), betas=BETAS, shape=(1, 2, 2), guidance=2.0)


def test_max_batch_chunking_equals_one_call(example):
    torch.manual_seed(4)
    net = example.TinyEpsNet()
    sizes: list[int] = []

    def network(x, t, labels):
        sizes.append(x.shape[0])
        return net(x, t + labels.float())        # the label shifts the time input: rows differ per class

    kwargs = dict(betas=BETAS, shape=example.SHAPE, num_classes=3, guidance=2.0)
    chunked = DiscreteVPBackend(network, max_batch=3, **kwargs)
    whole = DiscreteVPBackend(network, **kwargs)
    x = seeded_noise(range(7), example.SHAPE) * 4
    sigma = torch.linspace(0.1, 20, 7)
    labels = torch.tensor([0, 1, 2, -1, 0, 1, 2])
    with torch.no_grad():
        expected = whole(x, sigma, labels)
        assert sizes == [14]
        sizes.clear()
        torch.testing.assert_close(chunked(x, sigma, labels), expected, rtol=1e-6, atol=1e-6)
    assert sizes == [3, 3, 3, 3, 2]


def test_check_backend_names_missing_members():
    class HalfBackend:
        name, family, prediction_type, condition_kind = "half", "ve", "epsilon", "none"

        def __call__(self, x, sigma, cond=None):
            return x

    with pytest.raises(TypeError) as err:
        check_backend(HalfBackend(), "my model")
    message = str(err.value)
    assert "my model" in message and "HalfBackend" in message
    for member in ("shape", "sigma_min", "alphas_cumprod", "encode_prompts", "decode", "default_schedule"):
        assert member in message
    assert "name," not in message.split("missing")[1]       # present members are not listed


def test_load_state_dict_network_formats_and_refusals(example, tmp_path):
    torch.manual_seed(5)
    net = example.TinyEpsNet()
    state = net.state_dict()
    x, t = torch.randn(2, *example.SHAPE), torch.tensor([3.0, 700.0])
    torch.save(state, tmp_path / "net.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("net.pt", "wrapped.pth"):
        loaded = load_state_dict_network(example.TinyEpsNet, tmp_path / name, device="cpu")
        assert not loaded.training and loaded.weights_info["path"] == str((tmp_path / name).resolve())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t), net(x, t))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_state_dict_network(example.TinyEpsNet, tmp_path / "missing.safetensors")
    torch.save({"weights": state, "builder": example.TinyEpsNet}, tmp_path / "code.pt")      # pickles a class
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_network(example.TinyEpsNet, tmp_path / "code.pt")
    (tmp_path / "net.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_state_dict_network(example.TinyEpsNet, tmp_path / "net.ckpt")
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        load_state_dict_network(lambda: example.TinyEpsNet(width=8), tmp_path / "net.pt")
