"""Every benchmark's PNG plot, drawn from its JSON (metadata + rows) alone.

- ttft: TTFT and speedup against K*L, the cache path's parts (`plot_ttft`), and against each
  path's roofline floor and the PyTorch peer (`plot_ttft_floor`);
- batch: TTFT and output tokens/s against B; decode: ms per token against the cached tokens and
  the bandwidth floor; sampling: ms per call per strategy; train: tokens/s and FLOPs per step.

matplotlib is optional (benchmarks/harness.py `pyplot_or_none`): without it the plots are skipped
with a warning and the JSON is written anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import log2_x, plain_formatter, pyplot_or_none, save_figure


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


# ------------------------------------------------------------------ bench batch
def plot_batch(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """TTFT and output tokens/s against B, cache path solid, text path dashed."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {"cache": ("-o", "tab:blue", "cache path (LoRA on)"), "text": ("--s", "tab:orange", "text path")}
    for name in meta["paths"]:
        style, color, label = styles[name]
        pts = [r for r in rows if r.get(f"{name}_ttft_ms") is not None]
        x = [r["batch"] for r in pts]
        ax_t.plot(x, [r[f"{name}_ttft_ms"] for r in pts], style, color=color, label=label)
        ax_r.plot(x, [r[f"{name}_tokens_per_s"] for r in pts], style, color=color, label=label)
    for ax, ylabel in ((ax_t, "TTFT (ms, median)"), (ax_r, "output tokens/s (decode phase)")):
        log2_x(ax, [r["batch"] for r in rows])
        ax.set_xlabel("batch size B (requests)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    dev = meta["device"]
    fig.suptitle(f"batched synthesis: {meta['arch']}, {meta['dtype']}, K={meta['K']} x L={meta['L']}, prompt "
                 f"{meta['prompt_tokens']}, {meta['new_tokens']} new tokens, {dev['device_kind']} [{dev['platform']}], "
                 "random weights", fontsize=9)
    return save_figure(plt, fig, path, top=0.94)


# ------------------------------------------------------------------ bench decode
def plot_decode(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Time per decoded token (loop and host-dispatched) and the bandwidth floor vs cache tokens."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    done = [r for r in rows if r.get("step_ms") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["cache_tokens"] for r in done]
    ax.plot(x, [r["step_ms"] for r in done], "-o", label="jitted loop (continue_generation)")
    ax.plot(x, [r.get("host_step_ms") for r in done], "--s", label="decode_step per token (host loop)")
    ax.plot(x, [r["floor_ms"] for r in done], ":k", label=f"bandwidth floor ({meta['bandwidth_gbs']:.0f} GB/s)")
    for r in done:
        ax.annotate(f"{r['ratio']:.2f}x", (r["cache_tokens"], r["step_ms"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    log2_x(ax, x)
    ax.set_xlabel("cached tokens per request")
    ax.set_ylabel("ms per decode step (median)")
    dev = meta["device"]
    ax.set_title(f"decode: {meta['arch']}, {meta['dtype']}, batch {meta['batch']}, "
                 f"{dev['device_kind']} [{dev['platform']}], random weights", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


# ------------------------------------------------------------------ bench sampling
def plot_sampling(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """ms per sampled token row-batch against batch size, one line per strategy."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["batch"] for r in rows]
    styles = {"greedy": "-o", "temperature": "-s", "top_p": "-^", "top_p_sort": "--v"}
    labels = {"top_p": "top-p (bisection, sampling.nucleus)", "top_p_sort": "top-p (sort baseline)"}
    for name in meta["strategies"]:
        ax.plot(x, [r[f"{name}_ms"] for r in rows], styles[name], label=labels.get(name, name))
    ax.set_yscale("log")
    log2_x(ax, x)
    ax.set_xlabel("batch (rows sampled together)")
    ax.set_ylabel("ms per call (median)")
    dev = meta["device"]
    ax.set_title(f"sampling over a {meta['vocab']}-token vocabulary, top_p {meta['top_p']}, "
                 f"{dev['device_kind']} [{dev['platform']}]", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


# ------------------------------------------------------------------ bench train
FLOP_PARTS = (("branch_forward", "branch prefill (fwd only)", "tab:grey"),
              ("synth_forward", "synthesizer forward", "tab:blue"),
              ("synth_backward", "synthesizer backward", "tab:orange"),
              ("remat_recompute", "remat recompute", "tab:red"))


def plot_train(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Tokens/s per remat setting (with the PEFT reference at its shape) and the FLOPs per step by part."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    done = [r for r in rows if r.get("tokens_per_s") is not None]
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(10, 4.5))
    labels = [f"remat {r['remat_str']}" for r in done]
    idx = list(range(len(done)))
    bars = ax_t.bar(idx, [r["tokens_per_s"] for r in done], color="tab:blue", width=0.5)
    for bar, r in zip(bars, done):
        ax_t.annotate(f"MFU {r['mfu']:.1%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    if meta.get("reference_shape"):
        ax_t.axhline(meta["reference"]["tokens_per_s"], color="k", ls="--", lw=1,
                     label=f"PyTorch PEFT {meta['reference']['tokens_per_s']:.0f} tok/s")
        ax_t.legend(fontsize=8)
    ax_t.set_xticks(idx, labels)
    ax_t.set_ylabel("tokens/s (median step)")
    ax_t.set_title("train step throughput", fontsize=10)
    ax_t.grid(True, axis="y", alpha=0.3)
    bottom = [0.0] * len(rows)
    ridx = list(range(len(rows)))
    big = max((r["flops"]["hardware_flops_per_step"] for r in rows), default=0.0) >= 1e12
    scale, unit = (1e12, "TFLOPs") if big else (1e9, "GFLOPs")
    for key, label, color in FLOP_PARTS:
        vals = [r["flops"][key] / scale for r in rows]
        ax_f.bar(ridx, vals, bottom=bottom, color=color, label=label, width=0.5)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_f.set_xticks(ridx, [f"remat {r['remat_str']}" for r in rows])
    ax_f.set_ylabel(f"{unit} per step (model FLOPs + remat recompute)")
    ax_f.set_title("FLOPs per step by part", fontsize=10)
    ax_f.legend(fontsize=8)
    ax_f.grid(True, axis="y", alpha=0.3)
    dev = meta["device"]
    fig.suptitle(f"train step: {meta['arch']}, {meta['dtype']}, batch {meta['batch']} x ({meta['branches']} x "
                 f"{meta['branch_tokens']} + {meta['live_tokens']} live), {dev['device_kind']} [{dev['platform']}], "
                 "random weights", fontsize=9)
    return save_figure(plt, fig, path, top=0.93)


# ------------------------------------------------------------------ bench serve
def plot_serve(meta: dict[str, Any], rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """TTFT p50 / p99 and decode tokens/s per synthesis path, one request at a time vs concurrent clients."""
    plt = pyplot_or_none()
    if plt is None:
        return None
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(10, 4.5))
    labels = [f"{r['path']}\n{r['phase']}" for r in rows]
    x = range(len(rows))
    ax_t.bar([i - 0.2 for i in x], [r["ttft_p50_ms"] for r in rows], 0.4, label="p50")
    ax_t.bar([i + 0.2 for i in x], [r["ttft_p99_ms"] for r in rows], 0.4, label="p99")
    ax_t.set_xticks(list(x), labels, fontsize=8)
    ax_t.set_ylabel("TTFT, ms (client side)")
    ax_t.legend(fontsize=8)
    ax_r.bar(list(x), [r["decode_tokens_per_s"] for r in rows], 0.5)
    ax_r.set_xticks(list(x), labels, fontsize=8)
    ax_r.set_ylabel("decode tokens/s (all requests / wall time)")
    for ax in (ax_t, ax_r):
        ax.grid(True, axis="y", alpha=0.3)
    dev = meta["device"]
    fig.suptitle(f"psynth serve: {meta['arch']}, {meta['dtype']}, K={meta['k']} x L={meta['branch_tokens']}, "
                 f"{meta['max_tokens']} new tokens, {meta['clients']} clients vs one at a time; "
                 f"{dev.get('host_cpu', dev['device_kind'])} [{dev['platform']}], random weights", fontsize=9)
    return save_figure(plt, fig, path, top=0.92)
