"""`psynth build-data`: write training examples of one source (any role, any row format) to a file.

The source is read exactly as a training config's `data.train` entry would be (data/sources.py:
the row format is recognised from the first row, or forced with --format), so the examples
written are the ones `psynth train` would build. exposure / aggregation need no model and are
written in one go. distillation runs K sampled workers (or takes the given branches) and the
text-concatenation path of the backbone, batched, and appends each batch's examples as they
complete; a rerun skips the ids already in the output, so an interrupted run resumes where it
stopped (a .parquet output is built at the end from a `.partial.jsonl` beside it, which is what
resumes).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from psynth_jax.cli.common import UsageError, add_model_arguments, check_attn_impl, number, positive_int, step
from psynth_jax.formats.output_files import check_output_file
from psynth_jax.config.schema import DataConfig, DataSourceConfig, SourceFormat
from psynth_jax.config.typed import ConfigError
from psynth_jax.config.validate import validate_data

BUILDERS = ("exposure", "aggregation", "distillation")
VARIANTS = ("candidates", "evidence", "short", "reasoned", "schemas", "calls")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="rows: a .jsonl/.json/.parquet/.csv/.tsv file, a glob of them, a dataset folder or a hub id")
    p.add_argument("--builder", required=True, choices=BUILDERS)
    p.add_argument("--out", required=True, help="output file: .jsonl or .parquet (never the source; an existing file "
                                                "that is not this builder's examples needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out that holds something else")
    p.add_argument("--format", default="auto", choices=typing.get_args(SourceFormat),
                   help="row format (default: recognised from the first row)")
    p.add_argument("--variant", default=None, choices=VARIANTS,
                   help="aggregation: candidates | evidence (problems), short | reasoned (multihop), "
                        "schemas | calls (bfcl)")
    p.add_argument("--task", default=None,
                   help="distillation: read the rows with this evaluation task's converter (e.g. arc_challenge, mbpp)")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N rows of the source (per file of a glob)")
    p.add_argument("--k", type=positive_int, default=3, help="branches per example, where the builder chooses K")
    p.add_argument("--max-k", type=positive_int, default=8, help="largest K kept (chat rounds, functions, paragraphs)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", default="train", help="hub datasets / folders: split to read")
    p.add_argument("--subset", default=None, help="hub datasets: configuration (e.g. 'main' for openai/gsm8k)")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="distillation: problems per batched generate")
    p.add_argument("--worker-tokens", type=positive_int, default=256, help="distillation: max new tokens per worker")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="distillation: max target tokens")
    p.add_argument("--temperature", type=number(at_least=0), default=0.7, help="distillation: worker sampling temperature")
    p.add_argument("--top-p", type=number(above=0, at_most=1), default=0.95, help="distillation: worker nucleus sampling")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.data.examples import is_examples_file, write_examples
    from psynth_jax.data.sources import load_stage

    out = check_output_file(args.out, "--out", inputs=[args.source], force=args.force,
                            ours=lambda f: is_examples_file(f, f"{args.builder}/"))
    if out.suffix not in (".jsonl", ".parquet"):
        raise UsageError(f"--out {out} must end in .jsonl or .parquet")
    if not 1 <= args.k <= args.max_k:
        raise UsageError(f"--k must be in [1, --max-k={args.max_k}], got {args.k}")
    from psynth_jax import distributed

    if args.builder == "distillation":
        distributed.initialize()  # a pod's processes share the generation (data/distill.py)
        check_attn_impl(args.attn_impl, "--attn-impl")
    src = DataSourceConfig(path=args.source, builder=args.builder, format=args.format, variant=args.variant,
                           task=args.task, limit=args.limit, split=args.split, subset=args.subset, k=(args.k,))
    d = DataConfig(train=(src,), seed=args.seed, num_branches=args.k, min_branches=1, max_branches=args.max_k)
    resume = out.is_file() and is_examples_file(out, f"{args.builder}/")  # else: a file --force replaces
    distiller = _Distiller(args, out, resume) if args.builder == "distillation" else None
    try:
        validate_data(d)
        stage = load_stage(d, "train", distiller)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--source {args.source!r} not found: {e}") from None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    (report,) = stage.sources
    skipped = f" (skipped: {report.skipped})" if report.skipped else ""
    if distiller is not None:
        added = sum(distributed.allgather_objects(distiller.added))
        if distributed.is_main():
            print(f"wrote {added} new distillation examples to {out} ({len(stage.examples)} in all){skipped}")
        return 0
    write_examples(out, stage.examples)
    print(f"wrote {len(stage.examples)} {args.builder} examples to {out}{skipped}")
    return 0


class _Distiller:
    """load_stage's distiller for the CLI: resumes in --out (or its .partial.jsonl), loads the
    model only when something is left to generate. `resume`: --out holds distillation examples
    (otherwise it is absent, empty, or a file --force replaces at the end, never read)."""

    def __init__(self, args: argparse.Namespace, out: Path, resume: bool):
        self.args, self.out, self.resume = args, out, resume
        self.added = 0  # examples generated by this run

    def __call__(self, src, items: list) -> list:
        from psynth_jax.data.distill import distill_to_jsonl, known_ids
        from psynth_jax.data.examples import read_examples, write_examples
        from psynth_jax import distributed
        from psynth_jax.inference.sampling import SamplingConfig
        from psynth_jax.interop.loader import load_model
        from psynth_jax.synthesis.pipeline import ParallelSynthesis

        args, out = self.args, self.out
        in_place = out.suffix == ".jsonl" and (self.resume or not out.exists() or out.stat().st_size == 0)
        work = out if in_place else out.with_name(out.name + ".partial.jsonl")
        if work != out and self.resume and not work.exists() and distributed.is_main():  # resume a finished parquet
            write_examples(work, read_examples(out))
        distributed.barrier("psynth_build_data_work_file")
        done = known_ids(work)
        pending = [item for item in items if f"distillation/{item.id}" not in done]
        if distributed.is_main():
            print(f"[psynth] {len(items) - len(pending)} of {len(items)} examples already in {work}", file=sys.stderr)
        if any(distributed.allgather_objects(bool(pending))):  # every process takes part (shares, barriers)
            with step(f"loading {args.model} ({args.dtype})"):
                model = load_model(args.model, dtype=args.dtype)
            synth = ParallelSynthesis(model, attn_impl=args.attn_impl)
            self.added = distill_to_jsonl(
                pending, synth, work, k=args.k, batch_size=args.batch_size, worker_tokens=args.worker_tokens,
                max_new_tokens=args.max_new_tokens, seed=args.seed,
                worker_sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p),
            )
        wanted = {f"distillation/{item.id}" for item in items}
        examples = [e for e in read_examples(work) if e.id in wanted] if work.exists() else []
        if work != out and distributed.is_main():
            write_examples(out, read_examples(work))
            work.unlink()
        distributed.barrier("psynth_build_data_written")
        return examples
