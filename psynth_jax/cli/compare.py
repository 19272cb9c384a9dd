"""`psynth compare A[:MODE] B[:MODE]`: two eval runs (two weight sets, or two modes) paired on the
same examples and branches: teacher-forced KL(text || mode) with a Wilcoxon signed-rank test,
accuracy with McNemar's, agreement with the text path (psynth_jax/eval/compare.py).

Without modes, every mode both runs hold is compared with itself (a weight set against another);
with them, e.g. `RUN:naive_cache RUN:psynth`, those two. `--by k,branch_tokens,answer_tokens`
breaks the numbers down within groups of examples (where does a gain stop?). Reads the run directories, writes nothing
unless --out is given; refuses runs whose branches or text-path answers differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A[:MODE]", help="eval run directory (psynth eval's out_dir), optionally :MODE")
    p.add_argument("b", metavar="B[:MODE]", help="the other run directory (may be the same), optionally :MODE")
    p.add_argument("--tasks", default=None, help="comma-separated tasks to compare (default: every shared task)")
    p.add_argument("--by", default="", metavar="GROUPING[,...]",
                   help="also break the numbers down within groups of examples: k (branches handed over), "
                        "branch_tokens or answer_tokens (the text answer's length; both in thirds: of each task's examples, and of all "
                        "examples for the pooled rows)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="also write the numbers as JSON here (and the table beside it, .md)")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.eval.compare import compare, comparison_markdown, read_side

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    by = [g for g in args.by.split(",") if g]
    result = compare(read_side(args.a), read_side(args.b), tasks, by)
    table = comparison_markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0
