"""RDPO (Stage 2): advantages, the trainer on the analytic digits model, export, resume, DDP, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from solvers.table import load_table
from training.ppo import cold_start, group_indices, load_config, rloo_advantages, train
from training.ppo.export import export_run
from training.ppo.launch import main as launch_main
from training.ppo.trainer import RDPOTrainer, backend_spec
from training.runs import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "ppo" / "cfgs" / "digits.yaml"


def small(tmp_path, *extra):
    """A seconds-long digits run: 16 images per step (4 prompts x 4), 4 steps."""
    return [f"run.output_root={tmp_path / 'exps'}", f"data.predictor_snapshot={ROOT / 'exps/rdpo/digits-nfe3-stage1.pkl'}",
            "ppo.rollout_batch_size=16", "ppo.minibatch_size=8", "ppo.steps=4", "eval.seeds=0-31",
            "logging.save_interval=2", *extra]


# -- advantages ------------------------------------------------------------------------------------------------
def test_rloo_groups_by_prompt_and_the_legacy_mixed_groups():
    # prompt-major: prompts p0 p0 p1 p1 p2 p2 p3 p3 with k = 2 (G = 4)
    assert group_indices(8, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_indices(8, 2, legacy_mixed=True).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0, 0.0, 0.0, 5.0, 6.0])
    ours = rloo_advantages(rewards, 2, standardize=False)
    assert ours.tolist() == [-2.0, 2.0, -4.0, 4.0, 0.0, 0.0, -1.0, 1.0]     # R_n - the other sample of its prompt
    legacy = rloo_advantages(rewards, 2, legacy_mixed=True, standardize=False)
    assert legacy.tolist() == [1.0, 3.0, 5.0, 8.0, -1.0, -3.0, -5.0, -8.0]  # baselines from other prompts
    # docs/authors-code.md §7.5's B = 16, k = 4 case: every legacy group holds one sample of each of the 4 prompts
    prompt_of = torch.arange(16) // 4
    for group in group_indices(16, 4, legacy_mixed=True):
        assert sorted(prompt_of[group].tolist()) == [0, 1, 2, 3]
    standardized = rloo_advantages(rewards, 2)
    assert abs(float(standardized.mean())) < 1e-6 and float(standardized.std(unbiased=False)) == pytest.approx(1.0)
    assert rloo_advantages(torch.tensor([2.0, 5.0]), 1, standardize=False).tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="multiple of rloo_k"):
        rloo_advantages(rewards, 3)


# -- configs ------------------------------------------------------------------------------------------------------
def test_configs_load_and_errors_name_the_setting(tmp_path):
    for name in ("sd15", "sd3_512", "sd3_1024", "flux_dev"):
        config = load_config(ROOT / "training/ppo/cfgs" / f"{name}.yaml", overrides=[
            f"data.predictor_snapshot={ROOT / 'exps/rdpo/digits-nfe3-stage1.pkl'}", f"data.prompt_csv={ROOT / 'src/prompts/eval.txt'}"])
        assert config.reward.weights.hps == 1.0 and config.ppo.learning_rate == 7e-5 and config.ppo.kl_coef == 0
        if name in ("sd3_1024", "flux_dev"):   # the authors' long runs roll out on the fast path
            name_, options = backend_spec(config, load_table(ROOT / "exps/rdpo/digits-nfe3-stage1.pkl"))
            assert options["compile"] is True and options["fuse_qkv"] is True and name_ == name.split("_")[0]
    flux = load_config(ROOT / "training/ppo/cfgs/flux_dev.yaml", [f"data.predictor_snapshot={CONFIG}",
                                                                  f"data.prompt_csv={CONFIG}"])
    assert flux.ppo.dirichlet_concentration == 10 and flux.ppo.train_scale_dir is False and flux.ppo.steps == 20000
    with pytest.raises(ConfigError, match="data.predictor_snapshot"):
        load_config(CONFIG, ["data.predictor_snapshot=/nowhere.pkl"])
    with pytest.raises(ConfigError, match="ppo.rollout_batch_size"):
        load_config(CONFIG, ["ppo.rollout_batch_size=10"])
    with pytest.raises(ConfigError, match="ppo.learnig_rate|learnig_rate"):
        load_config(CONFIG, ["ppo.learnig_rate=1"])
    with pytest.raises(ConfigError, match="reward.weights"):
        load_config(CONFIG, ["reward.weights.digit_class=0", "reward.weights.digit_realism=0"])


def test_dry_run_checks_the_reward_heads(capsys):
    assert launch_main(["--config", str(CONFIG), "--dry-run"]) == 0
    assert "config OK" in capsys.readouterr().out
    assert launch_main(["--config", str(CONFIG), "--dry-run", "--override", "reward.weights.nosuchhead=1"]) == 2
    assert "reward head(s) nosuchhead are not available" in capsys.readouterr().err
    assert launch_main(["--config", str(CONFIG), "--dry-run", "--override", "reward.weights.hps=1", "--override",
                        "reward.heads.hps.weights_path=/nowhere/HPS_v2.1_compressed.pt"]) == 2
    assert "reward.heads.hps.weights_path = /nowhere/HPS_v2.1_compressed.pt does not exist" in capsys.readouterr().err


# -- the trainer ------------------------------------------------------------------------------------------------
def test_ranks_and_steps_draw_different_prompts_and_seeds(tmp_path):
    trainer = RDPOTrainer(load_config(CONFIG, small(tmp_path)), tmp_path / "run", progress=False)
    prompts, seeds, _ = trainer.draw(0)
    assert len(prompts) == 16 and all(prompts[i] == prompts[i - i % 4] for i in range(16))    # prompt-major
    assert len(set(prompts)) == 4 and min(seeds) >= 2 ** 31 and len(set(seeds)) == 16
    again, seeds_again, _ = trainer.draw(0)
    assert again == prompts and seeds_again == seeds                           # a resumed run redraws the same
    assert trainer.draw(1)[1] != seeds
    trainer.world, trainer.rank = 2, 1
    trainer.batch = 8
    other, other_seeds, _ = trainer.draw(0)
    trainer.rank = 0
    mine, my_seeds, _ = trainer.draw(0)
    assert not set(other) & set(mine) and not set(other_seeds) & set(my_seeds)   # docs/authors-code.md §9.36 fixed


def test_training_raises_the_held_out_reward_and_exports_a_usable_table(tmp_path):
    table, folder = train(CONFIG, small(tmp_path, "ppo.steps=12", "ppo.rollout_batch_size=32", "ppo.minibatch_size=16",
                                        "eval.seeds=0-127"), progress=False)
    evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 10, 12]                          # eval.interval = 10, and the end
    assert evals[-1]["eval_reward_mean"] > evals[0]["eval_reward_mean"] + 0.05
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"reward_mean", "kl", "entropy", "ratio", "clip_fraction", "grad_norm", "grad_norm_clipped",
            "digit_class_mean", "digit_realism_mean"} <= set(records[0])
    assert all(r["grad_norm_clipped"] <= 1.0 + 1e-6 for r in records)
    for name in ("config.yaml", "checkpoint.pt", "table-mean.pkl", "table-mean.json", "table-mode.pkl", "rewards.png"):
        assert (folder / name).is_file(), name
    saved = load_table(folder / "table-mean.pkl")
    start = load_table(ROOT / "exps/rdpo/digits-nfe3-stage1.pkl")
    # scales kept (docs/authors-code.md §9.20)
    assert saved.dir_scales is not None and saved.time_scales is not None
    assert saved.afs == start.afs and np.array_equal(saved.sigmas, start.sigmas)
    assert saved.metadata["backend"] == "digits" and saved.metadata["guidance_rate"] == 2.0
    assert saved.metadata["rdpo"]["kind"] == "mean" and not np.allclose(saved.positions, start.positions)
    # export from the checkpoint equals the run's own mean table; and the table samples through sample.py
    exported, path = export_run(folder)
    np.testing.assert_allclose(exported.positions, saved.positions, atol=1e-12)
    np.testing.assert_allclose(exported.dir_scales, saved.dir_scales, atol=1e-12)
    # export -> cold start: the policy mean at initialisation reproduces the exported table
    from training.ppo import DirichletPolicy

    again = DirichletPolicy(cold_start(load_table(path), 50.0)).table("mean")
    np.testing.assert_allclose(again.positions, exported.positions, atol=1e-6)
    np.testing.assert_allclose(again.weights, exported.weights, atol=1e-6)
    import sample

    assert sample.main(["--predictor_path", str(path), "--seeds", "0-3", "--outdir", str(tmp_path / "s"),
                        "--no-subdirs", "--prompt", "9"]) == 0
    assert json.loads((tmp_path / "s" / "000000.json").read_text())["backend"] == "digits"


def test_resume_after_a_stop_ends_with_the_same_policy(tmp_path):
    config = load_config(CONFIG, small(tmp_path))
    straight, _ = train(config, run_dir=tmp_path / "straight", progress=False)
    train(config, run_dir=tmp_path / "cut", progress=False, stop_after=2)
    assert json.loads((tmp_path / "cut" / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    resumed, _ = train(None, resume=tmp_path / "cut", progress=False)
    np.testing.assert_array_equal(resumed.positions, straight.positions)
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_two_gloo_ranks_keep_identical_policies(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = small(tmp_path, "ppo.steps=3", "ppo.minibatch_size=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "ddp_rdpo_worker.py"), str(tmp_path), str(CONFIG), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policies = [torch.load(tmp_path / f"policy{r}.pt", weights_only=True) for r in (0, 1)]
    for key in policies[0]:
        assert torch.equal(policies[0][key], policies[1][key]), key
    rank0, rank1 = (load_table(tmp_path / f"rank{r}.json") for r in (0, 1))
    np.testing.assert_array_equal(rank0.positions, rank1.positions)
    assert rank0.metadata["rdpo"]["world_size"] == 2
    head = policies[0]["head.weight"]
    assert float(head.abs().sum()) > 0                                        # it did train
