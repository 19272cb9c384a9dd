"""Generation behaviour on a tiny random Llama checkpoint (written by transformers, loaded with its
own word-level tokenizer): padding invariance, stop tokens, sampling, cache contents, bfloat16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from psynth_jax.inference import runtime
from psynth_jax.inference.generator import Generator
from psynth_jax.inference.sampling import SamplingConfig, nucleus, sample
from psynth_jax.interop.loader import load_model

SHORT, LONG = 7, 19
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    hf_models.make_tiny_sharp("llama", False, d, seed=3)
    hf_models.save_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(6, 211, SHORT).tolist(), rng.integers(6, 211, LONG).tolist()]


def _batch(seqs, width):
    tokens = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs], jnp.int32)


def _generate(m, seqs, width, *, sampling=SamplingConfig(), seed=0, stop_ids=(), new=NEW):
    tokens, lengths = _batch(seqs, width)
    return runtime.generate(m.graphdef, m.state, tokens, lengths, jax.random.key(seed), max_new_tokens=new,
                            sampling=sampling, stop_ids=stop_ids, num_slots=width + new)


def _rows(gen):
    toks, nums = jax.device_get((gen.tokens, gen.num_tokens))
    return [toks[i, : nums[i]].tolist() for i in range(len(nums))]


def test_prefill_padding_invariance(model, prompts):
    short, long = prompts
    alone, _ = runtime.prefill(model.graphdef, model.state, *_batch([short], SHORT), num_slots=SHORT, output="all")
    both, _ = runtime.prefill(model.graphdef, model.state, *_batch([short, long], 32), num_slots=32, output="all")
    alone, both = np.asarray(alone), np.asarray(both)
    diff = float(np.abs(alone[0] - both[0, :SHORT]).max())
    print(f"\n[generation] prefill logits alone vs padded beside a longer prompt: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # the batch-mate really is different (the comparison is not between identical rows)
    assert np.abs(both[1, :SHORT] - both[0, :SHORT]).max() > 1e-2


def test_greedy_continuation_padding_invariance(model, prompts):
    short, long = prompts
    alone = _generate(model, [short], SHORT)
    both = _generate(model, [long, short], 32)  # the short prompt in row 1, padded to 32
    assert _rows(alone)[0] == _rows(both)[1]
    assert _rows(both)[0] != _rows(both)[1]
    # the caches hold the same keys/values for the short prompt + its continuation
    n = SHORT + NEW
    k_alone, k_both = np.asarray(alone.cache.k)[:, 0, :n], np.asarray(both.cache.k)[:, 1, :n]
    v_alone, v_both = np.asarray(alone.cache.v)[:, 0, :n], np.asarray(both.cache.v)[:, 1, :n]
    diff = max(float(np.abs(k_alone - k_both).max()), float(np.abs(v_alone - v_both).max()))
    print(f"\n[generation] cache after greedy generate alone vs batched: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_stop_tokens(model, prompts):
    free = _rows(_generate(model, prompts, 32))  # no stop ids: runs to NEW tokens
    assert [len(r) for r in free] == [NEW, NEW]
    # stop on a token row 0 first emits at index k >= 2
    k = next(j for j in range(2, NEW) if free[0][j] not in free[0][:j])
    stop = free[0][k]
    gen = _generate(model, prompts, 32, stop_ids=(stop,))
    toks, nums, stopped, end = jax.device_get((gen.tokens, gen.num_tokens, gen.stopped, gen.cache.end))
    for i, row in enumerate(free):
        expect = row[: row.index(stop) + 1] if stop in row else row
        assert toks[i, : nums[i]].tolist() == expect
        assert nums[i] == len(expect)
        assert bool(stopped[i]) == (stop in row)
        assert not toks[i, nums[i]:].any()  # zeros after the end
        assert end[i] == len(prompts[i]) + nums[i]  # cache: prompt + generated (stop token included)
    assert nums[0] == k + 1 and stopped[0]


def test_cache_after_generate_holds_prompt_and_output(model, prompts):
    gen = _generate(model, prompts, 32)
    nums, end, next_pos, valid = jax.device_get((gen.num_tokens, gen.cache.end, gen.cache.next_pos, gen.cache.valid))
    for i, p in enumerate(prompts):
        assert end[i] == next_pos[i] == len(p) + nums[i]
        assert valid[i].sum() == len(p) + nums[i]
    # continuing from that cache reproduces the logits of one prefill over prompt + output
    row = 0
    full = prompts[row] + _rows(gen)[row]
    ref, _ = runtime.prefill(model.graphdef, model.state, *_batch([full], len(full)), num_slots=len(full),
                             output="all")
    # logits for the last generated token, computed from the generate cache
    one = jax.tree.map(lambda x: x[:, row: row + 1] if x.ndim == 5 else x[row: row + 1], gen.cache)
    one = dataclasses.replace(one, end=one.end - 1, next_pos=one.next_pos - 1,
                              valid=one.valid.at[0, len(full) - 1].set(False))
    logits, _ = runtime.decode_step(model.graphdef, model.state, jnp.asarray([full[-1]], jnp.int32), one)
    assert float(np.abs(np.asarray(logits)[0] - np.asarray(ref)[0, -1]).max()) <= 1e-5


def test_temperature_sampling_seeded(model, prompts):
    hot = SamplingConfig(temperature=1.0)
    a = _rows(_generate(model, prompts, 32, sampling=hot, seed=1))
    b = _rows(_generate(model, prompts, 32, sampling=hot, seed=1))
    c = _rows(_generate(model, prompts, 32, sampling=hot, seed=2))
    greedy = _rows(_generate(model, prompts, 32))
    assert a == b
    assert a != c
    assert a != greedy


def test_tiny_top_p_is_greedy(model, prompts):
    greedy = _rows(_generate(model, prompts, 32))
    for seed in (0, 1, 2):
        nucleus = _rows(_generate(model, prompts, 32, sampling=SamplingConfig(temperature=1.0, top_p=1e-6), seed=seed))
        assert nucleus == greedy


def test_sampling_distribution():
    """Empirical frequencies vs numpy softmax, with and without nucleus filtering."""
    n = 40000
    base = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04], np.float32))
    logits = jnp.broadcast_to(jnp.asarray(base), (n, 5))
    for cfg, expect in [
        (SamplingConfig(temperature=1.0), [0.5, 0.3, 0.1, 0.06, 0.04]),
        (SamplingConfig(temperature=2.0), np.sqrt([0.5, 0.3, 0.1, 0.06, 0.04]) / np.sqrt([0.5, 0.3, 0.1, 0.06, 0.04]).sum()),
        (SamplingConfig(temperature=1.0, top_p=0.75), [0.625, 0.375, 0, 0, 0]),  # smallest prefix reaching 0.75
        (SamplingConfig(temperature=1.0, top_p=0.85), [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0]),
    ]:
        draws = np.asarray(sample(logits, jax.random.key(0), cfg))
        freq = np.bincount(draws, minlength=5) / n
        np.testing.assert_allclose(freq, expect, atol=0.01, err_msg=str(cfg))


def _nucleus_by_sorting(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The textbook definition: sort descending, keep the shortest prefix whose mass reaches top_p,
    and every token tied with its last one."""
    srt = np.sort(logits, axis=-1)[:, ::-1].astype(np.float64)
    probs = np.exp(srt - srt[:, :1])
    cum = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    idx = np.minimum((cum < top_p).sum(-1, keepdims=True), srt.shape[1] - 1)
    return logits >= np.take_along_axis(srt, idx, axis=-1).astype(np.float32)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.75, 0.9, 0.95, 0.999])
def test_nucleus_equals_the_sorting_definition(top_p):
    """The bisection over float bit patterns keeps exactly the sorted-prefix set, ties and
    negative/positive/zero logits included, on a real vocabulary size."""
    rs = np.random.RandomState(int(top_p * 1000))
    logits = (rs.randn(6, 49152) * rs.choice([0.5, 3.0, 12.0], size=(6, 1))).astype(np.float32)
    logits[0, :200] = np.round(logits[0, :200])  # heavy ties (incl. -0.0 and 0.0)
    logits[1] = -np.abs(logits[1])  # all negative
    got = np.asarray(jax.jit(nucleus, static_argnums=1)(jnp.asarray(logits), top_p))
    want = _nucleus_by_sorting(logits, top_p)
    assert got.any(axis=-1).all()
    rows, cols = np.nonzero(got != want)
    assert len(rows) <= 2  # float32 sums vs the float64 reference may only disagree at the very edge:
    for r, c in zip(rows, cols):  # the mass above that token's logit is top_p up to rounding
        p = np.exp(logits[r].astype(np.float64) - logits[r].max())
        p /= p.sum()
        above = p[logits[r] > logits[r, c]].sum()
        assert abs(above - top_p) < 1e-5 or abs(above + p[logits[r] == logits[r, c]].sum() - top_p) < 1e-5


def test_generator_complete_with_tokenizer(model):
    gen = Generator(model)
    assert set(gen.stop_ids) == {0, 2}  # <|endoftext|>, <|im_end|> (eos)
    msgs = [[{"role": "user", "content": "w7 w8 w9"}], [{"role": "user", "content": "w30 w31 w32 w33 w34 w35"}]]
    outs = gen.complete(msgs, max_new_tokens=NEW)
    prompts = [gen.chat_tokens(m) for m in msgs]
    assert prompts[0] == [1, 4, 7, 8, 9, 2, 1, 5]  # template + word-level ids
    ref = _rows(_generate(model, prompts, 64, stop_ids=gen.stop_ids))
    for out, r in zip(outs, ref):
        assert out.tokens == r
        assert out.stopped == (r[-1] in gen.stop_ids)
        body = r[:-1] if out.stopped else r
        assert out.text == model.tokenizer.decode(body)


def test_bfloat16_close_to_float32(ckpt, model, prompts):
    bf = load_model(ckpt, dtype="bfloat16", with_tokenizer=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf.state))
    tokens, lengths = _batch(prompts, 32)
    ref, _ = runtime.prefill(model.graphdef, model.state, tokens, lengths, num_slots=32, output="all")
    got, cache = runtime.prefill(bf.graphdef, bf.state, tokens, lengths, num_slots=32, output="all")
    assert got.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
    ref, got = np.asarray(ref), np.asarray(got)
    diffs, scale = [], float(np.abs(ref).max())
    for i, p in enumerate(prompts):
        diffs.append(float(np.abs(ref[i, : len(p)] - got[i, : len(p)]).max()))
    bound = 0.03 * scale  # bfloat16 has an 8-bit mantissa (~0.4% per rounding); 3% of the logit range
    print(f"\n[generation] bfloat16 vs float32 logits: max abs diff {max(diffs):.2e} "
          f"(bound {bound:.2e} = 3% of max |logit| {scale:.2f})")
    assert max(diffs) <= bound
    gen = _generate(bf, prompts, 32)
    toks = np.asarray(gen.tokens)
    assert toks.shape == (2, NEW) and (toks >= 0).all() and (toks < bf.cfg.vocab_size).all()
