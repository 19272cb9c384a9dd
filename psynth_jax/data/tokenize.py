"""One example -> the token sequences of the training layout, plus guards and bucket choice.

Sequences (all with the backbone's chat template, as the inference path builds them):
- branch i: [worker prompt | output]. The worker prompt is the chat template of
  prompts.worker_messages(prefix or question, family) with the assistant turn opened (a
  prefix-less branch gets exactly the prompt `psynth` workers decode from); the output is the
  branch text without special tokens and without an end-of-turn token (inference hands over
  the KV of the generated tokens only, never the stop token's). P_i = prompt length (KV
  dropped), L_i = output length (KV kept).
- synthesizer: chat template of prompts.cache_synth_messages(question, K, family) with the
  assistant turn opened, then the target tokens and one end-of-turn token.
- text path: the same with prompts.text_synth_messages(question, branch outputs, family): the
  same target tokens, for a KL teacher.
Guards (METHOD.md section 5): K within [data.min_branches, data.max_branches], no empty branch,
cache = sum L_i, live = synthesizer length, total = cache + live, each sequence within a bucket;
and (ours, `data.max_branch_slots`) the padded branch slots K x Tb, which bound the training
step's memory where the others do not: they leave worker prompts free and pad every branch to
the widest one's bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from psynth_jax.config.schema import DataConfig
from psynth_jax.data.examples import SynthesisExample
from psynth_jax.synthesis import prompts

# End-of-turn markers, most specific first; the tokenizer's eos is the fallback.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
SKIP_REASONS = ("num_branches", "empty_branch", "cache", "live", "total", "no_bucket", "slots")


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn in this tokenizer's chat format."""
    vocab = tokenizer.get_vocab()
    for marker in _END_OF_TURN:
        if marker in vocab:
            return int(vocab[marker])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-turn marker and no eos token")
    return int(tokenizer.eos_token_id)


def chat_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Chat template with the assistant turn opened (tokenized as Generator.chat_tokens does:
    encode(text, add_special_tokens=False))."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """Unpadded token sequences of one example (int32 arrays)."""

    branch_tokens: tuple[np.ndarray, ...]  # per branch: prompt then output tokens
    branch_prefix_len: np.ndarray  # [K]
    branch_len: np.ndarray  # [K]
    synth_tokens: np.ndarray  # prompt, target, end-of-turn
    synth_prompt_len: int
    text_tokens: np.ndarray
    text_prompt_len: int
    target_len: int  # target tokens + the end-of-turn token

    @property
    def num_branches(self) -> int:
        return len(self.branch_tokens)

    @property
    def cache_tokens(self) -> int:
        return int(self.branch_len.sum())

    @property
    def live_tokens(self) -> int:
        return len(self.synth_tokens)

    @property
    def total_tokens(self) -> int:
        return self.cache_tokens + self.live_tokens

    @property
    def branch_width(self) -> int:
        return max(len(t) for t in self.branch_tokens)


class ExampleTokenizer:
    """Turns SynthesisExamples into TokenizedExamples with one tokenizer.

    The chat templates are rendered in Python; the strings of many examples are then encoded
    in one batched call (the Rust tokenizer encodes a batch in parallel).
    """

    def __init__(self, tokenizer: Any, chunk: int = 256):
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn_id(tokenizer)
        self.chunk = chunk

    def _strings(self, ex: SynthesisExample) -> list[str]:
        """[K worker prompts, K outputs, target, synthesizer prompt, text-path prompt]."""
        tok, outputs = self.tokenizer, [b.output for b in ex.branches]
        return [
            *(chat_text(tok, prompts.worker_messages(b.prefix or ex.question, ex.family, b.role_hint or None))
              for b in ex.branches),
            *outputs,
            ex.target,
            chat_text(tok, prompts.cache_synth_messages(ex.question, ex.num_branches, ex.family)),
            chat_text(tok, prompts.text_synth_messages(ex.question, outputs, ex.family)),
        ]

    def _assemble(self, k: int, ids: Sequence[list[int]]) -> TokenizedExample:
        prefixes, outputs = ids[:k], ids[k : 2 * k]
        target, synth_prompt, text_prompt = [*ids[2 * k], self.end_of_turn], ids[2 * k + 1], ids[2 * k + 2]
        return TokenizedExample(
            branch_tokens=tuple(np.asarray(p + o, np.int32) for p, o in zip(prefixes, outputs)),
            branch_prefix_len=np.asarray([len(p) for p in prefixes], np.int32),
            branch_len=np.asarray([len(o) for o in outputs], np.int32),
            synth_tokens=np.asarray(synth_prompt + target, np.int32),
            synth_prompt_len=len(synth_prompt),
            text_tokens=np.asarray(text_prompt + target, np.int32),
            text_prompt_len=len(text_prompt),
            target_len=len(target),
        )

    def __call__(self, examples: Sequence[SynthesisExample]) -> list[TokenizedExample]:
        out = []
        for start in range(0, len(examples), self.chunk):
            chunk = examples[start : start + self.chunk]
            strings = [self._strings(ex) for ex in chunk]
            flat = [s for group in strings for s in group]
            ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
            offset = 0
            for ex, group in zip(chunk, strings):
                out.append(self._assemble(ex.num_branches, ids[offset : offset + len(group)]))
                offset += len(group)
        return out


def smallest_bucket(need: int, buckets: Sequence[int]) -> int | None:
    fits = [b for b in buckets if b >= need]
    return min(fits) if fits else None


def bucket_key(tex: TokenizedExample, buckets: Sequence[int]) -> tuple[int, int, int, int] | None:
    """(K, Tb, Ts, Tt): the example's branch count, then the smallest bucket holding the widest
    branch, the synthesizer sequence and the text-path sequence; None when one fits no bucket.
    Examples of one key share one static batch shape [B, K, Tb] / [B, Ts] / [B, Tt]."""
    key = tuple(smallest_bucket(n, buckets) for n in (tex.branch_width, tex.live_tokens, len(tex.text_tokens)))
    return None if None in key else (tex.num_branches, *key)  # type: ignore[return-value]


def skip_reason(tex: TokenizedExample, cfg: DataConfig) -> str | None:
    """Why an example must be skipped (one of SKIP_REASONS), or None to keep it."""
    if not cfg.min_branches <= tex.num_branches <= cfg.max_branches:
        return "num_branches"
    if (tex.branch_len < 1).any():
        return "empty_branch"
    if tex.cache_tokens > cfg.max_cache_tokens:
        return "cache"
    if tex.live_tokens > cfg.max_live_tokens:
        return "live"
    if tex.total_tokens > cfg.max_total_tokens:
        return "total"
    key = bucket_key(tex, cfg.buckets)
    if key is None:
        return "no_bucket"
    if cfg.max_branch_slots is not None and key[0] * key[1] > cfg.max_branch_slots:
        return "slots"
    return None
