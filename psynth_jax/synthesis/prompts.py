"""Worker and synthesizer prompt templates (our own wording of the release's intent).

Three synthesizer paths share the task instruction and differ only in how the branches arrive:
- cache path: the prompt says the workers' content is provided as latent KV memory;
- text path: the prompt carries every branch as "[Sub-agent i]:\n<text>" under a heading;
- single agent: the backbone answers the question alone.

Templates are plain data keyed by task family, so evaluation tasks can pick theirs by name.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class TaskPrompts:
    """Per-task-family wording."""

    worker_system: str
    synth_role: str
    instruction: str


MATH = TaskPrompts(
    worker_system="You are a careful math solver. Solve the problem step by step.",
    synth_role="You are a task summarizer who combines the work of several agents into one answer.",
    instruction="Solve the problem step by step and put the final number in \\boxed{}.",
)
MULTIPLE_CHOICE = TaskPrompts(
    worker_system="You are an expert. Reason step by step about the question and the options.",
    synth_role="You are a task summarizer who combines the analyses of several agents.",
    instruction="Think step by step, then give the letter of the correct option in \\boxed{}.",
)
CODE = TaskPrompts(
    worker_system="You are an expert Python programmer. Write a correct, complete solution.",
    synth_role="You are a task summarizer who combines several candidate programs into one.",
    instruction="Write one final, complete Python solution in a single ```python code block.",
)
DIAGNOSIS = TaskPrompts(
    worker_system="You are a database expert. Diagnose the anomaly from your area of expertise.",
    synth_role="You are a task summarizer who combines the findings of several expert agents.",
    instruction="Name the most likely root causes (no more than the task allows), comma-separated, in \\boxed{}.",
)
OPEN = TaskPrompts(
    worker_system="You are a careful research assistant. Work out the answer step by step.",
    synth_role="You are a task summarizer who combines the findings of several agents into one answer.",
    instruction="Give the final answer, as short as possible, in \\boxed{}.",
)
QA = TaskPrompts(
    worker_system="You are a careful research assistant. Read the evidence and answer the question.",
    synth_role="You are a task summarizer who combines the evidence found by several agents into one answer.",
    instruction="Give the final answer, a short phrase such as a name, a date or a number, in \\boxed{}.",
)
TOOL = TaskPrompts(
    worker_system="You are an expert in composing function calls.",
    synth_role="You are a task summarizer who combines the work of several agents into the function calls "
               "that fulfil the request.",
    instruction="Answer with the function calls to make, as a Python list of keyword calls in \\boxed{}: "
                "\\boxed{[function_name(parameter=value, ...), ...]}.",
)
CHAT = TaskPrompts(
    worker_system="You are a helpful assistant.",
    synth_role="You are a helpful assistant continuing a conversation whose earlier rounds were handled by "
               "other agents.",
    instruction="Write the best next reply to the user.",
)
IN_CONTEXT = TaskPrompts(
    worker_system="You are a careful assistant. Solve tasks step by step.",
    synth_role="You are a task solver who learns from the worked examples of several agents.",
    instruction="Solve it the way the worked examples do: reason briefly, then give the final answer.",
)
TASK_PROMPTS: dict[str, TaskPrompts] = {
    "math": MATH,
    "multiple_choice": MULTIPLE_CHOICE,
    "code": CODE,
    "diagnosis": DIAGNOSIS,
    "open": OPEN,
    "qa": QA,
    "tool": TOOL,
    "chat": CHAT,
    "icl": IN_CONTEXT,
}

# Worker prompts of branches whose content is given rather than decoded (evidence paragraphs,
# function docs, earlier chat rounds, worked examples, tool calls): the training builders and the
# evaluation tasks build a given branch's prompt with the same wording, `branch_prompt`.
BRANCH_ROLES: dict[str, str] = {
    "round": "You are agent {i} of {k}. You handled round {i} of this conversation with the user; repeat it.",
    "example": "You are agent {i} of {k}. Write out one solved example of this kind of task: its question "
               "and its worked answer.",
    "paragraph": "You are retrieval agent {i} of {k} for this question: {question}\nReport one passage you found.",
    "function": "You are agent {i} of {k} for this request: {question}\nDescribe one function that is available.",
    "call": "You are agent {i} of {k} for this request: {question}\nMake one of the function calls it needs.",
}

CACHE_NOTE = (
    "The work of {k} previous agents on this task is provided to you as latent information "
    "(their key-value memory), not as text. Use it."
)
TEXT_HEADING = "Content from Previous Agents:"

Message = dict[str, str]


def task_prompts(family: str) -> TaskPrompts:
    try:
        return TASK_PROMPTS[family]
    except KeyError:
        raise ValueError(f"unknown task family {family!r}; known: {sorted(TASK_PROMPTS)}") from None


def branch_prompt(role: str, question: str, index: int, k: int) -> str:
    """The worker prompt text of given branch `index` (0-based) of `k` in role `role` (BRANCH_ROLES)."""
    try:
        template = BRANCH_ROLES[role]
    except KeyError:
        raise ValueError(f"unknown branch role {role!r}; known: {sorted(BRANCH_ROLES)}") from None
    return template.format(i=index + 1, k=k, question=question)


def worker_messages(question: str, family: str = "math", role_hint: str | None = None) -> list[Message]:
    """Chat messages for one worker. `role_hint` adds a per-worker angle (e.g. an expert profile)."""
    p = task_prompts(family)
    system = p.worker_system if role_hint is None else f"{p.worker_system}\n{role_hint}"
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{question}\n\n{p.instruction}"}]


def cache_synth_messages(question: str, num_branches: int, family: str = "math") -> list[Message]:
    """Synthesizer prompt of the cache path: branches arrive as KV memory before it."""
    p = task_prompts(family)
    return [
        {"role": "system", "content": p.synth_role},
        {"role": "user", "content": f"{CACHE_NOTE.format(k=num_branches)}\n\nTask: {question}\n\n{p.instruction}"},
    ]


def text_synth_messages(question: str, branches: Sequence[str], family: str = "math") -> list[Message]:
    """Synthesizer prompt of the text-concatenation baseline: every branch as text."""
    p = task_prompts(family)
    body = "\n\n".join(f"[Sub-agent {i + 1}]:\n{b}" for i, b in enumerate(branches))
    return [
        {"role": "system", "content": p.synth_role},
        {"role": "user", "content": f"Task: {question}\n\n{TEXT_HEADING}\n{body}\n\n{p.instruction}"},
    ]


def single_agent_messages(question: str, family: str = "math") -> list[Message]:
    """The backbone alone (no branches)."""
    return worker_messages(question, family)
