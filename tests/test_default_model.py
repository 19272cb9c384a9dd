"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers.

transformers loads the same GGUF file (`from_pretrained(dir, gguf_file=name)`), dequantizing it to
the same float32 weights, so greedy decoding must agree token for token. The three prompts are
generated in ONE batched JAX call (ragged lengths, right padding) and each row is compared with
transformers run on that prompt alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.inference.generator import Generator
from psynth_jax.interop.embedded import default_gguf_path
from psynth_jax.interop.loader import load_model

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/test.jsonl"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def jax_model():
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def torch_model():
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def questions():
    if not GSM8K.parent.is_dir():
        pytest.skip(f"GSM8K data folder {GSM8K.parent} is absent (shared data not checked out)")
    with GSM8K.open() as f:
        return [json.loads(next(f))["question"] for _ in range(3)]


def _chat_ids(tokenizer, question: str) -> list[int]:
    """The prompt ids exactly as transformers' chat template produces them."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(t) for t in ids]


def test_config_matches_transformers(jax_model, torch_model):
    cfg, hf = jax_model.cfg, torch_model.config
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 9, 3)
    assert cfg.tie_word_embeddings is True
    assert nnx.to_pure_dict(jax_model.state).get("lm_head") is None  # tied: no separate head weight
    assert (cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (576, 64, 49152)
    assert cfg.num_layers == hf.num_hidden_layers
    assert cfg.num_heads == hf.num_attention_heads
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.intermediate_size == hf.intermediate_size
    assert cfg.tie_word_embeddings == bool(hf.tie_word_embeddings)
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"] if getattr(hf, "rope_parameters", None)
                                           else hf.rope_theta)
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.max_position_embeddings == hf.max_position_embeddings


def test_greedy_matches_transformers_batched(jax_model, torch_model, questions):
    gen = Generator(jax_model)
    prompts = [gen.chat_tokens([{"role": "user", "content": q}]) for q in questions]
    for q, p in zip(questions, prompts):  # our templating == transformers' chat template
        assert p == _chat_ids(jax_model.tokenizer, q)
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == 3, lengths  # ragged: the batch really is padded

    out = gen.generate_tokens(prompts, max_new_tokens=NEW_TOKENS)  # one batched call
    toks, nums, stopped = jax.device_get((out.tokens, out.num_tokens, out.stopped))
    end = np.asarray(out.cache.end)

    stops = set(gen.stop_ids)
    assert torch_model.generation_config.eos_token_id in stops
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = torch_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=sorted(stops),
                pad_token_id=torch_model.generation_config.pad_token_id,
            )[0, len(prompt):].tolist()
        # torch ends at the first stop token (kept); pad tokens can only follow it
        cut = next((j + 1 for j, t in enumerate(ref) if t in stops), len(ref))
        ref = ref[:cut]
        mine = toks[i, : nums[i]].tolist()
        print(f"\n[default model] prompt {i} ({len(prompt)} tokens): {len(mine)} new tokens, "
              f"stopped={bool(stopped[i])}, equal to transformers: {mine == ref}")
        assert mine == ref, f"prompt {i}: JAX {mine} != transformers {ref}"
        assert bool(stopped[i]) == (ref[-1] in stops)
        assert not toks[i, nums[i]:].any()
        assert end[i] == len(prompt) + nums[i]


def test_first_token_logits_close_to_transformers(jax_model, torch_model, questions):
    """Real-weights float32 logits at the last prompt position (30 layers: a looser bound)."""
    gen = Generator(jax_model)
    prompts = [gen.chat_tokens([{"role": "user", "content": q}]) for q in questions]
    width = max(len(p) for p in prompts)
    tokens = np.zeros((3, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    logits, _ = runtime.prefill(jax_model.graphdef, jax_model.state, jnp.asarray(tokens),
                                jnp.asarray([len(p) for p in prompts], jnp.int32), num_slots=width, output="last")
    logits = np.asarray(logits)
    diffs = []
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = torch_model(torch.tensor([p])).logits[0, -1].numpy()
        diffs.append(float(np.abs(logits[i] - ref).max()))
        assert logits[i].argmax() == ref.argmax()
    scale = float(np.abs(logits).max())
    print(f"\n[default model] SmolLM2 last-position logits, max abs diff vs transformers: "
          f"{', '.join(f'{d:.2e}' for d in diffs)} (max |logit| {scale:.1f})")
    assert max(diffs) <= 5e-4


def test_cli_generate_end_to_end(jax_model):
    question = "What is 2+3?"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "psynth_jax.cli.main", "generate", question, "--max-new-tokens", "16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.strip()
    print(f"\n[default model] psynth generate {question!r} -> {text!r}")
    assert text
    # the same greedy completion as the in-process API
    (expected,) = Generator(jax_model).complete([[{"role": "user", "content": question}]], max_new_tokens=16)
    assert proc.stdout.rstrip("\n") == expected.text
