"""One figure per RDPO run (``rewards.png``): training reward per step with a running mean, the held-out
reward of the mean table, and the KL to the start policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

__all__ = ["plot_run", "plot_curves"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(runs: Sequence[tuple[str, str | Path]], out: str | Path, window: int = 10) -> Path:
    """Overlay several runs ``[(label, run_dir), ...]``: reward (running mean over ``window`` steps),
    held-out reward, KL. Returns the PNG path (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from safeio import atomic_write

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for label, run_dir in runs:
        records, evals = _read(Path(run_dir) / "log.jsonl"), _read(Path(run_dir) / "eval.jsonl")
        if not records:
            raise ValueError(f"{run_dir}/log.jsonl is empty")
        steps = np.array([r["step"] for r in records])
        reward = np.array([r["reward_mean"] for r in records])
        smooth = np.convolve(reward, np.ones(window) / window, mode="valid") if len(reward) >= window else reward
        line, = axes[0].plot(steps[len(steps) - len(smooth):], smooth, label=label)
        axes[0].plot(steps, reward, alpha=0.2, color=line.get_color())
        if evals:
            axes[1].plot([e["step"] for e in evals], [e["eval_reward_mean"] for e in evals], "o-", label=label,
                         color=line.get_color())
        axes[2].plot(steps, [r["kl"] for r in records], label=label, color=line.get_color())
    axes[0].set(title=f"training reward (running mean of {window})", xlabel="PPO step", ylabel="reward")
    axes[1].set(title="held-out reward of the mean table", xlabel="PPO step")
    axes[2].set(title="KL(policy || start policy)", xlabel="PPO step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out, buffer.getvalue())
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    return plot_curves([(run_dir.name, run_dir)], out or run_dir / "rewards.png")
