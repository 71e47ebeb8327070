"""Sample images with an EPD predictor table (or a baseline solver) on any available backend.

    python sample.py --predictor_path exps/digits/uniform-start-nfe9.pkl --seeds 0-63 --grid --outdir samples/digits
    python sample.py --backend digits --solver ipndm --steps 9 --seeds 0-63 --grid

Flag names follow the authors' ``sample.py``. Each image is written as ``<seed>.png`` (in per-1000 sub-folders
unless ``--no-subdirs``) with a JSON sidecar (seed, prompt, solver, table, NFE both ways, backend); images already
on disk are skipped, so an interrupted run resumes. Prompts pair with seeds by position in the seed list,
cycling through the prompt list (the same rule in every sampling script). The same seed gives the same image
whatever the batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from backends import load_backend
from solvers.core import seeded_noise
from solvers.epd import sample_epd
from solvers.registry import eval_count, get_solver
from solvers.schedules import ScheduleSpec, default_rho, make_sigmas
from solvers.table import PredictorTable, TableError, UnsafePickleError, load_table

__all__ = ["parse_seeds", "resolve_predictor_path", "read_prompts", "main"]


def parse_seeds(text: str) -> list[int]:
    """``"0-19,25,30-31"`` -> [0..19, 25, 30, 31] (ranges inclusive, order kept, duplicates dropped)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not match:
            raise ValueError(f"bad seed item {part!r}: use numbers and inclusive ranges like 0-19,25")
        if match.group(3) is not None:
            seeds.append(int(match.group(3)))
        else:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ValueError(f"bad seed range {part!r}: end before start")
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ValueError("no seeds given")
    return list(dict.fromkeys(seeds))


def resolve_predictor_path(value: str, root: Path = Path("exps")) -> Path:
    """A file, a run folder (newest table inside), or a numeric run id (``exps/{id:05d}-*``)."""
    path = Path(value)
    if path.is_file():
        return path
    if value.isdigit():
        runs = sorted(root.glob(f"{int(value):05d}-*"))
        if not runs:
            raise FileNotFoundError(f"no run folder {root}/{int(value):05d}-* for predictor id {value}")
        path = runs[-1]
    if path.is_dir():
        # Tables are .pkl files (ours or the authors' snapshots) or .json files named *table*.
        candidates = [*path.rglob("*.pkl"), *(p for p in path.rglob("*.json") if "table" in p.name)]
        candidates.sort(key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"no predictor table (*.pkl) under {path}")
        return candidates[-1]
    raise FileNotFoundError(f"no predictor table at {value}")


def read_prompts(path: Path) -> list[str]:
    """Lines of a .txt file, or the first of the columns text/prompt/caption of a .csv file."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            column = next((c for c in ("text", "prompt", "caption") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise ValueError(f"{path}: CSV needs a 'text', 'prompt' or 'caption' column")
            prompts = [row[column] for row in reader]
    else:
        prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _atomic_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images ``[B, C, H, W]`` -> uint8 ``[B, H, W, C]`` with rounding (not truncation, spec 9.41)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def _pil(array: np.ndarray, upscale: int) -> Image.Image:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def make_grid(images: list[np.ndarray], pad: int = 2) -> np.ndarray:
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def _backend_from(args: argparse.Namespace, table: PredictorTable | None) -> tuple[Any, str, dict]:
    meta = table.metadata if table is not None else {}
    name = args.backend or meta.get("backend") or "digits"
    # The table's backend_config only applies to the table's own backend, not to an override.
    config = dict(meta.get("backend_config") or {}) if name == meta.get("backend") else {}
    if args.backend_config:
        try:
            config.update(json.loads(args.backend_config))
        except json.JSONDecodeError as err:
            raise ValueError(f"--backend-config is not valid JSON: {err}") from None
    if args.model_path:
        raise ValueError(f"--model_path was given, but backend {name!r} takes no weights; the SD1.5/SD3/FLUX "
                         "backends are not part of this build yet")
    if name == "analytic" and "guidance" not in config and meta.get("guidance_rate") is not None:
        config["guidance"] = float(meta["guidance_rate"])
    return load_backend(name, **config), name, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictor_path", help="table file, run folder, or numeric run id in ./exps")
    parser.add_argument("--solver", help="run a baseline solver instead of a table (e.g. dpmpp2m, ipndm, euler)")
    parser.add_argument("--steps", type=int, help="baseline solver steps (grid of steps+1 points)")
    parser.add_argument("--schedule", default="polynomial", choices=["polynomial", "logsnr", "time_uniform"],
                        help="baseline grid (tables always use their own)")
    parser.add_argument("--rho", type=float, help="baseline grid rho (default 7 for polynomial, 1 for time_uniform)")
    parser.add_argument("--model_path", help="backbone weights (not used by the analytic backends)")
    parser.add_argument("--backend", help="override the table's backend: digits, gmm")
    parser.add_argument("--backend-config", help="JSON object merged over the table's backend_config")
    parser.add_argument("--batch", type=int, default=64, help="maximum batch size")
    parser.add_argument("--seeds", default="0-63", help="e.g. 0-19,25,30-31")
    parser.add_argument("--prompt", help="one prompt for every image (analytic models: a digit, or '' for any)")
    parser.add_argument("--prompt-file", type=Path, help=".txt (one per line) or .csv with a 'text' column")
    parser.add_argument("--outdir", type=Path, help="default: samples/<backend>/<solver>_nfe<N>")
    parser.add_argument("--grid", action="store_true", help="also write grid.png of all requested seeds")
    parser.add_argument("--subdirs", action=argparse.BooleanOptionalAction, default=True,
                        help="per-1000-seed sub-folders (default on; --no-subdirs to turn off)")
    parser.add_argument("--upscale", type=int, default=0, help="nearest-neighbour upscale for saving (0: auto)")
    args = parser.parse_args(argv)

    try:
        seeds = parse_seeds(args.seeds)
        if bool(args.predictor_path) == bool(args.solver):
            raise ValueError("give either --predictor_path (EPD table) or --solver with --steps (baseline)")
        table = load_table(resolve_predictor_path(args.predictor_path)) if args.predictor_path else None
        backend, backend_name, backend_config = _backend_from(args, table)
        if args.prompt is not None and args.prompt_file is not None:
            raise ValueError("give --prompt or --prompt-file, not both")
        prompts = [args.prompt] if args.prompt is not None else (read_prompts(args.prompt_file) if args.prompt_file else [""])
        if table is None:
            if not args.steps or args.steps < 1:
                raise ValueError("--solver needs --steps >= 1")
            solver = get_solver(args.solver)
            spec = ScheduleSpec(kind=args.schedule, num_steps=args.steps + 1, sigma_min=backend.sigma_min,
                                sigma_max=backend.sigma_max,
                                rho=args.rho if args.rho is not None else default_rho(args.schedule))
            sigmas = make_sigmas(spec).numpy()
            solver_label = solver.name
        else:
            sigmas = table.sigmas
            solver_label = "epd" if table.solver == "epd" else "epd_plugin"
    except (ValueError, KeyError, FileNotFoundError, TableError, UnsafePickleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    flow = getattr(backend, "family", "ve") == "flow"
    dtype = getattr(backend, "state_dtype", torch.float32)

    def run(denoiser: Any, noise: torch.Tensor, cond: Any) -> torch.Tensor:
        x = noise * float(sigmas[0])
        if table is not None:
            return sample_epd(denoiser, x, table, cond, flow=flow)
        return solver(denoiser, x, sigmas, cond, flow=flow)

    nfe = table.eval_count() if table is not None else eval_count(solver.name, sigmas)
    outdir = args.outdir or Path("samples") / backend_name / f"{solver_label}_nfe{nfe.sequential}"
    upscale = args.upscale or max(1, 64 // backend.shape[-1])

    def image_path(seed: int) -> Path:
        folder = outdir / f"{seed - seed % 1000:06d}" if args.subdirs else outdir
        return folder / f"{seed:06d}.png"

    todo = [(i, s) for i, s in enumerate(seeds) if not (image_path(s).is_file() and image_path(s).with_suffix(".json").is_file())]
    print(f"{solver_label} on {getattr(backend, 'name', backend_name)}: {len(sigmas) - 1} steps, NFE {nfe.sequential} sequential "
          f"(the papers' parallel NFE), {nfe.total} total per image; {len(seeds) - len(todo)} of {len(seeds)} "
          f"images already in {outdir}")
    table_info = None if table is None else {"path": table.source, "name": table.metadata.get("name"),
                                              "source": table.metadata.get("source")}
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="sampling", unit="img") as bar:
        for lo in range(0, len(todo), max(1, args.batch)):
            chunk = todo[lo: lo + args.batch]
            batch_seeds = [s for _, s in chunk]
            batch_prompts = [prompts[i % len(prompts)] for i, _ in chunk]
            noise = seeded_noise(batch_seeds, backend.shape, dtype)
            with torch.no_grad():
                images = to_uint8(backend.decode(run(backend, noise, backend.encode_prompts(batch_prompts))))
            for seed, prompt, array in zip(batch_seeds, batch_prompts, images):
                path = image_path(seed)
                _atomic_bytes(path, lambda tmp, a=array: _pil(a, upscale).save(tmp, format="PNG"))
                sidecar = {"seed": seed, "prompt": prompt, "solver": solver_label, "table": table_info,
                           "nfe": {"sequential": nfe.sequential, "total": nfe.total},
                           "sigmas": [float(s) for s in sigmas], "backend": backend_name,
                           "backend_config": backend_config}
                _atomic_bytes(path.with_suffix(".json"),
                              lambda tmp, d=sidecar: Path(tmp).write_text(json.dumps(d, indent=1)))
            bar.update(len(chunk))
    elapsed = time.perf_counter() - start
    if args.grid:
        arrays = [np.asarray(Image.open(image_path(s))) for s in seeds]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        grid_path = outdir / "grid.png"
        _atomic_bytes(grid_path, lambda tmp: _pil(make_grid(arrays), 1).save(tmp, format="PNG"))
        print(f"grid: {grid_path}")
    print(f"sampled {len(todo)} images in {elapsed:.2f} s; images in {outdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
