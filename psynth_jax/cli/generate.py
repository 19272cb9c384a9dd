"""`psynth generate "<question>"`: one chat completion from a backbone."""

from __future__ import annotations

import argparse

from psynth_jax.cli.common import (
    UsageError, add_model_arguments, check_attn_impl, make_cli_mesh, number, positive_int, step,
    utf8_argument,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the user message")
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=number(at_least=0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(above=0, at_most=1), default=1.0)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from psynth_jax.inference.generator import Generator
    from psynth_jax.inference.sampling import SamplingConfig
    from psynth_jax.interop.loader import load_model

    if not args.question.strip():
        raise UsageError("the question is empty: give the user message to answer")
    utf8_argument(args.question, "the question")
    if args.system is not None:
        utf8_argument(args.system, "--system")
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    check_attn_impl(args.attn_impl, "--attn-impl")
    device_mesh = make_cli_mesh(args.mesh)  # a bad --mesh fails before the load
    with step(f"loading {args.model} ({args.dtype})"):
        model = load_model(args.model, dtype=args.dtype, mesh=device_mesh)
    gen = Generator(model, attn_impl=args.attn_impl)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}
    ]
    with step("generating (first call includes compilation)"):
        (out,) = gen.complete([messages], max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
    print(out.text)
    return 0
