"""Flax NNX decoder-only transformer for Llama, Qwen2/2.5 and Qwen3.

Layers are stacked (parameters carry a leading layer axis) and applied with `jax.lax.scan`, so
compile time does not grow with depth. The forward pass writes the new tokens' keys/values into
the caller's `KVCache` and attends over it with the slot rule of kv_cache.py; that one mechanism
serves prompts, decode steps and the synthesizer's [branch caches | prompt] layout.

LoRA adapters (`LoRAParam`) live inside the projections they adapt and are applied only when a
call passes `lora=True`: the worker (LoRA off) and the synthesizer (LoRA on) share one set of
backbone weights without copying them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kernels import cpu
from psynth_jax.model.kernels.dispatch import attend, cpu_weights_in_place
from psynth_jax.model.kernels.view import view_block
from psynth_jax.model.kv_cache import AttentionMask, BranchView, KVCache, LayerView, write_layers, write_rows
from psynth_jax.model.rope import apply_rope, inverse_frequencies
from psynth_jax.model.sharding import CACHE_AXES, Rules, constrain

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
Output = Literal["all", "last", "hidden"]


class LoRAParam(nnx.Param):
    """A trainable low-rank adapter weight (kept apart from the frozen backbone `nnx.Param`s)."""


def param(value: jax.Array, names: tuple[str, ...], kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A parameter carrying its logical axis names (model/sharding.py maps them to the mesh).

    eager_sharding=False: the names are metadata only; placement is decided by the loader.
    """
    return kind(value, out_sharding=names, eager_sharding=False)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the synthesizer: W' = W + (alpha / rank) A B, with B = 0 at init."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; choose from {LORA_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Linear(nnx.Module):
    """y = x W (+ b) (+ scale * (x A) B when LoRA is attached and enabled). W is [in, out].

    names: the logical axes of W's (in, out) dimensions. LoRA factors get their own names
    ("lora_in", "lora_rank", "lora_out"; replicated by default: they are small and trained).
    """

    def __init__(self, d_in: int, d_out: int, *, names: tuple[str, str], bias: bool, lora: LoRAConfig | None,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = param(init(rngs.params(), (d_in, d_out), dtype), names)
        self.bias = param(jnp.zeros((d_out,), dtype), names[1:]) if bias else None
        if lora is not None:  # adapters stay float32 (optimizer precision); cast at use
            a_init = nnx.initializers.he_uniform()
            self.lora_a = param(a_init(rngs.params(), (d_in, lora.rank), jnp.float32), ("lora_in", "lora_rank"), LoRAParam)
            self.lora_b = param(jnp.zeros((lora.rank, d_out), jnp.float32), ("lora_rank", "lora_out"), LoRAParam)
            self.lora_scale = lora.scale
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array, lora: bool | jax.Array, product: jax.Array | None = None,
                 lora_product: jax.Array | None = None) -> jax.Array:
        """x [B, ..., in]; lora: on or off for every row, or a [B] bool array choosing per row (a
        serving batch decodes workers, LoRA off, beside synthesizers, LoRA on). product: x W
        already computed, lora_product: (x A) B already computed (the "cpu" path's kernels, which
        read W, A and B in place from the layers' stacks instead of the scan's copies of them, for
        several projections of one input at once)."""
        y = x @ self.kernel[...] if product is None else product
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is None or lora is False:
            return y
        if lora_product is None:
            a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
            lora_product = (x @ a) @ b
        delta = lora_product * jnp.asarray(self.lora_scale, x.dtype)
        if lora is True:
            return y + delta
        return y + jnp.where(jnp.reshape(lora, (-1,) + (1,) * (x.ndim - 1)), delta, jnp.zeros((), x.dtype))


class RMSNorm(nnx.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.scale = param(jnp.ones((dim,), dtype), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # a Block's Linear layers


class Block(nnx.Module):
    """One pre-norm decoder layer: GQA attention with RoPE, then a SwiGLU MLP.

    Reads its layer of the cache as it was before this chunk and returns (x, the chunk's keys,
    its values); the Decoder writes them into the cache after the layer scan.
    """

    def __init__(self, cfg: ModelConfig, lora: LoRAConfig | None, dtype: jnp.dtype, rngs: nnx.Rngs):
        def lin(d_in, d_out, name, names, bias=False):
            use = lora if (lora is not None and name in lora.targets) else None
            return Linear(d_in, d_out, names=names, bias=bias, lora=use, dtype=dtype, rngs=rngs)

        d, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.q = lin(d, cfg.num_heads * hd, "q", ("embed", "heads"), cfg.attention_bias)
        self.k = lin(d, cfg.num_kv_heads * hd, "k", ("embed", "kv_heads"), cfg.attention_bias)
        self.v = lin(d, cfg.num_kv_heads * hd, "v", ("embed", "kv_heads"), cfg.attention_bias)
        self.o = lin(cfg.num_heads * hd, d, "o", ("heads", "embed"), cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.gate = lin(d, cfg.intermediate_size, "gate", ("embed", "mlp"))
        self.up = lin(d, cfg.intermediate_size, "up", ("embed", "mlp"))
        self.down = lin(cfg.intermediate_size, d, "down", ("mlp", "embed"))
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd

    def __call__(self, x, k_cache, v_cache, positions, write_start, chunk_len, mask: AttentionMask, inv_freq,
                 *, lora: bool | jax.Array, attn_impl: str, stacked=None, view: LayerView | None = None,
                 weights: dict[str, jax.Array] | None = None):
        """weights: the projections' kernels stacked over the layers, by name ("q", ..., "down"),
        and their LoRA factors ("q/lora_a", "q/lora_b", ...) where attached, which they then read
        in place at this layer (`stacked`'s index): the "cpu" path."""
        b, t, _ = x.shape

        def products(inp: jax.Array, *names: str) -> list[tuple[jax.Array | None, jax.Array | None]]:
            """(inp W, (inp A) B) for each named projection, reading the stacks in place ("cpu"):
            every W and A of this input in one kernel call, then each B; Nones where the
            projections compute their own (and for (inp A) B where the LoRA is off or absent)."""
            if weights is None:
                return [(None, None)] * len(names)
            adapted = [n for n in names if lora is not False and f"{n}/lora_a" in weights]
            outs = cpu.stacked_matmuls(inp, tuple(weights[n] for n in names) +
                                       tuple(weights[f"{n}/lora_a"] for n in adapted), stacked[2])
            low = dict(zip(adapted, outs[len(names):]))
            return [(xw, cpu.stacked_matmul(low[n], weights[f"{n}/lora_b"], stacked[2]) if n in low else None)
                    for n, xw in zip(names, outs)]

        h = self.attn_norm(x)
        pq, pk, pv = products(h, "q", "k", "v")
        q = self.q(h, lora, *pq).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k(h, lora, *pk).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v(h, lora, *pv).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre = q
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        branches = None if view is None else view_block(view, q_pre, q, positions, inv_freq)
        a = attend(q, k_cache, v_cache, mask, impl=attn_impl, chunk=(k, v, write_start, chunk_len), stacked=stacked,
                   view=branches)
        a = a.reshape(b, t, -1)
        x = x + self.o(a, lora, *products(a, "o")[0])
        h = self.mlp_norm(x)
        pg, pu = products(h, "gate", "up")
        gate, up = self.gate(h, lora, *pg), self.up(h, lora, *pu)
        act = jax.nn.silu(gate) * up
        x = x + self.down(act, lora, *products(act, "down")[0])
        return x, k, v


class Decoder(nnx.Module):
    """Token embedding, `num_layers` stacked Blocks, final norm and LM head.

    rules: the logical-axis sharding rules (model/sharding.py) this model's parameters, caches
    and activations follow when it runs under a mesh (`jax.set_mesh`); static, so a jitted
    function is traced once per rules table.
    """

    def __init__(self, cfg: ModelConfig, *, lora: LoRAConfig | None = None,
                 dtype: jnp.dtype = jnp.float32, rules: Rules | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.lora_config = lora
        self.dtype = dtype
        self.rules = rules if rules is not None else Rules()
        init = nnx.initializers.normal(0.02)
        self.embed = param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype), ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> Block:
            return Block(cfg, lora, dtype, r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype), ("embed", "vocab"))

    def empty_cache(self, batch: int, slots: int) -> KVCache:
        """A zeroed KVCache for this model, laid out by the sharding rules under a context mesh."""
        return self.shard_cache(KVCache.zeros(self.cfg, batch, slots, self.dtype))

    def shard_cache(self, cache: KVCache) -> KVCache:
        """Constrain a cache to its logical layout (batch over data, KV heads over tensor)."""
        rules = self.rules
        return KVCache(k=constrain(cache.k, CACHE_AXES, rules), v=constrain(cache.v, CACHE_AXES, rules),
                       valid=constrain(cache.valid, ("batch", "cache_slots"), rules),
                       end=constrain(cache.end, ("batch",), rules), next_pos=constrain(cache.next_pos, ("batch",), rules))

    def head_weight(self) -> jax.Array:
        """The LM head [D, V], gathered over the embed axis (vocab stays on its rule's mesh axes).

        For callers that project several chunks: they gather it once and pass it to `logits`, where
        each chunk's own projection would all-gather an FSDP-sharded head again, with every copy live
        at once (measured by `psynth plan`: one head per chunk)."""
        return constrain(self._head(), (None, "vocab"), self.rules)

    def _head(self) -> jax.Array:
        """The LM head [D, V] as stored: the tied embedding transposed, or its own matrix."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, h: jax.Array, head: jax.Array | None = None, *, attn_impl: str = "xla") -> jax.Array:
        """Final-norm hidden states -> float32 logits (`head`: a `head_weight()` already gathered).
        Under "cpu" (float32 on one device) a kernel reads the head where it lies: XLA:CPU would
        transpose the tied embedding into a copy at every call (kernels/cpu.py)."""
        if head is None and attn_impl == "cpu" and cpu_weights_in_place(h.dtype):
            stored = self.embed[...] if self.lm_head is None else self.lm_head[...]
            if stored.dtype == jnp.float32:
                if self.lm_head is None:
                    return cpu.rows_matmul(h, stored)
                return cpu.stacked_matmul(h, stored[None], jnp.int32(0))
        w = self._head() if head is None else head
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        cache: KVCache,
        token_valid: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        lora: bool | jax.Array = False,
        attn_impl: str = "xla",
        output: Output = "all",
        visibility: jax.Array | None = None,
        remat: bool = False,
        view: BranchView | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Run `tokens` [B, T] after what `cache` holds; return (outputs, updated cache).

        token_valid [B, T]: False marks right-padding (not attended to, does not advance the
        row). positions [B, T]: RoPE positions, default `cache.next_pos + arange(T)`.
        lora: the LoRA on or off for every row, or a [B] bool array (per row: a serving batch).
        output: "all" -> logits [B, T, V]; "last" -> logits of each row's last valid token
        [B, V]; "hidden" -> final-norm hidden states [B, T, D].
        visibility [B, T, S]: an explicit attention mask replacing the slot rule (reference
        layouts in tests; XLA attention only). remat: recompute each layer's activations in
        the backward pass instead of storing them (training memory).
        """
        b, t = tokens.shape
        if token_valid is None:
            token_valid = jnp.ones((b, t), bool)
        steps = jnp.arange(t, dtype=jnp.int32)[None, :]
        if positions is None:
            positions = cache.next_pos[:, None] + steps
        start = cache.end
        kv_valid = write_rows(cache.valid, token_valid, start)
        mask = AttentionMask(q_slots=start[:, None] + steps, kv_valid=kv_valid, explicit=visibility)
        inv_freq = jnp.asarray(inverse_frequencies(self.cfg))
        x = constrain(jnp.take(self.embed[...], tokens, axis=0), ("batch", "seq", None), self.rules)

        layer_def, layer_state = nnx.split(self.layers)
        n = token_valid.sum(axis=1).astype(jnp.int32)

        # The attention reads each layer's cache tiles from the whole stack (no gradient through
        # it); the scan's per-layer slices k_c/v_c carry the gradient and are dropped by XLA
        # where nothing reads them (a loop over a slice would copy it; kernels/xla.py).
        stacked_k, stacked_v = jax.lax.stop_gradient(cache.k), jax.lax.stop_gradient(cache.v)

        view_xs = () if view is None else view.layer_arrays()
        # Under "cpu" the layers' matrices (and LoRA factors) are read from their stacks in place
        # (kernels/cpu.py); the scan's slices of them are then unused and XLA drops them
        weights = None
        if attn_impl == "cpu" and cpu_weights_in_place(x.dtype):
            weights = {name: layer_state[name]["kernel"][...] for name in PROJECTIONS}
            for name in PROJECTIONS:
                if "lora_a" in layer_state[name]:
                    weights[f"{name}/lora_a"] = layer_state[name]["lora_a"][...]
                    weights[f"{name}/lora_b"] = layer_state[name]["lora_b"][...]
            if any(w.dtype != jnp.float32 for w in weights.values()):
                weights = None

        def body(x, xs):
            state, k_c, v_c, layer, *view_layer = xs
            block = nnx.merge(layer_def, state)
            layer_view = None
            if view is not None:
                vk, vv, ks, kb, vs, vb = view_layer
                layer_view = LayerView(vk, vv, view.k, view.v, layer, view.starts, view.lengths, view.offsets,
                                       ks, kb, vs, vb)
            x, k, v = block(x, k_c, v_c, positions, start, n, mask, inv_freq, lora=lora, attn_impl=attn_impl,
                            stacked=(stacked_k, stacked_v, layer), view=layer_view, weights=weights)
            return x, (k, v)

        if remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        # The layers read the cache as it was and return only the chunk's keys/values, which are
        # written into every layer at once afterwards (in place when the cache is donated or a
        # loop carry): no layer's cache is copied; a decode step writes O(new tokens) bytes.
        layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        x, (k_chunk, v_chunk) = jax.lax.scan(body, x, (layer_state, cache.k, cache.v, layers, *view_xs))
        new_cache = self.shard_cache(KVCache(k=write_layers(cache.k, k_chunk, start), v=write_layers(cache.v, v_chunk, start),
                                             valid=kv_valid, end=start + n, next_pos=cache.next_pos + n))
        h = self.norm(x)
        if output == "hidden":
            return h, new_cache
        if output == "last":
            h = jnp.take_along_axis(h, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
        return self.logits(h, attn_impl=attn_impl), new_cache
