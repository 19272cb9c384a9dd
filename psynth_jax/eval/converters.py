"""Row -> EvalExample for each task, using each dataset's public column names.

Every converter has the signature (row, index, seed) -> EvalExample; `index` is the row's
position in its source (used for ids when the data has none), `seed` only matters where the
task itself is randomised (GPQA option order, which paragraphs and functions become branches).
The generic tasks (mc, qa) and the tasks with given branches (multihop_qa, tool_calls) are
built from the task's options in the eval config: `fields` (the column names of a user's file)
and `branches` (how many given branches at most); their factories return the converter.
Converters of tasks that share rows with training store the row's own id as extra["row_id"]
(formats/splits.py decides which rows only evaluation sees).
"""

from __future__ import annotations

import random
import string
from typing import Any, Callable

from psynth_jax.config.eval_schema import TaskFields
from psynth_jax.eval.example import EvalExample, format_choices
from psynth_jax.formats import multihop, tool_calls
from psynth_jax.formats.rows import maybe_json, present, text_value

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
    solution = text_value(pick(row, "answer", task="gsm8k"), "answer", numbers=True)
    gold = solution.split("####")[-1].strip().replace(",", "")
    question = text_value(pick(row, "question", task="gsm8k"), "question").strip()
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


# ------------------------------------------------------------- tasks with given branches
MULTIHOP_BRANCHES = 4  # paragraphs per question (at least every supporting one)
TOOL_BRANCHES = 8  # function docs per request (every one the gold calls use, then distractors)


def multihop_qa(fields: TaskFields, branches: int | None) -> Converter:
    """A 2WikiMultihopQA / HotpotQA / MuSiQue row (formats/multihop.py): K = max(branches, supporting)
    paragraphs, every supporting one plus distractors, in an order drawn by (seed, row id), given as
    the branches (what retrieval agents found). Scored by exact match and F1 against the answer and
    its aliases."""
    k_wanted = branches or MULTIHOP_BRANCHES

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        q = multihop.parse_multihop(row, index)
        k = min(max(k_wanted, len(q.supporting)), len(q.paragraphs))
        chosen = multihop.choose_paragraphs(q, k, random.Random(f"{seed}:paragraphs:{q.id}"))
        extra = {"row_id": q.id, "dataset": q.dataset, "answers": list(q.answers),
                 "branches": [p.render() for p in chosen], "branch_role": "paragraph",
                 "supporting": [p.supporting for p in chosen]}
        return EvalExample(f"{q.dataset}/{q.id}", "multihop_qa", "qa", q.question, q.answer, extra)

    return convert


def tool_calls_task(fields: TaskFields, branches: int | None) -> Converter:
    """A BFCL row joined with its gold calls (formats/tool_calls.py): the functions offered are the
    branches (each one function's JSON doc; at most `branches`, the ones the gold calls use first,
    in an order drawn by (seed, row id)); scored by exact call match."""
    k_max = branches or TOOL_BRANCHES

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        p = tool_calls.parse_problem(row, index)
        rng = random.Random(f"{seed}:functions:{p.id}")
        used = [f for f in p.functions if f["name"] in p.gold_names]
        others = [f for f in p.functions if f["name"] not in p.gold_names]
        offered = used + rng.sample(others, max(0, min(len(others), k_max - len(used))))
        rng.shuffle(offered)
        extra = {"row_id": p.id, "gold_calls": list(p.gold), "branches": [tool_calls.function_doc(f) for f in offered],
                 "branch_role": "function"}
        return EvalExample(p.id, "tool_calls", "tool", p.question, tool_calls.canonical_calls(p.gold), extra)

    return convert


# ------------------------------------------------------------------------ generic tasks
def _letter_index(answer: Any, labels: list[str], texts: list[str], task: str) -> int:
    """The 0-based option index of an answer given as an index, a letter / label, or the option's text."""
    if isinstance(answer, bool):
        raise ValueError(f"{task}: answer {answer!r} is neither an option index nor a letter")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(texts):
            raise ValueError(f"{task}: answer index {index} is outside the {len(texts)} options (indices start at 0)")
        return index
    text = str(answer).strip()
    for i, label in enumerate(labels):
        if text.upper() == label.upper():
            return i
    lowered = [t.strip().lower() for t in texts]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise ValueError(f"{task}: answer {answer!r} is not an option index, letter or option text "
                     f"(options {labels})")


def generic_mc(fields: TaskFields, branches: int | None) -> Converter:
    """A user's multiple-choice row: question, choices (a list, or {label: text}), answer (a 0-based
    index, a letter / label, or the option's text), optional id; column names from `fields`."""
    task = "mc"

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        stem = str(pick(row, fields.question or "question", task=task))
        raw = maybe_json(pick(row, *([fields.choices] if fields.choices else ["choices", "options"]), task=task))
        if isinstance(raw, dict):
            labels, texts = [str(k) for k in raw], [str(v) for v in raw.values()]
        else:
            texts = [str(c) for c in raw]
            labels = list(string.ascii_uppercase[: len(texts)])
        answer = pick(row, *([fields.answer] if fields.answer else ["answer", "label", "answerKey"]), task=task)
        question, letters = format_choices(stem, texts)
        gold = letters[_letter_index(answer, labels, texts, task)]
        uid = row.get(fields.id or "id", index)
        extra = {"labels": letters, "choices": texts}
        return EvalExample(f"{task}/{uid}", task, "multiple_choice", question, gold, extra)

    return convert


def _paragraph_text(p: Any) -> str:
    """A context paragraph given as text, {title, text | sentences | paragraph_text} or [title, sentences]."""
    if isinstance(p, dict):
        body = p.get("text") or p.get("paragraph_text") or p.get("sentences") or p.get("content") or ""
        body = " ".join(map(str, body)) if isinstance(body, list) else str(body)
        title = str(p.get("title") or "").strip()
        return f"{title}\n{body.strip()}" if title else body.strip()
    if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], list):
        return f"{p[0]}\n{' '.join(map(str, p[1]))}"
    return str(p).strip()


def generic_qa(fields: TaskFields, branches: int | None) -> Converter:
    """A user's short-answer row: question, accepted answer(s) (text or a list), optional context
    paragraphs given as branches (the first `branches` of them; without context, workers answer);
    column names from `fields`. Scored by exact match and F1."""
    task = "qa"

    def convert(row: Row, index: int, seed: int) -> EvalExample:
        question = str(pick(row, fields.question or "question", task=task)).strip()
        raw = maybe_json(pick(row, *([fields.answer] if fields.answer else ["answers", "answer"]), task=task))
        answers = [str(a).strip() for a in (raw if isinstance(raw, list) else [raw]) if present(a)]
        if not answers:
            raise ValueError(f"{task}: row {index} has no accepted answer")
        extra: dict[str, Any] = {"answers": answers}
        context = maybe_json(row.get(fields.context or "context"))
        if present(context):
            paragraphs = [_paragraph_text(p) for p in (context if isinstance(context, list) else [context])]
            paragraphs = [p for p in paragraphs if p][: branches or None]
            extra.update(branches=paragraphs, branch_role="paragraph")
        uid = row.get(fields.id or "id", index)
        return EvalExample(f"{task}/{uid}", task, "qa", question, answers[0], extra)

    return convert
