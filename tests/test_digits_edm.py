"""The embedded digits network (backends/digits_edm.py): its training script, backend, sampling, distillation
configs and benchmark reference. Tests that need a network run on a tiny random one and, when it is in the
repository, on the committed exps/digits_edm/network.safetensors too (never skipped when it is present)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from backends import BACKENDS, load_backend
from backends.digits_edm import DEFAULT_NETWORK, ENV_VAR, HELDOUT, digits_images, digits_split, load_digits_edm
from backends.edm_checkpoint import load_edm, save_edm
from backends.edm_networks import tiny_precond
from solvers.core import seeded_noise

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_network(tmp_path_factory):
    """A 16x16, 10-class SongUNet EDMPrecond with every weight random (so labels matter), saved by save_edm."""
    net = tiny_precond("EDMPrecond", "SongUNet", img_resolution=16, img_channels=1, label_dim=10, seed=3)
    return save_edm(net, tmp_path_factory.mktemp("digits_edm") / "network.safetensors")


@pytest.fixture(params=["tiny", "committed"])
def network(request, tiny_network):
    if request.param == "committed":
        if not DEFAULT_NETWORK.is_file():
            pytest.skip(f"{DEFAULT_NETWORK} is not in this checkout")
        return DEFAULT_NETWORK
    return tiny_network


def _train_script():
    spec = importlib.util.spec_from_file_location("train_digits_edm", ROOT / "scripts" / "train_digits_edm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_split():
    images, labels = digits_images()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= -1 and float(images.max()) <= 1 and labels.shape == (1797,)
    split = digits_split()
    assert len(split["train"][0]) == 1500 and len(split["heldout"][0]) == HELDOUT == 297
    assert torch.equal(split["heldout"][0], images[-297:])


def test_training_script_writes_loadable_weights_log_card_and_resumes(tmp_path, capsys):
    script = _train_script()
    out = tmp_path / "run"
    common = ["--out", str(out), "--tiny", "--batch", "8", "--device", "cpu", "--log-every", "2", "--eval-every", "100",
              "--eval-repeats", "1",
              "--checkpoint-every", "2", "--card-samples", "4", "--sample-steps", "2", "--no-progress"]
    assert script.main(common + ["--steps", "4"]) == 0
    for name in ("network.safetensors", "train-log.jsonl", "loss.png", "samples.png", "MODEL_CARD.md", "checkpoint.pt"):
        assert (out / name).is_file(), name
    net, config = load_edm(out / "network.safetensors")
    assert config["class_name"] == "EDMPrecond" and net.label_dim == 10 and net.img_resolution == 16
    assert config["source"]["steps"] == 4 and config["source"]["weights"] == "EMA"
    records = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    card = (out / "MODEL_CARD.md").read_text()
    assert "4 steps" in card and "parameters" in card and "samples.png" in card and "loss.png" in card

    # a second run continues from the checkpoint and its log continues the step count
    assert script.main(common + ["--steps", "6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "train-log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert load_edm(out / "network.safetensors")[1]["source"]["steps"] == 6
    info = json.loads((out / "train-info.json").read_text())
    assert info["training"]["steps"] == 6 and info["training"]["seconds"] > 0


def test_backend_shapes_and_class_conditioning(network):
    backend = load_backend("digits_edm", model_path=str(network), device="cpu")
    assert "digits_edm" in BACKENDS and backend.shape == (1, 16, 16) and backend.name == "digits_edm"
    assert backend.sigma_min == 0.002 and backend.sigma_max == 80.0 and backend.state_dtype == torch.float32
    # prompts follow the analytic digits backend
    digits = load_backend("digits")
    prompts = ["3", "", "a handwritten 7", "0"]
    assert torch.equal(backend.encode_prompts(prompts), digits.encode_prompts(prompts))
    with pytest.raises(ValueError):
        backend.encode_prompts(["seven"])
    x = seeded_noise(range(4), backend.shape) * 2.0
    sigma = torch.tensor([2.0, 2.0, 0.5, 0.5])
    a = backend(x, sigma, torch.tensor([1, 1, 1, 1]))
    b = backend(x, sigma, torch.tensor([8, 8, 8, 8]))
    none = backend(x, sigma, None)
    assert a.shape == x.shape and a.dtype == x.dtype and bool(torch.isfinite(a).all())
    assert float((a - b).abs().amax(dim=(1, 2, 3)).min()) > 1e-4          # the label changes every image
    assert torch.allclose(none, backend(x, sigma, torch.full((4,), -1)))    # None = label -1 = unconditional
    # classifier-free guidance: labelled rows change, unconditional rows do not
    guided = load_backend("digits_edm", model_path=str(network), device="cpu", guidance=2.0)
    labels = torch.tensor([1, -1, 1, -1])
    out = guided(x, sigma, labels)
    plain = backend(x, sigma, labels)
    assert torch.allclose(out[[1, 3]], plain[[1, 3]], atol=1e-6)
    assert torch.allclose(out[[0, 2]], 2 * plain[[0, 2]] - none[[0, 2]], atol=1e-5)


def test_default_network_and_missing_file_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "network.safetensors"
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere/network.safetensors"):
        load_backend("digits_edm")
    monkeypatch.delenv(ENV_VAR)
    if DEFAULT_NETWORK.is_file():      # the committed network is the default, and a few MB at most
        backend = load_backend("digits_edm", device="cpu")
        assert backend.shape == (1, 16, 16) and DEFAULT_NETWORK.stat().st_size < 8e6
        assert backend.describe()["parameters"] <= 2_000_000
    else:
        with pytest.raises(FileNotFoundError, match="exps/digits_edm/network.safetensors"):
            load_backend("digits_edm")


def test_sample_cli_writes_images(network, tmp_path):
    import sample

    out = tmp_path / "samples"
    rc = sample.main(["--backend", "digits_edm", "--model_path", str(network), "--solver", "dpmpp2m", "--steps", "3",
                      "--prompt", "3", "--seeds", "0-3", "--outdir", str(out), "--device", "cpu", "--no-subdirs",
                      "--grid"])
    assert rc == 0
    from PIL import Image

    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    assert Image.open(out / "000000.png").size == (64, 64)      # 16x16, saved 4x like the 8x8 digits are 8x
    sidecar = json.loads((out / "000002.json").read_text())
    assert sidecar["class_label"] == 3 and sidecar["backend"] == "digits_edm" and sidecar["nfe"]["sequential"] == 3


def test_distill_configs_and_a_short_run(tiny_network, tmp_path, monkeypatch):
    from training.distill.config import load_config
    from training.distill.trainer import train

    for n, steps in ((3, 3), (5, 4), (7, 5), (9, 6)):
        config = load_config(ROOT / "configs" / "distill" / f"digits_edm-nfe{n}.yaml")
        assert config.backend.name == "digits_edm" and int(config.student.num_steps) == steps
        assert config.outdir == "exps/digits_edm" and config.export == f"exps/digits_edm/epd-nfe{n}.pkl"
    monkeypatch.setenv(ENV_VAR, str(tiny_network))
    overrides = [f"outdir={tmp_path}", f"export={tmp_path / 'epd.pkl'}", "batch=4", "total_kimg=0.008", "teacher.M=1",
                 "teacher.cache=null", "teacher.precompute=0", "device=cpu", "validation.num=0"]
    table, folder = train(ROOT / "configs" / "distill" / "digits_edm-nfe3.yaml", overrides, progress=False)
    assert table.metadata["backend"] == "digits_edm" and table.metadata["backend_config"] == {}
    assert table.eval_count().sequential == 3 and (tmp_path / "epd.pkl").is_file()
    import sample

    rc = sample.main(["--predictor_path", str(tmp_path / "epd.pkl"), "--seeds", "0-1", "--prompt", "5",
                      "--outdir", str(tmp_path / "s"), "--device", "cpu", "--no-subdirs"])
    assert rc == 0 and (tmp_path / "s" / "000001.png").is_file()


def test_bench_on_the_network(tiny_network, tmp_path):
    from bench.exact import markdown, run_benchmark
    from solvers.schedules import ScheduleSpec, make_sigmas
    from solvers.table import save_table, uniform_table

    spec = ScheduleSpec(kind="polynomial", num_steps=3, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    table = save_table(uniform_table(make_sigmas(spec), 2, (0.335, 0.665), spec, afs=True), tmp_path / "uni.pkl")
    report = run_benchmark("digits_edm", ["euler", "dpmpp3m"], [3], num_samples=6, tables={"uni": str(table)},
                           cache_dir=None, progress=False, ref_steps=16,
                           model_options={"model_path": str(tiny_network), "device": "cpu"})
    ref = report["reference"]
    assert ref["steps"] == 16 and ref["check_steps"] == 8 and "network" in ref and "fd_to_data" in ref
    rows = {r["solver"]: r for r in report["results"]}
    assert set(rows) == {"euler", "dpmpp3m", "uni"} and rows["uni"]["nfe"] == 3 and rows["euler"]["nfe"] == 3
    assert all(r["rmse"] > 0 and math.isfinite(r["fd"]) for r in rows.values())
    text = markdown(report)
    assert "RMSE to the reference ODE endpoint" in text and "check against 8 steps" in text


def test_bench_reference_is_converged(network):
    """The fine reference barely moves when its step count doubles (on the trained network: at the benchmark's
    setting, far below any solver's error)."""
    from solvers.evaluate import REF_SOLVER, fine_reference

    backend = load_digits_edm(network, device="cpu")
    noise = seeded_noise(range(4), backend.shape, torch.float64)
    trained = network == DEFAULT_NETWORK
    steps = 128 if trained else 64
    _, report = fine_reference(backend, noise, 80.0, [0.002], REF_SOLVER, steps)
    # committed network: RMSE change < 1e-3 already at 64 -> 128 steps (the benchmark uses 128 -> 256);
    # the random tiny network is rougher, still under 2e-3 at 32 -> 64 steps
    assert report["check_rmse_diff"] < (1e-3 if trained else 2e-3), report


def test_precomputed_teacher_equals_the_trainers_own(tiny_network, tmp_path, monkeypatch):
    """scripts/distill_digits_edm.py fills the teacher cache with exactly what the trainer would compute (same key,
    ids, noise and grid); with one iteration per solve the states are identical."""
    spec = importlib.util.spec_from_file_location("distill_digits_edm", ROOT / "scripts" / "distill_digits_edm.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    from training.distill.config import load_config
    from training.distill.trainer import Distiller

    monkeypatch.setenv(ENV_VAR, str(tiny_network))
    overrides = ["batch=3", "total_kimg=0.006", "teacher.rtol=1e-2", "validation.num=0", f"teacher.cache={tmp_path / 'cache'}",
                 "device=cpu"]
    config = load_config(ROOT / "configs" / "distill" / "digits_edm-nfe3.yaml", overrides)
    filled = Distiller(config, tmp_path / "a", progress=False)
    assert driver.fill_teacher_cache(filled, 2, 3)[0] == 6
    fresh = Distiller(load_config(ROOT / "configs" / "distill" / "digits_edm-nfe3.yaml",
                                  overrides[:-2] + ["teacher.cache=null", "teacher.precompute=0", "device=cpu"]),
                       tmp_path / "b", progress=False)
    for iteration in (0, 1):
        ids = fresh.batch_ids(iteration)
        cached = filled.cache.get(ids)
        assert cached is not None and torch.equal(cached, fresh._batch(ids).targets)
    assert filled.cache.get(filled.batch_ids(2)) is None


def test_committed_artefacts_belong_to_the_committed_network():
    """The committed tables and benchmark were made with the committed network (same file hash), and the
    benchmark's reference was converged."""
    if not DEFAULT_NETWORK.is_file():
        pytest.skip(f"{DEFAULT_NETWORK} is not in this checkout")
    import hashlib

    from solvers.table import load_table

    sha = hashlib.sha256(DEFAULT_NETWORK.read_bytes()).hexdigest()
    folder = DEFAULT_NETWORK.parent
    assert (folder / "MODEL_CARD.md").is_file() and (folder / "train-log.jsonl").is_file()
    tables = sorted(folder.glob("epd-nfe*.pkl"))
    for path in tables:
        table = load_table(path)
        assert table.metadata["backend"] == "digits_edm" and table.metadata["model"]["file_sha256"] == sha, path
    report_path = ROOT / "docs" / "bench" / "digits_edm.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        assert report["reference"]["network"]["file_sha256"] == sha
        assert report["reference"]["converged"], report["reference"]
        assert {Path(r["table"]).name for r in report["results"] if "table" in r} == {p.name for p in tables}
