# shellcheck shell=bash
# Shared by the launch/*.sh scripts (sourced, not run): logging, required variables, dry-run
# aware command execution, and the Cloud TPU lifecycle that train_tpu.sh and eval_tpu.sh drive:
# provision (queued resources) and wait for ACTIVE, install the project on every worker, run
# `psynth <command>` on all workers with restarts on preemption, stream logs, delete.
#
# DRY_RUN=1 prints every command (as "+ ..." on stderr) instead of running it, and simulates a
# resource that becomes ACTIVE once created, so a whole flow prints end to end.
# DRY_RUN_FAILURES=N (dry run only) makes the first N launches fail with a simulated preemption.

if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  echo "launch scripts need bash >= 4.4 (on macOS: brew install bash)" >&2
  exit 1
fi

PSYNTH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[psynth-launch] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
is_dry_run() { [[ "${DRY_RUN:-0}" == 1 ]]; }

# usage: print the comment block at the top of the running script.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# require_vars NAME...: fail naming the first variable that is unset or empty.
require_vars() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name is required (set it in the environment: $name=... $(basename "$0"))"
  done
}

# quote_args ARG...: the arguments as one copy-pastable shell line.
quote_args() {
  local arg plain='^[A-Za-z0-9_./:=,@%+-]+$' out=()
  for arg in "$@"; do
    if [[ "$arg" =~ $plain ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

show_cmd() { printf '+ %s\n' "$(quote_args "$@")" >&2; }

# run_cmd CMD...: show, then run unless dry run (its exit status is the command's).
run_cmd() {
  show_cmd "$@"
  is_dry_run || "$@"
}

# query_cmd CMD...: run a read-only query for its output; empty output when it fails.
query_cmd() {
  if is_dry_run; then
    show_cmd "$@"
  else
    "$@" 2>/dev/null || true
  fi
}

# check_config: CONFIG must be a config file inside the repository, named relative to its root.
check_config() {
  require_vars CONFIG
  [[ "$CONFIG" != /* ]] || die "CONFIG must be relative to the repository root (it is run there), got $CONFIG"
  [[ -f "$PSYNTH_ROOT/$CONFIG" ]] || die "CONFIG=$CONFIG not found under $PSYNTH_ROOT"
}

# preflight: before anything is provisioned, check CONFIG (+ OVERRIDES) against ACCELERATOR_TYPE
# here, with `psynth plan`: the mesh must fit the slice's chip count (seconds), and the memory plan
# must fit the chip: every program the config runs compiled by the TPU compiler for the slice's
# own devices (libtpu, `pip install -e '.[tpu]'`; minutes for a 14B backbone). A config the
# compiler says does not fit stops here, the largest buffer named; PLAN=0 skips the compile.
# PLAN_COMPILER: tpu (default for a Cloud TPU type), cpu (the estimate), auto.
# Runs in dry runs too: it changes nothing anywhere. LOCAL_PYTHON: the interpreter with psynth_jax
# installed here (default .venv/bin/python when present, else python3).
preflight() {
  if [[ -z "${ACCELERATOR_TYPE:-}" ]]; then
    log "ACCELERATOR_TYPE is not set: the config is not checked against the slice before launching"
    return 0
  fi
  local py="${LOCAL_PYTHON:-}"
  if [[ -z "$py" ]]; then
    if [[ -x "$PSYNTH_ROOT/.venv/bin/python" ]]; then py="$PSYNTH_ROOT/.venv/bin/python"; else py=python3; fi
  fi
  local plan=("$py" -m psynth_jax.cli.main plan --config "$CONFIG" --accelerator "$ACCELERATOR_TYPE" "${OVERRIDES[@]}")
  show_cmd "${plan[@]}" --mesh-only
  (cd "$PSYNTH_ROOT" && "${plan[@]}" --mesh-only) || die "CONFIG=$CONFIG does not fit ACCELERATOR_TYPE=$ACCELERATOR_TYPE (above); nothing was provisioned"
  if [[ "${PLAN:-1}" == 1 ]]; then
    local compiler=${PLAN_COMPILER:-auto}
    if [[ -z "${PLAN_COMPILER:-}" && "$ACCELERATOR_TYPE" =~ ^v[0-9] ]]; then compiler=tpu; fi
    plan+=(--compiler "$compiler")
    show_cmd "${plan[@]}"
    local code=0
    (cd "$PSYNTH_ROOT" && "${plan[@]}") || code=$?
    case $code in
      0) ;;
      2) die "CONFIG=$CONFIG does not fit ACCELERATOR_TYPE=$ACCELERATOR_TYPE: its memory plan refused it (above: the largest item); nothing was provisioned" ;;
      *) die "the memory plan of CONFIG=$CONFIG failed (exit $code, above); nothing was provisioned (PLAN=0 skips it)" ;;
    esac
  fi
}

# psynth_args COMMAND: argv of the psynth invocation (CONFIG, RUN_DIR, then OVERRIDES).
# For train, RUN_DIR is where the run lives (checkpoint.dir); for eval, the trained run to load.
psynth_args() {
  PSYNTH_ARGS=("$1" --config "$CONFIG")
  if [[ -n "${RUN_DIR:-}" ]]; then
    if [[ "$1" == eval ]]; then PSYNTH_ARGS+=("adapter=$RUN_DIR"); else PSYNTH_ARGS+=("checkpoint.dir=$RUN_DIR"); fi
  fi
  PSYNTH_ARGS+=("${OVERRIDES[@]}")
}

# ---------------------------------------------------------------------------------------------
# Cloud TPU

is_queued() { [[ "${QUEUED:-0}" == 1 ]]; }

# tpu_main PSYNTH_COMMAND [SUBCOMMAND] [-- OVERRIDES...]: entry point of train_tpu.sh/eval_tpu.sh.
tpu_main() {
  PSYNTH_COMMAND=$1
  shift
  SUBCOMMAND=all
  if [[ $# -gt 0 && "$1" != -- ]]; then SUBCOMMAND=$1; shift; fi
  if [[ $# -gt 0 ]]; then
    [[ "$1" == -- ]] || die "unexpected argument '$1' (config overrides go after --)"
    shift
  fi
  OVERRIDES=("$@")
  case "$SUBCOMMAND" in
    -h | --help | help) usage; return 0 ;;
    up | run | logs | delete | all) ;;
    *) die "unknown subcommand '$SUBCOMMAND' (expected up, run, logs, delete or all)" ;;
  esac

  require_vars TPU_NAME ZONE PROJECT
  LOC=("--zone=$ZONE" "--project=$PROJECT")
  QR_NAME=${QR_NAME:-$TPU_NAME-qr}
  MAX_RESTARTS=${MAX_RESTARTS:-5}
  POLL_SECONDS=${POLL_SECONDS:-30}
  # shellcheck disable=SC2088  # these ~ are expanded by the workers' shells
  REMOTE_DIR='~/psynth_jax' REMOTE_VENV='~/psynth_venv' REMOTE_LOG="~/psynth_$PSYNTH_COMMAND.log"
  if is_queued; then DRY_STATE=""; else DRY_STATE=READY; fi  # dry run: simulated state

  if is_queued && [[ "$SUBCOMMAND" =~ ^(up|run|all)$ ]]; then tpu_accelerator; fi
  if [[ "$SUBCOMMAND" =~ ^(up|run|all)$ && -n "${CONFIG:-}" ]]; then
    check_config
    preflight
  fi
  if [[ "$SUBCOMMAND" =~ ^(run|all)$ ]]; then
    check_config
    if [[ "$PSYNTH_COMMAND" == train ]]; then
      require_vars RUN_DIR
      [[ "$RUN_DIR" == gs://* ]] || log "warning: RUN_DIR=$RUN_DIR is not gs://...; a re-provisioned TPU cannot resume from it"
    fi
    if [[ "${DELETE:-0}" == 1 ]]; then trap tpu_delete EXIT; fi
  fi

  case "$SUBCOMMAND" in
    up) tpu_up; tpu_install ;;
    run) tpu_run_with_restarts ;;
    logs) tpu_ssh "${LOG_WORKER:-0}" "tail -n 200 -F $REMOTE_LOG" ;;
    delete) tpu_delete ;;
    all) tpu_up; tpu_install; tpu_run_with_restarts ;;
  esac
}

# tpu_accelerator: check ACCELERATOR_TYPE (v5e-N is spelled v5litepod-N by gcloud) and pick the
# TPU VM image for it unless RUNTIME_VERSION is set.
tpu_accelerator() {
  require_vars ACCELERATOR_TYPE
  if [[ "$ACCELERATOR_TYPE" == v5e-* ]]; then ACCELERATOR_TYPE="v5litepod-${ACCELERATOR_TYPE#v5e-}"; fi
  if [[ -z "${RUNTIME_VERSION:-}" ]]; then
    case "$ACCELERATOR_TYPE" in
      v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) die "RUNTIME_VERSION is required for ACCELERATOR_TYPE=$ACCELERATOR_TYPE" ;;
    esac
  fi
}

# tpu_state: the queued resource's state (ACTIVE, ...) or the TPU VM's (READY, ...); empty if absent.
tpu_state() {
  if is_queued; then
    query_cmd gcloud alpha compute tpus queued-resources describe "$QR_NAME" "${LOC[@]}" --format='value(state.state)'
  else
    query_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" --format='value(state)'
  fi
  if is_dry_run; then printf '%s\n' "$DRY_STATE"; fi
}

# tpu_up: make sure the TPU is usable: reuse an ACTIVE queued resource, wait for a pending one,
# create a missing one, replace a failed or suspended one. Without QUEUED=1 the TPU VM must exist.
tpu_up() {
  local state
  state="$(tpu_state)"
  if ! is_queued; then
    [[ "$state" == READY ]] || die "TPU VM $TPU_NAME is ${state:-absent}, expected READY (QUEUED=1 provisions one)"
    return 0
  fi
  case "$state" in
    ACTIVE) log "queued resource $QR_NAME is ACTIVE" ;;
    ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING) log "queued resource $QR_NAME is $state; waiting" ;;
    "") tpu_create ;;
    *) log "queued resource $QR_NAME is $state; replacing it"; tpu_delete; tpu_create ;;
  esac
  tpu_wait_active
}

tpu_create() {
  local flags=("--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then flags+=(--spot); fi
  run_cmd gcloud alpha compute tpus queued-resources create "$QR_NAME" "${flags[@]}" "${LOC[@]}"
  DRY_STATE=ACTIVE
}

tpu_wait_active() {
  local state last=unknown
  while true; do
    state="$(tpu_state)"
    if [[ "$state" != "$last" ]]; then log "queued resource $QR_NAME: ${state:-absent}"; last=$state; fi
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING | "") die "queued resource $QR_NAME is ${state:-absent}, not ACTIVE" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

tpu_delete() {
  if is_queued; then
    run_cmd gcloud alpha compute tpus queued-resources delete "$QR_NAME" --force --quiet "${LOC[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" --quiet "${LOC[@]}"
  fi
  DRY_STATE=""
}

# tpu_ssh WORKER COMMAND: run a shell command on one worker or on all of them at once.
tpu_ssh() {
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--worker=$1" "${LOC[@]}" "--command=$2"
}

# tpu_install: copy this checkout to every worker and install it with jax[tpu] into a venv.
tpu_install() {
  local tarball="${TMPDIR:-/tmp}/psynth_jax-$TPU_NAME.tgz"
  run_cmd tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.egg-info' -C "$PSYNTH_ROOT" .
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:psynth_jax.tgz" --worker=all "${LOC[@]}"
  tpu_ssh all "set -e; rm -rf $REMOTE_DIR $REMOTE_VENV; mkdir -p $REMOTE_DIR; tar -xzf ~/psynth_jax.tgz -C $REMOTE_DIR; cd $REMOTE_DIR; python3 -m pip install --user --quiet --upgrade uv; python3 -m uv venv --python ${PYTHON_VERSION:-3.11} $REMOTE_VENV; python3 -m uv pip install --python $REMOTE_VENV/bin/python -e '.[train]' 'jax[tpu]'"
}

# tpu_launch: run psynth on all workers in the foreground (streaming their output into this
# terminal and a log file on each worker). A leftover run from an earlier launch is stopped first
# by the pid it recorded, so a relaunch after a dropped ssh connection does not fight for the TPU.
tpu_launch() {
  # shellcheck disable=SC2088  # expanded on the workers
  local args pidfile='~/psynth_run.pid'
  psynth_args "$PSYNTH_COMMAND"
  printf -v args ' %q' "${PSYNTH_ARGS[@]}"
  tpu_ssh all "set -o pipefail; cd $REMOTE_DIR; if [ -f $pidfile ] && grep -q psynth /proc/\$(cat $pidfile)/cmdline 2>/dev/null; then kill \$(cat $pidfile); sleep 10; fi; (echo \$BASHPID > $pidfile; exec $REMOTE_VENV/bin/psynth$args) 2>&1 | tee -a $REMOTE_LOG" || return $?
  if is_dry_run && (( ${DRY_RUN_FAILURES:-0} > 0 )); then
    DRY_RUN_FAILURES=$((DRY_RUN_FAILURES - 1))
    if is_queued; then DRY_STATE=SUSPENDED; else DRY_STATE=PREEMPTED; fi
    log "dry run: simulating a preemption"
    return 1
  fi
}

# tpu_run_with_restarts: launch; when it fails, relaunch on a healthy TPU or re-provision a
# preempted one (QUEUED=1), up to MAX_RESTARTS times. Training resumes from its run dir.
tpu_run_with_restarts() {
  local restarts=0 state
  until tpu_launch; do
    # exit 2: psynth refused its input (config, flags, data); relaunching would fail the same way
    (($? != 2)) || die "psynth $PSYNTH_COMMAND refused its input (exit 2, see the log): fix it; not relaunching"
    restarts=$((restarts + 1))
    ((restarts <= MAX_RESTARTS)) || die "psynth $PSYNTH_COMMAND failed; gave up after MAX_RESTARTS=$MAX_RESTARTS restarts"
    state="$(tpu_state)"
    if [[ "$state" == ACTIVE || "$state" == READY ]]; then
      log "psynth $PSYNTH_COMMAND stopped on a healthy TPU ($state); relaunching ($restarts/$MAX_RESTARTS)"
    elif is_queued; then
      log "TPU is ${state:-gone} (preempted?); re-provisioning ($restarts/$MAX_RESTARTS)"
      tpu_up
      tpu_install
    else
      die "TPU VM $TPU_NAME is ${state:-gone}; only QUEUED=1 can re-provision it"
    fi
  done
  log "psynth $PSYNTH_COMMAND finished"
}
