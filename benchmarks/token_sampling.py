"""Sampling one token from a vocabulary of logits: greedy, temperature, top-p, and top-p by sorting.

`psynth bench sampling` times `inference.sampling.sample` on random logits [B, V] (V = the
architecture's vocabulary) for each batch size, one jitted call per strategy:

- greedy: argmax (temperature 0);
- temperature: softmax sampling at --temperature;
- top_p: temperature + the nucleus of `sampling.nucleus` (bisection over float32 bit patterns,
  32 masked sums over the vocabulary), what generation uses;
- top_p_sort: the same sample with the textbook nucleus (`sorted_nucleus`: sort the vocabulary,
  cumulative sum, cut), the baseline the bisection replaced.

Every decode step of sampled generation pays this once per row, so it belongs next to the
decode step's time (`psynth bench decode`). `mask_mismatch` counts the tokens on which the two
nuclei disagree over all rows: they are the same set up to float rounding at the cutoff
(tests/test_generation.py checks them against a float64 reference).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.harness import (Column, arch_type, base_metadata, command_line, int_list, report, resolve_arch, say)
from benchmarks.plots import plot_sampling
from psynth_jax.inference.sampling import SamplingConfig, nucleus, sample
from psynth_jax.measure.timing import time_calls
from psynth_jax.model.presets import PRESETS

STRATEGIES = ("greedy", "temperature", "top_p", "top_p_sort")
LOGIT_SCALE = 4.0  # random logits ~ N(0, 4^2): a peaked distribution, like a trained LM's

TABLE_COLUMNS: tuple[Column, ...] = (
    ("B", "batch", "{:>4d}"),
    ("greedy ms", "greedy_ms", "{:>10.3f}"),
    ("temp ms", "temperature_ms", "{:>9.3f}"),
    ("top-p ms", "top_p_ms", "{:>9.3f}"),
    ("sort ms", "top_p_sort_ms", "{:>9.3f}"),
    ("sort/top-p", "sort_over_top_p", "{:>9.2f}x"),
    ("nucleus", "nucleus_tokens_mean", "{:>8.1f}"),
    ("mismatch", "mask_mismatch", "{:>8d}"),
)

DEFINITIONS: dict[str, str] = {
    "greedy_ms": "jitted sample() at temperature 0 (argmax), median",
    "temperature_ms": "jitted sample() at `temperature`, top_p 1.0 (no nucleus), median",
    "top_p_ms": "jitted sample() at `temperature` and `top_p`: sampling.nucleus by bisection, median",
    "top_p_sort_ms": "the same with sorted_nucleus (sort + cumsum over the vocabulary), median",
    "sort_over_top_p": "top_p_sort_ms / top_p_ms",
    "nucleus_tokens_mean": "tokens kept by sampling.nucleus per row, mean over rows",
    "mask_mismatch": "tokens on which sampling.nucleus and sorted_nucleus disagree, summed over rows",
}


def sorted_nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """[B, V] -> bool [B, V]: the top-p nucleus by sorting (the baseline `sampling.nucleus` replaced).

    Sort descending, take the first position where the cumulative probability reaches top_p, keep
    every logit >= the one there (ties at the cutoff kept, like `sampling.nucleus`).
    """
    desc = -jnp.sort(-logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1)
    cut = jnp.minimum(jnp.sum(cum < top_p, axis=-1), logits.shape[-1] - 1)
    return logits >= jnp.take_along_axis(desc, cut[:, None], axis=-1)


def _sample_sorted(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    logits = logits / temperature
    logits = jnp.where(sorted_nucleus(logits, top_p), logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_sampling(batches: Sequence[int], temperature: float, top_p: float, repeats: int) -> None:
    """Errors naming the impossible setting, before anything is allocated."""
    if not batches:
        raise ValueError("need at least one --batch value")
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0 (greedy is timed anyway), got {temperature}")
    if not 0.0 < top_p < 1.0:
        raise ValueError(f"--top-p must be in (0, 1) (1.0 disables the nucleus), got {top_p}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")


def measure_sampling_point(batch: int, vocab: int, *, temperature: float, top_p: float, repeats: int,
                           key: jax.Array) -> dict[str, Any]:
    """One row: every strategy timed on the same [batch, vocab] logits, and the two nuclei compared."""
    kl, ks = jax.random.split(key)
    logits = LOGIT_SCALE * jax.random.normal(kl, (batch, vocab), jnp.float32)
    fns = {
        "greedy": jax.jit(lambda x, r: sample(x, r, SamplingConfig())),
        "temperature": jax.jit(lambda x, r: sample(x, r, SamplingConfig(temperature=temperature))),
        "top_p": jax.jit(lambda x, r: sample(x, r, SamplingConfig(temperature=temperature, top_p=top_p))),
        "top_p_sort": jax.jit(lambda x, r: _sample_sorted(x, r, temperature, top_p)),
    }
    row: dict[str, Any] = {"batch": batch, "vocab": vocab}
    first, times = {}, {}
    for name, fn in fns.items():
        t = time_calls(lambda fn=fn: fn(logits, ks), repeats)
        row[f"{name}_ms"] = t.median_ms
        first[name] = round(1e3 * t.first_s, 4)
        times[name] = [round(1e3 * x, 4) for x in t.times_s]
    row["sort_over_top_p"] = row["top_p_sort_ms"] / row["top_p_ms"]
    scaled = logits / temperature
    bisected = jax.jit(nucleus, static_argnums=1)(scaled, top_p)
    by_sort = jax.jit(sorted_nucleus, static_argnums=1)(scaled, top_p)
    row["nucleus_tokens_mean"] = float(jnp.mean(jnp.sum(bisected, axis=-1)))
    row["mask_mismatch"] = int(jnp.sum(bisected != by_sort))
    row["first_call_ms"] = first
    row["times_ms"] = times
    return row


def run_sampling(vocab: int, *, batches: Sequence[int], temperature: float = 0.7, top_p: float = 0.9,
                 repeats: int = 10, seed: int = 0, verbose: bool = True) -> list[dict[str, Any]]:
    """Time every strategy at every batch size; one row per batch size."""
    check_sampling(batches, temperature, top_p, repeats)
    rows = []
    for i, b in enumerate(batches):
        if verbose:
            say("sampling", f"point {i + 1}/{len(batches)}: batch {b} x vocab {vocab} (compiling + timing)")
        rows.append(measure_sampling_point(int(b), vocab, temperature=temperature, top_p=top_p, repeats=repeats,
                                           key=jax.random.fold_in(jax.random.key(seed), i)))
    return rows


# ------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=arch_type, default="smollm2-135m",
                   help=f"architecture whose vocabulary size is used ({', '.join(PRESETS)}) or a config.json / "
                        "model dir; logits are random")
    p.add_argument("--batch", type=int_list, default="1,16,48", help="rows sampled together, comma-separated")
    p.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled strategies")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass of the top-p strategies")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per strategy (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random logits")
    p.add_argument("--out", default="runs/bench", help="output directory (sampling.json, sampling.png)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")


_OPTIONS = ("arch", "batch", "temperature", "top_p", "repeats", "seed", "out")


def run(args: argparse.Namespace) -> int:
    check_sampling(args.batch, args.temperature, args.top_p, args.repeats)
    cfg, arch, hub = resolve_arch(args.arch)
    meta = base_metadata("sampling", cfg, arch=arch, hub=hub, dtype="float32", attn_impl="none",
                         command=command_line("sampling", args, _OPTIONS, arch=arch), repeats=args.repeats,
                         seed=args.seed, weights_note="random logits (N(0, 4^2)); no model weights are used")
    meta.update(batch=list(args.batch), vocab=cfg.vocab_size, temperature=args.temperature, top_p=args.top_p,
                logit_scale=LOGIT_SCALE, strategies=list(STRATEGIES),
                statistic="median over `repeats` timed calls after one compile call; ms", definitions=DEFINITIONS)
    dev = meta["device"]
    say("sampling", f"{arch}: vocab {cfg.vocab_size}, temperature {args.temperature}, top_p {args.top_p}, "
                    f"on {dev['device_kind']} [{dev['platform']}]")
    rows = run_sampling(cfg.vocab_size, batches=args.batch, temperature=args.temperature, top_p=args.top_p,
                        repeats=args.repeats, seed=args.seed)
    report("sampling", meta, rows, TABLE_COLUMNS, args, plot_sampling)
    return 0


if __name__ == "__main__":  # python -m benchmarks.token_sampling ... = psynth bench sampling ...
    sys.exit(harness.main("sampling"))
