"""One figure per run (``table.png``): the learned positions and weights per step, the loss curve, and the
validation error against the best handcrafted solver; one figure per recipe search (``search.png``)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_run", "plot_search"]


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
    scored = [r for r in records if r.get("val_rmse") is not None and np.isfinite(r["val_rmse"]) and r["val_rmse"] > 0]
    fig, axes = plt.subplots(1, 5 if scored else 4, figsize=(21 if scored else 17, 3.8))
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
    if scored:
        _plot_validation(axes[4], scored, run_dir / "comparison.json")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "table.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def _plot_validation(ax, scored: list[dict], comparison_path: Path) -> None:
    """Validation RMSE over iterations, the best point, and the best handcrafted solver at the same NFE and at
    equal total evaluations as horizontal lines (from ``comparison.json`` when the run has finished)."""
    its = [r["iteration"] for r in scored]
    values = [r["val_rmse"] for r in scored]
    ax.plot(its, values, "o-", ms=3, lw=1, label="EPD table")
    best = min(range(len(values)), key=values.__getitem__)
    ax.plot([its[best]], [values[best]], "*", ms=10, color="C3", label=f"best {values[best]:.4g}")
    if comparison_path.is_file():
        table = json.loads(comparison_path.read_text())["summary"]["tables"]["table"]
        for key, style, what in (("best_baseline_same_nfe", "--", "same NFE"),
                                 ("best_baseline_same_total", ":", "same total evals")):
            entry = table.get(key)
            if entry:
                ax.axhline(entry["rmse"], ls=style, color="k", lw=1,
                           label=f"{entry['solver']} ({(entry.get('schedule') or {}).get('kind')}), {what}")
    ax.set_yscale("log")
    ax.set_title("validation RMSE (held-out)")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=6)


def plot_search(search: dict, out: str | Path) -> Path:
    """Bars of every candidate's best validation RMSE (the chosen one marked), the final run's, and the best
    handcrafted solver at the same NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = search["candidates"]
    labels = [c["label"] for c in candidates]
    values = [c.get("val_rmse") or float("nan") for c in candidates]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4.2))
    colors = ["C3" if c["label"] == search.get("chosen") else "C0" for c in candidates]
    ax.bar(range(len(labels)), values, color=colors)
    final = search.get("final") or {}
    if final.get("val_rmse") is not None:
        ax.axhline(final["val_rmse"], color="C3", lw=1, label=f"final run {final['val_rmse']:.4g}")
    baseline = final.get("best_baseline_same_nfe")
    if baseline:
        ax.axhline(baseline["rmse"], color="k", ls="--", lw=1,
                   label=f"best handcrafted at NFE {baseline['nfe']}: {baseline['solver']} {baseline['rmse']:.4g}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("validation RMSE")
    ax.set_title(f"recipe search {search.get('name', '')}: short runs of {search.get('kimg')} kimg (red: chosen)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
