"""`psynth compare`: two eval runs paired on the same examples, against independent references
(scipy's Wilcoxon test, the eval report's own numbers in the committed issue #17 runs, counts by
hand), and the refusals that keep a comparison paired."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from psynth_jax.cli import main as psynth_main
from psynth_jax.eval.compare import compare, comparison_markdown, read_side, wilcoxon_signed_rank
from psynth_jax.eval.store import BRANCHES, KL, RECORDS, BranchSet, ModeRecord

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks/results/cpu/recipe_smollm2"  # issue #17: the same examples and branches


@pytest.mark.parametrize("diffs", [
    [1, -2, 2, 0, 3, -1, 4, 4, 5, -0.5],  # a zero and tied |d|
    [0.01 * i * (-1) ** i for i in range(1, 40)],
    [0.3, 0.1, 0.2, 0.4, -0.05, 0.25, 0.15],
])
def test_wilcoxon_equals_scipy(diffs):
    want = scipy_stats.wilcoxon(diffs, zero_method="wilcox", correction=False, method="approx").pvalue
    assert wilcoxon_signed_rank(diffs) == pytest.approx(want, rel=1e-9)
    assert wilcoxon_signed_rank([0.0, 0.0]) == 1.0


def test_committed_runs_agree_with_their_own_reports():
    """The recipe's and the math-only weights (issue #17): each side's KL means, accuracy and
    agreement equal what each run's results.json says; the paired wins/losses add up."""
    a, b = read_side(str(RUNS / "eval_recipe")), read_side(str(RUNS / "eval_math_only"))
    result = compare(a, b, ["arc_challenge", "marble_db", "multihop_qa"])
    reports = [json.loads((RUNS / d / "results.json").read_text()) for d in ("eval_recipe", "eval_math_only")]
    pairs = {p["mode_a"]: p for p in result["pairs"]}
    assert set(pairs) == {"single", "naive_cache", "mapper_only", "lora_only", "psynth"}
    for mode in ("naive_cache", "mapper_only", "lora_only", "psynth"):
        pooled = pairs[mode]["all"]
        assert pooled["n"] == pooled["kl"]["n"] == 90
        for side, report in enumerate(reports):  # the recipe's report also pools tool_calls: per task here
            for task, m in pairs[mode]["tasks"].items():
                assert m["kl"]["mean"][side] == pytest.approx(report["kl_from_text"][task][mode]["mean"], abs=1e-9)
                own = report["tasks"][task][mode]
                assert m["accuracy"][side] == pytest.approx(own["accuracy"])
                assert m["agreement_with_text"][side] == pytest.approx(own["agreement_with_text"])
        assert pooled["kl"]["mean_diff"] == pytest.approx(pooled["kl"]["mean"][1] - pooled["kl"]["mean"][0])
    # naive_cache uses no trained weight: the same KL on every example, so no difference to test
    assert pairs["naive_cache"]["all"]["kl"]["p_wilcoxon"] == 1.0
    assert pairs["naive_cache"]["all"]["b_vs_a"] == {"wins": 0, "losses": 0, "p_mcnemar": 1.0}


def _record(task: str, i: int, mode: str, *, correct: bool, answer: str, kl: float | None) -> dict:
    """A records.jsonl row as runs before kl.jsonl wrote them: the mode's KL inside its answer."""
    return {**dataclasses.asdict(ModeRecord(task=task, id=str(i), mode=mode, answer=answer, correct=correct,
                                            text=f"t{i}", output_tokens=1, prompt_tokens=1, branch_tokens=1,
                                            num_branches=2, ttft_s=None, breakdown={}, device="cpu")),
            "kl_from_text": kl}


def _write_run(run_dir: Path, records: list[dict], tokens: list[list[int]]) -> Path:
    run_dir.mkdir(parents=True)
    with (run_dir / RECORDS).open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with (run_dir / BRANCHES).open("w") as f:
        f.writelines(json.dumps(dataclasses.asdict(BranchSet("qa", str(i), 0, [t], ["x"]))) + "\n"
                     for i, t in enumerate(tokens))
    return run_dir


def test_two_modes_by_hand_and_the_cli(tmp_path, capsys):
    """RUN:naive_cache against RUN2:psynth on 4 examples: counts and means by hand; --out writes both files."""
    text = [_record("qa", i, "text", correct=c, answer=a, kl=None) for i, (c, a) in enumerate(
        [(True, "x"), (False, "y"), (True, "z"), (False, "w")])]
    naive = [_record("qa", i, "naive_cache", correct=c, answer=a, kl=k) for i, (c, a, k) in enumerate(
        [(False, "q", 0.4), (False, "y", 0.5), (True, "z", 0.3), (False, "q", float("nan"))])]
    trained = [_record("qa", i, "psynth", correct=c, answer=a, kl=k) for i, (c, a, k) in enumerate(
        [(True, "x", 0.2), (True, "y", 0.6), (True, "z", 0.1), (False, "w", 0.2)])]
    a = _write_run(tmp_path / "a", text + naive, [[1], [2], [3], [4]])
    b = _write_run(tmp_path / "b", text + trained, [[1], [2], [3], [4]])
    out = tmp_path / "cmp" / "n_vs_p.json"
    assert psynth_main.main(["compare", f"{a}:naive_cache", f"{b}:psynth", "--out", str(out)]) == 0
    (pair,) = json.loads(out.read_text())["pairs"]
    m = pair["all"]
    assert (pair["mode_a"], pair["mode_b"], m["n"]) == ("naive_cache", "psynth", 4)
    assert m["accuracy"] == [0.25, 0.75] and m["b_vs_a"]["wins"] == 2 and m["b_vs_a"]["losses"] == 0
    assert m["agreement_with_text"] == [0.5, 1.0]
    assert m["kl"]["n"] == 3  # the NaN (an empty text answer) is left out
    assert m["kl"]["mean"] == pytest.approx([0.4, 0.3]) and m["kl"]["mean_diff"] == pytest.approx(-0.1)
    assert m["kl"]["b_lower"] == pytest.approx(2 / 3)
    assert "| pooled | 4 (KL 3) | 0.400 | 0.300 | -0.100 |" in out.with_suffix(".md").read_text()
    assert "naive_cache (A) vs psynth (B)" in capsys.readouterr().out


def test_a_kl_only_run_pairs_on_kl(tmp_path):
    """Side B measured its KL without answering (kl.jsonl beside copied text records): the pair
    has KL on every example and no answers; accuracy and agreement are then absent, not zero."""
    text = [_record("qa", i, "text", correct=True, answer="x", kl=None) for i in range(3)]
    naive = [_record("qa", i, "naive_cache", correct=False, answer="y", kl=k) for i, k in enumerate([0.4, 0.5, 0.3])]
    a = _write_run(tmp_path / "a", text + naive, [[1], [2], [3]])
    b = _write_run(tmp_path / "b", text, [[1], [2], [3]])
    (b / KL).write_text("".join(json.dumps({"task": "qa", "id": str(i), "mode": m, "kl_from_text": v}) + "\n"
                                for i, (m, v) in enumerate([("psynth", 0.2), ("psynth", 0.6), ("psynth", None)])))
    result = compare(read_side(f"{a}:naive_cache"), read_side(f"{b}:psynth"))
    m = result["pairs"][0]["all"]
    assert m["n"] == 0 and m["accuracy"] is None and m["agreement_with_text"] == [None, None]
    assert m["kl"]["n"] == 2 and m["kl"]["mean"] == pytest.approx([0.45, 0.4])  # the None is left out
    assert "| pooled | 0 (KL 2) | 0.450 | 0.400 | -0.050 | 50.0 | 0.655 | - | - | - | - | - |" in comparison_markdown(result)
    # modes found by their KL alone are compared when no mode is named
    assert [(p["mode_a"], p["mode_b"]) for p in compare(read_side(str(b)), read_side(str(b)))["pairs"]] == [
        ("psynth", "psynth")]


def test_refuses_what_is_not_paired(tmp_path, capsys):
    recs = [_record("qa", 0, "text", correct=True, answer="x", kl=None),
            _record("qa", 0, "psynth", correct=True, answer="x", kl=0.1)]
    a = _write_run(tmp_path / "a", recs, [[1, 2]])
    other_branches = _write_run(tmp_path / "b", recs, [[1, 3]])
    with pytest.raises(ValueError, match="different branches for 1 of 1 examples"):
        compare(read_side(str(a)), read_side(str(other_branches)))
    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / RECORDS).write_text((c / RECORDS).read_text().replace('"text": "t0"', '"text": "other"', 1))
    with pytest.raises(ValueError, match="different text-path answers"):
        compare(read_side(str(a)), read_side(str(c)))
    with pytest.raises(ValueError, match="share no answered or KL-measured example of tasks arc"):
        compare(read_side(str(a)), read_side(str(c)), ["arc"])
    assert psynth_main.main(["compare", f"{a}:lora_only", str(c)]) == 2
    assert "has no records of mode 'lora_only' (it has psynth, text)" in capsys.readouterr().err
    assert psynth_main.main(["compare", str(tmp_path / "missing"), str(a)]) == 2
    assert "no answers in records.jsonl" in capsys.readouterr().err


def test_by_groups_partition_the_examples_and_recompute_within_each(tmp_path, capsys):
    """`--by`: on issue #17's committed runs, each task's groups (and the pooled ones) split its
    examples exactly, each group's KL means are those of its own examples' kl values, and token
    counts fall in thirds with ordered, disjoint ranges; on 6 made-up examples the thirds are
    known by hand; an unknown grouping is refused by name."""
    a, b = read_side(str(RUNS / "eval_recipe") + ":naive_cache"), read_side(str(RUNS / "eval_math_only") + ":psynth")
    tasks = ["arc_challenge", "marble_db", "multihop_qa"]
    (pair,) = compare(a, b, tasks, by=["k", "branch_tokens", "answer_tokens"])["pairs"]
    field = {"k": "num_branches", "branch_tokens": "branch_tokens", "answer_tokens": "output_tokens"}
    for grouping, by_task in pair["by"].items():
        assert list(by_task) == [*tasks, "pooled"]
        for task, groups in by_task.items():
            whole = pair["all"] if task == "pooled" else pair["tasks"][task]
            assert sum(g["n"] for g in groups.values()) == whole["n"] == (90 if task == "pooled" else 30)
            assert sum(g["kl"]["n"] for g in groups.values()) == whole["kl"]["n"]
            lows = []
            for label, g in groups.items():
                keys = [k[:2] for k in a.records if k[2] == "text" and k[0] in tasks and task in ("pooled", k[0])]
                if grouping == "k":
                    mine = [k for k in keys if f"K={a.records[k + ('text',)].num_branches}" == label]
                else:
                    lo, hi = map(int, label.split()[-1].split("-"))
                    mine = [k for k in keys if lo <= getattr(a.records[k + ("text",)], field[grouping]) <= hi]
                    lows.append((lo, hi))
                assert len(mine) == g["n"], (grouping, task, label)
                want = [sum(s.kl[k + (m,)] for k in mine) / len(mine) for s, m in ((a, "naive_cache"), (b, "psynth"))]
                assert g["kl"]["mean"] == pytest.approx(want, abs=1e-9)
            assert all(h < lo for (_, h), (lo, _) in zip(lows, lows[1:]))  # ordered, disjoint ranges
    # made-up: branch tokens 10..60 on 6 examples: thirds of two each
    recs = [{**_record("qa", i, m, correct=True, answer="x", kl=0.1 * (i + 1) if m == "psynth" else None),
             "branch_tokens": 10 * (i + 1)} for i in range(6) for m in ("text", "psynth")]
    run = _write_run(tmp_path / "r", recs, [[i] for i in range(6)])
    (p,) = compare(read_side(str(run)), read_side(str(run)), by=["branch_tokens"])["pairs"]
    assert {label: g["n"] for label, g in p["by"]["branch_tokens"]["pooled"].items()} == {
        "branch_tokens 10-20": 2, "branch_tokens 30-40": 2, "branch_tokens 50-60": 2}
    assert psynth_main.main(["compare", str(run), str(run), "--by", "k"]) == 0
    assert "| qa, K=2 | 6 (KL 6) |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown grouping 'length': expected one of k, branch_tokens"):
        compare(read_side(str(run)), read_side(str(run)), by=["length"])
