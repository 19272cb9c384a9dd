"""Users' own evaluation data without code: the generic multiple-choice and short-answer tasks
with field names from the eval config; the multi-hop and tool-call tasks on held-out rows with
given branches; exact match / F1 and exact call match against hand-checked cases; and the eval
runner on a task whose branches are given (stored as tokens, never decoded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psynth_jax.config.eval_schema import ConfigError, TaskFields, load_eval_config
from psynth_jax.eval.runner import load_examples, run_eval
from psynth_jax.eval.scoring import extract_answer, f1, normalize_qa, qa_exact_match, qa_f1, score
from psynth_jax.eval.tasks import load_task
from psynth_jax.formats import splits
from psynth_jax.formats.tool_calls import calls_match, parse_calls
from psynth_jax.model.transformer import LoRAConfig
from tiny_smol import random_tiny_smol

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MC_ROWS = [
    {"qid": "q1", "prompt": "Which planet is largest?", "opts": ["Mars", "Jupiter", "Venus"], "correct": 1},
    {"qid": "q2", "prompt": "Boiling point of water at sea level?", "opts": ["90 C", "100 C", "110 C", "120 C"],
     "correct": "B"},
    {"qid": "q3", "prompt": "Opposite of hot?", "opts": {"a": "warm", "b": "cold"}, "correct": "cold"},
]
QA_ROWS = [
    {"question": "Who wrote Hamlet?", "answers": ["William Shakespeare", "Shakespeare"],
     "paragraphs": ["Hamlet is a tragedy by William Shakespeare.", {"title": "Globe", "text": "A London theatre."}]},
    {"question": "Capital of France?", "answers": "Paris"},
]


def test_generic_multiple_choice_with_field_names(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", MC_ROWS)
    fields = TaskFields(id="qid", question="prompt", choices="opts", answer="correct")
    exs = load_task("mc", path=str(path), fields=fields)
    assert [(e.id, e.gold) for e in exs] == [("mc/q1", "B"), ("mc/q2", "B"), ("mc/q3", "B")]
    assert all(e.family == "multiple_choice" for e in exs)
    assert exs[0].question == "Which planet is largest?\n\nA. Mars\nB. Jupiter\nC. Venus"
    assert score(exs[0], "It is Jupiter. \\boxed{B}") and not score(exs[0], "\\boxed{A}")
    with pytest.raises(ValueError, match=r"mine.jsonl:1: mc: none of the fields \['nope'\]"):
        load_task("mc", path=str(path), fields=TaskFields(question="prompt", choices="opts", answer="nope"))


def test_generic_qa_with_context_as_branches_and_an_eval_config(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(f"tasks:\n  - {{name: qa, path: {path}, fields: {{context: paragraphs}}, branches: 3}}\n"
                        f"out_dir: {tmp_path / 'run'}\n")
    exs = load_examples(load_eval_config(cfg_path))["qa"]
    assert [e.extra.get("branches") for e in exs] == [
        ["Hamlet is a tragedy by William Shakespeare.", "Globe\nA London theatre."], None]
    assert exs[0].extra["answers"] == ["William Shakespeare", "Shakespeare"] and exs[0].family == "qa"
    assert score(exs[0], "\\boxed{shakespeare.}") and not score(exs[0], "\\boxed{Marlowe}")
    assert score(exs[1], "The answer: \\boxed{\\text{Paris}}")
    # the generic tasks read the user's file: no path is a config error naming the field
    cfg_path.write_text(f"tasks:\n  - {{name: mc}}\nout_dir: {tmp_path / 'run'}\n")
    with pytest.raises(ConfigError, match=r"tasks\[0\].path: task 'mc' reads your own file"):
        load_eval_config(cfg_path)


def test_qa_exact_match_and_f1_hand_checked():
    assert normalize_qa("The  Eiffel Tower!") == "eiffel tower"
    assert qa_exact_match("the eiffel tower", ["Eiffel Tower"]) and not qa_exact_match("Eiffel", ["Eiffel Tower"])
    assert not qa_exact_match("", ["a"])  # an empty answer is never right ("a" normalises to "")
    # "eiffel tower in paris" vs "eiffel tower": 2 common tokens, precision 2/4, recall 2/2 -> F1 2/3
    assert qa_f1("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 / 3)
    assert qa_f1("Paris", ["London", "Paris, France"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best alias
    assert qa_f1("nothing shared", ["Eiffel Tower"]) == 0.0


def test_exact_call_match_hand_checked():
    gold = [{"name": "weather.get", "arguments": {"city": ["New York", "NYC"], "unit": ["", "celsius"]}},
            {"name": "time.now", "arguments": {"zone": ["EST"]}}]
    ok = "\\boxed{[time.now(zone='EST'), weather.get(city='new-york')]}"  # any order, BFCL string normalisation
    assert calls_match(parse_calls(ok), gold)
    assert calls_match(parse_calls("[weather.get(city='NYC', unit='celsius'), time.now(zone='EST')]"), gold)
    for wrong in ("[weather.get(city='Boston'), time.now(zone='EST')]",  # a wrong value
                  "[weather.get(unit='celsius'), time.now(zone='EST')]",  # a required argument missing
                  "[weather.get(city='NYC', days=3), time.now(zone='EST')]",  # an argument the function lacks
                  "[weather.get(city='NYC')]",  # a call missing
                  "[weather.get(city='NYC'), weather.get(city='NYC')]",  # one gold call matched twice
                  "no calls at all"):
        assert not calls_match(parse_calls(wrong), gold), wrong
    numeric = [{"name": "area", "arguments": {"r": [5.0], "opts": [{"round": [2, ""]}]}}]
    assert calls_match(parse_calls("area(r=5, opts={'round': 2})"), numeric)  # int for float; nested values
    assert not calls_match(parse_calls("area(r=5, opts={'round': 3})"), numeric)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")
def test_multihop_and_tool_tasks_read_only_held_out_rows_with_given_branches():
    hop = load_task("multihop_qa", limit=30)
    assert len(hop) == 30 and all(splits.is_heldout(splits.MULTIHOP, e.extra["row_id"]) for e in hop)
    for e in hop:
        assert e.family == "qa" and e.extra["branch_role"] == "paragraph"
        assert len(e.extra["branches"]) == max(4, sum(e.extra["supporting"])) and any(e.extra["supporting"])
        assert score(e, f"\\boxed{{{e.gold}}}") and f1(e, extract_answer(e, f"\\boxed{{{e.gold}}}")) == 1.0
    tools = load_task("tool_calls")
    assert tools and all(splits.is_heldout(splits.TOOL_CALLS, e.id) for e in tools)
    for e in tools:
        names = {json.loads(doc)["name"] for doc in e.extra["branches"]}
        assert {g["name"] for g in e.extra["gold_calls"]} <= names and e.extra["branch_role"] == "function"
        assert score(e, f"\\boxed{{{e.gold}}}") and not score(e, "\\boxed{[]}")


def test_runner_stores_given_branches_as_tokens_and_reports_f1(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:1])
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(f"tasks:\n  - {{name: qa, path: {path}, fields: {{context: paragraphs}}}}\n"
                        f"modes: [text, naive_cache]\nmax_new_tokens: 4\ntiming_repeats: 0\n"
                        f"out_dir: {tmp_path / 'run'}\n")
    model = random_tiny_smol(LoRAConfig())
    out = run_eval(load_eval_config(cfg_path), model=model, quiet=True)
    stored = [json.loads(line) for line in (out.run_dir / "branches.jsonl").read_text().splitlines()]
    paragraphs = ["Hamlet is a tragedy by William Shakespeare.", "Globe\nA London theatre."]
    assert stored[0]["texts"] == paragraphs and out.computed.get("worker_calls", 0) == 0
    assert stored[0]["tokens"] == [model.tokenizer.encode(p, add_special_tokens=False) for p in paragraphs]
    assert set(out.results["f1"]["qa"]) == {"text", "naive_cache"}
    assert all(0.0 <= v <= 1.0 for v in out.results["f1"]["qa"].values())
    assert "mean token F1" in (out.run_dir / "results.md").read_text()
