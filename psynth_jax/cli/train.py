"""`psynth train --config FILE [key=value ...]`: train the cache mapper + synthesizer LoRA.

The run directory (checkpoint.dir) is locked while training (psynth_jax.cli.run_lock): a
second `psynth train` or `psynth eval` on it fails at once, naming the holder. A rerun resumes
from the newest readable checkpoint; when checkpoints exist and none can be read, it stops and
says so, and `--restart` moves them aside and trains from step 0.
"""

from __future__ import annotations

import argparse
import json

from psynth_jax.cli.common import check_attn_impl
from psynth_jax.cli.run_lock import run_dir_session
from psynth_jax.config import load_config

RUN_DIR_DISPOSABLE = ("config.yaml",)  # written at the start of a session; worthless without a checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4 mesh.fsdp=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--restart", action="store_true",
                   help="when the run directory has checkpoints and none of them can be read, move them aside "
                        "(checkpoints/corrupt/) and train from step 0; without it that case is an error. "
                        "A readable checkpoint is always resumed")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fails on a bad config before any compute
    import jax  # the training stack: imported when `psynth train` runs (the parser imports every command)

    from psynth_jax import distributed
    from psynth_jax.train.trainer import Trainer

    distributed.initialize()  # a pod's processes join here, before any JAX computation
    check_attn_impl(cfg.model.attn_impl, "model.attn_impl")
    with run_dir_session(cfg.checkpoint.dir, "psynth train", "checkpoint.dir", primary=jax.process_index() == 0,
                         disposable=RUN_DIR_DISPOSABLE):
        summary = Trainer(cfg, quiet=args.quiet, restart=args.restart).train()
    print(json.dumps({k: summary[k] for k in ("final_step", "eval_before", "eval_after", "last_losses")
                      if k in summary}, indent=2))
    return 0
