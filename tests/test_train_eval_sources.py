"""The trainer's held-out evaluation per data.eval source (issue #26's diagnosis: where does the
gain stop?): CE, teacher-forced KL(text || cache) even when the loss has no KL term, greedy
agreement, each per source and pooled over the sources as one evaluation of them all would."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from psynth_jax.config import load_config
from psynth_jax.model.transformer import LoRAConfig
from tiny_smol import random_tiny_smol

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared/data/gsm8k/train.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is not beside the checkout")
SOURCES = {"two_branches": "[2]", "three_branches": "[3]"}  # real rows, another K per source


def trainer(tmp_path: Path, sources: dict[str, str]):
    from psynth_jax.train.trainer import Trainer

    evals = ", ".join(f"{{name: {n}, path: {GSM8K}, builder: aggregation, limit: 2, k: {k}}}" for n, k in sources.items())
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(f"""
base: {REPO / 'configs/base.yaml'}
model: {{dtype: float32}}
lora: {{rank: 4, alpha: 8.0}}
data:
  train: [{{path: {GSM8K}, builder: aggregation, limit: 2}}]
  eval: [{evals}]
  buckets: [256, 512, 768]
  max_total_tokens: 768
  max_live_tokens: 256
  max_cache_tokens: 512
train: {{steps: 1, compute_dtype: float32}}
checkpoint: {{dir: {tmp_path / 'run'}, async_save: false}}
tensorboard: false
""")
    return Trainer(load_config(path), model=random_tiny_smol(LoRAConfig(rank=4, alpha=8.0)), quiet=True)


def test_per_source_figures_and_their_pooling(tmp_path):
    both = trainer(tmp_path, SOURCES)
    got = both.evaluate()
    names = [f"eval_{m}{s}" for s in ["", *(f"/{n}" for n in SOURCES)] for m in ("ce", "kl", "agreement")]
    assert sorted(got) == sorted(names) and all(math.isfinite(v) for v in got.values())
    assert got["eval_kl"] >= 0 and got["eval_ce"] > 0  # KL measured though the loss weighs it 0
    # one source alone: the same figures as that source's within the evaluation of both
    batches = both.eval_batches
    both.eval_batches = [(s, b) for s, b in batches if s == "three_branches"]
    alone = both.evaluate()
    both.eval_batches = batches
    for m in ("ce", "kl", "agreement"):
        assert alone[f"eval_{m}"] == pytest.approx(got[f"eval_{m}/three_branches"], rel=1e-5, abs=1e-9)
    # pooled: CE and KL per target token, agreement per example, over every source's examples
    tokens = {n: sum(float((b["loss_mask"].sum(1) * b["example_valid"]).sum()) for s, b in both.eval_batches if s == n)
              for n in SOURCES}
    examples = {n: sum(int(b["example_valid"].sum()) for s, b in both.eval_batches if s == n) for n in SOURCES}
    assert set(examples.values()) == {2}
    for m, weight in (("ce", tokens), ("kl", tokens), ("agreement", examples)):
        want = sum(got[f"eval_{m}/{n}"] * weight[n] for n in SOURCES) / sum(weight.values())
        assert got[f"eval_{m}"] == pytest.approx(want, rel=1e-5, abs=1e-9), m
    assert np.unique([b["branch_tokens"].shape[1] for s, b in both.eval_batches if s == "three_branches"]).tolist() == [3]
