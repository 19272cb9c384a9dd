"""TPU splash attention (jax's Pallas kernel) for the cache layouts of kv_cache.py.

Layout handled (the same as cudnn_split.split_attention): a chunk of T new queries written
at slot `start[b]` of a cache whose valid slots are contiguous sees (a) every cached key before
`start[b]`, unmasked, and (b) its own chunk keys causally, the first `chunk_len[b]` of them valid.

Splash masks are static (shape-level, turned into block-sparsity tables at trace time), so the
per-row parts are expressed with segment ids over ONE kernel call whose keys are the
concatenation [cache slots, padded to S_pad | the chunk's own keys, padded to T_pad]:

- static mask `CausalMask((T_pad, S_pad + T_pad), offset=S_pad)`: query t sees every cache slot
  and chunk keys j <= t ("left block all visible, right block lower-triangular");
- segment ids: every query has id 1; a key has id 1 iff it is a cache slot < start[b] or a chunk
  key j < chunk_len[b], else 0 (cache slots >= start hold the chunk itself, stale or nothing;
  chunk padding; block padding). The kernel ANDs the two.

One call rather than two calls merged by log-sum-exp (like split_attention) because splash's
`save_residuals=True` (needed to get the log-sum-exp) has no VJP ("Higher-order AD not
supported"), and the training objective differentiates through attention; one call keeps
splash's own backward kernels. The price is the copy of the cache into the concatenated,
head-major key/value buffer on every call (an XLA concat + transpose).

Padded query rows (t >= chunk_len[b]) see the same keys the XLA reference shows them (the prefix
plus the valid chunk keys before them), so they match it too; a row that sees no key at all
(start == 0 and chunk_len == 0, a pure padding row) returns a finite but meaningless value (the
kernel's uniform average over masked keys) where the XLA path returns zeros. Callers ignore them.

GQA: `make_splash_mha` takes k/v as [Hkv, L, D] and maps query head h to kv head h // (Hq/Hkv)
itself (no repeated k/v in memory), which is exactly the grouping of xla_attention; MHA is the
case Hq == Hkv. Batch is handled with jax.vmap over the kernel (mask tables are shared).

Interpret mode: on any platform other than TPU the kernel runs in Pallas interpret mode
(`interpret=True`), a slow correctness check for CPU CI, not a fast path. The platform is the
one the traced code will run on (`sharding.target_platform`: the context mesh's devices), not
`jax.default_backend()`: compiled for a TPU topology from a CPU host (`psynth plan`, the Mosaic
lowering test tests/test_tpu_lowering.py) the kernel lowers through Mosaic, as it will run.
Its numerics are checked in interpret mode only; it has not run on TPU hardware here.

Sharding: a Mosaic (TPU) kernel inside a jit whose arrays span several devices is refused at
lowering ("Mosaic kernels cannot be automatically partitioned. Please wrap the call in a
shard_map"). So when a mesh is in context at trace time (`jax.sharding.get_abstract_mesh()`,
set by `jax.set_mesh(mesh)` or `jax.sharding.use_abstract_mesh`; the train and eval steps of
train/step.py enter it while tracing) and it has more than one device on its non-manual axes,
the call runs inside `jax.shard_map` with specs from `shard_specs`: batch over the data-parallel
axes `BATCH_AXES` = (data, fsdp) and heads over `HEAD_AXIS` = tensor (model/sharding.py's
default rules for "batch" and "heads"/"kv_heads"; a config that overrides those rules still
gets these specs, and XLA reshards around the kernel), sequence and head_dim whole. Each shard then runs the kernel on its own rows and heads, which needs nothing
from other shards: a query head and the kv head it reads land on the same shard when Hkv is a
multiple of the tensor size (a ValueError otherwise). A batch the data-parallel axes do not
divide is split over fewer of them (see `shard_specs`). No mesh in context (single-device
inference) or a one-device mesh: the kernel is called directly; so a caller that jits over
several devices itself must enter its mesh (`with jax.set_mesh(mesh):`) or a TPU refuses it as
before. This has been checked only in Pallas interpret mode on 8 fake CPU devices
(tests/test_splash_attention.py: the sharded train step equals the XLA one), never on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from psynth_jax.model.sharding import DEFAULT_RULES, target_platform

LANES = 128  # TPU lane width: splash needs kv blocks (and, in its dkv backward, q blocks) in multiples of it
MAX_BLOCK_Q = 512  # tile caps: 512 x 512 tiles are the usual choice for long sequences on TPU v5
MAX_BLOCK_KV = 512

# Mesh axes q/k/v are sharded over (model/sharding.py's default rules for "batch" and "heads" /
# "kv_heads"); axes of these names that a mesh lacks are skipped.
BATCH_AXES = dict(DEFAULT_RULES)["batch"]
HEAD_AXIS = dict(DEFAULT_RULES)["heads"][0]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class SplashPlan:
    """Static padding and tiling for one (T, S) shape.

    block_q = min(512, T rounded up to 128); T_pad = T rounded up to block_q. Query blocks are
    never below 128 rows because splash's dkv backward kernel with segment ids needs block_q to
    be a multiple of 128; a decode step (T = 1) thus pads its query to 128 rows, which costs the
    MXU nothing extra (it works on 128-row tiles anyway) but adds VPU exp work.
    block_kv = min(512, (S + T_pad) rounded up to 128); the cache part is padded to S_pad so
    that S_pad + T_pad is a multiple of block_kv (one block of padding at most).
    The same tiles are used by the forward, dq and dkv kernels.
    """

    t: int
    s: int
    block_q: int
    block_kv: int
    t_pad: int
    s_pad: int

    @classmethod
    def make(cls, t: int, s: int) -> "SplashPlan":
        block_q = min(MAX_BLOCK_Q, _round_up(t, LANES))
        t_pad = _round_up(t, block_q)
        block_kv = min(MAX_BLOCK_KV, _round_up(s + t_pad, LANES))
        total = _round_up(s + t_pad, block_kv)
        return cls(t=t, s=s, block_q=block_q, block_kv=block_kv, t_pad=t_pad, s_pad=total - t_pad)

    @property
    def kv_len(self) -> int:
        return self.s_pad + self.t_pad

    def block_sizes(self) -> sk.BlockSizes:
        bq, bkv = self.block_q, self.block_kv
        return sk.BlockSizes(
            block_q=bq, block_kv=bkv, block_kv_compute=bkv,
            block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
            block_q_dq=bq, block_kv_dq=bkv,
        )


@functools.lru_cache(maxsize=64)
def _kernel(plan: SplashPlan, num_heads: int, interpret: bool) -> sk.SplashAttentionKernel:
    """The splash kernel for one plan and head count.

    Its block-sparsity tables are computed with numpy and cached per shape. They are built under
    `ensure_compile_time_eval` so they are concrete arrays even when the first call happens
    inside a jit trace (otherwise the cached kernel would hold that trace's tracers).
    """
    causal = sm.CausalMask((plan.t_pad, plan.kv_len), offset=plan.s_pad)
    mask = sm.MultiHeadMask([causal] * num_heads)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            mask, block_sizes=plan.block_sizes(), head_shards=1, q_seq_shards=1, interpret=interpret
        )


def default_interpret() -> bool:
    """Pallas interpret mode unless the traced code runs on TPU (`target_platform`): CPU and GPU
    get the interpreter (a slow correctness check), a TPU mesh gets Mosaic, whatever the host."""
    return target_platform() != "tpu"


def shard_specs(mesh, batch: int, q_heads: int, kv_heads: int) -> tuple[jax.sharding.PartitionSpec, ...]:
    """(rows, per-row) PartitionSpecs for splash under `shard_map` over `mesh`.

    rows: for q/k/v/out [B, n, H, D] -> P(batch axes, None, HEAD_AXIS, None); per-row: for
    start/chunk_len [B] -> P(batch axes). Only axes present in `mesh` and not already manual are
    named. Batch axes: the longest prefix of BATCH_AXES whose size product divides `batch`
    (rows are then replicated over the rest, computed redundantly, as model/sharding.py leaves
    a dimension a mesh axis does not divide unsharded). Heads: sharded over HEAD_AXIS when its
    size is > 1, which needs kv_heads (hence q_heads) divisible by it; ValueError otherwise.
    """
    free = {n: int(sz) for n, sz, t in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
            if t != jax.sharding.AxisType.Manual}
    present = [a for a in BATCH_AXES if a in free]
    while present and batch % int(np.prod([free[a] for a in present])):
        present.pop()
    batch_axes = tuple(present) or None
    head_axis = None
    if free.get(HEAD_AXIS, 1) > 1:
        n = free[HEAD_AXIS]
        if kv_heads % n:
            raise ValueError(
                f"splash attention under a mesh shards heads over {HEAD_AXIS!r} (size {n}): "
                f"kv heads ({kv_heads}) must be divisible by it (query heads: {q_heads}); "
                f"use attn_impl='xla' or a {HEAD_AXIS} size dividing {kv_heads}"
            )
        head_axis = HEAD_AXIS
    P = jax.sharding.PartitionSpec
    return P(batch_axes, None, head_axis, None), P(batch_axes)


def _context_mesh():
    """The mesh in context at trace time if it spans several devices on non-manual axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    free = [sz for sz, t in zip(mesh.axis_sizes, mesh.axis_types) if t != jax.sharding.AxisType.Manual]
    return mesh if int(np.prod(free)) > 1 else None


def splash_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    start: jax.Array,
    chunk_len: jax.Array,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """Splash attention over [cache before `start` | causal chunk].

    q [B,T,Hq,D]; k_cache/v_cache [B,S,Hkv,D] (only slots < start[b] are read as the prefix);
    k_chunk/v_chunk [B,T,Hkv,D]: the chunk's own keys/values; start, chunk_len [B] int.
    Returns [B,T,Hq,D] in q's dtype. The kernel multiplies in the cache's dtype (q is cast to
    it; the chunk keys are cast to it exactly as writing them into the cache does), with
    float32 softmax statistics and accumulation. interpret=None: see `default_interpret`.
    Under a multi-device mesh in context the call is wrapped in `shard_map` (module docstring).
    """
    hq, hkv = q.shape[2], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if interpret is None:
        interpret = default_interpret()
    local = functools.partial(_splash_local, interpret=bool(interpret))
    mesh = _context_mesh()
    if mesh is None:
        return local(q, k_cache, v_cache, k_chunk, v_chunk, start, chunk_len)
    rows, per_row = shard_specs(mesh, q.shape[0], hq, hkv)
    free = frozenset(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Manual)
    # check_vma=False: splash's pallas_calls declare their outputs without the varying-axes
    # type check_vma=True requires (jax refuses them); out_specs are the in_specs of q anyway.
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(rows,) * 5 + (per_row,) * 2, out_specs=rows, axis_names=free,
        check_vma=False,
    )
    return sharded(q, k_cache, v_cache, k_chunk, v_chunk, start, chunk_len)


def _splash_local(q, k_cache, v_cache, k_chunk, v_chunk, start, chunk_len, *, interpret: bool) -> jax.Array:
    """The kernel call on (this shard's) rows and heads; see `splash_attention`."""
    b, t, hq, d = q.shape
    s = k_cache.shape[1]
    plan = SplashPlan.make(t, s)
    kernel = _kernel(plan, hq, interpret)
    dtype = k_cache.dtype

    def head_major(x: jax.Array, length: int) -> jax.Array:  # [B, n, H, D] -> [B, H, length, D]
        x = jnp.pad(x.astype(dtype), ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    qh = head_major(q * jnp.asarray(d**-0.5, q.dtype), plan.t_pad)
    kh = jnp.concatenate([head_major(k_cache, plan.s_pad), head_major(k_chunk, plan.t_pad)], axis=2)
    vh = jnp.concatenate([head_major(v_cache, plan.s_pad), head_major(v_chunk, plan.t_pad)], axis=2)
    seg_kv = jnp.concatenate(
        [
            jnp.arange(plan.s_pad, dtype=jnp.int32)[None, :] < start.astype(jnp.int32)[:, None],
            jnp.arange(plan.t_pad, dtype=jnp.int32)[None, :] < chunk_len.astype(jnp.int32)[:, None],
        ],
        axis=1,
    ).astype(jnp.int32)  # [B, L]
    seg_q = jnp.ones((b, plan.t_pad), jnp.int32)

    def one(qb, kb, vb, sq, skv):
        return kernel(qb, kb, vb, sk.SegmentIds(q=sq, kv=skv))

    out = jax.vmap(one)(qh, kh, vh, seg_q, seg_kv)  # [B, Hq, T_pad, D]
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)
