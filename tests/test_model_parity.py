"""Float32 logits parity with transformers' PyTorch models, for every supported family.

Each family (llama, llama with Llama-3 rope scaling, qwen2, qwen3) is tested tied and untied on a
tiny random checkpoint written by transformers itself (tests/hf_models.py), loaded through the
public `load_model`. Attention is sharpened (q/k projections x6) so that RoPE, GQA and masking
mistakes move the logits by far more than the tolerance (see `test_parity_detects_rope_mistakes`).

Two paths are compared with transformers' full forward pass:
  (a) one prefill over a batch of 2 random sequences (output="all"), every position;
  (b) a ragged prefill of the first part of each row (lengths 12 and 9), then 8 `decode_step`
      calls feeding the true next tokens; each step's logits against transformers' logits at
      that row's position, and the cache counters (end / next_pos) after each step.

Measured max abs diffs are printed (pytest -s) and summarised once at the end of the module.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from psynth_jax.inference import runtime
from psynth_jax.interop.loader import load_model, state_from_source
from psynth_jax.interop.sources import open_source
from psynth_jax.model.config import ModelConfig, RopeScaling

TOL = 1e-4
SEQ = 24  # full sequence length
PREFILL = (12, 9)  # ragged prompt lengths of the two rows in test (b)
STEPS = 8
CASES = [(fam, tie) for fam in hf_models.FAMILIES for tie in (False, True)]

# (family, tied) -> {"forward": max abs diff, "decode": max abs diff, "logit_scale": max |ref logit|}
PARITY: dict[tuple[str, bool], dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _parity_summary():
    yield
    if not PARITY:
        return
    lines = ["", "float32 parity vs transformers (max abs logit diff; tolerance %.0e):" % TOL,
             f"  {'family':<12} {'tied':<5} {'forward':>10} {'prefill+decode':>15} {'max|logit|':>11}"]
    for (fam, tie), r in sorted(PARITY.items()):
        lines.append(f"  {fam:<12} {str(tie):<5} {r.get('forward', float('nan')):>10.2e} "
                     f"{r.get('decode', float('nan')):>15.2e} {r.get('logit_scale', float('nan')):>11.3f}")
    print("\n".join(lines))


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def tiny(request, tmp_path_factory):
    fam, tie = request.param
    d = tmp_path_factory.mktemp(f"{fam}_{'tied' if tie else 'untied'}")
    torch_model = hf_models.make_tiny_sharp(fam, tie, d, seed=1)
    loaded = load_model(d, dtype="float32", with_tokenizer=False)
    assert loaded.cfg.tie_word_embeddings == tie
    rng = np.random.default_rng(CASES.index((fam, tie)))
    tokens = rng.integers(0, loaded.cfg.vocab_size, (2, SEQ)).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(tokens)).logits.float().numpy()
    return fam, tie, loaded, d, tokens, ref


def test_forward_parity(tiny):
    fam, tie, m, _, tokens, ref = tiny
    logits, cache = runtime.prefill(
        m.graphdef, m.state, jnp.asarray(tokens, jnp.int32), jnp.full((2,), SEQ, jnp.int32),
        num_slots=32, output="all",
    )
    logits = np.asarray(logits)
    assert logits.shape == ref.shape == (2, SEQ, m.cfg.vocab_size)
    assert logits.dtype == np.float32
    diff = float(np.abs(logits - ref).max())
    PARITY.setdefault((fam, tie), {}).update(forward=diff, logit_scale=float(np.abs(ref).max()))
    print(f"\n[parity] {fam} tied={tie} forward: max abs diff {diff:.3e} (max |logit| {np.abs(ref).max():.3f})")
    assert diff <= TOL
    np.testing.assert_array_equal(np.asarray(cache.end), [SEQ, SEQ])
    np.testing.assert_array_equal(np.asarray(cache.next_pos), [SEQ, SEQ])


def test_prefill_then_decode_parity(tiny):
    fam, tie, m, _, tokens, ref = tiny
    lengths = np.asarray(PREFILL, np.int32)
    width = max(PREFILL)
    prompt = tokens[:, :width].copy()
    prompt[1, lengths[1]:] = 0  # padding: must not matter
    last, cache = runtime.prefill(
        m.graphdef, m.state, jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths),
        num_slots=width + STEPS + 4, output="last",
    )
    rows = np.arange(2)
    diffs = [float(np.abs(np.asarray(last) - ref[rows, lengths - 1]).max())]
    np.testing.assert_array_equal(np.asarray(cache.end), lengths)
    np.testing.assert_array_equal(np.asarray(cache.next_pos), lengths)
    for i in range(STEPS):
        pos = lengths + i  # position of the token fed at this step, per row
        step_tokens = jnp.asarray(tokens[rows, pos], jnp.int32)
        logits, cache = runtime.decode_step(m.graphdef, m.state, step_tokens, cache)
        diffs.append(float(np.abs(np.asarray(logits) - ref[rows, pos]).max()))
        np.testing.assert_array_equal(np.asarray(cache.end), pos + 1)
        np.testing.assert_array_equal(np.asarray(cache.next_pos), pos + 1)
    valid = np.asarray(cache.valid)
    for b in rows:  # exactly the prompt + decoded slots are valid
        assert valid[b].sum() == lengths[b] + STEPS and valid[b, : lengths[b] + STEPS].all()
    diff = max(diffs)
    PARITY.setdefault((fam, tie), {})["decode"] = diff
    print(f"\n[parity] {fam} tied={tie} prefill+{STEPS} decode steps: max abs diff {diff:.3e} "
          f"(per step: {', '.join(f'{d:.1e}' for d in diffs)})")
    assert diff <= TOL


def test_parity_detects_rope_mistakes(tmp_path):
    """The comparison is sensitive: the same weights with a wrong RoPE miss by >> TOL."""
    torch_model = hf_models.make_tiny_sharp("llama3_rope", False, tmp_path, seed=1)
    tokens = np.random.default_rng(0).integers(0, 211, (2, SEQ)).astype(np.int64)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(tokens)).logits.numpy()
    src = open_source(tmp_path)
    cfg = ModelConfig.from_hf(src.config_dict())
    assert cfg.rope_scaling.rope_type == "llama3"
    diffs = {}
    for name, c in [("as loaded", cfg), ("no llama3 scaling", dataclasses.replace(cfg, rope_scaling=RopeScaling())),
                    ("wrong theta", dataclasses.replace(cfg, rope_theta=10000.0))]:
        g, s = state_from_source(c, src, jnp.float32, None)
        logits, _ = runtime.prefill(g, s, jnp.asarray(tokens, jnp.int32), jnp.full((2,), SEQ, jnp.int32),
                                    num_slots=SEQ, output="all")
        diffs[name] = float(np.abs(np.asarray(logits) - ref).max())
    print(f"\n[parity] sensitivity (llama3_rope): {diffs}")
    assert diffs["as loaded"] <= TOL
    assert diffs["no llama3 scaling"] > 10 * TOL
    assert diffs["wrong theta"] > 10 * TOL
