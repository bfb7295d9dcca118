#!/usr/bin/env bash
# bert-jax pretrain on a Cloud TPU VM or pod slice: create the TPU, install this checkout on
# every worker, run `bert-jax pretrain` on all workers against a gs:// workdir, and stream
# worker 0's log. --keep-alive re-creates a preempted TPU and runs again; the run resumes
# from the workdir by itself.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --type TYPE --workdir gs://BUCKET/RUN
                        [OPTIONS] [-- BERT_JAX_PRETRAIN_ARGS...]

e.g.
  launch/tpu_vm.sh --name bert-base --zone us-central2-b --type v4-32 --spot --keep-alive \
      --workdir gs://my-bucket/runs/base -- --config=configs/pods/base_v4_32.py

Creates the TPU (reused if it exists), copies this checkout's committed files (git archive
HEAD) to every worker and pip-installs them with JAX's TPU runtime, starts
`bert-jax pretrain --workdir=WORKDIR ARGS` on all workers (one process each; JAX finds the
others by itself) and streams worker 0's log until the run ends. A workdir on gs:// is read
by every worker; put config.data.data_dir there too. Exits with the run's exit code.

required:
  --name NAME        TPU name
  --zone ZONE        e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --type TYPE        accelerator type, e.g. v4-32, v5litepod-64, v5p-128
  --workdir URL      gs://... run directory (checkpoints, metrics, export)

options:
  --project ID       Google Cloud project (default: gcloud's configured one)
  --version V        TPU software version (default by generation: tpu-ubuntu2204-base for
                     v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
                     v2-alpha-tpuv6e for v6e)
  --spot             spot capacity, through a queued resource (much cheaper, preemptible)
  --preemptible      legacy preemptible TPU VM
  --queued           create through a queued resource (waits for capacity)
  --keep-alive       when the TPU is preempted, delete it, create it again, reinstall and
                     restart, until the run finishes
  --delete           delete the TPU when the run has finished
  --dry-run          print every command instead of running it
  -h, --help         show this help
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

name="" zone="" type="" workdir="" project="" version=""
spot=0 preemptible=0 queued=0 keep_alive=0 delete=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:-}; shift 2 || die "--name needs a value" ;;
    --zone) zone=${2:-}; shift 2 || die "--zone needs a value" ;;
    --type) type=${2:-}; shift 2 || die "--type needs a value" ;;
    --workdir) workdir=${2:-}; shift 2 || die "--workdir needs a value" ;;
    --project) project=${2:-}; shift 2 || die "--project needs a value" ;;
    --version) version=${2:-}; shift 2 || die "--version needs a value" ;;
    --spot) spot=1; queued=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --queued) queued=1; shift ;;
    --keep-alive) keep_alive=1; shift ;;
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
[[ $workdir == gs://?* ]] || die "--workdir '$workdir': expected a gs:// URL that every worker can read and write"
((spot && preemptible)) && die "--spot and --preemptible exclude each other: choose one"
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
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive="${TMPDIR:-/tmp}/bert-jax-$name.tar.gz"

# Commands that change something; printed instead under --dry-run.
run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# Sets `state` to the TPU's state (READY, PREEMPTED, ...), empty when it does not exist.
read_state() {
  if ((dry_run)); then
    printf '%q ' "${tpu_vm[@]}" describe "$name" "${where[@]}" --format='value(state)'
    echo
    state=""
    return
  fi
  state=$("${tpu_vm[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true)
}

create_tpu() {
  if ((queued)); then
    local capacity=()
    ((spot)) && capacity=(--spot)
    run "${queued_resources[@]}" create "$name" --node-id="$name" "${where[@]}" \
      --accelerator-type="$type" --runtime-version="$version" "${capacity[@]}"
    wait_until_active
  else
    local capacity=()
    ((preemptible)) && capacity=(--preemptible)
    run "${tpu_vm[@]}" create "$name" "${where[@]}" --accelerator-type="$type" \
      --version="$version" "${capacity[@]}"
  fi
}

wait_until_active() {
  ((dry_run)) && { echo "# wait until the queued resource's state is ACTIVE"; return; }
  local state
  while true; do
    state=$("${queued_resources[@]}" describe "$name" "${where[@]}" --format='value(state.state)')
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $name is $state: see gcloud compute tpus queued-resources describe $name --zone=$zone" ;;
      *) echo "tpu_vm.sh: queued resource $name is $state; waiting for capacity" >&2; sleep 60 ;;
    esac
  done
}

delete_tpu() {
  if ((queued)); then
    run "${queued_resources[@]}" delete "$name" "${where[@]}" --force --quiet
  else
    run "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet
  fi
}

# This checkout's committed files, on every worker, installed with JAX's TPU runtime.
install() {
  if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    echo "tpu_vm.sh: warning: uncommitted changes in $repo are not copied (git archive HEAD)" >&2
  fi
  run git -C "$repo" archive --format=tar.gz --prefix=bert-jax/ -o "$archive" HEAD
  run "${tpu_vm[@]}" scp "$archive" "$name:bert-jax.tar.gz" "${where[@]}" --worker=all
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command="rm -rf bert-jax && tar xzf bert-jax.tar.gz && python3 -m pip install --quiet './bert-jax[tpu]'"
}

# Starts the run on every worker, detached (it outlives this script's ssh session), then
# follows worker 0's log until the run's exit code appears; returns that code.
start_and_follow() {
  local pretrain detached
  pretrain=$(printf '%q ' python3 -m bert_jax.cli pretrain --workdir="$workdir" "$@")
  detached=$(printf '%q' "cd bert-jax && $pretrain; echo \$? > ../bert-jax.exit")
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=all --command="pkill -f 'bert_jax.cli pretrain' || true; rm -f bert-jax.exit; nohup bash -c $detached > bert-jax.log 2>&1 < /dev/null &"
  # shellcheck disable=SC2016  # expanded on worker 0, not here
  run "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker=0 --command='tail -n +1 -F bert-jax.log & follower=$!; while [ ! -f bert-jax.exit ]; do sleep 5; done; sleep 2; kill $follower; exit "$(cat bert-jax.exit)"'
}

while true; do
  read_state
  if [[ -n $state && $state != READY ]]; then
    echo "tpu_vm.sh: TPU $name is $state: deleting it to create it again" >&2
    delete_tpu
    state=""
  fi
  if [[ -z $state ]]; then
    create_tpu
    install
  elif ((!dry_run)); then
    echo "tpu_vm.sh: reusing TPU $name (READY); reinstalling this checkout" >&2
    install
  fi
  code=0
  start_and_follow "$@" || code=$?
  ((dry_run)) && exit 0
  # A finished run exits 0 on a TPU that is still READY; a preempted TPU loses its workers.
  sleep 30
  read_state
  if ((keep_alive)) && [[ $state != READY ]]; then
    echo "tpu_vm.sh: TPU $name was preempted ($state); restarting, the run resumes from $workdir" >&2
    continue
  fi
  ((delete)) && delete_tpu
  exit "$code"
done
