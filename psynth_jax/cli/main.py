"""`psynth` command line: one subcommand per module, imported only when it runs.

Keeping imports lazy means `psynth generate` on an inference-only box never touches training,
data or evaluation code (or their dependencies).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module under psynth_jax.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate a completion with a backbone (default: embedded SmolLM2-135M)"),
    "demo": ("demo", "end-to-end Parallel-Synthesis on a GSM8K question: workers, cache/text/single paths, TTFT"),
    "bench": ("bench", "benchmarks with random weights of a named architecture (bench ttft: text vs cache path TTFT)"),
    "train": ("train", "train the cache mapper + synthesizer LoRA from a YAML config (resumes automatically)"),
    "eval": ("eval", "benchmarks x synthesis modes (single, text, naive/mapper-only/LoRA-only cache, psynth): accuracy + TTFT"),
    "export": ("export", "export a trained synthesizer for PyTorch: merged transformers checkpoint and/or PEFT adapter + mapper"),
    "build-data": ("build_data", "build training examples (exposure | aggregation | distillation) as .jsonl/.parquet"),
    "plan": ("plan", "per-device memory of a train or eval config on an accelerator, before provisioning it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psynth", description="Parallel-Synthesis in JAX: synthesize from worker KV caches."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(f"psynth_jax.cli.{module}")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Bad input (ValueError / FileNotFoundError) prints one clear line and
    exits 2; set PSYNTH_DEBUG=1 for the traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("PSYNTH_DEBUG"):
            raise
        print(f"psynth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
