"""`psynth demo`: one end-to-end Parallel-Synthesis run on a GSM8K test question.

K sampled workers (LoRA off) -> their output KV handed to the synthesizer -> the cache path,
the text-concatenation path and the single agent side by side, with answers, correctness and
the TTFT of the text and cache paths measured in the same run (psynth_jax/measure/ttft.py, around
the synthesizer's steps). Heavy imports (jax, the model, evaluation tasks) happen in `run`: the
`psynth` parser imports every command module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from psynth_jax.cli.common import (
    UsageError, add_handoff_arguments, add_model_arguments, check_attn_impl, make_cli_mesh, number,
    positive_int, step,
)
from psynth_jax.formats.output_files import check_output_file, replace_atomically
from psynth_jax.synthesis import prompts

if TYPE_CHECKING:
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

TIMING_REPEATS = 3  # timed calls per TTFT (after a compile call); the median is reported


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--index", type=int, default=0, help="GSM8K test question index")
    p.add_argument("--data", default=None, help="GSM8K test file (default: the shared data folder)")
    p.add_argument("--k", type=positive_int, default=3,
                   help="number of worker branches (the text path must fit K x --worker-tokens in the model's "
                        "positions: checked before decoding)")
    p.add_argument("--worker-tokens", type=positive_int, default=160, help="max new tokens per worker")
    p.add_argument("--max-new-tokens", type=positive_int, default=192, help="max new tokens of each synthesis")
    p.add_argument("--temperature", type=number(at_least=0), default=0.7, help="worker sampling temperature")
    p.add_argument("--top-p", type=number(above=0, at_most=1), default=0.95, help="worker nucleus sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", default=None,
                   help="trained mapper + LoRA: a `psynth train` run dir, an exported adapter dir, or the reference "
                        "release's checkpoint folder (cache_mapper.pt + judger_lora/, also latest/ or "
                        "step_checkpoints/latest/); default: untrained (identity mapper, LoRA B = 0)")
    add_handoff_arguments(p)
    p.add_argument("--out", default=None, help="also write the full result as JSON here (an existing file that is "
                                                "not a demo result needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out that holds something else")


def _show(title: str, text: str, width: int = 100) -> None:
    print(f"\n--- {title} " + "-" * max(0, width - len(title) - 5))
    print(textwrap.indent(text.strip() or "(empty)", "  "))


def check_fits(synth: ParallelSynthesis, question: str, args: argparse.Namespace) -> None:
    """Refuse, before any worker is decoded, a K x --worker-tokens the text path could not fit in
    the model's positions (its prompt holds every branch's text, up to --worker-tokens each)."""
    limit = synth.model.cfg.max_position_embeddings
    alone = len(synth.gen.chat_tokens(prompts.text_synth_messages(question, [""])))
    if alone + 1 + args.max_new_tokens > limit:  # the row itself is the cause, whatever --k / --worker-tokens
        raise UsageError(
            f"GSM8K test #{args.index} ({args.data or 'the shipped test file'}) is too long: its question alone takes "
            f"{alone} positions of the model's {limit} (with --max-new-tokens {args.max_new_tokens}); pick another "
            "--index or shorten that row")
    frame = len(synth.gen.chat_tokens(prompts.text_synth_messages(question, [""] * args.k)))
    need = frame + args.k * args.worker_tokens + args.max_new_tokens
    if need > limit:
        raise UsageError(
            f"--k {args.k} x --worker-tokens {args.worker_tokens} does not fit: the text path could need {need} "
            f"positions ({frame} prompt + {args.k} x {args.worker_tokens} branch + {args.max_new_tokens} new tokens), "
            f"the model has {limit}; lower --k, --worker-tokens or --max-new-tokens"
        )


def without_empty_branches(synth: ParallelSynthesis, question: str, workers):
    """The workers' branches less those that decoded 0 tokens (a sampled worker may stop at once:
    a runtime outcome, not an input error). Each one left out is named as displayed (1-based); the
    cache of the others is rebuilt from their tokens. None left: a runtime failure (exit 1)."""
    tokens = workers.tokens[0]
    empty = [i for i, t in enumerate(tokens) if not t]
    if not empty:
        return workers
    named = ", ".join(str(i + 1) for i in empty)
    if len(empty) == len(tokens):
        raise RuntimeError(f"every worker branch ({named}) decoded 0 tokens: nothing to synthesize from; "
                           "try another --seed or --temperature")
    keep = [i for i, t in enumerate(tokens) if t]
    print(f"[psynth] branch {named} decoded 0 tokens: the cache and text paths synthesize from branch "
          f"{', '.join(str(i + 1) for i in keep)}", file=sys.stderr)
    prefix = synth.gen.chat_tokens(prompts.worker_messages(question))
    stopped = [[workers.stopped[0][i] for i in keep]]
    branches = synth.branches_from_tokens([[prefix] * len(keep)], [[tokens[i] for i in keep]], stopped)
    return dataclasses.replace(workers, branches=branches, tokens=[[tokens[i] for i in keep]],
                               texts=[[workers.texts[0][i] for i in keep]], stopped=stopped)


def run(args: argparse.Namespace) -> int:
    import jax

    from psynth_jax.eval.scoring import extract_answer, score
    from psynth_jax.eval.tasks import load_task
    from psynth_jax.inference.sampling import SamplingConfig
    from psynth_jax.interop.importer import with_adapter
    from psynth_jax.interop.loader import load_model
    from psynth_jax.measure.ttft import time_to_first_token
    from psynth_jax.model.transformer import LoRAConfig
    from psynth_jax.synthesis.handoff import Handoff
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    if args.out:
        check_output_file(args.out, "--out", inputs=[args.data] if args.data else [], force=args.force,
                          ours=_is_demo_result)
    examples = load_task("gsm8k", path=args.data)
    if not examples:
        raise UsageError(f"--data {args.data} holds no GSM8K rows (an empty file?)")
    if not 0 <= args.index < len(examples):
        raise UsageError(f"--index {args.index} is outside the {len(examples)} GSM8K test questions")
    ex = examples[args.index]
    check_attn_impl(args.attn_impl, "--attn-impl")
    device_mesh = make_cli_mesh(args.mesh)  # a bad --mesh fails before the load

    with step(f"loading {args.model} ({args.dtype})"):
        model = load_model(args.model, dtype=args.dtype, lora=LoRAConfig(), mesh=device_mesh)
    handoff = Handoff.from_config(convention=args.handoff_convention, stop_tokens=args.worker_stop_tokens)
    synth = ParallelSynthesis(model, attn_impl=args.attn_impl, handoff=handoff)
    check_fits(synth, ex.question, args)
    if args.adapter:
        with step(f"loading trained mapper + LoRA from {args.adapter}"):
            synth, loaded = with_adapter(synth, args.adapter, convention=args.handoff_convention,
                                         stop_tokens=args.worker_stop_tokens)
        weights = loaded.description
    else:
        weights = (f"untrained: identity mapper (affine_length), LoRA r16/a32 with B = 0, handoff "
                   f"{synth.handoff.convention}/{synth.handoff.stop_tokens}")

    mesh = ", ".join(f"{k}={v}" for k, v in model.mesh.shape.items())
    print(f"model: {model.source} ({model.cfg.family}, {model.cfg.num_layers} layers, {args.dtype}, "
          f"attention={args.attn_impl}, mesh {mesh})")
    print(f"synthesizer weights: {weights}")
    _show(f"GSM8K test #{args.index} (gold: {ex.gold})", ex.question)

    worker_sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    with step(f"decoding K={args.k} workers in one batch (up to {args.worker_tokens} tokens each)"):
        workers = synth.run_workers([[prompts.worker_messages(ex.question)] * args.k],
                                    max_new_tokens=args.worker_tokens, sampling=worker_sampling, seed=args.seed)
    for i, text in enumerate(workers.texts[0]):
        _show(f"branch {i + 1} ({len(workers.tokens[0][i])} tokens)", text)
    workers = without_empty_branches(synth, ex.question, workers)

    paths = {  # the steps of each path: answered once, then timed (measure/ttft.py)
        "cache": ("cache path: re-encode + map branch KV, prefill the prompt over it, decode (LoRA on)",
                  lambda: synth.cache_steps([ex.question], workers.branches, max_new_tokens=args.max_new_tokens)),
        "text": ("text path: prefill every branch as text, decode (LoRA off)",
                 lambda: synth.text_steps([ex.question], workers.texts, max_new_tokens=args.max_new_tokens)),
        "single": ("single agent", lambda: synth.single_steps([ex.question], max_new_tokens=args.max_new_tokens)),
    }
    results, ttft = {}, {}
    for name, (title, steps) in paths.items():
        with step(title):
            results[name] = synth.answer(steps())
            ttft[name] = time_to_first_token(steps(), TIMING_REPEATS)

    summary = {}
    for name, r in results.items():
        answer = extract_answer(ex, r.texts[0])
        correct = score(ex, r.texts[0])
        summary[name] = {"answer": answer, "correct": correct, "ttft_s": ttft[name].total_s,
                         "breakdown": ttft[name].breakdown, "prompt_tokens": r.prompt_tokens[0], "text": r.texts[0]}
        _show(f"{name} synthesis -> answer {answer!r} ({'correct' if correct else 'wrong'})", r.texts[0])

    c, t = ttft["cache"], ttft["text"]
    branch_tokens = sum(len(x) for x in workers.tokens[0])
    print("\nTime to first token (compile excluded, median of repeats; worker decoding excluded):")
    print(f"  text path : {t.total_s * 1e3:9.1f} ms  (prefill of {results['text'].prompt_tokens[0]} prompt tokens)")
    print(f"  cache path: {c.total_s * 1e3:9.1f} ms  (prepare {c.breakdown['prepare_s'] * 1e3:.1f} ms + "
          f"prefill of {results['cache'].prompt_tokens[0]} live tokens over {branch_tokens} cached branch tokens "
          f"{c.breakdown['prefill_s'] * 1e3:.1f} ms)")
    print(f"  ratio text/cache: {t.total_s / c.total_s:.2f}x")
    print(f"  device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    if args.out:
        record = {"question": ex.question, "gold": ex.gold, "branches": workers.texts[0], "weights": weights,
                  "paths": summary, "ttft_ratio_text_over_cache": t.total_s / c.total_s,
                  "device": jax.devices()[0].device_kind}
        with replace_atomically(args.out) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _is_demo_result(path: Path) -> bool:
    """Whether `path` holds a result written by demo --out (which a new one may replace)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return isinstance(record, dict) and {"question", "paths"} <= record.keys()
