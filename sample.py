"""Sample images with an EPD predictor table (or a baseline solver) on any backend.

    python sample.py --predictor_path exps/digits/epd-nfe9.pkl --seeds 0-63 --grid --outdir samples/digits
    python sample.py --backend digits --solver ipndm --steps 9 --seeds 0-63 --grid
    python sample.py --predictor_path sd15-best.pkl --model_path weights/stable-diffusion-v1-5 \
        --prompt-file src/prompts/eval.txt --seeds 0-99 --batch 16
    torchrun --nproc_per_node=4 sample.py --predictor_path sd3-1024-best.pkl --model_path weights/sd3-medium ...
    python sample.py --predictor_path 00010-imagenet64-4-5-epd-uni1.0-afs.pkl \
        --model_path weights/edm/edm-imagenet-64x64-cond-adm.safetensors --seeds 0-49999 --batch 256

Flag names follow the authors' ``sample.py``. The backend is the table's (``--backend`` may only restate it;
with ``--solver`` it chooses). Each image is written as ``<seed>.png`` (in per-1000 sub-folders unless
``--no-subdirs``) with a JSON sidecar (seed, prompt, solver, table, NFE both ways, backend); images already on
disk are skipped, so an interrupted run resumes. Prompts pair with seeds by position in the seed list, cycling
through the prompt list (the same rule in sample_sd3.py and sample_flux.py). The same seed gives the same image
whatever the batch size or number of processes: each seed has its own noise generator, and under torchrun the
seeds are dealt round-robin to the ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from backends import (backend_options, canonical_backend, check_table_backend, load_backend, options_from_table,
                      resolve_backend)
from backends.compile import use_compile_cache
from backends.generate import Sampler, generate_batches
from safeio.cli import ArgumentParser, entry_point
from solvers.core import parse_seeds
from solvers.parallel import DistributedPoints
from solvers.registry import SOLVERS, SolverSpec, get_solver
from solvers.schedules import SCHEDULES, ScheduleSpec, default_rho, make_sigmas
from safeio import atomic_write, remove_stale_temporaries
from solvers.table import PredictorTable, load_table
from backends.distributed import barrier, join_process_group, leave_process_group
from backends.images import image_grid, png_bytes, to_uint8
from backends.prompts import read_prompts

__all__ = ["parse_seeds", "resolve_predictor_path", "read_prompts", "build_parser", "backend_script_parser",
           "SampleJob", "prepare", "write_samples", "main"]


def resolve_predictor_path(value: str, root: Path = Path("exps")) -> Path:
    """A file, a run folder (newest table inside), or a numeric run id: ``exps/{id:05d}-*`` or, for runs kept
    per model, ``exps/<model>/{id:05d}-*`` (an id found under several models is ambiguous and an error)."""
    path = Path(value)
    if path.is_file():
        return path
    if value.isdigit():
        runs = sorted({*root.glob(f"{int(value):05d}-*"), *root.glob(f"*/{int(value):05d}-*")})
        runs = [r for r in runs if r.is_dir()]
        if not runs:
            raise FileNotFoundError(f"no run folder {root}/{int(value):05d}-* or {root}/*/{int(value):05d}-* for "
                                    f"predictor id {value}")
        if len(runs) > 1:
            raise ValueError(f"predictor id {value} is ambiguous: {', '.join(map(str, runs))}; give the folder")
        path = runs[0]
    if path.is_dir():
        # Tables are .pkl files (ours or the authors' snapshots) or .json files named *table*.
        candidates = [*path.rglob("*.pkl"), *(p for p in path.rglob("*.json") if "table" in p.name)]
        candidates.sort(key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"no predictor table (*.pkl) under {path}")
        return candidates[-1]
    raise FileNotFoundError(f"no predictor table at {value}")


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("--predictor_path", "--predictor", dest="predictor_path",
                        help="table file, run folder, or numeric run id in ./exps")
    parser.add_argument("--solver", help="run a baseline solver instead of a table (e.g. dpmpp2m, ipndm, euler)")
    parser.add_argument("--steps", type=int, help="baseline solver steps (grid of steps+1 points)")
    parser.add_argument("--schedule", default="default", choices=("default",) + SCHEDULES,
                        help="baseline grid; default: the backend's own (tables always use theirs)")
    parser.add_argument("--rho", type=float, help="baseline grid rho (default 7 for polynomial, else 1)")
    parser.add_argument("--afs", action="store_true",
                        help="baseline: analytic first step (docs/authors-code.md §1.3), one evaluation fewer "
                             "(how two-evaluation solvers reach an odd NFE); a table carries its own flag")
    parser.add_argument("--inner-steps", type=int, default=2,
                        help="baseline heun/dpm2: split every grid step by an inner polynomial rho-7 grid of this "
                             "many points, as the authors' samplers do (docs/authors-code.md §4); 2 (default): whole "
                             "steps; 3: their ICCV heun/dpm, 4 evaluations a step")
    parser.add_argument("--afs-every-step", action="store_true",
                        help="with --afs, baseline heun/dpm2: the analytic direction at the first evaluation of "
                             "every grid step, one evaluation fewer per step, as the authors' dpm and ICCV heun do "
                             "by a loop-index bug (docs/authors-code.md §9.5); default: only the run's first")
    parser.add_argument("--grid-variant", default="correct", choices=("correct", "official"),
                        help="baseline grid: correct, or the authors' (docs/authors-code.md §9.7-9.9)")
    parser.add_argument("--model_path", "--model-id", "--model_id", dest="model_path",
                        help="local diffusers folder (SD1.5 also a .ckpt/.safetensors), or a repo id already in "
                             "the local Hugging Face cache; default $SD15_MODEL_PATH / $SDXL_MODEL_PATH / $SD3_MODEL_PATH / "
                             "$FLUX_MODEL_PATH, then the table's model id. EDM: NVIDIA's .pkl or a converted "
                             ".safetensors; default $EDM_<DATASET>_PATH, then weights/edm/ (docs/edm.md)")
    parser.add_argument("--backend", help="a registered backend (ldm/sd15/sd2, sdxl, sd3/sd3.5, flux/flux-schnell, "
                                          "edm or cifar10/ffhq/afhqv2/imagenet64, digits_edm, digits_ddpm, digits, "
                                          "gmm) or your own as package.module:factory (docs/backends/own_model.md): "
                                          "with --solver it chooses; with a table it must match the table's")
    parser.add_argument("--force-backend", action="store_true",
                        help="run the table on --backend although it was fitted for another model (a deliberate "
                             "transfer experiment; the table's own loader options are then not used)")
    parser.add_argument("--backend-config", help="JSON object merged over the table's backend_config")
    parser.add_argument("--resolution", type=int, help="image size in pixels (SD3: 512 or 1024; a table's must match)")
    parser.add_argument("--use_fp16", nargs="?", const=True, default=None, type=str2bool,
                        help="backbone in half precision (fp16; bf16 for FLUX) or, with False, float32; default: "
                             "half on CUDA, float32 on CPU. The ODE state is float32 either way")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available; LOCAL_RANK under torchrun)")
    parser.add_argument("--batch", type=int, default=64, help="maximum images per batch (per process)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the network calls from CUDA graphs (ldm/sd3/flux on a GPU: removes the launch "
                             "overhead that dominates at small batches; same images within fp16 rounding)")
    parser.add_argument("--compile", action="store_true",
                        help="the fast path: torch.compile the network (and a diffusers model's VAE decoder) and "
                             "replay the whole sampling loop from one CUDA graph; the first batch of each shape "
                             "compiles (about a minute for SD1.5, seconds from a filled --compile-cache)")
    parser.add_argument("--compile-cache", type=Path,
                        help="folder for compiled kernels kept between runs (default .cache/compile in the "
                             "repository, or $EPD_COMPILE_CACHE)")
    parser.add_argument("--shard-points", action="store_true",
                        help="under torchrun: every process samples the same images and evaluates its share of the "
                             "K parallel EPD points (latency of one image, not throughput); rank 0 writes them")
    parser.add_argument("--max-batch", type=int, help="maximum rows per network call (CFG and the K parallel EPD "
                                                      "points multiply rows; larger calls are split)")
    parser.add_argument("--seeds", default="0-63", help="e.g. 0-19,25,30-31")
    parser.add_argument("--prompt", help="one prompt for every image (analytic models: a digit, or '' for any)")
    parser.add_argument("--prompt-file", type=Path, help=".txt (one per line) or .csv with a text/prompt/caption column")
    parser.add_argument("--class", dest="class_label", type=int,
                        help="one class label for every image (class-conditional models: ImageNet-64 EDM, the digits); "
                             "default for ImageNet-64: a random label per seed, as EDM's generate.py")
    parser.add_argument("--outdir", type=Path, help="default: samples/<backend>/<solver>_nfe<N>")
    parser.add_argument("--grid", action="store_true", help="also write grid.png of the first 256 seeds")
    parser.add_argument("--subdirs", action=argparse.BooleanOptionalAction, default=True,
                        help="per-1000-seed sub-folders (default on; --no-subdirs to turn off)")
    parser.add_argument("--upscale", type=int, default=0, help="nearest-neighbour upscale for saving (0: auto)")
    return parser


def backend_script_parser(doc: str, backend: str, seeds: str, batch: int, outdir: str) -> argparse.ArgumentParser:
    """The parser of a per-backend script (``sample_sd3.py``, ``sample_flux.py``): the same flags with that
    script's defaults, plus the authors' ``--max-batch-size`` spelling of ``--batch``."""
    parser = build_parser(doc.split("\n\n")[0])
    parser.add_argument("--max-batch-size", dest="batch", type=int, help="images per batch (alias of --batch)")
    parser.set_defaults(backend=backend, seeds=seeds, batch=batch, outdir=Path(outdir))
    return parser


def _backend_from(args: argparse.Namespace, table: PredictorTable | None, device: torch.device | None) -> tuple[Any, str, dict]:
    """The backend of the table (or of ``--backend``), with the command line's options; flags that the backend's
    loader does not take are refused by name (the registry knows what each accepts)."""
    meta = table.metadata if table is not None else {}
    if table is not None:
        warning = check_table_backend(meta.get("backend"), args.backend, table.source, force=args.force_backend)
        if warning:
            print(warning, file=sys.stderr)
    if args.force_backend and (table is None or not args.backend):
        raise ValueError("--force-backend runs a table on another model: give --predictor_path and --backend")
    # A forced table keeps only its steps: its loader options belong to the model it was fitted on.
    table_backend = None if args.force_backend or not meta.get("backend") else canonical_backend(meta["backend"])
    given = args.backend or table_backend or "digits"
    name, entry, config = resolve_backend(given)
    if table_backend:
        config.update(options_from_table(name, meta.get("backend_config"), meta.get("guidance_rate")))
    if args.backend_config:
        try:
            override = json.loads(args.backend_config)
        except json.JSONDecodeError as err:
            raise ValueError(f"--backend-config is not valid JSON: {err}") from None
        if not isinstance(override, dict):
            raise ValueError("--backend-config must be a JSON object")
        resolution = config.get("resolution")
        if table_backend and resolution and override.get("resolution", resolution) != resolution:
            raise ValueError(f"the table was fitted at resolution {resolution}; --backend-config asks for "
                             f"{override['resolution']}")
        config.update(override)
    if args.resolution:
        resolution = config.get("resolution")
        if table_backend and resolution and resolution != args.resolution:
            raise ValueError(f"the table was fitted at resolution {resolution}; --resolution {args.resolution} "
                             "does not match")
        config["resolution"] = args.resolution
    accepted = backend_options(name)

    def takes(option: str) -> bool:
        return accepted is None or option in accepted

    flags = {"--model_path": ("model_path", args.model_path), "--resolution": ("resolution", args.resolution),
             "--use_fp16": ("dtype", args.use_fp16), "--max-batch": ("max_batch", args.max_batch),
             "--cuda-graphs": ("cuda_graphs", args.cuda_graphs or None), "--compile": ("compile", args.compile or None)}
    for flag, (option, value) in flags.items():
        if value is not None and not takes(option):
            kind = " (an exact analytic model)" if entry is not None and not entry.network else ""
            if option in ("cuda_graphs", "compile"):
                raise ValueError(f"{flag} applies to network backends; backend {name!r}{kind} has no such option")
            what = "takes no weights" if option == "model_path" else f"has no {option!r} option"
            raise ValueError(f"{flag} was given, but backend {name!r}{kind} {what}")
    if not takes("dtype"):
        config.pop("dtype", None)      # e.g. an analytic table's torch_dtype: nothing to set
    if args.model_path:
        config["model_path"] = args.model_path
    if args.use_fp16 is not None:
        half = entry.half_dtype if entry is not None else "float16"
        config["dtype"] = half if args.use_fp16 else "float32"
    if device is not None and takes("device"):
        config["device"] = str(device)
    for option, value in (("max_batch", args.max_batch), ("cuda_graphs", args.cuda_graphs), ("compile", args.compile)):
        if value:
            config[option] = value
    return load_backend(name, **config), name, config


@dataclass
class SampleJob:
    """Everything a sampling run needs, checked: what :func:`prepare` builds and :func:`write_samples` runs."""

    args: argparse.Namespace
    seeds: list[int]
    prompts: list[str]
    table: PredictorTable | None
    backend: Any
    backend_name: str
    backend_config: dict
    sampler: Sampler
    shard: Any
    rank: int = 0
    world: int = 1

    @cached_property
    def outdir(self) -> Path:
        nfe = self.sampler.eval_count().sequential
        return self.args.outdir or Path("samples") / self.backend_name.replace(":", "_") / f"{self.sampler.label}_nfe{nfe}"

    def image_path(self, seed: int) -> Path:
        folder = self.outdir / f"{seed - seed % 1000:06d}" if self.args.subdirs else self.outdir
        return folder / f"{seed:06d}.png"


def prepare(args: argparse.Namespace, rank: int = 0, world: int = 1, device: torch.device | None = None) -> SampleJob:
    """Check the arguments, load the table and backend and build the sampler; a user error raises (ValueError,
    FileNotFoundError, TableError, ...) before anything is sampled."""
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    seeds = parse_seeds(args.seeds)
    if bool(args.predictor_path) == bool(args.solver):
        raise ValueError("give either --predictor_path (EPD table) or --solver with --steps (baseline)")
    if args.class_label is not None and args.class_label < 0:
        raise ValueError(f"--class {args.class_label}: class labels are >= 0 (for unconditional samples give "
                         "--prompt '')")
    if args.device:
        check_device(args.device)
    if args.shard_points and not args.predictor_path:
        raise ValueError("--shard-points splits the K points of an EPD table; it needs --predictor_path")
    if args.compile_cache and not args.compile:
        raise ValueError("--compile-cache is the cache of --compile; give --compile too")
    if args.compile:
        use_compile_cache(args.compile_cache)
    if sum(v is not None for v in (args.prompt, args.prompt_file, args.class_label)) > 1:
        raise ValueError("give one of --prompt, --prompt-file and --class")
    if args.class_label is not None:
        args.prompt = str(args.class_label)
    prompts = [args.prompt] if args.prompt is not None else (read_prompts(args.prompt_file) if args.prompt_file else [""])
    table = load_table(resolve_predictor_path(args.predictor_path)) if args.predictor_path else None
    if table is not None and args.afs:
        raise ValueError("--afs is a baseline option; a table carries its own AFS flag")
    if table is not None and (args.inner_steps != 2 or args.afs_every_step):
        raise ValueError("--inner-steps and --afs-every-step are baseline options (give --solver heun or dpm2)")
    if table is None:
        if not args.steps or args.steps < 1:
            raise ValueError("--solver needs --steps >= 1")
        solver = _baseline_solver(args)
    backend, backend_name, backend_config = _backend_from(args, table, device)
    if args.class_label is not None and backend.condition_kind == "none":
        raise ValueError(f"--class {args.class_label}: the {backend_name} model is unconditional")
    if backend.condition_kind != "prompt":    # label conditions are cheap: check them all now
        distinct = list(dict.fromkeys(prompts))
        try:
            backend.encode_prompts(distinct, seeds=list(range(len(distinct))))
        except ValueError as err:
            raise ValueError(f"{args.prompt_file}: {err}" if args.prompt_file else str(err)) from None
    shard = DistributedPoints() if args.shard_points and world > 1 else None
    if table is None:
        spec = _baseline_schedule(args, backend)
        sampler = Sampler.from_solver(solver, make_sigmas(spec, alphas_cumprod=backend.alphas_cumprod), afs=args.afs)
    else:
        sampler = Sampler.from_table(table, shard=shard)
    job = SampleJob(args, seeds, prompts, table, backend, backend_name, backend_config, sampler, shard, rank, world)
    check_outdir(job.outdir, "--outdir" if args.outdir else "the output folder")
    return job


def _baseline_solver(args: argparse.Namespace) -> SolverSpec:
    """``--solver`` with the authors' sub-step options of ``--inner-steps`` and ``--afs-every-step``."""
    solver = get_solver(args.solver)
    if args.inner_steps < 2:
        raise ValueError(f"--inner-steps must be >= 2 (2 keeps every grid step whole; got {args.inner_steps})")
    if args.afs_every_step and not args.afs:
        raise ValueError("--afs-every-step changes where --afs applies; give --afs too")
    if (args.inner_steps != 2 or args.afs_every_step) and not solver.sub_stepped:
        takers = ", ".join(name for name, spec in SOLVERS.items() if spec.sub_stepped)
        raise ValueError(f"--inner-steps and --afs-every-step apply to {takers} (the authors' sub-stepped "
                         f"solvers), not {solver.name}")
    return solver.with_options(inner_steps=args.inner_steps, afs_every_step=args.afs_every_step)


def check_device(name: str) -> torch.device:
    """``--device`` as a torch device that exists here (ValueError naming the flag otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: sampling runs on cpu or cuda")
    return device


def check_outdir(folder: Path, flag: str) -> None:
    """The output folder exists (or can be made) and is writable, before anything is sampled."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {folder} cannot be created ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} is not writable")


def write_samples(job: SampleJob) -> tuple[int, float]:
    """Sample this rank's seeds that are not on disk yet and write each as ``<seed>.png`` with its JSON sidecar
    (atomically, so an interrupted run resumes). Returns (images sampled, seconds)."""
    args, backend, sampler, shard = job.args, job.backend, job.sampler, job.shard
    rank, world, seeds, prompts, table = job.rank, job.world, job.seeds, job.prompts, job.table
    image_path, outdir = job.image_path, job.outdir
    writer = rank == 0 or shard is None          # with sharded points every rank makes the same images
    # Graphed runs replay the whole loop (every network call and solver step) from one CUDA graph per batch
    # shape; with sharded points the loop holds all-reduces, and runs with per-call graphs only.
    graphed = (args.compile or args.cuda_graphs) and shard is None
    sigmas = sampler.sigmas
    nfe = sampler.eval_count()
    cfg_rows = 2 if backend.guided else 1
    if writer:
        remove_stale_temporaries(outdir)        # a killed run's half-written files (never a live write's)
    # Deal seeds to ranks before skipping finished ones, so a resumed run keeps the same assignment. Indices
    # and seeds stay lazy (a range, a Seeds), so a run of 10^9 seeds costs no memory up front.
    mine = range(len(seeds)) if shard is not None else range(rank, len(seeds), world)
    skipped = 0

    def todo() -> Iterator[tuple[int, int]]:
        nonlocal skipped
        for i in mine:
            seed = seeds[i]
            if image_path(seed).is_file() and image_path(seed).with_suffix(".json").is_file():
                skipped += 1
            else:
                yield i, seed

    if rank == 0:
        share = f" (rank 0's share; {world} processes)" if world > 1 else ""
        print(f"{sampler.label} on {backend.name}: {len(sigmas) - 1} steps, NFE "
              f"{nfe.sequential} sequential (the papers' parallel NFE), {nfe.total} total per image"
              f"{' (each a CFG batch of 2)' if cfg_rows == 2 else ''}; {len(mine)} images{share}, those already "
              f"in {outdir} are skipped")
    table_info = None if table is None else {"path": table.source, "name": table.metadata.get("name"),
                                              "source": table.metadata.get("source")}
    saved_config = {k: v for k, v in job.backend_config.items() if k not in ("device",)}
    start = time.perf_counter()
    for_seeds, for_prompts = itertools.tee(todo())
    batches = generate_batches(backend, sampler, (seed for _, seed in for_seeds),
                               (prompts[i % len(prompts)] for i, _ in for_prompts), batch=args.batch, decode=writer,
                               graphed=graphed)
    sampled = 0
    with tqdm(total=len(mine), desc="sampling", unit="img", disable=rank != 0) as bar:
        for number, done in enumerate(batches):
            sampled += len(done.seeds)
            bar.n = skipped + sampled
            bar.set_postfix(skipped=skipped, refresh=False)
            bar.update(0)
            if not writer:
                continue
            images = to_uint8(done.images)
            upscale = args.upscale or backend.save_upscale or max(1, 64 // images.shape[2])
            labels = done.labels
            for j, (seed, prompt, array) in enumerate(zip(done.seeds, done.prompts, images)):
                path = image_path(seed)
                atomic_write(path, png_bytes(array, upscale))
                sidecar = {"seed": seed, "prompt": prompt, "solver": sampler.label, "table": table_info,
                           "nfe": {"sequential": nfe.sequential, "total": nfe.total,
                                   "network_rows_per_evaluation": cfg_rows},
                           "afs": sampler.afs, "sigmas": [float(s) for s in sigmas], "backend": job.backend_name,
                           "backend_config": saved_config, "guidance": backend.guidance}
                if labels is not None:
                    sidecar["class_label"] = labels[j]
                if sampler.solver is not None and sampler.solver.kwargs:
                    sidecar["solver_options"] = dict(sampler.solver.kwargs)   # e.g. inner_steps, afs_every_step
                atomic_write(path.with_suffix(".json"), json.dumps(sidecar, indent=1, default=str).encode())
            if number == 0 and args.compile and rank == 0:
                tqdm.write(f"first batch in {time.perf_counter() - start:.1f} s (compilation included; kept in "
                           f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')})")
        bar.n = skipped + sampled          # the finished images after the last sampled batch
        bar.set_postfix(skipped=skipped)
    elapsed = time.perf_counter() - start
    print(f"{f'rank {rank}: ' if world > 1 else ''}sampled {sampled} images in {elapsed:.2f} s ({skipped} of "
          f"{len(mine)} were already there); images in {outdir}/")
    return sampled, elapsed


@entry_point
def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    # A caller that set up the process group (scripts/reproduce_iccv.py runs several cells) keeps it.
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    rank, world, device = join_process_group()
    if args.device:
        device = check_device(args.device)
    job = prepare(args, rank, world, device)
    write_samples(job)
    barrier()
    if args.grid and rank == 0:
        arrays = [np.asarray(Image.open(job.image_path(s))) for s in job.seeds[:256]]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        grid_path = job.outdir / "grid.png"
        atomic_write(grid_path, png_bytes(image_grid(arrays)))
        print(f"grid: {grid_path}")
    if owns_group:
        leave_process_group()
    return 0


def _baseline_schedule(args: argparse.Namespace, backend: Any) -> ScheduleSpec:
    """The baseline's grid: the backend's default kind (discrete for SD1.5, flowmatch for SD3/FLUX) unless
    ``--schedule`` names one."""
    num_steps = args.steps + 1
    if args.schedule == "default":
        return backend.default_schedule(num_steps, args.grid_variant)
    kind = args.schedule
    if kind == "discrete" and backend.alphas_cumprod is None:
        raise ValueError(f"--schedule discrete needs a discrete-time model (its alphas_cumprod); {backend.name} has none")
    if kind == "flowmatch":
        if not backend.flow:
            raise ValueError("--schedule flowmatch needs a flow-matching backend (sd3, flux)")
        return backend.default_schedule(num_steps, args.grid_variant)
    return ScheduleSpec(kind=kind, num_steps=num_steps, sigma_min=backend.sigma_min, sigma_max=backend.sigma_max,
                        rho=args.rho if args.rho is not None else default_rho(kind), variant=args.grid_variant)


if __name__ == "__main__":
    sys.exit(main())
