"""The RDPO loop (docs/authors-code.md §7.3-7.6): roll out per-image tables drawn from the Dirichlet policy, score the
images, compute leave-one-out advantages, and take clipped PPO steps on the policy; the backbone is never touched.

One PPO step on each rank:

1. draw G = B/k prompts and B noise seeds from ``(seed, step, rank)``, so ranks see different prompts (the
   authors' ranks all read the same ones, docs/authors-code.md §9.36), a resumed run redraws the same ones, and training
   seeds (>= 2^31) never overlap evaluation seeds;
2. sample a table for every image, ``segments ~ Dir(alpha_pos)``, ``weights ~ Dir(alpha_w)`` (scales ~
   LogNormal), keeping ``log pi_old``; integrate every image with its own table (the batched EPD sampler);
3. decode and score: ``R = sum_h w_h norm_h(image, prompt) / sum_h max(w_h, 0)``;
4. ``A = RLOO(R)`` grouped by prompt (or the authors' mixed groups), standardised;
5. for each epoch and minibatch: ``ratio = exp(log pi_new - log pi_old)``,
   ``L = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + kl_coef KL(pi || pi_start) - entropy_coef H``
   (:func:`training.ppo.loss.ppo_loss`);
   gradients are averaged over ranks, the grad norm is logged before and after clipping, AdamW steps.

The policy takes no image or prompt input (docs/authors-code.md §9.43): it is a distribution over tables, the same for
every image, and its mean is the table that gets exported.

A run lives in ``<output_root>/<id>-<run_name>/``: ``config.yaml``, ``log.jsonl`` (one record per step),
``eval.jsonl`` (the mean table on held-out seeds and prompts), ``checkpoint.pt`` (atomic; a killed run resumes
from it and ends with the same policy), ``table-mean.pkl``/``.json``, ``table-mode.pkl`` and ``rewards.png``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from backends import backend_options, canonical_backend, load_backend, options_from_table
from backends.base import check_backend
from backends.distributed import join_process_group, rank_and_world, rank_device
from backends.generate import Sampler, generate
from solvers.core import parse_seeds
from solvers.plan import StepPlan
from solvers.table import PredictorTable, load_table, save_table
from backends.prompts import read_prompts
from training.rewards import reward_from_config
from training.runs import TRAIN_SEED_BASE, TrainingLoop, append_jsonl, discard_run_on_failure, open_run

from .advantages import rloo_advantages
from .cold_start import cold_start
from .config import load_config
from .loss import ppo_loss
from .policy import DirichletPolicy, TableSample

__all__ = ["RDPOTrainer", "train", "TRAIN_SEED_BASE"]



def _stream_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
               % (1 << 63))


def backend_spec(config: DictConfig, start_table: PredictorTable) -> tuple[str, dict]:
    """The backend's name and loader options: the table's, then ``model.*`` on top (docs/authors-code.md §7.7)."""
    meta = start_table.metadata
    name = canonical_backend(config.model.backend or meta.get("backend") or "digits")
    table_backend = canonical_backend(meta["backend"]) if meta.get("backend") else None
    options = options_from_table(name, meta.get("backend_config"), meta.get("guidance_rate")) \
        if name == table_backend else {}
    options.update(OmegaConf.to_container(config.model.backend_options, resolve=True))
    if config.model.guidance_rate is not None:
        options["guidance"] = float(config.model.guidance_rate)
    if config.model.resolution is not None:
        options["resolution"] = int(config.model.resolution)
    return name, options


def policy_table(policy: DirichletPolicy, config: DictConfig, start_table: PredictorTable, kind: str = "mean", *,
                 steps: int | None = None, seconds: float | None = None, world: int = 1) -> PredictorTable:
    """The policy's mean (or mode) table, with the start table's metadata, the backend it was tuned for
    (guidance included) and the run's settings; scale tables are kept (the authors' export drops them, 9.20)."""
    table = policy.table(kind)
    meta = dict(table.metadata)
    name, options = backend_spec(config, start_table)
    meta.update({
        "name": f"{config.run.run_name}-{kind}", "source": "RDPO (EPD-Solver++ Stage 2)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": name, "backend_config": {k: v for k, v in options.items() if k not in ("device", "guidance")},
        "guidance_rate": float(options.get("guidance", meta.get("guidance_rate") or 1.0)),
        "start_table": {"path": str(config.data.predictor_snapshot), "name": start_table.metadata.get("name")},
        "rdpo": {**meta.get("rdpo", {}), "kind": kind, "steps": steps, "world_size": world, "seconds": seconds,
                 "config": OmegaConf.to_container(config.ppo, resolve=True),
                 "reward": OmegaConf.to_container(config.reward, resolve=True)},
    })
    return table.with_metadata(**meta)


class RDPOTrainer(TrainingLoop):
    """One RDPO run. ``backend``/``reward`` may be injected (tests, custom models). Call :meth:`run`."""

    log_key = "step"
    logs = ("log.jsonl", "eval.jsonl")
    unit = "step"

    def __init__(self, config: DictConfig, run_dir: str | Path, *, backend: Any = None, reward: Any = None,
                 progress: bool = True, stop_after: int | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stop_after = stop_after
        self.desc = f"rdpo {config.run.run_name}"
        self.rank, self.world = rank_and_world()
        self.device = rank_device(config.run.device)
        ppo = config.ppo
        self.batch = int(ppo.rollout_batch_size) // self.world
        if int(ppo.rollout_batch_size) % self.world or self.batch % int(ppo.rloo_k):
            raise ValueError(f"ppo.rollout_batch_size {ppo.rollout_batch_size} over {self.world} ranks must give a "
                             f"per-rank batch that is a multiple of ppo.rloo_k {ppo.rloo_k}")
        if int(ppo.minibatch_size) > self.batch:
            raise ValueError(f"ppo.minibatch_size {ppo.minibatch_size} exceeds the per-rank batch {self.batch}")

        self.start_table = load_table(config.data.predictor_snapshot)
        self._check_table()
        self.backend = check_backend(backend, "the backend handed to the trainer") if backend is not None \
            else self._load_backend()
        self.reward = reward if reward is not None else reward_from_config(
            OmegaConf.to_container(config.reward, resolve=True))
        self.prompts = self._prompts(config.data.prompts, config.data.prompt_csv)
        self.eval_prompts = self._prompts(config.eval.prompts, None) if config.eval.prompts else self.prompts
        seeds = config.eval.seeds
        self.eval_seeds = parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]

        self.cold = cold_start(self.start_table, float(ppo.dirichlet_concentration), str(ppo.parameterisation))
        torch.manual_seed(int(config.run.seed))          # identical initial policy on every rank
        self.policy = DirichletPolicy(self.cold, hidden=int(ppo.hidden), blocks=int(ppo.blocks),
                                      scale_std=float(ppo.scale_std), train_scale_dir=ppo.train_scale_dir,
                                      train_scale_time=ppo.train_scale_time)
        # The policy is tiny: it lives on the CPU (its generator-seeded sampling stays device-independent); under
        # torchrun its gradients go through gloo ("cpu:gloo,cuda:nccl", backends.distributed.join_process_group).
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=float(ppo.learning_rate),
                                           betas=tuple(float(b) for b in ppo.betas), eps=1e-8,
                                           weight_decay=float(ppo.weight_decay))
        self.iterations = int(ppo.steps)
        self.start_iteration = 0

    # -- setup --------------------------------------------------------------------------------------------------
    def _check_table(self) -> None:
        model, table = self.config.model, self.start_table
        if model.num_steps is not None and int(model.num_steps) != table.num_steps:
            raise ValueError(f"model.num_steps {model.num_steps} differs from the start table's {table.num_steps}")
        if model.num_points is not None and int(model.num_points) != table.num_points:
            raise ValueError(f"model.num_points {model.num_points} differs from the start table's {table.num_points}")
        if table.solver != "epd":
            raise ValueError("RDPO fine-tunes EPD tables; the start table is an iPNDM-plugin table")

    def backend_spec(self) -> tuple[str, dict]:
        return backend_spec(self.config, self.start_table)

    def _load_backend(self) -> Any:
        name, options = self.backend_spec()
        accepted = backend_options(name)
        if accepted is None or "device" in accepted:
            options.setdefault("device", str(self.device))
        return load_backend(name, **options)

    @staticmethod
    def _prompts(inline: Any, path: Any) -> list[str]:
        if inline is not None:
            if isinstance(inline, str):
                return read_prompts(inline)
            prompts = [str(p) for p in inline]
            if not prompts:
                raise ValueError("data.prompts is empty")
            return prompts
        return read_prompts(path)

    # -- one step ----------------------------------------------------------------------------------------------
    def draw(self, step: int) -> tuple[list[str], list[int], torch.Generator]:
        """This rank's prompts (prompt-major, each ``k`` times), noise seeds and policy generator for ``step``."""
        k = int(self.config.ppo.rloo_k)
        groups = self.batch // k
        seed = int(self.config.run.seed)
        rng = np.random.default_rng(_stream_seed(seed, step, 0xA11))
        total = groups * self.world
        # One draw for all ranks, without repetition while the list is long enough; ranks take disjoint slices.
        picks = rng.permutation(len(self.prompts))[:total] if total <= len(self.prompts) else \
            rng.integers(0, len(self.prompts), total)
        mine = picks[self.rank * groups:(self.rank + 1) * groups]
        prompts = [self.prompts[int(p)] for p in mine for _ in range(k)]
        noise_seeds = [TRAIN_SEED_BASE + _stream_seed(seed, step, self.rank, i) % TRAIN_SEED_BASE
                       for i in range(self.batch)]
        generator = torch.Generator().manual_seed(_stream_seed(seed, step, self.rank, 0x5A))
        return prompts, noise_seeds, generator

    def rollout_plan(self, sample: TableSample) -> StepPlan:
        """The sampled per-image rows on the start table's grid and flags. Rollouts keep the start table's AFS
        flag, so the policy is trained for the sampler it is exported to (the authors force AFS off in
        rollouts whatever the table says, docs/authors-code.md §9.37)."""
        place = torch.device(self.backend.device)
        return StepPlan.from_table(self.start_table, rows=sample.rows().map(lambda v: v.to(place)))

    def generate(self, tables: StepPlan | PredictorTable, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Images (decoded, in [-1, 1]) for per-image ``tables`` (a plan) or one table."""
        return generate(self.backend, Sampler.from_table(tables), seeds, prompts, batch=len(seeds),
                        decode=bool(self.config.ppo.decode_rgb)).float()

    def _score(self, images: torch.Tensor, prompts: list[str]) -> Any:
        return self.reward(images, prompts, batch_size=int(self.config.reward.batch_size))

    def _average_gradients(self) -> None:
        if self.world == 1:
            return
        for param in self.policy.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= self.world

    def train_iteration(self, step: int) -> dict:
        """One PPO step: roll out per-image tables, score them, RLOO advantages, ``ppo.ppo_epochs`` epochs of
        clipped minibatch updates (:func:`training.ppo.loss.ppo_loss`). Returns the log record."""
        ppo = self.config.ppo
        prompts, seeds, generator = self.draw(step)
        place = torch.device(self.backend.device)
        if place.type == "cuda":
            torch.cuda.reset_peak_memory_stats(place)
        self.policy.eval()
        with torch.no_grad():
            sample, old_log_prob = self.policy.sample(self.batch, generator=generator)
        if not bool(torch.isfinite(old_log_prob).all()):
            raise FloatingPointError("non-finite log-probability of a sampled table")
        images = self.generate(self.rollout_plan(sample), prompts, seeds)
        result = self._score(images, prompts)
        rewards = result.reward.detach().float().cpu()
        advantages = rloo_advantages(rewards, int(ppo.rloo_k), legacy_mixed=bool(ppo.legacy_mixed_baseline),
                                     standardize=bool(ppo.standardize_advantages))

        self.policy.train()
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "kl", "entropy", "ratio",
                                                          "clip_fraction", "grad_norm", "grad_norm_clipped")}
        order_gen = torch.Generator().manual_seed(_stream_seed(int(self.config.run.seed), step, self.rank, 0xB0))
        minibatch = int(ppo.minibatch_size)
        for _ in range(int(ppo.ppo_epochs)):
            order = torch.randperm(self.batch, generator=order_gen)
            for lo in range(0, self.batch - minibatch + 1, minibatch):
                index = order[lo:lo + minibatch]
                params = self.policy()
                objective = ppo_loss(self.policy.log_prob(sample.select(index), params), old_log_prob[index],
                                     advantages[index], clip_range=float(ppo.clip_range),
                                     kl=self.policy.kl_to_base(params), entropy=self.policy.entropy(params),
                                     kl_coef=float(ppo.kl_coef), entropy_coef=float(ppo.entropy_coef))
                self.optimizer.zero_grad(set_to_none=True)
                objective.loss.backward()
                self._average_gradients()
                norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                                      float(ppo.max_grad_norm) if ppo.max_grad_norm else math.inf)
                clipped = min(float(norm), float(ppo.max_grad_norm)) if ppo.max_grad_norm else float(norm)
                self.optimizer.step()
                for key, value in (*objective._asdict().items(), ("grad_norm", norm)):
                    stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
                stats["grad_norm_clipped"].append(clipped)
        record = {"step": step + 1, **{k: float(np.mean(v)) for k, v in stats.items() if v},
                  "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
                  **{f"{name}_mean": float(values.float().mean()) for name, values in result.raw.items()}}
        if place.type == "cuda":
            record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(place) / 2 ** 30
        return self._all_reduce_mean(record)

    def _all_reduce_mean(self, record: dict) -> dict:
        if self.world == 1:
            return record
        keys = sorted(k for k, v in record.items() if isinstance(v, float))
        values = torch.tensor([record[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return {**record, **{k: float(v) / self.world for k, v in zip(keys, values)}}

    # -- evaluation, export ----------------------------------------------------------------------------------
    def table(self, kind: str = "mean", seconds: float | None = None) -> PredictorTable:
        """The policy's mean (or mode) table with the start table's metadata and the run's."""
        return policy_table(self.policy, self.config, self.start_table, kind, steps=self.iterations, seconds=seconds,
                            world=self.world)

    def evaluate(self, step: int) -> dict:
        """The mean table on the held-out seeds and prompts (deterministic: the same images every time)."""
        table = self.policy.table("mean")
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(len(self.eval_seeds))]
        rewards, raw = [], {}
        mine = list(range(self.rank, len(self.eval_seeds), self.world))        # ranks share the images evenly
        step_size = max(1, int(self.config.reward.batch_size) * 4)
        for lo in range(0, len(mine), step_size):
            chunk = mine[lo:lo + step_size]
            chunk_prompts = [prompts[i] for i in chunk]
            result = self._score(self.generate(table, chunk_prompts, [self.eval_seeds[i] for i in chunk]),
                                 chunk_prompts)
            rewards.append(result.reward.double().sum())
            for name, values in result.raw.items():
                raw[name] = raw.get(name, 0.0) + values.double().sum()
        # Every rank must reduce the same vector, also a rank that got no evaluation images.
        names = sorted(getattr(self.reward, "names", None) or raw)
        totals = torch.tensor([float(sum(rewards)) if rewards else 0.0] + [float(raw.get(n, 0.0)) for n in names],
                              dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        count = len(self.eval_seeds)
        return {"step": step, "eval_reward_mean": float(totals[0]) / count,
                **{f"eval_{n}_mean": float(v) / count for n, v in zip(names, totals[1:])}}

    # -- the loop's hooks (training.runs.TrainingLoop.run) --------------------------------------------------------
    def checkpoint_state(self, done: int) -> dict:
        return {"step": done, "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore(self, saved: dict) -> int:
        self.policy.load_state_dict(saved["policy"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return int(saved["step"])

    def existing_result(self) -> PredictorTable | None:
        done = all((self.run_dir / name).is_file() for name in ("table-mean.pkl", "table-mode.pkl"))
        return load_table(self.run_dir / "table-mean.pkl") if done else None

    def before_loop(self, resumed: bool) -> None:
        if not resumed:
            self._log_eval(self.evaluate(0))

    def score(self, done: int, record: dict) -> bool:
        interval = int(self.config.eval.interval)
        if interval and done % interval == 0 and done != self.iterations:
            self._log_eval(self.evaluate(done))
        return False

    def postfix(self, record: dict) -> dict:
        return {"reward": f"{record['reward_mean']:.4f}", "kl": f"{record['kl']:.3g}"}

    def logs_record(self, done: int) -> bool:
        return done % int(self.config.logging.log_interval) == 0 or done == self.iterations

    def checkpoints_after(self, done: int) -> bool:
        return done % int(self.config.logging.save_interval) == 0

    def finish(self, seconds: float, record: dict) -> PredictorTable:
        """The last evaluation, then the mean and mode tables, the export and the plot (rank 0)."""
        self._log_eval(self.evaluate(self.iterations))
        table = self.table("mean", seconds)
        if self.rank == 0:
            save_table(table, self.run_dir / "table-mean.pkl")
            save_table(table, self.run_dir / "table-mean.json")
            save_table(self.table("mode", seconds), self.run_dir / "table-mode.pkl")
            if self.config.run.export:
                save_table(table, self.config.run.export)
            from .plot import plot_run

            plot_run(self.run_dir)
        return table

    def _log_eval(self, record: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.run_dir / "eval.jsonl", record)


def train(config: DictConfig | str | Path, overrides: list[str] | None = None, *, resume: str | Path | None = None,
          run_dir: str | Path | None = None, backend: Any = None, reward: Any = None, progress: bool = True,
          stop_after: int | None = None) -> tuple[PredictorTable, Path]:
    """Run RDPO: a new run folder under ``run.output_root``, or ``resume`` an existing one (its saved config is
    used). One process, or ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    join_process_group()
    config, folder = open_run(config, overrides, resume, run_dir, load_config,
                              lambda c: (c.run.output_root, c.run.run_name))
    with discard_run_on_failure(folder, fresh=resume is None and run_dir is None):
        trainer = RDPOTrainer(config, folder, backend=backend, reward=reward, progress=progress, stop_after=stop_after)
    table = trainer.run()
    if dist.is_initialized():
        dist.barrier()
    return table, folder

