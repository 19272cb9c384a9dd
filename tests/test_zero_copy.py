"""The zero-copy cache path equals the materialised one (its reference): logits and greedy tokens
for every family, ragged branches and prompts, B > 1, both handoff conventions; training
gradients (LoRA and mapper) too; and it never copies or writes the worker rows it reads."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.config import ModelConfig, RopeScaling
from psynth_jax.model.kv_cache import BranchView
from psynth_jax.model.loaded import random_model
from psynth_jax.model.transformer import LoRAConfig, LoRAParam
from psynth_jax.synthesis import core
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import make_mapper
from psynth_jax.train.objective import ObjectiveConfig, merge_trainable, split_trainable, synthesis_loss
from train_fixtures import TINY, synthetic_batch

_COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
               head_dim=8, max_position_embeddings=512)
FAMILIES = {
    "llama": ModelConfig(family="llama", rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), **_COMMON),
    "qwen2": ModelConfig(family="qwen2", attention_bias=True, rope_theta=1e6, **_COMMON),
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, **{**_COMMON, "head_dim": 16}),
}
PREFIX = [[3, 5, 2], [4, 2, 6]]  # worker prompt lengths P, [B=2][K=3]
OUTPUT = [[7, 2, 5], [3, 9, 4]]  # output tokens L
STOPPED = [[True, False, True], [False, True, True]]  # matters to the release convention only
PROMPT = [5, 3]  # synthesizer prompt lengths
GREEDY_STEPS = 6


def _perturbed(tree, scale, seed):
    """Every leaf plus noise: LoRA B and the mapper's last layer start at zero (an identity)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _model(cfg: ModelConfig, dtype: str = "float32"):
    """(graphdef, state) of a random model whose LoRA is not an identity."""
    m = random_model(cfg, dtype=dtype, lora=LoRAConfig(rank=4, alpha=8.0), seed=1)
    gdef, lora, rest = nnx.split(nnx.merge(m.graphdef, m.state), LoRAParam, ...)
    return nnx.split(nnx.merge(gdef, _perturbed(lora, 0.2, 2), rest))


def _mapper(kind: str, hkv: int):
    mdef, mstate = nnx.split(make_mapper(kind, hkv, seed=3))
    return mdef, _perturbed(mstate, 0.5, 4)


def _requests(cfg: ModelConfig, seed: int = 0, width: int | None = None):
    rng = np.random.RandomState(seed)
    rows = [rng.randint(1, cfg.vocab_size, size=p + o).tolist() for ps, os in zip(PREFIX, OUTPUT) for p, o in zip(ps, os)]
    width = width or max(map(len, rows)) + 5  # worker slack slots hold junk the view must not read
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        tokens[i, len(r):] = rng.randint(1, cfg.vocab_size, size=width - len(r))
    prompt = np.zeros((len(PROMPT), max(PROMPT)), np.int32)
    for i, n in enumerate(PROMPT):
        prompt[i, :n] = rng.randint(1, cfg.vocab_size, size=n)
    return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows]), jnp.asarray(prompt), jnp.asarray(PROMPT)


def _span(handoff: Handoff):
    prefix = np.asarray(PREFIX, np.int32).reshape(-1)
    start, kept = handoff.kept_span(prefix, np.asarray(OUTPUT, np.int32).reshape(-1), np.asarray(STOPPED).reshape(-1))
    return jnp.asarray(start), jnp.asarray(kept), jnp.asarray(prefix)


def both_paths(cfg, gdef, state, mdef, mstate, handoff, **worker):
    """(prompt logits [B, T, V], greedy tokens [B, N]) of the materialised and the zero-copy path."""
    rows, row_len, prompt, plen = _requests(cfg)
    start, kept, prefix = _span(handoff)
    extra = prompt.shape[1] + GREEDY_STEPS + 2
    b = len(PREFIX)
    greedy = dict(max_new_tokens=GREEDY_STEPS, sampling=SamplingConfig(), lora=True)

    def finish(logits, cache, view=None):
        last = jnp.take_along_axis(logits, (plen - 1)[:, None, None], axis=1)[:, 0]
        g = runtime.continue_generation(gdef, state, last, cache, jax.random.key(0), view=view, **greedy)
        return np.asarray(logits), np.asarray(g.tokens)

    if "cache" in worker:  # branches from a worker decode cache: extract (copy) vs view (in place)
        branches = core.jit_hand_over(worker["cache"], start, kept, prefix, num_requests=b, branch_slots=16)
        view = core.jit_hand_over(worker["cache"], start, kept, prefix, num_requests=b, branch_slots=16,
                                  zero_copy=True)
    else:  # branches rebuilt from tokens
        branches = core.jit_branch_kv(gdef, state, rows, row_len, start, kept, prefix, num_requests=b,
                                      branch_slots=16)
        view = core.jit_branch_kv(gdef, state, rows, row_len, start, kept, prefix, num_requests=b, branch_slots=16,
                                  zero_copy=True)
    cache, no_view = core.jit_prepare(branches, mdef, mstate, cfg=cfg, extra_slots=extra)
    assert no_view is None
    ref = finish(*core.jit_cache_prefill(gdef, state, prompt, plen, cache, output="all"))
    live, view = core.jit_prepare(view, mdef, mstate, cfg=cfg, extra_slots=extra)
    got = finish(*core.jit_cache_prefill(gdef, state, prompt, plen, live, output="all", view=view), view)
    return ref, got


def _valid(logits):
    return logits[np.arange(logits.shape[1])[None, :] < np.asarray(PROMPT)[:, None]]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("convention", ["output_tokens", "release"])
def test_zero_copy_equals_materialised(family, convention):
    cfg = FAMILIES[family]
    gdef, state = _model(cfg)
    mdef, mstate = _mapper("per_head_affine" if family == "qwen2" else "affine_length", cfg.num_kv_heads)
    (ref_logits, ref_tokens), (logits, tokens) = both_paths(cfg, gdef, state, mdef, mstate, Handoff(convention))
    assert np.abs(_valid(ref_logits)).max() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(_valid(logits), _valid(ref_logits), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_zero_copy_over_a_worker_decode_cache():
    """Workers decode, then the synthesizer reads their cache rows in place (pipeline.run_workers)."""
    cfg = FAMILIES["qwen3"]
    gdef, state = _model(cfg)
    mdef, mstate = _mapper("affine_length", cfg.num_kv_heads)
    prefix = np.asarray(PREFIX).reshape(-1)
    rng = np.random.RandomState(5)
    toks = np.zeros((prefix.size, prefix.max()), np.int32)
    for i, p in enumerate(prefix):
        toks[i, :p] = rng.randint(1, cfg.vocab_size, size=p)
    g = runtime.generate(gdef, state, jnp.asarray(toks), jnp.asarray(prefix), jax.random.key(1), max_new_tokens=10,
                         num_slots=24, sampling=SamplingConfig(temperature=1.0))
    (ref_logits, ref_tokens), (logits, tokens) = both_paths(cfg, gdef, state, mdef, mstate, Handoff(),
                                                            cache=g.cache)
    np.testing.assert_allclose(_valid(logits), _valid(ref_logits), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(tokens, ref_tokens)


def test_zero_copy_bfloat16_as_accurate_as_materialised():
    """In bfloat16 both paths round differently (the materialised one rounds mapped keys); each
    stays as close to the float32 result as the other."""
    cfg = FAMILIES["llama"]
    gdef, state = _model(cfg)
    mdef, mstate = _mapper("affine_length", cfg.num_kv_heads)
    (exact, _), _ = both_paths(cfg, gdef, state, mdef, mstate, Handoff())
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
    gdef16, _ = _model(cfg, "bfloat16")
    (ref, _), (got, _) = both_paths(cfg, gdef16, state16, mdef, mstate, Handoff())
    ref_err = np.abs(_valid(ref) - _valid(exact)).max()
    got_err = np.abs(_valid(got) - _valid(exact)).max()
    assert 0 < ref_err < 0.5 and got_err <= 2 * ref_err, (got_err, ref_err)


def test_training_gradients_equal(mapper_kind="per_head_affine"):
    """The train objective through the zero-copy path: same loss, same LoRA and mapper gradients
    (the per-head mapper: its scalars differ per KV head, the release's are one per branch)."""
    lm = random_model(TINY, lora=LoRAConfig(rank=4, alpha=8.0), seed=0)
    gdef, lora, rest = nnx.split(nnx.merge(lm.graphdef, lm.state), LoRAParam, ...)
    decoder = nnx.merge(gdef, _perturbed(lora, 0.2, 2), rest)
    mdef, mstate = _mapper(mapper_kind, TINY.num_kv_heads)
    graphdefs, trainable, frozen = split_trainable(decoder, nnx.merge(mdef, mstate))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(b=2))

    def grads(zero_copy):
        opts = ObjectiveConfig(remat=True, zero_copy=zero_copy)

        def loss(trainable):
            model, mapper = merge_trainable(graphdefs, trainable, frozen)
            return synthesis_loss(model, mapper, batch, opts)[0]

        return jax.jit(jax.value_and_grad(loss))(trainable)

    (ref_loss, ref), (loss, got) = grads(False), grads(True)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        assert float(jnp.abs(r).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-6, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def _ops_of_shape(hlo: str, shapes: tuple[str, ...]) -> list[str]:
    plumbing = ("parameter(", "get-tuple-element(", "tuple(", "bitcast(", "while(", "conditional(")
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(ROOT )?%\S+ = (\w+\[[\d,]*\])", line)
        if m and m.group(2) in shapes and not any(p in line for p in plumbing):
            found.append(line.strip()[:160])
    return found


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_zero_copy_reads_worker_rows_in_place(step):
    """Preparation hands the worker buffers through untouched, and the synthesizer's prefill /
    decode steps make no array of the worker cache's size (no copy of the rows, of a layer of
    them, or of a branch's span rewritten)."""
    cfg = FAMILIES["qwen3"]
    gdef, state = _model(cfg)
    mdef, mstate = _mapper("affine_length", cfg.num_kv_heads)
    rows, row_len, prompt, plen = _requests(cfg, width=600)  # longer than one key tile (flash.BLOCK_K)
    start, kept, prefix = _span(Handoff())
    view = core.jit_branch_kv(gdef, state, rows, row_len, start, kept, prefix, num_requests=2, branch_slots=16,
                              zero_copy=True)
    rows_n, s_w = view.k.shape[1], view.k.shape[2]
    tail = f"{s_w},{cfg.num_kv_heads},{cfg.head_dim}]"
    shapes = (f"f32[{cfg.num_layers},{rows_n},{tail}", f"f32[{rows_n},{tail}", f"f32[2,3,{tail}",
              f"f32[1,{rows_n},{tail}", f"f32[1,2,3,{tail}")
    live, prepared = core.jit_prepare(view, mdef, mstate, cfg=cfg, extra_slots=16)
    assert prepared.k is view.k and prepared.v is view.v  # the very worker buffers
    view = prepared
    if step == "prefill":
        hlo = runtime.extend.lower(gdef, state, prompt, plen, live, lora=True, view=view).compile().as_text()
    else:
        hlo = runtime.continue_generation.lower(gdef, state, jnp.zeros((2, cfg.vocab_size)), live, jax.random.key(0),
                                                max_new_tokens=3, lora=True, view=view).compile().as_text()
    assert not _ops_of_shape(hlo, shapes)


@pytest.mark.parametrize("convention", ["output_tokens", "release"])
def test_pipeline_zero_copy_equals_materialised(tmp_path, convention):
    """ParallelSynthesis(zero_copy=True): the cache path from live workers and from stored tokens
    gives the materialised path's first logits and answers, both handoff conventions; the same
    worker rows serve a second synthesis unchanged."""
    from psynth_jax.interop.loader import load_model
    from psynth_jax.synthesis import prompts
    from psynth_jax.synthesis.pipeline import ParallelSynthesis
    from tiny_smol import make_tiny_smol

    model = load_model(make_tiny_smol(tmp_path), lora=LoRAConfig(rank=4, alpha=8.0))
    questions = ["What is 12 times 11?", "Tom has 3 apples and buys 4 more. How many apples?"]
    convs = [[prompts.worker_messages(q)] * 2 for q in questions]
    kw = dict(handoff=Handoff(convention))
    mapper = nnx.merge(*_mapper("per_head_affine", model.cfg.num_kv_heads))
    ref_synth = ParallelSynthesis(model, mapper, **kw)
    synth = ParallelSynthesis(model, mapper, zero_copy=True, **kw)
    workers = dict(max_new_tokens=12, sampling=SamplingConfig(1.0, 0.9), seed=3)
    ref_w, w = ref_synth.run_workers(convs, **workers), synth.run_workers(convs, **workers)
    assert w.tokens == ref_w.tokens and isinstance(w.branches, BranchView)
    ref = ref_synth.cache_path(questions, ref_w.branches, max_new_tokens=8)
    got = synth.cache_path(questions, w.branches, max_new_tokens=8)
    np.testing.assert_allclose(got.first_logits, ref.first_logits, atol=2e-5, rtol=1e-4)
    assert got.tokens == ref.tokens
    again = synth.cache_path(questions, w.branches, max_new_tokens=8)  # the worker rows serve again
    assert again.tokens == got.tokens and np.array_equal(again.first_logits, got.first_logits)
    prefixes = [[synth.gen.chat_tokens(c) for c in row] for row in convs]
    stored = synth.branches_from_tokens(prefixes, w.tokens, w.stopped)
    rebuilt = synth.cache_path(questions, stored, max_new_tokens=8)
    np.testing.assert_allclose(rebuilt.first_logits, ref.first_logits, atol=2e-5, rtol=1e-4)
    assert rebuilt.tokens == ref.tokens
    with pytest.raises(ValueError, match="attn_impl='xla' only"):
        ParallelSynthesis(model, zero_copy=True, attn_impl="xla_split")
