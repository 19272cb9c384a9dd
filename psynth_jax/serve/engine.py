"""The serving engine, shaped like MaxText's MaxEngine (JetStream's engine API):
prefill -> insert into a decode slot -> generate one step for every live slot.

    init_decode_state()            N decode slots of C cache slots each (one batched KVCache)
    prefill(prompt, ...)           a worker / chat prompt (LoRA off): `runtime.prefill`
    prefill_synthesis(prompt, br)  a synthesizer prompt over K stored branch caches (LoRA on):
                                   `core.jit_prepare` (re-encode + map + assemble) then
                                   `core.jit_cache_prefill`, as `ParallelSynthesis.cache_steps` runs them
    insert(prefix, state, slot)    the prefix's cache, first token and sampling into a free slot
    generate(state, live, rows)    one decode step of every live slot (`runtime.decode_fn`), per-row
                                   LoRA and sampling, so workers, chats and synthesizers share a step;
                                   over the first `rows` slots only when the others are free
    hand_over(state, slot, ...)    a finished worker's kept span out of its slot (`core.extract`)
    branch_from_tokens(...)        a branch given as text, prefilled (`core.jit_branch_kv`)

A `Prefix` is what MaxEngine's prefill returns: the request's cache (batch 1) and its first sampled
token. The jitted functions are pure over pytrees (`DecodeState`, `Prefix`, `BranchCaches`),
compiled once per shape bucket (prompt widths in multiples of 64, branch spans likewise, steps over
1, 2, 4, ... slots: `Engine.warm_up` compiles those before serving); the decode
state is donated by `insert` and `generate`, which replace it. On a mesh the decode slots are split
over the batch axes (requests over `data`) and every call runs under the mesh, as the Generator does.

The engine holds no request, queue or thread: psynth_jax/serve/scheduler.py drives it. It serves the
materialised cache path (each slot holds its whole context; the zero-copy view reads worker rows in
place, which a slot fed from the branch store does not have).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax import distributed
from psynth_jax.inference import runtime
from psynth_jax.inference.generator import bucket, pad_batch
from psynth_jax.inference.sampling import sample_rows
from psynth_jax.model.kernels.dispatch import cpu_decode_step
from psynth_jax.model.kv_cache import BranchCaches, KVCache
from psynth_jax.synthesis import core
from psynth_jax.synthesis.handoff import Handoff
from psynth_jax.synthesis.pipeline import ParallelSynthesis


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One request's sampling: temperature (0: greedy), nucleus top_p, and the seed of its keys
    (token i is drawn with fold_in(key(seed), i), whatever slot or batch the request lands in)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
    """A prefilled request (MaxEngine's Prefix): its cache [L, 1, W, ...] and first token [1]."""

    cache: KVCache
    first: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """N decode slots: one KVCache [L, N, C, Hkv, D] and, per slot, the token it feeds next, its
    LoRA switch and sampling (temperature, top_p, raw key data, tokens drawn so far)."""

    cache: KVCache
    tokens: jax.Array  # [N] int32
    lora: jax.Array  # [N] bool
    temperature: jax.Array  # [N] float32
    top_p: jax.Array  # [N] float32
    keys: jax.Array  # [N, ...] uint32: jax.random.key_data of each slot's key(seed)
    steps: jax.Array  # [N] int32: tokens drawn (token i used fold_in(key, i))

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[0]


# ------------------------------------------------------------------------------ pure functions
def _row_keys(keys: jax.Array, steps: jax.Array) -> jax.Array:
    """Typed keys [N]: fold_in(key(seed) of each row, its step)."""
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(keys, steps)


@jax.jit
def first_token(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """A prefill's first tokens [B] from its last logits [B, V] (token 0 of each request's keys)."""
    return sample_rows(logits, _row_keys(keys, jnp.zeros(keys.shape[0], jnp.int32)), temperature, top_p)


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, state: DecodeState, slot: jax.Array, lora: jax.Array, temperature: jax.Array,
           top_p: jax.Array, keys: jax.Array) -> DecodeState:
    """`prefix` into decode slot `slot` (MaxEngine's insert): its cache at the slot's first W cache
    slots (the rest of the row marked invalid), its first token to feed next, its LoRA switch and
    sampling. The prefix may be narrower than the slot (W <= C), never wider."""
    c, p = state.cache, prefix.cache
    w, total = p.num_slots, c.num_slots
    if w > total:
        raise ValueError(f"a prefix of {w} cache slots does not fit a decode slot of {total}")
    zero = jnp.zeros((), jnp.int32)
    k = jax.lax.dynamic_update_slice(c.k, p.k.astype(c.k.dtype), (zero, slot, zero, zero, zero))
    v = jax.lax.dynamic_update_slice(c.v, p.v.astype(c.v.dtype), (zero, slot, zero, zero, zero))
    row = jnp.zeros((1, total), bool).at[:, :w].set(p.valid)
    valid = jax.lax.dynamic_update_slice(c.valid, row, (slot, zero))
    cache = KVCache(k=k, v=v, valid=valid, end=c.end.at[slot].set(p.end[0]), next_pos=c.next_pos.at[slot].set(p.next_pos[0]))
    return DecodeState(cache=cache, tokens=state.tokens.at[slot].set(prefix.first[0]), lora=state.lora.at[slot].set(lora),
                       temperature=state.temperature.at[slot].set(temperature), top_p=state.top_p.at[slot].set(top_p),
                       keys=state.keys.at[slot].set(keys), steps=state.steps.at[slot].set(0))


def _step(model, state: DecodeState, live: jax.Array, attn_impl: str) -> tuple[DecodeState, jax.Array]:
    """Feed every slot's token (`runtime.decode_fn`, LoRA per slot) and draw the live ones' next."""
    logits, cache = runtime.decode_fn(model, state.tokens, state.cache, live, lora=state.lora, attn_impl=attn_impl)
    steps = state.steps + live.astype(jnp.int32)
    drawn = sample_rows(logits, _row_keys(state.keys, steps), state.temperature, state.top_p)
    tokens = jnp.where(live, drawn, state.tokens)
    return dataclasses.replace(state, cache=cache, tokens=tokens, steps=steps), tokens


def reads_rows_in_place(attn_impl: str, dtype: jnp.dtype) -> bool:
    """Whether a step over a state's first rows reads and writes their cache where it lies: the
    "cpu" kernels' decode step (`dispatch.cpu_decode_step`), where cutting the rows out would copy
    every layer's slice of them and add nothing."""
    return attn_impl == "cpu" and cpu_decode_step(dtype, 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "attn_impl", "rows", "cols"), donate_argnames=("state",))
def generate(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, live: jax.Array, *,
             attn_impl: str = "xla", rows: int | None = None, cols: int | None = None
             ) -> tuple[DecodeState, jax.Array]:
    """One decode step of every live slot (MaxEngine's generate): feed each slot's token
    (`runtime.decode_fn`, LoRA per slot), draw the next one with the slot's own sampling and key.
    Slots with live=False are left unchanged. Returns the new state and the drawn tokens [N].

    rows: step only slots [0, rows) (every live slot must be among them; None: all N). The decode
    attention reads every row's whole cache, so a lone request in an N-slot state would pay for N
    rows: here the first `rows` rows are cut out (one copy of their cache), stepped, and only what
    the step changed is written back: each row's new key/value at the slot it wrote, its mask,
    counters and token. Free slots past `rows` are not touched (the full step would only write
    their unused next slot, which stays invalid). Where `reads_rows_in_place` (the "cpu" kernels),
    nothing is cut: the step reads those rows of the stacked cache and writes their new key/value
    in place, and only the rows' masks and counters are cut and written back.

    cols: read only cache slots [0, cols) of those rows (every live row's next write slot `end`
    must be below it; None: all C). The step of a row attends to its valid slots, all below its
    end, so the slots past every live row's end are only read to be masked out; a step over a
    few short requests in wide slots then reads their length, not the slot width."""
    model = nnx.merge(graphdef, params)
    c = state.cache
    rows = state.num_slots if rows is None else min(rows, state.num_slots)
    cols = c.num_slots if cols is None else min(cols, c.num_slots)
    if rows == state.num_slots and cols == c.num_slots:
        return _step(model, state, live, attn_impl)
    in_place = reads_rows_in_place(attn_impl, c.k.dtype)
    if in_place:  # the kernels read rows [0, rows) of the stacked cache where they lie, and write there
        head = KVCache(k=c.k, v=c.v, valid=c.valid[:rows, :cols], end=c.end[:rows], next_pos=c.next_pos[:rows])
    else:
        head = KVCache(k=c.k[:, :rows, :cols], v=c.v[:, :rows, :cols], valid=c.valid[:rows, :cols], end=c.end[:rows],
                       next_pos=c.next_pos[:rows])
    sub, drawn = _step(model, DecodeState(cache=head, tokens=state.tokens[:rows], lora=state.lora[:rows],
                                          temperature=state.temperature[:rows], top_p=state.top_p[:rows],
                                          keys=state.keys[:rows], steps=state.steps[:rows]),
                       live[:rows], attn_impl)
    slot = jnp.clip(head.end, 0, cols - 1)[:, None]  # where the step wrote (kv_cache.write_layers, T = 1)
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]

    def put(buf: jax.Array, new: jax.Array) -> jax.Array:
        written = jnp.take_along_axis(new, slot[None, :, :, None, None], axis=2)  # [L, rows, 1, Hkv, D]
        return buf.at[:, row, slot].set(written, unique_indices=True)

    k, v = (sub.cache.k, sub.cache.v) if in_place else (put(c.k, sub.cache.k), put(c.v, sub.cache.v))
    cache = KVCache(k=k, v=v, valid=c.valid.at[:rows, :cols].set(sub.cache.valid),
                    end=c.end.at[:rows].set(sub.cache.end), next_pos=c.next_pos.at[:rows].set(sub.cache.next_pos))
    tokens = state.tokens.at[:rows].set(drawn)
    return dataclasses.replace(state, cache=cache, tokens=tokens, steps=state.steps.at[:rows].set(sub.steps)), tokens


@functools.partial(jax.jit, static_argnames=("branch_slots",))
def hand_over_slot(cache: KVCache, slot: jax.Array, kept_start: jax.Array, kept_len: jax.Array, offset: jax.Array,
                   *, branch_slots: int) -> BranchCaches:
    """Decode slot `slot`'s kept span [kept_start, + kept_len) as one branch (`core.extract`),
    its keys still at the worker's positions (offset P: re-encoded when a synthesis prepares it)."""
    row = KVCache(*(jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=1 if x.ndim == 5 else 0)
                    for x in (cache.k, cache.v, cache.valid, cache.end, cache.next_pos)))
    return core.extract(row, kept_start[None], kept_len[None], offset[None], num_requests=1, branch_slots=branch_slots)


def stack_branches(branches: Sequence[BranchCaches]) -> BranchCaches:
    """K single branches ([L, 1, 1, Lb_i, ...] each) as one request of K branches, padded to the
    widest Lb (padding is masked by the lengths), in the order given."""
    width = max(b.branch_slots for b in branches)

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[3])] + [(0, 0)] * (x.ndim - 4))

    return BranchCaches(k=jnp.concatenate([pad(b.k) for b in branches], axis=2),
                        v=jnp.concatenate([pad(b.v) for b in branches], axis=2),
                        lengths=jnp.concatenate([b.lengths for b in branches], axis=1),
                        offsets=jnp.concatenate([b.offsets for b in branches], axis=1))


# ------------------------------------------------------------------------------- the engine
class Engine:
    """Prefill / insert / generate around one synthesizer (`ParallelSynthesis`: backbone with its
    LoRA, mapper, handoff, mesh), N decode slots of `max_context` cache slots each."""

    def __init__(self, synth: ParallelSynthesis, *, slots: int, max_context: int):
        if slots < 1:
            raise ValueError(f"need at least one decode slot, got {slots}")
        if synth.zero_copy:
            raise ValueError("the engine serves the materialised cache path: build the synthesizer with zero_copy=False")
        limit = synth.cfg.max_position_embeddings
        if not 0 < max_context <= limit or max_context % 64:
            raise ValueError(f"max_context must be a multiple of 64 in (0, {limit}] (the model's positions), "
                             f"got {max_context}")
        self.synth = synth
        self.slots = slots
        self.max_context = max_context
        self._handoffs: dict[Handoff, ParallelSynthesis] = {synth.handoff: synth}

    @property
    def cfg(self):
        return self.synth.cfg

    @property
    def has_lora(self) -> bool:
        return self.synth.model.lora is not None

    def mesh(self):
        """The context every device call runs in (the synthesizer's mesh; nothing on one device)."""
        return self.synth.gen.mesh_context()

    def init_decode_state(self) -> DecodeState:
        """N empty slots (MaxEngine's init_decode_state), laid out by the model's sharding rules."""
        m, n = self.synth.model, self.slots
        with self.mesh():
            cache = _empty_cache(m.graphdef, m.state, n, self.max_context)
        put = self.synth.gen.put_batch
        return DecodeState(cache=cache, tokens=put(np.zeros(n, np.int32)), lora=put(np.zeros(n, bool)),
                           temperature=put(np.zeros(n, np.float32)), top_p=put(np.ones(n, np.float32)),
                           keys=put(np.zeros((n,) + _key_data(0).shape, np.uint32)), steps=put(np.zeros(n, np.int32)))

    # --------------------------------------------------------------------- prefill
    def prefill(self, prompt: Sequence[int], sampling: RowSampling, *, lora: bool = False) -> Prefix:
        """A worker or chat prompt from an empty cache (`runtime.prefill`), its first token drawn."""
        m = self.synth.model
        tokens, lengths, width = self._prompt(prompt)
        with self.mesh():
            logits, cache = runtime.prefill(m.graphdef, m.state, tokens, lengths, num_slots=width, lora=lora,
                                            attn_impl=self.synth.attn_impl)
            return Prefix(cache, self._first(logits, sampling))

    def prefill_synthesis(self, prompt: Sequence[int], branches: BranchCaches, sampling: RowSampling, *,
                          max_tokens: int) -> Prefix:
        """The synthesizer prompt over K branch caches (one request), LoRA on when the model has one:
        the core's preparation (re-encode by -P_i, map, assemble) and cache prefill, with the same
        shapes `ParallelSynthesis.cache_steps` gives them (room for `max_tokens` after the prompt)."""
        s, m = self.synth, self.synth.model
        tokens, lengths, width = self._prompt(prompt)
        with self.mesh():
            cache, view = core.jit_prepare(branches, s.mapper_def, s.mapper_state, cfg=s.cfg,
                                           extra_slots=bucket(width + max_tokens))
            logits, cache = core.jit_cache_prefill(m.graphdef, m.state, tokens, lengths, cache, lora=self.has_lora,
                                                   attn_impl=s.attn_impl, view=view)
            return Prefix(cache, self._first(logits, sampling))

    def synthesis_slots(self, branch_slots: int, num_branches: int, prompt_len: int, max_tokens: int) -> int:
        """Cache slots a synthesis prefix takes: K padded branches + the prompt's bucket with its room."""
        return num_branches * branch_slots + bucket(bucket(prompt_len) + max_tokens)

    # ------------------------------------------------------------ insert, generate
    def insert(self, prefix: Prefix, state: DecodeState, slot: int, sampling: RowSampling, *, lora: bool
               ) -> DecodeState:
        """`prefix` into free slot `slot` (the state is donated: use the returned one)."""
        with self.mesh():
            return insert(prefix, state, jnp.int32(slot), jnp.bool_(lora and self.has_lora),
                          jnp.float32(sampling.temperature), jnp.float32(sampling.top_p),
                          jnp.asarray(_key_data(sampling.seed)))

    def generate(self, state: DecodeState, live: np.ndarray) -> tuple[DecodeState, jax.Array]:
        """One decode step of the slots where `live` [N] is True (the state is donated), over the
        smallest power-of-two prefix of slots holding every live one (`step_rows`) and, where
        `narrows_cols`, the narrowest cache width holding every live one's context (`step_cols`)."""
        m = self.synth.model
        live = np.asarray(live, bool)
        rows = self.step_rows(live)
        cols = self.step_cols(self.fetch(state.cache.end), live) if self.narrows_cols(rows) else None
        with self.mesh():
            return generate(m.graphdef, m.state, state, self.synth.gen.put_batch(live),
                            attn_impl=self.synth.attn_impl, rows=rows, cols=cols)

    def narrows_cols(self, rows: int | None) -> bool:
        """Whether a step over `rows` slots (None: all) cuts their cache to `step_cols` slots: on one
        device, with an attention that reads every slot of a row (xla), or when the rows are cut
        anyway (a copy is made: the narrower the better). Not on a mesh, and not under "cpu"
        where its kernels read each row's slots in place up to its end (`reads_rows_in_place`):
        there the cut would only add a copy of the cache (and its write-back) to the step."""
        if self.synth.model.mesh is not None:
            return False
        return self.synth.attn_impl != "cpu" or (rows is not None and not self.reads_rows_in_place())

    def reads_rows_in_place(self) -> bool:
        """Whether a narrowed step reads its rows of the cache where they lie (`reads_rows_in_place`)."""
        return reads_rows_in_place(self.synth.attn_impl, jnp.dtype(self.synth.model.dtype_name))

    def col_buckets(self) -> list[int]:
        """The cache widths a step may read: C/8, C/4, C/2 (those that are multiples of 64) and C,
        few enough that `warm_up` compiles each with every row count."""
        c = self.max_context
        return sorted({c // f for f in (8, 4, 2) if (c // f) % 64 == 0 and c // f > 0} | {c})

    def step_cols(self, ends: np.ndarray, live: np.ndarray) -> int | None:
        """The narrowest `col_buckets` width above every live slot's next write slot `ends` [N]
        (None: all C). The step reads only those cache slots of each row (`generate`'s cols)."""
        need = int(np.max(ends[live])) + 1 if live.any() else 1
        cols = next((w for w in self.col_buckets() if w >= need), self.max_context)
        return None if cols >= self.max_context else cols

    def step_rows(self, live: np.ndarray) -> int | None:
        """The slots a step runs over: the power of two (at most N) covering the last live slot, so
        that a lone request's step reads its own cache, not N rows' (the scheduler fills the lowest
        free slot first). None (all N) on a mesh, whose slots are split over devices."""
        if self.synth.model.mesh is not None:
            return None
        top = int(np.flatnonzero(live)[-1]) + 1 if live.any() else 1
        rows = 1 << (top - 1).bit_length()
        return None if rows >= self.slots else rows

    def warm_up(self, state: DecodeState) -> DecodeState:
        """Compile every step `step_rows` and `step_cols` can pick (1, 2, 4, ... slots, then all N;
        each width of `col_buckets`) by running each
        once with no slot live, so that no request waits for a compile once serving; returns the
        state (no valid slot, counter or token changed)."""
        m = self.synth.model
        idle = self.synth.gen.put_batch(np.zeros(self.slots, bool))
        rows_options = dict.fromkeys(self.step_rows(np.arange(self.slots) == last) for last in range(self.slots))
        widths = [None if w >= self.max_context else w for w in self.col_buckets()]
        for rows in rows_options:
            for cols in widths if self.narrows_cols(rows) else [None]:
                with self.mesh():
                    state, _ = generate(m.graphdef, m.state, state, idle, attn_impl=self.synth.attn_impl, rows=rows,
                                        cols=cols)
        return state

    # ------------------------------------------------------------------- branches
    def hand_over(self, state: DecodeState, slot: int, prompt_len: int, output_len: int, stopped: bool,
                  handoff: Handoff) -> BranchCaches:
        """A finished worker's branch: the span of slot `slot` its handoff convention keeps."""
        start, kept = handoff.kept_span(np.asarray([prompt_len], np.int32), np.asarray([output_len], np.int32),
                                        np.asarray([stopped]))
        with self.mesh():
            return hand_over_slot(state.cache, jnp.int32(slot), jnp.int32(start[0]), jnp.int32(kept[0]),
                                  jnp.int32(prompt_len), branch_slots=bucket(max(int(kept[0]), 1)))

    def branch_from_tokens(self, prompt: Sequence[int], output: Sequence[int], handoff: Handoff,
                           stopped: bool = True) -> BranchCaches:
        """A branch given as tokens ([worker prompt | output]), prefilled as the worker would hold it
        (`ParallelSynthesis.branches_from_tokens` under `handoff`)."""
        return self.synthesizer(handoff).branches_from_tokens([[list(prompt)]], [[list(output)]], [[stopped]])

    def synthesizer(self, handoff: Handoff) -> ParallelSynthesis:
        """The synthesizer under `handoff` (the served one, or a variant sharing its arrays)."""
        if handoff not in self._handoffs:
            self._handoffs[handoff] = dataclasses.replace(self.synth, handoff=handoff)
        return self._handoffs[handoff]

    def fetch(self, x: jax.Array) -> np.ndarray:
        """A device array's values on this host."""
        return distributed.fetch(x)

    # --------------------------------------------------------------------- helpers
    def _prompt(self, prompt: Sequence[int]) -> tuple[jax.Array, jax.Array, int]:
        width = bucket(len(prompt))
        tokens, lengths = pad_batch([list(prompt)], width)
        put = self.synth.gen.put_batch
        return put(tokens), put(lengths), width

    def _first(self, logits: jax.Array, sampling: RowSampling) -> jax.Array:
        return first_token(logits, jnp.asarray(_key_data(sampling.seed)[None]), jnp.full((1,), sampling.temperature, jnp.float32),
                           jnp.full((1,), sampling.top_p, jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "slots"))
def _empty_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, slots: int) -> KVCache:
    """The decode state's cache, made on the devices in its sharded layout (`Decoder.empty_cache`)."""
    return nnx.merge(graphdef, params).empty_cache(batch, slots)


def _key_data(seed: int) -> np.ndarray:
    """The raw uint32 data of jax.random.key(seed) (what a DecodeState row keeps); any integer seed,
    taken modulo 2**32."""
    return np.asarray(jax.random.key_data(jax.random.key(seed % 2**32)), np.uint32)
