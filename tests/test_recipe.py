"""The paper's two-stage recipe: its configs load and validate, the CPU recipe's data summary, and
its first steps (stage 1, then stage 2 starting from stage 1's mapper + LoRA) on a tiny backbone
with SmolLM2's tokenizer and a small slice of the real data."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from psynth_jax.config import load_config, validate
from psynth_jax.model.transformer import LoRAConfig
from tiny_smol import random_tiny_smol

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = ROOT / "configs/paper_recipe_smollm2_cpu_stage1.yaml"
STAGE2 = ROOT / "configs/paper_recipe_smollm2_cpu_stage2.yaml"
PODS = sorted((ROOT / "configs").glob("paper_recipe_qwen3_14b_*.yaml"))
pytestmark = pytest.mark.skipif(not (ROOT.parent / "shared/data").is_dir(),
                                reason="../shared/data is not beside the checkout")


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes' data paths are relative to the repository root


def test_recipe_configs_load_and_validate(tmp_path):
    assert {p.name for p in PODS} == {f"paper_recipe_qwen3_14b_{pod}{stage}.yaml"
                                      for pod in ("tpu_v5p", "tpu_v5e", "8xh100") for stage in ("", "_stage2")}
    stage1_dir = tmp_path / "stage1"
    stage1_dir.mkdir()
    (stage1_dir / "config.yaml").write_text("")
    for path in [STAGE1, STAGE2, *PODS]:
        cfg = load_config(path)
        if path.stem.endswith("stage2"):
            assert cfg.train.init_from and all(s.builder == "distillation" for s in cfg.data.train)
            assert {s.task for s in cfg.data.train} >= {None, "arc_challenge", "multihop_qa", "tool_calls"}
            cfg = load_config(path, [f"train.init_from={stage1_dir}"])
        else:
            assert {s.builder for s in cfg.data.train} == {"exposure", "aggregation"} and cfg.train.init_from is None
        assert cfg.data.min_branches == 2 and cfg.data.max_branches >= 6, path.name
        validate(cfg)
    # the pod recipes keep the hardware of the pod configs they mirror
    for pod in ("tpu_v5p", "tpu_v5e", "8xh100"):
        hardware = load_config(ROOT / f"configs/qwen3_14b_{pod}.yaml")
        for stage in ("", "_stage2"):
            recipe = load_config(ROOT / f"configs/paper_recipe_qwen3_14b_{pod}{stage}.yaml")
            assert (recipe.model, recipe.mesh, recipe.data.batch_size) == (
                hardware.model, hardware.mesh, hardware.data.batch_size)


def test_cpu_recipe_stage1_data_summary():
    from psynth_jax.data.pipeline import make_train_iterator
    from psynth_jax.data.sources import load_stage
    from psynth_jax.data.summary import data_summary, format_summary
    from psynth_jax.interop.embedded import default_gguf_path
    from psynth_jax.interop.tokenizer import load_tokenizer

    cfg = load_config(STAGE1)
    stage = load_stage(cfg.data)
    _, stats = make_train_iterator(cfg.data, load_tokenizer(default_gguf_path()), examples=stage.examples, prefetch=0)
    summary = data_summary(stage, stats)
    assert cfg.train.steps == stats.batches_per_epoch  # the recipe trains exactly one epoch
    assert list(summary["sources"]) == [s.name for s in cfg.data.train]
    assert set(summary["by_role"]) == {"exposure", "aggregation"} and set(map(int, summary["by_k"])) == {2, 3, 4, 5, 6}
    for name, s in summary["sources"].items():
        assert s["kept"] + sum(s["guard_skipped"].values()) == s["examples"] > 0, name
        assert s["built"] - s["capped"] == s["examples"] and sum(map(int, s["by_k"].values())) == s["kept"]
    assert summary["sources"]["evidence_short"]["skipped"]["held out for evaluation"] > 0
    assert summary["kept"] == stats.kept == sum(s["kept"] for s in summary["sources"].values())
    text = format_summary(summary)
    assert "stage 'stage1-exposure-aggregation'" in text and "icl_flan_cot | exposure | flan_cot" in text


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_cpu_recipe_first_steps_then_stage2_from_stage1(tmp_path):
    from psynth_jax.train.trainer import Trainer

    lora = LoRAConfig(rank=4, alpha=8.0)
    common = ["lora.rank=4", "lora.alpha=8", "tensorboard=false", "checkpoint.async_save=false"]
    n1 = len(load_config(STAGE1).data.train)
    cfg1 = load_config(STAGE1, [*common, "train.steps=2", "train.lr=1e-2", f"checkpoint.dir={tmp_path / 's1'}",
                                *(f"data.train[{i}].cap=1" for i in range(n1))])
    one = Trainer(cfg1, model=random_tiny_smol(lora), quiet=True)
    out1 = one.train()
    assert out1["final_step"] == 2 and all(np.isfinite(out1["last_losses"]))
    summary1 = json.loads((tmp_path / "s1/data_summary.json").read_text())
    assert list(summary1["sources"]) == [s.name for s in cfg1.data.train]
    assert all(s["examples"] == 1 for s in summary1["sources"].values())

    # stage 2, one step on one family (multi-hop QA: given paragraphs, the text path writes the target;
    # sampled workers and the other families: test_distill_families.py)
    cfg2 = load_config(STAGE2, [*common, "train.steps=1", f"checkpoint.dir={tmp_path / 's2'}",
                                f"train.init_from={tmp_path / 's1'}", "data.eval=[]", "data.distill_max_new_tokens=4",
                                "data.train[0].weight=0", "data.train[1].weight=0", "data.train[2].limit=6",
                                "data.train[2].cap=1", "data.train[3].weight=0"])
    two = Trainer(cfg2, model=random_tiny_smol(lora), quiet=True)  # a trainer donates its model's LoRA
    # mapper + LoRA of stage 1's last step, which moved away from the fresh state (LoRA B = 0)
    assert _tree_equal(two.trainable, one.trainable)
    lora_b = [x for path, x in jax.tree_util.tree_leaves_with_path(two.trainable["lora"]) if "lora_b" in str(path)]
    assert lora_b and any(np.abs(np.asarray(x)).sum() > 0 for x in lora_b)
    out2 = two.train()
    assert out2["final_step"] == 1 and np.isfinite(out2["last_losses"][0])
    summary2 = json.loads((tmp_path / "s2/data_summary.json").read_text())
    sources = summary2["sources"]
    assert sources["distill_multihop_qa"]["examples"] == sources["distill_multihop_qa"]["kept"] == 1
    assert sources["distill_math"]["rows"] == 0 and summary2["by_role"].keys() == {"distillation"}
    rows = [json.loads(line) for f in sorted((tmp_path / "s2/distill").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    multihop = next(r for r in rows if r["family"] == "qa")
    assert all(b["prefix"].startswith("You are retrieval agent") for b in multihop["branches"])

