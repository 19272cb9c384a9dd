"""The fused attention kernel (cuDNN) against the XLA reference, on a GPU: `pytest -m gpu`.

The same checks `psynth bench kernels` writes to kernels.json for the GPU check (benchmarks/kernels.py):
every attention layout (prefill, extend, decode, extend gradients) at head_dim 64 and 128 in
bfloat16 and float32, and the cache path's greedy tokens on a tiny random model of each family,
each within the check's tolerance (a near-tie between two greedy tokens is not a failure). Skipped
where there is no GPU with cuDNN; deselected by default (pyproject.toml: `-m 'not slow and not gpu'`).
"""

from __future__ import annotations

import jax
import pytest

from benchmarks import kernels

pytestmark = pytest.mark.gpu
IMPL = "cudnn"


@pytest.fixture(scope="module", autouse=True)
def _gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU with cuDNN")


@pytest.mark.parametrize("dtype", list(kernels.TOLERANCE))
@pytest.mark.parametrize("head_dim", list(kernels.HEADS))
@pytest.mark.parametrize("layout", list(kernels.LAYOUTS))
def test_attention_layout_matches_the_xla_reference(layout, head_dim, dtype):
    row = kernels.check_layout(layout, head_dim, dtype, IMPL, seed=0)
    assert row["ok"], kernels.describe(row)


@pytest.mark.parametrize("family", list(kernels.FAMILIES))
def test_cache_path_greedy_tokens_match_xla(family):
    row = kernels.check_greedy(family, "bfloat16", IMPL, new_tokens=16, seed=0)
    assert row["ok"], kernels.describe(row)
