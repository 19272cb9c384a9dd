"""Two weight sets (or two modes) paired on the same examples and branches: is one closer to the
text path than the other?

Reads two eval run directories (read-only) and pairs each example's mode A in run A with its
mode B in run B. Per task and pooled:
- teacher-forced KL(text || mode) (`psynth eval --kl`, kl.jsonl: measured whether or not the mode
  answered): both means, the mean paired difference B - A, the share of examples where B is
  lower, and the two-sided Wilcoxon signed-rank p;
- over the examples both modes answered: accuracy, the examples only B / only A got right and
  the exact McNemar p (stats.py), and agreement with the text path's answer;
- optionally (`by`), the same numbers within groups of examples, to see where a gain stops: by
  K (the branches handed over), by the branches' token count or by the text answer's (the KL's
  target) length, each in thirds of the task's examples (and of all examples for the pooled rows).

Paired means the same inputs: both runs must hold the same branches (branches.jsonl) and the
same text-path answers (the KL's target) for every compared example, or the comparison is
refused. Pure Python over records.jsonl, like stats.py.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from psynth_jax.eval.stats import mcnemar_exact
from psynth_jax.eval.store import BRANCHES, KL, RECORDS, BranchSet, JsonlLog, Key, ModeRecord, kl_rows, split_records


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a comparison: a run directory's records, KL values and branches, and the mode compared."""

    label: str
    mode: str
    records: dict[Key, ModeRecord]
    branches: dict[tuple[str, str], BranchSet]
    kl: dict[Key, float | None] = dataclasses.field(default_factory=dict)

    def modes(self) -> set[str]:
        """Every mode with an answer or a KL value in this run."""
        return {k[2] for k in self.records} | {k[2] for k in self.kl}


def _rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """The merged file's rows, then every process part's (a later line supersedes an earlier one)."""
    stem, _, suffix = name.partition(".")
    parts = sorted(run_dir.glob(f"{stem}.p*.{suffix}"), key=lambda p: int(p.name.split(".")[1][1:]))
    return [r for p in [run_dir / name, *parts] if p.is_file() for r in JsonlLog(p, repair=False).rows]


def read_side(spec: str) -> Side:
    """`RUN_DIR` or `RUN_DIR:MODE` (no mode: every mode both sides share is compared)."""
    path, _, mode = spec.partition(":")
    run_dir = Path(path)
    records, kl = split_records(_rows(run_dir, RECORDS))
    kl.update(kl_rows(_rows(run_dir, KL)))
    if not records:
        raise FileNotFoundError(f"{run_dir}: no answers in {RECORDS} "
                                "(not an eval run directory, or one not yet answered)")
    branches = {(r["task"], r["id"]): BranchSet(**r) for r in _rows(run_dir, BRANCHES)}
    side = Side(label=str(run_dir) + (f":{mode}" if mode else ""), mode=mode, records=records, branches=branches,
                kl=kl)
    if mode and mode not in side.modes():
        raise ValueError(f"{run_dir} has no records of mode {mode!r} (it has {', '.join(sorted(side.modes()))})")
    return side


def wilcoxon_signed_rank(diffs: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test that `diffs` (paired differences) are centred
    on 0: zero differences dropped, tied |d| given their mean rank, the normal approximation with
    the tie-corrected variance (no continuity correction). 1.0 when no difference is nonzero."""
    d = [x for x in diffs if x != 0]
    n = len(d)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks = [0.0] * n
    ties = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - ties / 48
    if var <= 0:
        return 1.0
    z = (w_plus - mean) / math.sqrt(var)
    return math.erfc(abs(z) / math.sqrt(2))


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def _check_paired(a: Side, b: Side, keys: Sequence[tuple[str, str]]) -> None:
    """Refuse pairs whose inputs differ: other branches, or another text answer (the KL's target)."""
    for what, differ in (
        ("branches", lambda k: k in a.branches and k in b.branches and a.branches[k].tokens != b.branches[k].tokens),
        ("text-path answers", lambda k: (k + ("text",)) in a.records and (k + ("text",)) in b.records
         and a.records[k + ("text",)].text != b.records[k + ("text",)].text),
    ):
        bad = [k for k in keys if differ(k)]
        if bad:
            raise ValueError(f"{a.label} and {b.label} hold different {what} for {len(bad)} of {len(keys)} examples "
                             f"(first: {bad[0][0]}/{bad[0][1]}): not a paired comparison; copy one run's "
                             f"{BRANCHES} and text records into the other's out_dir before answering")


def _agreement(side: Side, mode: str, keys: Sequence[tuple[str, str]]) -> float | None:
    pairs = [(side.records[k + (mode,)], side.records.get(k + ("text",))) for k in keys]
    pairs = [(r, t) for r, t in pairs if t is not None and r.error is None and t.error is None]
    return sum(r.answer == t.answer for r, t in pairs) / len(pairs) if pairs else None


def compare_pair(a: Side, b: Side, mode_a: str, mode_b: str, keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The paired numbers of mode_a in `a` against mode_b in `b` over the examples `keys`: answers
    where both answered ("n"), KL where both were measured ("kl"]["n"])."""
    answered = [k for k in keys if k + (mode_a,) in a.records and k + (mode_b,) in b.records]
    ra = [a.records[k + (mode_a,)] for k in answered]
    rb = [b.records[k + (mode_b,)] for k in answered]
    wins = sum(y.correct and not x.correct for x, y in zip(ra, rb))
    losses = sum(x.correct and not y.correct for x, y in zip(ra, rb))
    kl = [(a.kl.get(k + (mode_a,)), b.kl.get(k + (mode_b,))) for k in keys]
    kl = [(x, y) for x, y in kl if _finite(x) and _finite(y)]
    n = len(answered)
    return {
        "n": n,
        "accuracy": [sum(x.correct for x in ra) / n, sum(y.correct for y in rb) / n] if n else None,
        "b_vs_a": {"wins": wins, "losses": losses, "p_mcnemar": mcnemar_exact(wins, losses)},
        "agreement_with_text": [_agreement(a, mode_a, answered), _agreement(b, mode_b, answered)],
        "kl": {
            "n": len(kl),
            "mean": [statistics.fmean(x for x, _ in kl), statistics.fmean(y for _, y in kl)] if kl else None,
            "mean_diff": statistics.fmean(y - x for x, y in kl) if kl else None,
            "b_lower": sum(y < x for x, y in kl) / len(kl) if kl else None,
            "p_wilcoxon": wilcoxon_signed_rank([y - x for x, y in kl]) if kl else None,
        },
    }


GROUPINGS = ("k", "branch_tokens", "answer_tokens")


def _example_value(a: Side, b: Side, key: tuple[str, str], by: str) -> int | None:
    """The example's K, branch tokens or text-answer tokens, from either side's text record."""
    text = a.records.get(key + ("text",)) or b.records.get(key + ("text",))
    if text is None:
        return None
    return {"k": text.num_branches, "branch_tokens": text.branch_tokens, "answer_tokens": text.output_tokens}[by]


def _groups(values: dict[tuple[str, str], int], by: str) -> dict[str, list[tuple[str, str]]]:
    """Examples grouped by `by`: each K alone; token counts in thirds (by rank, ties kept
    together), labelled with their range, e.g. "branch_tokens 98-223"."""
    keys = sorted(values, key=lambda k: (values[k], k))
    if by == "k":
        return {f"K={v}": [k for k in keys if values[k] == v] for v in sorted(set(values.values()))}
    cuts = sorted({values[keys[(len(keys) * i) // 3]] for i in (1, 2)} if len(keys) >= 3 else set())
    bins: dict[int, list[tuple[str, str]]] = {}
    for k in keys:
        bins.setdefault(sum(values[k] >= c for c in cuts), []).append(k)
    return {f"{by} {values[g[0]]}-{values[g[-1]]}": g for _, g in sorted(bins.items())}


def group_pairs(a: Side, b: Side, mode_a: str, mode_b: str, keys: Sequence[tuple[str, str]], by: str
                ) -> dict[str, dict[str, Any]]:
    """{task or "pooled": {group: `compare_pair` numbers}}: the comparison within each group of `by`
    (`GROUPINGS`), per task and over every task (examples without a text record are left out)."""
    values = {k: v for k in keys if (v := _example_value(a, b, k, by)) is not None}
    out: dict[str, dict[str, Any]] = {}
    for task in [*sorted({k[0] for k in values}), "pooled"]:
        own = {k: v for k, v in values.items() if task == "pooled" or k[0] == task}
        out[task] = {label: compare_pair(a, b, mode_a, mode_b, g) for label, g in _groups(own, by).items()}
    return out


def _shared(x: dict[Key, Any], y: dict[Key, Any], mode_x: str, mode_y: str) -> set[tuple[str, str]]:
    """The (task, id) that `x` holds for mode_x and `y` for mode_y."""
    return {k[:2] for k in x if k[2] == mode_x} & {k[:2] for k in y if k[2] == mode_y}


def compare(a: Side, b: Side, tasks: Sequence[str] | None = None, by: Sequence[str] = ()) -> dict[str, Any]:
    """{"a", "b", "pairs": [{"mode_a", "mode_b", "tasks": {task: numbers}, "all": numbers,
    "by": {grouping: `group_pairs`}}]}: every mode pair (the sides' modes, or each mode both runs
    hold) over the examples both sides answered or both sides measured the KL of; `by`: groupings
    of `GROUPINGS` to break the numbers down by."""
    for g in by:
        if g not in GROUPINGS:
            raise ValueError(f"unknown grouping {g!r}: expected one of {', '.join(GROUPINGS)}")
    if a.mode or b.mode:
        pairs = [(a.mode or b.mode, b.mode or a.mode)]
    else:
        pairs = [(m, m) for m in sorted(a.modes() & b.modes()) if m != "text"]
    wanted = set(tasks) if tasks else None
    out: dict[str, Any] = {"a": a.label, "b": b.label, "pairs": []}
    for mode_a, mode_b in pairs:
        both = _shared(a.records, b.records, mode_a, mode_b) | _shared(a.kl, b.kl, mode_a, mode_b)
        keys = sorted(k for k in both if wanted is None or k[0] in wanted)
        if not keys:
            raise ValueError(f"{a.label} ({mode_a}) and {b.label} ({mode_b}) share no answered or KL-measured example"
                             + (f" of tasks {', '.join(sorted(wanted))}" if wanted else ""))
        _check_paired(a, b, keys)
        by_task = {t: compare_pair(a, b, mode_a, mode_b, [k for k in keys if k[0] == t])
                   for t in sorted({k[0] for k in keys})}
        out["pairs"].append({"mode_a": mode_a, "mode_b": mode_b, "tasks": by_task,
                             "all": compare_pair(a, b, mode_a, mode_b, keys),
                             "by": {g: group_pairs(a, b, mode_a, mode_b, keys, g) for g in by}})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def comparison_markdown(result: dict[str, Any]) -> str:
    """One table per mode pair: a row per task and the pooled row."""
    lines = [f"A = `{result['a']}`, B = `{result['b']}`. KL: mean teacher-forced KL(text || mode) on the "
             "examples both sides measured, B - A paired, two-sided Wilcoxon signed-rank p; accuracy: "
             "B's wins/losses against A, exact McNemar p; agree: answer equal to the text path's.", ""]
    for pair in result["pairs"]:
        lines += [f"**{pair['mode_a']} (A) vs {pair['mode_b']} (B)**", "",
                  "| task | n | KL A | KL B | B - A | B lower % | p (Wilcoxon) | acc A % | acc B % "
                  "| B vs A +/- (p) | agree A % | agree B % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        lines += [_row(task, m) for task, m in [*pair["tasks"].items(), ("pooled", pair["all"])]]
        lines.append("")
        for grouping, by_task in pair.get("by", {}).items():
            lines += [f"By {grouping} ({_GROUPING_NOTES[grouping]}):", "",
                      "| task, group | n | KL A | KL B | B - A | B lower % | p (Wilcoxon) | acc A % | acc B % "
                      "| B vs A +/- (p) | agree A % | agree B % |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
            lines += [_row(f"{task}, {label}", m) for task, groups in by_task.items() for label, m in groups.items()]
            lines.append("")
    return "\n".join(lines)


_GROUPING_NOTES = {"k": "branches handed over",
                   "branch_tokens": "the branches' tokens, in thirds of each task and of all tasks pooled",
                   "answer_tokens": "the text answer's tokens, the KL's target, in thirds of each task and pooled"}


def _row(name: str, m: dict[str, Any]) -> str:
    kl, acc, agree, vs = m["kl"], m["accuracy"] or [None, None], m["agreement_with_text"], m["b_vs_a"]
    means = kl["mean"] or [None, None]
    paired = f"+{vs['wins']}/-{vs['losses']} ({vs['p_mcnemar']:.3g})" if m["n"] else "-"
    return (f"| {name} | {m['n']} (KL {kl['n']}) | {_num(means[0])} | {_num(means[1])} "
            f"| {_num(kl['mean_diff'], '+.3f')} "
            f"| {_pct(kl['b_lower'])} | {_num(kl['p_wilcoxon'], '.3g')} | {_pct(acc[0])} | {_pct(acc[1])} "
            f"| {paired} | {_pct(agree[0])} | {_pct(agree[1])} |")
