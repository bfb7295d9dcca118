#!/usr/bin/env bash
# N processes of one JAX run on this machine, its CPU devices split among them: a multi-host
# run in miniature (jax.distributed with gloo collectives), for tests and for trying pod
# settings on a laptop.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_multihost.sh [OPTIONS] N -- COMMAND [ARGS...]

Runs COMMAND as processes 0..N-1 of one JAX run on this machine, e.g.
  launch/local_multihost.sh 2 -- bert-jax pretrain --workdir=runs/two

Each process gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N,
JAX_PROCESS_ID=I (which bert-jax reads), JAX_PLATFORMS=cpu and XLA_FLAGS giving it
DEVICES/N CPU devices. Process 0 writes to this terminal, process I to LOG_DIR/process_I.log.
Ctrl-C and SIGTERM are passed to every process. When a process fails, the others normally
stop by themselves (JAX's heartbeat); any still running GRACE seconds later are killed.
Exits with the first failing process's exit code, or 0.

options:
  --devices D     CPU devices in all, split evenly (default 8)
  --port P        coordinator port (default: a free one)
  --log-dir DIR   where processes 1..N-1 write their output (default: a new temporary dir)
  --grace S       seconds before stragglers of a failed run are killed (default 60)
  --dry-run       print the command of each process and exit
  -h, --help      show this help
EOF
}

die() {
  echo "local_multihost.sh: error: $*" >&2
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

devices=8
port=""
log_dir=""
grace=60
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) devices=${2:-}; shift 2 || die "--devices needs a value" ;;
    --port) port=${2:-}; shift 2 || die "--port needs a value" ;;
    --log-dir) log_dir=${2:-}; shift 2 || die "--log-dir needs a value" ;;
    --grace) grace=${2:-}; shift 2 || die "--grace needs a value" ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 3 && $2 == "--" ]] || die "expected N -- COMMAND [ARGS...] (see --help)"
processes=$1
shift 2
is_count "$processes" || die "N=$processes: expected a positive integer"
is_count "$devices" || die "--devices $devices: expected a positive integer"
is_count "$grace" || die "--grace $grace: expected a positive integer"
((devices % processes == 0)) || die "--devices $devices does not split evenly over $processes processes"
if [[ -z $port ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi
is_count "$port" || die "--port $port: expected a port number"

# Any device-count flag already in XLA_FLAGS (a test's, say) gives way to this split.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$((devices / processes))"

if ((dry_run)); then
  for ((id = 0; id < processes; id++)); do
    printf '%q ' env "JAX_COORDINATOR_ADDRESS=localhost:$port" "JAX_NUM_PROCESSES=$processes" \
      "JAX_PROCESS_ID=$id" "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags" "$@"
    if ((id > 0)); then printf '> %q 2>&1' "${log_dir:-LOG_DIR}/process_$id.log"; fi
    echo
  done
  exit 0
fi

log_dir=${log_dir:-$(mktemp -d -t bert-jax-multihost.XXXXXX)}
mkdir -p "$log_dir"
pids=()
for ((id = 0; id < processes; id++)); do
  if ((id == 0)); then
    JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$processes JAX_PROCESS_ID=$id \
      JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "$@" &
  else
    JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$processes JAX_PROCESS_ID=$id \
      JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "$@" >"$log_dir/process_$id.log" 2>&1 &
  fi
  pids+=($!)
  echo "local_multihost.sh: process $id: pid $! $( ((id == 0)) && echo "(output below)" || echo "(log: $log_dir/process_$id.log)")" >&2
done

# shellcheck disable=SC2317,SC2329  # called by the traps below
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT

# Poll rather than `wait -n`: portable to the bash 3 of macOS.
status=0
deadline=0
running=$processes
while ((running > 0)); do
  for id in "${!pids[@]}"; do
    pid=${pids[$id]}
    [[ $pid == exited ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" || code=$?
    pids[id]=exited
    running=$((running - 1))
    ((code == 0)) && continue
    echo "local_multihost.sh: process $id exited with code $code" >&2
    if ((status == 0)); then
      status=$code
      deadline=$((SECONDS + grace))
    fi
  done
  if ((deadline > 0 && SECONDS >= deadline && running > 0)); then
    for pid in "${pids[@]}"; do [[ $pid == exited ]] || kill -9 "$pid" 2>/dev/null || true; done
  fi
  ((running > 0)) && sleep 1
done
exit "$status"
