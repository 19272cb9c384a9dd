"""A tiny model and synthetic batches in the trainer's batch contract (psynth_jax.data TrainBatch)."""

from __future__ import annotations

import numpy as np

from psynth_jax.model.config import ModelConfig

TINY = ModelConfig(
    family="qwen3", vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=512,
)


def synthetic_batch(b=4, k=3, tb=16, ts=16, tt=40, vocab=101, seed=0) -> dict[str, np.ndarray]:
    """Random tokens laid out exactly like a real TrainBatch (prefix|output branches, prompt|target)."""
    rng = np.random.RandomState(seed)
    prefix = rng.randint(2, 6, size=(b, k)).astype(np.int32)
    out = rng.randint(3, tb - 6, size=(b, k)).astype(np.int32)
    branch = np.zeros((b, k, tb), np.int32)
    for i in range(b):
        for j in range(k):
            n = prefix[i, j] + out[i, j]
            branch[i, j, :n] = rng.randint(1, vocab, size=n)
    synth_len = rng.randint(ts - 6, ts + 1, size=b).astype(np.int32)
    prompt_len = rng.randint(3, 6, size=b)
    synth = np.zeros((b, ts), np.int32)
    mask = np.zeros((b, ts), np.float32)
    text = np.zeros((b, tt), np.int32)
    text_len = np.zeros(b, np.int32)
    text_mask = np.zeros((b, tt), np.float32)
    for i in range(b):
        synth[i, : synth_len[i]] = rng.randint(1, vocab, size=synth_len[i])
        mask[i, prompt_len[i] - 1 : synth_len[i] - 1] = 1.0
        n_target = synth_len[i] - prompt_len[i]
        text_prompt = rng.randint(8, tt - n_target)
        text_len[i] = text_prompt + n_target
        text[i, :text_prompt] = rng.randint(1, vocab, size=text_prompt)
        text[i, text_prompt : text_len[i]] = synth[i, prompt_len[i] : synth_len[i]]
        text_mask[i, text_prompt - 1 : text_len[i] - 1] = 1.0
    return {
        "branch_tokens": branch, "branch_prefix_len": prefix, "branch_len": out,
        "synth_tokens": synth, "synth_len": synth_len, "loss_mask": mask,
        "text_tokens": text, "text_len": text_len, "text_loss_mask": text_mask,
        "example_valid": np.ones(b, bool),
    }
