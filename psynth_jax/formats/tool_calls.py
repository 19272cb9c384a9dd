"""Function-calling problems (Berkeley Function Calling Leaderboard layout) and function calls as text.

A BFCL question row is {"id", "question": [[{"role", "content"}, ...]], "function": [schema, ...]};
its gold calls live in an answer row {"id", "ground_truth": [{name: {param: [acceptable values]}}]}
of the same file name under `possible_answer/` (`attach_answers` joins them by id; a row that
already carries `ground_truth` is used as is). In an acceptable-value list, "" means the
parameter may be left out.

Calls are written the way BFCL prompts models to write them, a Python list of keyword calls:
`[get_weather(city='Paris', unit='celsius'), get_time(zone='CET')]`. `canonical_calls` gives the
one written form of the gold calls (first acceptable value of each parameter, optional ones that
allow omission left out); `parse_calls` reads calls back from a completion; `calls_match` is the
exact call match: the same number of calls, each predicted call paired with a different gold
call of the same function whose every given argument is acceptable and whose required
arguments are all given (order-free, as BFCL scores parallel calls). An empty acceptable list
(some live rows) allows leaving the parameter out or passing an empty list. Strings compare after
BFCL's normalisation (case, spaces and the punctuation ,./-_*^ ignored), numbers by value.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

from psynth_jax.formats.boxed import last_boxed
from psynth_jax.formats.rows import RowError, maybe_json, need

Call = tuple[str, dict[str, Any]]  # (function name, keyword arguments)
_STRING_NOISE_RE = re.compile(r"[ ,./\-_*^]")


@dataclasses.dataclass(frozen=True)
class ToolProblem:
    """One function-calling problem: the user's request, the functions offered, the gold calls.

    gold: per expected call, {"name": ..., "arguments": {param: [acceptable values]}}.
    """

    id: str
    question: str
    functions: tuple[dict[str, Any], ...]
    gold: tuple[dict[str, Any], ...]

    @property
    def gold_names(self) -> set[str]:
        return {g["name"] for g in self.gold}


def is_bfcl_row(row: dict[str, Any]) -> bool:
    return "function" in row and "question" in row


def attach_answers(rows: list[dict[str, Any]], path: str | Path) -> list[dict[str, Any]]:
    """Question rows of a local BFCL file with their gold calls from possible_answer/<same name>,
    joined by id (rows that already hold `ground_truth`, or files without an answer file, unchanged)."""
    answers = Path(path).expanduser().parent / "possible_answer" / Path(path).name
    if not answers.is_file() or all("ground_truth" in r for r in rows):
        return rows
    gold = {}
    for line in answers.read_text(encoding="utf-8").splitlines():
        if line.strip():
            a = json.loads(line)
            gold[a["id"]] = a["ground_truth"]
    return [r if "ground_truth" in r or r.get("id") not in gold else {**r, "ground_truth": gold[r["id"]]} for r in rows]


def _question_text(raw: Any) -> str:
    """The request: every message of the (single) turn, system instructions first."""
    turns = maybe_json(raw)
    if isinstance(turns, str):
        return turns.strip()
    messages = [m for turn in turns for m in (turn if isinstance(turn, list) else [turn])]
    parts = [str(m.get("content") or "").strip() for m in messages if isinstance(m, dict)]
    return "\n\n".join(p for p in parts if p)


def parse_problem(row: dict[str, Any], index: int = 0) -> ToolProblem:
    """A ToolProblem from a BFCL row joined with its answers; RowError naming what is missing."""
    question = _question_text(need(row, "question"))
    if not question:
        raise RowError("no question")
    functions = tuple(f for f in maybe_json(need(row, "function")) if isinstance(f, dict) and f.get("name"))
    if not functions:
        raise RowError("no function")
    if "ground_truth" not in row:
        raise RowError("no ground_truth", "its possible_answer row was not found")
    gold = tuple({"name": name, "arguments": dict(args)} for call in maybe_json(row["ground_truth"])
                 for name, args in call.items())
    if not gold:
        raise RowError("no ground_truth")
    return ToolProblem(str(row.get("id") or index), question, functions, gold)


def function_doc(function: dict[str, Any]) -> str:
    """A function schema as one branch's text (its JSON, as BFCL shows it to models)."""
    return json.dumps(function, ensure_ascii=False)


# ----------------------------------------------------------------------------- calls as text
def _first_acceptable(values: Any) -> tuple[bool, Any]:
    """(present, value): the first acceptable value that is not the "may be omitted" marker."""
    options = values if isinstance(values, list) else [values]
    for v in options:
        if v != "":
            if isinstance(v, dict):  # nested acceptable values (BFCL's dict parameters)
                v = {k: _first_acceptable(x)[1] for k, x in v.items() if _first_acceptable(x)[0]}
            return True, v
    return False, None


def canonical_call(gold: dict[str, Any]) -> Call:
    args = {}
    for param, values in gold["arguments"].items():
        present, value = _first_acceptable(values)
        if present:
            args[param] = value
    return gold["name"], args


def format_calls(calls: Sequence[Call]) -> str:
    """`[name(a=1, b='x'), ...]` (Python literal syntax for the values)."""
    return "[" + ", ".join(f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})" for name, args in calls) + "]"


def canonical_calls(gold: Sequence[dict[str, Any]]) -> str:
    """The written form of a problem's gold calls, in their given order."""
    return format_calls([canonical_call(g) for g in gold])


def _call_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _call_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _value(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError):
        return ast.unparse(node)  # a bare name or expression: compared as its text


def _calls_of(expr: ast.expr) -> list[Call] | None:
    nodes = expr.elts if isinstance(expr, (ast.List, ast.Tuple)) else [expr]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        name = _call_name(node.func)
        if name is None:
            return None
        calls.append((name, {k.arg: _value(k.value) for k in node.keywords}))
    return calls


def _bracketed(text: str) -> list[str]:
    """Every balanced [...] segment, outermost first from the end of the text."""
    out, stack = [], []
    for i, ch in enumerate(text):
        if ch == "[":
            stack.append(i)
        elif ch == "]" and stack:
            start = stack.pop()
            if not stack:
                out.append(text[start : i + 1])
    return out[::-1]


def parse_calls(completion: str) -> list[Call] | None:
    """The calls a completion makes: the last bracketed list of keyword calls (inside the last
    \\boxed{} when there is one), else the last line that is a call; None when there is none."""
    text = completion[completion.rfind("</think>") + len("</think>"):] if "</think>" in completion else completion
    boxed = last_boxed(text)
    for scope in ([boxed] if boxed else []) + [text]:
        for segment in _bracketed(scope):
            try:
                calls = _calls_of(ast.parse(segment.strip(), mode="eval").body)
            except SyntaxError:
                continue
            if calls:
                return calls
    for line in reversed(text.strip().splitlines()):
        try:
            calls = _calls_of(ast.parse(line.strip().strip("`"), mode="eval").body)
        except SyntaxError:
            continue
        if calls:
            return calls
    return None


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return _STRING_NOISE_RE.sub("", value).lower().replace("'", '"')
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _norm(v) for k, v in value.items()}
    return value


def _acceptable(value: Any, options: Any) -> bool:
    options = options if isinstance(options, list) else [options]
    for option in options:
        if option == "":
            continue
        if isinstance(option, dict) and isinstance(value, dict) and all(isinstance(v, list) for v in option.values()):
            if _arguments_match(value, option):  # nested acceptable values
                return True
        elif _norm(value) == _norm(option):
            return True
    return False


def _arguments_match(args: dict[str, Any], gold_args: dict[str, Any]) -> bool:
    if set(args) - set(gold_args):
        return False
    for param, options in gold_args.items():
        options = options if isinstance(options, list) else [options]
        if param not in args:
            if "" not in options and options:
                return False
        elif not (_acceptable(args[param], options) or options == [] and args[param] in ([], None)):
            return False
    return True


def call_matches(call: Call, gold: dict[str, Any]) -> bool:
    name, args = call
    return name == gold["name"] and _arguments_match(args, gold["arguments"])


def calls_match(calls: Sequence[Call] | None, gold: Sequence[dict[str, Any]]) -> bool:
    """Exact call match (module docstring): a one-to-one pairing of predicted and gold calls."""
    if calls is None or len(calls) != len(gold):
        return False

    def assign(i: int, used: frozenset[int]) -> bool:
        if i == len(calls):
            return True
        return any(j not in used and call_matches(calls[i], gold[j]) and assign(i + 1, used | {j})
                   for j in range(len(gold)))

    return assign(0, frozenset())
