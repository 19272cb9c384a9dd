"""`psynth eval --config FILE [key=value ...]`: benchmarks x synthesis modes, accuracy and TTFT.

Writes results.json, results.md and plots into the config's out_dir; rerunning the same command
resumes an interrupted eval (finished answers and stored worker branches are reused). The
out_dir is locked while the eval runs (psynth_jax/cli/run_lock.py): a second eval on it fails
at once, naming the holder.
`--retime [TASKS]` measures the TTFT of a finished run's timed answers again on this machine
(after timings taken under load, or to time on an accelerator answers computed elsewhere).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psynth_jax.cli.common import check_attn_impl
from psynth_jax.cli.run_lock import run_dir_session
from psynth_jax.config.eval_schema import load_eval_config

# written when a session starts; worthless (and in the way of a corrected rerun) without answers
OUT_DIR_DISPOSABLE = ("run.json", "config.yaml", "weights.json")


def _task_names(value: str) -> str:
    """--retime / --kl's optional TASKS: an override (key=value) written after the flag would be
    taken for it, and argparse would then call the overrides that follow unrecognized."""
    if "=" in value:
        raise argparse.ArgumentTypeError(f"takes comma-separated task names, not {value!r}: put key=value "
                                         "overrides before the flag")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML eval config (configs/eval_*.yaml)")
    p.add_argument("overrides", nargs="*",
                   help="dotted key=value overrides, e.g. out_dir=runs/x tasks[0].limit=10 modes=text,psynth")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--retime", nargs="?", const="", default=None, metavar="TASKS", type=_task_names,
                   help="do not answer: measure the TTFT of the recorded, timed answers again on this machine, "
                        "for these comma-separated tasks (none given: every task); the report is rewritten")
    p.add_argument("--kl", nargs="?", const="", default=None, metavar="TASKS", type=_task_names,
                   help="do not answer: measure each configured cache mode's teacher-forced KL(text || cache) "
                        "on the text path's recorded answer, whether or not the mode has answered (kl.jsonl), "
                        "for these comma-separated tasks (none given: every task); the report is rewritten")


def run(args: argparse.Namespace) -> int:
    # the evaluation stack (and jax) is imported when `psynth eval` runs: the parser imports every command
    from psynth_jax.eval.tasks import check_task_names

    cfg = load_eval_config(args.config, args.overrides)  # every config problem, before data or model
    check_task_names(cfg.tasks)
    from psynth_jax import distributed
    from psynth_jax.eval.report import RESULTS_MD
    from psynth_jax.eval.runner import run_eval

    distributed.initialize()  # a pod's processes join here, before any JAX computation
    check_attn_impl(cfg.model.attn_impl, "model.attn_impl")

    retime = None if args.retime is None else [t for t in args.retime.split(",") if t]
    kl = None if args.kl is None else [t for t in args.kl.split(",") if t]
    if retime is not None and kl is not None:
        raise ValueError("--retime and --kl: one at a time")
    if retime is not None or kl is not None:  # they measure recorded answers: none, nothing to do (no dir made)
        from psynth_jax.eval.store import RECORDS

        records = Path(cfg.out_dir) / RECORDS
        if not records.is_file() or not records.stat().st_size:
            flag = "--retime" if retime is not None else "--kl"
            raise ValueError(f"{flag}: out_dir {cfg.out_dir} holds no recorded answers ({RECORDS}); run "
                             f"`psynth eval --config {args.config}` without {flag} first")
    with run_dir_session(cfg.out_dir, "psynth eval", "out_dir", primary=distributed.is_main(), disposable=OUT_DIR_DISPOSABLE):
        outcome = run_eval(cfg, quiet=args.quiet, retime=retime, kl=kl)
    if not distributed.is_main():  # process 0 merged the answers and wrote the report
        return 0
    print((outcome.run_dir / RESULTS_MD).read_text())
    print(f"wrote {outcome.run_dir}/ (results.json, results.md, plots)", file=sys.stderr)
    return 0
