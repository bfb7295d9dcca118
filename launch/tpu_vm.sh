#!/usr/bin/env bash
# bert-jax pretrain on a Cloud TPU VM or pod slice: create the TPU, install this checkout on
# every worker in a virtual environment of its own, prepare the data once, start
# `bert-jax pretrain` detached on all workers against a gs:// workdir, and stream worker 0's
# log. --keep-alive re-creates a preempted TPU and starts again; the run resumes from the
# workdir by itself. The same file, copied to the workers, is what runs there (--on-worker).
# For multi-day runs that must recover without this laptop, see launch/gke/.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true # bash >= 4.4; the laptop may have macOS's 3.2

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --type TYPE --workdir gs://BUCKET/RUN
                        [OPTIONS] [-- BERT_JAX_PRETRAIN_ARGS...]

e.g.
  launch/tpu_vm.sh --name bert-base --zone us-east5-a --type v5p-128 --spot --keep-alive \
      --workdir gs://my-bucket/runs/base -- --config=configs/pods/base.py:v5p-128 \
      --config.data.data_dir=gs://my-bucket/data

Creates the TPU (reused when it is READY), copies this checkout's committed files (git
archive HEAD) to every worker and installs them with uv into ~/bert-jax-venv (Python 3.11,
downloaded by uv when the image has an older one), with the pip extra `tpu` (JAX's TPU
runtime); a worker that already has this commit installed skips the install. Then
`bert-jax prepare-data` runs once, on worker 0, with the run's config (every worker then finds
the data built: put config.data.data_dir on gs://), and `bert-jax pretrain --workdir=WORKDIR
ARGS` starts on all workers (one process each; JAX finds the others by itself), detached
(setsid nohup: it survives this script, the ssh session and the laptop). Each worker logs to
~/bert-jax.log and copies its log to WORKDIR/logs/START_TIME/worker-N.log. A run still going
from an earlier start is stopped first (SIGTERM through its pid file, so it saves a
checkpoint; then whatever still holds /dev/accel* or /dev/vfio), and a stale
/tmp/libtpu_lockfile is removed. This script follows worker 0's log and exits with the run's
exit code; Ctrl-C stops the following, not the run (--attach follows it again).

required:
  --name NAME           TPU name
  --zone ZONE           e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --type TYPE           accelerator type, e.g. v4-32, v5litepod-64, v5p-128
  --workdir URL         gs://... run directory (checkpoints, metrics, logs, export); or an
                        absolute path on a file system that every worker mounts at that path
                        (Filestore/NFS, gcsfuse)

options:
  --project ID          Google Cloud project (default: gcloud's configured one)
  --version V           TPU software version (default by generation: tpu-ubuntu2204-base for
                        v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                        v2-alpha-tpuv6e for v6e)
  --spot                spot capacity, through a queued resource (much cheaper, preemptible)
  --preemptible         legacy preemptible TPU VM
  --queued              create through a queued resource (waits for capacity)
  --keep-alive          when the TPU is preempted, delete it, create it again, reinstall and
                        start again (the run resumes), until the run has finished; when the
                        ssh session to worker 0 drops while the TPU is READY, follow again
  --attach              do not (re)start: follow the run already going on the TPU
  --delete              delete the TPU when the run has finished
  --prepare-data WHERE  where `bert-jax prepare-data` runs before the first start: worker0
                        (default), local (here, with this checkout's bert-jax; needs access to
                        the data_dir), or none (skip: data prepared ahead, or let the run's
                        process 0 build it while the others wait)
  --extra EXTRA         pip extra installed with bert-jax (default tpu; none: no extra)
  --python VERSION      Python of the workers' environment (default 3.11; at least 3.11), or
                        the path of an interpreter on the workers
  --system-site-packages
                        the environment also sees the image's own packages (an image with
                        JAX preinstalled)
  --no-deps             install bert-jax alone, its dependencies from the image (with
                        --system-site-packages)
  --poll-interval S     seconds between looks at a queued resource, and before deciding that
                        a failed run was a preemption (default 30)
  --dry-run             print every command instead of running it
  -h, --help            show this help
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

# ==== On a worker (this file, copied to ~/bert-jax-tpu_vm.sh) ===========================

src="$HOME/bert-jax"
venv="$HOME/bert-jax-venv"
marker="$venv/.bert-jax-installed"
pid_file="$HOME/bert-jax.pid"
log_file="$HOME/bert-jax.log"
exit_file="$HOME/bert-jax.exit"
# The TPU chips' device files and libtpu's lockfile. (The simulated pod of the tests gives
# each worker its own, as separate VMs have; nothing else sets these.)
devices=${BERT_JAX_TPU_DEVICES:-/dev/accel* /dev/vfio/*}
lockfile=${BERT_JAX_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
stop_grace=120     # seconds a stopped run has to save its checkpoint
upload_every=60    # seconds between copies of the log to the workdir

# This worker's number: JAX_PROCESS_ID where the environment sets it, else the TPU metadata's.
worker_index() {
  if [[ -n ${JAX_PROCESS_ID:-} ]]; then
    echo "$JAX_PROCESS_ID"
  elif ! curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number; then
    hostname
  fi
}

# A live process (not a zombie, which an init that does not reap may leave behind).
alive() {
  local stat
  [[ -n $1 ]] && stat=$(cat "/proc/$1/stat" 2>/dev/null) && [[ ${stat##*) } != Z* ]]
}

# PIDs of processes with one of the paths matching the find(1) patterns open.
holders() {
  local args=() pattern
  for pattern in "$@"; do args+=(-o -lname "$pattern"); done
  find /proc/[0-9]*/fd -mindepth 1 -maxdepth 1 \( -false "${args[@]}" \) 2>/dev/null |
    cut -d/ -f3 | sort -u | grep -vx -e "$$" || true
}

# Stops a run this script started (its pid file), then anything still holding the TPU.
stop_run() {
  local worker=$1 pid waited patterns
  pid=$(cat "$pid_file" 2>/dev/null || true)
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" &&
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -e '--on-worker run '; then
    echo "tpu_vm.sh: worker $worker: stopping the run still going (pid $pid): SIGTERM, it saves a checkpoint"
    kill -TERM "$pid" 2>/dev/null || true
    for ((waited = 0; waited < stop_grace; waited++)); do
      alive "$pid" || break
      sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true # its process group: it was started by setsid
  fi
  rm -f "$pid_file"
  read -ra patterns <<<"$devices"
  for pid in $(holders "${patterns[@]}"); do
    echo "tpu_vm.sh: worker $worker: killing pid $pid, which holds the TPU: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    kill -KILL "$pid" 2>/dev/null || sudo -n kill -KILL "$pid" 2>/dev/null || true
  done
  # libtpu refuses to start while the lockfile of a dead process remains.
  if [[ -e $lockfile && -z $(holders "$lockfile") ]]; then
    rm -f "$lockfile" 2>/dev/null || sudo -n rm -f "$lockfile" || true
  fi
}

find_uv() {
  if command -v uv; then return 0; fi
  if [[ ! -x $HOME/.local/bin/uv ]]; then
    echo "tpu_vm.sh: installing uv into ~/.local/bin" >&2
    { curl -LsSf https://astral.sh/uv/install.sh |
      env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh; } >&2 ||
      python3 -m pip install --quiet --user uv >&2
  fi
  echo "$HOME/.local/bin/uv"
}

# setup IDENTITY EXTRA PYTHON SYSTEM_SITE NO_DEPS: stops an old run; installs
# ~/bert-jax.tar.gz into the environment unless the same IDENTITY (commit, options) is there.
worker_setup() {
  local identity="$1 extra=$2 python=$3 system-site-packages=$4 no-deps=$5"
  local worker uv venv_options=() install_options=() spec=$src
  worker=$(worker_index)
  stop_run "$worker"
  if [[ -f $marker && $(cat "$marker") == "$identity" ]]; then
    echo "tpu_vm.sh: worker $worker: bert-jax $1 already installed in $venv: skipping the install"
    return 0
  fi
  echo "tpu_vm.sh: worker $worker: installing bert-jax $1 into $venv"
  uv=$(find_uv)
  rm -rf "$src" "$venv"
  tar -xzf "$HOME/bert-jax.tar.gz" -C "$HOME"
  [[ $4 == 1 ]] && venv_options+=(--system-site-packages)
  [[ $5 == 1 ]] && install_options+=(--no-deps)
  [[ $2 != none ]] && spec="${src}[$2]"
  "$uv" venv --quiet --python "$3" ${venv_options[@]+"${venv_options[@]}"} "$venv"
  "$uv" pip install --quiet --python "$venv/bin/python" ${install_options[@]+"${install_options[@]}"} "$spec"
  echo "$identity" >"$marker"
}

worker_prepare() {
  cd "$src"
  echo "tpu_vm.sh: worker $(worker_index): bert-jax prepare-data $*"
  # Data preparation needs no accelerator: keep JAX off the TPU (and its lockfile).
  JAX_PLATFORMS=cpu "$venv/bin/bert-jax" prepare-data "$@" 2>&1 | tee "$HOME/bert-jax-prepare.log"
}

# start STAMP WORKDIR ARGS...: the run, detached, from a copy of this script (an upload
# may overwrite the original while the run reads it).
worker_start() {
  local worker pid i
  worker=$(worker_index)
  pid=$(cat "$pid_file" 2>/dev/null || true)
  if [[ -n $pid ]] && alive "$pid"; then
    echo "tpu_vm.sh: worker $worker: a run is going (pid $pid); stop it first" >&2
    return 1
  fi
  rm -f "$exit_file" "$pid_file"
  [[ -f $log_file ]] && mv -f "$log_file" "$log_file.previous"
  cp "${BASH_SOURCE[0]}" "$HOME/bert-jax-run.sh.tmp"
  mv -f "$HOME/bert-jax-run.sh.tmp" "$HOME/bert-jax-run.sh"
  setsid nohup bash "$HOME/bert-jax-run.sh" --on-worker run "$@" >"$log_file" 2>&1 </dev/null &
  for ((i = 0; i < 100; i++)); do
    [[ -s $pid_file ]] && break
    sleep 0.1
  done
  echo "tpu_vm.sh: worker $worker: run started (pid $(cat "$pid_file" 2>/dev/null || echo '?')), log ~/bert-jax.log"
}

upload_log() {
  case $2 in
    gs://*)
      if command -v gcloud >/dev/null; then
        timeout 120 gcloud storage cp --quiet "$1" "$2"
      else
        timeout 120 gsutil -q cp "$1" "$2"
      fi
      ;;
    *) mkdir -p "$(dirname "$2")" && cp "$1" "$2.tmp" && mv -f "$2.tmp" "$2" ;;
  esac >/dev/null 2>&1
}

# run STAMP WORKDIR ARGS...: the detached process: pretrain, its log copied to the workdir,
# its exit code in ~/bert-jax.exit. SIGTERM goes on to bert-jax (which saves and exits 0).
worker_run() {
  local stamp=$1 workdir=$2 worker remote_log child uploader code=0
  shift 2
  echo "$$" >"$pid_file"
  worker=$(worker_index)
  remote_log="${workdir%/}/logs/$stamp/worker-$worker.log"
  echo "tpu_vm.sh: worker $worker: $(date -u '+%F %T') bert-jax pretrain --workdir=$workdir $* (log copied to $remote_log)"
  cd "$src"
  "$venv/bin/bert-jax" pretrain --workdir="$workdir" "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM
  (
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    while true; do
      sleep "$upload_every" &
      sleeper=$!
      wait "$sleeper"
      upload_log "$log_file" "$remote_log" || true
    done
  ) &
  uploader=$!
  wait "$child" || code=$?
  while kill -0 "$child" 2>/dev/null; do # a signal ended `wait`, not bert-jax
    code=0
    wait "$child" || code=$?
  done
  kill "$uploader" 2>/dev/null || true
  echo "tpu_vm.sh: worker $worker: $(date -u '+%F %T') bert-jax pretrain exited with code $code"
  upload_log "$log_file" "$remote_log" || echo "tpu_vm.sh: worker $worker: could not copy the log to $remote_log"
  # On SIGTERM (a preemption notice) bert-jax saves and exits 0; process 0 says so.
  local result=$code
  if ((code == 0)) && grep -q '(preempted: checkpoint saved' "$log_file"; then result=preempted; fi
  echo "$result" >"$exit_file.tmp"
  mv -f "$exit_file.tmp" "$exit_file"
  rm -f "$pid_file"
  exit "$code"
}

# follow LINES: worker 0's log until the run has ended.
worker_follow() {
  local i follower
  for ((i = 0; i < 100; i++)); do
    [[ -f $log_file ]] && break
    sleep 0.1
  done
  tail -n "$1" -F "$log_file" 2>/dev/null &
  follower=$!
  while [[ ! -f $exit_file ]]; do
    if ! alive "$(cat "$pid_file" 2>/dev/null || true)"; then
      sleep 2 # it may be writing its exit code
      [[ -f $exit_file ]] || echo "tpu_vm.sh: worker $(worker_index): the run has gone without an exit code (killed?)" >&2
      break
    fi
    sleep 1
  done
  sleep 1 # the last lines
  kill "$follower" 2>/dev/null || true
}

# status: `exit CODE` of the last run, `running`, or `none`.
worker_status() {
  if [[ -f $exit_file ]]; then
    echo "exit $(cat "$exit_file")"
  elif alive "$(cat "$pid_file" 2>/dev/null || true)"; then
    echo running
  else
    echo none
  fi
}

if [[ ${1:-} == --on-worker ]]; then
  [[ $# -ge 2 ]] || die "--on-worker needs an action"
  action=$2
  shift 2
  case $action in
    setup) worker_setup "$@" ;;
    prepare) worker_prepare "$@" ;;
    start) worker_start "$@" ;;
    run) worker_run "$@" ;;
    follow) worker_follow "$@" ;;
    status) worker_status ;;
    *) die "--on-worker $action: unknown action" ;;
  esac
  exit 0
fi

# ==== On the laptop ======================================================================

name="" zone="" type="" workdir="" project="" version="" extra=tpu python=3.11
prepare_where=worker0 poll=30 system_site=0 no_deps=0
spot=0 preemptible=0 queued=0 keep_alive=0 attach=0 delete=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:-}; shift 2 || die "--name needs a value" ;;
    --zone) zone=${2:-}; shift 2 || die "--zone needs a value" ;;
    --type) type=${2:-}; shift 2 || die "--type needs a value" ;;
    --workdir) workdir=${2:-}; shift 2 || die "--workdir needs a value" ;;
    --project) project=${2:-}; shift 2 || die "--project needs a value" ;;
    --version) version=${2:-}; shift 2 || die "--version needs a value" ;;
    --extra) extra=${2:-}; shift 2 || die "--extra needs a value" ;;
    --python) python=${2:-}; shift 2 || die "--python needs a value" ;;
    --prepare-data) prepare_where=${2:-}; shift 2 || die "--prepare-data needs a value" ;;
    --poll-interval) poll=${2:-}; shift 2 || die "--poll-interval needs a value" ;;
    --system-site-packages) system_site=1; shift ;;
    --no-deps) no_deps=1; shift ;;
    --spot) spot=1; queued=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --queued) queued=1; shift ;;
    --keep-alive) keep_alive=1; shift ;;
    --attach) attach=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n $name ]] || die "--name is required (see --help)"
[[ -n $zone ]] || die "--zone is required (see --help)"
[[ -n $type ]] || die "--type is required (see --help)"
[[ $workdir == gs://?* || $workdir == /?* ]] ||
  die "--workdir '$workdir': expected a gs:// URL that every worker can read and write (or an absolute path every worker mounts)"
((spot && preemptible)) && die "--spot and --preemptible exclude each other: choose one"
[[ $extra =~ ^[A-Za-z0-9_,-]+$ ]] || die "--extra '$extra': expected a pip extra such as tpu, or none"
[[ $python =~ ^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$ || $python == /?* ]] ||
  die "--python '$python': expected 3.11 or newer (bert-jax needs Python >= 3.11), or an interpreter's path"
case $prepare_where in worker0 | local | none) ;; *) die "--prepare-data '$prepare_where': expected worker0, local or none" ;; esac
[[ $poll =~ ^[1-9][0-9]*$ ]] || die "--poll-interval '$poll': expected a positive number of seconds"
for arg in "$@"; do
  [[ $arg == --workdir* ]] && die "give --workdir to tpu_vm.sh (before --), not to bert-jax"
done
if [[ -z $version ]]; then
  case "$type" in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "--type $type: expected v4-N, v5litepod-N, v5p-N or v6e-N (or give --version)" ;;
  esac
fi

where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)
queued_resources=(gcloud compute tpus queued-resources)
self="${BASH_SOURCE[0]}"
repo=$(cd "$(dirname "$self")/.." && pwd)
commit=$(git -C "$repo" rev-parse HEAD 2>/dev/null) || die "$repo is not a git checkout: the workers get git archive HEAD"
stage=$(mktemp -d "${TMPDIR:-/tmp}/bert-jax-tpu.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# prepare-data takes the run's config and overrides, not its multi-process options.
prepare_args=()
skip_value=0
for arg in "$@"; do
  if ((skip_value)); then skip_value=0; continue; fi
  case $arg in
    --coordinator[-_]address=* | --num[-_]processes=* | --process[-_]id=* | --heartbeat-timeout=*) ;;
    --coordinator[-_]address | --num[-_]processes | --process[-_]id | --heartbeat-timeout) skip_value=1 ;;
    *) prepare_args+=("$arg") ;;
  esac
done

say() { echo "tpu_vm.sh: $*" >&2; }

# Commands that change something; printed instead under --dry-run.
run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# on_workers WORKER ACTION ARGS...: this script's ACTION on worker WORKER (a number or all).
on_workers() {
  local worker=$1
  shift
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker="$worker" \
    --command="$(printf '%q ' bash bert-jax-tpu_vm.sh --on-worker "$@")"
}

# A step that is safe to repeat, tried 3 times (ssh keys may still be propagating to new VMs).
retrying() {
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    ((attempt < 3)) && say "'$*' failed; trying again in $poll s" && sleep "$poll"
  done
  return 1
}

# Sets `state` to the TPU's state (READY, PREEMPTED, ...), empty when it does not exist.
read_state() {
  if ((dry_run)); then
    run "${tpu_vm[@]}" describe "$name" "${where[@]}" --format='value(state)'
    state=""
    return 0
  fi
  state=$("${tpu_vm[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true)
}

read_queue() {
  ((dry_run)) && return
  "${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)' 2>/dev/null || true
}

wait_until_active() {
  ((dry_run)) && { echo "# wait until the queued resource's state is ACTIVE"; return 0; }
  local queue
  while true; do
    queue=$(read_queue)
    case "$queue" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | "") die "queued resource $name is ${queue:-gone}: see gcloud compute tpus queued-resources describe $name --zone=$zone" ;;
      *) say "queued resource $name is $queue; waiting for capacity"; sleep "$poll" ;;
    esac
  done
}

# A READY TPU: the existing one, or a new one (a preempted or broken one is deleted first).
ensure_tpu() {
  read_state
  [[ $state == READY ]] && { say "TPU $name is READY: using it"; return 0; }
  if ((queued)); then
    local queue
    queue=$(read_queue)
    case $queue in
      "") ;;
      ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING)
        say "queued resource $name is $queue already"
        wait_until_active
        return 0
        ;;
      *)
        say "queued resource $name is $queue (TPU ${state:-gone}): deleting it to queue again"
        run "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
        ;;
    esac
    local capacity=()
    ((spot)) && capacity=(--spot)
    run "${queued_resources[@]}" create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$type" --runtime-version="$version" ${capacity[@]+"${capacity[@]}"}
    wait_until_active
  else
    if [[ -n $state ]]; then
      say "TPU $name is $state: deleting it to create it again"
      run "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
    fi
    local capacity=()
    ((preemptible)) && capacity=(--preemptible)
    run "${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type="$type" \
      --version="$version" ${capacity[@]+"${capacity[@]}"}
  fi
}

delete_tpu() {
  if ((queued)); then
    run "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    run "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

# This checkout's committed files and this script on every worker, installed (or found
# installed), any earlier run stopped.
install() {
  if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    say "warning: uncommitted changes in $repo are not copied (git archive HEAD = ${commit:0:12})"
  fi
  run git -C "$repo" archive --format=tar.gz --prefix=bert-jax/ -o "$stage/bert-jax.tar.gz" "$commit" || return
  run cp "$self" "$stage/bert-jax-tpu_vm.sh" || return
  retrying run "${tpu_vm[@]}" scp "$stage/bert-jax.tar.gz" "$stage/bert-jax-tpu_vm.sh" "$name:" \
    "${where[@]}" --worker=all || return
  retrying on_workers all setup "$commit" "$extra" "$python" "$system_site" "$no_deps"
}

prepare_data() {
  case $prepare_where in
    none) return 0 ;;
    local) (cd "$repo" && run bert-jax prepare-data ${prepare_args[@]+"${prepare_args[@]}"}) ;;
    worker0) on_workers 0 prepare ${prepare_args[@]+"${prepare_args[@]}"} ;;
  esac
}

# Sets `outcome` to the run's exit code, `preempted` (the TPU is not READY) or `lost` (the
# run is going, this script cannot follow it).
follow_run() {
  local lines=+1 status
  while true; do
    say "following worker 0's log (Ctrl-C stops following, not the run)"
    on_workers 0 follow "$lines" || true
    lines=20
    if ((dry_run)); then
      printf '%q ' "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=0 \
        --command="bash bert-jax-tpu_vm.sh --on-worker status"
      echo
      outcome=0
      return 0
    fi
    read_state
    if [[ $state != READY ]]; then
      outcome=preempted
      return 0
    fi
    status=$("${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=0 \
      --command="bash bert-jax-tpu_vm.sh --on-worker status" 2>/dev/null | tail -n 1 || true)
    case $status in
      "exit preempted") say "the run stopped for a preemption notice (SIGTERM), checkpoint saved"; outcome=preempted; return 0 ;;
      "exit "*) outcome=${status#exit }; return 0 ;;
      none) say "the run on worker 0 ended without an exit code"; outcome=1; return 0 ;;
    esac
    if ((!keep_alive)); then
      say "lost the ssh session to worker 0 while the TPU is READY; the run goes on there (follow it with --attach)"
      outcome=lost
      return 0
    fi
    say "lost the ssh session to worker 0 while the TPU is READY; following again in $poll s"
    sleep "$poll"
  done
}

if ((attach)); then
  read_state
  [[ $state == READY || $dry_run == 1 ]] || die "--attach: TPU $name is ${state:-absent}, no run to follow"
fi
started=0 prepared=0
while true; do
  if ((attach && !started)); then
    started=1
  else
    ensure_tpu
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    if install && { ((prepared)) || prepare_data; } && on_workers all start "$stamp" "$workdir" "$@"; then
      prepared=1 started=1
    else
      code=$?
      read_state
      if ((keep_alive)) && [[ $state != READY ]]; then
        say "TPU $name became ${state:-absent} while starting; again"
        continue
      fi
      say "starting the run failed (exit code $code)"
      exit "$code"
    fi
  fi
  follow_run
  ((dry_run)) && exit 0
  if [[ $outcome =~ ^[1-9][0-9]*$ ]] && ((keep_alive)); then
    # A preempted TPU may still look READY for a moment after its processes died.
    sleep "$poll"
    read_state
    [[ $state == READY ]] || outcome=preempted
  fi
  case $outcome in
    preempted)
      if ((keep_alive)); then
        say "TPU $name was preempted (TPU ${state:-gone}): starting again, on a new TPU if need be; the run resumes from $workdir"
        continue
      fi
      say "the run was preempted (TPU ${state:-gone}): run this again (with --keep-alive to keep doing so); the run resumes from $workdir"
      exit 1
      ;;
    lost) exit 255 ;;
  esac
  say "the run exited with code $outcome"
  ((delete)) && delete_tpu
  exit "$outcome"
done
