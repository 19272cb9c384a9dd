"""Tiny random models of every family with SmolLM2's vocabulary and tokenizer: real chat template,
fast model."""

from __future__ import annotations

import functools
import json
from pathlib import Path


def make_tiny_smol(directory: Path, *, layers: int = 2, seed: int = 0, family: str = "llama") -> Path:
    """A tiny random `family` (llama | qwen2 | qwen3) checkpoint + SmolLM2's tokenizer in `directory`.

    The Llama one ties its embeddings (as SmolLM2 does); Qwen2 has q/k/v biases, Qwen3 q/k norms
    and a free head_dim. Attention is sharpened (q/k x 6) so cache layouts change the logits.
    """
    import torch
    import transformers

    from psynth_jax.interop.embedded import default_gguf_path
    from psynth_jax.interop.tokenizer import load_tokenizer

    common = dict(vocab_size=49152, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=2, bos_token_id=1)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common, hidden_size=32, tie_word_embeddings=True),
        "qwen2": lambda: transformers.Qwen2Config(**common, hidden_size=64, tie_word_embeddings=False),
        "qwen3": lambda: transformers.Qwen3Config(**common, hidden_size=64, head_dim=32, tie_word_embeddings=False),
    }[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(6.0)
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    load_tokenizer(default_gguf_path()).save_pretrained(directory)
    return directory


def random_tiny_smol(lora=None, seed: int = 0):
    """The same idea without torch or files: a `LoadedModel` with SmolLM2's tokenizer (vocabulary,
    chat template, stop token) around a 2-layer random decoder (LoRA attached when given). A new
    model each call (a Trainer donates its LoRA buffers); the tokenizer is read once."""
    import dataclasses

    from psynth_jax.model.config import ModelConfig
    from psynth_jax.model.loaded import random_model

    tokenizer = _smol_tokenizer()
    cfg = ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                      eos_token_ids=(tokenizer.eos_token_id,))
    return dataclasses.replace(random_model(cfg, lora=lora, seed=seed), tokenizer=tokenizer)


@functools.cache
def _smol_tokenizer():
    from psynth_jax.interop.embedded import default_gguf_path
    from psynth_jax.interop.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf_path())


# A Qwen3-shaped model that compiles in seconds for a TPU mesh: head_dim 128 (the TPU lane width,
# which splash's Mosaic kernels tile by), 4 query / 2 KV heads, qk-norm. Planning and lowering
# read only its config.json; no weights.
TINY_QWEN3_TPU = {"model_type": "qwen3", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
                  "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "eos_token_id": 2,
                  "tie_word_embeddings": False}


def tiny_qwen3_tpu_config(directory: Path) -> Path:
    """`directory` with TINY_QWEN3_TPU's config.json: a model source for `psynth plan` and lowering."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_QWEN3_TPU))
    return directory
