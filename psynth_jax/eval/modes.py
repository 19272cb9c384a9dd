"""The six evaluation modes and the worker stage they share.

Every mode answers from the same worker branches of an example (generated once, stored, reused):
- single: the backbone answers alone (branches unused);
- text: text-concatenation synthesis, every branch's text in the prompt, LoRA off;
- naive_cache / mapper_only / lora_only / psynth: the cache path over branch KV rebuilt from the
  stored tokens, with the mapper (identity or trained) and the LoRA (off or on) of the table below.

The worker stage: each example's worker prompts (`worker_conversations`), its K (`num_branches`),
and the fixed chunks of examples it decodes together (`make_chunks`, seeded by `worker_seed`).
"""

from __future__ import annotations

import dataclasses
import typing
import zlib
from typing import Sequence

from psynth_jax.config.eval_schema import ModeName
from psynth_jax.eval.example import EvalExample
from psynth_jax.synthesis import prompts

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    """How one mode synthesizes: its path, and for the cache path which mapper and whether LoRA is on."""

    path: typing.Literal["single", "text", "cache"]
    trained_mapper: bool = False
    lora: bool = False
    description: str = ""

    def untrained_parts(self, mapper_trained: bool, lora_trained: bool) -> list[str]:
        """The trainable pieces this mode uses that carry no trained weights ([] when none)."""
        parts = []
        if self.trained_mapper and not mapper_trained:
            parts.append("mapper")
        if self.lora and not lora_trained:
            parts.append("LoRA")
        return parts


MODE_SPECS: dict[str, ModeSpec] = {
    "single": ModeSpec("single", description="single agent (no branches)"),
    "text": ModeSpec("text", description="text-concatenation synthesis"),
    "naive_cache": ModeSpec("cache", description="naive cache concatenation (identity mapper, LoRA off)"),
    "mapper_only": ModeSpec("cache", trained_mapper=True, description="trained mapper, LoRA off"),
    "lora_only": ModeSpec("cache", lora=True, description="identity mapper, LoRA on"),
    "psynth": ModeSpec("cache", trained_mapper=True, lora=True, description="Parallel-Synthesis (mapper + LoRA)"),
}
assert set(MODE_SPECS) == set(typing.get_args(ModeName)), "MODE_SPECS and eval_schema.ModeName disagree"


def given_branches(example: EvalExample) -> list[str]:
    """The example's given branch texts (context paragraphs, function docs); [] when workers decode them."""
    return list(example.extra.get("branches") or ())


def worker_conversations(example: EvalExample, num_workers: int) -> list[Messages]:
    """The worker prompts of one example: for given branches, the prompt of each one's role
    (prompts.branch_prompt, as the training builders write it); one per expert profile when the task
    has profiles (MARBLE); else `num_workers` copies of the same prompt (branches differ by sampling)."""
    given = given_branches(example)
    if given:
        role, k = example.extra["branch_role"], len(given)
        return [prompts.worker_messages(prompts.branch_prompt(role, example.question, i, k), example.family)
                for i in range(k)]
    profiles = example.extra.get("profiles")
    if profiles:
        return [prompts.worker_messages(example.question, example.family, role_hint=p) for p in profiles]
    return [prompts.worker_messages(example.question, example.family)] * num_workers


def num_branches(example: EvalExample, num_workers: int) -> int:
    """K for this example: its given branches, or one per expert profile where the task has them,
    else `num_workers`."""
    return len(given_branches(example)) or len(example.extra.get("profiles") or ()) or num_workers


def make_chunks(examples: Sequence[EvalExample], size: int, num_workers: int) -> list[list[EvalExample]]:
    """Consecutive examples with equal K, cut into chunks of at most `size` (deterministic)."""
    out: list[list[EvalExample]] = []
    for ex in examples:
        k = num_branches(ex, num_workers)
        last = out[-1] if out else None
        if last and len(last) < size and num_branches(last[0], num_workers) == k:
            last.append(ex)
        else:
            out.append([ex])
    return out


def worker_seed(seed: int, task: str, first_id: str) -> int:
    """The sampling seed of a worker batch: a function of the config seed and the batch's first example."""
    return (seed * 1_000_003 + zlib.crc32(f"{task}/{first_id}".encode())) % 2**31
