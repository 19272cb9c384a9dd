"""`Handoff`: which worker KV is handed to the synthesizer, and when a worker stops (METHOD.md section 1).

Two slicing conventions, one setting (`handoff.convention`) used alike by workers, branch caches
rebuilt from stored tokens, training, eval and the benchmarks; every `Handoff` a config, a flag
or recorded weights describe is built by `Handoff.from_config`. A branch whose worker prompt has
P tokens produced L output tokens, then (if `stopped`) a stop token:

- "output_tokens" (the paper's description, our default): keep the KV of the L output tokens,
  slots [P, P + L); the mapper's length input is L; the synthesizer prompt starts at max_i L_i.
- "release" (what the reference release's inference code computes, and what its trained weights
  expect): HF `generate` never computes the KV of the last sampled token, and the release keeps
  the last G cache positions, G = generated tokens including the stop token (G = L + stopped).
  So the kept KV is slots [P - 1, P + G - 1): the last prompt token, then the first G - 1
  generated tokens (for a stopped branch: every output token). Length input G; the prompt
  starts at max_i G_i. (The release's batched generation keeps its batch's largest G for every
  row, padding KV included; with its batch of 1 that is this same window.)

In both, keys are re-encoded by -P, so output token j sits at position j (the release's extra
prompt token at -1). `stop_tokens` picks the tokens that end a worker: "chat" = eos plus the
chat end-of-turn markers in the vocabulary, "eos_only" = `tokenizer.eos_token_id` only (the
release's workers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from psynth_jax.inference.generator import stop_token_ids

Convention = Literal["output_tokens", "release"]
StopTokens = Literal["chat", "eos_only"]
CONVENTIONS: tuple[str, ...] = ("output_tokens", "release")
STOP_TOKENS: tuple[str, ...] = ("chat", "eos_only")


@dataclasses.dataclass(frozen=True)
class Handoff:
    """The slicing convention and the worker stop tokens; hashable (a static jit argument)."""

    convention: Convention = "output_tokens"
    stop_tokens: StopTokens = "chat"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown handoff convention {self.convention!r}; choose one of {CONVENTIONS}")
        if self.stop_tokens not in STOP_TOKENS:
            raise ValueError(f"unknown worker stop tokens {self.stop_tokens!r}; choose one of {STOP_TOKENS}")

    def kept_span(self, prefix_len: Any, output_len: Any, stopped: Any) -> tuple[Any, Any]:
        """(first kept slot, kept length) per branch, from its prompt length P, its output length
        L (stop token excluded) and whether it ended on a stop token. numpy or jax arrays of any
        equal shape (arithmetic only, so it also runs on traced values inside a jit).

        The RoPE shift of every branch is -P whatever the convention.
        """
        if self.convention == "output_tokens":
            return prefix_len, output_len
        if isinstance(prefix_len, np.ndarray) and (prefix_len < 1).any():
            raise ValueError("the release convention keeps the last prompt token: every worker prompt needs >= 1 token")
        return prefix_len - 1, output_len + (stopped * 1).astype(output_len.dtype)

    def stop_ids(self, tokenizer: Any, eos_ids: tuple[int, ...] = ()) -> tuple[int, ...]:
        """Token ids that end a worker's output under this setting."""
        if self.stop_tokens == "eos_only":
            if tokenizer.eos_token_id is None:
                raise ValueError("stop_tokens='eos_only' but the tokenizer has no eos token")
            return (int(tokenizer.eos_token_id),)
        return stop_token_ids(tokenizer, eos_ids)

    @classmethod
    def from_config(cls, section: Any | None = None, *, convention: str | None = None, stop_tokens: str | None = None,
                    base: "Handoff | None" = None) -> "Handoff":
        """The handoff a configuration describes: a config's `handoff:` section (any object with
        `.convention` and `.stop_tokens`; None: no section, `base`), then explicit choices (a flag;
        None: not chosen), each winning over what comes before it. `base` defaults to Handoff()."""
        if section is not None:
            base = cls(section.convention, section.stop_tokens)
        base = base if base is not None else cls()
        return cls(convention=convention or base.convention, stop_tokens=stop_tokens or base.stop_tokens)

    def as_dict(self) -> dict[str, str]:
        """What runs, adapters and exports record."""
        return {"convention": self.convention, "stop_tokens": self.stop_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Handoff":
        """Inverse of as_dict; None or {} is the default."""
        d = dict(d or {})
        unknown = set(d) - {"convention", "stop_tokens"}
        if unknown:
            raise ValueError(f"unknown handoff fields {sorted(unknown)}")
        return cls(**d)
