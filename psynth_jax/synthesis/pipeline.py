"""Batched Parallel-Synthesis: worker stage, cache path, text-concatenation path, single agent.

All three synthesis paths take B requests at once (B x K branches for the worker stage) and
are compositions of the synthesis core (core.py) and the runtime: nothing here computes
attention, caches or the handoff itself. `ParallelSynthesis` is built whole (backbone with its
LoRA, mapper, handoff) and never changes; a variant is a new one (`dataclasses.replace`).

Each path is first described as `PathSteps`, its device work up to the first token as calls
(prepare, prefill, first token) plus the decode that follows; `answer` runs them once. It times
nothing: the TTFT of a path is measured around the same steps by psynth_jax/measure/ttft.py
(worker generation excluded, as in the paper).

On a mesh (the model's, `LoadedModel.mesh`, or one passed in): requests are data-parallel over
the mesh's batch axes and every array is laid out by the model's sharding rules
(model/sharding.py), so a many-chip slice runs the same code as one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from psynth_jax import distributed
from psynth_jax.inference import runtime
from psynth_jax.inference.generator import Generator, bucket, check_length, pad_batch
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kv_cache import BranchCaches, BranchView
from psynth_jax.model.loaded import LoadedModel
from psynth_jax.model.sharding import state_shardings
from psynth_jax.synthesis import core, prompts
from psynth_jax.synthesis.branches import check_branches
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.mapper import Mapper, make_mapper

Messages = list[dict[str, str]]


@dataclasses.dataclass
class WorkerOutputs:
    """K branches per request: their kept KV (device), output tokens, texts, and whether each stopped."""

    branches: core.Branches  # copied out, or (zero_copy) the worker rows viewed in place
    tokens: list[list[list[int]]]  # [B][K] output tokens, stop token stripped
    texts: list[list[str]]
    stopped: list[list[bool]]  # [B][K] the branch ended on a stop token (else: token budget)


@dataclasses.dataclass(frozen=True)
class PathSteps:
    """One synthesis path for B requests, as the device calls that make it (nothing has run yet).

    prepare() -> what prefill starts from (cache path: (the synthesizer's cache, the mapped view or
    None); the text paths: None); prefill(prepared) -> (last-token logits [B, V], cache);
    first_token(logits) -> the first sampled tokens; decode(logits, cache, prepared) -> the answer's
    Generation. Each call is jitted and may be repeated (a prefill consumes what prepare made). mesh():
    the context every call runs in.
    """

    name: str
    prompt_tokens: list[int]  # live tokens prefilled per request
    prepare: Callable[[], Any]
    prefill: Callable[[Any], tuple[jax.Array, Any]]
    first_token: Callable[[jax.Array], jax.Array]
    decode: Callable[[jax.Array, Any, Any], runtime.Generation]
    mesh: Callable[[], contextlib.AbstractContextManager]


@dataclasses.dataclass
class PathResult:
    """One synthesis path's answers for B requests."""

    name: str
    texts: list[str]
    tokens: list[list[int]]
    prompt_tokens: list[int]  # live tokens prefilled per request
    first_logits: np.ndarray  # [B, V] float32: the logits the first token was sampled from


@dataclasses.dataclass(frozen=True, eq=False)
class ParallelSynthesis:
    """The synthesizer around one backbone: workers (LoRA off) and the three synthesis paths.

    model: the backbone with its LoRA (B = 0 untrained); mapper: the cache mapper (default: the
    release's, identity at init); handoff: which worker KV is handed over and when workers stop
    (synthesis/handoff.py); family: the task family whose prompt templates the paths use.
    mesh: where requests and caches live (default: the model's own mesh, one device if none).
    zero_copy: hand the branches over as views of the worker rows (core.hand_over) and
    synthesize by attending to them in place: no branch K/V is copied, re-encoded or mapped
    (XLA attention only). Default off: the materialised path, the reference.
    Immutable: a different mapper, family or handoff is another `ParallelSynthesis`
    (`dataclasses.replace(synth, mapper=...)`), sharing the backbone's arrays.
    """

    model: LoadedModel
    mapper: Mapper | None = None
    _: dataclasses.KW_ONLY
    family: str = "math"
    attn_impl: str = "xla"
    max_branch_tokens: int | None = None
    handoff: Handoff = Handoff()
    mesh: Mesh | None = None
    zero_copy: bool = False
    gen: Generator = dataclasses.field(init=False, repr=False)  # derived from the fields above
    mapper_def: nnx.GraphDef = dataclasses.field(init=False, repr=False)
    mapper_state: nnx.State = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.zero_copy and self.attn_impl != "xla":
            raise ValueError(f"zero_copy reads branch caches in place with attn_impl='xla' only, got {self.attn_impl!r}")
        prompts.task_prompts(self.family)  # fail early on an unknown family
        cfg = self.model.cfg
        mapper = self.mapper if self.mapper is not None else make_mapper("affine_length", cfg.num_kv_heads)
        heads = getattr(mapper, "num_kv_heads", cfg.num_kv_heads)
        if heads != cfg.num_kv_heads:
            raise ValueError(f"mapper was built for {heads} KV heads but the model has {cfg.num_kv_heads}")
        mesh = self.mesh if self.mesh is not None else self.model.mesh
        mapper_def, mapper_state = nnx.split(mapper)
        if mesh is not None:  # beside the caches it maps (replicated by the default rules)
            mapper_state = distributed.put(mapper_state, state_shardings(mapper_state, mesh, self.model.rules))
        for name, value in (("mapper", mapper), ("mesh", mesh), ("mapper_def", mapper_def),
                            ("mapper_state", mapper_state),
                            ("gen", Generator(self.model, attn_impl=self.attn_impl, mesh=mesh))):
            object.__setattr__(self, name, value)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def tok(self) -> Any:
        """The backbone's tokenizer."""
        return self.model.tokenizer

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
        nums, stopped, toks = distributed.fetch((g.num_tokens, g.stopped, g.tokens))
        out_len = (nums - stopped).astype(np.int32)  # output tokens, the stop token excluded
        prefix = np.asarray([len(p) for p in flat], np.int32)
        start, kept = self.handoff.kept_span(prefix, out_len, stopped)
        with self._mesh():
            branches = core.jit_hand_over(g.cache, self._put(start), self._put(kept), self._put(prefix),
                                          num_requests=b, branch_slots=bucket(max_new_tokens),
                                          zero_copy=self.zero_copy, rules=self.model.rules)
        tokens = [[toks[i * k + j, : out_len[i * k + j]].tolist() for j in range(k)] for i in range(b)]
        texts = [[self.tok.decode(t) for t in row] for row in tokens]
        stops = [[bool(stopped[i * k + j]) for j in range(k)] for i in range(b)]
        return WorkerOutputs(branches=branches, tokens=tokens, texts=texts, stopped=stops)

    def branches_from_tokens(
        self, prefixes: Sequence[Sequence[Sequence[int]]], outputs: Sequence[Sequence[Sequence[int]]],
        stopped: Sequence[Sequence[bool]] | None = None,
    ) -> core.Branches:
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
            return core.jit_branch_kv(
                self.model.graphdef, self.model.state, self._put(tokens), self._put(lens), self._put(start),
                self._put(kept), self._put(prefix), num_requests=b, branch_slots=bucket(int(kept.max())),
                zero_copy=self.zero_copy, attn_impl=self.attn_impl,
            )

    # --------------------------------------------------------- synthesis paths
    def cache_steps(
        self, questions: Sequence[str], branches: core.Branches, *, max_new_tokens: int = 256, lora: bool = True,
        sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
    ) -> PathSteps:
        """Synthesize from branch KV: re-encode + map + prefill the prompt over [caches | prompt]
        (a BranchView: the mapper's scalars, then the prompt attends to the worker rows in place)."""
        check_branches(branches, self.cfg, self.max_branch_tokens)
        if len(questions) != branches.num_requests:
            raise ValueError(f"{len(questions)} questions for {branches.num_requests} requests of branch caches")
        self._check_lora(lora)
        k = branches.num_branches
        prompt_ids = [self.gen.chat_tokens(prompts.cache_synth_messages(q, k, self.family)) for q in questions]
        max_l = int(distributed.fetch(branches.lengths).max())
        for i, p in enumerate(prompt_ids):
            check_length(self.cfg.max_position_embeddings, max_l + len(p), max_new_tokens, f"synthesizer request {i}")
        if isinstance(branches, BranchView) and self.attn_impl != "xla":
            raise ValueError(f"a zero-copy branch view needs attn_impl='xla', this synthesizer has {self.attn_impl!r}")
        tokens, lengths, width = self._prompts(prompt_ids)
        extra = bucket(width + max_new_tokens)
        m = self.model

        def prepare():  # -> (the synthesizer's starting cache, the mapped view or None)
            return core.jit_prepare(branches, self.mapper_def, self.mapper_state, cfg=self.cfg, extra_slots=extra)

        def prefill(prepared):
            cache, view = prepared
            return core.jit_cache_prefill(m.graphdef, m.state, tokens, lengths, cache, lora=lora,
                                          attn_impl=self.attn_impl, view=view)

        def decode(logits, cache, prepared):
            return runtime.continue_generation(
                m.graphdef, m.state, logits, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
                sampling=sampling, stop_ids=self.gen.stop_ids, lora=lora, attn_impl=self.attn_impl, view=prepared[1])

        return self._steps("cache", prompt_ids, prepare, prefill, decode, sampling, seed)

    def text_steps(
        self, questions: Sequence[str], branch_texts: Sequence[Sequence[str]], *, max_new_tokens: int = 256,
        sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
    ) -> PathSteps:
        """Text-concatenation baseline: every branch as text in the prompt, LoRA off."""
        if any(len(b) == 0 for b in branch_texts):
            raise ValueError("K = 0: the text path needs at least one branch per request")
        convs = [prompts.text_synth_messages(q, b, self.family) for q, b in zip(questions, branch_texts, strict=True)]
        return self._plain_steps("text", convs, max_new_tokens, sampling, seed)

    def single_steps(
        self, questions: Sequence[str], *, max_new_tokens: int = 256, sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
    ) -> PathSteps:
        """The backbone answers alone (no branches), LoRA off."""
        convs = [prompts.single_agent_messages(q, self.family) for q in questions]
        return self._plain_steps("single", convs, max_new_tokens, sampling, seed)

    def answer(self, steps: PathSteps) -> PathResult:
        """Run a path once: prepare, prefill, decode; the texts and tokens of its answers."""
        with steps.mesh():
            prepared = steps.prepare()
            logits, cache = steps.prefill(prepared)
            g = steps.decode(logits, cache, prepared)
        toks, nums, stopped = distributed.fetch((g.tokens, g.num_tokens, g.stopped))
        ids = [row[: int(n) - int(s)].tolist() for row, n, s in zip(toks, nums, stopped)]
        return PathResult(steps.name, [self.tok.decode(t) for t in ids], ids, steps.prompt_tokens,
                          np.asarray(distributed.fetch(logits)))

    def cache_path(self, questions: Sequence[str], branches: core.Branches, **options: Any) -> PathResult:
        """`answer(cache_steps(...))`: the answers synthesized from branch KV."""
        return self.answer(self.cache_steps(questions, branches, **options))

    def text_path(self, questions: Sequence[str], branch_texts: Sequence[Sequence[str]], **options: Any) -> PathResult:
        """`answer(text_steps(...))`: the text-concatenation baseline's answers."""
        return self.answer(self.text_steps(questions, branch_texts, **options))

    def single_agent(self, questions: Sequence[str], **options: Any) -> PathResult:
        """`answer(single_steps(...))`: the backbone's answers alone."""
        return self.answer(self.single_steps(questions, **options))

    def teacher_forced_kl(
        self, questions: Sequence[str], branches: BranchCaches, branch_texts: Sequence[Sequence[str]],
        answers: Sequence[Sequence[int]], *, lora: bool = True,
    ) -> list[float]:
        """Per request: the mean over `answers[b]`'s tokens of KL(text path || cache path), both
        teacher-forced on that answer (the text path's own greedy answer, typically).

        Each path prefills [its prompt | answer] (`text_answer_logprobs`: every branch as text, LoRA
        off; `cache_answer_logprobs`: over the prepared branch caches, LoRA as `lora`) and the
        next-token distributions at the answer's positions are compared (`answer_kl`): how far the
        cache path is from reading what the text path reads, token by token.
        """
        self._check_lora(lora)
        out = []
        for b, (q, texts, answer) in enumerate(zip(questions, branch_texts, answers, strict=True)):
            if not answer:
                out.append(float("nan"))
                continue
            p_t = self.text_answer_logprobs(q, texts, answer)
            p_c = self.cache_answer_logprobs(q, request_branches(branches, b), answer, lora=lora)
            out.append(answer_kl(p_t, p_c))
        return out

    def text_answer_logprobs(self, question: str, branch_texts: Sequence[str], answer: Sequence[int]) -> jax.Array:
        """Log-probabilities [len(answer), V] (float32) of the text path (every branch as text, LoRA
        off) at the positions that predict each token of `answer`, teacher-forced on it."""
        m = self.model
        text_ids = self.gen.chat_tokens(prompts.text_synth_messages(question, list(branch_texts), self.family))
        seq = text_ids + list(answer)
        width = bucket(len(seq))
        tokens, lengths = pad_batch([seq], width)
        with self._mesh():
            logits, _ = runtime.prefill(m.graphdef, m.state, self._put(tokens), self._put(lengths), num_slots=width,
                                        attn_impl=self.attn_impl, output="all")
            return jax.nn.log_softmax(logits[0, len(text_ids) - 1 : len(text_ids) - 1 + len(answer)], axis=-1)

    def cache_answer_logprobs(self, question: str, branches: BranchCaches, answer: Sequence[int], *,
                              lora: bool = True) -> jax.Array:
        """Log-probabilities [len(answer), V] (float32) of the cache path over one request's branch
        caches (this synthesizer's mapper; LoRA as `lora`), teacher-forced on `answer` as
        `text_answer_logprobs` is."""
        self._check_lora(lora)
        if branches.num_requests != 1:
            raise ValueError(f"one request's branch caches expected, got {branches.num_requests} "
                             "(select one with request_branches)")
        m = self.model
        synth_ids = self.gen.chat_tokens(prompts.cache_synth_messages(question, branches.num_branches, self.family))
        seq = synth_ids + list(answer)
        width = bucket(len(seq))
        tokens, lengths = pad_batch([seq], width)
        with self._mesh():
            cache, view = core.jit_prepare(branches, self.mapper_def, self.mapper_state, cfg=self.cfg,
                                           extra_slots=width)
            logits, _ = core.jit_cache_prefill(m.graphdef, m.state, self._put(tokens), self._put(lengths), cache,
                                               lora=lora, attn_impl=self.attn_impl, output="all", view=view)
            return jax.nn.log_softmax(logits[0, len(synth_ids) - 1 : len(synth_ids) - 1 + len(answer)], axis=-1)

    # ---------------------------------------------------------------- helpers
    def _plain_steps(
        self, name: str, convs: Sequence[Messages], max_new_tokens: int, sampling: SamplingConfig, seed: int
    ) -> PathSteps:
        prompt_ids = [self.gen.chat_tokens(c) for c in convs]
        for i, p in enumerate(prompt_ids):
            check_length(self.cfg.max_position_embeddings, len(p), max_new_tokens, f"{name} prompt {i}")
        tokens, lengths, width = self._prompts(prompt_ids)
        m = self.model
        slots = bucket(width + max_new_tokens)

        def prefill(_):
            return runtime.prefill(m.graphdef, m.state, tokens, lengths, num_slots=slots, attn_impl=self.attn_impl)

        def decode(logits, cache, _):
            return runtime.continue_generation(
                m.graphdef, m.state, logits, cache, jax.random.key(seed), max_new_tokens=max_new_tokens,
                sampling=sampling, stop_ids=self.gen.stop_ids, attn_impl=self.attn_impl)

        return self._steps(name, prompt_ids, lambda: None, prefill, decode, sampling, seed)

    def _steps(self, name: str, prompt_ids: list[list[int]], prepare, prefill, decode, sampling: SamplingConfig,
               seed: int) -> PathSteps:
        return PathSteps(name, [len(p) for p in prompt_ids], prepare, prefill,
                         lambda logits: runtime.first_token(logits, jax.random.key(seed), sampling), decode, self._mesh)

    def _prompts(self, prompt_ids: list[list[int]]) -> tuple[jax.Array, jax.Array, int]:
        """Prompts right-padded to a bucket and placed: (tokens, lengths, bucket width)."""
        width = bucket(max(len(p) for p in prompt_ids))
        tokens, lengths = pad_batch(prompt_ids, width)
        return self._put(tokens), self._put(lengths), width

    def _mesh(self) -> contextlib.AbstractContextManager:
        """The mesh as context for the jitted calls (it lays out caches and activations)."""
        return self.gen.mesh_context()

    def _put(self, x: np.ndarray) -> jax.Array:
        """A per-request (or per-branch-row) host array, split over the mesh's batch axes."""
        return self.gen.put_batch(x)

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


def request_branches(branches: BranchCaches, b: int) -> BranchCaches:
    """Request `b`'s branch caches out of a batch of requests (a batch of one)."""
    return jax.tree.map(lambda x: x[:, b : b + 1] if x.ndim == 6 else x[b : b + 1], branches)


def answer_kl(text_logprobs: jax.Array, cache_logprobs: jax.Array) -> float:
    """Mean over the answer's positions of KL(text || cache), from [n, V] log-probabilities."""
    p_t, p_c = text_logprobs, cache_logprobs
    return float(jnp.mean(jnp.sum(jnp.exp(p_t) * (p_t - p_c), axis=-1)))
