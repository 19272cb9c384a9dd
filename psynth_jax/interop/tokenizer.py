"""Tokenizer loading for every checkpoint kind: transformers directory, hub id, or GGUF file.

Uses transformers' tokenizer classes only (no torch needed). The GGUF route reads the file's
tokenizer metadata with the `gguf` package (transformers' own GGUF reader imports torch) and
builds the fast tokenizer and chat template with transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """`source`: a .gguf file, a local checkpoint directory, or a hub id."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return gguf_tokenizer(path)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the tokenizer "
                                "of the model into it (e.g. tokenizer.save_pretrained)")
    return AutoTokenizer.from_pretrained(str(source))


# any one of these makes a folder loadable by AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer (with chat template and special tokens) from a GGUF file, without torch."""
    # GGUF files only: a box that reads none may lack the package (the GPU check's does)
    import gguf
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.a"))}
    groups = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokens = groups["tokenizer"]["tokens"]
    config = groups["tokenizer_config"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], groups["tokenizer"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
