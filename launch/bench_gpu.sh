#!/usr/bin/env bash
# Issue #7's GPU measurements on one NVIDIA GPU, one `psynth bench` command per step, all in
# one go (about 25 min on an H100; each step alone is under 10 min). Results land in
# $OUT/<step>/ (JSON + PNG); docs/PERFORMANCE.md's tables are read from them.
#
# Usage: launch/bench_gpu.sh [STEP ...]     (default: every step, in this order)
#
# Steps:
#   roofline   measured bf16 matmul peak and memory bandwidth (every later step reuses it)
#   ttft7b     text vs cache TTFT, Qwen2.5-7B shape, K 2,4,8 x L 512,1024,2048, + PyTorch SDPA peer
#   ttft14b    the release's backbone shape (Qwen3-14B): K 3,8 x L 2048,4096, + PyTorch SDPA peer
#   batch      batched synthesis, B 1,8,32 (Qwen2.5-7B, K 4 x L 1024): TTFT and output tokens/s
#   decode     synthesizer decode over a 16k-token cache against the bandwidth floor
#   train      the trainer's step at Qwen3-14B, 3 x 1024 branch + 512 live tokens, remat on and off
#   sampling   one sampled token over Qwen2.5's 152k vocabulary: top-p by bisection vs by sorting
#
# Environment:
#   OUT        results folder (default benchmarks/results/<GPU name from nvidia-smi, lower-case>)
#   ATTN_IMPL  attention kernel of the JAX paths (default cudnn)
#   PSYNTH_BIN psynth executable (default: psynth on PATH, else .venv/bin/psynth)
#   DRY_RUN=1  print the commands instead of running them
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ALL_STEPS=(roofline ttft7b ttft14b batch decode train sampling)

gpu_slug() {
  local name
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || true
  name=${name:-gpu}
  name=${name,,}
  name=${name// /-}
  printf '%s' "${name//[^a-z0-9.-]/}"
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
STEPS=("$@")
(( ${#STEPS[@]} )) || STEPS=("${ALL_STEPS[@]}")
for step in "${STEPS[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $step "* ]] || die "unknown step '$step' (steps: ${ALL_STEPS[*]})"
done

cd "$PSYNTH_ROOT"
OUT=${OUT:-benchmarks/results/$(gpu_slug)}
ATTN=${ATTN_IMPL:-cudnn}
if [[ -n "${PSYNTH_BIN:-}" ]]; then
  BIN=$PSYNTH_BIN
elif command -v psynth >/dev/null; then
  BIN=psynth
else
  BIN=$PSYNTH_ROOT/.venv/bin/psynth
fi
ROOF=(--roofline-json "$OUT/roofline/roofline.json")

for step in "${STEPS[@]}"; do
  log "step $step -> $OUT/$step"
  case "$step" in
    roofline) run_cmd "$BIN" bench roofline --dtype bfloat16 --out "$OUT/roofline" ;;
    ttft7b) run_cmd "$BIN" bench ttft --arch qwen2.5-7b --dtype bfloat16 --attn-impl "$ATTN" --ks 2,4,8 \
              --ls 512,1024,2048 --prompt-tokens 128 --repeats 5 --torch-peer --peer-order first "${ROOF[@]}" --out "$OUT/$step" ;;
    ttft14b) run_cmd "$BIN" bench ttft --arch qwen3-14b --dtype bfloat16 --attn-impl "$ATTN" --ks 3,8 \
               --ls 2048,4096 --prompt-tokens 128 --repeats 5 --torch-peer --peer-order first "${ROOF[@]}" --out "$OUT/$step" ;;
    batch) run_cmd "$BIN" bench batch --arch qwen2.5-7b --dtype bfloat16 --attn-impl "$ATTN" --bs 1,8,32 \
             --k 4 --l 1024 --prompt-tokens 128 --new-tokens 128 --out "$OUT/$step" ;;
    decode) run_cmd "$BIN" bench decode --arch qwen2.5-7b --dtype bfloat16 --attn-impl "$ATTN" \
              --cache-tokens 4096,16384 --steps 64 "${ROOF[@]}" --out "$OUT/$step" ;;
    train) run_cmd "$BIN" bench train --arch qwen3-14b --dtype bfloat16 --attn-impl "$ATTN" --branches 3 \
             --branch-tokens 1024 --live-tokens 512 --remat both "${ROOF[@]}" --out "$OUT/$step" ;;
    sampling) run_cmd "$BIN" bench sampling --arch qwen2.5-7b --batch 1,8,32 --out "$OUT/$step" ;;
  esac
done
log "done: $OUT"
