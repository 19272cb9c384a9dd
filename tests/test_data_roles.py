"""Every data role's converters and builders on the shipped files (small limits): chat rounds,
worked examples, evidence paragraphs, tool calls; their hub / user layouts; format detection,
skips by reason, held-out rows, and the mixture arithmetic (caps, weights, empty stages)."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import pytest

from psynth_jax.config import ConfigError, load_config, validate
from psynth_jax.config.schema import DataConfig, DataSourceConfig
from psynth_jax.data import chat
from psynth_jax.data.build import BuildSpec
from psynth_jax.data.evidence import build_evidence, target_text
from psynth_jax.data.mixture import apply_cap, apply_weight, weighted_count
from psynth_jax.data.sources import SourceError, load_stage, read_rows
from psynth_jax.data.tool_use import build_tool_calls
from psynth_jax.formats import splits
from psynth_jax.formats.multihop import parse_multihop
from psynth_jax.formats.records import read_records
from psynth_jax.formats.tool_calls import calls_match, parse_calls, parse_problem

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OASST = DATA / "multi_turn_chat" / "oasst1_en_validation.jsonl"
TREES = DATA / "multi_turn_chat" / "oasst_en_100_trees.jsonl"
FLAN_COT = DATA / "instructions_icl" / "flan_cot"
P3 = DATA / "instructions_icl" / "p3_t0"
TWOWIKI = DATA / "multihop_evidence" / "2wikimultihopqa_train500_migres.jsonl"
HOTPOT = DATA / "multihop_evidence" / "hotpotqa_200_migres.jsonl"
MUSIQUE = DATA / "multihop_evidence" / "musique_100_migres.jsonl"
BFCL = DATA / "tool_calls"
SPEC = BuildSpec("test", seed=5, k=(), k_min=1, k_max=8)
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")


def stage(*sources: DataSourceConfig, **data) -> list:
    return load_stage(DataConfig(train=sources, **data)).examples


# ------------------------------------------------------------------------------ chat rounds
def test_oasst_paths_become_rounds_question_and_reply():
    rows = read_records(OASST)
    by_id = {r["message_id"]: r for r in rows}
    result = chat.build_chat(rows, dataclasses.replace(SPEC, k_min=2), oasst=True)
    assert result.examples and result.skipped["fewer than min_branches earlier rounds"] > 0
    for ex in result.examples:
        leaf = by_id[ex.id.rsplit("/", 1)[1]]
        path = [leaf]
        while path[-1]["parent_id"] is not None:
            path.append(by_id[path[-1]["parent_id"]])
        path.reverse()  # root ... leaf: user, assistant, user, assistant, ...
        assert [m["role"] for m in path] == ["prompter", "assistant"] * (len(path) // 2)
        assert ex.target == leaf["text"].strip() and ex.question == path[-2]["text"].strip()
        assert ex.family == "chat" and ex.num_branches == len(path) // 2 - 1 >= 2
        for i, branch in enumerate(ex.branches):
            user, reply = path[2 * i]["text"].strip(), path[2 * i + 1]["text"].strip()
            assert branch.output == f"User: {user}\n\nAssistant: {reply}"
            assert f"round {i + 1}" in branch.prefix
        assert all(not m["deleted"] and m["review_result"] is not False for m in path)


def test_nested_trees_drop_synthetic_messages_and_keep_the_most_recent_rounds():
    rows = read_records(TREES)
    synthetic_roots = {r["message_tree_id"] for r in rows if r["prompt"].get("synthetic")}
    assert synthetic_roots  # 5 synthetic trees ship
    examples = chat.build_chat(rows, dataclasses.replace(SPEC, k_max=1), oasst=True).examples
    assert examples and all(ex.num_branches == 1 for ex in examples)
    texts = {m["message_id"]: m for r in rows for m in _walk(r["prompt"])}
    for ex in examples:
        assert not texts[ex.id.rsplit("/", 1)[1]].get("synthetic")


def _walk(node):
    yield node
    for reply in node.get("replies") or []:
        yield from _walk(reply)


def test_user_message_lists_ultrachat_sharegpt_lmsys_build_the_same_example(tmp_path):
    turns = [("user", "Name a prime."), ("assistant", "7."), ("user", "Another?"), ("assistant", "11."),
             ("user", "Their sum?"), ("assistant", "18.")]
    rows = [
        {"prompt_id": "u1", "messages": [{"role": r, "content": t} for r, t in turns]},  # UltraChat
        {"id": "s1", "conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": t}
                                       for r, t in turns]},  # ShareGPT
        {"conversation_id": "l1", "conversation": [{"role": r, "content": t} for r, t in turns], "turn": 3},  # lmsys
        {"id": "bad", "messages": [{"role": "user", "content": "no reply"}]},
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = stage(DataSourceConfig(path=str(path), builder="exposure"))
    assert [e.id.rsplit("/", 1)[1] for e in examples] == ["u1", "s1", "l1"]
    for e in examples:
        assert (e.question, e.target) == ("Their sum?", "18.")
        assert [b.output for b in e.branches] == ["User: Name a prime.\n\nAssistant: 7.",
                                                  "User: Another?\n\nAssistant: 11."]
    # the row without a final user turn and reply is skipped and counted, not fatal
    report = load_stage(DataConfig(train=(DataSourceConfig(path=str(path), builder="exposure"),))).sources[0]
    assert report.skipped == {"no final user turn and reply": 1} and report.built == 3


# -------------------------------------------------------------------------- worked examples
def test_flan_cot_worked_examples_of_the_same_task_as_branches():
    src = DataSourceConfig(path=str(FLAN_COT / "*.tsv"), builder="exposure", limit=12, k=(2, 3, 4))
    rows = read_rows(src)
    assert len(rows) == 6 * 12 and {r["_task"] for r in rows} == {p.stem for p in FLAN_COT.glob("*.tsv")}
    examples = stage(src, seed=3)
    assert len(examples) == len(rows) and {e.num_branches for e in examples} == {2, 3, 4}
    by_question = {(r["_task"], r["question"].strip()): r for r in rows}
    for e in examples:
        task = e.meta["task"]
        query = by_question[(task, e.question)]
        worked = f"{query['rationale'].strip()} So the answer is {query['answer'].strip()}."
        assert e.family == "icl" and e.target == worked
        for b in e.branches:
            demo_q = b.output.removeprefix("Question: ").split("\nAnswer: ")[0]
            assert b.output.startswith("Question: ") and "\nAnswer: " in b.output
            assert (task, demo_q) in by_question and demo_q != e.question  # same task, another row
    assert "\\n" not in examples[0].question and "\\n" not in examples[0].target  # TSV escapes decoded


def test_p3_completions_drop_end_of_text_and_group_by_template():
    src = DataSourceConfig(path=str(P3 / "common_gen_*.jsonl"), builder="exposure", limit=5)
    examples = stage(src, num_branches=3)
    assert len(examples) == 4 * 5 and all(e.num_branches == 3 for e in examples)
    assert all("<|endoftext|>" not in e.target and "<|endoftext|>" not in b.output for e in examples
               for b in e.branches)
    assert {e.meta["task"] for e in examples} == {p.stem for p in P3.glob("common_gen_*.jsonl")}


# ---------------------------------------------------------------------- evidence paragraphs
def test_2wiki_supporting_paragraphs_are_branches_and_the_answer_is_the_target():
    rows = read_records(TWOWIKI)[:40]
    result = build_evidence(rows, dataclasses.replace(SPEC, variant="short"))
    heldout = [r for r in rows if splits.is_heldout(splits.MULTIHOP, r["_id"])]
    assert result.skipped == ({"held out for evaluation": len(heldout)} if heldout else {})
    assert len(result.examples) == len(rows) - len(heldout) > 20
    by_id = {r["_id"]: r for r in rows}
    for e in result.examples:
        row = by_id[e.id.rsplit("/", 1)[1]]
        support = {t for t, _ in row["supporting_facts"]}
        titles = [b.output.split("\n", 1)[0] for b in e.branches]
        assert support <= set(titles) and e.num_branches >= len(support)
        context = {t: " ".join(s) for t, s in row["context"]}
        assert all(b.output.split("\n", 1)[1] == context[t] for b, t in zip(e.branches, titles))
        assert e.target == f"\\boxed{{{row['answer']}}}" and e.question == row["question"]
        assert e.meta["supporting"] == [t in support for t in titles]
    # shuffled: the supporting paragraphs are not always first
    assert any(not e.meta["supporting"][0] for e in result.examples)


def test_reasoned_target_names_supporting_passages_and_facts():
    q = parse_multihop(read_records(TWOWIKI)[0])
    text = target_text(q, "reasoned")
    assert text.endswith(f"So the answer is \\boxed{{{q.answer}}}.")
    assert all(p.title in text for p in q.supporting) and all(s in text for s in q.evidence)
    m = parse_multihop(read_records(MUSIQUE)[0])  # MuSiQue: the hops' sub-answers in order
    assert m.evidence[-1].endswith(f": {m.answer}") and "#1" not in " ".join(m.evidence)


def test_hub_layouts_parse_like_the_originals():
    row = read_records(HOTPOT)[0]
    hub = {**row, "context": {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]},
           "supporting_facts": json.dumps({"title": [t for t, _ in row["supporting_facts"]],
                                           "sent_id": [i for _, i in row["supporting_facts"]]})}
    assert parse_multihop(hub) == parse_multihop(row)
    assert parse_multihop(row).dataset == "hotpotqa"


def test_multihop_rows_lacking_fields_are_skipped_by_reason():
    rows = read_records(MUSIQUE)[:6]
    rows[1] = {k: v for k, v in rows[1].items() if k != "answer"}
    rows[2] = {**rows[2], "paragraphs": [{**p, "is_supporting": False} for p in rows[2]["paragraphs"]]}
    result = build_evidence(rows, SPEC)
    assert result.skipped["no answer"] == 1 and result.skipped["no supporting paragraph"] == 1
    assert len(result.examples) + sum(result.skipped.values()) == 6


# ---------------------------------------------------------------------------- tool calls
def _bfcl(name: str, n: int) -> list[dict]:
    src = DataSourceConfig(path=str(BFCL / name), builder="aggregation", limit=n)
    return read_rows(src)


def test_bfcl_function_docs_as_branches_and_the_calls_as_target():
    rows = _bfcl("BFCL_v4_parallel_multiple.json", 30)
    result = build_tool_calls(rows, SPEC)
    kept = [r for r in rows if not splits.is_heldout(splits.TOOL_CALLS, r["id"])]
    assert len(result.examples) == len(kept) and result.skipped.get("held out for evaluation", 0) == 30 - len(kept)
    for e, row in zip(result.examples, kept):
        p = parse_problem(row)
        docs = [json.loads(b.output) for b in e.branches]
        assert sorted(d["name"] for d in docs) == sorted(f["name"] for f in p.functions)
        assert calls_match(parse_calls(e.target), p.gold) and e.family == "tool"


def test_bfcl_parallel_calls_one_per_branch():
    rows = _bfcl("BFCL_v4_parallel.json", 20)
    result = build_tool_calls(rows, dataclasses.replace(SPEC, variant="calls", k_min=2))
    for e in result.examples:
        p = parse_problem(next(r for r in rows if r["id"] == e.id.rsplit("/", 1)[1]))
        assert e.num_branches == len(p.gold) >= 2
        calls = [parse_calls(b.output) for b in e.branches]
        assert all(len(c) == 1 for c in calls) and calls_match([c[0] for c in calls], p.gold)
        assert calls_match(parse_calls(e.target), p.gold)
    # a function offered alone makes fewer branches than min_branches: skipped, counted
    single = build_tool_calls(_bfcl("BFCL_v4_simple_python.json", 8), dataclasses.replace(SPEC, k_min=2))
    assert not single.examples and sum(single.skipped.values()) == 8


def test_more_functions_than_max_branches_keep_the_ones_the_calls_use():
    rows = [r for r in _bfcl("BFCL_v4_live_multiple.json", 400) if len(r["function"]) > 6
            and not splits.is_heldout(splits.TOOL_CALLS, r["id"])][:5]
    result = build_tool_calls(rows, dataclasses.replace(SPEC, k_max=3))
    assert len(result.examples) == len(rows)
    for e, row in zip(result.examples, rows):
        names = {json.loads(b.output)["name"] for b in e.branches}
        assert e.num_branches == 3 and parse_problem(row).gold_names <= names


# ------------------------------------------------------------------ formats and bad input
def test_training_never_reads_held_out_rows():
    examples = stage(DataSourceConfig(path=str(DATA / "multihop_evidence" / "*.jsonl"), builder="aggregation"),
                     DataSourceConfig(path=str(BFCL / "BFCL_v4_*multiple.json"), builder="aggregation"))
    assert examples
    for e in examples:
        collection = splits.MULTIHOP if e.family == "qa" else splits.TOOL_CALLS
        assert not splits.is_heldout(collection, e.id.rsplit("/", 1)[1])


def test_unrecognised_source_fails_quoting_its_first_row(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"title": "not a dataset I know", "body": "x"}) + "\n")
    with pytest.raises(SourceError, match=r'data.train\[0\].*cannot recognise.*"title": "not a dataset I know"'):
        stage(DataSourceConfig(path=str(path), builder="exposure"))
    with pytest.raises(SourceError, match=r"format 'bfcl' does not fit its first row"):
        stage(DataSourceConfig(path=str(TWOWIKI), builder="aggregation", format="bfcl"))
    with pytest.raises(SourceError, match="exposure cannot use multihop rows"):
        stage(DataSourceConfig(path=str(TWOWIKI), builder="exposure"))
    with pytest.raises(SourceError, match="multihop rows have variants short, reasoned, not 'calls'"):
        stage(DataSourceConfig(path=str(TWOWIKI), builder="aggregation", variant="calls"))


# ------------------------------------------------------------------------------ mixture
def test_caps_and_weights_arithmetic():
    items = list(range(10))
    assert apply_cap(items, None, 0, "a") == items and apply_cap(items, 20, 0, "a") == items
    capped = apply_cap(items, 4, 0, "a")
    assert len(capped) == 4 and capped == sorted(capped) and apply_cap(items, 4, 0, "a") == capped
    assert apply_cap(items, 4, 0, "b") != capped or apply_cap(items, 4, 1, "a") != capped
    assert [weighted_count(10, w) for w in (0, 0.5, 1, 1.5, 2, 2.25)] == [0, 5, 10, 15, 20, 22]
    twice_and_a_half = apply_weight(items, 2.5, 0, "a")
    counts = collections.Counter(twice_and_a_half)
    assert len(twice_and_a_half) == 25 and set(counts.values()) == {2, 3} and sum(c == 3 for c in counts.values()) == 5
    assert apply_weight(items, 0, 0, "a") == []


def test_mixture_counts_per_source_in_the_stage():
    gsm8k = str(DATA / "gsm8k" / "train.jsonl")
    loaded = load_stage(DataConfig(train=(
        DataSourceConfig(name="a", path=gsm8k, builder="exposure", limit=20, cap=8, weight=2.0),
        DataSourceConfig(name="b", path=gsm8k, builder="aggregation", limit=20, weight=0.5),
        DataSourceConfig(name="c", path=gsm8k, builder="aggregation", limit=20, weight=0),
    )))
    reports = {r.name: r for r in loaded.sources}
    assert (reports["a"].built, reports["a"].capped, reports["a"].examples) == (20, 12, 16)
    assert (reports["b"].built, reports["b"].examples, reports["c"].rows, reports["c"].examples) == (20, 10, 0, 0)
    assert collections.Counter(e.meta["source"] for e in loaded.examples) == {"a": 16, "b": 10}


def test_a_stage_left_empty_fails_before_training_naming_it(tmp_path):
    gsm8k = str(DATA / "gsm8k" / "train.jsonl")
    zero = DataSourceConfig(path=gsm8k, builder="exposure", weight=0)
    with pytest.raises(ConfigError, match="data.train: every source has weight 0, so stage 'warmup' would have"):
        validate(dataclasses.replace(load_config(Path(__file__).parents[1] / "configs/smollm2_135m_cpu.yaml"),
                                     data=DataConfig(train=(zero,), stage="warmup")))
    # every row skipped by its builder: the stage is empty after building, and says so
    few = DataSourceConfig(path=str(FLAN_COT / "aqua_train.first1000.tsv"), builder="exposure", limit=2, k=(3,))
    with pytest.raises(ValueError, match=r"stage 'icl' \(data.train\) has no examples.*too few rows of its task"):
        load_stage(DataConfig(train=(few,), stage="icl"))
