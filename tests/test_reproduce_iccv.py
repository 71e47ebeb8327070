"""scripts/reproduce_iccv.py: the ICCV Table-1 path (sample -> FID -> ours vs paper), offline on the CPU.

FID uses a random-weight Inception (pytorch_fid's architecture, He-scaled so features carry signal) and a
reference .npz written by the score_fid CLI from a few real digits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from backends.analytic import load_digits_data
from scripts import reproduce_iccv as ri
from solvers.epd import sample_epd
from solvers.registry import eval_count, get_solver
from solvers.schedules import make_sigmas
from solvers.table import load_table
from training.rewards import fid
from training.rewards import pretrained as weights

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official" / "iccv"
HAVE_OFFICIAL = len(list(OFFICIAL.glob("000[0-3][0-9]-*.pkl"))) == 32
needs_official = pytest.mark.skipif(not HAVE_OFFICIAL, reason=f"the authors' released ICCV tables are not at "
                                    f"{OFFICIAL} (CI keeps shared/official/ beside the clone)")
SPEC = ROOT.parent / "shared" / "spec" / "reference-behaviour.md"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
BASELINES = [k for k, m in ri.METHODS.items() if m.solver is not None]


@pytest.fixture(autouse=True)
def _no_weight_env(monkeypatch):
    for item in weights.MANIFEST.values():
        monkeypatch.delenv(item.env, raising=False)
    monkeypatch.delenv(ri.TABLES_ENV, raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inception_file) -> Path:
    """Statistics (with features) of a folder of 8 real digits (what ``score_fid --save-stats --save-features``
    writes; that CLI is tested in test_rewards_eval), with the script's cached extractor."""
    root = tmp_path_factory.mktemp("ref")
    images, _ = load_digits_data()
    (root / "images").mkdir()
    for i in range(8):
        array = ((images[i * 97, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).save(root / "images" / f"{i:04d}.png")
    feats = fid.compute_features(root / "images", extractor=ri.get_extractor(inception_file, "cpu"))
    npz = fid.save_statistics(root / "digits-ref.npz", *fid.statistics_from_features(feats), features=feats)
    ref = fid.load_reference(npz)
    assert ref.count == 8 and ref.mu.shape == (2048,)
    return npz


def _cell_args(out: Path, *extra: str) -> list[str]:
    return ["--dataset", "digits", "--outdir", str(out), "--device", "cpu", "--fid-device", "cpu", *extra]


# -- end to end ------------------------------------------------------------------------------------------------
def test_digits_cell_end_to_end_then_resume(tmp_path, inception_file, reference, capsys, monkeypatch):
    seen = {}
    real_features = fid.compute_features

    def spy(source, *a, **k):
        seen["paths"], seen["features"] = list(source), real_features(source, *a, **k)
        return seen["features"]

    monkeypatch.setattr(fid, "compute_features", spy)
    out = tmp_path / "results"
    args = _cell_args(out, "--method", "epd", "--nfe", "3", "--num-images", "16", "--batch", "6", "--ref",
                      str(reference), "--inception", str(inception_file), "--kid")
    assert ri.main(args) == 0
    captured = capsys.readouterr()
    cell = out / "digits" / "epd-nfe3"
    result = json.loads((cell / "fid.json").read_text())
    # the printed comparison line, and the small-count warning (docs/authors-code.md §9.33)
    assert [line for line in captured.out.splitlines() if line.startswith("ours ")] == \
        [f"ours {result['fid']:.2f} | paper n/a (digits, epd, NFE 3)"]
    assert "16 < 50000 images is biased upwards" in captured.err and result["warnings"]
    # images at the native 8x8 size (no viewing upscale), each sidecar from this cell's table at NFE 3
    pngs = sorted((cell / "images").glob("*/*.png"))
    assert [p.name for p in pngs] == [f"{s:06d}.png" for s in range(16)]
    assert {Image.open(p).size for p in pngs} == {(8, 8)}
    for p in pngs:
        meta = json.loads(p.with_suffix(".json").read_text())
        assert meta["solver"] == "epd" and meta["nfe"]["sequential"] == 3 and meta["afs"] is True
    # FID was taken over exactly these 16 files; two of them re-extracted independently give the same feature
    # rows, and the Frechet distance of the features, written out with numpy's general eigensolver, matches
    assert seen["paths"] == [cell / "images" / "000000" / f"{s:06d}.png" for s in range(16)]
    feats = seen["features"]
    assert feats.shape == (16, 2048)
    check = real_features([pngs[3], pngs[11]], extractor=fid.make_extractor(inception_file, "cpu"))
    np.testing.assert_allclose(check, feats[[3, 11]], rtol=1e-5, atol=1e-6)
    ref = fid.load_reference(reference)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    eig = np.linalg.eigvals(sigma @ ref.sigma)
    want = float(((mu - ref.mu) ** 2).sum() + np.trace(sigma) + np.trace(ref.sigma)
                 - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())
    # (rel 5e-5: the ~2030 eigenvalues of S S_ref that are 0 in exact arithmetic come out near 1e-13 in both
    # computations, differently, and their clipped square roots add up to a few 1e-5 to the sum, depending on the
    # images)
    assert result["fid"] == pytest.approx(want, rel=5e-5) and result["fid"] > 0
    assert result["kid_mean"] is not None and result["kid_std"] >= 0
    assert (result["nfe_sequential"], result["nfe_total"]) == (3, 5)
    assert result["table"]["path"].endswith("exps/digits/epd-nfe3.pkl") and result["table"]["afs"] is True
    assert result["paper"]["fid"] is None and result["difference"] is None
    assert result["images"] == {"dir": str(cell / "images"), "count": 16, "seeds": "0-15", "reused": 0,
                                "generated_this_run": 16}
    assert result["reference"] == {"path": str(reference), "count": 8}
    assert result["timing"]["processes"] == 1 and result["timing"]["fid_s"] > 0
    # resume (generation only, to spare a second Inception pass): nothing is generated or rewritten, and the
    # scored result stays as it was
    stamps = {p: p.stat().st_mtime_ns for p in [*cell.glob("images/*/*"), cell / "fid.json"]}
    assert ri.main(args + ["--no-fid"]) == 0
    assert "sampled 0 images" in capsys.readouterr().out
    again = json.loads((cell / "generation.json").read_text())
    assert again["images"]["generated_this_run"] == 0 and again["images"]["reused"] == 16
    assert again["fid"] is None and again["images"]["count"] == 16
    assert {p: p.stat().st_mtime_ns for p in [*cell.glob("images/*/*"), cell / "fid.json"]} == stamps


@needs_official
def test_edm_cell_with_the_released_table_00001(tmp_path, inception_file, reference, capsys):
    """CIFAR-10 EPD at NFE 3 end to end: the authors' table 00001 on a tiny random EDM network of the released
    architecture (VPPrecond + SongUNet, 32x32x3, unconditional), written with the EDM backend's save_edm."""
    from backends import load_backend
    from backends.edm_checkpoint import save_edm
    from backends.edm_networks import tiny_precond
    from solvers.core import seeded_noise

    net_path = save_edm(tiny_precond("VPPrecond", img_resolution=32, seed=7), tmp_path / "tiny-cifar10.safetensors")
    out = tmp_path / "results"
    assert ri.main(["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--num-images", "6", "--batch", "4",
                    "--model_path", str(net_path), "--ref", str(reference), "--inception", str(inception_file),
                    "--outdir", str(out), "--device", "cpu", "--fid-device", "cpu"]) == 0
    captured = capsys.readouterr()
    result = json.loads((out / "cifar10" / "epd-nfe3" / "fid.json").read_text())
    assert [line for line in captured.out.splitlines() if line.startswith("ours ")] == \
        [f"ours {result['fid']:.2f} | paper 10.40 (EPD-Solver, CIFAR-10 32, NFE 3)"]
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["paper"]["fid"] == 10.40 and result["difference"] == pytest.approx(result["fid"] - 10.40)
    assert Path(result["table"]["path"]).name == "00001-cifar10-3-3-epd-uni1.0-afs.pkl"
    assert (result["nfe_sequential"], result["table"]["grid_points"], result["images"]["count"]) == (3, 3, 6)
    assert result["model_path"] == str(net_path)
    images = out / "cifar10" / "epd-nfe3" / "images" / "000000"
    meta = json.loads((images / "000005.json").read_text())
    assert meta["backend"] == "edm" and meta["backend_config"].get("dataset") == "cifar10"
    assert meta["nfe"]["sequential"] == 3 and meta["table"]["path"] == result["table"]["path"]
    # the saved image is the table run on that network from seed 5's noise, at the native 32x32
    backend = load_backend("cifar10", model_path=str(net_path), device="cpu")
    table = load_table(result["table"]["path"])
    noise = seeded_noise([5], tuple(backend.shape), torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        want = sample.to_uint8(backend.decode(sample_epd(backend, noise * float(table.sigmas[0]), table, None)))[0]
    got = np.asarray(Image.open(images / "000005.png"))
    assert got.shape == (32, 32, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1


@needs_official
def test_lsun_cell_with_the_released_table_00014(tmp_path, capsys):
    """LSUN-Bedroom EPD at NFE 5 end to end on a tiny random latent diffusion model of the release's architecture
    (16x16 latents, so 64x64 images): the authors' table 00014 through sample.py, then the saved image checked
    against the table run directly on that model from the seed's noise."""
    from backends import load_backend
    from backends.testing.lsun_random import save_random_lsun_ldm
    from solvers.core import seeded_noise

    model = save_random_lsun_ldm(tmp_path / "tiny-lsun.safetensors", image_size=16, n_embed=64, seed=3)
    out = tmp_path / "results"
    assert ri.main(["--dataset", "lsun_bedroom", "--method", "epd", "--nfe", "5", "--num-images", "2", "--batch", "2",
                    "--model_path", str(model), "--no-fid", "--outdir", str(out), "--device", "cpu"]) == 0
    assert "ours - (no FID: --no-fid) | paper 7.52 (EPD-Solver, LSUN-Bedroom 256, NFE 5)" in capsys.readouterr().out
    result = json.loads((out / "lsun_bedroom" / "epd-nfe5" / "generation.json").read_text())
    assert Path(result["table"]["path"]).name == "00014-lsun_bedroom_ldm-4-5-epd-uni1.0-afs.pkl"
    assert (result["nfe_sequential"], result["nfe_total"], result["images"]["count"]) == (5, 8, 2)
    images = out / "lsun_bedroom" / "epd-nfe5" / "images" / "000000"
    meta = json.loads((images / "000001.json").read_text())
    assert meta["backend"] == "lsun_ldm" and meta["nfe"]["sequential"] == 5
    backend = load_backend("lsun_ldm", model_path=str(model), device="cpu")
    table = load_table(result["table"]["path"])
    noise = seeded_noise([1], tuple(backend.shape), torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        want = sample.to_uint8(backend.decode(sample_epd(backend, noise * float(table.sigmas[0]), table, None)))[0]
    got = np.asarray(Image.open(images / "000001.png"))
    assert got.shape == (64, 64, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1


@needs_official
def test_imagenet_cells_label_each_seed(tmp_path):
    """ImageNet-64 (class-conditional ADM net, table 00009): EDM's random label per seed by default, or seed k ->
    class k mod 1000 with --class-labels balanced; the label is recorded in each sidecar."""
    from backends.edm import class_labels_for_seeds
    from backends.edm_checkpoint import save_edm
    from backends.edm_networks import tiny_precond

    net = tiny_precond("EDMPrecond", img_resolution=64, label_dim=1000, model_channels=32, seed=3)
    net_path = save_edm(net, tmp_path / "tiny-imagenet64.safetensors")
    labels = {}
    for mode in ("random", "balanced"):
        out = tmp_path / mode
        assert ri.main(["--dataset", "imagenet64", "--method", "epd", "--nfe", "3", "--seeds", "5-6", "--batch", "2",
                        "--model_path", str(net_path), "--outdir", str(out), "--device", "cpu", "--no-fid",
                        "--class-labels", mode]) == 0
        metas = [json.loads(p.read_text()) for p in sorted(out.glob("imagenet64/epd-nfe3/images/*/*.json"))]
        assert [m["seed"] for m in metas] == [5, 6] and {m["nfe"]["sequential"] for m in metas} == {3}
        labels[mode] = [m["class_label"] for m in metas]
    assert labels["random"] == class_labels_for_seeds([5, 6], 1000, (3, 64, 64)).tolist()
    assert labels["balanced"] == [0, 1]


def test_two_processes_share_the_seeds_and_rank0_checks_all(tmp_path):
    """Under torchrun each rank samples its share; after the barrier rank 0 alone checks every seed's image (rank
    1's included) and reports. (Generation only: the FID step is the single-process one, tested above.)"""
    out = tmp_path / "results"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/reproduce_iccv.py",
           *_cell_args(out, "--method", "ddim", "--nfe", "3", "--num-images", "3", "--batch", "1", "--no-fid")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: sampled 2 images" in proc.stdout and "rank 1: sampled 1 images" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.startswith("ours ")]) == 1
    result = json.loads((out / "digits" / "ddim-nfe3" / "generation.json").read_text())
    assert result["timing"]["processes"] == 2 and result["images"]["count"] == 3
    assert result["images"]["generated_this_run"] == 3
    assert result["solver"] == {"name": "euler", "steps": 3, "grid_points": 4, "afs": False,
                                "schedule": "polynomial", "rho": None}
    sidecars = [json.loads(p.read_text()) for p in sorted((out / "digits" / "ddim-nfe3" / "images").glob("*/*.json"))]
    assert [m["seed"] for m in sidecars] == [0, 1, 2]
    assert {(m["solver"], m["nfe"]["sequential"], len(m["sigmas"])) for m in sidecars} == {("euler", 3, 4)}


def test_launch_sh_row_target(tmp_path):
    """./launch.sh reproduce_iccv_row = --all: four cells (NFE 3/5/7/9), generation only here."""
    env = {**os.environ, "PYTHON": PYTHON, "ICCV_OUTDIR": str(tmp_path / "iccv"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_iccv_row", "digits", "epd", "--num-images",
                           "3", "--no-fid", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for nfe in ri.PAPER_NFE:
        cell = tmp_path / "iccv" / "digits" / f"epd-nfe{nfe}"
        result = json.loads((cell / "generation.json").read_text())
        assert not (cell / "fid.json").exists()
        assert result["nfe_sequential"] == nfe and result["fid"] is None and result["images"]["count"] == 3
        assert {json.loads(p.read_text())["nfe"]["sequential"] for p in cell.glob("images/*/*.json")} == {nfe}
    summary = json.loads((tmp_path / "iccv" / "digits" / "summary-epd-nfe3_5_7_9.json").read_text())
    assert [c["nfe_requested"] for c in summary["cells"]] == [3, 5, 7, 9]
    usage = subprocess.run(["bash", str(ROOT / "launch.sh"), "reproduce_iccv", "digits"], capture_output=True,
                           text=True, env=env)
    assert usage.returncode == 2 and "usage: ./launch.sh reproduce_iccv DATASET METHOD NFE" in usage.stderr
    helptext = subprocess.run(["bash", str(ROOT / "launch.sh"), "help"], capture_output=True, text=True, env=env)
    assert helptext.returncode == 0 and "reproduce_iccv_row DATASET METHOD" in helptext.stdout


def test_errors_come_before_any_sampling(tmp_path, capsys, inception_file, monkeypatch):
    monkeypatch.delenv("LSUN_LDM_MODEL_PATH", raising=False)
    out = tmp_path / "r"
    cases = [
        (_cell_args(out, "--method", "epd", "--nfe", "3", "--inception", str(inception_file)), "give --ref"),
        (["--dataset", "cifar10", "--method", "ddim", "--nfe", "3", "--models-dir", str(tmp_path), "--outdir",
          str(out)], "edm-cifar10-32x32-uncond-vp.pkl"),
        (["--dataset", "cifar10", "--method", "ddim", "--nfe", "3", "--model_path", "x.pkl", "--refs-dir",
          str(tmp_path), "--outdir", str(out)], "cifar10-32x32.npz"),
        (["--dataset", "lsun_bedroom", "--method", "ddim", "--nfe", "3", "--outdir", str(out)],
         "lsun_bedrooms.zip"),          # the LSUN model has a backend now; its default file is missing here
        (_cell_args(out, "--method", "amed", "--nfe", "3"), "not in this code base"),
        (_cell_args(out, "--method", "epd", "--nfe", "4", "--no-fid"), "no digits table"),
        (_cell_args(out, "--method", "epd", "--nfe", "3", "--no-fid", "--table",
                    str(ROOT / "exps/digits/epd-nfe5.pkl")), "runs at NFE 5, not the 3"),
        (_cell_args(out, "--method", "ddim", "--nfe", "3", "--no-fid", "--table", "t.pkl"), "not to the baseline"),
        (_cell_args(out, "--method", "epd", "--all", "--nfe", "3", "--no-fid"), "--all or --nfe"),
        (_cell_args(out, "--method", "epd", "--nfe", "3", "--seeds", "0-3", "--num-images", "9", "--no-fid"),
         "--seeds gives 4 images"),
    ]
    for argv, message in cases:
        assert ri.main(argv) == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
    assert not out.exists()
    # images of another cell in the folder are refused, not scored
    images = out / "digits" / "epd-nfe3" / "images"
    assert sample.main(["--backend", "digits", "--solver", "euler", "--steps", "3", "--seeds", "0-2", "--outdir",
                        str(images), "--upscale", "1"]) == 0
    assert ri.main(_cell_args(out, "--method", "epd", "--nfe", "3", "--seeds", "0-3", "--no-fid")) == 2
    assert "made by euler at NFE 3, not by this cell (epd at NFE 3)" in capsys.readouterr().err
    # a baseline cell resumed on another grid is refused too
    assert ri.main(_cell_args(out, "--method", "ddim", "--nfe", "3", "--seeds", "0-1", "--no-fid")) == 0
    assert ri.main(_cell_args(out, "--method", "ddim", "--nfe", "3", "--seeds", "0-2", "--no-fid", "--schedule",
                              "logsnr")) == 2
    assert "on another grid" in capsys.readouterr().err


# -- NFE -> steps, measured by counting the network calls ------------------------------------------------------
class _Counting:
    """Counts sequential calls and rows per image of a denoiser."""

    def __init__(self, backend):
        self.backend, self.calls, self.rows = backend, 0, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.backend(x, sigma, cond)


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_nfe_maps_to_steps_giving_that_many_evaluations(method, digits):
    for nfe in ri.PAPER_NFE:
        cell = ri.plan_cell("digits", method, nfe)
        # the grid and flags exactly as sample.py receives and builds them
        args = sample.build_parser().parse_args(ri.sample_argv(cell, Path("unused"), "0-1", 2))
        sigmas = make_sigmas(sample._baseline_schedule(args, digits)).numpy()
        assert args.afs == cell.afs and len(sigmas) == args.steps + 1 and sigmas[-1] > 0
        counter = _Counting(digits)
        x = torch.randn(2, *digits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        get_solver(args.solver)(counter, x * float(sigmas[0]), sigmas, digits.encode_prompts(["", ""]),
                                afs=args.afs)
        assert counter.calls == nfe, (method, nfe, counter.calls)
        assert eval_count(args.solver, sigmas, afs=args.afs).sequential == nfe == cell.counts()[0]
        if get_solver(args.solver).evals_per_step == 2:
            assert (args.steps, args.afs) == ((nfe + 1) // 2, True)     # odd NFE through AFS
        else:
            assert (args.steps, args.afs) == (nfe, False)


@needs_official
@pytest.mark.parametrize("method", ["epd", "epd_plugin"])
def test_released_tables_run_at_their_nfe(method, digits):
    """Grid N = 3/4/5/6 with AFS: sequential calls 3/5/7/9, with K = 2 points batched in each step's one call."""
    for nfe in ri.PAPER_NFE:
        cell = ri.plan_cell("cifar10", method, nfe)
        counter = _Counting(digits)
        x = torch.randn(2, *digits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        sample_epd(counter, x * float(cell.table.sigmas[0]), cell.table, digits.encode_prompts(["", ""]))
        assert counter.calls == nfe == cell.counts()[0]
        assert counter.rows / 2 == cell.counts()[1] == cell.table.eval_count().total
        assert cell.table.num_steps == (nfe + 1) // 2 + 1


@needs_official
def test_table_selection_picks_the_released_file():
    files = sorted(OFFICIAL.glob("000[0-3][0-9]-*.pkl"))
    order = ["cifar10", "ffhq", "imagenet64", "lsun_bedroom"]
    for m, method in enumerate(["epd", "epd_plugin"]):
        for d, dataset in enumerate(order):
            for n, nfe in enumerate(ri.PAPER_NFE):
                path = ri.find_release_table(dataset, method, nfe)
                assert path.resolve() == files[16 * m + 4 * d + n].resolve()
                assert int(path.name[:5]) == ri.release_id(dataset, method, nfe) == 16 * m + 4 * d + n + 1
                table = load_table(path)
                assert table.eval_count().sequential == nfe and table.afs
                assert table.solver == ("epd" if method == "epd" else "ipndm")
                assert table.metadata["dataset"] == ri.DATASETS[dataset].table_dataset
                assert ri.plan_cell(dataset, method, nfe).table_path == path
    with pytest.raises(ValueError, match="NFE 3, 5, 7, 9 only"):
        ri.find_release_table("cifar10", "epd", 4)
    # --table: the NFE must match the cell; another data set's table runs with a warning
    with pytest.raises(ValueError, match="runs at NFE 5"):
        ri.plan_cell("cifar10", "epd", 3, table=files[1])
    cell = ri.plan_cell("cifar10", "epd", 3, table=files[4])
    assert cell.warnings and "'ffhq', not 'cifar10'" in cell.warnings[0]


def test_table_selection_checks_file_names(tmp_path):
    (tmp_path / "00001-cifar10-4-5-epd-uni1.0-afs.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="does not look like the cifar10/epd/NFE 3 table"):
        ri.find_release_table("cifar10", "epd", 3, tmp_path)
    with pytest.raises(FileNotFoundError, match="00002"):
        ri.find_release_table("cifar10", "epd", 5, tmp_path)


# -- the paper's numbers ---------------------------------------------------------------------------------------
def test_paper_numbers_known_cells():
    assert ri.paper_fid("cifar10", "epd", 5) == (4.33, "EPD-Solver, CIFAR-10 32, NFE 5")
    # the README's 5-NFE EPD-Solver numbers and the abstract's (= EPD-Plugin) ones, docs/authors-code.md §9.34
    assert [ri.paper_fid(d, "epd", 5)[0] for d in ri.DATASETS if d != "digits"] == [4.33, 7.84, 6.35, 7.52]
    assert [ri.paper_fid(d, "epd_plugin", 5)[0] for d in ri.DATASETS if d != "digits"] == [4.47, 7.97, 8.17, 8.26]
    assert ri.paper_fid("imagenet64", "ddim", 9)[0] == 19.27 and ri.paper_fid("lsun_bedroom", "edm", 3)[0] == 291.5
    assert ri.paper_fid("ffhq", "unipc", 7)[0] == 7.44 and ri.paper_fid("cifar10", "ipndm", 3)[0] == 47.98
    assert ri.paper_fid("cifar10", "dpmpp2m", 3) == (None, None) and ri.paper_fid("digits", "epd", 3) == (None, None)


@pytest.mark.skipif(not SPEC.is_file(), reason=f"the spec is not at {SPEC}")
def test_paper_numbers_equal_the_spec_table():
    text = SPEC.read_text()
    section = text[text.index("### 10.1"):text.index("How these map to the released checkpoints")]
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| Method") and "---" not in line]
    data = ri.paper_table()
    parsed = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.sub(r"\s+\(.*\)$", "", cells[0].replace("**", "")).strip()   # "EPD-Plugin (iPNDM+EPD)"
        parsed[name] = {col: [float(v) for v in cells[i + 1].split("/")] for i, col in enumerate(data["columns"])}
    assert parsed == data["rows"] and len(parsed) == 11
    for key, method in ri.METHODS.items():
        assert method.paper_row is None or method.paper_row in parsed, key


def test_fast_path_flags_reach_sample_py():
    args = ri.build_parser().parse_args(["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--compile",
                                         "--compile-cache", "cache/x", "--sample-args", "--max-batch 8"])
    flags = ri._extra_sample_flags(args)
    assert flags == ["--max-batch", "8", "--compile", "--compile-cache", "cache/x"]
    parsed = sample.build_parser().parse_args(["--backend", "cifar10", "--solver", "euler", "--steps", "3"] + flags)
    assert parsed.compile and str(parsed.compile_cache) == "cache/x" and parsed.max_batch == 8
