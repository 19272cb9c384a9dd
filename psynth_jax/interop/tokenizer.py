"""Tokenizer loading for every checkpoint kind: transformers directory, hub id, or GGUF file.

Uses transformers' tokenizer classes only (no torch needed). The GGUF route rebuilds the fast
tokenizer and chat template from the file's metadata.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """`source`: a .gguf file, a local checkpoint directory, or a hub id."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(source))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Token ids that end a chat turn: eos plus the common end-of-turn markers present in the vocab."""
    ids = set(extra)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return tuple(sorted(ids))
