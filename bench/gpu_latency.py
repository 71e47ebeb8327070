"""GPU latency and memory of EPD against DPM-Solver++(2M), Euler and diffusers' own pipeline, eager and
compiled the way diffusers' documentation recommends (issues 7 and 14).

Models are the real architectures with random weights (built offline by :mod:`backends.testing.random_init`, fp16 for
SD1.5/SD3, bf16 for FLUX and SDXL: diffusers' speed guide runs SDXL in bf16, which also keeps SDXL's VAE out of
its fp16 overflow), wrapped by our backends. Every method is timed end to end for one image: prompt
encoding, sampling and VAE decoding, as diffusers' pipeline does with ``output_type="pt"``.

    python bench/gpu_latency.py --models sd15,sd3-512,sd3-1024,flux --warm-start --json out.json   # one GPU
    torchrun --standalone --nproc_per_node=2 bench/gpu_latency.py --models sd15,sd3-1024,flux \\
        --shard-points --json out2.json                                                        # K points over 2 GPUs
    python bench/gpu_latency.py --models sdxl --repeats 5 --json sdxl.json                       # SDXL, 1024 px
    python bench/gpu_latency.py --models sd15 --size tiny --device cpu --repeats 1                 # dry run

Method names: ``diffusers_dpmpp2m_20`` (the pipeline with DPMSolverMultistepScheduler, 20 steps, eager) and
``diffusers_dpmpp2m_20_compile`` (the same with ``torch.compile(pipe.unet, mode="reduce-overhead",
fullgraph=True)``, or ``pipe.transformer``), ``dpmpp2m_20`` / ``euler_20`` / ``euler_28`` (our solvers),
``epd_k2_nfe20`` (EPD with K = 2 on 10 steps, i.e. 20 sequential evaluations, a uniform hand-made table:
latency does not depend on the table's values); suffix ``_graph`` for CUDA-graph replay of each network call
(:mod:`backends.cuda_graphs`), ``_fast`` for the fast path (``compile=True``: inductor-compiled network and VAE
decoder, graphed text encoders, the whole sampling loop replayed from one graph), ``_sharded`` for the K
points split across the processes (:mod:`solvers.parallel`). Timing: CUDA events; one warm-up run of each
method (it compiles and captures; its wall time is reported as ``first_call_s``), then ``--repeats`` rounds
that interleave the methods; medians. ``--warm-start`` also times, in a new process that finds this run's
compile cache filled, model loading and the first images of the fast path.
Peak memory: ``max_memory_allocated`` over one run after emptying the cache (weights included).
Checks: graph, fast and sharded outputs against the eager ones (relative max difference of the decoded
image), and the sampling loop run under ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import backend_from_pipeline  # noqa: E402
from backends.compile import use_compile_cache  # noqa: E402
from backends.cuda_graphs import GraphedSampler  # noqa: E402
from backends.distributed import barrier, join_process_group, leave_process_group, rank_device  # noqa: E402
from backends.testing.random_init import TINY_RESOLUTION, build_pipeline  # noqa: E402
from safeio import atomic_text  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
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
    "sdxl": ("sdxl", 1024, torch.bfloat16),
}
# Discrete-VP UNet models (SD1.5, SDXL): a UNet peer, a discrete DPM scheduler, no T5 sequence length.
UNET_MODELS = ("sd15", "sdxl")
PROMPT = "a lighthouse on a rocky cliff during a thunderstorm, oil painting"


# -- distributed ------------------------------------------------------------------------------------------
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
    if model in UNET_MODELS:
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


def backend_grid(backend: Any, steps: int) -> torch.Tensor:
    """The backend's default grid of ``steps`` steps (``steps + 1`` points)."""
    return make_sigmas(backend.default_schedule(steps + 1), alphas_cumprod=backend.alphas_cumprod)


def epd_nfe20(backend: Any) -> tuple[torch.Tensor, Any]:
    """EPD's grid and a uniform K = 2 table for NFE 20: 10 steps x 2 sequential evaluations (latency does not
    depend on the table's values)."""
    grid = backend_grid(backend, 10)
    return grid, uniform_table(grid.numpy(), num_points=2)


def _peer_pipeline(pipe: Any, model: str, compiled: bool) -> Any:
    """A second pipeline object over the same modules, with DPMSolverMultistepScheduler and, if ``compiled``,
    the denoiser compiled the way diffusers' documentation says to run it fast:
    ``torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)`` (``pipe.transformer`` for SD3/FLUX).
    The shared pipeline keeps its plain modules, so our backends never call the peer's compiled one."""
    peer = type(pipe)(**pipe.components, **({"add_watermarker": False} if model == "sdxl" else {}))
    peer.set_progress_bar_config(disable=True)
    peer.scheduler = diffusers_scheduler(pipe, model)
    if compiled:
        name = "unet" if model in UNET_MODELS else "transformer"
        setattr(peer, name, torch.compile(getattr(pipe, name), mode="reduce-overhead", fullgraph=True))
    return peer


def bench_model(name: str, size: str, device: torch.device, rank: int, world: int, repeats: int,
                shard_points: bool, methods: set[str] | None = None) -> dict:
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
    kwargs = {} if model in UNET_MODELS else {"max_sequence_length": 256 if model == "sd3" else 512}
    eager = backend_from_pipeline(pipe, resolution=resolution, **kwargs)
    graphed = backend_from_pipeline(pipe, resolution=resolution, cuda_graphs=device.type == "cuda", **kwargs)
    # The fast backend compiles on first use, so it costs nothing when its methods are not selected.
    want_fast = world == 1 and (not methods or any(m.endswith("_fast") for m in methods))
    fast = backend_from_pipeline(pipe, resolution=resolution, compile=True, **kwargs) if want_fast else None
    flow = eager.family == "flow"
    noise = seeded_noise([0], tuple(eager.shape), torch.float32, device=device)
    result["latent_shape"] = list(eager.shape)
    result["guidance"] = eager.guidance

    epd_grid, table = epd_nfe20(eager)
    shard = DistributedPoints() if world > 1 and shard_points else None

    def end_to_end(backend: Any, sample: Callable[[torch.Tensor, Any], torch.Tensor], x_start: float,
                   ) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                cond = backend.encode_prompts([PROMPT])
                return backend.decode(sample(noise * x_start, cond))
        return run

    def ours(backend: Any, solver: str, steps: int, whole_loop: bool = False) -> Callable[[], torch.Tensor]:
        sigmas = backend_grid(eager, steps)
        method = get_solver(solver)
        sample = lambda x, c: method(backend, x, sigmas, c, flow=flow)  # noqa: E731
        return end_to_end(backend, GraphedSampler(sample) if whole_loop else sample, float(sigmas[0]))

    def epd(backend: Any, sharded: bool = False, whole_loop: bool = False) -> Callable[[], torch.Tensor]:
        sample = lambda x, c: sample_epd(backend, x, table, c, flow=flow,  # noqa: E731
                                         shard=shard if sharded else None)
        return end_to_end(backend, GraphedSampler(sample) if whole_loop else sample, float(epd_grid[0]))

    def peer(pipeline: Any) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            generator = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                return pipeline(PROMPT, num_inference_steps=20, guidance_scale=eager.guidance, height=resolution,
                                width=resolution, output_type="pt", generator=generator, **kwargs).images
        return run

    # Which methods each rank runs: the one-GPU ones on rank 0 only (the others wait), sharded ones on all.
    # The fast ones run first, so their first-call times are cold compiles (the peer's compile then finds
    # some Triton kernels cached; the warm-start measurement is the separate process of --first-image).
    single: dict[str, Callable[[], torch.Tensor]] = {}
    if fast is not None:
        single["dpmpp2m_20_fast"] = ours(fast, "dpmpp2m", 20, whole_loop=True)
        single["epd_k2_nfe20_fast"] = epd(fast, whole_loop=True)
        single["euler_20_fast"] = ours(fast, "euler", 20, whole_loop=True)
    if world == 1:
        single["diffusers_dpmpp2m_20"] = peer(_peer_pipeline(pipe, model, compiled=False))
        if device.type == "cuda":
            single["diffusers_dpmpp2m_20_compile"] = peer(_peer_pipeline(pipe, model, compiled=True))
        single["dpmpp2m_20"] = ours(eager, "dpmpp2m", 20)
        single["epd_k2_nfe20"] = epd(eager)
    single["dpmpp2m_20_graph"] = ours(graphed, "dpmpp2m", 20)
    single["epd_k2_nfe20_graph"] = epd(graphed)
    if world == 1:
        single["euler_20_graph"] = ours(graphed, "euler", 20)
        if model == "sd3":
            single["euler_28_graph"] = ours(graphed, "euler", 28)
    everyone: dict[str, Callable[[], torch.Tensor]] = {}
    if shard is not None:
        everyone["epd_k2_nfe20_sharded_graph"] = epd(graphed, sharded=True)
    if methods:
        single = {k: v for k, v in single.items() if k in methods}
        everyone = {k: v for k, v in everyone.items() if k in methods}

    times: dict[str, list[float]] = {k: [] for k in list(single) + list(everyone)}
    first_s: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    failures: dict[str, str] = {}

    def record(label: str, fn: Callable[[], torch.Tensor], warm_up: bool) -> None:
        if label in failures:
            return
        try:
            if warm_up:                    # wall clock: compilation is host work
                _sync(device)
                begin = time.perf_counter()
                out = fn()
                _sync(device)
                first_s[label] = time.perf_counter() - begin
                outputs[label] = out
            else:
                times[label].append(time_once(fn, device)[1])
        except Exception as err:  # noqa: BLE001 - one broken method must not cost the whole run's figures
            failures[label] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
            print(f"{name} {label} failed: {failures[label]}", flush=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for round_index in range(repeats + 1):          # round 0 warms up (compiles, captures the graphs)
            for label, fn in single.items():
                if rank == 0:
                    record(label, fn, round_index == 0)
                barrier()
            for label, fn in everyone.items():
                barrier()                         # all ranks start together
                record(label, fn, round_index == 0)
                barrier()
            if rank == 0:
                print(f"{name} round {round_index}: " + ", ".join(
                    f"{k} {v[-1] * 1e3:.0f} ms" if v else f"{k} first {first_s.get(k, float('nan')):.1f} s"
                    for k, v in times.items() if k not in failures), flush=True)
    result["warnings"] = sorted({str(w.message)[:300] for w in caught})

    if rank == 0:
        result["latency_ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        result["latency_ms_all"] = {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()}
        result["first_call_s"] = first_s
        result["failures"] = failures
        checks = {}
        for fast_label, slow in (("dpmpp2m_20_graph", "dpmpp2m_20"), ("epd_k2_nfe20_graph", "epd_k2_nfe20"),
                                 ("epd_k2_nfe20_sharded_graph", "epd_k2_nfe20_graph"),
                                 ("dpmpp2m_20_fast", "dpmpp2m_20"), ("epd_k2_nfe20_fast", "epd_k2_nfe20"),
                                 ("euler_20_fast", "euler_20_graph")):
            if fast_label in outputs and slow in outputs:
                checks[f"{fast_label}_vs_{slow}"] = rel_diff(outputs[fast_label], outputs[slow])
        checks["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
        result["checks"] = checks
        if fast is not None:
            result["compiled"] = {"network": fast._network_call.active,
                                  "vae_decoder": fast._vae_decode.fn.active,
                                  "text_encoder_graphs": [sum(e is not None for e in g.graphs.values())
                                                          for _, g in fast._text_graphs]}

    # Per-call cost of the network at the batches a step uses (eager, graph replay, fast), its FLOPs, and the
    # once-per-image stages (prompt encoding, VAE decode) eager against fast.
    if rank == 0:
        with torch.no_grad():
            cond1 = eager.encode_prompts([PROMPT])
            calls = {}
            backends = [("eager", eager), ("graph", graphed)] + ([("fast", fast)] if fast is not None else [])
            for images in (1, 2):
                x = noise.repeat(images, 1, 1, 1) * 0.5
                sigma = torch.full((images,), 0.5, device=device)
                cond = cond1.repeat_interleave(images)
                for label, backend in backends:
                    call = lambda b=backend: b(x, sigma, cond)  # noqa: E731
                    for _ in range(3):
                        call()
                    samples = [time_once(call, device)[1] for _ in range(10)]
                    calls[f"{label}_b{images}"] = statistics.median(samples) * 1e3
                calls[f"gflop_b{images}"] = (flops_per_call(eager, x, sigma, cond) or float("nan")) / 1e9
            latents = noise * 0.5
            for label, backend in backends[:1] + backends[2:]:
                for stage, call in (("encode", lambda b=backend: b.encode_prompts([PROMPT])),
                                    ("decode", lambda b=backend: b.decode(latents))):
                    for _ in range(3):
                        call()
                    calls[f"{stage}_{label}"] = statistics.median([time_once(call, device)[1] for _ in range(10)]) * 1e3
            result["call_ms"] = calls
            result["rows_per_image_call"] = 2 if eager.guided else 1
            result["network_gib"] = sum(p.numel() * p.element_size() for p in eager.network.parameters()) / 2 ** 30

    # Sync check and memory: rank 0, one process (the sharded path is checked for syncs too when present).
    if rank == 0 and device.type == "cuda":
        sync = {}
        with torch.no_grad():
            cond = graphed.encode_prompts([PROMPT])
            dpm_grid = backend_grid(eager, 20)
            for label, call in (("dpmpp2m_20_graph", lambda: get_solver("dpmpp2m")(graphed, noise * float(dpm_grid[0]),
                                                                                   dpm_grid, cond, flow=flow)),
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
        for label in ("dpmpp2m_20", "epd_k2_nfe20", "dpmpp2m_20_fast", "epd_k2_nfe20_fast"):
            if label in single and label not in failures:
                memory[label] = peak_memory(single[label], device)
        result["peak_gib"] = memory
        result["allocated_after_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
    return result


def first_image(name: str, device: torch.device) -> dict:
    """Model loading, then the first and second image of the fast path (DPM++ 20, then EPD), in a fresh
    process: run with a filled compile cache this is the warm start a returning user sees."""
    model, resolution, dtype = CONFIGS[name]
    out: dict = {"config": name, "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    _sync(device)
    begin = time.perf_counter()
    pipe = build_pipeline(model, "full", dtype=dtype, device=device, seed=0)
    kwargs = {} if model in UNET_MODELS else {"max_sequence_length": 256 if model == "sd3" else 512}
    fast = backend_from_pipeline(pipe, resolution=resolution, compile=True, **kwargs)
    _sync(device)
    out["load_s"] = time.perf_counter() - begin
    flow = fast.family == "flow"
    noise = seeded_noise([0], tuple(fast.shape), torch.float32, device=device)
    sigmas = backend_grid(fast, 20)
    epd_grid, table = epd_nfe20(fast)
    samplers = {"dpmpp2m_20_fast": (GraphedSampler(lambda x, c: get_solver("dpmpp2m")(fast, x, sigmas, c, flow=flow)),
                                    float(sigmas[0])),
                "epd_k2_nfe20_fast": (GraphedSampler(lambda x, c: sample_epd(fast, x, table, c, flow=flow)),
                                      float(epd_grid[0]))}
    for label, (sample, start) in samplers.items():
        seconds = []
        for _ in range(3):
            begin = time.perf_counter()
            with torch.no_grad():
                fast.decode(sample(noise * start, fast.encode_prompts([PROMPT])))
            _sync(device)
            seconds.append(time.perf_counter() - begin)
        out[label] = {"first_s": seconds[0], "second_s": seconds[1], "third_s": seconds[2]}
    return out


def summary(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "latency_ms" not in r:
            lines.append(f"{r.get('config')}: {json.dumps(r)}")
            continue
        lat = r.get("latency_ms", {})
        lines.append(f"{r['config']} ({r['resolution']} px, world {r['world']}): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in lat.items()) + " ms")
        for base_name in ("dpmpp2m_20_graph", "diffusers_dpmpp2m_20_compile"):
            base = lat.get(base_name)
            if base:
                ratios = {k: v / base for k, v in lat.items() if k != base_name}
                lines.append(f"  / {base_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        for key in ("first_call_s", "failures", "checks", "compiled", "peak_gib", "sync_check", "call_ms"):
            if r.get(key):
                value = r[key]
                if isinstance(value, dict):
                    value = {k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()}
                lines.append(f"  {key}: {value}")
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sd3-512,sd3-1024,flux", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--device", help="default cuda (LOCAL_RANK under torchrun) if available, else cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", help="comma-separated subset of the method names (default: all)")
    parser.add_argument("--shard-points", action="store_true", help="under torchrun: split EPD's K points")
    parser.add_argument("--compile-cache", type=Path,
                        help="compile cache folder (default: a new empty one, so first calls are cold compiles)")
    parser.add_argument("--warm-start", action="store_true",
                        help="after each model, time model loading and the first images of the fast path in a new "
                             "process that finds this run's compile cache filled")
    parser.add_argument("--first-image", metavar="MODEL", help=argparse.SUPPRESS)   # the warm-start process
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names + ([args.first_image] if args.first_image else []) if m not in CONFIGS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    methods = {m.strip() for m in args.methods.split(",")} if args.methods else None
    cache = use_compile_cache(args.compile_cache or tempfile.mkdtemp(prefix="epd-compile-"))
    rank, world, device = join_process_group()
    device = torch.device(args.device) if args.device else device or rank_device("auto")
    if args.first_image:
        print(json.dumps(first_image(args.first_image, device)), flush=True)
        return 0
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": world, "torch": torch.__version__, "compile_cache": str(cache)}
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
        result = bench_model(name, args.size, device, rank, world, args.repeats, args.shard_points, methods)
        torch._dynamo.reset()          # the compiled graphs of this model hold its modules
        _free(device)                  # the model of this round is unreferenced now
        if rank == 0 and args.warm_start and world == 1 and device.type == "cuda":
            command = [sys.executable, __file__, "--first-image", name, "--compile-cache", str(cache)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result["warm_start"] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
            print(f"{name} warm start: {result['warm_start']}", flush=True)
        if rank == 0:
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                atomic_text(args.json, json.dumps({**info, "results": results}, indent=1))
    if rank == 0:
        print(summary(results), flush=True)
    leave_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
