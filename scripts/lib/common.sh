# shellcheck shell=bash
# Shared helpers for scripts/testenv, scripts/test and .ci/run. Sourced, never executed.

# Repo root from this file's location, so the scripts work from any working directory.
BERTH_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# Progress goes to stderr so that `scripts/testenv env` can print only env.sh on stdout.
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { log "WARNING: $*"; }
die() { log "ERROR: $*"; exit 1; }

# Phase timing: CI logs must show where the minutes go (apt on a fresh machine, the first
# cargo build, the suite itself). EPOCHREALTIME (bash 5) avoids forking `date` for sub-seconds.
_phase_name=""
_phase_start=""
phase_begin() {
  _phase_name="$1"
  _phase_start="$EPOCHREALTIME"
  log "==> $_phase_name"
}
phase_end() {
  local status="${1:-0}"
  local secs
  secs="$(elapsed_since "$_phase_start")"
  if [[ "$status" == 0 ]]; then
    log "<== $_phase_name: ok in ${secs}s"
  else
    log "<== $_phase_name: FAILED (status $status) after ${secs}s"
  fi
}
elapsed_since() {
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}
