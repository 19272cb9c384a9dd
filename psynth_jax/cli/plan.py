"""`psynth plan --config CONFIG --accelerator TYPE`: will it fit, before anyone pays for the accelerator.

Compiles every program the config runs for the target (train/plan.py): with the TPU compiler for
a Cloud TPU slice when libtpu is installed (`pip install -e '.[tpu]'`), on the slice's own TPU
devices; otherwise an estimate on fake CPU devices, labelled so. Prints per device the parameters,
LoRA + mapper + optimizer state, KV caches, and per program the compiler's memory (arguments,
temporaries, outputs, peak), cost (FLOPs, bytes) and, on TPU, collectives and Mosaic kernels.
Exits 2 naming the largest item (on TPU: the largest buffer) when it does not fit.

`--fit KEY` searches the largest value of a config key (data.batch_size, a guard) that fits,
compiling one plan per candidate (train/fit.py).
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
    p.add_argument("--compiler", choices=("auto", "tpu", "cpu"), default="auto",
                   help="auto: the TPU compiler for a TPU target when libtpu is installed, else the CPU estimate")
    p.add_argument("--branches", type=positive_int, default=None,
                   help="eval: K worker branches per request (default: num_workers)")
    p.add_argument("--branch-tokens", type=positive_int, default=None,
                   help="eval: tokens per branch (default: the config's worker_tokens)")
    p.add_argument("--prompt-tokens", type=positive_int, default=256, help="synthesizer (and worker) prompt tokens")
    p.add_argument("--programs", default=None, metavar="NAME,...", help="compile only these programs (names as reported)")
    p.add_argument("--fit", default=None, metavar="KEY",
                   help="find the largest value of KEY (e.g. data.batch_size, data.max_branch_slots) that fits")
    p.add_argument("--fit-values", default=None, metavar="V,...",
                   help="--fit's candidates, ascending (default: the config's value x 1/2, 1, 3/2, 2, 3, 4)")
    p.add_argument("--save-executable", default=None, metavar="DIR",
                   help="TPU compiler: serialize each compiled program that fits into DIR (<program>.executable)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the plan (or --fit's search) as JSON here (an existing file that is not one "
                        "needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file that holds something else")
    p.add_argument("--mesh-only", action="store_true",
                   help="only check that the config's mesh fits the slice's chips (no compile: seconds)")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.train.plan import PlanRequest, config_kind, format_plan, mesh_fits, run_plan  # jax, optax

    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config {args.config}: no such file")
    json_out = check_output_file(args.json, "--json", inputs=[args.config], force=args.force,
                                 ours=_is_plan) if args.json else None  # before minutes of compiling
    req = PlanRequest(config=args.config, overrides=tuple(args.overrides), accelerator=parse_accelerator(args.accelerator),
                      kind=config_kind(args.config), branches=args.branches, branch_tokens=args.branch_tokens,
                      prompt_tokens=args.prompt_tokens, compiler=args.compiler,
                      programs=tuple(args.programs.split(",")) if args.programs else None,
                      save_executable=args.save_executable)
    if args.mesh_only:
        data, fsdp, tensor = mesh_fits(req)
        print(f"mesh data={data} fsdp={fsdp} tensor={tensor} fits {req.accelerator}")
        return 0
    if args.fit:
        return _fit(req, args, json_out)
    compiler = "the TPU compiler" if req.uses_tpu_compiler() else "the CPU compiler (an estimate)"
    print(f"[psynth plan] compiling for {req.accelerator} with {compiler} ...", file=sys.stderr, flush=True)
    plan = run_plan(req)
    print(format_plan(plan))
    _write_json(json_out, plan)
    if not plan["fits"]:
        print(f"psynth plan: error: {args.config} does not fit {req.accelerator}: the largest item is "
              f"{plan['largest_item']}", file=sys.stderr)
        return 2
    return 0


def _fit(req, args: argparse.Namespace, json_out: Path | None) -> int:
    from psynth_jax.train.fit import candidates, fit_search, format_fit

    values = [v.strip() for v in args.fit_values.split(",")] if args.fit_values else candidates(req, args.fit)
    result = fit_search(req, args.fit, values)
    print(format_fit(result))
    _write_json(json_out, result)
    return 0 if result["largest_fitting"] is not None else 2


def _write_json(path: Path | None, obj: dict) -> None:
    if path is not None:
        with replace_atomically(path) as tmp:
            tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _is_plan(path: Path) -> bool:
    """Whether `path` holds a plan or a fit search written by --json (which a new one may replace)."""
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return False
    return isinstance(plan, dict) and ({"fits", "largest_item"} <= plan.keys() or "largest_fitting" in plan)
