"""Exposure from multi-turn chats: earlier rounds as branches (METHOD.md section 5, role a).

A conversation [u1, a1, u2, a2, ..., un, an] becomes one example: each earlier round (u_i, a_i)
is one branch (the round a worker handled, "User: ...\\n\\nAssistant: ..."), the last user turn
u_n is the synthesizer's question and the last reply a_n its target. K = the number of earlier
rounds; a conversation with more than data.max_branches of them keeps the most recent ones, one
with fewer than data.min_branches is skipped. The release builds its chat data the same way
(WildChat, UltraChat, LMSYS-Chat: prior rounds as contexts, last user turn as query).

Conversations come from:
- OpenAssistant (oasst1 / oasst2): flat message rows (message_id, parent_id, role, text, ...)
  rebuilt into trees, or nested trees ({"prompt": {..., "replies": [...]}}); every root-to-leaf
  path is one conversation; deleted, review-rejected and synthetic messages (and everything
  below them) are left out.
- message lists users bring: UltraChat ({"messages": [{"role", "content"}]}), lmsys-chat
  ({"conversation": [{"role", "content"}]}), ShareGPT ({"conversations": [{"from", "value"}]}).
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Sequence

from psynth_jax.data.build import BuildResult, BuildSpec
from psynth_jax.data.examples import Branch, SynthesisExample
from psynth_jax.formats.rows import RowError, present
from psynth_jax.synthesis import prompts

Turn = tuple[str, str]  # (role "user" | "assistant", text)
_ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
          "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "bot": "assistant",
          "system": "system"}
_MESSAGE_LISTS = (("messages", "role", "content"), ("conversation", "role", "content"),
                  ("conversations", "from", "value"))


def is_oasst_row(row: dict[str, Any]) -> bool:
    return ("message_id" in row and "role" in row and "text" in row) or isinstance(row.get("prompt"), dict)


def is_chat_row(row: dict[str, Any]) -> bool:
    return any(isinstance(row.get(key), list) for key, _, _ in _MESSAGE_LISTS)


# -------------------------------------------------------------------------------- conversations
def _usable(message: dict[str, Any]) -> bool:
    return not message.get("deleted") and message.get("review_result") is not False and not message.get("synthetic")


def _paths(node: dict[str, Any], children: dict[str, list[dict[str, Any]]], prefix: list[dict[str, Any]]
           ) -> Iterator[list[dict[str, Any]]]:
    """Root-to-leaf paths below `node` through usable messages."""
    if not _usable(node):
        return
    path = [*prefix, node]
    kids = [c for c in children.get(node["message_id"], []) if _usable(c)]
    if not kids:
        yield path
    for child in kids:
        yield from _paths(child, children, path)


def oasst_conversations(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[str, list[Turn]]]:
    """(leaf message id, turns) of every root-to-leaf path of flat message rows or nested trees."""
    children: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    roots = []
    for row in rows:
        if isinstance(row.get("prompt"), dict):  # a nested tree
            stack = [row["prompt"]]
            roots.append(row["prompt"])
            while stack:
                node = stack.pop()
                for reply in node.get("replies") or []:
                    children[node["message_id"]].append(reply)
                    stack.append(reply)
        elif row.get("parent_id") is None:
            roots.append(row)
        else:
            children[row["parent_id"]].append(row)
    for root in roots:
        for path in _paths(root, children, []):
            yield path[-1]["message_id"], [(_ROLES.get(m["role"], m["role"]), str(m.get("text") or "")) for m in path]


def message_list(row: dict[str, Any]) -> list[Turn]:
    """The turns of an UltraChat / lmsys / ShareGPT row (RowError for a row with none)."""
    for key, role_key, text_key in _MESSAGE_LISTS:
        messages = row.get(key)
        if isinstance(messages, list):
            return [(_ROLES.get(str(m.get(role_key, "")).strip().lower(), "other"), str(m.get(text_key) or ""))
                    for m in messages if isinstance(m, dict)]
    raise RowError("no messages", f"none of {[k for k, _, _ in _MESSAGE_LISTS]} in a row with fields {sorted(row)}")


def rounds_of(turns: Sequence[Turn]) -> tuple[list[tuple[str, str]], str, str]:
    """(earlier rounds [(user, assistant)], last user turn, last reply) of a conversation.

    System messages are dropped, consecutive turns of one role are joined, a reply without a user
    turn before it starts no round. RowError when the conversation does not end with a reply to a
    user turn, or a turn of another role appears.
    """
    merged: list[list[str]] = []
    for role, text in turns:
        if role == "system" or not present(text):
            continue
        if role not in ("user", "assistant"):
            raise RowError("unknown role", f"role {role!r}")
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n\n" + text.strip()
        else:
            merged.append([role, text.strip()])
    if len(merged) < 2 or merged[-1][0] != "assistant" or merged[-2][0] != "user":
        raise RowError("no final user turn and reply")
    rounds, pending = [], None
    for role, text in merged[:-2]:
        if role == "user":
            pending = text
        elif pending is not None:
            rounds.append((pending, text))
            pending = None
    return rounds, merged[-2][1], merged[-1][1]


# ------------------------------------------------------------------------------------- examples
def chat_example(conv_id: str, turns: Sequence[Turn], spec: BuildSpec) -> SynthesisExample:
    """One exposure example from a conversation (RowError when it has too few earlier rounds)."""
    rounds, question, reply = rounds_of(turns)
    if len(rounds) < spec.k_min:
        raise RowError("fewer than min_branches earlier rounds")
    kept = rounds[-spec.k_max:]
    k = len(kept)
    branches = tuple(Branch(prompts.branch_prompt("round", question, i, k), f"User: {u}\n\nAssistant: {a}")
                     for i, (u, a) in enumerate(kept))
    meta = {"builder": "exposure", "kind": "chat rounds", "rounds": len(rounds), "rounds_kept": k}
    return SynthesisExample(f"chat/{spec.label}/{conv_id}", "chat", question, branches, reply, meta)


def _row_id(row: dict[str, Any], index: int) -> str:
    for key in ("conversation_id", "prompt_id", "id", "conversation_hash"):
        if present(row.get(key)):
            return str(row[key])
    return str(index)


def build_chat(rows: Sequence[dict[str, Any]], spec: BuildSpec, *, oasst: bool) -> BuildResult:
    """Exposure examples of OpenAssistant rows (`oasst`) or of message-list rows."""
    result = BuildResult([])
    if oasst:
        conversations: Iterator[tuple[str, list[Turn] | RowError]] = iter(oasst_conversations(rows))
    else:
        def listed() -> Iterator[tuple[str, list[Turn] | RowError]]:
            for i, row in enumerate(rows):
                try:
                    yield _row_id(row, i), message_list(row)
                except RowError as err:
                    yield str(i), err
        conversations = listed()
    for conv_id, turns in conversations:
        try:
            if isinstance(turns, RowError):
                raise turns
            result.examples.append(chat_example(conv_id, turns, spec))
        except RowError as err:
            result.skipped[err.reason] += 1
    return result
