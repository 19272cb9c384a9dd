"""Sharding on 8 fake CPU devices: loading reads only shards, and a mesh changes no result.

One child process with 8 devices runs every check (tests/sharded_checks.py) on tiny checkpoints of
each family written here; the tests assert on what it measured:
- the bytes each device holds of the loaded parameters equal their sharded share (and are well
  below the whole model), and no read returns more than one shard's slice of a tensor;
- 1-device and 8-device runs give the same logits, and greedy workers, cache path (from the
  workers' caches and rebuilt from their tokens), text path and single agent give the same
  tokens (Llama on fsdp x tensor and data x fsdp x tensor; Qwen2 and Qwen3 on data x fsdp x
  tensor, opt-in: `pytest -m slow tests/test_sharded.py`);
- `psynth eval` on a mesh writes the same records as on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fast_compile import xla_flags
from psynth_jax.synthesis.handoff import Handoff
from tiny_smol import make_tiny_smol

FAMILIES = ("llama", "qwen2", "qwen3")
MESHES = ("fsdp2_tensor4", "data2_fsdp2_tensor2")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    for family in FAMILIES:
        make_tiny_smol(root / f"tiny_{family}", family=family)
    return root


def measure(root: Path, name: str, synthesis: str, parts: str) -> dict:
    """tests/sharded_checks.py in a child process with 8 devices: its facts."""
    out = root / f"{name}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags()  # the suite's, no forced device count
    script = Path(__file__).with_name("sharded_checks.py")
    run = subprocess.run([sys.executable, str(script), str(root), str(out), synthesis, parts], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def facts(tiny_root):
    """Loading for every family; synthesis (and the zero-copy path) for Llama; eval on a mesh."""
    return measure(tiny_root, "facts", "llama", "loading,eval")


@pytest.fixture(scope="module")
def other_families(tiny_root):
    """Synthesis for Qwen2 and Qwen3 (opt-in: their sharding rules are Llama's plus biases / q-k norms,
    whose placement the loading test checks in CI)."""
    return measure(tiny_root, "other_families", "qwen2,qwen3", "")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_device_holds_its_share_and_no_read_exceeds_a_shard(facts, family):
    for mesh in MESHES:
        f = facts["loading"][family][mesh]
        print(family, mesh, {k: f[k] for k in ("share", "whole", "largest_read", "largest_shard_slice")})
        assert f["per_device"] == [f["share"]] * 8  # measured from addressable_shards = the sharded share
        assert f["share"] < f["whole"] / 2  # really split, not replicated
        assert f["num_sharded_leaves"] >= f["num_leaves"] // 2
        assert f["largest_read"] <= f["largest_shard_slice"]


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                    pytest.param("qwen3", marks=pytest.mark.slow)])
def test_a_mesh_changes_no_logit_and_no_greedy_token(request, facts, family):
    runs = (facts if family == "llama" else request.getfixturevalue("other_families"))["synthesis"][family]
    one = runs["one_device"]
    assert one["cache"] == one["rebuilt"]  # caches rebuilt from stored tokens = the workers' own
    for mesh in (m for m in MESHES if m in runs):
        got = runs[mesh]
        for path in ("workers", "cache", "rebuilt", "text", "single"):
            assert got[path] == one[path], (mesh, path)
        for logits in ("cache_logits", "text_logits"):
            diff = float(np.abs(np.asarray(got[logits]) - np.asarray(one[logits])).max())
            print(family, mesh, logits, f"max abs diff {diff:.2e}")
            assert diff <= 1e-4
    assert "data" in runs["data2_fsdp2_tensor2"]["branch_k_spec"]  # branch caches split over requests


def test_zero_copy_on_a_mesh_equals_the_materialised_path_on_one_device(facts):
    """The synthesizer reading the worker rows in place, with rows and heads split over the
    2 x 2 x 2 mesh: the same greedy tokens and first logits as the materialised cache path on one
    device (and as the zero-copy path there)."""
    runs = facts["synthesis"]["llama"]
    one, mesh = runs["one_device"], runs["data2_fsdp2_tensor2"]
    assert one["zero_copy"] == one["cache"] and mesh["zero_copy"] == one["cache"]
    for got in (one, mesh):
        diff = float(np.abs(np.asarray(got["zero_copy_logits"]) - np.asarray(one["cache_logits"])).max())
        print("zero-copy vs materialised first logits, max abs diff", f"{diff:.2e}")
        assert diff <= 1e-4


def test_eval_on_a_mesh_writes_the_one_device_records(facts):
    one, many = facts["eval"]["one_device"], facts["eval"]["data2_fsdp2_tensor2"]
    assert len(one) == 2 * 6 and one == many


def test_requests_with_different_branch_counts_are_refused(tmp_path):
    """K = (2, 4) used to be re-split into 3 + 3, moving a branch into the other request."""
    from psynth_jax.interop.loader import load_model
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    synth = ParallelSynthesis(load_model(make_tiny_smol(tmp_path / "m")), handoff=Handoff())
    ids = [[5, 6, 7]]
    with pytest.raises(ValueError, match=r"same number of branches K; outputs have \[2, 4\]"):
        synth.branches_from_tokens([ids * 2, ids * 4], [ids * 2, ids * 4])
    with pytest.raises(ValueError, match="give one prefix per branch"):
        synth.branches_from_tokens([ids * 3, ids * 3], [ids * 2, ids * 2])
    with pytest.raises(ValueError, match="same number of branches K; conversations"):
        synth.run_workers([[[{"role": "user", "content": "a"}]] * 2, [[{"role": "user", "content": "b"}]]],
                          max_new_tokens=2)
