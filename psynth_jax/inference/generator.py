"""Host-side generation API: chat templating, stop tokens, length checks, shape bucketing, batching, placement.

Prompts are right-padded to a bucket length (a multiple of `BUCKET`) so that the jitted
`runtime.generate` compiles once per bucket rather than once per prompt length. On a mesh
(the model's, or one passed in) request arrays are split over the mesh's batch axes and the
jitted calls run with the mesh in context, so the KV cache follows the model's sharding rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from psynth_jax import distributed
from psynth_jax.inference import runtime
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.model.sharding import batch_sharding

BUCKET = 64
CHAT_STOP_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")


def bucket(n: int, multiple: int = BUCKET) -> int:
    """Round n up to a multiple of `multiple` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def stop_token_ids(tokenizer: Any, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Token ids that end a chat turn: eos plus the common end-of-turn markers present in the vocab."""
    ids = set(extra)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in CHAT_STOP_MARKERS:
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return tuple(sorted(ids))


def check_length(cfg_max: int, prompt_len: int, new_tokens: int, what: str = "prompt") -> None:
    if prompt_len == 0:
        raise ValueError(f"{what} is empty")
    if prompt_len + new_tokens > cfg_max:
        raise ValueError(
            f"{what} of {prompt_len} tokens + {new_tokens} new tokens = {prompt_len + new_tokens} exceeds "
            f"the model's maximum length of {cfg_max} positions"
        )


def pad_batch(seqs: Sequence[Sequence[int]], width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to [B, width]; return (tokens, lengths)."""
    out = np.full((len(seqs), width), pad_id, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, np.asarray([len(s) for s in seqs], np.int32)


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    text: str
    stopped: bool


class Generator:
    """Batched text generation on a loaded backbone (LoRA on or off per call)."""

    def __init__(self, model: LoadedModel, attn_impl: str = "xla", mesh: Mesh | None = None):
        if model.tokenizer is None:
            raise ValueError("Generator needs a model loaded with its tokenizer")
        self.model = model
        self.mesh = mesh if mesh is not None else model.mesh
        self.tokenizer = model.tokenizer
        self.attn_impl = attn_impl
        self.stop_ids = stop_token_ids(self.tokenizer, model.cfg.eos_token_ids)

    def mesh_context(self) -> contextlib.AbstractContextManager:
        """`jax.set_mesh(mesh)` on a multi-device mesh (jitted calls lay out caches by it), else nothing."""
        if self.mesh is None or math.prod(self.mesh.shape.values()) == 1:
            return contextlib.nullcontext()
        return jax.set_mesh(self.mesh)

    def put_batch(self, x: np.ndarray) -> jax.Array:
        """A host array whose leading axis is requests (or branch rows), split over the batch axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        return distributed.place(x, batch_sharding(np.shape(x), self.mesh, self.model.rules))

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the checkpoint's chat template with the assistant turn opened."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        lora: bool = False,
        stop_ids: tuple[int, ...] | None = None,
    ) -> runtime.Generation:
        """Run runtime.generate on a bucketed batch; returns device arrays (cache included).

        stop_ids: the tokens that end a row (default: the chat stop tokens of `self.stop_ids`).
        """
        if not prompts:
            raise ValueError("no prompts given")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        for i, p in enumerate(prompts):
            check_length(self.model.cfg.max_position_embeddings, len(p), max_new_tokens, f"prompt {i}")
        width = bucket(longest)
        tokens, lengths = pad_batch(prompts, width)
        with self.mesh_context():
            return runtime.generate(
                self.model.graphdef, self.model.state, self.put_batch(tokens), self.put_batch(lengths),
                jax.random.key(seed), max_new_tokens=max_new_tokens, sampling=sampling,
                stop_ids=self.stop_ids if stop_ids is None else tuple(stop_ids),
                num_slots=bucket(width + max_new_tokens), lora=lora, attn_impl=self.attn_impl,
            )

    def complete(
        self,
        conversations: Sequence[list[dict[str, str]]],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        lora: bool = False,
    ) -> list[Completion]:
        """Chat conversations -> decoded completions (stop token stripped from the text)."""
        prompts = [self.chat_tokens(m) for m in conversations]
        gen = self.generate_tokens(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, lora=lora)
        toks, nums, stopped = distributed.fetch((gen.tokens, gen.num_tokens, gen.stopped))
        out = []
        for row, n, s in zip(toks, nums, stopped):
            ids = [int(t) for t in row[: int(n)]]
            body = ids[:-1] if s else ids
            out.append(Completion(tokens=ids, text=self.tokenizer.decode(body), stopped=bool(s)))
        return out
