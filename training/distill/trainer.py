"""The Stage-1 distillation loop (docs/authors-code.md §6): fit a predictor table to a teacher's trajectories.

Per iteration (one batch of trajectories, docs/authors-code.md §6.2-6.3):

1. draw the batch's noise and conditions from per-trajectory seeds (so every rank draws different ones,
   a resumed run redraws the same ones, and training seeds never overlap evaluation seeds < 2^31);
2. compute (or load from the cache) the teacher's states at the student's grid points, without gradients;
3. roll the student out step by step from the same noise; after step n the loss
   ``L_n = mean_b mean_elements (x_{n+1}^student - x_{n+1}^teacher)^2`` is back-propagated (through the
   whole student trajectory, as the authors do, or through this step alone) and Adam takes one step;
   the last step may use ``alpha * mean_features (f(student) - f(teacher))^2`` instead;
4. under DDP the gradients are summed over ranks, so N ranks of B/N trajectories give the update of one
   process with B.

Our losses are per-element means; the authors sum over C*H*W (docs/authors-code.md §6.3) and their final feature loss is
broadcast to the pixel shape (docs/authors-code.md §9.23), so both of their terms carry the same C*H*W factor: the ratio
of final to intermediate losses, hence ``alpha``, means the same in both codes. Only the overall scale differs, which
Adam ignores up to its ``eps``.

Every ``validation.every`` iterations the table is scored on held-out trajectories against a converged reference
(:mod:`training.distill.validation`); the best-scoring parameters become the table (``validation.select``), and
``validation.patience`` stops a run that no longer improves. At the end the table is compared with every
handcrafted solver on its best grid at the same NFE and at equal total evaluations, and the last lines say
plainly whether it wins or loses (docs/distill/recipe.md).

A run lives in ``<outdir>/<id>-<name>/``: ``config.yaml``, ``log.jsonl``, ``checkpoint.pt`` (atomic; a killed
run resumes from it and ends with the same table), ``table.pkl``/``table.json``, ``table.png``,
``comparison.json`` and ``summary.json``; with ``export`` set, the final table is also written to that path.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from backends.base import check_backend
from solvers.core import repeat_condition, seeded_noise
from backends.distributed import join_process_group, rank_and_world, rank_device
from backends.prompts import read_prompts
from solvers.epd import epd_sampler_step
from solvers.plan import StepPlan, plugin_order
from solvers.schedules import ScheduleSpec, make_sigmas
from solvers.table import PredictorTable, load_table, save_table

from safeio import atomic_text
from training import features as feature_losses
from training.runs import TRAIN_SEED_BASE, TrainingLoop, discard_run_on_failure, new_run_dir, open_run

from .config import PIXEL_DATASETS, load_config
from .params import TableParameters
from .teacher import TeacherCache, teacher_states
from .validation import (ValidationSet, build_validation, candidate_schedules, compare_with_baselines,
                         comparison_lines)

__all__ = ["Distiller", "train", "noise_seeds", "new_run_dir", "TRAIN_SEED_BASE"]


def noise_seeds(seed: int, ids: torch.Tensor) -> list[int]:
    """Generator seed of each trajectory id (see :data:`TRAIN_SEED_BASE`)."""
    return [TRAIN_SEED_BASE + (int(seed) * 1_000_003 + int(i)) % TRAIN_SEED_BASE for i in ids]


@dataclass
class _Batch:
    ids: torch.Tensor
    x_start: torch.Tensor
    cond: Any
    cond_repeated: Any
    targets: torch.Tensor      # [N-1, b, ...] teacher states at sigma_1 .. sigma_{N-1}


class Distiller(TrainingLoop):
    """One distillation run. ``denoiser``/``backend`` may be injected (tests, custom models); otherwise the
    backend named in the config is loaded. Call :meth:`run`."""

    def __init__(self, config: DictConfig, run_dir: str | Path, *, backend: Any = None,
                 progress: bool = True, stop_after: int | None = None, backend_from_config: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.stop_after = stop_after
        self.desc = f"distill {config.name}"
        self.rank, self.world = rank_and_world()
        self.device = rank_device(config.device)
        # backend_from_config: a caller (the recipe search) loaded the config's backend once and shares it
        self.injected = backend is not None and not backend_from_config
        self.backend = check_backend(backend, "the backend handed to the trainer") if backend is not None \
            else self._load_backend()
        self.flow = self.backend.flow
        self.dtype = self._dtype(config.dtype)
        self.schedule, self.sigmas = self._grid()
        student = config.student
        self.num_rows = len(self.sigmas) - 1
        init: Any = student.init
        if init not in ("uniform", "random"):
            init = load_table(init)
        generator = torch.Generator().manual_seed(int(config.seed))
        self.params = TableParameters(self.num_rows, int(student.num_points), scale_dir=float(student.scale_dir),
                                      scale_time=float(student.scale_time), init=init,
                                      init_positions=list(student.init_positions), generator=generator,
                                      dtype=torch.float64 if self.dtype == torch.float64 else torch.float32).to(self.device)
        optim = config.optim
        self.optimizer = torch.optim.Adam(self.params.parameters(), lr=float(optim.lr),
                                          betas=tuple(float(b) for b in optim.betas), eps=float(optim.eps))
        batch = int(config.batch)
        if batch % self.world:
            raise ValueError(f"batch {batch} is not divisible by the {self.world} ranks")
        self.per_rank = batch // self.world
        self.micro = int(config.batch_gpu or self.per_rank)
        if self.per_rank % self.micro:
            raise ValueError(f"per-rank batch {self.per_rank} is not divisible by batch_gpu {self.micro}")
        self.iterations = math.ceil(float(config.total_kimg) * 1000 / batch)
        self.scheduler = None
        if optim.cosine:  # the authors' T_max and absolute floor (docs/authors-code.md §6.1, 9.27)
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=int(float(config.total_kimg) * 1000) // batch + 1, eta_min=float(optim.eta_min))
        self.loss_steps = self._loss_steps()
        self.data_loss = feature_losses.DataSpaceLoss()
        self.feature_loss = self._feature_loss()
        self.prompts = self._prompts()
        self.cache = self._cache()
        self.start_iteration = 0
        self.teacher_seconds = 0.0
        self.validation: ValidationSet | None = None
        self.best: dict | None = None          # {"iteration", "rmse", "params"}: the best validation score so far
        self.since_best = 0                    # scores since the best one (early stopping)
        self.stopped_early = False

    # -- setup --------------------------------------------------------------------------------------------
    def _load_backend(self) -> Any:
        return self.load_config_backend(self.config)

    @staticmethod
    def load_config_backend(config: DictConfig) -> Any:
        """The backend the config names, on this rank's device, with the config's guidance."""
        from backends import backend_options, load_backend

        options = OmegaConf.to_container(config.backend, resolve=True)
        name = options.pop("name")
        accepted = backend_options(name)
        if accepted is None or "device" in accepted:
            options.setdefault("device", str(rank_device(config.device)))      # this rank's GPU under DDP
        if config.guidance.type in ("cfg", "classifier-free") and float(config.guidance.rate) != 1.0:
            options.setdefault("guidance", float(config.guidance.rate))
        return load_backend(name, **options)

    def _dtype(self, name: str) -> torch.dtype:
        if name == "auto":
            return self.backend.state_dtype
        return {"float32": torch.float32, "float64": torch.float64}[name]

    def _grid(self) -> tuple[ScheduleSpec, torch.Tensor]:
        sched = self.config.schedule
        shift, mu = sched.shift, sched.mu
        if sched.kind == "flowmatch" and shift is None and mu is None:
            shift, mu = self.backend.flow_shift()      # the model's own (static shift, or mu for its resolution)
        spec = ScheduleSpec(kind=sched.kind, num_steps=int(self.config.student.num_steps),
                            sigma_min=float(sched.sigma_min if sched.sigma_min is not None else self.backend.sigma_min),
                            sigma_max=float(sched.sigma_max if sched.sigma_max is not None else self.backend.sigma_max),
                            rho=float(sched.rho), variant=sched.variant, shift=shift, mu=mu)
        if spec.kind == "discrete" and self.backend.alphas_cumprod is None:
            raise ValueError(f"schedule.kind discrete needs a discrete-time model (its alphas_cumprod); the "
                             f"{self.backend.name} backend has none")
        sigmas = make_sigmas(spec, alphas_cumprod=self.backend.alphas_cumprod).double()
        if bool((sigmas <= 0).any()):
            raise ValueError("the student grid must end above sigma = 0 (EPD interpolates geometrically)")
        return spec, sigmas

    def _loss_steps(self) -> set[int]:
        mode = self.config.loss.steps
        if mode == "auto":  # the authors' hard-coded rule (docs/authors-code.md §6.3, 9.24)
            last_only = (self.config.student.solver == "epd" and int(self.config.student.num_steps) < 6
                         and self.config.dataset in PIXEL_DATASETS)
            mode = "last" if last_only else "all"
        return {self.num_rows - 1} if mode == "last" else set(range(self.num_rows))

    def _feature_loss(self) -> Callable | None:
        loss = self.config.loss
        if loss.features == "data":
            return None
        if not loss.features_path:
            raise ValueError(f"loss.features={loss.features} needs loss.features_path: a local weights file "
                             "(nothing is downloaded); or use loss.features=data")
        return feature_losses.make_feature_loss(loss.features, loss.features_path, device=self.device)

    def _prompts(self) -> list[str] | None:
        cond = self.config.conditions
        if not cond.prompt_file:
            return None
        try:
            return read_prompts(cond.prompt_file, cond.prompt_column or None)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{error} (conditions.prompt_file)") from None

    def _cache(self) -> TeacherCache | None:
        root = self.config.teacher.cache
        if not root:
            return None
        key = {"backend": self.backend.describe(), "sigmas": self.sigmas.tolist(), "schedule": self.schedule.to_dict(),
               "teacher": OmegaConf.to_container(self.config.teacher, resolve=True),
               "conditions": OmegaConf.to_container(self.config.conditions, resolve=True),
               "guidance": OmegaConf.to_container(self.config.guidance, resolve=True),
               "seed": int(self.config.seed), "dtype": str(self.dtype), "flow": self.flow}
        key["teacher"].pop("cache", None)
        if int(float(key["teacher"].get("inner_steps", 2))) == 2:
            # No inner split: keep the key that caches written before the option existed were filed under.
            key["teacher"].pop("inner_steps", None)
            key["teacher"].pop("inner_dtype", None)
        else:
            key["teacher"]["inner_steps"] = int(float(key["teacher"]["inner_steps"]))
        return TeacherCache(root, key)

    # -- data ------------------------------------------------------------------------------------------------
    def _conditions(self, ids: torch.Tensor) -> Any:
        cond = self.config.conditions
        if self.prompts is None and int(cond.num_classes) <= 0:
            return None
        picks = [int(np.random.default_rng([int(self.config.seed), int(i), 1]).integers(
            len(self.prompts) if self.prompts is not None else int(cond.num_classes))) for i in ids]
        if self.prompts is None:
            return torch.tensor(picks, dtype=torch.long, device=self.device)
        encoded = self.backend.encode_prompts([self.prompts[p] for p in picks])
        return encoded.to(self.device) if isinstance(encoded, torch.Tensor) else encoded

    def _start_states(self, ids: torch.Tensor) -> torch.Tensor:
        """The initial states of trajectories ``ids``: their noise times sigma_0 (flow matching: the noise)."""
        noise = seeded_noise(noise_seeds(int(self.config.seed), ids), tuple(self.backend.shape), self.dtype,
                             self.device)
        return noise if self.flow else noise * float(self.sigmas[0])

    def _teacher(self, x_start: torch.Tensor, cond: Any) -> torch.Tensor:
        """The teacher's states at the student's grid points (:func:`training.distill.teacher.teacher_states`)."""
        teacher = self.config.teacher
        return teacher_states(self.backend, x_start, self.sigmas, cond, solver=teacher.solver, M=int(teacher.M),
                              schedule=self.schedule if teacher.grid == "same" else None, rtol=float(teacher.rtol),
                              alphas_cumprod=self.backend.alphas_cumprod, flow=self.flow,
                              inner_steps=int(float(teacher.inner_steps)), inner_dtype=teacher.inner_dtype)

    def _batch(self, ids: torch.Tensor) -> _Batch:
        x_start = self._start_states(ids)
        cond = self._conditions(ids)
        targets = self.cache.get(ids) if self.cache is not None else None
        if targets is None:
            start = time.perf_counter()
            targets = self._teacher(x_start, cond)
            self.teacher_seconds += time.perf_counter() - start
            if self.cache is not None:
                self.cache.put(ids, targets)
        targets = targets.to(device=self.device, dtype=self.dtype)
        return _Batch(ids, x_start, cond, repeat_condition(cond, int(self.config.student.num_points)), targets)

    def precompute_teacher(self, iterations: range | None = None, chunk: int | None = None) -> tuple[int, float]:
        """Solve the teacher for the trajectories of ``iterations`` (default: the whole run) that the cache lacks,
        ``chunk`` trajectories per solve (default ``teacher.precompute``), and store them per batch as
        :meth:`_batch` would. The trajectories are the same; only the batch an adaptive teacher shares its step
        size with is larger (each trajectory still meets the tolerance). Returns (trajectories solved, seconds)."""
        if self.cache is None:
            raise ValueError("the teacher cache is off (teacher.cache); it is needed to precompute the teacher")
        chunk = int(chunk or self.config.teacher.precompute)
        iterations = range(self.start_iteration, self.iterations) if iterations is None else iterations
        todo = [(i, ids) for i in iterations for ids in self.batch_ids(i).split(self.micro)
                if not self.cache.has(ids)]
        per_solve = max(1, chunk // max(1, self.micro))
        start, count = time.perf_counter(), 0
        bar = tqdm(total=len(todo), disable=not self.progress or self.rank != 0 or not todo,
                   desc=f"teacher {self.config.name}", unit="batch")
        for lo in range(0, len(todo), per_solve):
            group = [ids for _, ids in todo[lo:lo + per_solve]]
            ids = torch.cat(group)
            states = self._teacher(self._start_states(ids), self._conditions(ids))
            offset = 0
            for part in group:
                self.cache.put(part, states[:, offset:offset + len(part)])
                offset += len(part)
            count += len(ids)
            bar.update(len(group))
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.teacher_seconds += seconds
        return count, seconds

    def batch_ids(self, iteration: int) -> torch.Tensor:
        """This rank's trajectory ids of an iteration (ranks take consecutive slices of the global batch)."""
        first = iteration * int(self.config.batch) + self.rank * self.per_rank
        return torch.arange(first, first + self.per_rank)

    # -- loss --------------------------------------------------------------------------------------------------
    def _step_loss(self, student: torch.Tensor, target: torch.Tensor, last: bool) -> torch.Tensor:
        """Per-sample loss ``[b]`` of one step (module docstring)."""
        data = self.data_loss(student, target)
        if not last or self.feature_loss is None:
            return data
        images_student = self.backend.decode(student)
        with torch.no_grad():
            images_teacher = self.backend.decode(target)
        features = float(self.config.loss.alpha) * self.feature_loss(images_student, images_teacher)
        return features + data if self.config.loss.final == "features+data" else features

    def _reduce_gradients(self) -> None:
        grads = [p.grad for p in self.params.parameters()]
        if self.world > 1:
            present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=self.device)
            dist.all_reduce(present)  # a rank with no gradient for a tensor still joins the sum
            for p, flag in zip(self.params.parameters(), present.tolist()):
                if flag > 0:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
        for p in self.params.parameters():
            if p.grad is not None:  # the authors' guard (docs/authors-code.md §6.3)
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)

    def step_plan(self) -> StepPlan:
        """The student's steps: the run's grid, the differentiable rows and the table's flags (solvers.plan)."""
        student = self.config.student
        return StepPlan(self.sigmas, self.params.row, afs=bool(student.afs), fcn=bool(student.fcn),
                        plugin_order=plugin_order(student.solver, int(student.max_order)))

    def train_iteration(self, iteration: int) -> dict:
        """One batch of trajectories: N-1 optimiser steps. Returns the log record."""
        config = self.config
        batches = [self._batch(ids) for ids in self.batch_ids(iteration).split(self.micro)]
        states = [b.x_start for b in batches]
        histories: list[list[torch.Tensor]] = [[] for _ in batches]
        plan = self.step_plan()
        total_batch = float(config.batch)
        trajectory = config.loss.backprop == "trajectory"
        step_losses = []
        for n in range(self.num_rows):
            self.optimizer.zero_grad(set_to_none=True)
            last = n == self.num_rows - 1
            step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            for c, batch in enumerate(batches):
                x_in = states[c] if trajectory else states[c].detach()
                history = histories[c] if trajectory else [h.detach() for h in histories[c]]
                x_next, _, histories[c] = epd_sampler_step(
                    self.backend, x_in, plan.step(n), batch.cond, history=history, flow=self.flow,
                    cond_repeated=batch.cond_repeated)
                per_sample = self._step_loss(x_next, batch.targets[n], last)
                loss = per_sample.sum() / total_batch
                if n in self.loss_steps and loss.requires_grad:
                    loss.backward(retain_graph=trajectory and not last)
                step_loss += loss.detach().double()
                states[c] = x_next
            if self.world > 1:
                dist.all_reduce(step_loss)
            self._reduce_gradients()
            if any(p.grad is not None for p in self.params.parameters()):
                self.optimizer.step()
            step_losses.append(float(step_loss))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        values = self.params.effective()
        record = {"iteration": iteration + 1, "kimg": (iteration + 1) * int(config.batch) / 1000,
                  "loss": float(sum(step_losses[n] for n in sorted(self.loss_steps))),
                  "step_losses": step_losses, "lr": lr,
                  "positions": values["positions"].tolist(), "weights": values["weights"].tolist()}
        for key in ("dir_scales", "time_scales"):
            if values[key] is not None:
                record[key] = values[key].tolist()
        return record

    # -- run folder (the loop itself is training.runs.TrainingLoop) -----------------------------------------------
    def checkpoint_state(self, done: int) -> dict:
        return {"iteration": done, "params": self.params.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "sigmas": self.sigmas, "best": self.best, "since_best": self.since_best}

    def save_checkpoint(self, done: int) -> None:
        super().save_checkpoint(done)
        if self.rank == 0 and self.config.snapshot_tables:
            save_table(self.table(), self.run_dir / f"table-{done:06d}.pkl")

    def load_checkpoint(self, map_location: Any = None) -> bool:
        return super().load_checkpoint(self.device if map_location is None else map_location)

    def restore(self, saved: dict) -> int:
        grid = saved["sigmas"].double().cpu()
        if grid.shape != self.sigmas.shape or not torch.allclose(grid, self.sigmas):
            raise ValueError(f"{self.checkpoint_path}: saved grid differs from the config's grid")
        self.params.load_state_dict(saved["params"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and saved["scheduler"] is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.best, self.since_best = saved.get("best"), int(saved.get("since_best", 0))
        return int(saved["iteration"])

    def metadata(self, seconds: float | None = None, final_loss: float | None = None) -> dict:
        config = self.config
        info = self.backend.describe()
        if self.injected:  # a model handed in by code: record what it says about itself
            backend, options = info.get("backend", type(self.backend).__name__), {}
        else:              # what load_backend() needs to rebuild it (sample.py reads these two fields)
            options = OmegaConf.to_container(config.backend, resolve=True)
            backend = options.pop("name")
        counts = self.table_eval_count()
        return {
            "name": config.name, "run": self.run_dir.name, "source": "stage-1 distillation (training.distill)",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": backend, "backend_config": options, "model": info, "dataset": config.dataset,
            "guidance_type": config.guidance.type, "guidance_rate": float(config.guidance.rate),
            "schedule": self.schedule.to_dict(),
            "teacher": {"solver": config.teacher.solver, "M": int(config.teacher.M),
                        **({"rtol": float(config.teacher.rtol)} if config.teacher.solver == "reference" else {}),
                        **({"inner_steps": int(float(config.teacher.inner_steps)),
                            "inner_dtype": config.teacher.inner_dtype}
                           if float(config.teacher.inner_steps) > 2 else {})},
            "num_points": int(config.student.num_points), "alpha": float(config.loss.alpha),
            "afs": bool(config.student.afs), "scale_dir": float(config.student.scale_dir),
            "scale_time": float(config.student.scale_time),
            "nfe": {"sequential": counts.sequential, "total": counts.total},
            "loss": OmegaConf.to_container(config.loss, resolve=True),
            "training": {"iterations": self.iterations, "batch": int(config.batch), "kimg": float(config.total_kimg),
                         "seed": int(config.seed), "lr": float(config.optim.lr), "cosine": bool(config.optim.cosine),
                         "world_size": self.world, "seconds": seconds, "final_loss": final_loss,
                         "seed_space": f"noise seeds >= {TRAIN_SEED_BASE}"},
        }

    def table_eval_count(self):
        from solvers.registry import eval_count

        return eval_count("epd", self.sigmas, afs=bool(self.config.student.afs),
                          num_points=int(self.config.student.num_points))

    def table(self, seconds: float | None = None, final_loss: float | None = None, *,
              params: dict | None = None) -> PredictorTable:
        """The table of the current parameters, or of the saved ``params`` (a state dict, e.g. the best)."""
        student = self.config.student
        source = self.params
        if params is not None:
            source = copy.deepcopy(self.params)
            source.load_state_dict(params)
        return source.to_table(self.sigmas, solver=student.solver, afs=bool(student.afs), fcn=bool(student.fcn),
                               max_order=int(student.max_order), metadata=self.metadata(seconds, final_loss))

    # -- validation ------------------------------------------------------------------------------------------
    def reference_settings(self) -> dict:
        """``validation.reference`` with ``auto`` resolved: the adaptive solve for exact models, else dpmpp3m."""
        ref = OmegaConf.to_container(self.config.validation.reference, resolve=True)
        if ref["solver"] == "auto":
            ref["solver"] = "reference" if self.backend.prediction_type == "exact" else "dpmpp3m"
        return {"solver": ref["solver"], "rtol": float(ref["rtol"])} if ref["solver"] == "reference" else \
            {"solver": ref["solver"], "steps": int(ref["steps"])}

    def comparison_schedules(self) -> list:
        sched = self.config.schedule
        shift, mu = sched.shift, sched.mu
        if self.flow and shift is None and mu is None:
            shift, mu = self.backend.flow_shift()
        return candidate_schedules(list(self.config.compare.schedules), float(self.sigmas[-1]), float(self.sigmas[0]),
                                   discrete=self.backend.alphas_cumprod is not None, flow=self.flow,
                                   shift=shift, mu=mu)

    def validation_set(self, sigma_end: float | None = None) -> ValidationSet | None:
        """The run's held-out trajectories (built on first use; None when ``validation.num`` is 0). With
        ``sigma_end`` (a table ending elsewhere than this run's grid), the same trajectories with the reference
        at that sigma."""
        val = self.config.validation
        if int(val.num) == 0:
            return None
        if self.validation is not None and (sigma_end is None or self.validation.covers(sigma_end)):
            return self.validation
        key = {"backend": self.backend.describe(),
               "conditions": OmegaConf.to_container(self.config.conditions, resolve=True),
               "guidance": OmegaConf.to_container(self.config.guidance, resolve=True),
               "seed": int(self.config.seed)}
        built = build_validation(
            self.backend, num=int(val.num), shape=tuple(self.backend.shape), dtype=self.dtype, device=self.device,
            sigma_start=float(self.sigmas[0]), ends=[float(self.sigmas[-1]) if sigma_end is None else sigma_end],
            conditions=self._conditions, reference=self.reference_settings(), key=key, cache_dir=val.cache,
            flow=self.flow, batch=int(val.batch))
        if self.validation is None and sigma_end is None:
            self.validation = built
        return built

    def validate(self, iteration: int) -> float | None:
        """Score the current parameters; keep them if they are the best so far. Returns the RMSE."""
        validation = self.validation_set()
        if validation is None:
            return None
        rmse = validation.rmse(self.backend, self.table())
        if math.isfinite(rmse) and (self.best is None or rmse < self.best["rmse"]):
            self.best = {"iteration": iteration, "rmse": rmse,
                         "params": {k: v.detach().clone() for k, v in self.params.state_dict().items()}}
            self.since_best = 0
        else:
            self.since_best += 1
        return rmse

    def final_table(self, seconds: float | None, final_loss: float | None) -> PredictorTable:
        """The exported table: the best-scoring parameters (``validation.select: best``) or the last ones."""
        use_best = self.config.validation.select == "best" and self.best is not None
        table = self.table(seconds, final_loss, params=self.best["params"] if use_best else None)
        if self.best is not None:
            table.metadata["validation"] = {
                "num_trajectories": int(self.config.validation.num), "reference": self.reference_settings(),
                "seed_space": "noise seeds 2^30 + j", "selected": "best" if use_best else "last",
                "best_iteration": self.best["iteration"], "best_rmse": self.best["rmse"],
                "stopped_early": self.stopped_early}
        return table

    def compare(self, table: PredictorTable) -> dict | None:
        """:func:`training.distill.validation.compare_with_baselines` on this run's validation set."""
        validation = self.validation_set()
        if validation is None or not self.config.compare.enabled:
            return None
        return compare_with_baselines(self.backend, validation, table, self.comparison_schedules(),
                                      list(self.config.compare.solvers),
                                      alphas_cumprod=self.backend.alphas_cumprod)

    # -- the loop's hooks (training.runs.TrainingLoop.run) --------------------------------------------------------
    def existing_result(self) -> PredictorTable | None:
        path = self.run_dir / "table.pkl"
        return load_table(path) if path.is_file() and (self.run_dir / "summary.json").is_file() else None

    def before_loop(self, resumed: bool) -> None:
        if int(self.config.teacher.precompute) > 0:
            self.precompute_teacher()

    def score(self, done: int, record: dict) -> bool:
        """Validation every ``validation.every`` iterations and at the end; True when patience runs out."""
        val = self.config.validation
        if int(val.num) <= 0 or not (done % int(val.every) == 0 or done == self.iterations):
            return False
        record["val_rmse"] = self.validate(done)
        patience = int(val.patience)
        if patience and self.since_best >= patience and done < self.iterations:
            self.stopped_early = True
            tqdm.write(f"validation RMSE has not improved for {patience} scores: stopping at iteration {done} "
                       f"(best {self.best['rmse']:.4g} at iteration {self.best['iteration']})")
        return self.stopped_early

    def postfix(self, record: dict) -> dict:
        shown = {"loss": f"{record['loss']:.4g}"}
        if record.get("val_rmse") is not None:
            shown["val"] = f"{record['val_rmse']:.4g}"
        return {**shown, "lr": f"{record['lr']:.3g}"}

    def checkpoints_after(self, done: int) -> bool:
        return done % int(self.config.checkpoint_every) == 0

    def finish(self, seconds: float, record: dict) -> PredictorTable:
        table = self.final_table(seconds, record.get("loss"))
        if self.rank == 0:
            self.write_results(table)
        return table

    def write_results(self, table: PredictorTable) -> None:
        """Compare with the handcrafted solvers, write the table, its summary and plot (rank 0)."""
        comparison = self.compare(table)
        lines: list[str] = []
        if comparison is not None:
            atomic_text(self.run_dir / "comparison.json", json.dumps(comparison, indent=1))
            summary = comparison["summary"]["tables"]["table"]
            table.metadata["comparison"] = {"validation_rmse": summary["rmse"],
                                            "best_baseline_same_nfe": summary["best_baseline_same_nfe"],
                                            "best_baseline_same_total": summary["best_baseline_same_total"]}
            lines = comparison_lines(comparison)
        save_table(table, self.run_dir / "table.pkl")
        save_table(table, self.run_dir / "table.json")
        if self.config.export:
            save_table(table, self.config.export)  # atomic_write creates the folder
        atomic_text(self.run_dir / "summary.json", json.dumps(
            {"name": self.config.name, "validation": table.metadata.get("validation"),
             "comparison": table.metadata.get("comparison"), "verdict": lines,
             "seconds": table.metadata["training"]["seconds"], "teacher_seconds": round(self.teacher_seconds, 3),
             "iterations": self.iterations}, indent=1))
        if self.config.plot:
            from .plot import plot_run

            plot_run(self.run_dir)
        for line in lines:
            tqdm.write(f"{self.config.name}: {line}")


def train(config: DictConfig | str | Path, overrides: list[str] | None = None, *, resume: str | Path | None = None,
          run_dir: str | Path | None = None, backend: Any = None, progress: bool = True,
          stop_after: int | None = None) -> tuple[PredictorTable, Path]:
    """Run a distillation: a new run folder under ``config.outdir``, or ``resume`` an existing one (its saved
    config is used). Works in one process or under ``torchrun`` (gloo on CPU, NCCL on GPU). With
    ``search.enabled`` the folder holds a recipe search (:mod:`training.distill.search`) instead."""
    join_process_group()
    config, folder = open_run(config, overrides, resume, run_dir, load_config, lambda c: (c.outdir, c.name))
    if config.search.enabled:
        if dist.is_initialized():
            raise ValueError("the recipe search (search.enabled) runs in one process; launch it without torchrun")
        from .search import run_search

        return run_search(config, folder, backend=backend, progress=progress)
    with discard_run_on_failure(folder, fresh=resume is None and run_dir is None):
        distiller = Distiller(config, folder, backend=backend, progress=progress, stop_after=stop_after)
    table = distiller.run()
    if dist.is_initialized():
        dist.barrier()
    return table, folder
