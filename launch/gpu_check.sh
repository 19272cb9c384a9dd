#!/usr/bin/env bash
# The GPU check (issue #16): one prepared command of at most 8 minutes on one NVIDIA H200, run
# from a fresh copy of the repository. It installs the project without touching the machine's
# jax, flax and torch, checks the cuDNN attention path against the XLA reference first, then
# measures the most important figures, each step in a child process with its own time cap (a
# step past its cap is killed and recorded; the next one runs). The results folder is rewritten
# after every step, so a run cut short keeps what it measured. Steps, caps and their estimates:
# benchmarks/gpu_steps.py (STEPS) and docs/PERFORMANCE.md ("The GPU check").
#
# For the long sweep of every point of every table (~25 min), use launch/bench_gpu.sh instead.
#
# Usage: launch/gpu_check.sh [DRIVER OPTIONS]
#   e.g. --only kernels,ttft7b    --skip peer14b    --cap ttft7b=150
#
# Results ($OUT, 3 files): results.json (environment, every step's status, command and JSON, the
# figures against their targets), summary.md (failures first, then every figure next to its
# target), gpu_check.log (every step's output). Then, on any machine:
#   python -m benchmarks.gpu_check --update-docs "$OUT"   # fills docs/PERFORMANCE.md's cells
#
# Environment:
#   OUT        results folder (default benchmarks/results/gpu_check)
#   WORK       the steps' own outputs, not needed afterwards (default runs/gpu_check)
#   PYTHON     interpreter that has jax (CUDA), flax, torch, transformers (default python3)
#   INSTALL=0  skip `pip install --no-deps -e .` (the source tree is on PYTHONPATH either way)
#   SMOKE=1    CPU smoke run: the same steps at tiny shapes, float32, XLA attention (xla_split stands
#              in for cuDNN in the correctness step); installs nothing
#   DRY_RUN=1  print every command ("+ ..." on stderr), run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac

cd "$PSYNTH_ROOT"
PYTHON=${PYTHON:-python3}
ARGS=(--out "${OUT:-benchmarks/results/gpu_check}" --work "${WORK:-runs/gpu_check}")
if [[ "${SMOKE:-0}" == 1 ]]; then ARGS+=(--smoke); fi
if [[ "${INSTALL:-1}" == 0 ]]; then ARGS+=(--skip install); fi
if is_dry_run; then ARGS+=(--dry-run); fi
# the checkout's own code wins over any installed copy, in this process and every step's
export PYTHONPATH="$PSYNTH_ROOT${PYTHONPATH:+:$PYTHONPATH}"

show_cmd "$PYTHON" -m benchmarks.gpu_check "${ARGS[@]}" "$@"
exec "$PYTHON" -m benchmarks.gpu_check "${ARGS[@]}" "$@"
