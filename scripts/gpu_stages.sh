# shellcheck shell=bash
# Stage runner shared by the one-GPU pipelines (scripts/gpu_digits_edm.sh, scripts/gpu_recipe_search.sh).
# Source it after setting TOTAL_S (no stage runs past that many seconds from now) and STAGE_TAG (the log prefix);
# MIN_STAGE_S (15): a stage left fewer seconds than this is skipped. Stage logs go to logs/NAME.log; STATUS[NAME]
# records how each stage ended.
T0=$(date +%s)
declare -A STATUS
say() { echo "[$STAGE_TAG +$(( $(date +%s) - T0 ))s] $*"; }
limit() { if command -v timeout >/dev/null; then timeout "$@"; else shift; "$@"; fi; }

run_stage() {   # run_stage NAME TIMEOUT_S CMD...  (the timeout is cut to what TOTAL_S leaves)
  local name=$1 secs=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - T0) - 5 ))
  [ "$left" -lt "$secs" ] && secs=$left
  if [ "$secs" -lt "${MIN_STAGE_S:-15}" ]; then
    STATUS[$name]="skipped (no time left)"; say "stage $name skipped: no time left"; return 1
  fi
  say "stage $name (at most $secs s): $*"
  local t=$(date +%s)
  limit "$secs" "$@" > >(tee "logs/$name.log") 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc$([ $rc = 124 ] && echo ' (timed out)'), $(( $(date +%s) - t )) s"
  say "stage $name finished: ${STATUS[$name]}"
  return $rc
}
