"""Evaluation tools: weights manifest, MPS file checks, FID / KID, score CLIs, the shell pipeline (CPU, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from training.rewards import build_reward
from training.rewards import fid, score_cli
from training.rewards import pretrained as weights
from training.rewards.mps import MPSStateDictError, PickledModelError, load_mps_state_dict, refuse_pickled_model
from training.ppo.scripts import score_fid, score_hps, score_mps

ROOT = Path(__file__).resolve().parents[1]
_MANIFEST_ENVS = [w.env for w in weights.MANIFEST.values()] + [weights.ROOT_ENV]


@pytest.fixture(autouse=True)
def _no_weight_env(monkeypatch):
    """No user override may leak into the tests."""
    for name in _MANIFEST_ENVS:
        monkeypatch.delenv(name, raising=False)


# -- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extractor(inception_file):
    return fid.make_extractor(inception_file, device="cpu")


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


def _save_png(image: torch.Tensor, path: Path) -> None:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


@pytest.fixture(scope="module")
def digit_samples(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "samples"
    rc = sample.main(["--backend", "digits", "--solver", "heun", "--steps", "4", "--seeds", "0-5",
                      "--prompt-file", str(ROOT / "src/prompts/digits.txt"), "--outdir", str(out), "--device", "cpu"])
    assert rc == 0
    return out


def _independent_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2)), with numpy's general eigensolver only."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


# -- FID / KID ---------------------------------------------------------------------------------------------

def test_fid_zero_for_same_set_and_grows_with_noise(extractor):
    base = _smooth_images(5)
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    levels = (0.15, 0.4, 0.8)
    batch = torch.cat([base] + [(base + s * noise).clamp(-1, 1) for s in levels])
    feats = np.split(fid.compute_features(batch, extractor=extractor, batch_size=20), 1 + len(levels))
    assert feats[0].shape == (5, 2048)
    mu, sigma = fid.statistics_from_features(feats[0])
    values = [fid.fid_from_features(f, mu, sigma, feats[0]) for f in feats]
    scale = np.trace(sigma)
    assert abs(values[0]) < 1e-6 * scale
    assert 0 < values[1] < values[2] < values[3], values


def test_frechet_distance_matches_independent_numpy():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    f1 = rng.standard_normal((300, d))
    f2 = rng.standard_normal((250, d)) @ (np.eye(d) + a) + 0.3
    want = _independent_fid(f1, f2)
    mu1, s1 = fid.statistics_from_features(f1)
    mu2, s2 = fid.statistics_from_features(f2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert fid.fid_from_features(f1, mu2, s2) == pytest.approx(want, rel=1e-8)          # n > d: sqrtm
    assert fid.fid_from_features(f1, mu2, s2, method="sqrtm") == pytest.approx(want, rel=1e-8)
    # fewer samples than dimensions (singular covariance): the low-rank form, either side
    g1, g2 = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) * 1.5 + 0.2
    want = _independent_fid(g1, g2)
    mu1, s1 = fid.statistics_from_features(g1)
    mu2, s2 = fid.statistics_from_features(g2)
    assert fid.fid_from_features(g1, mu2, s2) == pytest.approx(want, rel=1e-6)
    big = rng.standard_normal((100, 64))
    mu3, s3 = fid.statistics_from_features(big)
    assert fid.fid_from_features(big, mu1, s1, ref_features=g1) == pytest.approx(_independent_fid(big, g1), rel=1e-6)
    assert fid.fid_from_features(g1, mu1, s1, g1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        fid.statistics_from_features(g1[:1])


def test_kid_zero_for_same_set_and_positive_when_shifted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 32))
    shifted_mean, shifted_std = fid.kernel_inception_distance(x, x + 0.5, num_subsets=10)
    assert shifted_mean > 0.5 and shifted_std >= 0
    # the same set: only the O(1/m) term of the shared diagonal is left (m = 1000 here)
    same_mean, _ = fid.kernel_inception_distance(x, x.copy(), num_subsets=3)
    assert abs(same_mean) < 0.02 * shifted_mean
    # two draws of one distribution: zero up to sampling noise
    fresh_mean, fresh_std = fid.kernel_inception_distance(x, rng.standard_normal((1000, 32)), num_subsets=10)
    assert abs(fresh_mean) < 0.01 * shifted_mean and fresh_std >= 0
    # one subset of all samples: the unbiased MMD^2 written out
    y = rng.standard_normal((40, 32)) + 0.2
    k = lambda a, b: (a @ b.T / 32 + 1) ** 3                                   # noqa: E731
    kxx, kyy, kxy = k(x[:40], x[:40]), k(y, y), k(x[:40], y)  # subset order does not change the statistic
    want = ((kxx.sum() - np.trace(kxx)) / (40 * 39) + (kyy.sum() - np.trace(kyy)) / (40 * 39)
            - 2 * kxy.sum() / 1600)
    mean, std = fid.kernel_inception_distance(x[:40], y, num_subsets=1)
    assert mean == pytest.approx(want, rel=1e-10) and std == 0.0


def test_statistics_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 6))
    mu, sigma = fid.statistics_from_features(feats)
    path = fid.save_statistics(tmp_path / "ref.npz", mu, sigma)
    got_mu, got_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    assert fid.load_reference(path).features is None
    fid.save_statistics(path, mu, sigma, features=feats)         # overwrite in place, atomically
    np.testing.assert_array_equal(fid.load_reference(path).features, feats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="sigma"):
        fid.load_reference(tmp_path / "bad.npz")


def test_any_image_count_and_mixed_sizes(tmp_path):
    """37 images (no 10k/30k/50k rule), two sizes, batches of 8: folder features equal tensor features."""
    proj = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    cheap = lambda images: images.mean(dim=(2, 3)) @ proj                      # noqa: E731
    small, large = _smooth_images(20, 16, seed=2), _smooth_images(17, 24, seed=3)
    for i, image in enumerate([*small, *large]):
        _save_png(image, tmp_path / "imgs" / f"{i // 10:06d}" / f"{i:06d}.png")
    feats = fid.compute_features(tmp_path / "imgs", extractor=cheap, batch_size=8)
    assert feats.shape == (37, 5)
    quantised = [((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1 for x in (small, large)]
    want = np.concatenate([cheap(q).double().numpy() for q in quantised])
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
    mu, sigma = fid.compute_statistics(tmp_path / "imgs", extractor=cheap)
    assert mu.shape == (5,) and sigma.shape == (5, 5)


def test_score_fid_cli(tmp_path, inception_file, extractor, capsys):
    base = _smooth_images(5)
    for i, image in enumerate(base):
        _save_png(image, tmp_path / "gen" / f"{i:06d}.png")
    ref_feats = fid.compute_features(base + 0.05, extractor=extractor)
    ref = fid.save_statistics(tmp_path / "ref.npz", *fid.statistics_from_features(ref_feats), features=ref_feats)
    out = tmp_path / "fid.json"
    rc = score_fid.main(["--images", str(tmp_path / "gen"), "--ref", str(ref), "--kid", "--kid-subsets", "3",
                         "--weights", str(inception_file), "--device", "cpu", "--output-json", str(out),
                         "--save-stats", str(tmp_path / "gen.npz")])
    assert rc == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    gen_feats = fid.compute_features(tmp_path / "gen", extractor=extractor)
    mu, sigma = fid.statistics_from_features(ref_feats)
    assert result["fid"] == pytest.approx(fid.fid_from_features(gen_feats, mu, sigma), rel=1e-6)
    assert result["fid"] > 0 and result["count"] == 5 and result["ref"] == str(ref)
    assert result["kid_mean"] is not None and result["kid_std"] >= 0
    np.testing.assert_allclose(fid.load_statistics(tmp_path / "gen.npz")[0], gen_feats.mean(0))
    # KID against stats without features, and missing weights: one clear error each, before any network runs
    fid.save_statistics(tmp_path / "plain.npz", mu, sigma)
    assert score_fid.main(["--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "plain.npz"), "--kid",
                           "--weights", str(inception_file)]) == 2
    assert "--save-features" in capsys.readouterr().err
    assert score_fid.main(["--images", str(tmp_path / "gen"), "--ref", str(ref),
                           "--cache-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "github.com/mseitzer/pytorch-fid" in err


# -- score CLIs --------------------------------------------------------------------------------------------

def _load_digits(paths: list[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("L").resize((8, 8), Image.NEAREST), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays))[:, None] / 127.5 - 1


def test_score_cli_digit_class_matches_the_head(digit_samples, tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc = score_hps.main(["--head", "digit_class", "--images", str(digit_samples), "--per-image",
                         "--output-json", str(out), "--device", "cpu"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    paths = sorted(digit_samples.glob("**/*.png"))
    prompts = [json.loads(p.with_suffix(".json").read_text())["prompt"] for p in paths]
    direct = build_reward("digit_class").score(_load_digits(paths), prompts).double().numpy()
    stats = result["stats"]
    assert stats["count"] == 6 and result["metadata"]["num_images"] == 6
    assert stats["mean"] == pytest.approx(direct.mean(), abs=1e-6)
    assert stats["std"] == pytest.approx(direct.std(), abs=1e-6)
    assert (stats["min"], stats["max"]) == pytest.approx((direct.min(), direct.max()), abs=1e-6)
    assert [r["prompt"] for r in result["per_image"]] == prompts == [str(i) for i in range(6)]
    assert result["metadata"]["head"] == "digit_class" and result["metadata"]["pairing"] == "sidecar"
    assert set(result) >= {"images_dir", "pattern", "prompts_file", "stats", "metadata"}


def test_score_cli_prompts_file_pairing_and_errors(digit_samples, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    paths = sorted(digit_samples.glob("**/*.png"))
    for p in paths:
        (bare / p.name).write_bytes(p.read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join("a b c d e f".split()) + "\n")
    rc = score_cli.main(["--head", "image_contrast", "--images", str(bare), "--prompts", str(prompts), "--per-image"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metadata"]["pairing"] == "index" and result["prompts_file"] == str(prompts)
    assert [r["prompt"] for r in result["per_image"]] == list("abcdef")
    images = torch.stack([score_cli.load_image(bare / p.name) for p in paths])
    direct = build_reward("image_contrast").score(images, list("abcdef")).double().numpy()
    assert result["stats"]["mean"] == pytest.approx(direct.mean(), abs=1e-6)
    # count mismatch: one message
    prompts.write_text("a\nb\nc\nd\ne\n")
    assert score_cli.main(["--head", "image_contrast", "--images", str(bare), "--prompts", str(prompts)]) == 2
    assert "6 images but 5 prompts" in capsys.readouterr().err
    # no sidecars, no prompts: an error for a prompt-following head
    assert score_cli.main(["--head", "digit_class", "--images", str(bare)]) == 2
    assert "--prompts" in capsys.readouterr().err
    # some sidecars but not all
    (bare / paths[0].with_suffix(".json").name).write_text(paths[0].with_suffix(".json").read_text())
    assert score_cli.main(["--head", "image_contrast", "--images", str(bare), "--prompts", str(prompts)]) == 2
    assert "1 of 6 images have a JSON sidecar" in capsys.readouterr().err


def test_score_cli_missing_weights_names_the_file(digit_samples, tmp_path, capsys):
    assert score_hps.main(["--images", str(digit_samples), "--cache-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "HPS_v2.1_compressed.pt" in err and "huggingface.co/xswu/HPSv2" in err
    assert score_mps.main(["--images", str(digit_samples), "--cache-dir", str(tmp_path / "empty")]) == 2
    assert "MPS_overall_state_dict.pt" in capsys.readouterr().err


def test_parse_options():
    assert score_cli.parse_options(["seed=1", "name=x", "flag=true"]) == {"seed": 1, "name": "x", "flag": True}
    with pytest.raises(ValueError, match="key=value"):
        score_cli.parse_options(["novalue"])


# -- manifest and MPS ----------------------------------------------------------------------------------------

def test_manifest_check_lists_every_file(tmp_path, capsys):
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"x" * 10)
    (tmp_path / "PickScore_v1").mkdir()                        # a folder without its config.json is not present
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"not the weights")
    assert weights.main(["check", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for item in weights.MANIFEST.values():
        assert item.path in out and item.name in out
    rows = {r["name"]: r for r in weights.check_rows(tmp_path)}
    assert rows["hps_v2.1"]["status"] == "present" and rows["hps_v2.1"]["size"] == 10
    assert rows["pickscore"]["status"] == "missing" and rows["mps"]["status"] == "missing"
    assert weights.main(["check", "--root", str(tmp_path), "--verify"]) == 1   # the inception prefix mismatches
    assert "MISMATCH" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, str(ROOT / "training/rewards/weights.py"), "present", "--root",
                           str(tmp_path), "hps", "pickscore", "digit_class"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["hps", "digit_class"]
    assert "skip pickscore" in proc.stderr and "PickScore_v1" in proc.stderr


def test_resolve_message_and_overrides(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        weights.resolve("imagereward", root=tmp_path)
    msg = str(info.value)
    assert "ImageReward.pt" in msg and "imagereward" in msg and "huggingface.co/THUDM/ImageReward" in msg
    assert "$IMAGEREWARD_MODEL_PATH" in msg
    custom = tmp_path / "elsewhere.pt"
    custom.write_bytes(b"1")
    assert weights.resolve("hps_v2.1", override=custom, root=tmp_path) == custom
    monkeypatch.setenv("HPS_MODEL_PATH", str(custom))
    assert weights.resolve("hps_v2.1", root=tmp_path) == custom
    folder = tmp_path / "clip-vit-large-patch14"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        weights.resolve("clip_vit_l14", root=tmp_path)
    (folder / "config.json").write_text("{}")
    assert weights.resolve("clip_vit_l14", root=tmp_path) == folder
    with pytest.raises(KeyError):
        weights.entry("nope")


def test_mps_refuses_pickled_model_and_validates_state_dict(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    pickled = tmp_path / "MPS_overall_checkpoint.pth"
    torch.save(module, pickled)
    with pytest.raises(PickledModelError, match="weights_only=False") as info:
        refuse_pickled_model(pickled)
    assert "torch.nn.modules" in str(info.value) and "state_dict" in str(info.value)
    converted = tmp_path / "MPS_overall_state_dict.pt"
    torch.save(module.state_dict(), converted)
    state = load_mps_state_dict(converted)
    assert set(state) == {"0.weight", "0.bias"} and all(isinstance(v, torch.Tensor) for v in state.values())
    torch.save({"step": 3}, tmp_path / "odd.pt")
    with pytest.raises(PickledModelError, match="not named tensors"):
        load_mps_state_dict(tmp_path / "odd.pt")
    with pytest.raises(MPSStateDictError, match="does not match the MPS architecture"):   # strict: not MPS keys
        build_reward("mps", weights_path=converted)
    with pytest.raises(PickledModelError):
        build_reward("mps", weights_path=pickled)
    with pytest.raises(FileNotFoundError, match="MPS_overall_state_dict.pt"):
        build_reward("mps", root=tmp_path / "empty")


# -- shell pipeline ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["launch.sh", "scripts/pipeline_common.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_score_all_metrics_dir_skips_missing_weights(digit_samples, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WEIGHTS_DIR": str(tmp_path / "no-weights")}
    results = tmp_path / "results"
    proc = subprocess.run(["bash", "-c", 'source "$0/scripts/pipeline_common.sh" && '
                           'score_all_metrics_dir "$1" "" demo "$2"', str(ROOT), str(digit_samples), str(results)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for head in ("clip", "hps", "aesthetic", "pickscore", "imagereward", "mps"):
        assert f"skip {head}: missing" in proc.stderr
    summary = json.loads((results / "demo-summary.json").read_text())
    assert summary["metrics"] == {} and summary["skipped"] == ["clip", "hps", "aesthetic", "pick", "imagereward", "mps"]
    assert "Skipped (weights missing)" in (results / "demo-summary.md").read_text()
    # launch.sh with every stage's inputs absent: train and sample skipped, nothing to evaluate
    env.update(SKIP_TRAIN="1", SKIP_SAMPLE="1", MODELS="sd15", RESULTS_DIR=str(results), EXPS_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "launch.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "[train] skipped" in proc.stdout
    env["MODELS"] = "sd99"
    proc = subprocess.run(["bash", str(ROOT / "launch.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown model 'sd99'" in proc.stderr


def test_score_all_metrics_dir_scores_present_metrics(digit_samples, inception_file, tmp_path):
    """FID with a reference, an MPS weights file that is not an MPS state dict: one scored, one failed."""
    root = tmp_path / "w"
    (root / "CLIP-ViT-H-14-laion2B-s32B-b79K").mkdir(parents=True)
    (root / "CLIP-ViT-H-14-laion2B-s32B-b79K" / "preprocessor_config.json").write_text("{}")
    torch.save(torch.nn.Linear(2, 2).state_dict(), root / "MPS_overall_state_dict.pt")
    (root / inception_file.name).symlink_to(inception_file)
    feats = np.random.default_rng(0).standard_normal((10, 2048))
    ref = fid.save_statistics(tmp_path / "ref.npz", *fid.statistics_from_features(feats), features=feats)
    env = {**os.environ, "PYTHON": sys.executable, "WEIGHTS_DIR": str(root), "FID_REF": str(ref), "FID_KID": "1",
           "OMP_NUM_THREADS": "2"}
    results = tmp_path / "results"
    proc = subprocess.run(["bash", "-c", 'source "$0/scripts/pipeline_common.sh" && '
                           'score_all_metrics_dir "$1" "" demo "$2"', str(ROOT), str(digit_samples), str(results)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((results / "demo-summary.json").read_text())
    assert summary["failed"] == ["mps"] and "does not match the MPS architecture" in proc.stderr
    assert list(summary["metrics"]) == ["fid"] and summary["metrics"]["fid"]["count"] == 6
    fid_json = json.loads((results / "demo_fid.json").read_text())
    assert summary["metrics"]["fid"]["fid"] == fid_json["fid"] > 0 and fid_json["kid_mean"] is not None
    assert "| fid |" in (results / "demo-summary.md").read_text()
