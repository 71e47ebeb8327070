"""GPU latency and memory of EPD against DPM-Solver++(2M), Euler and diffusers' own pipeline (issue 7).

Models are the real architectures with random weights (built offline by :mod:`backends.random_init`, fp16 for
SD1.5/SD3, bf16 for FLUX), wrapped by our backends. Every method is timed end to end for one image: prompt
encoding, sampling and VAE decoding, as diffusers' pipeline does with ``output_type="pt"``.

    python bench/gpu_latency.py --models sd15,sd3-512,sd3-1024,flux --json out.json            # one GPU
    torchrun --standalone --nproc_per_node=2 bench/gpu_latency.py --models sd15,sd3-1024,flux \\
        --shard-points --json out2.json                                                        # K points over 2 GPUs
    python bench/gpu_latency.py --models sd15 --size tiny --device cpu --repeats 1                 # dry run

Method names: ``diffusers_dpmpp2m_20`` (the pipeline with DPMSolverMultistepScheduler, 20 steps),
``dpmpp2m_20`` / ``euler_20`` / ``euler_28`` (our solvers), ``epd_k2_nfe20`` (EPD with K = 2 on 10 steps, i.e.
20 sequential evaluations, a uniform hand-made table: latency does not depend on the table's values),
suffix ``_graph`` for CUDA-graph replay of the network calls (:mod:`backends.cuda_graphs`), ``_sharded`` for
the K points split across the processes (:mod:`solvers.parallel`). Timing: CUDA events, one warm-up run of
each method (it also captures the graphs), then ``--repeats`` rounds that interleave the methods; medians.
Peak memory: ``max_memory_allocated`` over one eager run after emptying the cache (weights included).
Checks: graph vs eager and sharded vs one-GPU outputs (relative max difference of the decoded image), and
the sampling loop run under ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import backend_from_pipeline  # noqa: E402
from backends.random_init import TINY_RESOLUTION, build_pipeline  # noqa: E402
from solvers.core import seeded_noise  # noqa: E402
from solvers.epd import sample_epd  # noqa: E402
from solvers.parallel import DistributedPoints  # noqa: E402
from solvers.registry import get_solver  # noqa: E402
from solvers.schedules import make_sigmas  # noqa: E402
from solvers.table import uniform_table  # noqa: E402

CONFIGS = {  # name: (random_init model, resolution, network dtype)
    "sd15": ("sd15", 512, torch.float16),
    "sd3-512": ("sd3", 512, torch.float16),
    "sd3-1024": ("sd3", 1024, torch.float16),
    "flux": ("flux", 1024, torch.bfloat16),
}
PROMPT = "a lighthouse on a rocky cliff during a thunderstorm, oil painting"


# -- distributed ------------------------------------------------------------------------------------------
def _init() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", rank))
        if not torch.cuda.is_available():      # CPU dry run of the sharded path
            dist.init_process_group("gloo")
            return rank, world, torch.device("cpu")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _broadcast_weights(pipe: Any) -> None:
    """Rank 0's weights everywhere (the random builds are seeded alike; this makes equality certain)."""
    import torch.distributed as dist

    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)


# -- timing -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Seconds of one call: CUDA events on a GPU (the GPU's timeline, host gaps included), else wall time."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sync(device)
    begin.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, begin.elapsed_time(end) / 1000.0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def ceilings(device: torch.device) -> dict:
    """The two ceilings of device/METHOD.md, measured here: a large bf16/fp16 matrix product and a copy."""
    if device.type != "cuda":
        return {}
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        b = torch.randn(8192, 8192, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        times = [time_once(lambda: a @ b, device)[1] for _ in range(10)]
        out[f"matmul_tflops_{str(dtype)[6:]}"] = 2 * 8192 ** 3 / statistics.median(times) / 1e12
    src = torch.randn(2 ** 30, device=device, dtype=torch.float32)    # 4 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [time_once(lambda: dst.copy_(src), device)[1] for _ in range(10)]
    out["copy_tb_s"] = 2 * src.numel() * 4 / statistics.median(times) / 1e12
    return out


# -- one model ----------------------------------------------------------------------------------------------
def diffusers_scheduler(pipe: Any, model: str) -> Any:
    """DPMSolverMultistepScheduler set up as our DPM-Solver++(2M) (the parity tests use the same settings)."""
    from diffusers import DPMSolverMultistepScheduler

    common = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                  final_sigmas_type="zero")
    config = pipe.scheduler.config
    if model == "sd15":
        return DPMSolverMultistepScheduler.from_config(config, **common)
    dynamic = bool(config.get("use_dynamic_shifting", False))
    return DPMSolverMultistepScheduler(num_train_timesteps=config.num_train_timesteps, use_flow_sigmas=True,
                                       prediction_type="flow_prediction", flow_shift=float(config.get("shift", 1.0)),
                                       use_dynamic_shifting=dynamic, time_shift_type="exponential", **common)


def flops_per_call(backend: Any, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            backend(x, sigma, cond)
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - an estimate only; report why it is missing
        print(f"flop count failed: {err}", flush=True)
        return None


def bench_model(name: str, size: str, device: torch.device, rank: int, world: int, repeats: int,
                shard_points: bool) -> dict:
    model, resolution, dtype = CONFIGS[name]
    if size == "tiny":
        resolution = TINY_RESOLUTION[model]
    if device.type != "cuda":
        dtype = torch.float32
    result: dict = {"config": name, "model": model, "resolution": resolution, "dtype": str(dtype)[6:],
                    "world": world}
    start = time.perf_counter()
    pipe = build_pipeline(model, size, dtype=dtype, device=device, seed=0)
    pipe.set_progress_bar_config(disable=True)
    if world > 1:
        _broadcast_weights(pipe)
    _sync(device)
    result["build_s"] = time.perf_counter() - start
    kwargs = {} if model == "sd15" else {"max_sequence_length": 256 if model == "sd3" else 512}
    eager = backend_from_pipeline(pipe, resolution=resolution, **kwargs)
    graphed = backend_from_pipeline(pipe, resolution=resolution, cuda_graphs=device.type == "cuda", **kwargs)
    flow = eager.family == "flow"
    alphas = getattr(eager, "alphas_cumprod", None)
    noise = seeded_noise([0], tuple(eager.shape), torch.float32, device=device)
    result["latent_shape"] = list(eager.shape)
    result["guidance"] = eager.guidance

    def grid(steps: int) -> torch.Tensor:
        return make_sigmas(eager.default_schedule(steps + 1), alphas_cumprod=alphas)

    epd_grid = grid(10)                          # K = 2: 10 steps x 2 sequential evaluations = 20
    table = uniform_table(epd_grid.numpy(), num_points=2)
    shard = DistributedPoints() if world > 1 and shard_points else None

    def ours(backend: Any, solver: str, steps: int) -> Callable[[], torch.Tensor]:
        sigmas = grid(steps)
        method = get_solver(solver)

        def run() -> torch.Tensor:
            with torch.no_grad():
                cond = backend.encode_prompts([PROMPT])
                latents = method(backend, noise * float(sigmas[0]), sigmas, cond, flow=flow)
                return backend.decode(latents)
        return run

    def epd(backend: Any, sharded: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                cond = backend.encode_prompts([PROMPT])
                latents = sample_epd(backend, noise * float(epd_grid[0]), table, cond, flow=flow,
                                     shard=shard if sharded else None)
                return backend.decode(latents)
        return run

    def peer() -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            return pipe(PROMPT, num_inference_steps=20, guidance_scale=eager.guidance, height=resolution,
                        width=resolution, output_type="pt", generator=generator, **kwargs).images

    # Which methods each rank runs: the one-GPU ones on rank 0 only (the others wait), sharded ones on all.
    single: dict[str, Callable[[], torch.Tensor]] = {}
    if world == 1:
        original = pipe.scheduler
        pipe.scheduler = diffusers_scheduler(pipe, model)
        single["diffusers_dpmpp2m_20"] = peer
        single["dpmpp2m_20"] = ours(eager, "dpmpp2m", 20)
        single["epd_k2_nfe20"] = epd(eager, False)
    single["dpmpp2m_20_graph"] = ours(graphed, "dpmpp2m", 20)
    single["epd_k2_nfe20_graph"] = epd(graphed, False)
    if world == 1:
        single["euler_20_graph"] = ours(graphed, "euler", 20)
        if model == "sd3":
            single["euler_28_graph"] = ours(graphed, "euler", 28)
    everyone: dict[str, Callable[[], torch.Tensor]] = {}
    if shard is not None:
        everyone["epd_k2_nfe20_sharded_graph"] = epd(graphed, True)

    times: dict[str, list[float]] = {k: [] for k in list(single) + list(everyone)}
    outputs: dict[str, torch.Tensor] = {}
    def record(label: str, fn: Callable[[], torch.Tensor], warm_up: bool) -> None:
        out, seconds = time_once(fn, device)
        if warm_up:
            outputs[label] = out
        else:
            times[label].append(seconds)

    for round_index in range(repeats + 1):          # round 0 warms up (and captures the graphs)
        for label, fn in single.items():
            if rank == 0:
                record(label, fn, round_index == 0)
            _barrier(world)
        for label, fn in everyone.items():
            _barrier(world)                         # all ranks start together
            record(label, fn, round_index == 0)
            _barrier(world)
        if rank == 0:
            print(f"{name} round {round_index}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()
                                                             if v), flush=True)

    if rank == 0:
        result["latency_ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        result["latency_ms_all"] = {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()}
        checks = {}
        for fast, slow in (("dpmpp2m_20_graph", "dpmpp2m_20"), ("epd_k2_nfe20_graph", "epd_k2_nfe20"),
                           ("epd_k2_nfe20_sharded_graph", "epd_k2_nfe20_graph")):
            if fast in outputs and slow in outputs:
                checks[f"{fast}_vs_{slow}"] = rel_diff(outputs[fast], outputs[slow])
        checks["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
        result["checks"] = checks

    # Per-call cost of the network at the batches a step uses, graph replay vs eager, and its FLOPs.
    if rank == 0:
        with torch.no_grad():
            cond1 = eager.encode_prompts([PROMPT])
            calls = {}
            for images in (1, 2):
                x = noise.repeat(images, 1, 1, 1) * 0.5
                sigma = torch.full((images,), 0.5, device=device)
                cond = cond1.repeat_interleave(images)
                for label, backend in (("eager", eager), ("graph", graphed)):
                    for _ in range(3):
                        backend(x, sigma, cond)
                    samples = [time_once(lambda: backend(x, sigma, cond), device)[1] for _ in range(10)]
                    calls[f"{label}_b{images}"] = statistics.median(samples) * 1e3
                calls[f"gflop_b{images}"] = (flops_per_call(eager, x, sigma, cond) or float("nan")) / 1e9
            result["call_ms"] = calls
            result["rows_per_image_call"] = 2 if eager.guided else 1
            result["network_gib"] = sum(p.numel() * p.element_size() for p in eager.network.parameters()) / 2 ** 30

    # Sync check and memory: rank 0, one process (the sharded path is checked for syncs too when present).
    if rank == 0 and device.type == "cuda":
        sync = {}
        with torch.no_grad():
            cond = graphed.encode_prompts([PROMPT])
            for label, call in (("dpmpp2m_20_graph", lambda: get_solver("dpmpp2m")(graphed, noise * float(grid(20)[0]),
                                                                                   grid(20), cond, flow=flow)),
                                ("epd_k2_nfe20_graph", lambda: sample_epd(graphed, noise * float(epd_grid[0]), table,
                                                                          cond, flow=flow))):
                call()
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    call()
                    sync[label] = "no host synchronisation"
                except RuntimeError as err:
                    sync[label] = f"synchronises: {str(err).splitlines()[0][:200]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        result["sync_check"] = sync
        graphed.graphs.reset()
        memory = {}
        for label in ("dpmpp2m_20", "epd_k2_nfe20"):
            if label in single:
                memory[label] = peak_memory(single[label], device)
        result["peak_gib"] = memory
    if world == 1:
        pipe.scheduler = original
    return result


def summary(results: list[dict]) -> str:
    lines = []
    for r in results:
        lat = r.get("latency_ms", {})
        lines.append(f"{r['config']} ({r['resolution']} px, world {r['world']}): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in lat.items()) + " ms")
        base = lat.get("dpmpp2m_20_graph")
        if base:
            ratios = {k: v / base for k, v in lat.items() if k != "dpmpp2m_20_graph"}
            lines.append("  / dpmpp2m_20_graph: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        if "checks" in r:
            lines.append(f"  checks: {r['checks']}")
        if "peak_gib" in r:
            lines.append(f"  peak GiB: {r['peak_gib']}; sync: {r.get('sync_check')}")
        if "call_ms" in r:
            lines.append(f"  call ms: {r['call_ms']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sd3-512,sd3-1024,flux", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--device", help="default cuda (LOCAL_RANK under torchrun) if available, else cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shard-points", action="store_true", help="under torchrun: split EPD's K points")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in CONFIGS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    rank, world, device = _init()
    if args.device:
        device = torch.device(args.device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": world, "torch": torch.__version__}
    try:
        import diffusers
        import transformers

        info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if rank == 0:
        info["ceilings"] = ceilings(device)
        print(json.dumps(info), flush=True)
    _free(device)
    results = []
    for name in names:
        result = bench_model(name, args.size, device, rank, world, args.repeats, args.shard_points)
        _free(device)                 # the model of this round is unreferenced now
        if rank == 0:
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.json.with_suffix(".tmp")
                tmp.write_text(json.dumps({**info, "results": results}, indent=1))
                os.replace(tmp, args.json)
    if rank == 0:
        print(summary(results), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
