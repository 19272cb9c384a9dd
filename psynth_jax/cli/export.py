"""`psynth export`: write a trained synthesizer in PyTorch formats.

From a `psynth train` run (its config.yaml names the backbone; the newest checkpoint gives the
LoRA and mapper) or from any folder `psynth demo --adapter` reads (our adapter export, a PEFT
adapter, the reference release's checkpoint) plus a backbone. Formats:

- psynth (default): a merged transformers checkpoint (LoRA folded in) and/or a PEFT adapter +
  mapper.safetensors; both by default, then into OUT/merged and OUT/adapter (one kind alone goes
  straight into OUT);
- release: the reference release's layout (cache_mapper.pt, cache_mapper_config.json,
  judger_lora/) for its PyTorch runner.

Every export records the handoff the weights were trained under (psynth_export.json). OUT is
checked before any model loads (never the backbone's or the input's directory; not a non-empty
one without --force) and written through a staging directory, so a failed export changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psynth_jax.cli.common import add_handoff_arguments, step


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="a `psynth train` run directory (config.yaml + checkpoints/)")
    src.add_argument("--adapter-dir", metavar="DIR",
                     help="trained weights to re-export: our adapter export, a PEFT adapter, or the reference "
                          "release's checkpoint folder (cache_mapper.pt + judger_lora/, also latest/ or "
                          "step_checkpoints/latest/)")
    p.add_argument("--model", default=None, metavar="SRC",
                   help="backbone checkpoint (with --run default: the run's model.source; with --adapter-dir: "
                        "required unless the release checkpoint's run_args.json names it)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="backbone and merged-weight dtype (default: the run's model.dtype; float32 with --adapter-dir)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (psynth format: OUT/merged and OUT/adapter when writing both)")
    p.add_argument("--format", default="psynth", choices=["psynth", "release"],
                   help="psynth: merged transformers checkpoint + PEFT adapter with mapper.safetensors; release: "
                        "the reference release's cache_mapper.pt + judger_lora/ for its runner")
    p.add_argument("--merged", action="store_true",
                   help="psynth format: write a merged transformers checkpoint (LoRA folded in); default: both kinds")
    p.add_argument("--adapter", action="store_true",
                   help="psynth format: write a PEFT adapter + mapper.safetensors; default: both kinds")
    p.add_argument("--force", action="store_true",
                   help="replace the contents of a non-empty --out (removed once the new export is complete)")
    add_handoff_arguments(p)


def run(args: argparse.Namespace) -> int:
    from psynth_jax.interop.layout import release_records, resolve
    from psynth_jax.interop.staging import ExportError, check_output, staged_output

    if args.format == "release" and (args.merged or args.adapter):
        raise ExportError("--merged / --adapter choose the psynth format's parts; --format release writes the "
                          "release's layout only (run the merged export separately)")
    layout = resolve(args.run or args.adapter_dir)
    if args.run and layout.kind != "run":
        raise ExportError(f"--run {args.run} is not a `psynth train` run directory (no config.yaml); "
                          "use --adapter-dir for exported or release weights")
    if args.adapter_dir and layout.kind == "run":
        raise ExportError(f"--adapter-dir {args.adapter_dir} is a `psynth train` run directory; use --run")
    if args.run:
        from psynth_jax.interop.runs import run_config

        cfg = run_config(args.run)
        source, dtype = args.model or cfg.model.source, args.dtype or cfg.model.dtype
    else:
        named = release_records(layout.root).model_name if layout.kind == "release" else None
        source, dtype = args.model or named, args.dtype or "float32"
        if not source:
            raise ExportError("--adapter-dir needs --model (the backbone the adapter was trained on)")
    protect = [("backbone's directory", source), ("input being exported", layout.root),
               ("input being exported", args.run or args.adapter_dir)]
    check_output(args.out, force=args.force, protect=protect)  # before minutes of loading

    from psynth_jax.interop.importer import choose_handoff, describe_handoff, import_weights
    from psynth_jax.interop.loader import load_model
    from psynth_jax.synthesis.handoff import Handoff

    with step(f"loading {source} ({dtype})"):
        base = load_model(source, dtype=dtype)
    with step(f"reading {layout.where}"):
        imported = import_weights(layout.root, base)
    if layout.kind != "run" and layout.lora_dir is None:
        raise ExportError(f"{layout.where} holds no LoRA to export (a mapper-only checkpoint)")
    if imported.handoff is None and args.handoff_convention is None and args.worker_stop_tokens is None:
        handoff, how = None, "handoff: none recorded in the input (pass --handoff-convention / --worker-stop-tokens)"
    else:
        handoff, how = choose_handoff(Handoff(), imported.handoff, imported.handoff_source,
                                      convention=args.handoff_convention, stop_tokens=args.worker_stop_tokens)
    print(f"exporting {imported.describe()}, {how}")
    source_line = imported.parts[0]
    with staged_output(args.out, force=args.force, protect=protect) as stage:
        if args.format == "release":
            from psynth_jax.interop.release import HANDOFF_NOTE, export_release

            with step(f"writing the release layout to {args.out}"):
                warning = export_release(imported.model, imported.mapper, stage, handoff=handoff,
                                         embeddings=imported.embeddings, source=source_line)
            if warning is not None:
                print(f"WARNING: {warning} (also in {Path(args.out) / HANDOFF_NOTE})", file=sys.stderr)
            print(f"release: {args.out} (handoff {describe_handoff(handoff) if handoff else 'unknown'})")
            return 0
        from psynth_jax.interop.export import export_adapter, export_merged

        kinds = [k for k in ("merged", "adapter") if getattr(args, k)] or ["merged", "adapter"]
        for kind in kinds:
            target = stage / kind if len(kinds) > 1 else stage
            shown = Path(args.out) / kind if len(kinds) > 1 else Path(args.out)
            with step(f"writing the {kind} export to {shown}"):
                if kind == "merged":
                    export_merged(imported.model, target, handoff=handoff, source=source_line)
                else:
                    export_adapter(imported.model, imported.mapper, target, handoff=handoff,
                                   embeddings=imported.embeddings, source=source_line)
            print(f"{kind}: {shown}")
    return 0
