#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: provision, install, run `psynth train` on every worker,
# and recover from preemption by re-provisioning and relaunching (training resumes from RUN_DIR).
#
# Usage: launch/train_tpu.sh [up|run|logs|delete|all] [-- key=value ...]
#   up      provision (QUEUED=1) or check the TPU VM, wait until ACTIVE, install the project
#   run     run psynth train on all workers, restarting on failure or preemption
#   logs    follow the run's log on one worker (LOG_WORKER, default 0)
#   delete  delete the queued resource (QUEUED=1) or the TPU VM
#   all     up, then run (the default)
# Arguments after -- are config overrides, e.g. -- train.lr=3e-4 train.steps=1000.
#
# Environment:
#   TPU_NAME, ZONE, PROJECT  the TPU VM (or the node a queued resource creates) (required)
#   CONFIG                   config file, relative to the repository root (required to run)
#   RUN_DIR                  run directory, gs://BUCKET/PATH so a new TPU can resume (required to run)
#   QUEUED=1                 provision through a queued resource (else use an existing TPU VM)
#   ACCELERATOR_TYPE         e.g. v5p-64, v5litepod-256 (v5e-256 accepted), v6e-64 (QUEUED=1)
#   RUNTIME_VERSION          TPU VM image (default: chosen from ACCELERATOR_TYPE)
#   QR_NAME                  queued resource name (default: $TPU_NAME-qr)
#   SPOT=1                   request spot capacity
#   MAX_RESTARTS             relaunches after failure or preemption (default 5)
#   POLL_SECONDS             state polling interval while provisioning (default 30)
#   PYTHON_VERSION           Python of the venv on the workers (default 3.11)
#   DELETE=1                 delete the resources when run/all ends (success or failure)
#   DRY_RUN=1                print every command instead of running it
#
# Example:
#   TPU_NAME=psynth ZONE=us-east5-a PROJECT=my-proj QUEUED=1 ACCELERATOR_TYPE=v5p-64 \
#     CONFIG=configs/qwen3_14b_tpu_v5p.yaml RUN_DIR=gs://my-bucket/psynth/v5p \
#     launch/train_tpu.sh all -- train.steps=500
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_main train "$@"
