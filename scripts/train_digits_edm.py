"""Train the ``digits_edm`` network (a small class-conditional EDM U-Net on the bundled digits at 16x16), or with
``--kind ddpm`` the ``digits_ddpm`` network (the same U-Net as an epsilon-predicting discrete-time DDPM).

    python scripts/train_digits_edm.py --out exps/digits_edm --device cuda --time-budget-s 240
    python scripts/train_digits_edm.py --kind ddpm --out exps/digits_ddpm --device cuda --time-budget-s 240
    python scripts/train_digits_edm.py --out /tmp/d --tiny --steps 20 --batch 16 --device cpu    # smoke run

Data: the 1797 scikit-learn digits, bilinearly upsampled from 8x8 to 16x16, in [-1, 1]; the first 1500 are
trained on (each randomly translated by up to ``--shift-augment`` pixels, border filled with -1), the last 297
held out (:func:`backends.digits_edm.digits_split`). Network: ``EDMPrecond``
(sigma_data 0.5) around a ``SongUNet`` (DDPM++) with 10 classes and label dropout, so that the zero label
(-1) is the unconditional model. Loss: EDM's, ``ln sigma ~ N(-1.2, 1.2^2)``, weight
``(sigma^2 + sd^2) / (sigma sd)^2``. With ``--kind ddpm``: ``DDPMPrecond`` (linear betas 1e-4..0.02, 1000
steps) and Ho et al.'s loss ``|eps - eps(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2``, t uniform. Adam with a linear warm-up then a constant rate; an EMA of the weights with
EDM's half-life and ramp-up. The run stops after ``--steps`` or when ``--time-budget-s`` is spent, whichever
comes first, and still writes everything.

Outputs in ``--out`` (written atomically): ``network.safetensors`` (the EMA network, via
:func:`backends.edm_checkpoint.save_edm`, float16 tensors by default), ``train-log.jsonl`` (training records
every ``--log-every`` steps, held-out evaluations every ``--eval-every``), ``loss.png``, ``samples.png`` (a
grid from a fine solver on the saved network) and ``MODEL_CARD.md``. ``checkpoint.pt`` (every
``--checkpoint-every`` steps and at the end) lets a killed or budget-stopped run continue: running the same
command again resumes from it (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.digits_edm import HELDOUT, NUM_CLASSES, digits_split, load_digits_ddpm, load_digits_edm  # noqa: E402
from backends.edm_checkpoint import save_edm  # noqa: E402
from backends.edm_networks import DDPMPrecond, EDMPrecond  # noqa: E402
from backends.generate import Sampler, generate  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from solvers.schedules import polynomial_sigmas  # noqa: E402
from backends.images import image_grid, png_bytes, to_uint8  # noqa: E402
from safeio import atomic_text, atomic_torch_save, atomic_write  # noqa: E402
from training.runs import truncate_log  # noqa: E402

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5
SAMPLE_SOLVER, SAMPLE_STEPS = "heun", 32        # samples.png and the card's statistics: EDM's Heun, 63 evaluations


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--kind", choices=("edm", "ddpm"), default="edm",
                   help="edm: digits_edm (EDM preconditioning and loss); ddpm: digits_ddpm (epsilon prediction, "
                        "linear betas 1e-4..0.02 over 1000 steps)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default exps/digits_<kind>)")
    p.add_argument("--steps", type=int, default=40000, help="maximum optimiser steps (default 40000)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=1000, help="linear learning-rate warm-up, in steps")
    p.add_argument("--ema-halflife-kimg", type=float, default=500.0, help="EMA half-life in thousands of images")
    p.add_argument("--ema-rampup", type=float, default=0.05,
                   help="EMA half-life at most this fraction of the images seen so far (EDM's ramp-up)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-blocks", type=int, default=1)
    p.add_argument("--attn", default="8", help="resolutions with self-attention (comma list; '' for none)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--shift-augment", type=int, default=1,
                   help="random translation of the training images by up to this many pixels (0: none)")
    p.add_argument("--tiny", action="store_true", help="a very small network for smoke tests "
                                                       "(16 channels, levels 1,2, one block)")
    p.add_argument("--weights-dtype", default="float16", choices=("float16", "float32"),
                   help="tensor dtype of network.safetensors (float16 halves the file; the network computes in float32)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--eval-repeats", type=int, default=4,
                   help="noise draws per image of the held-out evaluation (fixed seed)")
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--card-samples", type=int, default=1000,
                   help="samples for the card's statistics (0: no statistics and no samples.png)")
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS,
                   help=f"steps of the fine {SAMPLE_SOLVER} sampler of samples.png and the statistics")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint.pt in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a status line every --print-every-s")
    p.add_argument("--print-every-s", type=float, default=30.0)
    return p


def architecture(args: argparse.Namespace) -> dict:
    """The ``EDMPrecond`` constructor keywords (recorded in the safetensors header)."""
    if args.tiny:
        mc, mult, blocks, attn = 16, [1, 2], 1, [args.resolution // 2]
    else:
        mc, mult, blocks = args.model_channels, [int(v) for v in args.channel_mult.split(",")], args.num_blocks
        attn = [int(v) for v in args.attn.split(",") if v.strip()]
    kind = {"sigma_data": SIGMA_DATA} if args.kind == "edm" else \
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_timesteps": 1000}
    return dict(img_resolution=args.resolution, img_channels=1, label_dim=NUM_CLASSES, **kind,
                model_type="SongUNet", model_channels=mc, channel_mult=mult, num_blocks=blocks,
                attn_resolutions=attn, dropout=args.dropout, label_dropout=args.label_dropout,
                channel_mult_emb=4, embedding_type="positional", encoder_type="standard", decoder_type="standard")


def shift_augment(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by a random integer offset in ``[-max_shift, max_shift]^2`` (uniform), filling with
    the background value -1 (no wrap-around: the 8x8 digits touch their borders)."""
    if max_shift <= 0:
        return images
    batch, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (batch,), device=images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (batch,), device=images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    picked = padded[torch.arange(batch, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()       # [B, h, w, C] -> [B, C, h, w]


def edm_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
    """EDM's weighted denoising loss per image ``[B]`` (mean over pixels)."""
    batch = images.shape[0]
    rnd = torch.randn([batch, 1, 1, 1], device=images.device, generator=generator)
    sigma = (rnd * P_STD + P_MEAN).exp()
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    noise = torch.randn(images.shape, device=images.device, generator=generator) * sigma
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    denoised = net(images + noise, sigma.flatten(), onehot)
    return (weight * (denoised - images) ** 2).flatten(1).mean(1)


def ddpm_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
    """Ho et al.'s simple loss per image ``[B]``: ``mean (eps - eps(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t))^2``
    with the timestep t uniform over the schedule."""
    batch = images.shape[0]
    abar = torch.as_tensor(net.alphas_cumprod, device=images.device, dtype=torch.float32)
    t = torch.randint(0, abar.numel(), (batch,), device=images.device, generator=generator)
    noise = torch.randn(images.shape, device=images.device, generator=generator)
    a = abar[t].reshape(-1, 1, 1, 1)
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    predicted = net.epsilon(a.sqrt() * images + (1 - a).sqrt() * noise, t, onehot)
    return ((predicted - noise) ** 2).flatten(1).mean(1)


LOSSES = {"edm": edm_loss, "ddpm": ddpm_loss}
PRECONDS = {"edm": EDMPrecond, "ddpm": DDPMPrecond}
LOADERS = {"edm": load_digits_edm, "ddpm": load_digits_ddpm}


def _kind(net: torch.nn.Module) -> str:
    return "ddpm" if isinstance(net, DDPMPrecond) else "edm"


@torch.no_grad()
def eval_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, repeats: int = 4) -> float:
    """The training loss of a fixed set of images with fixed noise and noise levels (seed 12345), eval mode."""
    was_training = net.training
    net.eval()
    gen = torch.Generator(device=images.device).manual_seed(12345)
    total = 0.0
    loss = LOSSES[_kind(net)]
    for _ in range(repeats):
        total += float(loss(net, images, labels, gen).mean())
    net.train(was_training)
    return total / repeats


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# --- outputs ----------------------------------------------------------------------------------------------
def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], path: Path, title: str = "digits_edm training", ylabel: str = "EDM loss") -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6,
                label=f"training loss (mean of {train[0].get('interval', '')} steps)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss_ema"] for r in evals], "o-", ms=3,
                label="EMA net, 297 training images (fixed noise)")
        ax.plot([r["step"] for r in evals], [r["heldout_loss_ema"] for r in evals], "s-", ms=3,
                label=f"EMA net, {HELDOUT} held-out images (fixed noise)")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


@torch.no_grad()
def sample_images(backend, labels: torch.Tensor, seeds: list[int], steps: int = SAMPLE_STEPS) -> torch.Tensor:
    """Images ``[B, 1, R, R]`` in [-1, 1] (CPU) from the fine solver on ``backend``, one noise seed each."""
    sigmas = polynomial_sigmas(steps + 1, backend.sigma_min, backend.sigma_max, 7.0)
    prompts = ["" if int(label) < 0 else str(int(label)) for label in labels]     # "" is unconditional
    return generate(backend, Sampler.from_solver(SAMPLE_SOLVER, sigmas), seeds, prompts, batch=500).cpu()


def save_grid(images: torch.Tensor, rows: int, path: Path, upscale: int = 4, pad: int = 2) -> None:
    atomic_write(path, png_bytes(image_grid(to_uint8(images), pad=pad, rows=rows), upscale))


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Per-query RMS pixel distance to its nearest image in ``bank``."""
    q, b = queries.flatten(1).double(), bank.flatten(1).double()
    d2 = (q * q).sum(1, keepdim=True) - 2 * q @ b.T + (b * b).sum(1)[None]
    return (d2.clamp_min(0).min(1).values / q.shape[1]).sqrt()


def card_statistics(network_path: Path, device: torch.device, samples: int, out: Path,
                    steps: int = SAMPLE_STEPS, kind: str = "edm") -> dict:
    """samples.png (rows: digits 0-9 and unconditional) and sample statistics of the saved network."""
    from solvers.frechet import sample_frechet_distance as frechet_distance

    backend = LOADERS[kind](network_path, device=device, dtype="float32")
    split = digits_split(int(backend.shape[-1]))
    train_images, heldout = split["train"][0], split["heldout"][0]
    cols = 12
    grid_labels = torch.arange(-1, NUM_CLASSES).repeat_interleave(cols)   # first row: unconditional
    grid = sample_images(backend, grid_labels, list(range(len(grid_labels))), steps)
    order = torch.cat([torch.arange(cols, len(grid)), torch.arange(cols)])  # digits 0..9 first, unconditional last
    save_grid(grid[order], NUM_CLASSES + 1, out / "samples.png")
    seeds = list(range(100_000, 100_000 + samples))
    labels = torch.arange(samples) % NUM_CLASSES
    generated = sample_images(backend, labels, seeds, steps)
    uncond = sample_images(backend, torch.full((samples,), -1), [s + samples for s in seeds], steps)
    gen_nn = nearest_distance(generated, train_images)
    held_nn = nearest_distance(heldout, train_images)
    return {
        "sampler": f"{SAMPLE_SOLVER}, {steps} steps ({2 * steps - 1} evaluations), polynomial rho 7, "
                   f"sigma {backend.sigma_max:g} to {backend.sigma_min:g}",
        "num_samples": samples,
        "fd_conditional_vs_train": frechet_distance(generated.flatten(1).numpy(), train_images.flatten(1).numpy()),
        "fd_unconditional_vs_train": frechet_distance(uncond.flatten(1).numpy(), train_images.flatten(1).numpy()),
        "fd_heldout_vs_train": frechet_distance(heldout.flatten(1).numpy(), train_images.flatten(1).numpy()),
        "nn_rms_generated_to_train_median": float(gen_nn.median()),
        "nn_rms_heldout_to_train_median": float(held_nn.median()),
        "generated_closer_than_1e-2_to_a_training_image": float((gen_nn < 1e-2).double().mean()),
    }


def write_card(out: Path, info: dict, stats: dict | None) -> None:
    arch = info["architecture"]
    t = info["training"]
    ddpm = info.get("kind") == "ddpm"
    name = "digits_ddpm" if ddpm else "digits_edm"
    lines = [
        f"# {name}: a small {'epsilon-prediction DDPM' if ddpm else 'EDM network'} on the bundled digits",
        "",
        f"An embedded model of this repository (`load_backend(\"{name}\")`, `backends/digits_edm.py`): "
        "a real trained denoiser, unlike the exact analytic `digits`/`gmm` models"
        + (", and of the kind most community checkpoints are: discrete time, epsilon prediction, linear betas"
           if ddpm else "") + ". Made by "
        f"`scripts/train_digits_edm.py{' --kind ddpm' if ddpm else ''}` (this card, `network.safetensors`, "
        "`train-log.jsonl`, `loss.png` and `samples.png` are its outputs).",
        "",
        "## Data",
        "",
        "scikit-learn's bundled `load_digits` (1797 grey-scale 8x8 digits, 10 classes), pixel values 0..16 mapped "
        "to [-1, 1] and upsampled bilinearly to 16x16 (`align_corners=False`). Trained on the first 1500 images; "
        f"the last {HELDOUT} are held out (used only for the evaluation loss and the statistics below). "
        + (f"Augmentation: every training image is translated by a random integer offset in "
           f"[-{info['shift_augment']}, {info['shift_augment']}] pixels in each direction (uniform; the border "
           "filled with the background value -1), against memorisation of so few images."
           if info["shift_augment"] else "No augmentation."),
        "",
        "## Network",
        "",
        (f"`DDPMPrecond` (epsilon prediction, {arch.get('beta_schedule')} betas {arch.get('beta_start')}.."
         f"{arch.get('beta_end')} over {arch.get('num_timesteps')} steps; D(x, s) = x - s eps(x / sqrt(1 + s^2), t(s)) "
         "with t(s) the fractional timestep)" if ddpm else f"`EDMPrecond` (sigma_data {arch.get('sigma_data')})")
        + " around a class-conditional `SongUNet` (DDPM++ blocks): "
        f"{arch['img_resolution']}x{arch['img_resolution']}x1, {arch['model_channels']} channels, levels "
        f"{arch['channel_mult']}, {arch['num_blocks']} blocks per level, self-attention at "
        f"{arch['attn_resolutions']} (and in the bottleneck), dropout {arch['dropout']}, 10 classes with label "
        f"dropout {arch['label_dropout']} (the zero label, class -1, is the unconditional model; "
        "classifier-free guidance works). "
        f"**{info['parameters']:,} parameters**; `network.safetensors` stores the EMA weights as "
        f"{info['weights_dtype']} ({info['file_bytes'] / 1e6:.2f} MB; the network computes in float32). "
        + ("Noise range: the schedule's own, sigma 0.01..157 (its discrete grid is the `discrete` schedule)."
         if ddpm else "Noise range 0.002..80 (EDM's)."),
        "",
        "## Training",
        "",
        ("- DDPM loss (Ho et al. 2020): |eps - eps(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2, t uniform over "
         "the 1000 steps" if ddpm else
         f"- EDM loss: ln sigma ~ N({P_MEAN}, {P_STD}^2), weight (sigma^2 + 0.25) / (0.5 sigma)^2"),
        f"- Adam (0.9, 0.999, eps 1e-8), learning rate {t['lr']:g} after a linear warm-up of {t['warmup']} steps, "
        f"then constant; batch {t['batch']}; EMA half-life {t['ema_halflife_kimg']:g} kimg with ramp-up "
        f"{t['ema_rampup']:g}",
        f"- **{t['steps']:,} steps** ({t['kimg']:,.1f} kimg, {t['epochs']:,.1f} epochs of the 1500 training "
        f"images){' (stopped by the time budget)' if t['stopped_by_budget'] else ''}",
        f"- **wall time {t['seconds']:.0f} s** on {t['device']} ({t['steps_per_second']:.1f} steps/s), "
        f"torch {t['torch']}, seed {t['seed']}",
        f"- final training loss {t['final_loss']:.4f} (mean of the last logged steps); EMA network on fixed "
        f"noise: {t['train_loss_ema']:.4f} on 297 training images, {t['heldout_loss_ema']:.4f} on the {HELDOUT} "
        "held-out images",
        "",
        "![loss](loss.png)",
        "",
    ]
    if stats:
        lines += [
            "## Samples",
            "",
            f"Rows: digits 0-9, then unconditional; sampler {stats['sampler']}.",
            "",
            "![samples](samples.png)",
            "",
            f"On {stats['num_samples']} samples (data-space Frechet distance over the 256 pixels; RMS pixel "
            "distances in [-1, 1] units):",
            "",
            "| statistic | value |",
            "|---|---|",
            f"| FD(class-conditional samples, training images) | {stats['fd_conditional_vs_train']:.4g} |",
            f"| FD(unconditional samples, training images) | {stats['fd_unconditional_vs_train']:.4g} |",
            f"| FD(held-out images, training images), for scale | {stats['fd_heldout_vs_train']:.4g} |",
            f"| median distance of a sample to its nearest training image | "
            f"{stats['nn_rms_generated_to_train_median']:.4f} |",
            f"| median distance of a held-out image to its nearest training image | "
            f"{stats['nn_rms_heldout_to_train_median']:.4f} |",
            f"| share of samples within 0.01 of a training image (copies) | "
            f"{stats['generated_closer_than_1e-2_to_a_training_image']:.3f} |",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```bash",
        f"python sample.py --backend {name} --solver dpmpp2m --steps 10 --prompt 3 --seeds 0-63 --grid",
        f"python -m solvers.bench --model {name} ...        # docs/bench/{name}.md",
        f"python -m training.distill.launch --config configs/distill/{name}-nfe5.yaml --search",
        "```",
        "",
        f"Created {info['created']}.",
        "",
    ]
    atomic_text(out / "MODEL_CARD.md", "\n".join(lines))


# --- training ------------------------------------------------------------------------------------------------
@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_wall = time.perf_counter()
    out: Path = args.out or ROOT / "exps" / f"digits_{args.kind}"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precond, train_loss = PRECONDS[args.kind], LOSSES[args.kind]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    arch = architecture(args)
    log_path, ckpt_path = out / "train-log.jsonl", out / "checkpoint.pt"

    torch.manual_seed(args.seed)
    net = precond(**arch).to(device).train().requires_grad_(True)
    ema = precond(**arch).to(device).eval().requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    params = sum(p.numel() for p in net.parameters())
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **opt_kwargs)
    step, seconds_before, stopped_by_budget = 0, 0.0, False

    if ckpt_path.is_file() and not args.fresh:
        saved = torch.load(ckpt_path, map_location=device, weights_only=True)
        if saved["architecture"] != json.loads(json.dumps(arch)):
            raise SystemExit(f"error: {ckpt_path} holds another architecture; use --fresh or another --out")
        net.load_state_dict(saved["net"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng"], device)
        step, seconds_before = int(saved["step"]), float(saved["seconds"])
        truncate_log(log_path, "step", step)
        print(f"resuming from {ckpt_path} at step {step}", flush=True)
    elif log_path.exists():
        log_path.unlink()

    split = digits_split(args.resolution)
    train_x, train_y = (t.to(device) for t in split["train"])
    held_x, held_y = (t.to(device) for t in split["heldout"])
    probe_x, probe_y = train_x[:HELDOUT], train_y[:HELDOUT]
    print(f"digits_{args.kind}: {params:,} parameters, {len(train_x)} training / {len(held_x)} held-out images at "
          f"{args.resolution}x{args.resolution}, batch {args.batch}, device {device_name(device)}", flush=True)

    ema_params, net_params = list(ema.parameters()), list(net.parameters())

    def save_checkpoint(seconds: float) -> None:
        atomic_torch_save({"step": step, "seconds": seconds, "architecture": arch, "net": net.state_dict(),
                           "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                           "rng": _rng_state(device)}, ckpt_path)

    def log(record: dict) -> None:
        with log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, desc=f"train digits_{args.kind}", unit="step",
               mininterval=2.0)
    loss_sum = torch.zeros((), device=device)
    interval_start, interval_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    last_loss = float("nan")
    last_print = time.perf_counter()
    while step < args.steps:
        if args.time_budget_s is not None and time.perf_counter() - start_wall >= args.time_budget_s:
            stopped_by_budget = True
            break
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(train_x), (args.batch,), device=device)
        loss = train_loss(net, shift_augment(train_x[idx], args.shift_augment), train_y[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        nimg = step * args.batch
        halflife = min(args.ema_halflife_kimg * 1000, nimg * args.ema_rampup) if args.ema_rampup else \
            args.ema_halflife_kimg * 1000
        beta = 0.5 ** (args.batch / max(halflife, 1e-8))
        torch._foreach_lerp_(ema_params, [p.detach() for p in net_params], 1.0 - beta)
        loss_sum += loss.detach()
        interval_steps += 1
        bar.update()
        if step % args.log_every == 0 or step == args.steps:
            last_loss = float(loss_sum) / interval_steps
            now = time.perf_counter()
            log({"kind": "train", "step": step, "kimg": nimg / 1000, "loss": last_loss, "interval": interval_steps,
                 "lr": lr, "ema_beta": beta, "steps_per_s": interval_steps / (now - interval_start),
                 "seconds": seconds_before + now - run_start})
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2g}")
            if args.no_progress and now - last_print >= args.print_every_s:
                print(f"step {step}/{args.steps}: loss {last_loss:.4f}, lr {lr:.2g}, "
                      f"{interval_steps / (now - interval_start):.1f} steps/s, {now - start_wall:.0f} s", flush=True)
                last_print = now
            loss_sum.zero_()
            interval_start, interval_steps = now, 0
        if step % args.eval_every == 0:
            log({"kind": "eval", "step": step, "train_loss_ema": eval_loss(ema, probe_x, probe_y, args.eval_repeats),
                 "heldout_loss_ema": eval_loss(ema, held_x, held_y, args.eval_repeats),
                 "seconds": seconds_before + time.perf_counter() - run_start})
        if step % args.checkpoint_every == 0:
            save_checkpoint(seconds_before + time.perf_counter() - run_start)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = seconds_before + time.perf_counter() - run_start
    if interval_steps:
        last_loss = float(loss_sum) / interval_steps
        log({"kind": "train", "step": step, "kimg": step * args.batch / 1000, "loss": last_loss,
             "interval": interval_steps, "lr": optimizer.param_groups[0]["lr"], "seconds": train_seconds,
             "steps_per_s": interval_steps / max(time.perf_counter() - interval_start, 1e-9)})
    records = read_log(log_path)
    if math.isnan(last_loss):
        train_records = [r for r in records if r.get("kind") == "train"]
        last_loss = train_records[-1]["loss"] if train_records else float("nan")
    evals = [r for r in records if r.get("kind") == "eval"]
    if evals and evals[-1]["step"] == step:
        final_eval = evals[-1]
    else:
        final_eval = {"kind": "eval", "step": step, "seconds": train_seconds,
                      "train_loss_ema": eval_loss(ema, probe_x, probe_y, args.eval_repeats),
                      "heldout_loss_ema": eval_loss(ema, held_x, held_y, args.eval_repeats)}
        log(final_eval)
    save_checkpoint(train_seconds)
    print(f"stopped at step {step} after {train_seconds:.1f} s of training"
          f"{' (time budget reached)' if stopped_by_budget else ''}; loss {last_loss:.4f}, EMA held-out loss "
          f"{final_eval['heldout_loss_ema']:.4f}", flush=True)

    # the EMA network, float16 tensors by default
    export = precond(**arch).eval().requires_grad_(False)
    export.load_state_dict({k: v.detach().cpu() for k, v in ema.state_dict().items()})
    if args.weights_dtype == "float16":
        export = export.half()
    network_path = out / "network.safetensors"
    source = {"trainer": "scripts/train_digits_edm.py", "data": "sklearn digits 8x8 -> 16x16 bilinear, first 1500",
              "steps": step, "batch": args.batch, "seed": args.seed, "weights": "EMA",
              "weights_dtype": args.weights_dtype, "shift_augment": args.shift_augment, "lr": args.lr,
              "kind": args.kind}
    save_edm(export, network_path, source=source)
    records = read_log(log_path)
    plot_loss(records, out / "loss.png", f"digits_{args.kind} training",
              "EDM loss" if args.kind == "edm" else "DDPM epsilon loss")
    speeds = [r["steps_per_s"] for r in records if r.get("kind") == "train" and r.get("steps_per_s")]
    info = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": args.kind, "architecture": arch,
        "parameters": params, "weights_dtype": args.weights_dtype, "shift_augment": args.shift_augment,
        "file_bytes": network_path.stat().st_size,
        "training": {"steps": step, "batch": args.batch, "kimg": step * args.batch / 1000,
                     "epochs": step * args.batch / len(train_x), "lr": args.lr, "warmup": args.warmup,
                     "ema_halflife_kimg": args.ema_halflife_kimg, "ema_rampup": args.ema_rampup,
                     "seconds": train_seconds, "device": device_name(device), "torch": torch.__version__,
                     "seed": args.seed, "stopped_by_budget": stopped_by_budget, "final_loss": last_loss,
                     "steps_per_second": float(np.median(speeds)) if speeds else step / max(train_seconds, 1e-9),
                     "train_loss_ema": final_eval["train_loss_ema"],
                     "heldout_loss_ema": final_eval["heldout_loss_ema"]},
    }
    stats = None
    if args.card_samples > 0:
        t0 = time.perf_counter()
        stats = card_statistics(network_path, device, args.card_samples, out, args.sample_steps, args.kind)
        info["card_seconds"] = time.perf_counter() - t0
    info["statistics"] = stats
    atomic_text(out / "train-info.json", json.dumps(info, indent=1))
    write_card(out, info, stats)
    print(f"wrote {network_path} ({info['file_bytes'] / 1e6:.2f} MB), {out / 'MODEL_CARD.md'}, loss.png, "
          f"samples.png, train-log.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
