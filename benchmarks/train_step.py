"""The training step: tokens/s and model FLOPs utilisation of the trainer's own jitted step.

`psynth bench train` builds exactly what `psynth_jax.train.trainer.Trainer` builds (random
weights instead of a checkpoint): `split_trainable` (LoRA + cache mapper trainable, backbone
frozen), `make_optimizer` (AdamW, release defaults), `ObjectiveConfig` (remat, attention kernel)
and `make_train_step` (the jitted, sharded step, here over a 1-device mesh) on a synthetic batch
in the trainer's batch contract: B examples x K branches of [worker prefix P | L_b output] tokens
and `live_tokens` synthesizer tokens (prompt then target; the loss covers the target, the last
3/4 of the live tokens). What one step does (psynth_jax/train/objective.py):

1. branch prefill: the frozen backbone (LoRA off) runs over the B*K branch rows; the cache is
   under `stop_gradient`, so this part is forward only (no backward, no remat);
2. re-encode + cache mapper + assemble (differentiable in the 260 mapper parameters);
3. the synthesizer (LoRA on) runs teacher-forced over the live tokens on top of the branch
   caches (remat applies here), logits over every live position, cross-entropy;
4. backward into LoRA and mapper (through the branch K/V), AdamW update.

The step is compiled once, then timed `repeats` times (chained: each step takes the previous
step's donated parameters and optimizer state); the median is reported. The objective is
cross-entropy only (KL weight 0, the release's); the batch is placed on the device once.

Tokens/s: tokens processed per step = B * (K * (P + L_b) + live_tokens) (all branch rows plus
the live tokens; with P = 0, the default, B * (K * L_b + live)), the count the trainer's own
tokens/s uses, divided by the median step time.

FLOP convention (model FLOPs, what MFU counts; a multiply-add is 2 FLOPs; norms, softmax,
RoPE, the mapper and the optimizer are ignored, all < 1%):
- matmul forward per token: 2 x (layer projection parameters) per layer (+ 2 x d x vocab for
  the LM head on the live tokens only; the branch prefill returns hidden states);
- LoRA forward per token: 2 x r x (d_in + d_out) per adapted projection;
- attention forward: 4 x heads x head_dim per (query, attended key) pair (QK^T and PV), with
  the keys actually attended: causal within a branch row; every branch token + causal within
  the live tokens for the synthesizer (masked-out pairs are not counted);
- backward (synthesizer only): frozen matmuls (layers and LM head) need input gradients only,
  1 x their forward (no weight gradients); LoRA 2 x forward (input + weight gradients);
  attention 2 x forward (gradients of Q, K and V; K/V gradients reach the mapper);
- model FLOPs = branch forward + synthesizer forward + synthesizer backward;
- hardware FLOPs = model FLOPs + the rematerialised synthesizer layer forward when remat is on
  (jax.checkpoint with nothing saveable on each scanned layer: the layer forward runs again in
  the backward pass; the LM head is outside the scan and not recomputed). MFU uses model FLOPs
  (the PaLM convention); HFU uses hardware FLOPs.
The counting primitives (block matmul parameters, LoRA parameters, attended pairs) are those of
the cost model in psynth_jax/measure/roofline.py, so this convention matches the TTFT floors'.
MFU = model FLOPs per step / step time / peak; the peak is --peak-tflops, a roofline.json's, or a
dense-matmul peak measured now in the compute dtype (see `peak_tflops`).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness
from benchmarks.harness import (Column, add_common_arguments, base_metadata, command_line, describe_run, report,
                                resolve_arch, resolve_dtype, say)
from benchmarks.plots import plot_train
from benchmarks.roofline import measure_matmul_peak
from psynth_jax.cli.common import number
from psynth_jax.measure.roofline import attention_pairs, block_matmul_params, load_roofline, lora_params
from psynth_jax.measure.timing import OutOfMemory, Timing, time_calls
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.loaded import random_model
from psynth_jax.model.sharding import Rules, make_mesh
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, split_trainable
from psynth_jax.train.step import batch_shardings, make_optimizer, make_train_step, place_train_state

# PyTorch PEFT tokens/s for this step (Qwen3-14B, 3 branches x 1024 + 512 live tokens): issue #7's target
REFERENCE = {"tokens_per_s": 4420.0, "arch": "qwen3-14b", "branches": 3, "branch_tokens": 1024, "live_tokens": 512,
             "source": "PyTorch PEFT figure quoted in issue #7 (same GPU); compare only at this shape"}

TABLE_COLUMNS: tuple[Column, ...] = (
    ("remat", "remat_str", "{:>5s}"),
    ("tok/step", "tokens_per_step", "{:>8d}"),
    ("step ms", "step_ms", "{:>9.2f}"),
    ("tok/s", "tokens_per_s", "{:>9.1f}"),
    ("model TF/s", "model_tflops_per_s", "{:>10.3f}"),
    ("MFU", "mfu", "{:>6.1%}"),
    ("HFU", "hfu", "{:>6.1%}"),
    ("loss", "loss_last", "{:>7.3f}"),
)

DEFINITIONS: dict[str, str] = {
    "tokens_per_step": "batch * (branches * (branch_prefix_tokens + branch_tokens) + live_tokens): every token "
                       "the step runs through the backbone (the trainer's own tokens/s count)",
    "step_ms": "median wall time of one train step after compilation (chained steps, results ready)",
    "tokens_per_s": "tokens_per_step / (step_ms / 1e3)",
    "flops": "per-step FLOP breakdown; see flop_convention",
    "model_flops_per_step": "branch forward + synthesizer forward + synthesizer backward (no recompute)",
    "hardware_flops_per_step": "model_flops_per_step + remat recompute of the synthesizer layers (remat on)",
    "model_tflops_per_s": "model_flops_per_step / step time / 1e12",
    "mfu": "model_flops_per_step / step time / (peak_tflops * 1e12)",
    "hfu": "hardware_flops_per_step / step time / (peak_tflops * 1e12)",
    "vs_reference": "tokens_per_s / reference.tokens_per_s (only at the reference shape, else null)",
    "loss_first / loss_last": "loss of the compile step and of the last timed step (finite = the real objective ran)",
    "trainable_delta_norm": "global norm of (LoRA + mapper after the first step - before): > 0, they learn",
    "frozen_unchanged": "the backbone's per-leaf checksums are identical before and after all steps",
    "first_call_ms": "the compile-inclusive first step",
}

FLOP_CONVENTION = (
    "multiply-add = 2 FLOPs; norms/softmax/RoPE/mapper/optimizer ignored. Forward: 2 x projection params per "
    "token per layer, + 2 x d x vocab LM head on live tokens only; LoRA 2 x r x (d_in + d_out) per adapted "
    "projection per token; attention 4 x heads x head_dim per attended (query, key) pair (causal pairs only). "
    "Branch prefill: forward only (stop_gradient, frozen, LoRA off). Synthesizer backward: frozen matmuls 1 x "
    "forward (input gradients only, no weight gradients), LoRA 2 x forward, attention 2 x forward. Model FLOPs "
    "= branch fwd + synth fwd + synth bwd. Hardware FLOPs add the remat recompute of the synthesizer layers "
    "(not the LM head). MFU = model FLOPs / time / peak (PaLM convention); HFU uses hardware FLOPs."
)


# ------------------------------------------------------------------------------ FLOPs
def train_step_flops(cfg: ModelConfig, lora: LoRAConfig, *, batch: int, branches: int, branch_tokens: int,
                     branch_prefix_tokens: int, live_tokens: int, remat: bool) -> dict[str, float]:
    """Per-step FLOPs under the module docstring's convention (all parts, then the totals)."""
    layers, d, v = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    attn_pair = 4.0 * cfg.num_heads * cfg.head_dim * layers  # per (query, key) pair over all layers
    dense_tok = 2.0 * block_matmul_params(cfg) * layers
    lora_tok = 2.0 * lora_params(cfg, lora.rank, lora.targets)

    rows, tb = batch * branches, branch_prefix_tokens + branch_tokens
    branch_pairs = float(rows * attention_pairs(tb, 0))  # causal within each branch row
    branch_fwd = rows * tb * dense_tok + branch_pairs * attn_pair

    live_all = batch * live_tokens
    synth_pairs = float(batch * attention_pairs(live_tokens, branches * branch_tokens))
    synth_dense = live_all * dense_tok
    synth_lm_head = live_all * 2.0 * d * v
    synth_lora = live_all * lora_tok
    synth_attn = synth_pairs * attn_pair
    synth_fwd = synth_dense + synth_lm_head + synth_lora + synth_attn
    synth_bwd = 1.0 * (synth_dense + synth_lm_head) + 2.0 * synth_lora + 2.0 * synth_attn
    recompute = (synth_dense + synth_lora + synth_attn) if remat else 0.0
    model = branch_fwd + synth_fwd + synth_bwd
    return {
        "branch_forward": branch_fwd,
        "branch_attention_forward": branch_pairs * attn_pair,
        "synth_forward": synth_fwd,
        "synth_forward_dense": synth_dense,
        "synth_forward_lm_head": synth_lm_head,
        "synth_forward_lora": synth_lora,
        "synth_forward_attention": synth_attn,
        "synth_backward": synth_bwd,
        "remat_recompute": recompute,
        "model_flops_per_step": model,
        "hardware_flops_per_step": model + recompute,
    }


# ------------------------------------------------------------------------------ peak
def peak_tflops(given: float | None, dtype: str, roofline_json: str | None = None) -> tuple[float, str]:
    """(peak TFLOP/s for MFU, where it came from): --peak-tflops, else a roofline.json's matmul peak
    (`psynth bench roofline`), else measured now with `measure_matmul_peak` in `dtype`
    (an achievable dense-matmul peak, not the datasheet's)."""
    if given is not None:
        if not given > 0:
            raise ValueError(f"--peak-tflops must be positive, got {given}")
        return float(given), "given (--peak-tflops)"
    if roofline_json:
        r = load_roofline(roofline_json)
        if r.dtype != dtype:
            warnings.warn(f"the roofline in {roofline_json} was measured in {r.dtype}, the step runs {dtype}")
        return r.peak_tflops, f"roofline.json: {roofline_json} ({r.device_kind}, {r.dtype} matmul)"
    mm = measure_matmul_peak(dtype=dtype)
    return mm["flops_per_s"] / 1e12, (f"measured: benchmarks.roofline.measure_matmul_peak, best square {dtype} "
                                      f"matmul (n={mm['n']}; achievable, not datasheet)")


# ------------------------------------------------------------------------------ batch
def check_train(cfg: ModelConfig, *, batch: int, branches: int, branch_tokens: int, branch_prefix_tokens: int,
                live_tokens: int, repeats: int) -> None:
    """Errors naming the impossible setting, before anything is allocated."""
    for name, v in (("--batch", batch), ("--branches", branches), ("--branch-tokens", branch_tokens),
                    ("--repeats", repeats)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if branch_prefix_tokens < 0:
        raise ValueError(f"--branch-prefix-tokens must be >= 0, got {branch_prefix_tokens}")
    if live_tokens < 2:
        raise ValueError(f"--live-tokens must be >= 2 (a prompt token and a target), got {live_tokens}")
    row = branch_prefix_tokens + branch_tokens
    if row > cfg.max_position_embeddings:
        raise ValueError(f"a branch row (prefix + branch = {row} tokens) exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    synth = branch_tokens + live_tokens  # the live tokens sit at positions max_i L_i + j
    if synth > cfg.max_position_embeddings:
        raise ValueError(f"branch + live tokens = {synth} positions exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


def synthetic_batch(cfg: ModelConfig, *, batch: int, branches: int, branch_tokens: int, branch_prefix_tokens: int,
                    live_tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids in the trainer's batch contract (data.pipeline.TrainBatch, no text_* arrays:
    the trainer drops them when the KL weight is 0). Every branch and live row is full length; the
    first quarter of the live tokens is the prompt, the loss covers the rest."""
    rng = np.random.RandomState(seed)
    tb = branch_prefix_tokens + branch_tokens
    prompt = max(1, live_tokens // 4)
    t = np.arange(live_tokens)[None, :]
    mask = ((t >= prompt - 1) & (t < live_tokens - 1)).astype(np.float32)
    return {
        "branch_tokens": rng.randint(1, cfg.vocab_size, size=(batch, branches, tb)).astype(np.int32),
        "branch_prefix_len": np.full((batch, branches), branch_prefix_tokens, np.int32),
        "branch_len": np.full((batch, branches), branch_tokens, np.int32),
        "synth_tokens": rng.randint(1, cfg.vocab_size, size=(batch, live_tokens)).astype(np.int32),
        "synth_len": np.full((batch,), live_tokens, np.int32),
        "loss_mask": np.repeat(mask, batch, axis=0),
        "example_valid": np.ones((batch,), bool),
    }


# ------------------------------------------------------------------------------ step
class TrainSetup:
    """The trainer's pieces, built the way `Trainer.__init__` and `Trainer.train` build them."""

    def __init__(self, cfg: ModelConfig, *, dtype: str, attn_impl: str, remat: bool, lora: LoRAConfig,
                 mapper_kind: str, lr: float, batch: dict[str, np.ndarray], seed: int, zero_copy: bool = False):
        model = random_model(cfg, dtype=dtype, lora=lora, seed=seed)
        decoder = nnx.merge(model.graphdef, model.state)
        mapper = make_mapper(mapper_kind, cfg.num_kv_heads, seed=seed)
        self.graphdefs, trainable, frozen = split_trainable(decoder, mapper)
        del model, decoder
        self.mesh, rules = make_mesh((1, 1, 1), [jax.devices()[0]]), Rules()
        self.tx = make_optimizer(lr, 1000)  # AdamW, constant lr, no clipping: the release defaults
        self.trainable, self.opt_state, self.frozen = place_train_state(
            trainable, self.tx.init(trainable), frozen, self.mesh, rules)
        self.opts = ObjectiveConfig(remat=remat, attn_impl=attn_impl, zero_copy=zero_copy)
        self.batch = jax.device_put(batch, batch_shardings(batch, self.mesh, rules))
        self.step_fn = make_train_step(self.graphdefs, self.tx, self.opts, self.mesh, rules, self.trainable,
                                       self.opt_state, self.frozen, batch)

    def step(self) -> dict[str, jax.Array]:
        """One train step (state updated in place); returns the step's metrics (not waited for)."""
        self.trainable, self.opt_state, metrics = self.step_fn(self.trainable, self.opt_state, self.frozen, self.batch)
        return metrics

    @property
    def num_trainable(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.trainable))

    @property
    def num_frozen(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.frozen))


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    """One float32 sum per leaf (device-side: no copy of a large backbone to the host)."""
    return [jnp.sum(x, dtype=jnp.float32) + jnp.sum(jnp.abs(x), dtype=jnp.float32) for x in jax.tree.leaves(tree)]


def _delta_norm(a: Any, b: Any) -> float:
    sq = sum(float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return math.sqrt(sq)


def time_train_steps(setup: TrainSetup, repeats: int) -> tuple[Timing, list[float], float, bool]:
    """(timing, losses of every step, trainable change after the first step, backbone unchanged)."""
    before_frozen = jax.device_get(_checksums(setup.frozen))
    before = jax.tree.map(jnp.copy, setup.trainable)  # the step donates the trainable tree
    losses: list[jax.Array] = []
    delta: list[float] = []

    def step() -> Any:
        metrics = setup.step()
        losses.append(metrics["loss"])
        return metrics, setup.trainable, setup.opt_state

    def wait(out: Any) -> None:
        jax.block_until_ready(out)
        if not delta:  # after the first (compiling) step: how far it moved the trainable state
            delta.append(_delta_norm(before, setup.trainable))

    t = time_calls(step, repeats, wait=wait)
    after_frozen = jax.device_get(_checksums(setup.frozen))
    unchanged = all(np.array_equal(x, y) for x, y in zip(before_frozen, after_frozen))
    return t, [float(x) for x in losses], delta[0], unchanged


def measure_train(cfg: ModelConfig, *, remat: bool, dtype: str, attn_impl: str, batch: int, branches: int,
                  branch_tokens: int, branch_prefix_tokens: int, live_tokens: int, lora_rank: int,
                  mapper_kind: str, lr: float, repeats: int, peak: float, seed: int,
                  reference_shape: bool, zero_copy: bool = False) -> dict[str, Any]:
    """Build the trainer's step with this remat setting, time it, and derive tokens/s and MFU."""
    lora = LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank)
    tokens = batch * (branches * (branch_prefix_tokens + branch_tokens) + live_tokens)
    flops = train_step_flops(cfg, lora, batch=batch, branches=branches, branch_tokens=branch_tokens,
                             branch_prefix_tokens=branch_prefix_tokens, live_tokens=live_tokens, remat=remat)
    row: dict[str, Any] = {
        "remat": remat, "remat_str": "on" if remat else "off", "dtype": dtype, "batch": batch, "branches": branches,
        "branch_tokens": branch_tokens, "branch_prefix_tokens": branch_prefix_tokens, "live_tokens": live_tokens,
        "tokens_per_step": tokens, "flops": flops, "model_flops_per_step": flops["model_flops_per_step"],
        "hardware_flops_per_step": flops["hardware_flops_per_step"], "peak_tflops": peak, "zero_copy": zero_copy,
    }
    data = synthetic_batch(cfg, batch=batch, branches=branches, branch_tokens=branch_tokens,
                           branch_prefix_tokens=branch_prefix_tokens, live_tokens=live_tokens, seed=seed)
    setup = None
    try:
        setup = TrainSetup(cfg, dtype=dtype, attn_impl=attn_impl, remat=remat, lora=lora, mapper_kind=mapper_kind,
                           lr=lr, batch=data, seed=seed, zero_copy=zero_copy)
        row["trainable_params"], row["frozen_params"] = setup.num_trainable, setup.num_frozen
        t, losses, delta, unchanged = time_train_steps(setup, repeats)
    except OutOfMemory as err:
        row["error"] = f"out of memory: {err}"
        return row
    finally:
        setup = None
        gc.collect()
    step_s = t.median_ms / 1e3
    row.update(
        step_ms=t.median_ms, step_min_ms=t.min_ms, tokens_per_s=tokens / step_s,
        model_tflops_per_s=flops["model_flops_per_step"] / step_s / 1e12,
        mfu=flops["model_flops_per_step"] / step_s / (peak * 1e12),
        hfu=flops["hardware_flops_per_step"] / step_s / (peak * 1e12),
        loss_first=losses[0], loss_last=losses[-1], losses=losses, trainable_delta_norm=delta,
        frozen_unchanged=unchanged,
        first_call_ms=round(1e3 * t.first_s, 4), times_ms=[round(1e3 * x, 4) for x in t.times_s],
    )
    row["vs_reference"] = row["tokens_per_s"] / REFERENCE["tokens_per_s"] if reference_shape else None
    return row


# ------------------------------------------------------------------------------ CLI
def _remat_settings(text: str) -> list[bool]:
    choices = {"on": [True], "off": [False], "both": [False, True]}
    if text not in choices:
        raise ValueError(f"--remat must be on, off or both, got {text!r}")
    return choices[text]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, help="examples per step")
    p.add_argument("--branches", type=int, default=3, help="branches K per example")
    p.add_argument("--branch-tokens", type=int, default=1024, help="output tokens L_b per branch (kept as cache)")
    p.add_argument("--branch-prefix-tokens", type=int, default=0,
                   help="worker prefix tokens P before each branch output (prefilled, then dropped)")
    p.add_argument("--live-tokens", type=int, default=512,
                   help="synthesizer tokens per example (first quarter prompt, rest target)")
    p.add_argument("--remat", default="off", choices=["on", "off", "both"],
                   help="rematerialise the synthesizer's layer activations in the backward pass (both: one row each)")
    p.add_argument("--lora-rank", type=int, default=16, help="synthesizer LoRA rank (alpha = 2 x rank, q/k/v/o)")
    p.add_argument("--mapper", default="affine_length", choices=["affine_length", "per_head_affine"],
                   help="cache mapper kind")
    p.add_argument("--lr", type=number(above=0), default=1e-4, help="AdamW learning rate (the release's)")
    p.add_argument("--zero-copy", action="store_true",
                   help="train through the zero-copy cache path (the synthesizer attends to the branch rows in place)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s in the compute dtype for MFU; default: from --roofline-json, else the "
                        "measured matmul peak")
    p.add_argument("--roofline-json", default=None, metavar="PATH",
                   help="reuse the matmul peak of a `psynth bench roofline` roofline.json instead of measuring it")
    add_common_arguments(p, name="train", repeats=5)


_OPTIONS = ("arch", "batch", "branches", "branch_tokens", "branch_prefix_tokens", "live_tokens", "remat", "lora_rank",
            "mapper", "lr", "peak_tflops", "roofline_json", "dtype", "attn_impl", "repeats", "seed", "out")


def run(args: argparse.Namespace) -> int:
    cfg, arch, hub = resolve_arch(args.arch)
    dtype = resolve_dtype(args.dtype)
    remats = _remat_settings(args.remat)
    shape = dict(batch=args.batch, branches=args.branches, branch_tokens=args.branch_tokens,
                 branch_prefix_tokens=args.branch_prefix_tokens, live_tokens=args.live_tokens)
    check_train(cfg, repeats=args.repeats, **shape)
    peak, peak_source = peak_tflops(args.peak_tflops, dtype, args.roofline_json)
    reference_shape = (arch == REFERENCE["arch"] and args.branches == REFERENCE["branches"]
                       and args.branch_tokens == REFERENCE["branch_tokens"]
                       and args.live_tokens == REFERENCE["live_tokens"] and args.branch_prefix_tokens == 0
                       and args.batch == 1)
    meta = base_metadata("train", cfg, arch=arch, hub=hub, dtype=dtype, attn_impl=args.attn_impl,
                         command=command_line("train", args, _OPTIONS, ("zero_copy",), arch=arch, dtype=dtype),
                         repeats=args.repeats, seed=args.seed)
    meta.update(
        shape, remat=args.remat, compute_dtype=dtype,
        lora={"rank": args.lora_rank, "alpha": 2.0 * args.lora_rank, "targets": list(LoRAConfig().targets)},
        mapper_kind=args.mapper, zero_copy=args.zero_copy, optimizer=f"AdamW lr {args.lr}, weight decay 0, no clipping (make_optimizer)",
        step_function="psynth_jax.train.step.make_train_step: the Trainer's jitted step (1-device mesh)",
        objective="cross-entropy on the target tokens only (kl_weight 0, the release's objective)",
        batch_placement="the synthetic batch is put on the device once; the trainer also transfers each step's "
                        "token ids (4 bytes per token), not timed here",
        trainable="LoRA (float32) + cache mapper; backbone frozen in `dtype`",
        branch_part="branch prefill under stop_gradient with the frozen backbone, LoRA off: forward only",
        tokens_definition=DEFINITIONS["tokens_per_step"],
        flop_convention=FLOP_CONVENTION, peak_tflops=peak, peak_source=peak_source,
        reference=REFERENCE, reference_shape=reference_shape,
        statistic="median over `repeats` chained steps after one compile step; ms",
        definitions=DEFINITIONS,
    )
    describe_run("train", arch, cfg, meta, f"batch {args.batch} x ({args.branches} x {args.branch_prefix_tokens}+"
                                           f"{args.branch_tokens} + {args.live_tokens} live); peak {peak:.2f} TFLOP/s "
                                           f"({peak_source.split(':')[0]})")
    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for remat in remats:
            say("train", f"remat {'on' if remat else 'off'}: compiling + timing {args.repeats} steps")
            rows.append(measure_train(cfg, remat=remat, dtype=dtype, attn_impl=args.attn_impl, lora_rank=args.lora_rank,
                                      mapper_kind=args.mapper, lr=args.lr, repeats=args.repeats, peak=peak,
                                      seed=args.seed, reference_shape=reference_shape, zero_copy=args.zero_copy,
                                      **shape))
    if reference_shape:
        for r in rows:
            if r.get("tokens_per_s"):
                say("train", f"remat {r['remat_str']}: {r['tokens_per_s']:.0f} tokens/s = {r['vs_reference']:.2f}x "
                             f"the PEFT reference {REFERENCE['tokens_per_s']:.0f}")
    report("train", meta, rows, TABLE_COLUMNS, args, plot_train)
    return 0


if __name__ == "__main__":  # python -m benchmarks.train_step ... = psynth bench train ...
    sys.exit(harness.main("train"))
