"""Chart and markdown table of bench/gpu_latency.py results (one or more JSON files, e.g. one GPU and two).

    python bench/plot_latency.py docs/bench/gpu_latency_h200.json docs/bench/gpu_latency_h200x2.json \\
        --png docs/bench/gpu_latency.png --md -

Bars: per-image latency of each method, relative to the best peer of the same run: diffusers' pipeline
compiled as its documentation recommends (``diffusers_dpmpp2m_20_compile``), or, in runs without it (the CPU
dry run, the two-GPU run), our DPM-Solver++(2M) with CUDA graphs on one GPU (1.0 = the same latency);
absolute milliseconds are written on the bars.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safeio.cli import ArgumentParser, entry_point

BASES = ("diffusers_dpmpp2m_20_compile", "dpmpp2m_20_graph")
LABELS = {
    "diffusers_dpmpp2m_20": "diffusers pipeline, DPM++ 20",
    "diffusers_dpmpp2m_20_compile": "diffusers pipeline compiled, DPM++ 20",
    "dpmpp2m_20": "ours DPM++(2M) 20, eager",
    "epd_k2_nfe20": "EPD K=2, NFE 20, eager",
    "dpmpp2m_20_graph": "ours DPM++(2M) 20, graphs",
    "euler_20_graph": "ours Euler 20, graphs",
    "euler_28_graph": "ours Euler 28, graphs",
    "epd_k2_nfe20_graph": "EPD K=2, NFE 20, graphs, 1 GPU",
    "epd_k2_nfe20_sharded_graph": "EPD K=2, NFE 20, graphs, 2 GPUs",
    "dpmpp2m_20_fast": "ours DPM++(2M) 20, fast path",
    "euler_20_fast": "ours Euler 20, fast path",
    "epd_k2_nfe20_fast": "EPD K=2, NFE 20, fast path",
}


def rows(paths: list[Path]) -> list[tuple[str, str, float, float, str]]:
    """(config, method, ms, ratio to the same run's base, the base's name) for every measured method; the
    base is the first of :data:`BASES` that the run measured."""
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        for result in data["results"]:
            latency = result.get("latency_ms", {})
            base_name = next((b for b in BASES if b in latency), BASES[-1])
            base = latency.get(base_name)
            tag = f"{result['config']}" + (f" ({result['world']} GPUs)" if result.get("world", 1) > 1 else "")
            for method, ms in latency.items():
                if result.get("world", 1) > 1 and method != "epd_k2_nfe20_sharded_graph":
                    continue                       # the one-GPU figures come from the one-GPU run
                out.append((tag, method, ms, ms / base if base else float("nan"), base_name))
    return out


def markdown(table: list[tuple[str, str, float, float, str]]) -> str:
    lines = ["| model | method | ms / image | vs base | base |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {config} | {LABELS.get(method, method)} | {ms:.1f} | {ratio:.3f} | {LABELS.get(base, base)} |"
              for config, method, ms, ratio, base in table]
    return "\n".join(lines)


def plot(table: list[tuple[str, str, float, float, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(c.split(" (")[0] for c, *_ in table))
    bases = {c.split(" (")[0]: b for c, _, _, _, b in table if " (" not in c}
    methods = [m for m in LABELS if any(m == row[1] for row in table)]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 4.6), sharey=True)
    axes = [axes] if len(configs) == 1 else list(axes)
    colors = plt.get_cmap("tab20")
    for ax, config in zip(axes, configs):
        entries = {m: (ms, r) for c, m, ms, r, _ in table if c.split(" (")[0] == config}
        shown = [m for m in methods if m in entries]
        bars = ax.bar(range(len(shown)), [entries[m][1] for m in shown],
                      color=[colors(methods.index(m)) for m in shown])
        for bar, m in zip(bars, shown):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.03, f"{entries[m][0]:.0f}",
                    ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{config}\n(1.0 = {LABELS.get(bases.get(config), bases.get(config))})", fontsize=8)
        ax.set_xticks([])
    axes[0].set_ylabel("latency / the run's best peer (ms on bars)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i)) for i in range(len(methods))]
    fig.legend(handles, [LABELS[m] for m in methods], loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--md", help="write the markdown table here ('-' for stdout)")
    args = parser.parse_args(argv)
    table = rows(args.results)
    if args.png:
        plot(table, args.png)
    if args.md == "-":
        print(markdown(table))
    elif args.md:
        Path(args.md).write_text(markdown(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
