#!/usr/bin/env bash
# Train on one GPU node or several: one `psynth train` process per node, started over ssh, with
# the coordinator variables psynth hands to jax.distributed.initialize() (JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES, JAX_PROCESS_ID; the first host is the coordinator). The first host to fail
# stops the others.
#
# Usage: launch/train_gpu.sh [-- key=value ...]
#
# Environment:
#   CONFIG               config file, relative to the repository root (required)
#   HOSTS                comma-separated ssh hosts, one process each; unset: run on this machine
#   RUN_DIR              run directory (checkpoint.dir); with several hosts, a shared path or gs://
#   REMOTE_DIR           the repository on the hosts (default: this checkout's path, e.g. on NFS)
#   PSYNTH_BIN           psynth executable on the hosts (default: $REMOTE_DIR/.venv/bin/psynth)
#   COORDINATOR_ADDRESS  coordinator host as the other hosts reach it (default: the first host)
#   COORDINATOR_PORT     port of the JAX coordinator (default 8476)
#   SSH_OPTS             extra ssh options, e.g. "-i ~/.ssh/key -p 2222"
#   DRY_RUN=1            print the commands instead of running them
#
# Example (two 8-GPU nodes):
#   HOSTS=gpu-a,gpu-b CONFIG=configs/qwen3_14b_8xh100.yaml RUN_DIR=/nfs/runs/q14b \
#     launch/train_gpu.sh -- mesh.fsdp=16 data.batch_size=16
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --) shift ;;
  "") ;;
  *) die "unexpected argument '$1' (config overrides go after --)" ;;
esac
OVERRIDES=("$@")
check_config
psynth_args train

# run_local: a single process on this machine.
run_local() {
  local bin=${PSYNTH_BIN:-$PSYNTH_ROOT/.venv/bin/psynth}
  cd "$PSYNTH_ROOT"
  run_cmd "$bin" "${PSYNTH_ARGS[@]}"
}

# run_hosts HOST...: one process per host; the first failure stops the others.
run_hosts() {
  local hosts=("$@") remote_dir=${REMOTE_DIR:-$PSYNTH_ROOT} ssh_opts=() pids=() i host remote args pid
  local bin=${PSYNTH_BIN:-$remote_dir/.venv/bin/psynth}
  local coordinator="${COORDINATOR_ADDRESS:-${1#*@}}:${COORDINATOR_PORT:-8476}"
  read -ra ssh_opts <<<"${SSH_OPTS:-}"
  printf -v args ' %q' "${PSYNTH_ARGS[@]}"
  for i in "${!hosts[@]}"; do
    host=${hosts[$i]}
    printf -v remote 'cd %q && JAX_COORDINATOR_ADDRESS=%q JAX_NUM_PROCESSES=%d JAX_PROCESS_ID=%d %q%s' \
      "$remote_dir" "$coordinator" "${#hosts[@]}" "$i" "$bin" "$args"
    show_cmd ssh -o BatchMode=yes "${ssh_opts[@]}" "$host" "$remote"
    if ! is_dry_run; then
      ssh -o BatchMode=yes "${ssh_opts[@]}" "$host" "$remote" \
        > >(awk -v prefix="[$host] " '{ print prefix $0; fflush() }') 2>&1 &
      pids+=("$!")
    fi
  done
  for _ in "${pids[@]}"; do
    if ! wait -n; then
      for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
      die "a host failed; stopped the others"
    fi
  done
}

if [[ -z "${HOSTS:-}" ]]; then
  run_local
else
  IFS=, read -ra host_list <<<"$HOSTS"
  run_hosts "${host_list[@]}"
fi
