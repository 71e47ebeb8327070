"""RDPO on the embedded `digits` model, end to end on a CPU: the offline demonstration of Stage 2.

Trains `training/ppo/cfgs/digits.yaml` (CFG 2, reward = digit-classifier probability of the prompted digit +
0.5 x closeness to the nearest training digit, prompts 0-7) from the distilled NFE-3 table, once with the
per-prompt RLOO baseline and once with the authors' mixed-prompt baseline, for several seeds each. Then it
evaluates the start table, every final table and a 200-step Heun reference on fresh seeds (never used for
training or monitoring), separately for the training prompts 0-7 and the unseen prompts 8-9, and writes

    docs/rdpo/digits.json      all numbers, wall times
    docs/rdpo/digits.md        the tables quoted in the README
    docs/rdpo/digits.png       held-out reward and training-reward curves, per-prompt vs legacy baseline
    docs/rdpo/digits-samples.png   the same seeds with the start table and the RDPO table
    exps/rdpo/digits-nfe3-rdpo.pkl the RDPO table of seed 0 (per-prompt baseline)

    python scripts/rdpo_digits_demo.py [--seeds 0,1,2] [--steps 100]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends import load_backend  # noqa: E402
from backends.generate import Sampler, generate  # noqa: E402
from safeio.cli import ArgumentParser, entry_point  # noqa: E402
from solvers.schedules import polynomial_sigmas  # noqa: E402
from safeio import atomic_write  # noqa: E402
from solvers.table import load_table, save_table  # noqa: E402
from training.ppo import load_config, train  # noqa: E402
from training.ppo.plot import plot_curves  # noqa: E402
from training.rewards import reward_from_config  # noqa: E402
from backends.analytic import load_digits_data  # noqa: E402
from training.rewards.digits import nearest_training_distance  # noqa: E402

CONFIG = ROOT / "training" / "ppo" / "cfgs" / "digits.yaml"
EVAL_SEEDS = list(range(100_000, 101_000))        # fresh: not training (>= 2^31) nor monitoring (0-499) seeds
GROUPS = {"prompts 0-7 (trained)": [str(d) for d in range(8)], "prompts 8-9 (unseen)": ["8", "9"]}
# (label, run-name tag, overrides): the two RLOO baselines, and KL anchoring to the start policy
# (docs/authors-code.md §9.44)
VARIANTS = (("per-prompt RLOO", "prompt", ["ppo.legacy_mixed_baseline=false"]),
            ("legacy mixed RLOO", "legacy", ["ppo.legacy_mixed_baseline=true"]),
            ("per-prompt RLOO + KL 1.0", "kl1", ["ppo.legacy_mixed_baseline=false", "ppo.kl_coef=1.0"]))


PER_PROMPT = 100


def evaluate(images_fn, reward, digits: list[str], reference: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """Reward heads, distance to the nearest training digit, diversity (distinct nearest training digits among
    the 100 samples of a prompt; the exact sampler gives about 60) and the RMS distance to the exact ODE's
    image from the same noise, for ``PER_PROMPT`` fresh seeds per digit."""
    prompts = [d for d in digits for _ in range(PER_PROMPT)]
    seeds = EVAL_SEEDS[:PER_PROMPT] * len(digits)
    images = images_fn(prompts, seeds)
    result = reward(images, prompts)
    distance = nearest_training_distance(images)
    data = load_digits_data()[0].reshape(-1, 64)
    nearest = torch.cdist(images.reshape(len(images), -1).double(), data).argmin(1).view(len(digits), PER_PROMPT)
    distinct = float(np.mean([len(set(row.tolist())) for row in nearest]))
    out = {"reward": float(result.reward.mean()), "digit_class": float(result.raw["digit_class"].mean()),
           "digit_realism": float(result.raw["digit_realism"].mean()),
           "nearest_rms_distance": float(distance.mean()), "distinct_per_100": distinct, "images": len(prompts)}
    if reference is not None:
        out["rms_to_exact"] = float((images.double() - reference).pow(2).mean(dim=(1, 2, 3)).sqrt().mean())
    return out, images


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "rdpo")
    parser.add_argument("--runs", type=Path, default=ROOT / "exps" / "rdpo")
    args = parser.parse_args(argv)
    args.runs, args.out = args.runs.resolve(), args.out.resolve()
    os.chdir(ROOT)                       # the config's paths (start table) are relative to the repository
    seeds = [int(s) for s in args.seeds.split(",")]
    # Run folders record their output root; keep it relative to the repository when it lies inside it.
    runs_root = os.path.relpath(args.runs, ROOT) if args.runs.resolve().is_relative_to(ROOT) else str(args.runs)
    config = load_config(CONFIG)
    backend = load_backend("digits", guidance=float(config.model.guidance_rate))
    reward = reward_from_config({"type": "multi", "weights": dict(config.reward.weights)})
    start_table = load_table(ROOT / config.data.predictor_snapshot)

    def table_images(table):
        def run(prompts, seeds_):
            return generate(backend, Sampler.from_table(table), seeds_, prompts, batch=len(seeds_))
        return run

    def reference_images(prompts, seeds_):       # the exact sampler (a 200-step Heun solve of the same ODE)
        sigmas = polynomial_sigmas(201, backend.sigma_min, backend.sigma_max, 7.0, terminal_zero=True)
        return generate(backend, Sampler.from_solver("heun", sigmas), seeds_, prompts, batch=len(seeds_))

    report: dict = {"config": str(CONFIG.relative_to(ROOT)), "steps": args.steps, "seeds": seeds,
                    "eval_seeds": f"{EVAL_SEEDS[0]}-{EVAL_SEEDS[-1]}", "machine": os.uname().nodename,
                    "threads": torch.get_num_threads(), "runs": {}, "evaluation": {}}
    runs: dict[str, list[Path]] = {label: [] for label, _, _ in VARIANTS}
    for variant, tag, overrides in VARIANTS:
        for seed in seeds:
            tick = time.perf_counter()
            table, folder = train(CONFIG, [f"run.output_root={runs_root}", f"run.seed={seed}",
                                           f"run.run_name=digits-{tag}-seed{seed}", f"ppo.steps={args.steps}",
                                           *overrides], progress=False)
            seconds = time.perf_counter() - tick
            runs[variant].append(folder)
            evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
            report["runs"][folder.name] = {"variant": variant, "seed": seed, "seconds": round(seconds, 1),
                                           "eval": evals}
            print(f"{folder.name}: {seconds:.0f} s, held-out reward {evals[0]['eval_reward_mean']:.4f} -> "
                  f"{evals[-1]['eval_reward_mean']:.4f}", flush=True)
            if tag == "prompt" and seed == seeds[0]:
                save_table(table, args.runs / "digits-nfe3-rdpo.pkl")
            if tag == "kl1" and seed == seeds[0]:
                save_table(table, args.runs / "digits-nfe3-rdpo-kl1.pkl")

    contenders = {"exact ODE (Heun, 200 steps, NFE 399)": reference_images,
                  "start (distilled NFE 3)": table_images(start_table)}
    for variant, folders in runs.items():
        for folder in folders:
            contenders[f"{variant}, seed {folder.name.rsplit('seed', 1)[1]}"] = \
                table_images(load_table(folder / "table-mean.pkl"))
    references: dict[str, torch.Tensor] = {}
    for name, images_fn in contenders.items():
        report["evaluation"][name] = {}
        for group, digits in GROUPS.items():
            result, images = evaluate(images_fn, reward, digits, references.get(group))
            references.setdefault(group, images.double())
            report["evaluation"][name][group] = result
        print(name, json.dumps(report["evaluation"][name]), flush=True)

    # Curves (mean over seeds is plotted per run; all runs shown) and sample grids.
    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves([(f"{v}, {f.name.rsplit('-', 1)[1]}", f) for v, fs in runs.items() for f in fs],
                args.out / "digits.png")
    _samples_figure({"start (distilled NFE 3)": table_images(start_table),
                     "RDPO": table_images(load_table(runs["per-prompt RLOO"][0] / "table-mean.pkl")),
                     "RDPO + KL 1.0": table_images(load_table(runs["per-prompt RLOO + KL 1.0"][0] / "table-mean.pkl")),
                     "exact ODE (NFE 399)": reference_images}, args.out / "digits-samples.png")
    report["summary"] = _summary(report, runs)
    atomic_write(args.out / "digits.json", json.dumps(report, indent=1).encode())
    atomic_write(args.out / "digits.md", _markdown(report, runs).encode())
    print((args.out / "digits.md").read_text())
    return 0


def _summary(report: dict, runs: dict) -> dict:
    out = {}
    for variant, folders in runs.items():
        curves = [report["runs"][f.name]["eval"] for f in folders]
        steps = [e["step"] for e in curves[0]]
        values = np.array([[e["eval_reward_mean"] for e in c] for c in curves])
        early = [np.mean([json.loads(line)["reward_mean"] for line in (f / "log.jsonl").read_text().splitlines()][:20])
                 for f in folders]
        out[variant] = {"steps": steps, "mean": values.mean(0).tolist(), "min": values.min(0).tolist(),
                        "max": values.max(0).tolist(), "train_reward_first20": float(np.mean(early)),
                        "train_reward_first20_per_seed": [float(e) for e in early],
                        "seconds": float(np.mean([report["runs"][f.name]["seconds"] for f in folders]))}
    return out


def _markdown(report: dict, runs: dict) -> str:
    lines = [f"RDPO on `digits` (CFG 2), {report['steps']} PPO steps of 64 images, seeds {report['seeds']}; "
             f"evaluation on fresh seeds {report['eval_seeds']}.", "",
             "| sampler | group | reward | P(prompted digit) | realism | RMS to nearest training digit | "
             "distinct nearest digits per 100 samples | RMS to the exact ODE's image |",
             "|---|---|---|---|---|---|---|---|"]
    for name, groups in report["evaluation"].items():
        for group, r in groups.items():
            lines.append(f"| {name} | {group} | {r['reward']:.4f} | {r['digit_class']:.4f} | {r['digit_realism']:.4f} "
                         f"| {r['nearest_rms_distance']:.4f} | {r['distinct_per_100']:.1f} | "
                         f"{r.get('rms_to_exact', 0.0):.4f} |")
    lines += ["", "Held-out reward of the mean table during training (mean [min, max] over seeds):", "",
              "| step | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    summary = _summary(report, runs)
    first = next(iter(summary.values()))
    for i, step in enumerate(first["steps"]):
        cells = [f"{s['mean'][i]:.4f} [{s['min'][i]:.4f}, {s['max'][i]:.4f}]" for s in summary.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "Mean training reward over the first 20 steps (learning speed): " + ", ".join(
        f"{v}: {s['train_reward_first20']:.4f} (per seed {', '.join(f'{e:.4f}' for e in s['train_reward_first20_per_seed'])})"
        for v, s in summary.items())]
    lines += ["", "Wall time per run (mean): " + ", ".join(f"{v}: {s['seconds']:.0f} s" for v, s in summary.items())]
    return "\n".join(lines) + "\n"


def _samples_figure(samplers: dict, out: Path) -> None:
    """Rows: 6 seeds; columns: prompts 0..9; one panel per sampler, the same noise in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    rows = 6
    prompts = [str(d) for _ in range(rows) for d in range(10)]
    seeds = [EVAL_SEEDS[r] for r in range(rows) for _ in range(10)]
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.2 * len(samplers), 3.2))
    for ax, (title, images_fn) in zip(axes, samplers.items()):
        images = images_fn(prompts, seeds).numpy()
        grid = np.ones((rows * 9 + 1, 10 * 9 + 1))
        for i, image in enumerate(images[:, 0]):
            r, c = divmod(i, 10)
            grid[1 + r * 9: 1 + r * 9 + 8, 1 + c * 9: 1 + c * 9 + 8] = (image + 1) / 2
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle("prompts 0-9 (columns), six noise seeds (rows)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out, buffer.getvalue())


if __name__ == "__main__":
    sys.exit(main())
