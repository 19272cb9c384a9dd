"""Row -> EvalExample for each task, using each dataset's public column names.

Every converter has the signature (row, index, seed) -> EvalExample; `index` is the row's
position in its source (used for ids when the data has none), `seed` only matters where the
task itself is randomised (GPQA option order).
"""

from __future__ import annotations

import random
import string
from typing import Any, Callable

from psynth_jax.eval.example import EvalExample, format_choices

Row = dict[str, Any]
Converter = Callable[[Row, int, int], EvalExample]


def pick(row: Row, *keys: str, task: str) -> Any:
    """The value of the first of `keys` present (and not None) in `row`, or a ValueError naming the
    task, the accepted field names and the fields the row has."""
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    raise ValueError(f"{task}: none of the fields {list(keys)} in a row with fields {sorted(row)}")


def _integer_text(value: Any) -> str:
    """AIME-style integer answers as canonical text ("025" -> "25"); other text unchanged."""
    text = str(value).strip()
    return str(int(text)) if text.lstrip("-").isdigit() else text


def gsm8k(row: Row, index: int, seed: int) -> EvalExample:
    """GSM8K ("question", "answer" = worked solution ending "#### N"): gold is N, commas dropped."""
    solution = str(pick(row, "answer", task="gsm8k"))
    gold = solution.split("####")[-1].strip().replace(",", "")
    question = str(pick(row, "question", task="gsm8k")).strip()
    return EvalExample(f"gsm8k/{index}", "gsm8k", "math", question, gold, {"solution": solution})


def math500(row: Row, index: int, seed: int) -> EvalExample:
    """MATH-500 / PRM800K layout ("problem", "solution", "answer", "subject", "level", "unique_id")."""
    extra = {"solution": row.get("solution", ""), "subject": row.get("subject"), "level": row.get("level")}
    uid = str(row.get("unique_id") or f"math500/{index}")
    return EvalExample(uid, "math500", "math", row["problem"].strip(), str(row["answer"]).strip(), extra)


def aime(task: str) -> Converter:
    """AIME 2024 / 2025 rows: "problem"/"Problem"/"question" and "answer"/"Answer"."""

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        question = str(pick(row, "problem", "Problem", "question", task=task)).strip()
        gold = _integer_text(pick(row, "answer", "Answer", task=task))
        uid = row.get("id", row.get("ID", index))
        return EvalExample(f"{task}/{uid}", task, "math", question, gold, {"solution": row.get("solution", "")})

    return convert


def _arc_choices(row: Row) -> tuple[str, list[str], list[str]]:
    """(stem, choice texts, choice labels) from the AI2 JSONL layout or the hub layout."""
    q = row["question"]
    if isinstance(q, dict):
        return q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    return q, list(row["choices"]["text"]), list(row["choices"]["label"])


def arc_challenge(row: Row, index: int, seed: int) -> EvalExample:
    """ARC ("id", "question", "answerKey"); options relettered A.. (the hub copy has some "1".."4")."""
    stem, texts, labels = _arc_choices(row)
    question, letters = format_choices(stem, texts)
    gold = letters[labels.index(str(row["answerKey"]).strip())]
    extra = {"labels": letters, "choices": texts}
    return EvalExample(str(row.get("id", f"arc/{index}")), "arc_challenge", "multiple_choice", question, gold, extra)


def gpqa_diamond(row: Row, index: int, seed: int) -> EvalExample:
    """GPQA ("Question", "Correct Answer", "Incorrect Answer 1..3"); options shuffled with a
    generator seeded by (seed, question id), so the order is stable under `limit` and reordering."""
    task = "gpqa_diamond"
    correct = str(pick(row, "Correct Answer", task=task)).strip()
    options = [correct] + [str(pick(row, f"Incorrect Answer {i}", task=task)).strip() for i in (1, 2, 3)]
    uid = str(row.get("Record ID") or index)
    random.Random(f"{seed}:{uid}").shuffle(options)
    question, letters = format_choices(str(pick(row, "Question", task=task)), options)
    gold = letters[options.index(correct)]
    extra = {"labels": letters, "choices": options}
    return EvalExample(f"{task}/{uid}", task, "multiple_choice", question, gold, extra)


def _medqa_options(raw: Any) -> dict[str, str]:
    """MedQA options as {letter: text}: a dict, or a list of {"key", "value"} (BigBio layout)."""
    if isinstance(raw, dict):
        return {str(k).strip().upper(): str(v).strip() for k, v in sorted(raw.items()) if v is not None}
    return {str(o["key"]).strip().upper(): str(o["value"]).strip() for o in raw}


def medqa(row: Row, index: int, seed: int) -> EvalExample:
    """MedQA-USMLE ("question", "options", "answer_idx"; falls back to matching "answer" text)."""
    task = "medqa"
    options = _medqa_options(pick(row, "options", task=task))
    letters = sorted(options)
    if letters != list(string.ascii_uppercase[: len(letters)]):
        raise ValueError(f"{task}: option keys {letters} are not consecutive letters from A")
    question, _ = format_choices(str(pick(row, "question", task=task)), [options[k] for k in letters])
    gold = str(row.get("answer_idx") or "").strip().upper()
    if gold not in options:
        answer = str(pick(row, "answer", task=task)).strip()
        gold = next((k for k in letters if options[k] == answer), "")
    if not gold:
        raise ValueError(f"{task}: row {index} has no usable answer_idx / answer")
    extra = {"labels": letters, "choices": [options[k] for k in letters]}
    return EvalExample(f"{task}/{row.get('id', index)}", task, "multiple_choice", question, gold, extra)


def humaneval(task: str) -> Converter:
    """HumanEval / HumanEval+ (evalplus): prompt, entry_point, canonical_solution, test
    (`def check(candidate)`); the scorer runs prompt+completion, the test, then check()."""

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        prompt = pick(row, "prompt", task=task)
        question = f"Complete the following Python function.\n\n```python\n{prompt.rstrip()}\n```"
        extra = {"harness": "humaneval", "prompt": prompt, "entry_point": pick(row, "entry_point", task=task),
                 "test": pick(row, "test", task=task)}
        gold = str(row.get("canonical_solution") or "")
        return EvalExample(str(row.get("task_id", f"{task}/{index}")), task, "code", question, gold, extra)

    return convert


def _mbpp_question(description: str, test_list: list[str]) -> str:
    """The MBPP paper's task wording: the description plus the example asserts."""
    tests = "\n".join(test_list)
    return f"{description.strip()}\nYour code should pass these tests:\n\n{tests}"


def mbpp(task: str) -> Converter:
    """MBPP (sanitized: prompt/test_imports; full: text/test_setup_code) and MBPP+ (evalplus: its
    "test" field holds the extended tests). The scorer runs setup + code + tests."""

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        test_list = list(pick(row, "test_list", task=task))
        setup = "\n".join(row.get("test_imports") or []) or str(row.get("test_setup_code") or "")
        tests = str(pick(row, "test", task=task)) if task == "mbpp_plus" else "\n".join(test_list)
        question = _mbpp_question(str(pick(row, "prompt", "text", task=task)), test_list)
        extra = {"harness": "assert", "setup": setup, "tests": tests, "test_list": test_list}
        gold = str(row.get("code") or "")
        return EvalExample(f"{task}/{row.get('task_id', index)}", task, "code", question, gold, extra)

    return convert


def gaia(row: Row, index: int, seed: int) -> EvalExample:
    """GAIA ("task_id", "Question", "Final answer", "Level", "file_name"/"file_path")."""
    task = "gaia"
    extra = {"level": row.get("Level"), "file_name": row.get("file_name") or "",
             "file_path": row.get("file_path") or ""}
    question = str(pick(row, "Question", "question", task=task)).strip()
    gold = str(pick(row, "Final answer", "final_answer", "answer", task=task)).strip()
    return EvalExample(str(row.get("task_id", f"{task}/{index}")), task, "open", question, gold, extra)


def marble_db(row: Row, index: int, seed: int) -> EvalExample:
    """One MARBLE database-diagnosis task. Workers are the expert agents (one per profile, one
    profile per candidate root cause). The question is the task text plus the candidate labels and
    how many may be named; the release's tool-use text (live PostgreSQL) stays in extra."""
    task = row["task"]
    labels = [str(x).strip() for x in task["labels"]]
    max_labels = int(task.get("number_of_labels_pred") or 2)
    root_causes = [str(x).strip() for x in task["root_causes"]]
    candidates = ", ".join(f"'{label}'" for label in labels)
    question = (f"{task['content'].strip()}\n\nCandidate root causes: {candidates}.\n"
                f"Name at most {max_labels} of them, the most likely ones.")
    extra = {
        "profiles": [a["profile"] for a in row["agents"]],
        "agent_ids": [a["agent_id"] for a in row["agents"]],
        "labels": labels,
        "root_causes": root_causes,
        "max_labels": max_labels,
        "output_format": task.get("output_format", ""),
        "init_sql": row["environment"]["init_sql"],
        "anomalies": row["environment"]["anomalies"],  # the injected faults: gold-revealing
    }
    gold = ", ".join(root_causes)
    return EvalExample(f"marble_db/{row['task_id']}", "marble_db", "diagnosis", question, gold, extra)
