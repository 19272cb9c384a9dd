"""Report plots (PNG, matplotlib's Agg backend, imported only here and only when plotting).

- accuracy per mode per dataset: grouped bars with Wilson 95% intervals;
- TTFT against the example's total branch tokens, one colour per synthesis mode: how each path's
  first-token latency grows with the work handed over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from psynth_jax.eval.store import ModeRecord


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_plot(results: dict[str, Any], path: Path) -> bool:
    """Grouped bars: datasets on x, one bar per mode, Wilson 95% error bars. False when no data."""
    tasks = [t for t, by_mode in results["tasks"].items() if any(m["n"] for m in by_mode.values())]
    if not tasks:
        return False
    modes = list(results["modes"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 1.3 * len(tasks)), 4.0))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        accs, lo, hi = [], [], []
        for t in tasks:
            m = results["tasks"][t][mode]
            a = m["accuracy"] or 0.0
            ci = m["ci95"] or [a, a]
            accs.append(100 * a)
            lo.append(100 * (a - ci[0]))
            hi.append(100 * (ci[1] - a))
        label = f"{mode} (untrained)" if mode in results["untrained"] else mode
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, accs, width, yerr=[lo, hi], capsize=2, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy % (95% CI)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Accuracy per dataset and mode")
    _save(fig, path)
    plt.close(fig)
    return True


def ttft_plot(records: Sequence[ModeRecord], path: Path) -> bool:
    """TTFT (ms) against total branch tokens, one series per synthesis mode. False when nothing was timed."""
    points: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.mode != "single" and r.ttft_s is not None:
            xs, ys = points.setdefault(r.mode, ([], []))
            xs.append(r.branch_tokens)
            ys.append(1e3 * r.ttft_s)
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for mode, (xs, ys) in points.items():
        ax.scatter(xs, ys, s=12, alpha=0.7, label=mode)
    ax.set_xlabel("total branch tokens of the example")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Time to first token against branch tokens")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return True


def _save(fig, path) -> None:
    """The figure as a PNG at `path`, a local file or a remote object (written through its file object)."""
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=120)
