"""Batched Parallel-Synthesis: worker stage, cache path, text-concatenation path, single agent.

All three synthesis paths take B requests at once (B x K branches for the worker stage) and share
the jitted runtime. TTFT is measured the same way for every path: from the start of the path's
first device work to the first sampled token being ready, compilation excluded (each timed
closure runs once to compile first). Worker generation is excluded, as in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.inference.generator import Generator, bucket, check_length, pad_batch
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.inference.timing import time_calls
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.synthesis import prompts
from psynth_jax.synthesis.convention import Handoff
from psynth_jax.synthesis.handoff import BranchCaches, check_branches, extract_branches, prepare_synth_cache
from psynth_jax.synthesis.mapper import Mapper, make_mapper

Messages = list[dict[str, str]]


@dataclasses.dataclass
class WorkerOutputs:
    """K branches per request: their output KV (device) and their text."""

    branches: BranchCaches
    tokens: list[list[list[int]]]  # [B][K] output tokens, stop token stripped
    texts: list[list[str]]


@dataclasses.dataclass
class PathResult:
    """One synthesis path's answers for B requests, with its TTFT (seconds, median of repeats)."""

    name: str
    texts: list[str]
    tokens: list[list[int]]
    ttft_s: float
    breakdown: dict[str, float]  # parts of the TTFT (prepare / prefill), seconds
    prompt_tokens: list[int]  # live tokens prefilled per request


def median_time(fn: Callable[[], jax.Array], repeats: int) -> float:
    """Median seconds of `repeats` calls after a compile call (`timing.time_calls`); repeats = 0
    skips timing altogether (returns nan), for callers that only want the outputs."""
    if repeats <= 0:
        return float("nan")
    return time_calls(fn, repeats).median_s


class ParallelSynthesis:
    """The synthesizer around one backbone: workers (LoRA off) and the three synthesis paths."""

    def __init__(
        self,
        model: LoadedModel,
        mapper: Mapper | None = None,
        *,
        family: str = "math",
        attn_impl: str = "xla",
        max_branch_tokens: int | None = None,
        timing_repeats: int = 3,
        handoff: Handoff = Handoff(),
    ):
        self.model = model
        self.handoff = handoff
        self.gen = Generator(model, attn_impl=attn_impl)
        self.tok = model.tokenizer
        self.cfg = model.cfg
        self.family = family
        prompts.task_prompts(family)  # fail early on an unknown family
        self.attn_impl = attn_impl
        self.max_branch_tokens = max_branch_tokens
        self.timing_repeats = timing_repeats
        self.set_mapper(mapper if mapper is not None else make_mapper("affine_length", self.cfg.num_kv_heads))

    def set_mapper(self, mapper: Mapper) -> None:
        heads = getattr(mapper, "num_kv_heads", self.cfg.num_kv_heads)
        if heads != self.cfg.num_kv_heads:
            raise ValueError(
                f"mapper was built for {heads} KV heads but the model has {self.cfg.num_kv_heads}"
            )
        self.mapper = mapper
        self.mapper_def, self.mapper_state = nnx.split(mapper)

    # ----------------------------------------------------------------- workers
    def run_workers(
        self,
        conversations: Sequence[Sequence[Messages]],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.95),
        seed: int = 0,
    ) -> WorkerOutputs:
        """Decode B x K worker conversations in one batched generate (LoRA off); keep output KV."""
        b = len(conversations)
        k = len(conversations[0]) if b else 0
        if b == 0 or k == 0:
            raise ValueError(f"need at least one request and one branch, got B={b}, K={k}")
        if any(len(c) != k for c in conversations):
            raise ValueError("every request needs the same number of branches K")
        flat = [self.gen.chat_tokens(m) for conv in conversations for m in conv]
        g = self.gen.generate_tokens(flat, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        nums, stopped, toks = jax.device_get((g.num_tokens, g.stopped, g.tokens))
        out_len = (nums - stopped).astype(np.int32)  # the stop token's KV is not handed over
        starts = np.asarray([len(p) for p in flat], np.int32)
        branches = extract_branches(
            g.cache, jnp.asarray(starts), jnp.asarray(out_len), num_requests=b, branch_slots=bucket(max_new_tokens)
        )
        tokens = [[toks[i * k + j, : out_len[i * k + j]].tolist() for j in range(k)] for i in range(b)]
        texts = [[self.tok.decode(t) for t in row] for row in tokens]
        return WorkerOutputs(branches=branches, tokens=tokens, texts=texts)

    def branches_from_tokens(
        self, prefixes: Sequence[Sequence[Sequence[int]]], outputs: Sequence[Sequence[Sequence[int]]]
    ) -> BranchCaches:
        """Branch caches from stored text: prefill [prefix | output] (LoRA off), keep the output KV."""
        b, k = len(outputs), len(outputs[0]) if outputs else 0
        if b == 0 or k == 0:
            raise ValueError(f"need at least one request and one branch, got B={b}, K={k}")
        rows = [list(p) + list(o) for pr, orow in zip(prefixes, outputs) for p, o in zip(pr, orow)]
        starts = np.asarray([len(p) for pr in prefixes for p in pr], np.int32)
        lengths = np.asarray([len(o) for orow in outputs for o in orow], np.int32)
        if (lengths == 0).any():
            i = int(np.argmax(lengths == 0))
            raise ValueError(f"branch {i % k} of request {i // k} is empty (0 output tokens)")
        width = bucket(max(len(r) for r in rows))
        check_length(self.cfg.max_position_embeddings, width, 0, "branch prefix + output")
        tokens, lens = pad_batch(rows, width)
        _, cache = runtime.prefill(
            self.model.graphdef, self.model.state, jnp.asarray(tokens), jnp.asarray(lens), num_slots=width,
            attn_impl=self.attn_impl,
        )
        return extract_branches(
            cache, jnp.asarray(starts), jnp.asarray(lengths), num_requests=b, branch_slots=bucket(int(lengths.max()))
        )

    # --------------------------------------------------------- synthesis paths
    def cache_path(
        self,
        questions: Sequence[str],
        branches: BranchCaches,
        *,
        max_new_tokens: int = 256,
        lora: bool = True,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
    ) -> PathResult:
        """Synthesize from branch KV: re-encode + map + prefill the prompt over [caches | prompt]."""
        check_branches(branches, self.cfg, self.max_branch_tokens)
        if len(questions) != branches.num_requests:
            raise ValueError(f"{len(questions)} questions for {branches.num_requests} requests of branch caches")
        self._check_lora(lora)
        k = branches.num_branches
        prompt_ids = [self.gen.chat_tokens(prompts.cache_synth_messages(q, k, self.family)) for q in questions]
        max_l = int(jax.device_get(branches.lengths).max())
        for i, p in enumerate(prompt_ids):
            check_length(self.cfg.max_position_embeddings, max_l + len(p), max_new_tokens, f"synthesizer request {i}")
        width = bucket(max(len(p) for p in prompt_ids))
        tokens, lengths = pad_batch(prompt_ids, width)
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        extra = bucket(width + max_new_tokens)
        m = self.model

        def prepare():
            return prepare_synth_cache(branches, self.mapper_def, self.mapper_state, cfg=self.cfg, extra_slots=extra)

        def prefill(cache):
            return runtime.extend(m.graphdef, m.state, tokens, lengths, cache, lora=lora, attn_impl=self.attn_impl)

        def ttft():
            logits, _ = prefill(prepare())
            return runtime.first_token(logits, jax.random.key(seed), sampling)

        breakdown = {
            "prepare_s": median_time(prepare, self.timing_repeats),
            "prefill_s": median_time(lambda: prefill(prepare())[0], self.timing_repeats),
        }
        total = median_time(ttft, self.timing_repeats)
        logits, cache = prefill(prepare())
        g = runtime.continue_generation(
            m.graphdef, m.state, logits, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
            sampling=sampling, stop_ids=self.gen.stop_ids, lora=lora, attn_impl=self.attn_impl,
        )
        texts, toks = self._decode(g)
        return PathResult("cache", texts, toks, total, breakdown, [len(p) for p in prompt_ids])

    def text_path(
        self, questions: Sequence[str], branch_texts: Sequence[Sequence[str]], *, max_new_tokens: int = 256,
        sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
    ) -> PathResult:
        """Text-concatenation baseline: every branch as text in the prompt, LoRA off."""
        if any(len(b) == 0 for b in branch_texts):
            raise ValueError("K = 0: the text path needs at least one branch per request")
        convs = [prompts.text_synth_messages(q, b, self.family) for q, b in zip(questions, branch_texts, strict=True)]
        return self._plain_path("text", convs, max_new_tokens, sampling, seed)

    def single_agent(
        self, questions: Sequence[str], *, max_new_tokens: int = 256, sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
    ) -> PathResult:
        """The backbone answers alone (no branches), LoRA off."""
        convs = [prompts.single_agent_messages(q, self.family) for q in questions]
        return self._plain_path("single", convs, max_new_tokens, sampling, seed)

    # ---------------------------------------------------------------- helpers
    def _plain_path(
        self, name: str, convs: Sequence[Messages], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> PathResult:
        prompt_ids = [self.gen.chat_tokens(c) for c in convs]
        for i, p in enumerate(prompt_ids):
            check_length(self.cfg.max_position_embeddings, len(p), max_new_tokens, f"{name} prompt {i}")
        width = bucket(max(len(p) for p in prompt_ids))
        tokens, lengths = pad_batch(prompt_ids, width)
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        m = self.model
        slots = bucket(width + max_new_tokens)

        def prefill():
            return runtime.prefill(m.graphdef, m.state, tokens, lengths, num_slots=slots, attn_impl=self.attn_impl)

        def ttft():
            return runtime.first_token(prefill()[0], jax.random.key(seed), sampling)

        total = median_time(ttft, self.timing_repeats)
        logits, cache = prefill()
        g = runtime.continue_generation(
            m.graphdef, m.state, logits, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
            sampling=sampling, stop_ids=self.gen.stop_ids, attn_impl=self.attn_impl,
        )
        texts, toks = self._decode(g)
        return PathResult(name, texts, toks, total, {"prefill_s": total}, [len(p) for p in prompt_ids])

    def _decode(self, g: runtime.Generation) -> tuple[list[str], list[list[int]]]:
        toks, nums, stopped = jax.device_get((g.tokens, g.num_tokens, g.stopped))
        ids = [row[: int(n) - int(s)].tolist() for row, n, s in zip(toks, nums, stopped)]
        return [self.tok.decode(t) for t in ids], ids

    def _check_lora(self, lora: bool) -> None:
        if lora and self.model.lora is None:
            raise ValueError("lora=True but the model was loaded without a LoRA adapter (pass lora=LoRAConfig(...))")
