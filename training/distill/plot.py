"""One figure per run: the learned positions and weights per step, and the loss curve (``table.png``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_run"]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``log.jsonl`` of a run: positions r_k and weights w_k per step at the end of training, their
    trajectories over iterations, and the per-iteration loss. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{run_dir}/log.jsonl is empty")
    its = np.array([r["iteration"] for r in records])
    positions = np.array([r["positions"] for r in records])   # [T, N-1, K]
    weights = np.array([r["weights"] for r in records])
    steps, points = positions.shape[1:]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    width = 0.8 / points
    for k in range(points):
        offset = (k - (points - 1) / 2) * width
        axes[0].bar(np.arange(steps) + offset, positions[-1, :, k], width, label=f"point {k + 1}")
        axes[1].bar(np.arange(steps) + offset, weights[-1, :, k], width, label=f"point {k + 1}")
    for ax, title in zip(axes[:2], ("positions r (final)", "weights w (final)")):
        ax.set_xticks(range(steps))
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for n in range(steps):
        for k in range(points):
            axes[2].plot(its, positions[:, n, k], lw=1, label=f"r[{n},{k}]" if steps * points <= 12 else None)
    axes[2].set_title("positions during training")
    axes[2].set_xlabel("iteration")
    if steps * points <= 12:
        axes[2].legend(fontsize=6, ncol=2)
    axes[3].plot(its, [r["loss"] for r in records], lw=1)
    axes[3].set_yscale("log")
    axes[3].set_title("loss")
    axes[3].set_xlabel("iteration")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "table.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
