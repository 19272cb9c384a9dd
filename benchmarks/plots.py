"""PNG plots of benchmark results (matplotlib, imported lazily; Agg backend, no display needed)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def pyplot_or_none(what: str = "the plot"):
    """matplotlib.pyplot on the Agg backend, or None with a warning when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed: skipping {what} (pip install matplotlib)")
        return None
    return plt


def plain_formatter():
    """Tick labels as plain numbers (1024, not 2^10 or 1e3)."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def save_figure(plt, fig, path: str | Path, *, top: float = 1.0) -> Path:
    """Lay out (keeping the top `1 - top` of the figure for a suptitle), write the PNG, close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _title(meta: dict[str, Any]) -> str:
    dev = meta.get("device", {})
    cfg = meta.get("model_config", {})
    n = meta.get("num_params", 0)
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    parts = [
        f"{meta.get('arch', '?')} ({size} params, {cfg.get('num_layers', '?')} layers)",
        (f"{dev.get('host_cpu', 'cpu')}, {dev.get('host_cpu_count', '?')} cores [cpu]" if dev.get("platform") == "cpu"
         else f"{dev.get('device_kind', '?')} [{dev.get('platform', '?')}]"),
        f"{meta.get('dtype', '?')}, attn={meta.get('attn_impl', '?')}, batch {meta.get('batch', '?')}, "
        f"prompt {meta.get('prompt_tokens', '?')} tok",
        "random weights",
    ]
    return "TTFT: text path vs cache path - " + " | ".join(parts)


def plot_ttft(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Three panels: TTFT vs total branch tokens K*L (text dashed, cache solid, one colour per K),
    the text/cache speedup (log scale), and the cache path's parts per point. Returns the PNG path, or None (with a
    warning) when matplotlib is not installed."""
    plt = pyplot_or_none("the TTFT plot")
    if plt is None:
        return None
    from matplotlib.ticker import FuncFormatter

    ks = sorted({r["K"] for r in rows})
    colors = plt.get_cmap("viridis")(
        [0.1 + 0.75 * i / max(len(ks) - 1, 1) for i in range(len(ks))]
    )
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax_t, ax_s, ax_b = axes

    for k, color in zip(ks, colors):
        pts = sorted((r for r in rows if r["K"] == k), key=lambda r: r["branch_tokens"])

        def series(key: str):
            xy = [(r["branch_tokens"], r[key]) for r in pts if r.get(key) is not None]
            return [x for x, _ in xy], [y for _, y in xy]

        x, y = series("text_ttft_ms")
        ax_t.plot(x, y, "--s", color=color, label=f"text, K={k}", markersize=5)
        x, y = series("cache_ttft_ms")
        ax_t.plot(x, y, "-o", color=color, label=f"cache, K={k}", markersize=5)
        x, y = series("speedup")
        ax_s.plot(x, y, "-o", color=color, label=f"K={k}", markersize=5)
        if x:  # label the longest point of each K
            ax_s.annotate(f"{y[-1]:.1f}x", (x[-1], y[-1]), textcoords="offset points", xytext=(-4, 7),
                          ha="right", fontsize=8, color=color)

    plain = plain_formatter()
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
        ax.margins(x=0.08, y=0.12)
        ax.set_xlabel("total branch tokens K*L (per request)")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.yaxis.set_major_formatter(plain)
    ax_t.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax_t.set_ylabel("TTFT (ms, median)")
    ax_t.set_title("time to first token (solid: cache path, dashed: text path)", fontsize=10)
    ax_t.legend(fontsize=7, ncol=2)
    ax_s.set_yscale("log")
    ax_s.yaxis.set_major_formatter(plain)
    ax_s.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax_s.axhline(1.0, color="grey", lw=1, ls=":")
    ax_s.set_ylabel("speedup (text TTFT / cache TTFT)")
    ax_s.set_title("cache-path speedup, same run", fontsize=10)
    ax_s.legend(fontsize=8)

    # cache path breakdown per point: preparation (mapper part shown apart), prefill, rest
    done = [r for r in rows if r.get("cache_ttft_ms") is not None]
    labels = [f"K={r['K']}\nL={r['L']}" for r in done]
    idx = list(range(len(done)))
    prep = [r["cache_prepare_ms"] for r in done]
    prefill = [r["cache_prefill_ms"] for r in done]
    rest = [max(r["cache_ttft_ms"] - p - f, 0.0) for r, p, f in zip(done, prep, prefill)]
    ax_b.bar(idx, prep, color="tab:orange", label="prepare (re-encode + mapper + assemble)")
    ax_b.bar(idx, prefill, bottom=prep, color="tab:blue", label="prompt prefill over caches (LoRA on)")
    ax_b.bar(idx, rest, bottom=[p + f for p, f in zip(prep, prefill)], color="tab:grey",
             label="rest (first token, dispatch)")
    ax_b.plot(idx, [r["cache_ttft_ms"] for r in done], "k_", markersize=16, mew=2,
              label="cache TTFT measured end to end")
    tops = [p + f + x for p, f, x in zip(prep, prefill, rest)] + [r["cache_ttft_ms"] for r in done]
    if tops:
        ax_b.set_ylim(0, 1.12 * max(tops))
    ax_b.set_xticks(idx, labels, fontsize=7 if len(done) <= 12 else 5)
    ax_b.set_ylabel("ms (median of parts; parts timed separately)")
    ax_b.set_title("cache path TTFT breakdown (text path: left panel)", fontsize=10)
    ax_b.legend(fontsize=7)
    ax_b.grid(True, axis="y", alpha=0.3)

    fig.suptitle(_title(meta), fontsize=10)
    return save_figure(plt, fig, path, top=0.95)


# path key -> (label, colour); floors use the path's colour, dashed
_PATHS = (
    ("text_ttft_ms", "JAX text", "tab:blue"),
    ("cache_ttft_ms", "JAX cache", "tab:orange"),
    ("peer_text_ttft_ms", "PyTorch text", "tab:green"),
    ("peer_cache_ttft_ms", "PyTorch cache", "tab:red"),
)
_FLOORS = (("text_floor_ms", "text floor", "tab:blue"), ("cache_floor_ms", "cache floor", "tab:orange"))
_MARKERS = "osD^v<>ph*"


def plot_ttft_floor(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Two panels against total branch tokens K*L (log-log): TTFT of the JAX text and cache paths and,
    when present, the PyTorch peer's, one marker per K, with each path's roofline floor dashed; and
    measured / floor per path (with the 1.5x target) plus JAX / PyTorch where the peer ran. Returns
    the PNG path, or None (with a warning) when matplotlib is not installed."""
    plt = pyplot_or_none("the TTFT floor plot")
    if plt is None:
        return None
    from matplotlib.ticker import FuncFormatter

    ks = sorted({r["K"] for r in rows})
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(14, 5.4))

    for key, label, color in _PATHS:
        if not any(r.get(key) is not None for r in rows):
            continue
        for i, k in enumerate(ks):
            pts = sorted(((r["branch_tokens"], r[key]) for r in rows if r["K"] == k and r.get(key) is not None))
            if pts:
                ax_t.plot([x for x, _ in pts], [y for _, y in pts], "-", marker=_MARKERS[i % len(_MARKERS)],
                          color=color, markersize=5, lw=1.2, label=f"{label}" if i == 0 else None)
    for key, label, color in _FLOORS:  # a floor depends on K*L only (and the prompt): one line
        pts = sorted({(r["branch_tokens"], r[key]) for r in rows if r.get(key) is not None})
        if pts:
            ax_t.plot([x for x, _ in pts], [y for _, y in pts], "--", color=color, lw=1.5, alpha=0.8, label=label)
    for i, k in enumerate(ks):  # marker legend for K
        ax_t.plot([], [], _MARKERS[i % len(_MARKERS)], color="grey", label=f"K={k}")

    ratios = (("cache_floor_ratio", "JAX cache / floor", "tab:orange", "-"),
              ("text_floor_ratio", "JAX text / floor", "tab:blue", "-"),
              ("text_vs_peer", "JAX text / PyTorch text", "tab:green", ":"),
              ("cache_vs_peer", "JAX cache / PyTorch cache", "tab:red", ":"))
    for key, label, color, ls in ratios:
        if not any(r.get(key) is not None for r in rows):
            continue
        for i, k in enumerate(ks):
            pts = sorted(((r["branch_tokens"], r[key]) for r in rows if r["K"] == k and r.get(key) is not None))
            if pts:
                ax_r.plot([x for x, _ in pts], [y for _, y in pts], ls, marker=_MARKERS[i % len(_MARKERS)],
                          color=color, markersize=5, label=label if i == 0 else None)
    if any(r.get("cache_floor_ratio") is not None for r in rows):
        ax_r.axhline(1.5, color="tab:orange", lw=1, ls="--", alpha=0.7, label="cache target: 1.5x floor")
    ax_r.axhline(1.0, color="grey", lw=1, ls=":")

    plain = plain_formatter()
    for ax in (ax_t, ax_r):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("total branch tokens K*L (per request)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.08, y=0.12)
    ax_t.set_ylabel("TTFT (ms, median)")
    ax_t.set_title("TTFT vs K*L (dashed: roofline floor of each path)", fontsize=10)
    ax_t.legend(fontsize=7, ncol=2)
    ax_r.set_ylabel("ratio")
    ax_r.set_title("measured / floor, and JAX / PyTorch (same run)", fontsize=10)
    if ax_r.lines:
        ax_r.legend(fontsize=7)

    roof = meta.get("roofline") or {}
    peer = meta.get("peer") or {}
    extra = []
    if roof:
        extra.append(f"roofline: {roof.get('matmul_flops_per_s', 0) / 1e12:.3g} TFLOP/s {roof.get('dtype', '')}, "
                     f"{roof.get('bandwidth_bytes_per_s', 0) / 1e9:.4g} GB/s (measured)")
    if peer:
        extra.append(f"peer: torch {peer.get('torch', '?')}, transformers {peer.get('transformers', '?')}, "
                     f"{peer.get('dtype', '?')}, sdpa")
    fig.suptitle(_title(meta) + ("\n" + " | ".join(extra) if extra else ""), fontsize=9)
    return save_figure(plt, fig, path, top=0.95)
