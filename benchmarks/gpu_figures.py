"""The GPU check's figures: each step's JSON read into named figures next to their targets, and summary.md.

Stdlib only (the driver must not import jax). A figure is named `<step>/<point>/<field>` by the
FULL run's point (e.g. `ttft7b/K8xL2048/speedup`): sweeps keep the full run's number of points
in smoke mode, and rows are matched to the full run's points by position, so a smoke run fills
the same names (`measured_at` says what was really measured). docs/PERFORMANCE.md's cells are
filled by name (gpu_docs.py).

Targets are those of docs/PERFORMANCE.md (issue #7): 1 cache TTFT <= 1.5x its floor; 2 text MFU
>= 70% and JAX text <= PyTorch SDPA text; 3 text/cache speedup >= 20x at K=8, L=2048;
4 preparation <= 5% of cache TTFT; 5 batched synthesis (reported); 6 decode against the
bandwidth floor (reported); 7 train tokens/s >= 4,420 (PyTorch PEFT); 8 kernels equal to the XLA
reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

# PyTorch figures quoted in issue #7 (H100 80GB, transformers + SDPA), shown next to ours
ISSUE7_PYTORCH = {("qwen3-14b", 3, 4096): "PyTorch (issue #7, H100): 792 / 75 ms, 10.6x",
                  ("qwen3-14b", 8, 2048): "PyTorch (issue #7, H100): 1079 / 75 ms, 14.4x",
                  ("qwen2.5-7b", 8, 2048): "PyTorch SDPA text (issue #7, H100): 515 ms"}
TRAIN_REFERENCE_TOKENS_PER_S = 4420.0


@dataclasses.dataclass
class Figure:
    id: str  # <step>/<point>/<field>, named by the full run's point
    step: str
    target: str  # docs/PERFORMANCE.md target ("1".."8"), "" for context figures
    label: str
    value: float | None
    text: str
    goal: str  # e.g. "<= 1.5x"; "" when the figure is reported without a goal
    ok: bool | None  # meets the goal; None without a goal or a value
    measured_at: str = ""


def ms(v: float) -> str:
    return f"{v:.2f} ms"


def times(v: float) -> str:
    return f"{v:.2f}x"


def pct(v: float) -> str:
    return f"{v:.1%}"


def per_s(v: float) -> str:
    return f"{v:,.0f}"


def _arg(args: Sequence[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _ints(args: Sequence[str], flag: str) -> list[int]:
    text = _arg(args, flag)
    return [int(x) for x in text.split(",")] if text else []


class Collector:
    """Builds one step's figures: `add(point, field, value, ...)` with a goal check."""

    def __init__(self, step: str):
        self.step, self.items = step, []

    def add(self, point: str, field: str, value: Any, *, label: str, fmt: Callable[[float], str], target: str = "",
            goal: str = "", check: Callable[[float], bool] | None = None, measured_at: str = "") -> None:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        ok = bool(check(number)) if (check is not None and number is not None) else None
        self.items.append(Figure(f"{self.step}/{point}/{field}", self.step, target, label, number,
                                 fmt(number) if number is not None else "-", goal, ok, measured_at))


# ------------------------------------------------------------------ one reader per benchmark
def read_kernels(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:  # noqa: ARG001
    meta = result.get("metadata", {})
    n, passed = meta.get("checks", len(result.get("rows", []))), meta.get("passed", 0)
    planned = meta.get("planned", n)
    of = f" (of {planned} planned: stopped early)" if n < planned else ""
    c.add("all", "passed", passed, label=f"correctness checks passed ({meta.get('impl')} vs xla)",
          fmt=lambda v: f"{v:.0f}/{n}{of}", target="8", goal=f"{planned}/{planned}", check=lambda v: v == planned)


def read_roofline(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:  # noqa: ARG001
    c.add("device", "matmul_tflops", result.get("peak_tflops"), label=f"matmul peak ({result.get('dtype')})",
          fmt=lambda v: f"{v:.4g} TFLOP/s", goal="H200 spec ~990 (bf16 dense)")
    c.add("device", "bandwidth_gbs", result.get("bandwidth_gbs"), label="memory bandwidth",
          fmt=lambda v: f"{v:,.0f} GB/s", goal="H200 spec ~4,800")


def read_ttft(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:  # noqa: ARG001
    meta = result.get("metadata", {})
    arch = meta.get("arch", "?")
    full = [(k, l) for k in _ints(step.full, "--ks") for l in _ints(step.full, "--ls")]
    for (k, l), row in zip(full, result.get("rows", [])):
        point, where = f"K{k}xL{l}", f"K={row.get('K')} L={row.get('L')}"
        name = f"{arch} K={k} L={l}"
        kw = dict(measured_at=where)
        c.add(point, "cache_ttft_ms", row.get("cache_ttft_ms"), label=f"cache TTFT, {name}", fmt=ms, **kw)
        c.add(point, "cache_floor_ms", row.get("cache_floor_ms"), label=f"cache floor, {name}", fmt=ms, **kw)
        c.add(point, "cache_floor_ratio", row.get("cache_floor_ratio"), label=f"cache TTFT / floor, {name}",
              fmt=times, target="1", goal="<= 1.5x", check=lambda v: v <= 1.5, **kw)
        c.add(point, "text_ttft_ms", row.get("text_ttft_ms"), label=f"text TTFT, {name}", fmt=ms, **kw)
        c.add(point, "text_mfu", row.get("text_mfu"), label=f"text MFU, {name} ({row.get('text_tokens')} tokens)",
              fmt=pct, target="2", goal=">= 70%", check=lambda v: v >= 0.70, **kw)
        reference = ISSUE7_PYTORCH.get((arch, k, l), "")
        if (arch, k, l) == ("qwen2.5-7b", 8, 2048):
            c.add(point, "speedup", row.get("speedup"), label=f"text / cache TTFT, {name}", fmt=times, target="3",
                  goal=">= 20x", check=lambda v: v >= 20.0, **kw)
        else:
            c.add(point, "speedup", row.get("speedup"), label=f"text / cache TTFT, {name}", fmt=times,
                  target="3" if reference else "", goal=reference, **kw)
        c.add(point, "cache_prepare_ms", row.get("cache_prepare_ms"), label=f"cache preparation, {name}", fmt=ms,
              **kw)
        c.add(point, "prepare_share", row.get("prepare_share"), label=f"preparation share of cache TTFT, {name}",
              fmt=pct, target="4", goal="<= 5%", check=lambda v: v <= 0.05, **kw)


def _ttft_partner(peer_result: dict[str, Any], all_results: dict[str, Any]) -> dict[str, Any] | None:
    """The ttft step that timed the JAX side at the same architecture and prompt length."""
    meta = peer_result.get("metadata", {})
    for entry in all_results.get("steps", {}).values():
        other = (entry.get("result") or {}).get("metadata", {})
        if (entry.get("benchmark") == "ttft" and other.get("arch") == meta.get("arch")
                and other.get("prompt_tokens") == meta.get("prompt_tokens")):
            return entry["result"]
    return None


def read_peer(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:
    meta = result.get("metadata", {})
    arch = meta.get("arch", "?")
    partner = _ttft_partner(result, all_results)
    ours = {(r.get("K"), r.get("L")): r for r in (partner or {}).get("rows", [])}
    full = [(k, l) for k in _ints(step.full, "--ks") for l in _ints(step.full, "--ls")]
    for (k, l), row in zip(full, result.get("rows", [])):
        point, name = f"K{k}xL{l}", f"{arch} K={k} L={l}"
        kw = dict(measured_at=f"K={row.get('K')} L={row.get('L')}")
        c.add(point, "peer_text_ttft_ms", row.get("peer_text_ttft_ms"), label=f"PyTorch SDPA text TTFT, {name}",
              fmt=ms, goal=ISSUE7_PYTORCH.get((arch, k, l), ""), **kw)
        c.add(point, "peer_cache_ttft_ms", row.get("peer_cache_ttft_ms"),
              label=f"PyTorch SDPA cache-consuming TTFT, {name}", fmt=ms, **kw)
        mine = ours.get((row.get("K"), row.get("L")), {})
        for path, target, goal in (("text", "2", "<= 1.0"), ("cache", "", "")):
            a, b = mine.get(f"{path}_ttft_ms"), row.get(f"peer_{path}_ttft_ms")
            ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None
            c.add(point, f"{path}_vs_peer", ratio, label=f"JAX / PyTorch {path} TTFT, {name}", fmt=times,
                  target=target, goal=goal, check=(lambda v: v <= 1.0) if goal else None, **kw)


def read_decode(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:  # noqa: ARG001
    arch = result.get("metadata", {}).get("arch", "?")
    for tokens, row in zip(_ints(step.full, "--cache-tokens"), result.get("rows", [])):
        point, name = f"C{tokens}", f"{arch}, {tokens:,}-token cache, B={row.get('batch')}"
        kw = dict(measured_at=f"cache {row.get('cache_tokens')}")
        c.add(point, "step_ms", row.get("step_ms"), label=f"decode ms/token, {name}", fmt=ms, target="6", **kw)
        c.add(point, "floor_ms", row.get("floor_ms"), label=f"decode bandwidth floor, {name}", fmt=ms, target="6", **kw)
        c.add(point, "ratio", row.get("ratio"), label=f"decode / floor, {name}", fmt=times, target="6",
              goal="reported (1.0 = floor)", **kw)
        c.add(point, "tokens_per_s", row.get("tokens_per_s"), label=f"decode tokens/s, {name}", fmt=per_s, **kw)


def read_train(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:  # noqa: ARG001
    meta = result.get("metadata", {})
    at_reference = bool(meta.get("reference_shape"))
    for row in result.get("rows", []):
        point = f"remat_{row.get('remat_str')}"
        name = f"{meta.get('arch')}, {meta.get('branches')} x {meta.get('branch_tokens')} + {meta.get('live_tokens')}" \
               f" live, remat {row.get('remat_str')}"
        c.add(point, "tokens_per_s", row.get("tokens_per_s"), label=f"train tokens/s, {name}", fmt=per_s, target="7",
              goal=">= 4,420 (PyTorch PEFT)" if at_reference else "4,420 is for the Qwen3-14B shape only",
              check=(lambda v: v >= TRAIN_REFERENCE_TOKENS_PER_S) if at_reference else None)
        c.add(point, "vs_reference", row.get("tokens_per_s", 0) / TRAIN_REFERENCE_TOKENS_PER_S
              if row.get("tokens_per_s") is not None else None, label=f"train tokens/s / 4,420, {name}",
              fmt=times, target="7", goal=">= 1.0x" if at_reference else "",
              check=(lambda v: v >= 1.0) if at_reference else None)
        c.add(point, "mfu", row.get("mfu"), label=f"train MFU, {name}", fmt=pct, target="7")
        c.add(point, "step_ms", row.get("step_ms"), label=f"train step, {name}", fmt=ms, target="7")
        losses = [row.get("loss_first"), row.get("loss_last")]
        finite = all(isinstance(x, (int, float)) for x in losses) and all(x == x and abs(x) < 1e30 for x in losses)
        c.add(point, "loss_finite", 1.0 if finite else 0.0, label=f"train loss finite, {name}",
              fmt=lambda v: "yes" if v else "NO", goal="yes", check=lambda v: v == 1.0)


def read_batch(c: Collector, step, result: dict[str, Any], all_results: dict[str, Any]) -> None:  # noqa: ARG001
    meta = result.get("metadata", {})
    for b, row in zip(_ints(step.full, "--bs"), result.get("rows", [])):
        point, name = f"B{b}", f"{meta.get('arch')}, B={b}"
        kw = dict(measured_at=f"B={row.get('batch')} K={row.get('K')} L={row.get('L')}", target="5")
        c.add(point, "cache_ttft_ms", row.get("cache_ttft_ms"), label=f"batched cache TTFT, {name}", fmt=ms, **kw)
        c.add(point, "text_ttft_ms", row.get("text_ttft_ms"), label=f"batched text TTFT, {name}", fmt=ms, **kw)
        c.add(point, "cache_tokens_per_s", row.get("cache_tokens_per_s"), label=f"cache path output tokens/s, {name}",
              fmt=per_s, **kw)
        c.add(point, "text_tokens_per_s", row.get("text_tokens_per_s"), label=f"text path output tokens/s, {name}",
              fmt=per_s, **kw)


READERS: dict[str, Callable[..., None]] = {
    "kernels": read_kernels, "roofline": read_roofline, "ttft": read_ttft, "peer": read_peer,
    "decode": read_decode, "train": read_train, "batch": read_batch,
}


def figures(results: dict[str, Any], steps: Iterable[Any]) -> list[Figure]:
    """Every figure of the steps that left a result, in step order."""
    out: list[Figure] = []
    for step in steps:
        entry = results.get("steps", {}).get(step.name) or {}
        reader = READERS.get(step.benchmark)
        if reader is None or not entry.get("result"):
            continue
        c = Collector(step.name)
        reader(c, step, entry["result"], results)
        out.extend(c.items)
    return out


# ------------------------------------------------------------------ failures
def kernel_failures(entry: dict[str, Any]) -> list[str]:
    """The failed correctness checks of a kernels step, one plain line each."""
    meta = (entry.get("result") or {}).get("metadata", {})
    return list(meta.get("failures", []))


def failures(results: dict[str, Any]) -> list[str]:
    """Everything that went wrong: failed checks first, then steps that failed, ran out of time or
    were interrupted (figures that miss their goal are marked in the figure table instead)."""
    out = []
    for entry in results.get("steps", {}).values():
        out += [f"correctness: {line}" for line in kernel_failures(entry)]
    for entry in results.get("steps", {}).values():
        status = entry.get("status")
        if status in ("failed", "timeout", "interrupted"):
            detail = f"killed after its cap of {entry.get('cap_s'):g} s" if status == "timeout" else \
                f"exit code {entry.get('returncode')}"
            if entry.get("benchmark") == "kernels" and status == "failed" and kernel_failures(entry):
                continue  # its failed checks are listed above
            out.append(f"step {entry['name']}: {status} ({detail})")
    return out


# ------------------------------------------------------------------ summary.md
def _cuda_text(v: dict[str, str]) -> str:
    def dotted(x: str | None, digits: tuple[int, ...]) -> str | None:
        if not x:
            return None
        n = int(x)
        major, rest = divmod(n, digits[0])
        return f"{major}.{rest // digits[1]}" if len(digits) == 2 else f"{major}.{rest // digits[1]}.{rest % digits[1]}"

    parts = [f"CUDA runtime {dotted(v.get('cuda_runtime'), (1000, 10))}" if v.get("cuda_runtime") else None,
             f"driver API {dotted(v.get('cuda_driver'), (1000, 10))}" if v.get("cuda_driver") else None,
             f"cuDNN {dotted(v.get('cudnn'), (10000, 100, 1))}" if v.get("cudnn") else None]
    return ", ".join(p for p in parts if p)


def device_line(results: dict[str, Any]) -> tuple[str, str]:
    """(device name, versions text) from nvidia-smi and the first JAX step that recorded its device."""
    env = results.get("environment", {})
    jax_meta = next(((e.get("result") or {}).get("metadata") for e in results.get("steps", {}).values()
                     if ((e.get("result") or {}).get("metadata") or {}).get("device")), None) or {}
    device = jax_meta.get("device", {})
    gpus = env.get("gpus") or []
    name = gpus[0]["name"] if gpus else device.get("device_kind", "unknown device")
    if device:
        name += f" [{device.get('platform')}]"
    v = jax_meta.get("versions", {})
    pk = env.get("packages", {})
    parts = [f"jax {v.get('jax') or pk.get('jax')}", f"jaxlib {v.get('jaxlib') or pk.get('jaxlib')}",
             _cuda_text(v), f"driver {gpus[0]['driver']} (CUDA {env.get('driver_cuda_version')})" if gpus else "",
             f"flax {pk.get('flax')}", f"torch {pk.get('torch')}", f"transformers {pk.get('transformers')}"]
    return name, ", ".join(p for p in parts if p)


def summary_markdown(results: dict[str, Any], steps: Sequence[Any]) -> str:
    """summary.md: correctness failures first, then steps, then every figure against its target."""
    name, vers = device_line(results)
    smoke = results.get("mode") == "smoke"
    env = results.get("environment", {})
    lines = [f"# GPU check: {name}" + (" (SMOKE RUN: tiny shapes, not GPU figures)" if smoke else ""), "",
             f"- versions: {vers}",
             f"- run: {results.get('created')} to {results.get('finished') or '(running)'}; "
             f"commit {env.get('commit') or 'unknown'}; `{results.get('command')}`",
             f"- caps: {results.get('total_cap_s'):g} s in all (budget {results.get('budget_s'):g} s)"]
    if env.get("missing"):
        lines.append("- missing packages: " + ", ".join(f"{k} (needed by {v})" for k, v in env["missing"].items()))
    lines += ["", "## Correctness (step kernels)", ""]
    kernels = next((e for e in results.get("steps", {}).values() if e.get("benchmark") == "kernels"), None)
    if kernels is None:
        lines.append("not selected in this run")
    elif kernels.get("result"):
        broken = kernel_failures(kernels)
        meta = kernels["result"]["metadata"]
        if broken:
            lines.append(f"**{len(broken)} of {meta['checks']} checks FAILED:**")
            lines += [f"- FAILED: {b}" for b in broken]
        else:
            lines.append(f"all {meta['checks']} checks passed ({meta['impl']} vs the XLA reference)")
        if meta.get("planned", meta["checks"]) > meta["checks"]:
            lines.append(f"\n**Only {meta['checks']} of {meta['planned']} planned checks ran** "
                         f"(step {kernels.get('status')}).")
    else:
        lines.append(f"no result (step {kernels.get('status')})")
    problems = [f for f in failures(results) if not f.startswith("correctness:")]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    lines += ["", "## Steps", "", "| step | status | wall s | cap s | what |", "|---|---|---:|---:|---|"]
    for step in steps:
        e = results.get("steps", {}).get(step.name)
        if e is None:
            continue
        wall = f"{e['wall_s']:.1f}" if isinstance(e.get("wall_s"), (int, float)) else "-"
        lines.append(f"| {step.name} | {e.get('status')} | {wall} | {e.get('cap_s'):g} | {step.title} |")
    figs = [Figure(**f) if isinstance(f, dict) else f for f in results.get("figures", [])]
    lines += ["", "## Figures against the targets of docs/PERFORMANCE.md", "",
              "| target | figure | measured | goal | meets |", "|---|---|---:|---|---|"]
    for f in figs:
        meets = {True: "yes", False: "**no**", None: ""}[f.ok]
        where = f" (measured at {f.measured_at})" if smoke and f.measured_at else ""
        lines.append(f"| {f.target} | {f.label}{where} | {f.text} | {f.goal} | {meets} |")
    tails = [(e["name"], e["log_tail"]) for e in results.get("steps", {}).values() if e.get("log_tail")]
    if tails:
        lines += ["", "## Last lines of the steps that did not finish cleanly"]
        for step_name, tail in tails:
            lines += ["", f"### {step_name}", "", "```", *tail[-15:], "```"]
    return "\n".join(lines) + "\n"
