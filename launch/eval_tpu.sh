#!/usr/bin/env bash
# Evaluate on a Cloud TPU VM or pod slice: same conventions as train_tpu.sh, running
# `psynth eval` on every worker (relaunched from scratch after a preemption).
#
# Usage: launch/eval_tpu.sh [up|run|logs|delete|all] [-- key=value ...]
#   up      provision (QUEUED=1) or check the TPU VM, wait until ACTIVE, install the project
#   run     run psynth eval on all workers, restarting on failure or preemption
#   logs    follow the run's log on one worker (LOG_WORKER, default 0)
#   delete  delete the queued resource (QUEUED=1) or the TPU VM
#   all     up, then run (the default)
# Arguments after -- are config overrides.
#
# Environment: as for train_tpu.sh (TPU_NAME, ZONE, PROJECT, CONFIG, QUEUED, ACCELERATOR_TYPE,
# RUNTIME_VERSION, QR_NAME, SPOT, MAX_RESTARTS, POLL_SECONDS, PYTHON_VERSION, DELETE, DRY_RUN),
# except that RUN_DIR is optional: when set, it is the trained run to evaluate (passed as
# adapter=RUN_DIR; it must be readable on the workers, e.g. copied locally), and CONFIG is an
# eval config (configs/eval_*.yaml).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_main eval "$@"
