"""Task loaders: shipped data, file-or-hub tasks on fixture files of each public schema, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from psynth_jax.formats import records
from psynth_jax.eval.scoring import score
from psynth_jax.eval.tasks import DATA_ENV, TASKS, load_task


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep datasets' Arrow cache of fixture files out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _shipped_or_skip() -> None:
    try:
        records.data_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------- shipped data


@pytest.mark.parametrize(
    "name,count,family",
    [("gsm8k", 1319, "math"), ("math500", 500, "math"), ("humaneval", 164, "code"), ("mbpp", 427, "code"),
     ("arc_challenge", 1150, "multiple_choice"), ("marble_db", 100, "diagnosis")],
)
def test_shipped_tasks_load_completely(name, count, family):
    _shipped_or_skip()
    examples = load_task(name)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    assert all(e.task == name and e.family == family and e.question and e.gold for e in examples)
    assert [e.id for e in load_task(name, limit=3)] == [e.id for e in examples[:3]]


def test_gsm8k_gold_is_the_number_after_hashes():
    _shipped_or_skip()
    examples = load_task("gsm8k")
    assert all(e.gold.lstrip("-").replace(".", "").isdigit() for e in examples)  # "2,125" -> "2125"
    assert examples[0].extra["solution"].rstrip().endswith(f"#### {examples[0].gold}")


def test_arc_question_lists_lettered_options():
    _shipped_or_skip()
    ex = load_task("arc_challenge", limit=1)[0]
    assert ex.extra["labels"] == ["A", "B", "C", "D"] and ex.gold == "C"
    assert "\nC. Planetary days will become shorter." in ex.question


def test_marble_examples_carry_profiles_labels_and_gold():
    _shipped_or_skip()
    for ex in load_task("marble_db"):
        x = ex.extra
        assert len(x["profiles"]) == len(x["labels"]) == 5
        for label, profile in zip(x["labels"], x["profiles"]):
            assert label in profile  # one expert per candidate root cause
        assert set(x["root_causes"]) <= set(x["labels"]) and ex.gold == ", ".join(x["root_causes"])
        assert x["max_labels"] == len(x["root_causes"]) + 1  # the release data: 2 for one cause, 3 for two
        assert f"at most {x['max_labels']}" in ex.question and all(label in ex.question for label in x["labels"])


def test_mbpp_reads_the_full_file_schema_too(tmp_path):
    _shipped_or_skip()
    full = records.data_dir() / "mbpp" / "mbpp.jsonl"
    examples = load_task("mbpp", path=full, limit=5)
    assert [e.id for e in examples] == [f"mbpp/{i}" for i in range(1, 6)]
    assert all(score(e, e.gold) for e in examples)


# ---------------------------------------------------------------- file-or-hub tasks


def test_aime_jsonl_and_parquet_schemas(tmp_path, hf_cache):
    lower = _jsonl(tmp_path / "aime24.jsonl", [{"id": 60, "problem": "Find x.", "answer": "025", "solution": "..."}])
    ex = load_task("aime2024", path=lower)[0]
    assert (ex.id, ex.family, ex.question, ex.gold) == ("aime2024/60", "math", "Find x.", "25")
    upper = tmp_path / "aime25.parquet"
    pd.DataFrame({"ID": ["2025-I-1"], "Problem": ["Compute y."], "Answer": [70]}).to_parquet(upper)
    ex = load_task("aime2025", path=upper)[0]
    assert (ex.id, ex.question, ex.gold) == ("aime2025/2025-I-1", "Compute y.", "70")
    assert score(ex, "so y = \\boxed{70}") and not score(ex, "\\boxed{71}")


def _gpqa_csv(tmp_path: Path) -> Path:
    rows = [
        {"Record ID": f"rec{i}", "Question": f"Question {i}?", "Correct Answer": f"right {i}",
         "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b", "Incorrect Answer 3": f"wrong {i}c",
         "Explanation": "because"}
        for i in range(12)
    ]
    path = tmp_path / "gpqa_diamond.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_gpqa_options_shuffled_deterministically(tmp_path, hf_cache):
    path = _gpqa_csv(tmp_path)
    a, b, c = (load_task("gpqa_diamond", path=path, seed=s) for s in (0, 0, 1))
    assert [e.question for e in a] == [e.question for e in b]
    assert [e.question for e in a] != [e.question for e in c]
    for ex in a + c:
        i = ex.id.split("rec")[-1]
        assert ex.extra["labels"] == ["A", "B", "C", "D"]
        assert f"\n{ex.gold}. right {i}" in ex.question  # the gold letter points at the correct text
        assert score(ex, f"\\boxed{{{ex.gold}}}")
    assert len({e.gold for e in a}) > 1  # the correct answer is not always in the same place
    assert load_task("gpqa_diamond", path=path, limit=3)[2].question == a[2].question  # stable under limit


def test_medqa_dict_options_and_bigbio_layout(tmp_path):
    options = {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"}
    dict_rows = [{"question": "Which drug?", "answer": "Nitrofurantoin", "options": options, "answer_idx": "D"}]
    ex = load_task("medqa", path=_jsonl(tmp_path / "medqa.jsonl", dict_rows))[0]
    assert ex.gold == "D" and ex.family == "multiple_choice" and "\nD. Nitrofurantoin" in ex.question
    bigbio = [{"id": "q7", "question": "Which drug?", "answer": "Ceftriaxone",
               "options": [{"key": k, "value": v} for k, v in options.items()]}]
    ex = load_task("medqa", path=_jsonl(tmp_path / "medqa_bigbio.jsonl", bigbio))[0]
    assert (ex.id, ex.gold) == ("medqa/q7", "B")


_HE_PLUS = {
    "task_id": "HumanEval/53",
    "prompt": 'def add(x: int, y: int):\n    """Add two numbers x and y\n    >>> add(2, 3)\n    5\n    """\n',
    "canonical_solution": "    return x + y\n",
    "entry_point": "add",
    "test": ("def check(candidate):\n"
             "    for x, y in [(0, 1), (-5, 7), (10**6, 3)]:\n"
             "        assert candidate(x, y) == x + y\n"),
}


def test_humaneval_plus_schema_and_scoring(tmp_path):
    ex = load_task("humaneval_plus", path=_jsonl(tmp_path / "he_plus.jsonl", [_HE_PLUS]))[0]
    assert (ex.id, ex.family, ex.extra["entry_point"]) == ("HumanEval/53", "code", "add")
    assert _HE_PLUS["prompt"].strip() in ex.question
    assert score(ex, ex.gold)
    assert score(ex, "```python\ndef add(x, y):\n    return y + x\n```")
    assert not score(ex, "    return x - y\n")


_MBPP_PLUS_TEST = """
inputs = [[(3, 4, 5, 6), (5, 7, 4, 10)], [(1, 2), (3,)]]
results = [(4, 5), ()]
for inp, exp in zip(inputs, results):
    assert set(similar_elements(*inp)) == set(exp)
"""


def test_mbpp_plus_parquet_schema_and_scoring(tmp_path, hf_cache):
    row = {"task_id": 2, "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
           "prompt": "Write a function to find the shared elements from the given two lists.",
           "source_file": "x", "test_imports": ["import math"],
           "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
           "test": _MBPP_PLUS_TEST}
    path = tmp_path / "mbppplus.parquet"
    pd.DataFrame([row]).to_parquet(path)
    ex = load_task("mbpp_plus", path=path)[0]
    assert (ex.id, ex.extra["tests"], ex.extra["setup"]) == ("mbpp_plus/2", _MBPP_PLUS_TEST, "import math")
    assert row["test_list"][0] in ex.question
    assert score(ex, ex.gold)
    assert not score(ex, "def similar_elements(a, b):\n    return tuple(a)\n")


def test_gaia_json_array_schema(tmp_path):
    rows = [{"task_id": "c61d22de", "Question": "Which city?", "Level": 1, "Final answer": "Paris",
             "file_name": "", "Annotator Metadata": {"Steps": "..."}}]
    path = tmp_path / "gaia.json"
    path.write_text(json.dumps(rows))
    ex = load_task("gaia", path=path)[0]
    assert (ex.id, ex.family, ex.gold, ex.extra["level"]) == ("c61d22de", "open", "Paris", 1)
    assert score(ex, "Searching...\nFINAL ANSWER: paris.") and not score(ex, "FINAL ANSWER: Lyon")


def test_hub_ids_go_to_datasets_with_task_defaults(monkeypatch):
    calls = []
    monkeypatch.setattr(records, "_load_dataset", lambda *a, **k: calls.append((a, k)) or [])
    load_task("gpqa_diamond")
    load_task("medqa", path="someone/medqa-copy", split="validation")
    assert calls == [(("Idavidrein/gpqa", "gpqa_diamond"), {"split": "train"}),
                     (("someone/medqa-copy", None), {"split": "validation"})]


# ---------------------------------------------------------------- errors


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="known tasks: .*gsm8k") as err:
        load_task("gsm8k_typo")
    assert all(name in str(err.value) for name in TASKS)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "aime.jsonl"
    with pytest.raises(FileNotFoundError, match="aime.jsonl"):
        load_task("aime2024", path=missing)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_task("aime2024", path="./nope.parquet")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_task("aime2024", path=path)


def test_data_dir_errors_name_the_path_and_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        load_task("gsm8k")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gsm8k" / "test.jsonl")):
        load_task("gsm8k")


def test_no_data_folder_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(records, "_REPO_ROOT", tmp_path / "checkout")
    with pytest.raises(FileNotFoundError, match=f"{DATA_ENV}.*hub id") as err:
        load_task("humaneval")
    assert str(tmp_path / "shared" / "data") in str(err.value)
