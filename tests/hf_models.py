"""Tiny random transformers checkpoints of every supported family, saved to local directories."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama": lambda tie: transformers.LlamaConfig(**COMMON, tie_word_embeddings=tie, rope_theta=10000.0),
    "llama3_rope": lambda tie: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=tie, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "qwen2": lambda tie: transformers.Qwen2Config(**COMMON, tie_word_embeddings=tie, rope_theta=1000000.0),
    "qwen3": lambda tie: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=tie, rope_theta=1000000.0),
    "qwen3_bias": lambda tie: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=tie,
                                                       attention_bias=True),  # q/k/v AND o biases
}
MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "llama3_rope": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "qwen3_bias": transformers.Qwen3ForCausalLM,
}


def make_tiny(family: str, tie: bool, directory: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Save a randomly initialised tiny model of `family` to `directory`; return the torch model."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](FAMILIES[family](tie)).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so their loading is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def sharpen_attention(model: transformers.PreTrainedModel, gain: float) -> None:
    """Scale q/k projections by `gain` so attention is far from uniform (RoPE and masking then
    change the logits measurably; with the default 0.02 init every row attends almost evenly)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(gain)


def make_tiny_sharp(family: str, tie: bool, directory: Path, seed: int = 0, gain: float = 6.0
                    ) -> transformers.PreTrainedModel:
    """`make_tiny` with attention sharpened by `gain` (see `sharpen_attention`), saved again."""
    model = make_tiny(family, tie, directory, seed)
    sharpen_attention(model, gain)
    model.save_pretrained(directory, safe_serialization=True)
    return model


TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def save_tiny_tokenizer(directory: Path, vocab_size: int = COMMON["vocab_size"], eos_token: str | None = None) -> None:
    """A word-level tokenizer over `vocab_size` ids (specials and role words 0..5, then words
    "w6".."wN") with a ChatML-like template, saved next to a tiny checkpoint so `load_model(dir)` finds it.
    eos_token: the token string that is eos (default "<|im_end|>")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(TINY_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(TINY_SPECIALS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token or "<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(directory)
