"""`psynth plan --config CONFIG --accelerator TYPE`: per-device memory before spending accelerator time.

Prints, per device, the parameters, the LoRA + mapper + optimizer state, the KV caches and the
compiled step's temporaries (the step compiled for fake CPU devices shaped like the target's
mesh), and whether that fits the chip; exits non-zero naming the largest item when it does not.
Works for training configs and `psynth eval` configs (eval: K branches x L tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from psynth_jax.cli.common import positive_int
from psynth_jax.config.accelerators import parse_accelerator
from psynth_jax.formats.output_files import check_output_file, replace_atomically


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a training config or a `psynth eval` config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for train / eval")
    p.add_argument("--accelerator", required=True, metavar="TYPE",
                   help="where it will run: a Cloud TPU type (v5litepod-16, v5p-64, v4-32) or a GPU node (8xh100, h200)")
    p.add_argument("--branches", type=positive_int, default=3, help="eval: K worker branches per request")
    p.add_argument("--branch-tokens", type=positive_int, default=4096, help="eval: tokens per branch")
    p.add_argument("--prompt-tokens", type=positive_int, default=256, help="eval: synthesizer prompt tokens")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the plan as JSON here (an existing file that is not a plan needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file that holds something else")
    p.add_argument("--mesh-only", action="store_true",
                   help="only check that the config's mesh fits the slice's chips (no compile: seconds)")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.train.plan import PlanRequest, config_kind, format_plan, mesh_fits, run_plan  # jax, optax

    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    for flag in ("branches", "branch_tokens", "prompt_tokens"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    json_out = check_output_file(args.json, "--json", inputs=[args.config], force=args.force,
                                 ours=_is_plan) if args.json else None  # before minutes of compiling
    req = PlanRequest(config=args.config, overrides=tuple(args.overrides), accelerator=parse_accelerator(args.accelerator),
                      kind=config_kind(args.config), branches=args.branches, branch_tokens=args.branch_tokens,
                      prompt_tokens=args.prompt_tokens)
    if args.mesh_only:
        data, fsdp, tensor = mesh_fits(req)
        print(f"mesh data={data} fsdp={fsdp} tensor={tensor} fits {req.accelerator}")
        return 0
    print(f"[psynth plan] compiling on fake CPU devices shaped like {req.accelerator} ...", file=sys.stderr, flush=True)
    plan = run_plan(req)
    print(format_plan(plan))
    if json_out is not None:
        with replace_atomically(json_out) as tmp:
            tmp.write_text(json.dumps(plan, indent=2) + "\n")
    if not plan["fits"]:
        print(f"psynth plan: error: {args.config} does not fit {req.accelerator}: the largest item is "
              f"{plan['largest_item']}", file=sys.stderr)
        return 1
    return 0


def _is_plan(path: Path) -> bool:
    """Whether `path` holds a plan written by --json (which a new plan may replace)."""
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return isinstance(plan, dict) and {"fits", "largest_item"} <= plan.keys()
