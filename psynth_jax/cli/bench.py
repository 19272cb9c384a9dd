"""`psynth bench <benchmark>`: thin entry points to the benchmarks in benchmarks/ (outside the package).

    psynth bench ttft --arch tiny-llama --ks 1,2,4 --ls 32,64 --prompt-tokens 32 --out runs/bench
    psynth bench roofline --out runs/bench

Benchmarks are subcommands of their own, listed in BENCHMARKS: each names a module of the
`benchmarks` package (a top-level package beside psynth_jax, installed with it; also run as
`python -m benchmarks.<name>` from a checkout) exposing `add_arguments(parser)` and
`run(args) -> int`. A module is imported by name only when its subcommand is chosen (building the
`psynth` parser imports none of them), so a benchmark's dependencies never load for another
command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from psynth_jax.cli.common import UsageError, check_attn_impl, check_out_dir

# benchmark -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ttft": ("benchmarks.ttft", "time to first token: text path vs cache path over K branches x L tokens"),
    "roofline": ("benchmarks.roofline", "measure the device's matmul peak and memory bandwidth (roofline.json)"),
    "batch": ("benchmarks.batch", "batched synthesis: TTFT and output tokens/s per batch size, cache vs text path"),
    "decode": ("benchmarks.decode", "synthesizer decode over a long cache: tokens/s against the bandwidth floor"),
    "train": ("benchmarks.train_step", "the trainer's step (mapper + LoRA): tokens/s and model FLOPs utilization"),
    "sampling": ("benchmarks.token_sampling", "one sampled token over the vocabulary: greedy, temperature, top-p "
                                              "(bisection) vs top-p by sorting"),
    "serve": ("benchmarks.serve", "psynth serve under N concurrent clients on loopback vs one request at a time: "
                                  "TTFT p50/p99 of the cache and text paths, decode tokens/s, requests/s"),
    "kernels": ("benchmarks.kernels", "correctness: the fused attention path (cudnn) against the XLA reference "
                                            "per layout, and the cache path's greedy tokens per model family"),
    "peer": ("benchmarks.peer", "the PyTorch + transformers (SDPA) peer of `bench ttft` alone: text and "
                                      "cache-consuming TTFT"),
    "gpu-check": ("benchmarks.gpu_check", "the GPU check: correctness, then the key figures, each step "
                                                "capped in time (launch/gpu_check.sh)"),
}


class _LazySubParsers(argparse._SubParsersAction):
    """Sub-parsers whose module-backed benchmarks get their arguments only when chosen."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = values[0]
        entry = BENCHMARKS.get(name)
        sub = self._name_parser_map.get(name)
        if entry is not None and sub is not None and not getattr(sub, "_loaded", False):
            module = importlib.import_module(entry[0])
            module.add_arguments(sub)
            sub.set_defaults(_bench=module.run)
            sub._loaded = True
        super().__call__(parser, namespace, values, option_string)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", action=_LazySubParsers)
    for name, (_, help_text) in BENCHMARKS.items():
        sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def check_common(args: argparse.Namespace) -> None:
    """The options every benchmark shares, checked before any compute: --repeats >= 1 (a median of
    no timed call is nothing), an --attn-impl this machine can run, an --out that can be a directory."""
    repeats = getattr(args, "repeats", None)
    if repeats is not None and repeats < 1:
        raise UsageError(f"--repeats must be at least 1 (timed calls per measurement), got {repeats}")
    if getattr(args, "attn_impl", None):
        check_attn_impl(args.attn_impl, "--attn-impl")
    if isinstance(getattr(args, "out", None), str):
        check_out_dir(args.out, "--out")


def run(args: argparse.Namespace) -> int:
    check_common(args)
    return int(args._bench(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m psynth_jax.cli.bench ttft ...`), same as `psynth bench`."""
    parser = argparse.ArgumentParser(prog="psynth bench", description="performance benchmarks")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
