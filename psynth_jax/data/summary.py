"""The data summary of a stage: rows per source, role and K, and every skip by reason.

Two kinds of skips, both counted: a builder skips rows it cannot use (a missing field, too few
rounds, held out for evaluation, ...; sources.py), and the guards skip built examples whose
tokens break a limit (K outside the range, cache / live / total tokens, no bucket; tokenize.py).
The trainer logs `format_summary` and saves `data_summary` as RUN_DIR/data_summary.json.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from psynth_jax.data.pipeline import DataStats
from psynth_jax.data.sources import LoadedStage


def data_summary(stage: LoadedStage, stats: DataStats) -> dict[str, Any]:
    """JSON-able summary of a loaded stage after the guards (per source, per role, per K)."""
    sources = {}
    for r in stage.sources:
        guarded = stats.by_source.get(r.name, {"kept": 0, "skipped": {}, "by_k": {}})
        sources[r.name] = {**dataclasses.asdict(r), "kept": guarded["kept"], "guard_skipped": guarded["skipped"],
                           "by_k": guarded["by_k"]}
    by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for s in sources.values():
        role = by_role[s["builder"]]
        role["rows"] += s["rows"]
        role["built"] += s["built"]
        role["skipped_rows"] += sum(s["skipped"].values())
        role["examples"] += s["examples"]
        role["kept"] += s["kept"]
    total_kept = max(stats.kept, 1)
    return {
        "stage": stage.stage,
        "examples": stats.examples,
        "kept": stats.kept,
        "sources": sources,
        "by_role": {role: {**dict(c), "share": c["kept"] / total_kept} for role, c in by_role.items()},
        "by_k": {str(k): n for k, n in stats.by_k.items()},
        "guard_skipped": {r: n for r, n in stats.skipped.items() if n},
        "buckets": stats.buckets,
        "batches_per_epoch": stats.batches_per_epoch,
        "batch_size": stats.batch_size,
        "padding_rows_per_epoch": stats.padding_rows_per_epoch,
    }


def _reasons(skips: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(skips.items(), key=lambda x: -x[1]) if n) or "-"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as plain-text tables (for the log and the report)."""
    lines = [f"stage {summary['stage']!r}: {summary['kept']} of {summary['examples']} examples kept, "
             f"{summary['batches_per_epoch']} batches of {summary['batch_size']} per epoch", "",
             "source | role | format | rows | built | skipped rows (reason n) | capped | weight | in stage | kept | "
             "guard skips (reason n) | kept per K"]
    for name, s in summary["sources"].items():
        per_k = " ".join(f"K{k}:{n}" for k, n in s["by_k"].items()) or "-"
        lines.append(f"{name} | {s['builder']} | {s['format']} | {s['rows']} | {s['built']} | "
                     f"{_reasons(s['skipped'])} | {s['capped']} | {s['weight']:g} | {s['examples']} | {s['kept']} | "
                     f"{_reasons(s['guard_skipped'])} | {per_k}")
    lines += ["", "role | rows | built | in stage | kept | share of kept"]
    for role, r in summary["by_role"].items():
        lines.append(f"{role} | {r['rows']} | {r['built']} | {r['examples']} | {r['kept']} | {100 * r['share']:.1f}%")
    lines += ["", "kept per K: " + ", ".join(f"K={k}: {n}" for k, n in summary["by_k"].items()),
              "guard skips: " + _reasons(summary["guard_skipped"])]
    return "\n".join(lines)
