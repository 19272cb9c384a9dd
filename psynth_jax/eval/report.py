"""The evaluation report: results.json (everything, machine-readable), results.md (the tables a
reader wants), and the plots (plots.py), all rebuilt from the records at the end of a session.

Honesty rules the tables follow: modes that use a trainable piece without trained weights are
marked untrained (they then equal naive_cache in effect); TTFT states how it was measured and
at what batch size; errors are counted as wrong and shown.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from psynth_jax.config.eval_schema import EvalConfig
from psynth_jax.config.typed import to_dict
from psynth_jax.eval import plots
from psynth_jax.eval.example import EvalExample
from psynth_jax.eval.modes import MODE_SPECS
from psynth_jax.eval.scoring import f1
from psynth_jax.eval.stats import summarize
from psynth_jax.eval.store import ModeRecord

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ACCURACY_PNG = "accuracy.png"
TTFT_PNG = "ttft_vs_branch_tokens.png"


def timing_method(cfg: EvalConfig) -> str:
    """One sentence on how TTFT was measured, for the report."""
    if cfg.timing_repeats == 0:
        return "TTFT not measured (timing_repeats = 0)."
    which = "" if cfg.timing_examples is None else f" on each task's first {cfg.timing_examples} examples"
    return (f"TTFT{which} per request at batch size 1 (each example re-run alone with a 1-token budget, whatever "
            f"batch of {cfg.batch_size} decoded its answer): median of {cfg.timing_repeats} timed runs after "
            "one compile run, from the path's first device work to its first sampled token (worker decoding "
            "excluded).")


def build_results(
    cfg: EvalConfig,
    examples: dict[str, list[EvalExample]],
    records: Sequence[ModeRecord],
    weights: dict[str, Any] | None,
    session: dict[str, Any],
    kl: dict[tuple[str, str, str], float | None] | None = None,
) -> dict[str, Any]:
    """results.json's content for the records of the configured tasks, examples and modes; kl:
    the teacher-forced KL(text || mode) values measured (`RunStore.kl`), by (task, id, mode)."""
    w = weights or {"adapter": cfg.adapter, "description": "unknown (no model loaded yet)",
                    "mapper_trained": False, "lora_trained": False}
    untrained = {m: MODE_SPECS[m].untrained_parts(w["mapper_trained"], w["lora_trained"]) for m in cfg.modes}
    n_examples = {t: len(exs) for t, exs in examples.items()}
    return {
        "config": to_dict(cfg),
        "weights": w,
        "modes": {m: MODE_SPECS[m].description for m in cfg.modes},
        "untrained": {m: parts for m, parts in untrained.items() if parts},
        "devices": sorted({r.device for r in records}),
        "timing": {"method": timing_method(cfg), "repeats": cfg.timing_repeats, "examples": cfg.timing_examples,
                   "batch_size": cfg.batch_size},
        "n_examples": n_examples,
        "complete": len(records) == sum(n_examples.values()) * len(cfg.modes),
        **summarize(records, list(examples), list(cfg.modes)),
        "f1": f1_by_mode(examples, records, list(cfg.modes)),
        "kl_from_text": kl_by_mode(examples, kl or {}, list(cfg.modes)),
        "session": session,
    }


def kl_by_mode(examples: dict[str, list[EvalExample]], kl: dict[tuple[str, str, str], float | None],
               modes: Sequence[str]) -> dict[str, dict[str, dict[str, float | int]]]:
    """Mean teacher-forced KL(text || mode) per task (and "all") and cache mode, over the examples
    measured (`psynth eval --kl`; a mode need not have answered), with their count; {} when none was."""
    ids = {(t, ex.id) for t, exs in examples.items() for ex in exs}
    measured = [(t, m, v) for (t, i, m), v in kl.items()
                if v is not None and math.isfinite(v) and m in modes and (t, i) in ids]
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for task in [*examples, "all"]:
        for mode in modes:
            vals = [v for t, m, v in measured if m == mode and (task == "all" or t == task)]
            if vals:
                out.setdefault(task, {})[mode] = {"mean": sum(vals) / len(vals), "n": len(vals)}
    return out


def f1_by_mode(examples: dict[str, list[EvalExample]], records: Sequence[ModeRecord], modes: Sequence[str]
               ) -> dict[str, dict[str, float | None]]:
    """Mean token F1 of each mode's extracted answers, per task of the qa family (errors count 0);
    accuracy is their exact match."""
    out: dict[str, dict[str, float | None]] = {}
    for task, exs in examples.items():
        by_id = {ex.id: ex for ex in exs if ex.family == "qa"}
        if not by_id:
            continue
        out[task] = {}
        for mode in modes:
            scores = [f1(by_id[r.id], r.answer) if r.error is None else 0.0
                      for r in records if r.task == task and r.mode == mode and r.id in by_id]
            out[task][mode] = sum(scores) / len(scores) if scores else None
    return out


def write_report(run_dir: Path, results: dict[str, Any], records: Sequence[ModeRecord]) -> None:
    """results.json, results.md and the PNG plots into `run_dir`."""
    (run_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    made = [ACCURACY_PNG] if plots.accuracy_plot(results, run_dir / ACCURACY_PNG) else []
    if plots.ttft_plot(records, run_dir / TTFT_PNG):
        made.append(TTFT_PNG)
    (run_dir / RESULTS_MD).write_text(render_markdown(results, made))


def _answered(results: dict[str, Any]) -> str:
    """"text 108, psynth 0": each configured mode's records over every task."""
    modes = results["modes"]
    counts = {m: sum(by_mode[m]["n"] for by_mode in results["tasks"].values() if m in by_mode) for m in modes}
    return ", ".join(f"{m} {n}" for m, n in counts.items())


def _kl(results: dict[str, Any], task: str) -> str:
    return ", ".join(f"{m} {v['mean']:.3f} (n={v['n']})" for m, v in results["kl_from_text"][task].items())


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(by_mode: dict[str, dict[str, Any]], untrained: dict[str, list[str]]) -> list[str]:
    lines = [
        "| mode | n | accuracy % (95% CI) | vs text: +/- (p) | TTFT median / p90 ms | speedup vs text "
        "| agreement w/ text % | branch tokens | live prompt tokens | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, m in by_mode.items():
        name = f"{mode} †" if mode in untrained else mode
        ci = m["ci95"]
        acc = f"{_pct(m['accuracy'])} ({_pct(ci[0])}-{_pct(ci[1])})" if ci else "-"
        t = m["ttft_ms"]
        ttft = f"{_num(t['median'])} / {_num(t['p90'])}" if t["median"] is not None else "-"
        speed = "-" if mode == "text" else _num(m["speedup_vs_text"], "{:.2f}x")
        agree = "-" if mode == "text" else _pct(m["agreement_with_text"])
        v = m.get("vs_text")
        paired = "-" if mode == "text" or not v or not v["n"] else f"+{v['wins']}/-{v['losses']} ({v['p_mcnemar']:.2g})"
        branch = "-" if mode == "single" else _num(m["branch_tokens_mean"], "{:.0f}")
        lines.append(f"| {name} | {m['n']} | {acc} | {paired} | {ttft} | {speed} | {agree} | {branch} | "
                     f"{_num(m['prompt_tokens_mean'], '{:.0f}')} | {m['errors']} |")
    return lines


def render_markdown(results: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """results.md: setting, weights, timing method, one table per dataset and one overall."""
    cfg, w, untrained = results["config"], results["weights"], results["untrained"]
    model = w.get("model", cfg["model"])
    out = [
        f"# Evaluation: {cfg['out_dir']}",
        "",
        f"- model: `{model['source']}` ({model.get('family', '?')}, {model.get('num_layers', '?')} layers, "
        f"{model['dtype']}, attention {model['attn_impl']}); device(s): {', '.join(results['devices']) or '-'}",
        f"- synthesizer weights: {w['description']}",
        f"- workers: K = {cfg['num_workers']} (marble_db: one per expert profile), up to {cfg['worker_tokens']} "
        f"tokens, temperature {cfg['worker_temperature']}, top-p {cfg['worker_top_p']}; answers: up to "
        f"{cfg['max_new_tokens']} tokens, temperature {cfg['synth_temperature']}; seed {cfg['seed']}",
        f"- every mode answers from the same stored worker branches; {results['timing']['method']}",
        "- accuracy: correct / n with a Wilson 95% interval; vs text: examples only this mode got right (+) and "
        "only the text path got right (-), with the exact McNemar test's two-sided p on those pairs; "
        "speedup: text's median TTFT / the mode's; agreement: "
        "extracted answers equal to the text path's; tokens: means per example (branch tokens = worker outputs "
        "handed over; live prompt tokens = tokens the mode prefilled)",
    ]
    if untrained:
        parts = ", ".join(f"{m} ({' + '.join(p)})" for m, p in untrained.items())
        out += ["", f"> **† UNTRAINED**: {parts} ran without trained weights for the parts named, so they equal "
                    "naive_cache in effect (identity mapper, LoRA B = 0); their numbers measure nothing learned."]
    if not results["complete"]:
        out += ["", f"> **Incomplete**: answers so far, of {sum(results['n_examples'].values())} examples: "
                    f"{_answered(results)}; rerun the same command to finish (a mode with KL values and no "
                    "answers was measured by `--kl` alone)."]
    for task, by_mode in results["tasks"].items():
        out += ["", f"## {task} ({results['n_examples'][task]} examples)", "", *_table(by_mode, untrained)]
        if task in results.get("f1", {}):
            f1s = ", ".join(f"{m} {_pct(v)}" for m, v in results["f1"][task].items())
            out += ["", f"Accuracy above is exact match; mean token F1 % of the same answers: {f1s}."]
        if task in results.get("kl_from_text", {}):
            out += ["", f"Teacher-forced KL(text || mode) per token on the text path's answer: {_kl(results, task)}."]
    if len(results["tasks"]) > 1:
        out += ["", "## all datasets (pooled)", "", *_table(results["overall"], untrained)]
        if "all" in results.get("kl_from_text", {}):
            out += ["", f"Teacher-forced KL(text || mode), pooled: {_kl(results, 'all')}."]
    if plots:
        out += ["", "## plots", "", *(f"![{Path(p).stem}]({p})" for p in plots)]
    s = results["session"]
    out += ["", f"This session: {s['wall_s']:.0f} s, computed {json.dumps(s['computed'])}.", ""]
    return "\n".join(out)
