"""GPU check of the SD1.5 / SD3-Medium / FLUX.1-dev backends with random weights of the real architectures.

For each model: build the pipeline with random weights on the GPU (no download), save it in diffusers format,
free it, load it back through our backend (``backends.load_backend``, local files only), then sample one image
with EPD (K = 2, a uniform table on the backend's default grid) and with DPM-Solver++(2M), both at the same
number of sequential network evaluations, and report latency, peak GPU memory and the evaluation counts.

    python scripts/gpu_check_backends.py --models sd15,sd3 --json out.json
    python scripts/gpu_check_backends.py --models sd15 --size tiny --device cpu --json /tmp/x.json   # dry run

Random weights make noise images; this measures cost, not quality.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends import load_backend  # noqa: E402
from backends.testing.random_init import TINY_RESOLUTION, build_pipeline  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from solvers.core import EvalCounter, seeded_noise  # noqa: E402
from solvers.epd import sample_epd  # noqa: E402
from solvers.registry import get_solver  # noqa: E402
from solvers.table import uniform_table  # noqa: E402

BACKEND = {"sd15": "ldm", "sd3": "sd3", "flux": "flux"}
HALF = {"sd15": torch.float16, "sd3": torch.float16, "flux": torch.bfloat16}
RESOLUTION = {"sd15": 512, "sd3": 1024, "flux": 1024}
PROMPT = "a lighthouse on a rocky cliff during a thunderstorm, oil painting"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> tuple[object, list[float], float | None]:
    """Run ``fn`` once to warm up, then ``repeats`` times; wall times in seconds and the peak memory (GiB)."""
    out = fn()
    _peak_reset(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, times, _peak_gib(device)


def check(model: str, size: str, device: torch.device, root: Path, nfe: int, repeats: int) -> dict:
    dtype = HALF[model] if device.type == "cuda" else torch.float32
    result: dict = {"model": model, "size": size, "dtype": str(dtype).replace("torch.", "")}
    start = time.perf_counter()
    pipe = build_pipeline(model, size, dtype=dtype, device=device, seed=0)
    _sync(device)
    result["build_s"] = time.perf_counter() - start
    result["parameters"] = {name: sum(p.numel() for p in module.parameters())
                            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    folder = root / model
    start = time.perf_counter()
    pipe.save_pretrained(folder)
    result["save_s"] = time.perf_counter() - start
    result["saved_gib"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 30
    del pipe
    gc.collect()
    _peak_reset(device)

    resolution = RESOLUTION[model] if size == "full" else TINY_RESOLUTION[model]
    start = time.perf_counter()
    backend = load_backend(BACKEND[model], model_path=str(folder), device=str(device),
                           dtype=str(dtype).replace("torch.", ""), resolution=resolution)
    _sync(device)
    result["load_s"] = time.perf_counter() - start
    result["resolution"] = resolution
    result["latent_shape"] = list(backend.shape)
    result["guidance"] = backend.guidance

    cond = backend.encode_prompts([PROMPT])
    noise = seeded_noise([0], tuple(backend.shape), torch.float32, device=backend.device)
    flow = backend.family == "flow"

    # EPD with K = 2: N - 1 steps cost 2 (N - 1) sequential evaluations, so N = nfe/2 + 1.
    epd_grid = backend.default_schedule(nfe // 2 + 1).sigmas(backend.alphas_cumprod)
    table = uniform_table(epd_grid.numpy(), num_points=2)
    baseline_grid = backend.default_schedule(nfe + 1).sigmas(backend.alphas_cumprod)
    dpmpp = get_solver("dpmpp2m")
    runs = {
        "epd_k2": lambda counter: sample_epd(counter, noise * float(epd_grid[0]), table, cond, flow=flow),
        "dpmpp2m": lambda counter: dpmpp(counter, noise * float(baseline_grid[0]), baseline_grid.numpy(), cond,
                                         flow=flow),
    }
    for name, run in runs.items():
        counter = EvalCounter(backend, batch_size=1)
        with torch.no_grad():
            latents, times, peak = timed(lambda: run(counter), device, repeats)
            _peak_reset(device)
            _, decode_times, decode_peak = timed(lambda: backend.decode(latents), device, repeats)
        calls = counter.calls // (repeats + 1)
        rows = counter.items // (repeats + 1)
        result[name] = {
            "sequential_evaluations": calls, "network_rows_per_image": rows * (2 if backend.guided else 1),
            "latency_s": min(times), "latency_s_all": times, "peak_gib": peak,
            "decode_s": min(decode_times), "decode_peak_gib": decode_peak,
            "finite": bool(torch.isfinite(latents).all()),
        }
        print(json.dumps({model: {name: result[name]}}), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return result


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15,sd3,flux")
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--root", type=Path, help="where to save the random pipelines (default: a temp folder)")
    parser.add_argument("--nfe", type=int, default=20, help="sequential network evaluations per image")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    root = args.root or Path(tempfile.mkdtemp(prefix="epd-random-pipelines-"))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "results": []}
    try:
        import diffusers
        import transformers

        info["diffusers"], info["transformers"] = diffusers.__version__, transformers.__version__
    except ImportError:
        pass
    for model in args.models.split(","):
        info["results"].append(check(model.strip(), args.size, device, root, args.nfe, args.repeats))
        gc.collect()            # the backend of this model is gone with check()'s frame; free its memory
        _peak_reset(device)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
