"""`psynth demo`: one end-to-end Parallel-Synthesis run on a GSM8K test question.

K sampled workers (LoRA off) -> their output KV handed to the synthesizer -> the cache path,
the text-concatenation path and the single agent side by side, with answers, correctness and
the TTFT of the text and cache paths measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from psynth_jax.cli.common import (
    UsageError, add_handoff_arguments, add_model_arguments, check_attn_impl, check_out_file, make_cli_mesh,
    positive_int, step,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--index", type=int, default=0, help="GSM8K test question index")
    p.add_argument("--data", default=None, help="GSM8K test file (default: the shared data folder)")
    p.add_argument("--k", type=positive_int, default=3,
                   help="number of worker branches (the text path must fit K x --worker-tokens in the model's "
                        "positions: checked before decoding)")
    p.add_argument("--worker-tokens", type=positive_int, default=160, help="max new tokens per worker")
    p.add_argument("--max-new-tokens", type=positive_int, default=192, help="max new tokens of each synthesis")
    p.add_argument("--temperature", type=float, default=0.7, help="worker sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="worker nucleus sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", default=None,
                   help="trained mapper + LoRA: a `psynth train` run dir, an exported adapter dir, or the reference "
                        "release's checkpoint folder (cache_mapper.pt + judger_lora/, also latest/ or "
                        "step_checkpoints/latest/); default: untrained (identity mapper, LoRA B = 0)")
    add_handoff_arguments(p)
    p.add_argument("--out", default=None, help="also write the full result as JSON here")


def _show(title: str, text: str, width: int = 100) -> None:
    print(f"\n--- {title} " + "-" * max(0, width - len(title) - 5))
    print(textwrap.indent(text.strip() or "(empty)", "  "))


def check_fits(synth, question: str, args: argparse.Namespace) -> None:
    """Refuse, before any worker is decoded, a K x --worker-tokens the text path could not fit in
    the model's positions (its prompt holds every branch's text, up to --worker-tokens each)."""
    from psynth_jax.synthesis import prompts

    limit = synth.model.cfg.max_position_embeddings
    frame = len(synth.gen.chat_tokens(prompts.text_synth_messages(question, [""] * args.k)))
    need = frame + args.k * args.worker_tokens + args.max_new_tokens
    if need > limit:
        raise UsageError(
            f"--k {args.k} x --worker-tokens {args.worker_tokens} does not fit: the text path could need {need} "
            f"positions ({frame} prompt + {args.k} x {args.worker_tokens} branch + {args.max_new_tokens} new tokens), "
            f"the model has {limit}; lower --k, --worker-tokens or --max-new-tokens"
        )


def run(args: argparse.Namespace) -> int:
    from psynth_jax.eval.scoring import extract_answer, score
    from psynth_jax.eval.tasks import load_task
    from psynth_jax.inference.sampling import SamplingConfig
    from psynth_jax.interop.loader import load_model
    from psynth_jax.model.transformer import LoRAConfig
    from psynth_jax.synthesis import prompts
    from psynth_jax.synthesis.convention import Handoff
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    if args.out:
        check_out_file(args.out, "--out")
    examples = load_task("gsm8k", path=args.data)
    if not 0 <= args.index < len(examples):
        raise UsageError(f"--index {args.index} is outside the {len(examples)} GSM8K test questions")
    ex = examples[args.index]
    check_attn_impl(args.attn_impl, "--attn-impl")
    device_mesh = make_cli_mesh(args.mesh)  # a bad --mesh fails before the load

    with step(f"loading {args.model} ({args.dtype})"):
        model = load_model(args.model, dtype=args.dtype, lora=LoRAConfig(), mesh=device_mesh)
    synth = ParallelSynthesis(model, attn_impl=args.attn_impl)
    check_fits(synth, ex.question, args)
    if args.adapter:
        from psynth_jax.interop.importer import load_adapter_into

        with step(f"loading trained mapper + LoRA from {args.adapter}"):
            weights = load_adapter_into(synth, args.adapter, convention=args.handoff_convention,
                                        stop_tokens=args.worker_stop_tokens).description
    else:
        synth.handoff = Handoff(convention=args.handoff_convention or synth.handoff.convention,
                                stop_tokens=args.worker_stop_tokens or synth.handoff.stop_tokens)
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

    results = {}
    with step("cache path: re-encode + map branch KV, prefill the prompt over it, decode (LoRA on)"):
        results["cache"] = synth.cache_path([ex.question], workers.branches, max_new_tokens=args.max_new_tokens)
    with step("text path: prefill every branch as text, decode (LoRA off)"):
        results["text"] = synth.text_path([ex.question], workers.texts, max_new_tokens=args.max_new_tokens)
    with step("single agent"):
        results["single"] = synth.single_agent([ex.question], max_new_tokens=args.max_new_tokens)

    summary = {}
    for name, r in results.items():
        answer = extract_answer(ex, r.texts[0])
        correct = score(ex, r.texts[0])
        summary[name] = {"answer": answer, "correct": correct, "ttft_s": r.ttft_s, "breakdown": r.breakdown,
                         "prompt_tokens": r.prompt_tokens[0], "text": r.texts[0]}
        _show(f"{name} synthesis -> answer {answer!r} ({'correct' if correct else 'wrong'})", r.texts[0])

    c, t = results["cache"], results["text"]
    branch_tokens = sum(len(x) for x in workers.tokens[0])
    print("\nTime to first token (compile excluded, median of repeats; worker decoding excluded):")
    print(f"  text path : {t.ttft_s * 1e3:9.1f} ms  (prefill of {t.prompt_tokens[0]} prompt tokens)")
    print(f"  cache path: {c.ttft_s * 1e3:9.1f} ms  (prepare {c.breakdown['prepare_s'] * 1e3:.1f} ms + "
          f"prefill of {c.prompt_tokens[0]} live tokens over {branch_tokens} cached branch tokens "
          f"{c.breakdown['prefill_s'] * 1e3:.1f} ms)")
    print(f"  ratio text/cache: {t.ttft_s / c.ttft_s:.2f}x")
    import jax

    print(f"  device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    if args.out:
        record = {"question": ex.question, "gold": ex.gold, "branches": workers.texts[0], "weights": weights,
                  "paths": summary, "ttft_ratio_text_over_cache": t.ttft_s / c.ttft_s,
                  "device": jax.devices()[0].device_kind}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
