"""`psynth export`: write a trained synthesizer in PyTorch formats.

From a `psynth train` run (its config.yaml names the backbone; the newest checkpoint gives the
LoRA and mapper) or from an existing PEFT adapter directory plus a backbone. Writes a merged
transformers checkpoint (LoRA folded in) and/or a PEFT adapter + mapper tensors; both by default,
then into OUT/merged and OUT/adapter (one kind alone goes straight into OUT).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from psynth_jax.cli.common import step


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="a `psynth train` run directory (config.yaml + checkpoints/)")
    src.add_argument("--adapter-dir", metavar="DIR",
                     help="a PEFT adapter directory (ours or the reference release's, with its mapper) to export")
    p.add_argument("--model", default=None, metavar="SRC",
                   help="backbone checkpoint (required with --adapter-dir; with --run default: the run's model.source)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="backbone and merged-weight dtype (default: the run's model.dtype; float32 with --adapter-dir)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (OUT/merged and OUT/adapter when writing both)")
    p.add_argument("--merged", action="store_true",
                   help="write a merged transformers checkpoint (LoRA folded in); default: both kinds")
    p.add_argument("--adapter", action="store_true",
                   help="write a PEFT adapter + mapper.safetensors; default: both kinds")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.interop.adapter import (
        describe_lora, load_mapper, load_peft_adapter, mapper_file, restore_run, run_config,
    )
    from psynth_jax.interop.export import export_adapter, export_merged
    from psynth_jax.interop.loader import load_model

    kinds = [k for k in ("merged", "adapter") if getattr(args, k)] or ["merged", "adapter"]
    if args.run:
        cfg = run_config(args.run)
        source, dtype = args.model or cfg.model.source, args.dtype or cfg.model.dtype
        with step(f"loading {source} ({dtype})"):
            base = load_model(source, dtype=dtype)
        with step(f"restoring the newest checkpoint of {args.run}"):
            trained = restore_run(args.run, base)
        model, mapper = trained.model, trained.mapper
        what = f"run {args.run} step {trained.step}"
    else:
        if not args.model:
            raise SystemExit("--adapter-dir needs --model (the backbone the adapter was trained on)")
        d = Path(args.adapter_dir)
        with step(f"loading {args.model} ({args.dtype or 'float32'})"):
            base = load_model(args.model, dtype=args.dtype or "float32")
        model = load_peft_adapter(base, d)
        found = mapper_file(d)
        mapper = load_mapper(found, model.cfg.num_kv_heads) if found else None
        what = f"adapter {d}"
    print(f"exporting {what}: {describe_lora(model.lora)}, mapper {mapper.kind if mapper else 'none'}")
    out = Path(args.out)
    for kind in kinds:
        target = out / kind if len(kinds) > 1 else out
        with step(f"writing the {kind} export to {target}"):
            if kind == "merged":
                export_merged(model, target)
            else:
                export_adapter(model, mapper, target)
        print(f"{kind}: {target}")
    return 0
