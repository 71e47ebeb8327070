"""Seconds per RDPO (PPO) step at the authors' scale, split by phase (issue 20).

The real trainer (:class:`training.ppo.trainer.RDPOTrainer`) runs the real configuration
(``training/ppo/cfgs/sd3_1024.yaml`` or ``flux_dev.yaml``: batch, K, grid length, guidance, reward batch) on
the real architectures with random weights (:mod:`backends.testing.random_init`, full size), scored by the
HPSv2.1 head built through its own loading code from a random open_clip ViT-H-14 checkpoint written here.
The start table is a hand-made one on the authors' grid (``variant="official"``); the cost of a step does
not depend on any of these values.

    python bench/rdpo_step.py --models sd3_1024,flux_dev --steps 3 --json docs/bench/rdpo_step_h200.json
    python bench/rdpo_step.py --models sd3_1024 --size tiny --device cpu --steps 1      # a dry run

Phases of one step (CUDA-synchronised at their edges, so they add up to the step):
``text`` (prompt encoding), ``sampling`` (the EPD rollouts of all images in one batch), ``decode`` (VAE),
``reward`` (the head, preprocessing included) and ``policy`` (drawing the tables, advantages, the PPO update
and the step's bookkeeping, i.e. the rest). ``network_share`` is the rollouts' counted network FLOPs
(``torch.utils.flop_counter`` on one call, times the calls per rollout) over the sampling time and the matrix
ceiling measured in the same run. The first ``--warmup`` steps (compilation, allocator growth) are not timed.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backends import backend_from_pipeline  # noqa: E402
from backends.compile import use_compile_cache  # noqa: E402
from backends.testing.random_init import TINY_RESOLUTION, build_pipeline  # noqa: E402
from bench.gpu_latency import ceilings, flops_per_call  # noqa: E402
from safeio import atomic_text  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from solvers.core import seeded_noise  # noqa: E402
from solvers.schedules import make_sigmas  # noqa: E402
from solvers.table import save_table, uniform_table  # noqa: E402

__all__ = ["MODELS", "PhaseClock", "bench_model", "fastest_per_model", "main"]


@dataclass(frozen=True)
class Model:
    """One benchmarked configuration: the random-weight architecture, its dtype and the trainer's YAML."""

    architecture: str
    dtype: torch.dtype
    config: str
    max_sequence_length: int


MODELS = {
    "sd3_1024": Model("sd3", torch.float16, "training/ppo/cfgs/sd3_1024.yaml", 256),
    "flux_dev": Model("flux", torch.bfloat16, "training/ppo/cfgs/flux_dev.yaml", 512),
}
PHASES = ("text", "sampling", "decode", "reward", "policy")
# Prompts of the MS-COCO caption kind the configs train on (their content does not change the cost: the text
# encoders pad to a fixed length).
PROMPTS = [f"a photograph of {n} {thing} on a wooden table next to a window, soft morning light"
           for n, thing in enumerate(("apples", "books", "cups", "plants", "cats", "clocks", "shoes", "lamps"))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall time of named phases, synchronised with the device at each edge; nested phases are subtracted
    from the enclosing one, so the phases of a step add up to it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                start, inner = self._stack.pop()
                spent = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
                if self._stack:
                    self._stack[-1][1] += spent
        return timed

    def reset(self) -> None:
        self.seconds = {}


def random_hps_weights(folder: Path, size: str) -> tuple[Path, dict]:
    """A random open_clip checkpoint for the HPS head: ViT-H-14 at full size (fp16 on disk), or the small test
    stand-in of tests/test_rewards_clip.py's kind; returns its path and the head options naming it."""
    import open_clip

    options: dict = {}
    if size == "full":
        model = open_clip.create_model("ViT-H-14", pretrained=None, precision="fp32", device="cpu")
    else:
        config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
        options = {"model_name": "rdpo-bench-tiny", "model_config": config}
        open_clip.factory._MODEL_CONFIGS["rdpo-bench-tiny"] = config
        model = open_clip.create_model("rdpo-bench-tiny", pretrained=None, precision="fp32", device="cpu")
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    return path, options


def bench_model(name: str, size: str, device: torch.device, steps: int, warmup: int, compile: bool,
                work: Path, fuse_qkv: bool = False) -> dict:
    """Build the model, the head and the trainer; time ``steps`` PPO steps after ``warmup``."""
    from training.ppo.config import load_config
    from training.ppo.trainer import RDPOTrainer
    from training.rewards import reward_from_config

    spec = MODELS[name]
    dtype = spec.dtype if device.type == "cuda" else torch.float32
    config_path = ROOT / spec.config
    started = time.perf_counter()
    pipe = build_pipeline(spec.architecture, size, dtype=dtype, device=device, seed=0)
    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    build_s = time.perf_counter() - started
    weights, head_options = random_hps_weights(work, size)

    from omegaconf import OmegaConf

    yaml = OmegaConf.load(config_path)
    resolution = int(yaml.model.resolution) if size == "full" else TINY_RESOLUTION[spec.architecture]
    options = dict(guidance=float(yaml.model.guidance_rate), resolution=resolution,
                   max_sequence_length=spec.max_sequence_length)
    backend = backend_from_pipeline(pipe, compile=compile, fuse_qkv=fuse_qkv, **options)
    eager = backend if not compile else backend_from_pipeline(pipe, **options)
    grid = make_sigmas(backend.default_schedule(int(yaml.model.num_steps), "official"))
    table = uniform_table(grid.numpy(), num_points=int(yaml.model.num_points), positions=(0.335, 0.665),
                          backend=backend.name, name=f"{name}-bench-start")
    table_path = save_table(table, work / f"{name}-start.pkl")
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    overrides = [f"data.predictor_snapshot={table_path}", f"data.prompts={prompt_file}", "data.prompt_csv=null",
                 f"eval.prompts={prompt_file}", "eval.interval=0", f"run.output_root={work}",
                 f"reward.heads.hps.weights_path={weights}", f"run.device={device}"]
    config = load_config(config_path, overrides)
    heads = OmegaConf.to_container(config.reward, resolve=True)
    heads["heads"]["hps"].update(head_options, device=str(device))
    reward = reward_from_config(heads)
    trainer = RDPOTrainer(config, work / "run", backend=backend, reward=reward, progress=False)

    clock = PhaseClock(device)
    backend.encode_prompts = clock.wrap("text", backend.encode_prompts)
    backend.decode = clock.wrap("decode", backend.decode)
    trainer.generate = clock.wrap("sampling", trainer.generate)     # text and decode are taken out of it
    trainer._score = clock.wrap("reward", trainer._score)
    step_fn = clock.wrap("policy", trainer.train_iteration)          # the rest of the step

    records, per_step = [], []
    first_s = None
    for step in range(warmup + steps):
        clock.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        records.append(step_fn(step))
        total = time.perf_counter() - t0
        if step < warmup:
            first_s = total if first_s is None else first_s
            continue
        per_step.append({"total": total, **{p: clock.seconds.get(p, 0.0) for p in PHASES}})
        print(f"{name} step {step + 1 - warmup}/{steps}: {total:.2f} s "
              + " ".join(f"{p} {clock.seconds.get(p, 0.0):.2f}" for p in PHASES), flush=True)

    median = {key: statistics.median(s[key] for s in per_step) for key in ("total", *PHASES)}
    # Network FLOPs of one rollout: one guided call for the batch, counted, times the calls of the EPD rollout.
    batch = int(config.ppo.rollout_batch_size)
    calls = table.eval_count().total
    with torch.no_grad():
        cond = eager.encode_prompts(PROMPTS[:batch] * (batch // len(PROMPTS[:batch]) or 1))
        x = seeded_noise(list(range(batch)), tuple(eager.shape), torch.float32, device=device)
        flops = flops_per_call(eager, x, torch.full((batch,), float(grid[1]), device=device), cond)
    result = {
        "config": name, "size": size, "resolution": resolution, "dtype": str(dtype)[6:], "compile": compile,
        "fuse_qkv": fuse_qkv,
        "rollout_batch_size": batch, "num_steps": table.num_steps, "num_points": table.num_points,
        "guidance": backend.guidance, "guided_rows_per_call": batch * (2 if backend.guided else 1),
        "network_calls_per_rollout": calls, "build_s": build_s, "first_step_s": first_s,
        "seconds_per_step": median["total"], "split_s": {p: median[p] for p in PHASES},
        "steps_timed": steps, "per_step": per_step,
        "peak_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda" else None,
        "reward_mean_last": records[-1].get("reward_mean"),
    }
    if flops:
        result["network_tflop_per_rollout"] = flops * calls / 1e12
        result["network_tflop_per_row"] = flops / result["guided_rows_per_call"] / 1e12
        result["network_tflop_s_during_sampling"] = flops * calls / median["sampling"] / 1e12
    return result


def fastest_per_model(info: dict) -> dict:
    """``info`` with, under each model's name, its fastest variant's result (``seconds_per_step``, the split)."""
    out = {k: v for k, v in info.items() if k not in MODELS}
    for name in MODELS:
        runs = {k: v for k, v in info["results"].items() if v["config"] == name}
        if runs:
            best = min(runs, key=lambda k: runs[k]["seconds_per_step"])
            out[name] = {"variant": best, **runs[best]}
    return out


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd3_1024,flux_dev", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--compile", default="off", choices=("off", "on", "both"),
                        help="the backend's fast path (compiled network and VAE decoder)")
    parser.add_argument("--fuse-qkv", action="store_true",
                        help="fuse each attention's q/k/v projections (the backend's fuse_qkv option)")
    parser.add_argument("--json", type=Path, help="write the results here (merged with what the file holds)")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    use_compile_cache(tempfile.mkdtemp(prefix="epd-compile-"))
    info: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "ceilings": ceilings(device), "results": {}}
    if args.json and args.json.is_file():
        info["results"] = json.loads(args.json.read_text()).get("results", {})
    print(json.dumps({k: v for k, v in info.items() if k != "results"}), flush=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for name in names:
        for compile in modes:
            with tempfile.TemporaryDirectory(prefix="rdpo-bench-") as work:
                result = bench_model(name, args.size, device, args.steps, args.warmup, compile, Path(work),
                                     args.fuse_qkv)
            key = name + ("_fast" if compile else "_eager") + ("_fused" if args.fuse_qkv else "")
            ceiling = info["ceilings"].get(f"matmul_tflops_{result['dtype']}")
            if ceiling and result.get("network_tflop_s_during_sampling"):
                result["network_share_of_ceiling"] = result["network_tflop_s_during_sampling"] / ceiling
            info["results"][key] = result
            print(json.dumps({k: v for k, v in result.items() if k != "per_step"}), flush=True)
            if args.json:
                atomic_text(args.json, json.dumps(fastest_per_model(info), indent=1))
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
