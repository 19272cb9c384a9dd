"""`psynth train --config FILE [key=value ...]`: train the cache mapper + synthesizer LoRA."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4 mesh.fsdp=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from psynth_jax.config import load_config
    from psynth_jax.train.trainer import Trainer, maybe_initialize_distributed

    cfg = load_config(args.config, args.overrides)  # fails on a bad config before any compute
    maybe_initialize_distributed()
    summary = Trainer(cfg, quiet=args.quiet).train()
    print(json.dumps({k: summary[k] for k in ("final_step", "eval_before", "eval_after", "last_losses")
                      if k in summary}, indent=2))
    return 0
