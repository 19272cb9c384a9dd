"""`psynth bench kernels`: the fused attention path checked against the XLA reference, before any timing.

Two kinds of check, each one row of kernels.json (`ok` true/false, the error and its tolerance):

- attention: `model.kernels.dispatch.attend` with the checked implementation (`--impl`, cudnn on a GPU;
  xla_split stands in on CPU) against the dense float32 reference (`dense_attention` over the
  cache with the chunk written in, at the highest matmul precision), for every layout the code
  runs: prefill (a chunk at slot 0 of an empty cache, ragged lengths), extend (the synthesizer
  prompt after [cached branch tokens], ragged prefixes and prompts) and decode (one token per
  row over long ragged caches, a finished row and an empty cache included), at head_dim 64
  (SmolLM2's 9/3 heads) and 128 (Qwen2.5-7B's 28/4), in each dtype of `--dtypes`. The cache
  slots past each row's prefix hold random junk that must not leak. The production XLA path
  (`impl="xla"`) is measured the same way (`xla_err`): the noise floor of the dtype.
  extend_grad: the extend layout's gradients (q, cached K/V, chunk K/V) of a random projection
  of the output, as the training step takes them, against the reference's gradients.
- greedy: the cache path end to end through the synthesis core (psynth_jax/synthesis/core.py)
  on a tiny random model of each family (Llama, Qwen2, Qwen3 at head_dim 128): worker rows
  prefilled and their output spans kept (`branch_kv`, prefill layout), prepared (re-encode +
  mapper + assemble), the synthesizer prompt run over them (`cache_prefill`, extend layout) and
  `--new-tokens` tokens decoded greedily (`runtime.continue_generation`, decode layout), once with the checked
  implementation and once with xla, from the same random tokens. The first token's logits are
  compared (`err`, relative to their standard deviation), and the tokens. Greedy decoding
  in bfloat16 may flip between two near-equal logits without anything being wrong, so at a
  row's first differing token the reference's own logits (teacher-forced) decide: a gap between
  the two tokens below `tie` x std is a tie, not a failure.

Errors are max |got - reference| over the valid query rows / max |reference|. A kernel that
refuses a case (cuDNN takes only fp16/bf16, for one) is a failed row with its error message.
Exit code 1 when any row fails, so a driver sees it; the JSON is written either way. The same
checks run as tests on a GPU (`pytest -m gpu tests/test_kernels_gpu.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness
from benchmarks.harness import device_info, resolve_dtype, say, versions, write_json
from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.kernels.dispatch import attend
from psynth_jax.model.kernels.xla import dense_attention
from psynth_jax.model.kv_cache import AttentionMask, write_rows
from psynth_jax.model.loaded import random_model
from psynth_jax.model.presets import preset
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.mapper import make_mapper

SCHEMA_VERSION = 1

# layout -> chunk length T, cache slots S, per-row prefix (slot the chunk is written at) and chunk length
LAYOUTS: dict[str, dict[str, Any]] = {
    "prefill": dict(t=200, slots=264, starts=(0, 0, 0), lens=(200, 131, 7)),
    "extend": dict(t=128, slots=1160, starts=(1000, 517, 64), lens=(128, 77, 128)),
    "decode": dict(t=1, slots=1536, starts=(1500, 257, 0), lens=(1, 0, 1)),
    "extend_grad": dict(t=64, slots=400, starts=(300, 129), lens=(64, 40)),
}
HEADS: dict[int, tuple[int, int]] = {64: (9, 3), 128: (28, 4)}  # head_dim -> (query heads, KV heads)
# family -> (tiny preset, head_dim of the checked model)
FAMILIES: dict[str, tuple[str, int]] = {"llama": ("tiny-llama", 64), "qwen2": ("tiny-qwen2", 64),
                                        "qwen3": ("tiny-qwen3", 128)}
# relative tolerances per dtype: outputs, gradients, first-token logits (/ std), near-tie band (/ std)
TOLERANCE = {
    "bfloat16": {"out": 2.5e-2, "grad": 5e-2, "logits": 0.1, "tie": 0.1},
    "float32": {"out": 2e-3, "grad": 5e-3, "logits": 1e-2, "tie": 1e-2},
}

DEFINITIONS = {
    "err": "attention rows: max |impl - reference| over valid query rows / max |reference| (gradients: the worst "
           "input, each in err_per_input); greedy rows: max |first-token logits impl - xla| / std(xla logits)",
    "xla_err": "the same for the production XLA path (impl='xla'): the dtype's noise floor",
    "reference": "dense_attention over the written cache, float32 inputs (rounded to the dtype first), "
                 "highest matmul precision",
    "divergences": "greedy rows: each request's first token that differs; ref_gap = (reference logit of the "
                   "reference token - of the other token) / std; tie = ref_gap <= tolerance.tie",
    "ok": "err <= tol (and, for greedy rows, every divergence a tie); an exception is a failed row",
}


# ------------------------------------------------------------------ attention layouts
def layout_inputs(layout: str, head_dim: int, dtype: str, seed: int) -> dict[str, jax.Array]:
    """Random q, chunk K/V, a junk-filled cache before the chunk is written, slots and lengths."""
    spec = LAYOUTS[layout]
    hq, hkv = HEADS[head_dim]
    b, t, s = len(spec["starts"]), spec["t"], spec["slots"]
    rng = np.random.RandomState(seed)

    def rand(*shape: int) -> jax.Array:
        return jnp.asarray(rng.randn(*shape), jnp.float32).astype(dtype)

    start = jnp.asarray(spec["starts"], jnp.int32)
    lens = jnp.asarray(spec["lens"], jnp.int32)
    return dict(q=rand(b, t, hq, head_dim), k_old=rand(b, s, hkv, head_dim), v_old=rand(b, s, hkv, head_dim),
                k_new=rand(b, t, hkv, head_dim), v_new=rand(b, t, hkv, head_dim), start=start, lens=lens,
                cot=rand(b, t, hq, head_dim).astype(jnp.float32))


def _mask(x: dict[str, jax.Array]):
    b, t = x["q"].shape[:2]
    s = x["k_old"].shape[1]
    valid = jnp.arange(s, dtype=jnp.int32)[None, :] < (x["start"] + x["lens"])[:, None]
    return AttentionMask(q_slots=x["start"][:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], kv_valid=valid)


def _query_rows(x: dict[str, jax.Array]) -> jax.Array:
    """[B, T, 1, 1] True for valid query rows (padding and finished rows carry no meaning)."""
    t = x["q"].shape[1]
    return (jnp.arange(t)[None, :] < x["lens"][:, None])[..., None, None]


def _attend(x: dict[str, jax.Array], impl: str) -> jax.Array:
    return attend(x["q"], x["k_old"], x["v_old"], _mask(x), impl=impl,
                  chunk=(x["k_new"], x["v_new"], x["start"], x["lens"]))


def _as_float32(x: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: (v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in x.items()}


def _reference(x: dict[str, jax.Array]) -> jax.Array:
    """Dense attention over the cache with the chunk written in (inputs already float32)."""

    k = write_rows(x["k_old"], x["k_new"], x["start"])
    v = write_rows(x["v_old"], x["v_new"], x["start"])
    return dense_attention(x["q"], k, v, _mask(x))


GRAD_INPUTS = ("q", "k_old", "v_old", "k_new", "v_new")


def _grads(x: dict[str, jax.Array], fn: Callable[[dict[str, jax.Array]], jax.Array]) -> dict[str, jax.Array]:
    """Gradients of sum(valid rows of fn(x) * cotangent) with respect to GRAD_INPUTS."""

    def loss(diff: dict[str, jax.Array]) -> jax.Array:
        out = fn({**x, **diff}).astype(jnp.float32)
        return jnp.sum(jnp.where(_query_rows(x), out, 0.0) * x["cot"])

    return jax.grad(loss)({k: x[k] for k in GRAD_INPUTS})


def relative_error(got: jax.Array, ref: jax.Array, rows: jax.Array | None = None) -> float:
    """max |got - ref| / max |ref| over `rows` (inf when got is not finite there)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if rows is not None:
        keep = np.broadcast_to(np.asarray(rows), got.shape)
        got, ref = got[keep], ref[keep]
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# module-level jits: the float32 reference compiles once per layout and head_dim (both dtypes share it)
_reference_out = jax.jit(_reference)
_reference_grads = jax.jit(lambda x: _grads(x, _reference))


@functools.partial(jax.jit, static_argnames=("impls", "grad"))
def _outputs(x: dict[str, jax.Array], *, impls: tuple[str, ...], grad: bool) -> tuple[Any, ...]:
    """Each implementation's output (or gradients) on the same inputs, in one compilation."""
    if grad:
        return tuple(_grads(x, functools.partial(_attend, impl=impl)) for impl in impls)
    return tuple(_attend(x, impl) for impl in impls)


def check_layout(layout: str, head_dim: int, dtype: str, impl: str, seed: int) -> dict[str, Any]:
    """One attention row: `impl` and xla against the float32 reference (gradients for extend_grad)."""
    hq, hkv = HEADS[head_dim]
    grad = layout.endswith("_grad")
    spec = LAYOUTS[layout]
    tol = TOLERANCE[dtype]["grad" if grad else "out"]
    row: dict[str, Any] = {"check": "attention", "layout": layout, "dtype": dtype, "head_dim": head_dim,
                           "heads": f"{hq}/{hkv}", "impl": impl, "batch": len(spec["starts"]),
                           "chunk_tokens": spec["t"], "cache_slots": spec["slots"], "prefix": list(spec["starts"]),
                           "chunk_lens": list(spec["lens"]), "tol": tol}
    x = layout_inputs(layout, head_dim, dtype, seed)
    with jax.default_matmul_precision("highest"):  # float32 matmuls may otherwise run as TF32 on a GPU
        ref = (_reference_grads if grad else _reference_out)(_as_float32(x))

    def error(got: Any, key: str) -> float:
        if not grad:
            return relative_error(got, ref, _query_rows(x))
        per = {k: relative_error(got[k], ref[k]) for k in GRAD_INPUTS}
        row[f"{key}_per_input"] = {k: (v if np.isfinite(v) else None) for k, v in per.items()}
        return max(per.values())

    def measure() -> float:
        xla, got = _outputs(x, impls=("xla", impl), grad=grad)  # a refusing kernel fails the row here
        row["xla_err"] = error(xla, "xla_err")
        return error(got, "err")

    return _finish(row, measure)


def _finish(row: dict[str, Any], measure: Callable[[], float]) -> dict[str, Any]:
    """row["err"] = measure(); ok = err <= tol; an exception is recorded as a failed row."""
    try:
        row["err"] = measure()
        row["ok"] = bool(row["err"] <= row["tol"])
    except Exception as err:  # noqa: BLE001 - a refused or crashing kernel is a result of the check
        row["ok"] = False
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        row["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    for key in ("err", "xla_err"):
        value = row.get(key)
        if isinstance(value, float) and not np.isfinite(value):  # strict JSON has no NaN/inf
            row[key] = None
            row["ok"] = False
            row.setdefault("error", f"non-finite values (NaN or inf) in the {'xla' if key == 'xla_err' else row['impl']}"
                                    " output's valid rows")
    return row


# ------------------------------------------------------------------ greedy tokens of the cache path
@dataclasses.dataclass
class CachePathRun:
    """What one implementation produced on the shared inputs."""

    first_logits: np.ndarray  # [B, V] float32, logits of the first synthesized token
    tokens: np.ndarray  # [B, new_tokens] greedy tokens


class GreedyCase:
    """A tiny random model of one family and the random inputs of the cache path (2 requests x 3 branches)."""

    def __init__(self, family: str, *, dtype: str, new_tokens: int, seed: int):


        arch, head_dim = FAMILIES[family]
        self.cfg = dataclasses.replace(preset(arch), head_dim=head_dim)
        self.family, self.arch, self.dtype, self.new_tokens = family, arch, dtype, new_tokens
        self.model = random_model(self.cfg, dtype=dtype, lora=LoRAConfig(rank=4, alpha=8.0), seed=seed)
        self.mapper_def, self.mapper_state = nnx.split(make_mapper("affine_length", self.cfg.num_kv_heads, seed=seed))
        rng = np.random.RandomState(seed)
        self.requests, self.branches = 2, 3
        self.prompt_lens = np.array([9, 14, 6, 11, 5, 13], np.int32)  # worker prompts, per branch row
        self.out_lens = np.array([16, 11, 20, 7, 19, 12], np.int32)  # branch outputs kept as cache
        width = int((self.prompt_lens + self.out_lens).max())
        self.worker_tokens = rng.randint(1, self.cfg.vocab_size, size=(len(self.prompt_lens), width)).astype(np.int32)
        self.synth_lens = np.array([10, 7], np.int32)  # ragged synthesizer prompts
        self.synth_tokens = rng.randint(1, self.cfg.vocab_size, size=(2, 10)).astype(np.int32)

    def prepared_cache(self, impl: str):
        """Worker rows prefilled with `impl` (synthesis core: branch_kv), their outputs' KV prepared
        (re-encoded, mapped, assembled) as the synthesizer's cache."""

        branches = core.jit_branch_kv(
            self.model.graphdef, self.model.state, jnp.asarray(self.worker_tokens),
            jnp.asarray(self.prompt_lens + self.out_lens), jnp.asarray(self.prompt_lens), jnp.asarray(self.out_lens),
            jnp.asarray(self.prompt_lens), num_requests=self.requests, branch_slots=int(self.out_lens.max()),
            attn_impl=impl)
        extra = self.synth_tokens.shape[1] + self.new_tokens + 1
        return core.jit_prepare(branches, self.mapper_def, self.mapper_state, cfg=self.cfg, extra_slots=extra)[0]

    def run(self, impl: str) -> CachePathRun:
        gd, st = self.model.graphdef, self.model.state
        logits, cache = core.jit_cache_prefill(gd, st, jnp.asarray(self.synth_tokens), jnp.asarray(self.synth_lens),
                                               self.prepared_cache(impl), attn_impl=impl)
        first = np.asarray(logits, np.float32)
        gen = runtime.continue_generation(gd, st, logits, cache, jax.random.key(0), max_new_tokens=self.new_tokens,
                                          sampling=SamplingConfig(), stop_ids=(), lora=True, attn_impl=impl)
        return CachePathRun(first, np.asarray(gen.tokens))

    def reference_logits(self, tokens: np.ndarray, upto: Sequence[int]) -> np.ndarray:
        """XLA logits of the token after prompt + tokens[b, :upto[b]] for each request (teacher-forced)."""

        width = self.synth_tokens.shape[1] + max(upto)
        rows = np.zeros((self.requests, max(width, 1)), np.int32)
        lens = np.zeros((self.requests,), np.int32)
        for b in range(self.requests):
            seq = np.concatenate([self.synth_tokens[b, :self.synth_lens[b]], tokens[b, :upto[b]]])
            rows[b, :len(seq)], lens[b] = seq, len(seq)
        logits, _ = core.jit_cache_prefill(self.model.graphdef, self.model.state, jnp.asarray(rows),
                                           jnp.asarray(lens), self.prepared_cache("xla"), attn_impl="xla")
        return np.asarray(logits, np.float32)


def compare_greedy(case: GreedyCase, got: CachePathRun, ref: CachePathRun, tol: dict[str, float]) -> dict[str, Any]:
    """logits_err and the first divergence of each request, judged by the reference's own logit gap."""
    std = ref.first_logits.std(axis=-1, keepdims=True)
    finite = bool(np.all(np.isfinite(got.first_logits)))
    err = float(np.max(np.abs(got.first_logits - ref.first_logits) / std)) if finite else float("inf")
    out: dict[str, Any] = {"logits_err": err}
    diff = got.tokens != ref.tokens
    firsts = [int(np.argmax(row)) if row.any() else None for row in diff]
    out["tokens_equal"] = all(f is None for f in firsts)
    divergences = []
    if not out["tokens_equal"]:
        upto = [f if f is not None else 0 for f in firsts]
        logits = case.reference_logits(ref.tokens, upto)
        for b, f in enumerate(firsts):
            if f is None:
                continue
            r_tok, g_tok = int(ref.tokens[b, f]), int(got.tokens[b, f])
            gap = float((logits[b, r_tok] - logits[b, g_tok]) / logits[b].std())
            divergences.append({"request": b, "position": f, "ref_token": r_tok, "token": g_tok,
                                "ref_gap": gap, "tie": bool(gap <= tol["tie"])})
    out["divergences"] = divergences
    out["tokens_compared"] = int(diff.size)
    return out


def check_greedy(family: str, dtype: str, impl: str, new_tokens: int, seed: int) -> dict[str, Any]:
    """One greedy row: the cache path with `impl` against xla on a tiny random model of `family`."""
    arch, head_dim = FAMILIES[family]
    tol = TOLERANCE[dtype]
    row: dict[str, Any] = {"check": "greedy", "family": family, "arch": arch, "head_dim": head_dim, "dtype": dtype,
                           "impl": impl, "new_tokens": new_tokens, "tol": tol["logits"], "tie_tol": tol["tie"]}

    def measure() -> float:
        case = GreedyCase(family, dtype=dtype, new_tokens=new_tokens, seed=seed)
        row.update(compare_greedy(case, case.run(impl), case.run("xla"), tol))
        return row.pop("logits_err")

    row = _finish(row, measure)
    if any(not d["tie"] for d in row.get("divergences", ())):
        row["ok"] = False
    return row


# ------------------------------------------------------------------ reporting
def describe(row: dict[str, Any]) -> str:
    """One plain line naming a row's case and verdict."""
    if row["check"] == "greedy":
        case = f"greedy tokens, {row['family']} (head_dim {row['head_dim']}), {row['dtype']}, {row['impl']} vs xla"
    else:
        case = (f"attention {row['layout']}, {row['dtype']}, head_dim {row['head_dim']} ({row['heads']} heads), "
                f"{row['impl']} vs reference")
    if row.get("error"):
        return f"{case}: {row['error']}"
    text = f"{case}: err {row['err']:.3g} (tol {row['tol']:.3g}"
    if row.get("xla_err") is not None:
        text += f", xla {row['xla_err']:.3g}"
    text += ")"
    bad = [d for d in row.get("divergences", ()) if not d["tie"]]
    if bad:
        d = bad[0]
        text += (f"; request {d['request']} differs at token {d['position']} with a reference logit gap of "
                 f"{d['ref_gap']:.3g} std (not a tie)")
    return text


def failures(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [describe(r) for r in rows if not r.get("ok")]


# ------------------------------------------------------------------ CLI
def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--impl", default="cudnn", choices=["cudnn", "xla_split", "splash"],
                   help="attention implementation checked against the XLA reference (xla_split: its algebra on CPU)")
    p.add_argument("--dtypes", type=_names(list(TOLERANCE)), default="bfloat16,float32",
                   help="dtypes of the attention layout checks")
    p.add_argument("--head-dims", type=_names([str(d) for d in HEADS]), default="64,128",
                   help="head dims of the attention layout checks (64: 9/3 heads, 128: 28/4 heads)")
    p.add_argument("--layouts", type=_names(list(LAYOUTS)), default=",".join(LAYOUTS),
                   help="attention layouts (extend_grad: the extend layout's gradients)")
    p.add_argument("--families", type=_names(list(FAMILIES)), default=",".join(FAMILIES),
                   help="tiny random models whose cache-path greedy tokens are compared")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the greedy models; auto = float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens decoded per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench", help="output directory (kernels.json)")


def run(args: argparse.Namespace) -> int:
    """Every check, most important first (the first dtype's layouts, the greedy paths, then the
    other dtypes); kernels.json is rewritten after each row, so a run stopped midway keeps its rows."""

    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    model_dtype = resolve_dtype(args.model_dtype)
    dev = device_info()
    say("kernels", f"{args.impl} vs the XLA reference on {dev['device_kind']} [{dev['platform']}]")
    meta = {
        "benchmark": "kernels", "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "impl": args.impl, "reference": "xla", "dtypes": list(args.dtypes), "head_dims": [int(h) for h in args.head_dims],
        "layouts": {k: LAYOUTS[k] for k in args.layouts}, "families": {k: FAMILIES[k] for k in args.families},
        "model_dtype": model_dtype, "new_tokens": args.new_tokens, "seed": args.seed, "tolerance": TOLERANCE,
        "device": dev, "versions": versions(), "definitions": DEFINITIONS,
    }
    path = Path(args.out) / "kernels.json"
    layouts = [(layout, int(h), dtype) for dtype in args.dtypes for layout in args.layouts for h in args.head_dims]
    first = [c for c in layouts if c[2] == args.dtypes[0]]
    checks: list[Callable[[], dict[str, Any]]] = [
        *(functools.partial(check_layout, *c, args.impl, args.seed) for c in first),
        *(functools.partial(check_greedy, f, model_dtype, args.impl, args.new_tokens, args.seed) for f in args.families),
        *(functools.partial(check_layout, *c, args.impl, args.seed) for c in layouts if c not in first),
    ]
    rows: list[dict[str, Any]] = []
    for i, check in enumerate(checks):
        rows.append(check())
        say("kernels", ("ok     " if rows[-1]["ok"] else "FAILED ") + describe(rows[-1]))
        failed = failures(rows)
        meta.update(passed=len(rows) - len(failed), checks=len(rows), planned=len(checks),
                    complete=i + 1 == len(checks), failures=failed)
        write_json(path, meta, rows)
    say("kernels", f"{meta['passed']}/{len(rows)} checks passed; wrote {path}")
    for line in meta["failures"]:
        print(f"FAILED: {line}", file=sys.stderr, flush=True)
    return 1 if meta["failures"] else 0


if __name__ == "__main__":  # python -m benchmarks.kernels ... = psynth bench kernels ...
    sys.exit(harness.main("kernels"))
