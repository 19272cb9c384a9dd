"""The "cpu" attention: its C++ decode kernels (kernels/cpu_decode.cc, cpu_matmul.cc) against the
XLA path.

- a decode step through the kernels gives the XLA path's logits and cache (GQA, holes in the
  valid slots, rows of different lengths, a row that sees only its own key, free rows);
- the attention kernel's softmax statistics and the matmul kernel's products equal float64
  references (every row blocking and column tail of the matmul);
- the kernels read layer l of the stacked cache and of the stacked weights in place: the
  compiled step makes no layer-sized copy of either (the XLA path's dynamic-slices);
- prefill and extend under "cpu" read the weights in place too (projections and LM head) and
  equal the XLA path;
- the serving engine decodes the same greedy tokens with it;
- without a C++ compiler the build fails with a message that says so, and the CLI refuses
  --attn-impl cpu before loading anything.
"""

from __future__ import annotations

import dataclasses
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.inference import runtime
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.kernels import cpu
from psynth_jax.model.kv_cache import KVCache
from psynth_jax.model.loaded import random_model
from psynth_jax.model.transformer import LoRAConfig

if not cpu.available():  # pragma: no cover - every CI machine has g++
    pytest.skip("no C++ compiler to build the CPU decode kernel", allow_module_level=True)

CFG = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=3, num_heads=6,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=2048)


def filled_cache(cfg: ModelConfig, rows: int, slots: int, seed: int = 0) -> KVCache:
    """Random keys/values; row i holds end[i] slots with a few holes (invalid slots inside)."""
    rng = np.random.default_rng(seed)
    shape = (cfg.num_layers, rows, slots, cfg.num_kv_heads, cfg.head_dim)
    end = rng.integers(1, slots - 4, size=rows)
    end[-1] = 0  # a row whose step sees only its own key
    valid = (np.arange(slots)[None] < end[:, None]) & (rng.random((rows, slots)) > 0.2)
    return KVCache(k=jnp.asarray(rng.normal(size=shape), jnp.float32) * 2,
                   v=jnp.asarray(rng.normal(size=shape), jnp.float32),
                   valid=jnp.asarray(valid), end=jnp.asarray(end, jnp.int32), next_pos=jnp.asarray(end + 5, jnp.int32))


def test_decode_step_equals_the_xla_path():
    m = random_model(CFG, seed=1)
    rows, slots = 5, 96
    cache = filled_cache(CFG, rows, slots)
    tokens = jnp.arange(rows, dtype=jnp.int32) + 3
    live = jnp.asarray([True, True, False, True, True])
    out = {impl: runtime.decode_step(m.graphdef, m.state, tokens, jax.tree.map(jnp.copy, cache), live, attn_impl=impl)
           for impl in ("xla", "cpu")}  # decode_step donates its cache: each call gets its own
    (lx, cx), (lc, cc) = out["xla"], out["cpu"]
    rows = np.asarray(live)  # a free row's logits and unwritten keys are nobody's (zeros here, XLA's garbage there)
    np.testing.assert_allclose(np.asarray(lc)[rows], np.asarray(lx)[rows], atol=1e-5, rtol=1e-5)
    for a, b in ((cc.k, cx.k), (cc.v, cx.v)):
        np.testing.assert_allclose(np.asarray(a)[:, rows], np.asarray(b)[:, rows], atol=1e-5, rtol=1e-5)
    for a, b in ((cc.valid, cx.valid), (cc.end, cx.end), (cc.next_pos, cx.next_pos)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.max(jnp.abs(lx[0] - lx[1]))) > 1e-3  # rows differ: the comparison means something


@pytest.mark.parametrize("s", [40, 700])
@pytest.mark.parametrize("d", [8, 64, 128])
def test_kernel_statistics_equal_a_masked_softmax(s, d):
    """The kernel alone, on layer 1 of a stack: max, sum of exps and weighted values of a masked
    float64 softmax over the visible slots below each row's limit (700 slots: a row's 256-slot
    chunks merged, one of them wholly masked; 40 and 17: a last block of fewer than 16 slots).
    Head sizes 64 and 128 take the vectorised path (16 slots' dot products summed together), 8
    the generic one."""
    rng = np.random.default_rng(3)
    layers, b, hkv, g = 3, 4, 2, 3
    k = rng.normal(size=(layers, b, s, hkv, d)).astype(np.float32) * (8 / d) ** 0.5
    v = rng.normal(size=(layers, b, s, hkv, d)).astype(np.float32)
    q = rng.normal(size=(b, hkv * g, d)).astype(np.float32)
    visible = rng.random((b, s)) > 0.3
    visible[2] = False  # a row that sees nothing
    visible[0, 256:512] = False  # a chunk that sees nothing beside ones that do
    limit = np.asarray([s, 17, s, 0], np.int32)
    acc, m, total = jax.jit(cpu.stacked_cache_attention)(q, k, v, jnp.int32(1), limit, visible)
    again = jax.jit(cpu.stacked_cache_attention)(q, k, v, jnp.int32(1), limit, visible)
    for x, y in zip((acc, m, total), again):  # chunks merged in chunk order: the same bits on every call
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for row in range(b):
        seen = visible[row] & (np.arange(s) < limit[row])
        for h in range(hkv * g):
            kh = k[1, row, :, h // g].astype(np.float64)
            scores = kh @ q[row, h]
            if not seen.any():
                assert float(total[row, h]) == 0.0 and float(m[row, h]) <= -1e29
                assert not np.asarray(acc[row, h]).any()
                continue
            top = scores[seen].max()
            p = np.where(seen, np.exp(scores - top), 0.0)
            np.testing.assert_allclose(float(m[row, h]), top, rtol=1e-5)
            np.testing.assert_allclose(float(total[row, h]), p.sum(), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(acc[row, h]), p @ v[1, row, :, h // g], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows,k", [(1, 37), (2, 37), (3, 37), (7, 37), (50, 37), (1, 582), (2, 582)])
@pytest.mark.parametrize("n", [16, 64, 200, 520])
def test_stacked_matmul_equals_a_float64_product(rows, n, k):
    """Both schedules: 1-2 rows streamed (w's rows in parts: one at K = 37; at K = 582, ten of 60 rows
    on 2 threads, the last 42, no multiple of the sweep's 4 rows; 64-column sweeps plus a tail); 3+
    rows tiled (register tiles of 6 rows plus 1-5 left over, 48-row chunks: 50 = 48 + 2; panels of
    1 vector (n 64, 200) or 4 (520 = 32 vectors + 8), columns beyond the last vector (200, 520), a
    tail alone (16 is one vector, 520's 8)); layer 2 of 3, read in place; leading dimensions kept."""
    rng = np.random.default_rng(rows * 1000 + n + k)
    w = rng.normal(size=(3, k, n)).astype(np.float32)
    x = rng.normal(size=(rows, 1, k)).astype(np.float32)
    y = jax.jit(cpu.stacked_matmul)(x, w, jnp.int32(2))
    assert y.shape == (rows, 1, n) and y.dtype == jnp.float32
    # float32 sums over K terms of size ~1: an absolute error of ~1e-7 K
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w[2].astype(np.float64), rtol=1e-5, atol=2e-7 * k)


@pytest.mark.parametrize("rows", [1, 7])
def test_one_call_of_several_stacked_matmuls_equals_each_product(rows):
    """q, k, v in one call (`stacked_matmuls`, as a Block's projections of one input run): each
    output is its float64 product, streamed (1 row) or tiled (7 rows), widths 64, 200 and 16."""
    rng = np.random.default_rng(rows)
    ws = tuple(rng.normal(size=(3, 37, n)).astype(np.float32) for n in (64, 200, 16))
    x = rng.normal(size=(rows, 37)).astype(np.float32)
    ys = jax.jit(cpu.stacked_matmuls)(x, ws, jnp.int32(1))
    assert [y.shape for y in ys] == [(rows, 64), (rows, 200), (rows, 16)]
    for y, w in zip(ys, ws):
        np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ w[1].astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 100])
def test_stacked_matmul_is_the_same_whichever_thread_sums_which_part(rows):
    """Streamed (2 rows: ten 64-row parts of w over the pool's threads, summed in part order) and
    tiled (100 rows: 3 chunks x 12 panels): bit-equal on every call."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(2, 600, 200)).astype(np.float32)
    x = rng.normal(size=(rows, 600)).astype(np.float32)
    f = jax.jit(cpu.stacked_matmul)
    first = np.asarray(f(x, w, jnp.int32(1)))
    for _ in range(20):
        np.testing.assert_array_equal(np.asarray(f(x, w, jnp.int32(1))), first)


def test_kernel_calls_from_several_threads_at_once_each_get_their_own_product():
    """The kernels' helper threads serve one call at a time; a call made while they are busy runs
    through XLA's pool instead (cpu_pool.h). Four Python threads calling at once, streamed and
    tiled, many times: every result is bit-equal to the one made alone."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=(2, 600, 200)).astype(np.float32)
    xs = [rng.normal(size=(rows, 600)).astype(np.float32) for rows in (1, 2, 9, 50)]
    f = jax.jit(cpu.stacked_matmul)
    alone = [np.asarray(f(x, w, jnp.int32(1))) for x in xs]
    mismatches = []

    def hammer(i: int) -> None:
        for _ in range(40):
            if not np.array_equal(np.asarray(f(xs[i], w, jnp.int32(1))), alone[i]):
                mismatches.append(i)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    assert not mismatches


def test_stacked_matmul_differentiates_as_the_xla_product():
    """Gradients through the kernel (x's and the stack's: zero but at the layer) = XLA's x @ w[layer]."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(3, 20, 40)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 5, 20)), jnp.float32)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(cpu.stacked_matmul(x, w, jnp.int32(1)))), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w[1])), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert not np.asarray(ours[1])[[0, 2]].any()


def test_decode_step_reads_the_stack_in_place():
    """No op of the compiled step makes a layer-sized array of the cache or of a projection's
    weight (the XLA path slices each layer out of the stacks inside the scan); the stack-sized
    ones are the in-place writes."""
    m = random_model(CFG, seed=0)
    s = 1000
    cache = filled_cache(CFG, 1, s)
    args = (m.graphdef, m.state, jnp.zeros((1,), jnp.int32), cache, jnp.ones((1,), bool))
    stack = f"f32[{CFG.num_layers},1,{s},{CFG.num_kv_heads},{CFG.head_dim}]"
    hlo = {impl: runtime.decode_step.lower(*args, attn_impl=impl).compile().as_text() for impl in ("xla", "cpu")}

    def cache_sized(text: str) -> list[str]:  # ops making an array with the layer cache's S x Hkv x D floats
        shapes = re.findall(r"^\s*(?:ROOT )?%\S+ = f32\[([\d,]*)\]", text, flags=re.M)
        return [sh for sh in shapes if f"f32[{sh}]" != stack
                and np.prod([int(x) for x in sh.split(",") if x]) == s * CFG.num_kv_heads * CFG.head_dim]

    assert cache_sized(hlo["xla"])  # the check can tell: XLA's step slices each layer out (as [S, Hkv*D])
    assert not cache_sized(hlo["cpu"]), cache_sized(hlo["cpu"])
    assert "psynth_decode_attention" in hlo["cpu"]
    for name, shape in (("gate", (CFG.hidden_size, CFG.intermediate_size)),
                        ("down", (CFG.intermediate_size, CFG.hidden_size))):
        made = {impl: re.findall(rf"^\s*(?:ROOT )?%\S+ = f32\[{shape[0]},{shape[1]}\]", text, flags=re.M)
                for impl, text in hlo.items()}
        assert made["xla"] and not made["cpu"], (name, made)  # XLA copies the layer's weight out; cpu reads it
    assert hlo["cpu"].count("psynth_stacked_matmuls") >= 4  # (q, k, v), o, (gate, up), down


def test_prefill_and_extend_read_the_weights_in_place_and_equal_the_xla_path():
    """Prefill and extend under "cpu": XLA's attention, the matmul kernels' projections and LM head
    (tied: the embedding read as [V, D]; untied: its own [D, V]); the XLA path's logits and cache,
    and no layer-sized copy of a weight and no transposed copy of the embedding in the compiled
    prefill."""
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 17, 18]], jnp.int32)
    lengths = jnp.asarray([6, 8], jnp.int32)
    for tied in (True, False):
        m = random_model(dataclasses.replace(CFG, tie_word_embeddings=tied), seed=2)
        got = {impl: runtime.prefill(m.graphdef, m.state, tokens, lengths, num_slots=64, attn_impl=impl, output="all")
               for impl in ("xla", "cpu")}
        for a, b in zip(jax.tree.leaves(got["cpu"]), jax.tree.leaves(got["xla"])):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=1e-5)
        more = jnp.asarray([[20, 21, 22, 0], [23, 24, 25, 26]], jnp.int32)
        ext = {impl: runtime.extend(m.graphdef, m.state, more, jnp.asarray([3, 4], jnp.int32),
                                    jax.tree.map(jnp.copy, got[impl][1]), attn_impl=impl) for impl in ("xla", "cpu")}
        np.testing.assert_allclose(np.asarray(ext["cpu"][0]), np.asarray(ext["xla"][0]), atol=1e-5, rtol=1e-5)
        hlo = {impl: runtime.prefill.lower(m.graphdef, m.state, tokens, lengths, num_slots=64, attn_impl=impl
                                           ).compile().as_text() for impl in ("xla", "cpu")}
        d, f, v = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size
        copies = {impl: re.findall(rf"^\s*(?:ROOT )?%\S+ = f32\[(?:{d},{f}|{f},{d}|{d},{v})\]\S* (?!parameter).*",
                                   text, flags=re.M) for impl, text in hlo.items()}
        assert copies["xla"] and not copies["cpu"], copies  # XLA slices each layer's weights out
        assert hlo["cpu"].count("psynth_stacked_matmuls") >= 4 and ("psynth_rows_matmul" in hlo["cpu"]) == tied


def test_lora_factors_are_read_in_place_and_equal_the_xla_path():
    """LoRA on every projection, B nonzero: under "cpu" x A joins its projection's kernel call and
    (x A) B is read from B's stack in place (no per-layer slice of a factor in the compiled step).
    A decode step with the LoRA on for some rows only (a serving batch's workers beside its
    synthesizers) and a prefill's gradients with respect to A and B equal the XLA path's."""
    lora = LoRAConfig(rank=3, alpha=6.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    m = random_model(CFG, lora=lora, seed=4)
    model = nnx.merge(m.graphdef, m.state)
    rng = np.random.default_rng(4)
    for name in lora.targets:
        lin = getattr(model.layers, name)
        lin.lora_b[...] = jnp.asarray(rng.normal(size=lin.lora_b.shape) * 0.1, jnp.float32)
    graphdef, state = nnx.split(model)
    rows = 4
    cache = filled_cache(CFG, rows, 64, seed=4)
    tokens = jnp.arange(rows, dtype=jnp.int32) + 7
    per_row = jnp.asarray([True, False, True, True])
    step = jax.jit(lambda st, c, impl: runtime.decode_fn(nnx.merge(graphdef, st), tokens, c, lora=per_row,
                                                         attn_impl=impl)[0], static_argnums=2)
    got = {impl: step(state, cache, impl) for impl in ("xla", "cpu")}
    np.testing.assert_allclose(np.asarray(got["cpu"]), np.asarray(got["xla"]), atol=1e-5, rtol=1e-5)
    off = jax.jit(lambda st, c: runtime.decode_fn(nnx.merge(graphdef, st), tokens, c, lora=False)[0])(state, cache)
    changed = np.abs(np.asarray(got["xla"]) - np.asarray(off)).max(axis=1)
    assert changed[1] == 0 and (changed[[0, 2, 3]] > 1e-4).all()  # the adapters matter where on
    hlo = step.lower(state, cache, "cpu").compile().as_text()
    r, d, f = lora.rank, CFG.hidden_size, CFG.intermediate_size
    slices = re.findall(rf"^\s*%\S+ = f32\[(?:{d},{r}|{f},{r}|{r},{d}|{r},{f})\]\S* (?:fusion|dynamic-slice|copy)\(",
                        hlo, flags=re.M)
    assert not slices, slices

    lora_of = nnx.All(nnx.Param, lambda path, _: any(str(p).startswith("lora_") for p in path))
    adapters, rest = nnx.split_state(state, lora_of, ...)
    prompt = jnp.asarray([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]], jnp.int32)
    lengths = jnp.asarray([6, 4], jnp.int32)

    def loss(adapters, impl):
        merged = nnx.merge(graphdef, adapters, rest)
        hidden = runtime.prefill_fn(merged, prompt, lengths, num_slots=16, lora=True, attn_impl=impl)[0]
        return jnp.sum(jnp.sin(merged.logits(hidden, attn_impl=impl)))

    grads = {impl: jax.jit(jax.grad(loss), static_argnums=1)(adapters, impl) for impl in ("xla", "cpu")}
    leaves = {impl: jax.tree.leaves(g) for impl, g in grads.items()}
    assert len(leaves["cpu"]) == 2 * len(lora.targets)
    for a, b in zip(leaves["cpu"], leaves["xla"]):
        assert float(jnp.max(jnp.abs(b))) > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_engine_decodes_the_same_tokens():
    from psynth_jax.serve.engine import Engine, RowSampling
    from psynth_jax.synthesis.pipeline import ParallelSynthesis
    from serve_fixtures import lively_model

    model = lively_model()
    prompts = [[1, 5, 9, 14, 20], [1, 7, 3], [1, 30, 31, 32, 33, 34, 35]]
    tokens = {}
    for impl in ("xla", "cpu"):
        engine = Engine(ParallelSynthesis(model, attn_impl=impl, zero_copy=False), slots=4, max_context=128)
        state = engine.init_decode_state()
        for slot, prompt in enumerate(prompts):
            prefix = engine.prefill(prompt, RowSampling())
            state = engine.insert(prefix, state, slot, RowSampling(), lora=slot == 1)
        drawn = []
        for i in range(16):  # all slots stepped, then the first alone (rows and columns cut)
            live = np.asarray([True, True, True, False]) if i < 10 else np.asarray([True, False, False, False])
            state, step = engine.generate(state, live)
            drawn.append(np.asarray(step)[:3] * live[:3])
        tokens[impl] = np.stack(drawn)
    np.testing.assert_array_equal(tokens["cpu"], tokens["xla"])
    assert len(np.unique(tokens["xla"])) > 3  # lively: the equality means something


def test_a_narrowed_engine_step_cuts_no_row_out_of_the_cache():
    """A step over the first slot of 8 (`Engine.step_rows` for a lone request): XLA's path cuts the
    row's cache out of every layer ([L, 1, C, Hkv, D]) and writes it back; under "cpu" the kernels
    read and write the row where it lies, and the engine cuts no columns either."""
    from psynth_jax.serve import engine as eng
    from psynth_jax.synthesis.pipeline import ParallelSynthesis
    from serve_fixtures import lively_model

    model = lively_model()
    cfg = model.cfg
    cut = f"f32[{cfg.num_layers},1,256,{cfg.num_kv_heads},{cfg.head_dim}]"
    live = jnp.asarray([True] + [False] * 7)
    for impl in ("xla", "cpu"):
        engine = eng.Engine(ParallelSynthesis(model, attn_impl=impl, zero_copy=False), slots=8, max_context=256)
        assert engine.narrows_cols(1) is (impl == "xla")
        text = eng.generate.lower(model.graphdef, model.state, engine.init_decode_state(), live, attn_impl=impl,
                                  rows=1).compile().as_text()
        made = re.findall(rf"^\s*(?:ROOT )?%\S+ = {re.escape(cut)}", text, flags=re.M)
        assert bool(made) is (impl == "xla"), (impl, made)


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from psynth_jax.cli.common import UsageError, check_attn_impl

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu.KernelUnavailable, match="no-such-compiler"):
        cpu.build(tmp_path / "cache")
    monkeypatch.setenv("PSYNTH_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="--attn-impl cpu"):
        check_attn_impl("cpu", "--attn-impl")
    assert not any((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind
