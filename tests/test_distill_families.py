"""Distillation for every task family: evaluation-task rows -> items (family, expert profiles,
given branches, held-out rows left out), batches of one family and one K, and examples written
by a tiny backbone's text path whose branches are exactly what the items say."""

from __future__ import annotations

from pathlib import Path

import pytest

from psynth_jax.data.distill import DistillItem, distill_batches, item_from_problem, items_from_task, plan_batches
from psynth_jax.data.problems import parse_problem
from psynth_jax.eval.tasks import task_converter
from psynth_jax.formats import splits
from psynth_jax.formats.records import read_records
from psynth_jax.formats.tool_calls import attach_answers
from psynth_jax.model.transformer import LoRAConfig
from psynth_jax.synthesis import prompts
from tiny_smol import random_tiny_smol

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")


def rows(relative: str, n: int) -> list[dict]:
    path = DATA / relative
    return attach_answers(read_records(path)[:n], path)


def test_items_of_every_family():
    arc_rows = rows("science_qa/arc_challenge/ARC-Challenge-Dev.filtered.jsonl", 3)
    arc, _ = items_from_task("arc_challenge", arc_rows, "arc", 0)
    assert [i.family for i in arc] == ["multiple_choice"] * 3 and "A. " in arc[0].question and not arc[0].given
    code, _ = items_from_task("mbpp", rows("mbpp/mbpp.jsonl", 2), "mbpp", 0)
    assert [i.family for i in code] == ["code"] * 2 and "Your code should pass these tests" in code[0].question
    marble, _ = items_from_task("marble_db", rows("marble_db/database_main.jsonl", 1), "marble", 0)
    assert marble[0].family == "diagnosis" and len(marble[0].role_hints) == marble[0].num_branches(3) == 5
    # one worker per expert profile: its conversation carries the profile, and so does its branch
    convs = marble[0].worker_conversations(3)
    assert [c[0]["content"].split("\n", 1)[1] for c in convs] == list(marble[0].role_hints)
    assert [b.role_hint for b in marble[0].branches(["t"] * 5)] == list(marble[0].role_hints)
    multihop_rows = rows("multihop_evidence/2wikimultihopqa_train500_migres.jsonl", 20)
    qa, skipped = items_from_task("multihop_qa", multihop_rows, "2wiki", 0)
    held = sum(splits.is_heldout(splits.MULTIHOP, r["_id"]) for r in multihop_rows)
    assert held and skipped == {"held out for evaluation": held} and len(qa) == 20 - held
    convert = task_converter("multihop_qa")
    for item in qa:
        row = next(r for r in multihop_rows if item.id.endswith(r["_id"]))
        assert item.family == "qa" and item.given_role == "paragraph"
        assert list(item.given) == convert(row, 0, 0).extra["branches"]  # the evaluation's own branches
    tools, _ = items_from_task("tool_calls", rows("tool_calls/BFCL_v4_multiple.json", 12), "bfcl", 0)
    assert tools and all(i.family == "tool" and i.given_role == "function" and i.given for i in tools)
    assert not any(splits.is_heldout(splits.TOOL_CALLS, i.id.split("/")[-1]) for i in tools)
    broken, skipped = items_from_task("arc_challenge", [{"id": "x"}], "arc", 0)
    assert broken == [] and sum(skipped.values()) == 1


def test_batches_hold_one_family_and_one_k():
    items = [DistillItem("a", "math", "q", "1"),
             DistillItem("b", "qa", "q", "x", given=("p1", "p2"), given_role="paragraph"),
             DistillItem("c", "math", "q", "2"),
             DistillItem("d", "qa", "q", "y", given=("p",) * 4, given_role="paragraph"),
             DistillItem("e", "diagnosis", "q", "z", role_hints=("h1", "h2", "h3", "h4", "h5")),
             DistillItem("f", "math", "q", "3")]
    plan = plan_batches(items, 3, batch_size=2, seed=0)
    assert [(k, [i.id for i in b]) for k, b in plan] == [
        (3, ["a", "c"]), (3, ["f"]), (2, ["b"]), (4, ["d"]), (5, ["e"])]
    drawn = plan_batches([DistillItem(str(i), "math", "q", "1") for i in range(30)], [2, 4], batch_size=50, seed=1)
    assert {k for k, _ in drawn} == {2, 4} and sum(len(b) for _, b in drawn) == 30


def test_distilled_examples_of_several_families_with_a_tiny_backbone():
    from psynth_jax.synthesis.pipeline import ParallelSynthesis

    synth = ParallelSynthesis(random_tiny_smol(LoRAConfig(rank=4, alpha=8.0)))
    math = item_from_problem(parse_problem(read_records(DATA / "gsm8k/test.jsonl")[0], 0, "gsm8k/test"))
    qa, _ = items_from_task("multihop_qa", rows("multihop_evidence/hotpotqa_train100_hipporag.jsonl", 4), "hotpot", 0)
    items = [math, qa[0]]
    out = [e for batch in distill_batches(items, synth, k=2, batch_size=4, worker_tokens=3, max_new_tokens=3, seed=0)
           for e in batch]
    by_id = {e.id: e for e in out}
    m, q = (by_id[f"distillation/{i.id}"] for i in items)
    assert m.family == "math" and m.num_branches == 2 and all(b.prefix == "" and not b.role_hint for b in m.branches)
    assert q.family == "qa" and [b.output for b in q.branches] == list(qa[0].given)
    assert [b.prefix for b in q.branches] == [prompts.branch_prompt("paragraph", qa[0].question, i, len(qa[0].given))
                                              for i in range(len(qa[0].given))]
    assert all(isinstance(e.target, str) and e.meta["builder"] == "distillation" for e in out)
