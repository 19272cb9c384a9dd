"""Multi-hop QA rows with their context paragraphs: 2WikiMultihopQA, HotpotQA and MuSiQue.

Read in their original layouts and in the layouts of their hub copies:
- 2WikiMultihopQA / HotpotQA: `context` = [[title, [sentence, ...]], ...] (original), or
  {"title": [...], "sentences": [[...], ...]} (hub; possibly JSON text), or a list of
  {"title", "sentences"} objects; `supporting_facts` = [[title, sentence index], ...] or
  {"title": [...], "sent_id": [...]}. A paragraph is supporting iff its title is among the
  supporting facts' titles.
- MuSiQue: `paragraphs` = [{"title", "paragraph_text", "is_supporting"}], `answer_aliases`,
  `question_decomposition` (one {"question", "answer"} step per hop, "#n" naming step n's answer).

`parse_multihop` turns one row into a `MultihopQuestion` or raises RowError naming what is
missing. Training builders (data/evidence.py) and the multi-hop evaluation task read rows
through it, and both split them with formats/splits.py.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from psynth_jax.formats.rows import RowError, maybe_json, need, need_text, present

_TWOWIKI_TYPES = {"compositional", "comparison", "bridge_comparison", "inference"}
_HOP_REF_RE = re.compile(r"#(\d+)")


@dataclasses.dataclass(frozen=True)
class Paragraph:
    title: str
    sentences: tuple[str, ...]
    supporting: bool

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def render(self) -> str:
        """How a paragraph is shown as one branch: its title, then its text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclasses.dataclass(frozen=True)
class MultihopQuestion:
    """One question, its gold answer (+ accepted aliases) and its context paragraphs in source order.

    evidence: the supporting facts in order (2Wiki / HotpotQA: the supporting sentences; MuSiQue:
    each hop's sub-question and answer), for a reasoned target.
    """

    id: str
    dataset: str  # "2wikimultihopqa" | "hotpotqa" | "musique"
    question: str
    answer: str
    aliases: tuple[str, ...]
    paragraphs: tuple[Paragraph, ...]
    evidence: tuple[str, ...]

    @property
    def answers(self) -> tuple[str, ...]:
        """The gold answer and its aliases, without repeats."""
        return tuple(dict.fromkeys((self.answer, *self.aliases)))

    @property
    def supporting(self) -> tuple[Paragraph, ...]:
        return tuple(p for p in self.paragraphs if p.supporting)


def is_multihop_row(row: dict[str, Any]) -> bool:
    """Whether a row has the layout of one of the three datasets."""
    return "question" in row and ("context" in row and "supporting_facts" in row or "paragraphs" in row)


def parse_multihop(row: dict[str, Any], index: int = 0) -> MultihopQuestion:
    """A MultihopQuestion from a 2Wiki / HotpotQA / MuSiQue row; RowError when a field it needs is missing."""
    question = need_text(row, "question").strip()
    answer = need_text(row, "answer", numbers=True).strip()
    rid = str(row.get("_id") or row.get("id") or index)
    if "paragraphs" in row:
        return _musique(row, rid, question, answer)
    dataset = "2wikimultihopqa" if "evidences" in row or row.get("type") in _TWOWIKI_TYPES else "hotpotqa"
    facts = _supporting_facts(need(row, "supporting_facts"))
    titles = {t for t, _ in facts}
    paragraphs = tuple(Paragraph(t, s, t in titles) for t, s in _context(need(row, "context")))
    if not any(p.supporting for p in paragraphs):
        raise RowError("no supporting paragraph", f"supporting titles {sorted(titles)} not among the context's")
    by_title = {p.title: p for p in paragraphs}
    evidence = tuple(by_title[t].sentences[i] for t, i in facts
                     if t in by_title and 0 <= i < len(by_title[t].sentences))
    return MultihopQuestion(rid, dataset, question, answer, (), paragraphs, evidence)


def _musique(row: dict[str, Any], rid: str, question: str, answer: str) -> MultihopQuestion:
    paragraphs = tuple(
        Paragraph(str(p.get("title") or "").strip(), (str(p.get("paragraph_text") or "").strip(),),
                  bool(p.get("is_supporting")))
        for p in maybe_json(need(row, "paragraphs")) if present(p.get("paragraph_text"))
    )
    if not any(p.supporting for p in paragraphs):
        raise RowError("no supporting paragraph")
    aliases = tuple(str(a).strip() for a in maybe_json(row.get("answer_aliases") or []) if present(a))
    steps = maybe_json(row.get("question_decomposition") or [])
    answers: list[str] = []
    evidence = []
    for step in steps:
        sub = _HOP_REF_RE.sub(lambda m: answers[int(m.group(1)) - 1] if int(m.group(1)) <= len(answers) else m.group(0),
                              str(step.get("question", "")))
        answers.append(str(step.get("answer", "")).strip())
        evidence.append(f"{sub.strip()}: {answers[-1]}")
    return MultihopQuestion(rid, "musique", question, answer, aliases, paragraphs, tuple(evidence))


def _context(raw: Any) -> list[tuple[str, tuple[str, ...]]]:
    """[(title, sentences)] from any of the context layouts."""
    raw = maybe_json(raw)
    if isinstance(raw, dict):
        titles = list(raw.get("title") or [])
        bodies = list(raw.get("sentences") or raw.get("content") or [])
        pairs = list(zip(titles, bodies))
    else:
        pairs = []
        for entry in raw:
            if isinstance(entry, dict):
                pairs.append((entry.get("title", ""), entry.get("sentences") or entry.get("content") or []))
            elif isinstance(entry, (list, tuple)) and len(entry) >= 2:
                pairs.append((entry[0], entry[1]))
    out = []
    for title, body in pairs:
        sentences = [body] if isinstance(body, str) else list(body)
        cleaned = tuple(str(s).strip() for s in sentences if present(s))
        if cleaned:
            out.append((str(title).strip(), cleaned))
    if not out:
        raise RowError("no context paragraph")
    return out


def _supporting_facts(raw: Any) -> list[tuple[str, int]]:
    raw = maybe_json(raw)
    if isinstance(raw, dict):
        ids = list(raw.get("sent_id") or raw.get("sent_ids") or [])
        return [(str(t).strip(), int(ids[i]) if i < len(ids) else -1) for i, t in enumerate(raw.get("title") or [])]
    facts = []
    for entry in raw:
        if isinstance(entry, dict):
            facts.append((str(entry.get("title", "")).strip(), int(entry.get("sent_id", -1))))
        elif isinstance(entry, (list, tuple)) and len(entry) >= 2:
            facts.append((str(entry[0]).strip(), int(entry[1])))
    if not facts:
        raise RowError("no supporting_facts")
    return facts


def choose_paragraphs(q: MultihopQuestion, k: int, rng: random.Random) -> list[Paragraph]:
    """K paragraphs as branches: every supporting one plus K - (supporting) distractors drawn
    by `rng`, in an order drawn by `rng` (ValueError when K is below the supporting count or
    above the paragraph count)."""
    support = list(q.supporting)
    distractors = [p for p in q.paragraphs if not p.supporting]
    if not len(support) <= k <= len(q.paragraphs):
        raise ValueError(f"{q.id}: K={k} must be in [{len(support)} supporting, {len(q.paragraphs)} paragraphs]")
    chosen = support + rng.sample(distractors, k - len(support))
    rng.shuffle(chosen)
    return chosen
