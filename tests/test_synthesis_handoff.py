"""The cache handoff loses nothing: cache-path logits equal a from-scratch masked forward.

Reference: ONE forward over [prefix_1 out_1 | prefix_2 out_2 | ... | prompt] with an explicit
block mask (each branch sees only its own worker prompt and earlier own tokens; the prompt sees
every *kept* branch token and itself causally) at the re-encoded positions (prefix_i at
[-P_i, 0), out_i at [0, L_i), prompt at max_i G_i + t, G_i = kept tokens). RoPE depends only on
relative positions inside each block, so this is exactly what the workers computed, re-encoded.
Kept tokens: the outputs ("output_tokens"), or the release's window ("release": the last prompt
token, then every output of a stopped branch / all but the last of a capped one).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from psynth_jax.inference import runtime
from psynth_jax.model.loaded import random_model
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.model.rope import apply_rope, inverse_frequencies, shift_keys
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import core
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.branches import check_branches, extract_branches
from psynth_jax.synthesis.mapper import make_mapper
from flax import nnx

CFG = ModelConfig(
    family="qwen3", vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=16, qk_norm=True, rope_theta=10000.0, max_position_embeddings=512,
)
RNG = np.random.RandomState(0)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, lora=LoRAConfig(rank=4, alpha=8.0), seed=1)


def make_request(prefix_lens, out_lens, prompt_len, rng=RNG):
    pre = [rng.randint(1, CFG.vocab_size, size=p).tolist() for p in prefix_lens]
    out = [rng.randint(1, CFG.vocab_size, size=n).tolist() for n in out_lens]
    prompt = rng.randint(1, CFG.vocab_size, size=prompt_len).tolist()
    return pre, out, prompt


def branch_caches(m, requests, branch_slots=None, handoff=Handoff(), stopped=None):
    """Prefill [prefix | output] per branch (LoRA off) and keep the span the convention hands over."""
    rows = [p + o for pre, out, _ in requests for p, o in zip(pre, out)]
    prefix = np.asarray([len(p) for pre, _, _ in requests for p in pre], np.int32)
    out_len = np.asarray([len(o) for _, out, _ in requests for o in out], np.int32)
    stopped = np.ones_like(out_len, bool) if stopped is None else np.asarray(stopped, bool).reshape(-1)
    start, kept = handoff.kept_span(prefix, out_len, stopped)
    width = max(len(r) for r in rows) + 3
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return core.jit_branch_kv(m.graphdef, m.state, jnp.asarray(tokens), jnp.asarray([len(r) for r in rows]),
                              jnp.asarray(start), jnp.asarray(kept), jnp.asarray(prefix), num_requests=len(requests),
                              branch_slots=branch_slots or int(kept.max()) + 2)


def cache_path_logits(m, requests, mapper=None, lora=True, branch_slots=None, handoff=Handoff(), stopped=None):
    """All prompt-token logits [B, T, V] of the cache path (prompts right-padded), through the core."""
    mapper = mapper or make_mapper("affine_length", CFG.num_kv_heads)
    br = branch_caches(m, requests, branch_slots, handoff, stopped)
    mdef, mstate = nnx.split(mapper)
    width = max(len(r[2]) for r in requests)
    cache, _ = core.jit_prepare(br, mdef, mstate, cfg=CFG, extra_slots=width + 4)
    toks = np.zeros((len(requests), width), np.int32)
    for i, (_, _, p) in enumerate(requests):
        toks[i, : len(p)] = p
    logits, _ = core.jit_cache_prefill(m.graphdef, m.state, jnp.asarray(toks),
                                       jnp.asarray([len(r[2]) for r in requests]), cache, lora=lora, output="all")
    return np.asarray(logits)


def reference_logits(m, request, convention="output_tokens", stopped=None):
    """One masked forward from scratch over [prefix_i out_i]_i + prompt (see module docstring)."""
    pre, out, prompt = request
    stopped = [True] * len(out) if stopped is None else stopped
    toks, pos, block, kept = [], [], [], []
    starts = []
    for i, (p, o) in enumerate(zip(pre, out)):
        toks += p + o
        pos += list(range(-len(p), len(o)))
        block += [i] * (len(p) + len(o))
        if convention == "output_tokens":
            keep = [False] * len(p) + [True] * len(o)
        else:  # the release: last prompt token + outputs (all but the last one of a capped branch)
            n = len(o) if stopped[i] else len(o) - 1
            keep = [False] * (len(p) - 1) + [True] + [True] * n + [False] * (len(o) - n)
        kept += keep
        starts.append(sum(keep))
    start = max(starts)
    n_branch = len(toks)
    toks += prompt
    pos += list(range(start, start + len(prompt)))
    block += [-1] * len(prompt)
    kept += [False] * len(prompt)
    n = len(toks)
    block, kept = np.asarray(block), np.asarray(kept)
    idx = np.arange(n)
    causal = idx[None, :] <= idx[:, None]
    same_block = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    prompt_q = block[:, None] < 0
    vis = causal & (same_block | (prompt_q & (kept[None, :] | (block[None, :] < 0))))
    decoder = nnx.merge(m.graphdef, m.state)
    logits, _ = decoder(jnp.asarray([toks]), KVCache.zeros(CFG, 1, n, jnp.float32), None, jnp.asarray([pos]),
                        lora=True, visibility=jnp.asarray(vis)[None])
    return np.asarray(logits)[0, n_branch:]


def test_cache_path_equals_masked_reference_forward(model):
    requests = [make_request([5, 9, 3], [7, 4, 11], 6), make_request([12, 2, 6], [3, 10, 5], 9)]
    got = cache_path_logits(model, requests)
    worst = 0.0
    for b, req in enumerate(requests):
        ref = reference_logits(model, req)
        diff = np.abs(got[b, : len(req[2])] - ref).max()
        worst = max(worst, float(diff))
    print(f"cache path vs masked reference forward: max abs diff {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("stopped", [[True, True, True], [False, True, False]])
def test_release_convention_equals_its_masked_reference_forward(model, stopped):
    """Under the release's window: the last prompt token's KV joins each branch, a capped branch's
    last output is not handed over, and the prompt starts at max_i G_i; the cache path computes
    exactly that layout, and it differs from the output-tokens layout."""
    requests = [make_request([5, 9, 3], [7, 4, 11], 6), make_request([12, 2, 6], [3, 10, 5], 9)]
    flags = [stopped, stopped[::-1]]
    release = Handoff(convention="release")
    got = cache_path_logits(model, requests, handoff=release, stopped=flags)
    ours = cache_path_logits(model, requests)
    worst = max(float(np.abs(got[b, : len(r[2])] - reference_logits(model, r, "release", flags[b])).max())
                for b, r in enumerate(requests))
    print(f"release convention vs its masked reference forward: max abs diff {worst:.2e}")
    assert worst <= 1e-4
    assert np.abs(got - ours).max() > 1e-3  # the two conventions are different layouts


def test_reference_is_sensitive_to_the_handoff(model):
    """Guard against a vacuous pass: dropping one branch changes the prompt logits clearly."""
    req = make_request([5, 9, 3], [7, 4, 11], 6)
    full = cache_path_logits(model, [req])[0, :6]
    fewer = cache_path_logits(model, [(req[0][:2], req[1][:2], req[2])])[0, :6]
    assert np.abs(full - fewer).max() > 1e-3


@pytest.mark.parametrize("offset", [5, 37, 100])
def test_rope_shift_is_exact_on_prefilled_keys(model, offset):
    toks = jnp.asarray(RNG.randint(1, CFG.vocab_size, size=(1, 12)))
    cache0 = KVCache.zeros(CFG, 1, 12, jnp.float32)
    _, at0 = runtime.forward(model.graphdef, model.state, toks, cache0, None, jnp.arange(12)[None])
    _, atp = runtime.forward(model.graphdef, model.state, toks, cache0, None, offset + jnp.arange(12)[None])
    shifted = shift_keys(atp.k, jnp.full(atp.k.shape[:2], -offset), jnp.asarray(inverse_frequencies(CFG)))
    diff = float(jnp.abs(shifted - at0.k).max())
    print(f"RoPE shift by -{offset}: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert float(jnp.abs(atp.v - at0.v).max()) <= 1e-5  # values do not depend on position


def test_rope_rotation_algebra():
    cfg = ModelConfig(family="llama", vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=32, rope_theta=500000.0)
    inv = jnp.asarray(inverse_frequencies(cfg))
    x = jnp.asarray(RNG.randn(3, 10, 2, 32), jnp.float32)
    p = jnp.asarray(RNG.randint(0, 60, size=(3, 10)))
    composed = apply_rope(apply_rope(x, p, inv), -p + 7, inv)
    direct = apply_rope(x, jnp.full_like(p, 7), inv)
    assert float(jnp.abs(composed - direct).max()) <= 1e-5
    # a rotation: norms of each pair are preserved
    assert np.allclose(np.linalg.norm(apply_rope(x, p, inv), axis=-1), np.linalg.norm(x, axis=-1), atol=1e-5)


def test_branch_order_invariance(model):
    req = make_request([4, 8, 6], [9, 3, 6], 7)
    perm = [2, 0, 1]
    swapped = ([req[0][i] for i in perm], [req[1][i] for i in perm], req[2])
    a = cache_path_logits(model, [req])
    b = cache_path_logits(model, [swapped])
    assert np.abs(a - b).max() <= 1e-5


def test_padding_invariance(model):
    r1 = make_request([4, 8], [9, 3], 7)
    r2 = make_request([11, 2], [14, 12], 10)
    alone = cache_path_logits(model, [r1])[0, :7]
    wide = cache_path_logits(model, [r1], branch_slots=40)[0, :7]  # more branch padding
    batched = cache_path_logits(model, [r1, r2])[0, :7]  # beside a longer request
    assert np.abs(alone - wide).max() <= 1e-5
    assert np.abs(alone - batched).max() <= 1e-5


def test_bad_inputs(model):
    req = make_request([4, 8], [9, 3], 7)
    br = branch_caches(model, [req])
    with pytest.raises(ValueError, match="over the budget"):
        check_branches(br, CFG, max_branch_tokens=5)
    empty = branch_caches(model, [req])
    empty.lengths = empty.lengths.at[0, 1].set(0)
    with pytest.raises(ValueError, match="branch 1 of request 0 is empty"):
        check_branches(empty, CFG)
    other = ModelConfig(**{**CFG.__dict__, "num_layers": 2})
    with pytest.raises(ValueError, match="different model shape"):
        check_branches(br, other)
    zero_k = extract_branches(KVCache.zeros(CFG, 0, 4, jnp.float32), jnp.zeros((0,), jnp.int32),
                              jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), num_requests=1, branch_slots=2)
    with pytest.raises(ValueError, match="K = 0"):
        check_branches(zero_k, CFG)
