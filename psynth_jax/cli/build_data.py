"""`psynth build-data`: write training examples (exposure, aggregation or distillation) to a file.

exposure / aggregation need no model and are written in one go. distillation runs K sampled
workers and the text-concatenation path of the backbone, batched, and appends each batch's
examples as they complete; a rerun skips the ids already in the output, so an interrupted run
resumes where it stopped (a .parquet output is built at the end from a `.partial.jsonl` beside
it, which is what resumes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psynth_jax.cli.common import UsageError, add_model_arguments, check_attn_impl, check_out_file, positive_int, step

BUILDERS = ("exposure", "aggregation", "distillation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="GSM8K- or MATH-schema rows: a .jsonl/.json/.parquet/.csv file, a dataset folder or a hub id")
    p.add_argument("--builder", required=True, choices=BUILDERS)
    p.add_argument("--out", required=True, help="output file: .jsonl or .parquet")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N rows of the source")
    p.add_argument("--k", type=positive_int, default=3, help="branches per example")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", default="train", help="hub datasets / folders: split to read")
    p.add_argument("--subset", default=None, help="hub datasets: configuration (e.g. 'main' for openai/gsm8k)")
    p.add_argument("--variant", default="candidates", choices=["candidates", "evidence"],
                   help="aggregation: corrupted candidate solutions, or the question's facts split over branches")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="distillation: problems per batched generate")
    p.add_argument("--worker-tokens", type=positive_int, default=256, help="distillation: max new tokens per worker")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="distillation: max target tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="distillation: worker sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="distillation: worker nucleus sampling")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.data.builders import build_examples
    from psynth_jax.data.sources import parse_problems, read_rows, source_label

    out = check_out_file(args.out, "--out")
    if out.suffix not in (".jsonl", ".parquet"):
        raise UsageError(f"--out {out} must end in .jsonl or .parquet")
    if args.builder == "distillation":
        check_attn_impl(args.attn_impl, "--attn-impl")
    try:
        rows = read_rows(args.source, split=args.split, subset=args.subset, limit=args.limit)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--source {args.source!r} not found: {e}") from None
    if not rows:
        raise UsageError(f"--source {args.source!r} holds no rows")
    problems, missing = parse_problems(rows, source_label(args.source, args.split), args.source)
    if missing:
        print(f"[psynth] {missing} of {len(rows)} rows have no final answer: skipped", file=sys.stderr)
    if args.builder == "distillation":
        return _distill(args, problems, out)

    from psynth_jax.data.examples import write_examples

    result = build_examples(problems, args.builder, args.k, args.seed, variant=args.variant)
    write_examples(out, result.examples)
    skipped = f" (skipped: {dict(result.skipped)})" if result.skipped else ""
    print(f"wrote {len(result.examples)} {args.builder} examples to {out}{skipped}")
    return 0


def _distill(args: argparse.Namespace, problems: list, out: Path) -> int:
    from psynth_jax.data.distill import distill_to_jsonl, done_ids
    from psynth_jax.data.examples import read_examples, write_examples
    from psynth_jax.inference.sampling import SamplingConfig
    from psynth_jax.interop.loader import load_model
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    work = out if out.suffix == ".jsonl" else out.with_name(out.name + ".partial.jsonl")
    if work != out and out.exists() and not work.exists():  # resume from a finished parquet
        write_examples(work, read_examples(out))
    done = done_ids(work)
    pending = [p for p in problems if f"distillation/{p.id}" not in done]
    print(f"[psynth] {len(problems) - len(pending)} of {len(problems)} examples already in {work}", file=sys.stderr)
    if pending:
        with step(f"loading {args.model} ({args.dtype})"):
            model = load_model(args.model, dtype=args.dtype)
        # timing_repeats=0: no TTFT measurement, each path's prefill runs once
        synth = ParallelSynthesis(model, family="math", attn_impl=args.attn_impl, timing_repeats=0)
        distill_to_jsonl(
            pending, synth, work, k=args.k, batch_size=args.batch_size, worker_tokens=args.worker_tokens,
            max_new_tokens=args.max_new_tokens, seed=args.seed,
            worker_sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p),
        )
    if work != out:
        write_examples(out, read_examples(work))
        work.unlink()
    print(f"wrote {len(pending)} new distillation examples to {out} ({len(problems)} in all)")
    return 0
