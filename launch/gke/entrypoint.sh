#!/usr/bin/env bash
# The container's command in launch/gke/jobset-v5p-128.yaml: `bert-jax pretrain ARGS` with
# two fixes for running under Kubernetes:
# - SIGTERM (a node's preemption or maintenance notice, `kubectl delete`) is passed on to
#   bert-jax, which saves a checkpoint at a step every process reaches and exits 0. Bash as a
#   container's PID 1 would drop it: the kernel delivers no default-action signal to PID 1.
# - A run stopped that way before its last step exits 75 (EX_TEMPFAIL), not 0: a pod that
#   exits 0 counts as done, and the JobSet would never start the rest of the run. Only
#   process 0 prints the summary that says so; its pod failing fails the Job, and the
#   JobSet's failurePolicy starts the whole slice again, which resumes from the checkpoint.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/gke/entrypoint.sh [--dry-run] BERT_JAX_PRETRAIN_ARGS...

Runs `bert-jax pretrain ARGS` (a GKE JobSet's container command; see
launch/gke/jobset-v5p-128.yaml), passes SIGTERM on to it, and exits 75 instead of 0 when
the run stopped for SIGTERM before its last step, so that the JobSet restarts it.
--dry-run prints the command instead of running it; any other argument goes to bert-jax,
which refuses unknown ones (exit code 2).
USAGE
}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
  --dry-run) shift; printf '%q ' bert-jax pretrain "$@"; echo; exit 0 ;;
esac

log=$(mktemp -t bert-jax.XXXXXX)
# The run writes its log itself (complete when it exits, for the grep below); tail shows it
# as it comes and ends after the run's last line.
bert-jax pretrain "$@" > "$log" 2>&1 &
pid=$!
tail -n +1 -f --pid="$pid" "$log" &
follower=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
code=0
wait "$pid" || code=$?
while kill -0 "$pid" 2>/dev/null; do # a signal ended `wait`, not bert-jax
  code=0
  wait "$pid" || code=$?
done
wait "$follower" || true
if ((code == 0)) && grep -q '(preempted: checkpoint saved' "$log"; then
  echo "entrypoint.sh: stopped by SIGTERM before the last step (checkpoint saved): exit 75 so that the JobSet starts the run again"
  exit 75
fi
exit "$code"
