#!/usr/bin/env bash
# Scheduler wrapper around `python -m pipelines.retrain`: runs one attempt and turns its exit code
# into what a scheduler should do. Used by the crontab line and the Kubernetes CronJob.
#
#   deploy/retrain.sh DOMAIN [retrain and runner options...]
#
# - It does NOT change directory: relative paths (data, --registry, --runs_dir) are relative to the
#   caller's working directory, and nothing is written into the checkout. Give absolute paths in a
#   scheduler.
# - Interpreter: $PYTHON, else the project's .venv beside this script, else python3 on PATH; the
#   project folder is put on PYTHONPATH so an uninstalled checkout works too.
# - W&B: offline unless an API key is available ($WANDB_API_KEY or a ~/.netrc entry for
#   api.wandb.ai), so a missing secret never crashes a night. Offline runs stay in each run folder's
#   wandb/ (sync them later with `wandb sync`).
#
# exit codes of pipelines.retrain (README "Scheduled retraining", docs/retraining.md):
#   0 promoted | 3 kept champion | 4 nothing new | 5 locked   -> this script exits 0 (the job did its job)
#   1 failed                                                   -> exits 1 (retry / alert)
#   2 bad command line                                         -> exits 2 (do not retry: fix the job)
set -uo pipefail

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  PYTHON="$PROJECT/.venv/bin/python"
  [ -x "$PYTHON" ] || PYTHON=python3
fi
export PYTHONPATH="$PROJECT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${WANDB_API_KEY:-}" ] && ! grep -qs "api.wandb.ai" "${NETRC:-$HOME/.netrc}" && [ "${WANDB_MODE:-}" != "disabled" ]; then
  [ "${WANDB_MODE:-offline}" != "offline" ] && echo "[retrain.sh] no W&B API key: WANDB_MODE=${WANDB_MODE} -> offline" >&2
  export WANDB_MODE=offline
fi

"$PYTHON" -m pipelines.retrain "$@"
code=$?
case "$code" in
  0) outcome="promoted: a new champion is in place" ;;
  3) outcome="kept champion: the challenger was not better or failed a floor (see: python -m pipelines.registry $1 list)" ;;
  4) outcome="nothing new: the data fingerprint equals the champion's" ;;
  5) outcome="locked: another retrain of $1 is running; this one did nothing" ;;
  2) echo "[retrain.sh] $(date -u +%FT%TZ) $1: bad command line (exit 2): fix the job" >&2; exit 2 ;;
  *) echo "[retrain.sh] $(date -u +%FT%TZ) $1: FAILED (exit $code)" >&2; exit 1 ;;
esac
echo "[retrain.sh] $(date -u +%FT%TZ) $1: $outcome (exit $code)"
exit 0
