"""A tiny random Llama with SmolLM2's vocabulary and tokenizer: real chat template, fast model."""

from __future__ import annotations

from pathlib import Path


def make_tiny_smol(directory: Path, *, layers: int = 2, seed: int = 0) -> Path:
    import torch
    import transformers

    from psynth_jax.interop.embedded import default_gguf_path
    from psynth_jax.interop.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper attention than the 0.02 init, so layouts matter to the logits
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6.0)
    model.save_pretrained(directory)
    load_tokenizer(default_gguf_path()).save_pretrained(directory)
    return directory
