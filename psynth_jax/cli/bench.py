"""`psynth bench <benchmark>`: performance sweeps with random weights of a named architecture.

    psynth bench ttft --arch tiny-llama --ks 1,2,4 --ls 32,64 --prompt-tokens 32 --out runs/bench
    psynth bench roofline --out runs/bench

Benchmarks are subcommands of their own, listed in BENCHMARKS. An entry's target is either
- the name of a function in this module that adds the subcommand's arguments (and sets
  `_bench`), e.g. "_ttft_arguments"; or
- a dotted module path ("psynth_jax.bench.roofline") of a module exposing
  `add_arguments(parser)` and `run(args) -> int`. Such a module is imported only when its
  subcommand is chosen (building the `psynth` parser imports none of them), so a benchmark's
  dependencies never load for another command.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

# benchmark -> (target: function in this module adding its arguments, or a module path; one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ttft": ("_ttft_arguments", "time to first token: text path vs cache path over K branches x L tokens"),
    "roofline": ("psynth_jax.bench.roofline", "measure the device's matmul peak and memory bandwidth (roofline.json)"),
    "batch": ("psynth_jax.bench.batch", "batched synthesis: TTFT and output tokens/s per batch size, cache vs text path"),
    "decode": ("psynth_jax.bench.decode", "synthesizer decode over a long cache: tokens/s against the bandwidth floor"),
    "train": ("psynth_jax.bench.train_step", "the trainer's step (mapper + LoRA): tokens/s and model FLOPs utilization"),
    "sampling": ("psynth_jax.bench.sampling", "one sampled token over the vocabulary: greedy, temperature, top-p "
                                              "(bisection) vs top-p by sorting"),
}


def is_module_target(target: str) -> bool:
    return "." in target


class _LazySubParsers(argparse._SubParsersAction):
    """Sub-parsers whose module-backed benchmarks get their arguments only when chosen."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = values[0]
        entry = BENCHMARKS.get(name)
        sub = self._name_parser_map.get(name)
        if entry is not None and sub is not None and is_module_target(entry[0]) and not getattr(sub, "_loaded", False):
            module = importlib.import_module(entry[0])
            module.add_arguments(sub)
            sub.set_defaults(_bench=module.run)
            sub._loaded = True
        super().__call__(parser, namespace, values, option_string)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _arch(text: str) -> str:
    """A preset name or an existing config.json / model dir (argparse reports anything else)."""
    from psynth_jax.model.presets import preset

    if not Path(text).exists():
        try:
            preset(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", action=_LazySubParsers)
    for name, (target, help_text) in BENCHMARKS.items():
        bp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if not is_module_target(target):
            globals()[target](bp)


def _ttft_arguments(p: argparse.ArgumentParser) -> None:
    from psynth_jax.model.presets import PRESETS

    p.add_argument("--arch", type=_arch, default="tiny-llama",
                   help=f"architecture preset ({', '.join(PRESETS)}) or a transformers config.json / model dir; "
                        "weights are random (timing does not depend on them)")
    p.add_argument("--ks", type=_int_list, default="1,2,4", help="branch counts K, comma-separated")
    p.add_argument("--ls", type=_int_list, default="32,64,128", help="tokens per branch L, comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=32, help="synthesizer prompt tokens (live in both paths)")
    p.add_argument("--batch", type=int, default=1, help="requests per call")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="parameter/cache dtype; auto = float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--attn-impl", default="xla", choices=["xla", "cudnn", "xla_split", "splash"],
                   help="attention kernel (cudnn: GPU only)")
    p.add_argument("--mapper", default="affine_length", choices=["affine_length", "per_head_affine"],
                   help="cache mapper kind")
    p.add_argument("--lora-rank", type=int, default=16, help="synthesizer LoRA rank (on in the cache path)")
    p.add_argument("--worker-prompt-tokens", type=int, default=64,
                   help="RoPE offset P of every branch (its worker prompt), undone by the re-encoding")
    p.add_argument("--new-tokens", type=int, default=64, help="decode room left in both paths' caches")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench", help="output directory (ttft.json, ttft.png)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the discarded warm-up pass over the first point")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    roof = p.add_mutually_exclusive_group()
    roof.add_argument("--no-roofline", action="store_true",
                      help="skip the roofline measurement (no floor / MFU fields)")
    roof.add_argument("--roofline-json", default=None, metavar="PATH",
                      help="reuse a measured roofline (a roofline.json of `psynth bench roofline`, or a ttft.json) "
                           "instead of measuring it before the sweep")
    p.add_argument("--torch-peer", action="store_true",
                   help="also time the same architecture in PyTorch + transformers (SDPA): text prefill and prompt "
                        "over pre-built branch caches; runs in a child process before the JAX sweep")
    p.set_defaults(_bench=run_ttft)


def resolve_arch(arch: str):
    """(ModelConfig, display name, hub id) for a preset name or a config.json path / model dir."""
    from psynth_jax.model.config import ModelConfig
    from psynth_jax.model.presets import hub_id, preset

    path = Path(arch)
    if path.exists():
        return ModelConfig.from_hf(path), str(path), None
    return preset(arch), arch.strip().lower(), hub_id(arch)


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import jax

    return "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"


def _ttft_command(args: argparse.Namespace, arch: str, dtype: str) -> str:
    """The canonical command line that reproduces this sweep (recorded in the JSON)."""
    argv = ["psynth", "bench", "ttft", "--arch", arch, "--ks", ",".join(map(str, args.ks)),
            "--ls", ",".join(map(str, args.ls)), "--prompt-tokens", str(args.prompt_tokens),
            "--batch", str(args.batch), "--dtype", dtype, "--attn-impl", args.attn_impl, "--mapper", args.mapper,
            "--lora-rank", str(args.lora_rank), "--worker-prompt-tokens", str(args.worker_prompt_tokens),
            "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--seed", str(args.seed),
            "--out", str(args.out)] + (["--no-warmup"] if args.no_warmup else [])
    if getattr(args, "no_roofline", False):
        argv.append("--no-roofline")
    elif getattr(args, "roofline_json", None):
        argv += ["--roofline-json", str(args.roofline_json)]
    if getattr(args, "torch_peer", False):
        argv.append("--torch-peer")
    return shlex.join(argv)


def run_ttft(args: argparse.Namespace) -> int:
    """Order: (1) the PyTorch peer, in a child process, before this process starts JAX's backend
    (JAX reserves most GPU memory when it starts); (2) the roofline; (3) the JAX sweep, which
    merges the peer's rows and derives the floor fields; (4) JSON, table, plot."""
    from psynth_jax.bench.plots import plot_ttft, plot_ttft_floor
    from psynth_jax.bench.roofline import format_roofline, load_roofline, measure_roofline
    from psynth_jax.bench.common import load_average, write_json
    from psynth_jax.bench.ttft import run_ttft_sweep, sweep_metadata

    cfg, arch, hub = resolve_arch(args.arch)
    out = Path(args.out)
    peer = None
    if getattr(args, "torch_peer", False):
        from psynth_jax.bench.peer import require_torch, run_peer_subprocess

        require_torch()
        print("[bench ttft] PyTorch peer first, in a child process (frees its memory before JAX starts)",
              file=sys.stderr, flush=True)
        peer = run_peer_subprocess(
            cfg, out / "ttft_peer.json", ks=args.ks, ls=args.ls, prompt_tokens=args.prompt_tokens, batch=args.batch,
            dtype=args.dtype, repeats=args.repeats, seed=args.seed, warmup=not args.no_warmup)
    dtype = resolve_dtype(args.dtype)
    roofline = None
    if getattr(args, "roofline_json", None):
        roofline = load_roofline(args.roofline_json)
        print(f"[bench ttft] roofline from {args.roofline_json}:\n{format_roofline(roofline)}", file=sys.stderr)
    elif not getattr(args, "no_roofline", False):
        print("[bench ttft] measuring the roofline (matmul peak, memory bandwidth)", file=sys.stderr, flush=True)
        roofline = measure_roofline(dtype=dtype)
        print(format_roofline(roofline), file=sys.stderr, flush=True)
    if roofline is not None and roofline.dtype != dtype:
        print(f"[bench ttft] warning: the roofline was measured in {roofline.dtype}, the sweep runs {dtype}",
              file=sys.stderr)
    settings = dict(
        ks=args.ks, ls=args.ls, prompt_tokens=args.prompt_tokens, batch=args.batch, dtype=dtype,
        attn_impl=args.attn_impl, repeats=args.repeats, mapper_kind=args.mapper, lora_rank=args.lora_rank,
        worker_prompt_tokens=args.worker_prompt_tokens, new_tokens=args.new_tokens, seed=args.seed,
        warmup=not args.no_warmup,
    )
    meta = sweep_metadata(cfg, arch=arch, hub=hub, command=_ttft_command(args, arch, dtype), roofline=roofline,
                          peer=peer["metadata"] if peer else None, **settings)
    dev = meta["device"]
    print(f"[bench ttft] {arch}: {cfg.num_params() / 1e9:.3f}B params ({cfg.num_layers} layers, "
          f"{cfg.num_kv_heads} KV heads x {cfg.head_dim}), RANDOM weights, {dtype}, attn={args.attn_impl}, "
          f"on {dev['device_kind']} [{dev['platform']}]", file=sys.stderr, flush=True)
    print(f"[bench ttft] times in ms, median of {args.repeats} after a compile call; batch {args.batch}, "
          f"prompt {args.prompt_tokens} tokens", file=sys.stderr, flush=True)
    rows = run_ttft_sweep(cfg, roofline=roofline, peer_rows=peer["rows"] if peer else None, **settings)
    meta["device"]["host_load_avg_1m_end"] = load_average()
    json_path = write_json(out / "ttft.json", meta, rows)
    print(f"[bench ttft] wrote {json_path}", file=sys.stderr)
    if not args.no_plot:
        png = plot_ttft(meta, rows, out / "ttft.png")
        if png is not None:
            print(f"[bench ttft] wrote {png}", file=sys.stderr)
        if roofline is not None or peer:
            png = plot_ttft_floor(meta, rows, out / "ttft_floor.png")
            if png is not None:
                print(f"[bench ttft] wrote {png}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args._bench(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m psynth_jax.cli.bench ttft ...`), same as `psynth bench`."""
    parser = argparse.ArgumentParser(prog="psynth bench", description="performance benchmarks")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
