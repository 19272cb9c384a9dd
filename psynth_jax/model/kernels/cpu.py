"""The "cpu" attention: XLA's everywhere, except a decode step's reads of the stacked cache and every
float32 forward's reads of the stacked layer weights and the LM head, which XLA FFI kernels of ours
(cpu_decode.cc, cpu_matmul.cc) do in place.

Why: in the layer scan XLA:CPU copies each layer's keys and values out of the stacked
[L, B, S, Hkv, D] cache before its matmuls read them, and at 16 decode slots those copies plus
the block-diagonal matmuls of `xla.decode_attention` were most of a serving step
(docs/PERFORMANCE.md, issue #27). The kernel takes the whole stack and the layer index, reads
each row's visible slots once in 256-slot chunks (every head of a chunk together, chunks spread
over the threads and merged in order), and returns softmax statistics (sum of exp-weighted
values, max, sum of exps) that are merged here with the step's own key and value, exactly as the
flash tiles merge their blocks. The attention of prefill, extend, branch views and explicit masks
is XLA's, as is any dtype other than float32.

The same holds for the weights: the scan slices each layer's [K, N] matrices out of the stacked
parameters and XLA:CPU copies every slice before its dot reads it, which at a decode step's few
rows costs more than the dot (issue #27). Under "cpu" a Block computes its projections' products
with `stacked_matmuls`, which reads the layer's matrices where they lie, those of one input in one
call (q, k, v and their LoRA factors A; gate, up), then (x A) B from B's stack: a streaming
schedule for one or two rows, register tiles for more (a batched step, a prefill). The LM head
calls `rows_matmul` (the tied embedding, which XLA would transpose into a copy) or
`stacked_matmul` (an untied head). Both have XLA's backward pass.

The kernels are C++, one library built on first use with the host's C++ compiler (`$CXX`, else
c++ / g++) against jaxlib's FFI headers, for this CPU (-march=native), into a cache directory
(`$PSYNTH_KERNEL_CACHE`, default ~/.cache/psynth_jax/kernels) keyed by the source, jaxlib's
version, the compiler and the CPU's flags; the build is written under a temporary name and renamed,
so concurrent processes never load a half-written library. Without a compiler `attn_impl="cpu"`
fails with a message that says so; nothing else needs it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from psynth_jax.model.kernels.flash import FLOOR
from psynth_jax.model.kernels.xla import split_slots

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_decode.cc", "cpu_matmul.cc"))
# included by the sources: part of the build's key
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_pool.h", "cpu_vec.h"))
TARGETS = {"psynth_decode_attention": "PsynthDecodeAttention", "psynth_stacked_matmuls": "PsynthStackedMatmuls",
           "psynth_rows_matmul": "PsynthRowsMatmul"}


class KernelUnavailable(RuntimeError):
    """The CPU decode kernel cannot be built or loaded here (the message says why)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise KernelUnavailable("attention 'cpu' builds a C++ kernel on first use and found no C++ compiler "
                                "(set $CXX or install g++); use attn_impl='xla' instead")
    return cxx


def build(cache_dir: Path | None = None) -> Path:
    """The kernels' shared library, compiled now unless the cache already holds this build."""
    cxx = _compiler()
    flags = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir(),
             "-I", str(SOURCES[0].parent)]
    parts = [*(f.read_bytes() for f in (*SOURCES, *HEADERS)), jax.__version__.encode(), cxx.encode(),
             " ".join(flags).encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("PSYNTH_KERNEL_CACHE") or Path.home() / ".cache" / "psynth_jax" / "kernels")
    lib = root / f"psynth_cpu-{key}.so"
    if lib.exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.name, dir=root)
    os.close(fd)
    try:
        try:
            run = subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                 timeout=300)
        except OSError as err:
            raise KernelUnavailable(f"attention 'cpu': cannot run the C++ compiler {cxx}: {err}") from None
        if run.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise KernelUnavailable(f"attention 'cpu': compiling {names} with {cxx} failed:\n{run.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


@functools.cache
def _register() -> None:
    library = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


def available() -> bool:
    """Whether the kernel builds and loads here (compiles it on the first call)."""
    try:
        _register()
    except (KernelUnavailable, OSError):
        return False
    return True


def stacked_cache_attention(q: jax.Array, k_stack: jax.Array, v_stack: jax.Array, layer: jax.Array,
                            limit: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The kernel: q [B, Hq, D] (scaled) over layer `layer` of k/v [L, B, S, Hkv, D], slots [0, limit)
    of each row where `visible` [B, S] -> (sum of exp-weighted values [B, Hq, D], max [B, Hq], sum of
    exps [B, Hq]); a row that sees nothing has max FLOOR and zero sums."""
    _register()
    b, hq, d = q.shape
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((b, hq, d), f32), jax.ShapeDtypeStruct((b, hq), f32), jax.ShapeDtypeStruct((b, hq), f32))
    call = jax.ffi.ffi_call("psynth_decode_attention", out)
    return call(q.astype(f32), k_stack, v_stack, jnp.reshape(layer, (1,)).astype(jnp.int32), limit.astype(jnp.int32),
                visible)


def decode_attention(q: jax.Array, kv_valid: jax.Array, q_slots: jax.Array, start: jax.Array, k_chunk: jax.Array,
                     v_chunk: jax.Array, stacked: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """One decode step's attention [B, 1, Hq, D]: the cache as it was, read in place from `stacked`
    (k_stack, v_stack, layer) by the kernel, merged with the step's own key/value `k_chunk`/`v_chunk`
    [B, 1, Hkv, D]; the masks as `xla.xla_attention` splits them (`split_slots`). A padded row (its
    token not valid: a free decode slot) reads no key and returns zeros, where the XLA path returns
    an attention its caller ignores."""
    k_stack, v_stack, layer = stacked
    b, _, hq, d = q.shape
    hkv = k_chunk.shape[2]
    g = hq // hkv
    f32 = jnp.float32
    (cache_slot, cache_valid), (chunk_slot, chunk_valid) = split_slots(kv_valid, start, 1)
    q_slot = q_slots[:, :1]
    visible = cache_valid & (cache_slot <= q_slot)
    own = (chunk_valid & (chunk_slot <= q_slot))[:, 0]  # [B]: False on a padded row (a free decode slot)
    limit = jnp.where(own, jnp.clip(q_slot[:, 0] + 1, 0, kv_valid.shape[1]), 0)  # a padded row reads nothing
    qs = q[:, 0].astype(f32) * (d**-0.5)  # [B, Hq, D]
    acc, m, total = stacked_cache_attention(qs, k_stack, v_stack, layer, limit, visible)
    score = jnp.einsum("bhgd,bhd->bhg", qs.reshape(b, hkv, g, d), k_chunk[:, 0].astype(f32)).reshape(b, hq)
    top = jnp.maximum(m, jnp.where(own[:, None], score, FLOOR))
    old = jnp.exp(m - top)
    new = jnp.where(own[:, None], jnp.exp(score - top), 0.0)
    value = jnp.repeat(v_chunk[:, 0].astype(f32), g, axis=1)  # [B, Hq, D]: each head's key head
    num = acc * old[..., None] + new[..., None] * value
    den = total * old + new
    out = jnp.where(den[..., None] > 0, num / jnp.maximum(den, 1e-30)[..., None], 0.0)
    return out[:, None].astype(q.dtype)


def stacked_matmul(x: jax.Array, w_stack: jax.Array, layer: jax.Array) -> jax.Array:
    """x [..., K] @ w_stack[layer] for a stacked float32 weight [L, K, N], read in place -> [..., N]."""
    return stacked_matmuls(x, (w_stack,), layer)[0]


@jax.custom_vjp
def stacked_matmuls(x: jax.Array, w_stacks: tuple[jax.Array, ...], layer: jax.Array) -> tuple[jax.Array, ...]:
    """x [..., K] @ w[layer] for each stacked float32 weight w [L, K, N_i], read in place, in one
    kernel call (the projections of one input: q, k, v; gate, up) -> one [..., N_i] per weight.

    Differentiable: the backward pass is XLA's (x's cotangent sum_i g_i @ w_i[layer].T; each w's
    is zero except at `layer`), so a training step may run through it; XLA drops the weights'
    cotangents where nothing asks for them (the base weights are frozen)."""
    _register()
    *lead, k = x.shape
    rows = x.reshape(-1, k).astype(jnp.float32)
    out = tuple(jax.ShapeDtypeStruct((rows.shape[0], w.shape[-1]), jnp.float32) for w in w_stacks)
    ys = jax.ffi.ffi_call("psynth_stacked_matmuls", out)(rows, jnp.reshape(layer, (1,)).astype(jnp.int32), *w_stacks)
    return tuple(y.reshape(*lead, y.shape[-1]).astype(x.dtype) for y in ys)


def _stacked_matmuls_fwd(x, w_stacks, layer):
    return stacked_matmuls(x, w_stacks, layer), (x, w_stacks, layer)


def _stacked_matmuls_bwd(res, gs):
    x, w_stacks, layer = res
    dx = jnp.zeros(x.shape, jnp.float32)
    dws = []
    for w_stack, g in zip(w_stacks, gs):
        w = jax.lax.dynamic_index_in_dim(w_stack, layer, keepdims=False)
        dx = dx + g.astype(jnp.float32) @ w.T.astype(jnp.float32)
        dw = jnp.einsum("...k,...n->kn", x.astype(jnp.float32), g.astype(jnp.float32)).astype(w_stack.dtype)
        dws.append(jax.lax.dynamic_update_index_in_dim(jnp.zeros_like(w_stack), dw, layer, 0))
    return dx.astype(x.dtype), tuple(dws), None


stacked_matmuls.defvjp(_stacked_matmuls_fwd, _stacked_matmuls_bwd)


@jax.custom_vjp
def rows_matmul(x: jax.Array, e: jax.Array) -> jax.Array:
    """x [..., D] @ e.T for a float32 e [V, D] read in place (the tied embedding as the LM head,
    which XLA:CPU would transpose into a copy first) -> [..., V]. Differentiable as XLA's product."""
    _register()
    *lead, d = x.shape
    rows = x.reshape(-1, d).astype(jnp.float32)
    out = jax.ShapeDtypeStruct((rows.shape[0], e.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("psynth_rows_matmul", out)(rows, e).reshape(*lead, e.shape[0])


def _rows_matmul_fwd(x, e):
    return rows_matmul(x, e), (x, e)


def _rows_matmul_bwd(res, g):
    x, e = res
    dx = (g @ e.astype(g.dtype)).astype(x.dtype)
    de = jnp.einsum("...v,...d->vd", g.astype(jnp.float32), x.astype(jnp.float32)).astype(e.dtype)
    return dx, de


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)
