"""Model-free example builders on the shipped GSM8K / MATH files: determinism, branch layout,
aggregation candidates, exposure chunks, row parsing and the example row format."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from psynth_jax.config.schema import DataConfig, DataSourceConfig
from psynth_jax.data.builders import build_examples
from psynth_jax.data.chunking import normalize_space, split_contiguous
from psynth_jax.data.examples import SynthesisExample, read_examples, write_examples
from psynth_jax.data.problems import parse_problem
from psynth_jax.data.sources import SourceError, load_stage, parse_problems
from psynth_jax.formats.boxed import last_boxed
from psynth_jax.formats.records import read_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "gsm8k" / "train.jsonl"
MATH = DATA / "math" / "math_train12k_prm800k_style_reconstructed.jsonl"
K = 3


@pytest.fixture(scope="module")
def gsm8k_rows():
    return read_records(GSM8K)[:60]


@pytest.fixture(scope="module")
def gsm8k_problems(gsm8k_rows):
    problems, missing = parse_problems(gsm8k_rows, "gsm8k/train")
    assert missing == 0 and len(problems) == 60
    return problems


@pytest.fixture(scope="module")
def math_problems():
    problems, _ = parse_problems(read_records(MATH)[:60], "math/train")
    return problems


def _gold(row: dict) -> str:
    return row["answer"].split("####")[-1].strip().replace(",", "")


@pytest.mark.parametrize("builder,variant", [("exposure", "candidates"), ("aggregation", "candidates"),
                                             ("aggregation", "evidence")])
def test_builders_are_deterministic_and_have_k_branches(gsm8k_problems, builder, variant):
    a = build_examples(gsm8k_problems, builder, K, seed=7, variant=variant).examples
    b = build_examples(gsm8k_problems, builder, K, seed=7, variant=variant).examples
    assert a == b and len(a) >= 50
    assert len({e.id for e in a}) == len(a)
    for e in a:
        assert e.num_branches == K and all(br.output.strip() for br in e.branches)
    # per-example randomness: an example does not depend on which other rows were read
    assert build_examples(gsm8k_problems[:10], builder, K, seed=7, variant=variant).examples == [
        e for e in a if int(e.id.rsplit("/", 1)[1]) < 10
    ]


def test_targets_end_with_the_gsm8k_gold_answer(gsm8k_rows, gsm8k_problems):
    gold = {f"gsm8k/train/{i}": _gold(r) for i, r in enumerate(gsm8k_rows)}
    for builder in ("exposure", "aggregation"):
        for e in build_examples(gsm8k_problems, builder, K, seed=0).examples:
            answer = gold[e.id.split("/", 1)[1]]
            assert e.target.endswith(f"\\boxed{{{answer}}}"), e.target
            assert e.meta["answer"] == answer
            assert "<<" not in e.target  # calculator annotations are removed


def test_aggregation_has_correct_and_corrupted_candidates(gsm8k_problems, math_problems):
    for problems in (gsm8k_problems, math_problems):
        examples = build_examples(problems, "aggregation", K, seed=3).examples
        assert len(examples) >= len(problems) - 2
        positions = set()
        for e in examples:
            correct = e.meta["correct"]
            assert any(correct) and not all(correct)
            for br, ok, ans in zip(e.branches, correct, e.meta["candidate_answers"]):
                assert last_boxed(br.output) == ans
                assert (br.output == e.target) == ok
                assert (ans == e.meta["answer"]) == ok
            positions.add(correct.index(True))
        assert len(positions) > 1  # shuffled: the correct one is not always first
    a = build_examples(gsm8k_problems, "aggregation", K, seed=3).examples
    b = build_examples(gsm8k_problems, "aggregation", K, seed=4).examples
    assert a != b


def test_exposure_branches_concatenate_to_the_solution_steps(gsm8k_problems, math_problems):
    for problems in (gsm8k_problems, math_problems):
        for p, e in zip(problems, build_examples(problems, "exposure", K, seed=0).examples, strict=True):
            assert normalize_space(" ".join(b.output for b in e.branches)) == normalize_space(p.reasoning)
            assert e.target == p.solution and last_boxed(e.target) == p.answer
            assert all(f"part {i + 1} of {K}" in b.prefix for i, b in enumerate(e.branches))
    # GSM8K steps are lines: with as many lines as branches, each branch is one step
    p = next(p for p in gsm8k_problems if p.reasoning.count("\n") == K - 1)
    e = build_examples([p], "exposure", K, seed=0).examples[0]
    assert [b.output for b in e.branches] == p.reasoning.split("\n")


def test_evidence_splits_the_facts_and_keeps_the_ask(gsm8k_problems):
    for p, e in zip(gsm8k_problems, build_examples(gsm8k_problems, "aggregation", K, 0, variant="evidence").examples):
        assert e.question != p.question and p.question.endswith(e.question)
        facts = normalize_space(" ".join(b.output for b in e.branches))
        assert normalize_space(f"{facts} {e.question}") == normalize_space(p.question)


def test_split_contiguous():
    assert split_contiguous("a\nb\nc\nd", 2) == ["a\nb", "c\nd"]
    assert split_contiguous("One. Two three four five six.", 2) == ["One.", "Two three four five six."]
    assert split_contiguous("a b", 3) is None and split_contiguous("   ", 1) is None
    assert split_contiguous("a b c", 3) == ["a", "b", "c"]


def test_math_schema_and_unusable_rows():
    row = {"problem": " What is $1+1$? ", "solution": "It is $\\boxed{2}$.", "unique_id": "x/1.json"}
    p = parse_problem(row, 5, "m")
    assert (p.id, p.question, p.answer, p.solution) == ("m/x/1.json", "What is $1+1$?", "2", "It is $\\boxed{2}$.")
    assert parse_problem({"question": "q", "answer": "no final answer"}, 0, "g") is None
    with pytest.raises(ValueError, match="neither the GSM8K schema"):
        parse_problem({"text": "?"}, 0, "bad")
    # an answer with no digits cannot be corrupted: skipped and counted
    p = parse_problem({"problem": "Which?", "solution": "So $\\boxed{x}$."}, 0, "m")
    result = build_examples([p], "aggregation", K, seed=0)
    assert result.examples == [] and sum(result.skipped.values()) == 1


def test_example_rows_round_trip(tmp_path, gsm8k_problems):
    examples = build_examples(gsm8k_problems[:5], "aggregation", K, seed=0).examples
    assert [SynthesisExample.from_dict(e.to_dict()) for e in examples] == examples
    for name in ("ex.jsonl", "ex.parquet"):
        write_examples(tmp_path / name, examples)
        assert read_examples(tmp_path / name) == examples


def test_load_stage_from_config_sources(tmp_path, gsm8k_problems):
    def load(*sources):
        return load_stage(DataConfig(train=sources, num_branches=K, seed=1)).examples

    examples = load(DataSourceConfig(path=str(GSM8K), builder="exposure", limit=20),
                    DataSourceConfig(path=str(GSM8K), builder="aggregation", limit=10))
    assert [e.id.split("/")[0] for e in examples] == ["exposure"] * 20 + ["aggregation"] * 10
    assert {e.meta["source"] for e in examples} == {"gsm8k/train:exposure", "gsm8k/train:aggregation"}
    # prebuilt example files are read as they are, whatever their builder
    prebuilt = build_examples(gsm8k_problems[:4], "exposure", K, seed=9).examples
    write_examples(tmp_path / "pre.jsonl", prebuilt)
    loaded = load(DataSourceConfig(path=str(tmp_path / "pre.jsonl"), builder="distillation"))
    assert [dataclasses.replace(e, meta=p.meta) for e, p in zip(loaded, prebuilt)] == prebuilt
    with pytest.raises(SourceError, match="distillation sources need the backbone"):
        load(DataSourceConfig(path=str(GSM8K), builder="distillation", limit=2))
    with pytest.raises(FileNotFoundError, match=re.escape("no_such.jsonl")):
        load(DataSourceConfig(path="no_such.jsonl", builder="exposure"))
