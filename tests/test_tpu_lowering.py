"""The TPU attention kernels lower through Mosaic, and no attention call becomes a dense [T, S] product.

No TPU is needed: libtpu (the test extra's `jax[tpu]`) describes a v5e:2x2 slice's devices, and a
program traced for a mesh over them lowers (and compiles) as on that slice. A tiny Qwen3-shaped
model (head_dim 128, the TPU lane width) on a data=1 x fsdp=2 x tensor=2 mesh, through the same
program builders `psynth plan` compiles (train/programs.py):

- splash (`attn_impl: splash`): the train step (branch prefill forward, the synthesizer's forward
  and its backward: dq and dkv kernels), the workers' generate, the cache path's and the text
  path's prefill and decode. Each must call Mosaic kernels (`tpu_custom_call`): a Pallas kernel
  lowered in interpret mode (what `splash.default_interpret` chose from the host's backend
  before issue #25) becomes ordinary loops, with no such call.
- the XLA path (`xla`, blockwise prefill, multiply-reduce decode) and the zero-copy view (its
  only attention): the train step, the cache path's prefill and decode, the text path's decode.
  None may hold a value with two attention sequence lengths as dimensions (a [T, S] score
  matrix). The sequence lengths below are chosen apart from every model dimension and tile size,
  so such a dimension can only be a sequence; a control (the dense reference) must be caught.

Lowering all of them takes seconds; the splash train step is also compiled by the TPU compiler
(Mosaic compiles its kernels for v5e), the rest only lowered.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from psynth_jax.config import load_config
from psynth_jax.config.accelerators import parse_accelerator
from psynth_jax.inference.sampling import SamplingConfig
from psynth_jax.measure import hlo
from psynth_jax.model.kernels.xla import dense_attention
from psynth_jax.model.kv_cache import AttentionMask
from psynth_jax.model.sharding import Rules, make_mesh
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.train import aot, programs
from psynth_jax.train.plan_child import model_config_for
from tiny_smol import tiny_qwen3_tpu_config

pytestmark = pytest.mark.skipif(aot.libtpu_version() is None,
                                reason="libtpu is not installed (pip install -e '.[test]' brings it)")

B, K = 2, 2
TRAIN = programs.TrainShape(rows=B, branches=K, branch_tokens=640, synth_tokens=384, text_tokens=None)
# worker prompt 704 + 448 tokens (1,152 slots); synthesizer prompt 320 + 96 new; text prompt 2 x 448 + 320
GENERATION = programs.GenerationShape(requests=B, branches=K, worker_prompt=704, worker_tokens=448,
                                      prompt_tokens=320, new_tokens=96)


def _sequence_lengths() -> set[int]:
    seq = GENERATION.sequence_lengths()
    lengths = {TRAIN.branch_tokens, TRAIN.synth_tokens, K * TRAIN.branch_tokens + TRAIN.synth_tokens,
               *seq.values(), K * seq["branch_slots"] + seq["synth_extra"]}
    return lengths - {128, 256, 512, 1024}  # model dimensions are not sequences


SEQUENCES = _sequence_lengths()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """(config, model config, mesh, rules): the tiny model's training config on a v5e:2x2 mesh."""
    root = tmp_path_factory.mktemp("tpu_lowering")
    tiny_qwen3_tpu_config(root / "model")
    (root / "rows.jsonl").write_text("")
    (root / "train.yaml").write_text(f"""model: {{source: {root / 'model'}, dtype: bfloat16, attn_impl: splash}}
data:
  train: [{{path: {root / 'rows.jsonl'}, builder: exposure}}]
train: {{steps: 10, compute_dtype: bfloat16, remat: true}}
mesh: {{data: 1, fsdp: 2, tensor: 2}}
checkpoint: {{dir: {root / 'run'}}}
""")
    cfg = load_config(root / "train.yaml")
    mesh = make_mesh((1, 2, 2), aot.tpu_devices(parse_accelerator("v5litepod-4")))
    return cfg, model_config_for(cfg.model.source), mesh, Rules()


def _train_step(target, attn_impl: str, zero_copy: bool):
    cfg, mcfg, mesh, rules = target
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_impl=attn_impl, zero_copy=zero_copy))
    state = programs.TrainState.build(cfg, mcfg, jnp.bfloat16, mesh, rules)
    return programs.train_step_program(cfg, state, TRAIN, mesh, rules, attn_impl)


def _generation(target, attn_impl: str, zero_copy: bool, only: tuple[str, ...]):
    _, mcfg, mesh, rules = target
    return programs.generation_programs(mcfg, jnp.bfloat16, LoRAConfig(rank=8, alpha=16.0), ("affine_length", 32), mesh,
                                        rules, GENERATION, attn_impl=attn_impl, zero_copy=zero_copy,
                                        worker_sampling=SamplingConfig(0.7, 0.95), sampling=SamplingConfig(), only=only)


def _no_dense_product(name: str, text: str) -> None:
    dense = hlo.dense_products(text, SEQUENCES)
    assert dense == [], f"{name}: attention lowered as a dense [T, S] product: {dense[:3]}"


def test_splash_lowers_through_mosaic_in_training_and_inference(target):
    """Every splash call site is a Mosaic kernel on a TPU mesh: the train step's four (branch
    prefill, synthesizer forward with residuals, dq, dkv), one per prefill and per decode step."""
    step = _train_step(target, "splash", zero_copy=False)().as_text()
    kernels = hlo.mosaic_kernels(step)
    assert len(kernels) >= 4, f"train step: {len(kernels)} Mosaic kernels, expected 4 (interpret mode?)"
    assert any("dkv" in k for k in kernels) and any("dq" in k for k in kernels), kernels  # the backward pass
    _no_dense_product("train step (splash)", step)
    expected = {"worker_generate": 2, "cache_prefill": 1, "cache_decode": 1, "text_prefill": 1, "text_decode": 1}
    for name, lower in _generation(target, "splash", False, tuple(expected)).items():
        text = lower().as_text()
        assert len(hlo.mosaic_kernels(text)) >= expected[name], \
            f"{name}: {len(hlo.mosaic_kernels(text))} Mosaic kernels, expected {expected[name]} (interpret mode?)"
        _no_dense_product(f"{name} (splash)", text)


def test_xla_attention_and_the_zero_copy_view_stay_blockwise_on_tpu(target):
    """What runs on TPU where splash does not: the blockwise XLA path and the zero-copy view read
    by it, in training, prefill and decode: no [T, S] product anywhere."""
    _no_dense_product("train step (zero copy)", _train_step(target, "xla", zero_copy=True)().as_text())
    _no_dense_product("train step (xla)", _train_step(target, "xla", zero_copy=False)().as_text())
    for zero_copy in (True, False):
        for name, lower in _generation(target, "xla", zero_copy, ("cache_prefill", "cache_decode", "text_decode")).items():
            _no_dense_product(f"{name} (xla, zero_copy={zero_copy})", lower().as_text())


def test_the_dense_product_check_sees_a_dense_attention(target):
    """The control: the dense reference, lowered for the same lengths, is caught."""
    t, s = sorted(SEQUENCES)[:2]
    q = jax.ShapeDtypeStruct((B, t, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, s, 2, 128), jnp.bfloat16)
    mask = AttentionMask(q_slots=jax.ShapeDtypeStruct((B, t), jnp.int32), kv_valid=jax.ShapeDtypeStruct((B, s), bool))
    assert hlo.dense_products(jax.jit(dense_attention).lower(q, kv, kv, mask).as_text(), SEQUENCES)


def test_the_tpu_compiler_compiles_the_splash_train_step(target):
    """Mosaic compiles the train step's kernels for v5e (the TPU compiler's whole pipeline), and the
    compiled program reports what `psynth plan` reads: memory, cost, collectives, Mosaic kernels."""
    report = aot.compile_program(_train_step(target, "splash", zero_copy=False)())
    assert report["fits"], report
    assert sum(report["hlo"]["mosaic_kernels"].values()) >= 4, report["hlo"]
    assert report["memory"]["peak"] > 0 and report["cost"]["flops"] > 0
    assert "all-gather" in report["hlo"]["collectives"]  # fsdp=2 gathers the weights
