#!/usr/bin/env bash
# Rehearse a pod launch on this machine: N psynth processes on localhost joined as one JAX
# runtime, through the same code path a TPU slice or GPU cluster uses (config, data sharding,
# checkpoint directory, resume, preemption).
#
# Usage: launch/local_pod.sh N [-- ] PSYNTH_ARGS...
#   launch/local_pod.sh 2 train --config configs/smollm2_135m_cpu.yaml checkpoint.dir=runs/rehearsal
#   launch/local_pod.sh 2 eval --config configs/eval_smoke.yaml
# Environment: DEVICES (CPU devices per process, default 4), LOG_DIR (default runs/local_pod),
# PYTHON (default: .venv/bin/python if present, else python3), DRY_RUN=1 prints the command.
# kill -TERM <this script's pid> preempts every process; kill one process (pids in LOG_DIR/pids.json)
# to rehearse a host failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
N="$1"; shift
[[ "${1:-}" == "--" ]] && shift
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
CMD=("$PYTHON" -m psynth_jax.cli.local_pod --processes "$N" --devices "${DEVICES:-4}" --log-dir "${LOG_DIR:-runs/local_pod}" -- "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
