#!/usr/bin/env bash
# Scheduler wrapper around `python -m pipelines.retrain`: runs one attempt and turns its exit code
# into what a scheduler should do. Used by the crontab line and the Kubernetes CronJob.
#
#   deploy/retrain.sh DOMAIN [retrain and runner options...]
#
# exit codes of pipelines.retrain (see README "Scheduled retraining"):
#   0 promoted | 3 kept champion | 4 nothing new | 5 locked   -> this script exits 0 (the job did its job)
#   1 failed                                                   -> exits 1 (retry / alert)
#   2 bad command line                                         -> exits 2 (do not retry: fix the job)
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python

"$PYTHON" -m pipelines.retrain "$@"
code=$?
case "$code" in
  0) outcome="promoted: a new champion is in place" ;;
  3) outcome="kept champion: the challenger was not better (see: python -m pipelines.registry $1 list)" ;;
  4) outcome="nothing new: the data fingerprint equals the champion's" ;;
  5) outcome="locked: another retrain of $1 is running; this one did nothing" ;;
  2) echo "[retrain.sh] $(date -u +%FT%TZ) $1: bad command line (exit 2): fix the job" >&2; exit 2 ;;
  *) echo "[retrain.sh] $(date -u +%FT%TZ) $1: FAILED (exit $code)" >&2; exit 1 ;;
esac
echo "[retrain.sh] $(date -u +%FT%TZ) $1: $outcome (exit $code)"
exit 0
