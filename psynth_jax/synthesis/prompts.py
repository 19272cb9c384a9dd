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
TASK_PROMPTS: dict[str, TaskPrompts] = {
    "math": MATH,
    "multiple_choice": MULTIPLE_CHOICE,
    "code": CODE,
    "diagnosis": DIAGNOSIS,
    "open": OPEN,
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
