"""Batched Parallel-Synthesis: worker stage, cache path, text-concatenation path, single agent.

All three synthesis paths take B requests at once (B x K branches for the worker stage) and
are compositions of the synthesis core (core.py): nothing here computes attention, caches or
the handoff itself. TTFT is measured the same way for every path: from the start of the path's
first device work to the first sampled token being ready, compilation excluded (each timed
closure runs once to compile first). Worker generation is excluded, as in the paper.

On a mesh (the model's, `LoadedModel.mesh`, or one passed in): requests are data-parallel over
the mesh's batch axes and every array is laid out by the model's sharding rules
(model/sharding.py), so a many-chip slice runs the same code as one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from psynth_jax.inference import hosts, runtime
from psynth_jax.inference.generator import Generator, bucket, check_length, pad_batch
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.inference.timing import time_calls
from psynth_jax.model.kv_cache import BranchView
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.model.sharding import state_shardings
from psynth_jax.synthesis import core, prompts
from psynth_jax.synthesis.convention import Handoff
from psynth_jax.synthesis.handoff import BranchCaches, check_branches
from psynth_jax.synthesis.mapper import Mapper, make_mapper

Messages = list[dict[str, str]]


@dataclasses.dataclass
class WorkerOutputs:
    """K branches per request: their kept KV (device), output tokens, texts, and whether each stopped."""

    branches: BranchCaches | BranchView  # copied out, or (zero_copy) the worker rows viewed in place
    tokens: list[list[list[int]]]  # [B][K] output tokens, stop token stripped
    texts: list[list[str]]
    stopped: list[list[bool]]  # [B][K] the branch ended on a stop token (else: token budget)


@dataclasses.dataclass
class PathResult:
    """One synthesis path's answers for B requests, with its TTFT (seconds, median of repeats)."""

    name: str
    texts: list[str]
    tokens: list[list[int]]
    ttft_s: float
    breakdown: dict[str, float]  # parts of the TTFT (prepare / prefill), seconds
    prompt_tokens: list[int]  # live tokens prefilled per request
    first_logits: np.ndarray  # [B, V] float32: the logits the first token was sampled from


class ParallelSynthesis:
    """The synthesizer around one backbone: workers (LoRA off) and the three synthesis paths.

    handoff: which worker KV is handed over and when workers stop (synthesis/convention.py).
    mesh: where requests and caches live (default: the model's own mesh, one device if none).
    zero_copy: hand the branches over as views of the worker rows (core.view / branch_view) and
    synthesize by attending to them in place: no branch K/V is copied, re-encoded or mapped
    (XLA attention only). Default off: the materialised path, the reference.
    """

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
        mesh: Mesh | None = None,
        zero_copy: bool = False,
    ):
        if zero_copy and attn_impl != "xla":
            raise ValueError(f"zero_copy reads branch caches in place with attn_impl='xla' only, got {attn_impl!r}")
        self.zero_copy = zero_copy
        self.model = model
        self.mesh = mesh if mesh is not None else model.mesh
        self.gen = Generator(model, attn_impl=attn_impl, mesh=self.mesh)
        self.tok = model.tokenizer
        self.cfg = model.cfg
        self.family = family
        prompts.task_prompts(family)  # fail early on an unknown family
        self.attn_impl = attn_impl
        self.max_branch_tokens = max_branch_tokens
        self.timing_repeats = timing_repeats
        self.handoff = handoff
        self.set_mapper(mapper if mapper is not None else make_mapper("affine_length", self.cfg.num_kv_heads))

    def set_mapper(self, mapper: Mapper) -> None:
        heads = getattr(mapper, "num_kv_heads", self.cfg.num_kv_heads)
        if heads != self.cfg.num_kv_heads:
            raise ValueError(
                f"mapper was built for {heads} KV heads but the model has {self.cfg.num_kv_heads}"
            )
        self.mapper = mapper
        self.mapper_def, state = nnx.split(mapper)
        if self.mesh is not None:  # beside the caches it maps (replicated by the default rules)
            state = hosts.put(state, state_shardings(state, self.mesh, self.model.rules))
        self.mapper_state = state

    @property
    def worker_stop_ids(self) -> tuple[int, ...]:
        """The tokens that end a worker's output under the handoff's stop-token setting."""
        return self.handoff.stop_ids(self.tok, self.cfg.eos_token_ids)

    # ----------------------------------------------------------------- workers
    def run_workers(
        self,
        conversations: Sequence[Sequence[Messages]],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.95),
        seed: int = 0,
    ) -> WorkerOutputs:
        """Decode B x K worker conversations in one batched generate (LoRA off); keep their KV
        as the handoff convention says."""
        b, k = _request_shape([len(c) for c in conversations], "conversations")
        flat = [self.gen.chat_tokens(m) for conv in conversations for m in conv]
        g = self.gen.generate_tokens(flat, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                     stop_ids=self.worker_stop_ids)
        nums, stopped, toks = hosts.fetch((g.num_tokens, g.stopped, g.tokens))
        out_len = (nums - stopped).astype(np.int32)  # output tokens, the stop token excluded
        prefix = np.asarray([len(p) for p in flat], np.int32)
        start, kept = self.handoff.kept_span(prefix, out_len, stopped)
        with self._mesh():
            if self.zero_copy:
                branches = core.view(g.cache, self._put(start), self._put(kept), self._put(prefix), num_requests=b)
            else:
                branches = core.jit_extract(g.cache, self._put(start), self._put(kept), self._put(prefix),
                                            num_requests=b, branch_slots=bucket(max_new_tokens),
                                            rules=self.model.rules)
        tokens = [[toks[i * k + j, : out_len[i * k + j]].tolist() for j in range(k)] for i in range(b)]
        texts = [[self.tok.decode(t) for t in row] for row in tokens]
        stops = [[bool(stopped[i * k + j]) for j in range(k)] for i in range(b)]
        return WorkerOutputs(branches=branches, tokens=tokens, texts=texts, stopped=stops)

    def branches_from_tokens(
        self, prefixes: Sequence[Sequence[Sequence[int]]], outputs: Sequence[Sequence[Sequence[int]]],
        stopped: Sequence[Sequence[bool]] | None = None,
    ) -> BranchCaches | BranchView:
        """Branch caches from stored tokens: prefill [worker prompt | output] (LoRA off) and keep the
        span the handoff convention hands over, as the worker held it (zero_copy: view it in place).

        prefixes / outputs / stopped: [B][K]; every request needs the same K, and a prefix, an
        output (and a stop flag) per branch. stopped: whether each output ended on a stop token
        (default: all did, as for complete texts); only the "release" convention looks at it.
        """
        b, k = _request_shape([len(o) for o in outputs], "outputs")
        if [len(p) for p in prefixes] != [k] * b or len(prefixes) != b:
            raise ValueError(f"prefixes have {[len(p) for p in prefixes]} branches per request, outputs "
                             f"{[len(o) for o in outputs]}: give one prefix per branch")
        if stopped is None:
            stopped = [[True] * k for _ in range(b)]
        elif [len(s) for s in stopped] != [k] * b:
            raise ValueError(f"stopped has {[len(s) for s in stopped]} flags per request; expected {k} each")
        rows = [list(p) + list(o) for pr, orow in zip(prefixes, outputs) for p, o in zip(pr, orow)]
        prefix = np.asarray([len(p) for pr in prefixes for p in pr], np.int32)
        out_len = np.asarray([len(o) for orow in outputs for o in orow], np.int32)
        if (out_len == 0).any():
            i = int(np.argmax(out_len == 0))
            raise ValueError(f"branch {i % k} of request {i // k} is empty (0 output tokens)")
        if (prefix == 0).any():
            i = int(np.argmax(prefix == 0))
            raise ValueError(f"branch {i % k} of request {i // k} has an empty worker prompt")
        start, kept = self.handoff.kept_span(prefix, out_len, np.asarray(stopped, bool).reshape(-1))
        width = bucket(max(len(r) for r in rows))
        check_length(self.cfg.max_position_embeddings, width, 0, "branch prefix + output")
        tokens, lens = pad_batch(rows, width)
        with self._mesh():
            if self.zero_copy:
                return core.jit_branch_view(
                    self.model.graphdef, self.model.state, self._put(tokens), self._put(lens), self._put(start),
                    self._put(kept), self._put(prefix), num_requests=b, attn_impl=self.attn_impl)
            return core.jit_branch_kv(
                self.model.graphdef, self.model.state, self._put(tokens), self._put(lens), self._put(start),
                self._put(kept), self._put(prefix), num_requests=b, branch_slots=bucket(int(kept.max())),
                attn_impl=self.attn_impl,
            )

    # --------------------------------------------------------- synthesis paths
    def cache_path(
        self,
        questions: Sequence[str],
        branches: BranchCaches | BranchView,
        *,
        max_new_tokens: int = 256,
        lora: bool = True,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
    ) -> PathResult:
        """Synthesize from branch KV: re-encode + map + prefill the prompt over [caches | prompt]
        (a BranchView: the mapper's scalars, then the prompt attends to the worker rows in place)."""
        check_branches(branches, self.cfg, self.max_branch_tokens)
        if len(questions) != branches.num_requests:
            raise ValueError(f"{len(questions)} questions for {branches.num_requests} requests of branch caches")
        self._check_lora(lora)
        k = branches.num_branches
        prompt_ids = [self.gen.chat_tokens(prompts.cache_synth_messages(q, k, self.family)) for q in questions]
        max_l = int(hosts.fetch(branches.lengths).max())
        for i, p in enumerate(prompt_ids):
            check_length(self.cfg.max_position_embeddings, max_l + len(p), max_new_tokens, f"synthesizer request {i}")
        width = bucket(max(len(p) for p in prompt_ids))
        tokens, lengths = pad_batch(prompt_ids, width)
        tokens, lengths = self._put(tokens), self._put(lengths)
        extra = bucket(width + max_new_tokens)
        m = self.model
        in_place = isinstance(branches, BranchView)
        if in_place and self.attn_impl != "xla":
            raise ValueError(f"a zero-copy branch view needs attn_impl='xla', this synthesizer has {self.attn_impl!r}")

        def prepare():  # -> (the synthesizer's starting cache, the mapped view or None)
            if in_place:
                view, cache = core.jit_prepare_view(branches, self.mapper_def, self.mapper_state, cfg=self.cfg,
                                                    extra_slots=extra)
                return cache, view
            return core.jit_prepare(branches, self.mapper_def, self.mapper_state, cfg=self.cfg,
                                    extra_slots=extra), None

        def prefill(prepared):
            cache, view = prepared
            return core.jit_cache_prefill(m.graphdef, m.state, tokens, lengths, cache, lora=lora,
                                          attn_impl=self.attn_impl, view=view)

        def ttft():
            logits, _ = prefill(prepare())
            return runtime.first_token(logits, jax.random.key(seed), sampling)

        with self._mesh():
            breakdown = {
                "prepare_s": self._median(prepare),
                "prefill_s": self._median(lambda: prefill(prepare())[0]),
            }
            total = self._median(ttft)
            prepared = prepare()
            logits, cache = prefill(prepared)
            g = core.decode(
                m.graphdef, m.state, logits, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
                sampling=sampling, stop_ids=self.gen.stop_ids, lora=lora, attn_impl=self.attn_impl,
                view=prepared[1],
            )
        texts, toks = self._decode(g)
        return PathResult("cache", texts, toks, total, breakdown, [len(p) for p in prompt_ids],
                          np.asarray(hosts.fetch(logits)))

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

    def teacher_forced_kl(
        self, questions: Sequence[str], branches: BranchCaches, branch_texts: Sequence[Sequence[str]],
        answers: Sequence[Sequence[int]], *, lora: bool = True,
    ) -> list[float]:
        """Per request: the mean over `answers[b]`'s tokens of KL(text path || cache path), both
        teacher-forced on that answer (the text path's own greedy answer, typically).

        Each path prefills [its prompt | answer] (`core.text_prefill`: every branch as text, LoRA
        off; `core.cache_prefill` over the prepared branch caches, LoRA as `lora`) and the
        next-token distributions at the answer's positions are compared: how far the cache path
        is from reading what the text path reads, token by token.
        """
        self._check_lora(lora)
        k = branches.num_branches
        m = self.model
        out = []
        with self._mesh():
            for b, (q, texts, answer) in enumerate(zip(questions, branch_texts, answers, strict=True)):
                if not answer:
                    out.append(float("nan"))
                    continue
                text_ids = self.gen.chat_tokens(prompts.text_synth_messages(q, list(texts), self.family))
                synth_ids = self.gen.chat_tokens(prompts.cache_synth_messages(q, k, self.family))
                text_seq, synth_seq = text_ids + list(answer), synth_ids + list(answer)
                width = bucket(len(text_seq))
                tokens, lengths = pad_batch([text_seq], width)
                text_logits, _ = core.jit_text_prefill(m.graphdef, m.state, self._put(tokens), self._put(lengths),
                                                       num_slots=width, attn_impl=self.attn_impl, output="all")
                one = jax.tree.map(lambda x: x[:, b : b + 1] if x.ndim == 6 else x[b : b + 1], branches)
                width = bucket(len(synth_seq))
                cache = core.jit_prepare(one, self.mapper_def, self.mapper_state, cfg=self.cfg, extra_slots=width)
                tokens, lengths = pad_batch([synth_seq], width)
                cache_logits, _ = core.jit_cache_prefill(m.graphdef, m.state, self._put(tokens), self._put(lengths),
                                                         cache, lora=lora, attn_impl=self.attn_impl, output="all")
                n = len(answer)
                p_t = jax.nn.log_softmax(text_logits[0, len(text_ids) - 1 : len(text_ids) - 1 + n], axis=-1)
                p_c = jax.nn.log_softmax(cache_logits[0, len(synth_ids) - 1 : len(synth_ids) - 1 + n], axis=-1)
                out.append(float(jax.numpy.mean(jax.numpy.sum(jax.numpy.exp(p_t) * (p_t - p_c), axis=-1))))
        return out

    # ---------------------------------------------------------------- helpers
    def _plain_path(
        self, name: str, convs: Sequence[Messages], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> PathResult:
        prompt_ids = [self.gen.chat_tokens(c) for c in convs]
        for i, p in enumerate(prompt_ids):
            check_length(self.cfg.max_position_embeddings, len(p), max_new_tokens, f"{name} prompt {i}")
        width = bucket(max(len(p) for p in prompt_ids))
        tokens, lengths = pad_batch(prompt_ids, width)
        tokens, lengths = self._put(tokens), self._put(lengths)
        m = self.model
        slots = bucket(width + max_new_tokens)

        def prefill():
            return core.jit_text_prefill(m.graphdef, m.state, tokens, lengths, num_slots=slots,
                                         attn_impl=self.attn_impl)

        def ttft():
            return runtime.first_token(prefill()[0], jax.random.key(seed), sampling)

        with self._mesh():
            total = self._median(ttft)
            logits, cache = prefill()
            g = core.decode(
                m.graphdef, m.state, logits, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
                sampling=sampling, stop_ids=self.gen.stop_ids, attn_impl=self.attn_impl,
            )
        texts, toks = self._decode(g)
        return PathResult(name, texts, toks, total, {"prefill_s": total}, [len(p) for p in prompt_ids],
                          np.asarray(hosts.fetch(logits)))

    def _median(self, fn: Callable[[], jax.Array]) -> float:
        """Median seconds of `timing_repeats` calls after a compile call; nan when timing is off."""
        if self.timing_repeats <= 0:
            return float("nan")
        return time_calls(fn, self.timing_repeats).median_s

    def _mesh(self) -> contextlib.AbstractContextManager:
        """The mesh as context for the jitted calls (it lays out caches and activations)."""
        return self.gen.mesh_context()

    def _put(self, x: np.ndarray) -> jax.Array:
        """A per-request (or per-branch-row) host array, split over the mesh's batch axes."""
        return self.gen.put_batch(x)

    def _decode(self, g: runtime.Generation) -> tuple[list[str], list[list[int]]]:
        toks, nums, stopped = hosts.fetch((g.tokens, g.num_tokens, g.stopped))
        ids = [row[: int(n) - int(s)].tolist() for row, n, s in zip(toks, nums, stopped)]
        return [self.tok.decode(t) for t in ids], ids

    def _check_lora(self, lora: bool) -> None:
        if lora and self.model.lora is None:
            raise ValueError("lora=True but the model was loaded without a LoRA adapter (pass lora=LoRAConfig(...))")


def _request_shape(branch_counts: Sequence[int], what: str) -> tuple[int, int]:
    """(B, K) of a batch of requests; every request must have the same K >= 1."""
    if not branch_counts or branch_counts[0] == 0:
        raise ValueError(f"need at least one request and one branch, got B={len(branch_counts)}, "
                         f"K={branch_counts[0] if branch_counts else 0}")
    if any(n != branch_counts[0] for n in branch_counts):
        raise ValueError(f"every request needs the same number of branches K; {what} have {list(branch_counts)} "
                         "(batch requests with equal K together)")
    return len(branch_counts), branch_counts[0]
