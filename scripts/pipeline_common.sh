# shellcheck shell=bash
# Helpers shared by launch.sh (the authors' scripts/pipeline_common.sh, docs/authors-code.md §8.4, for this code base).
# Source it from the repository root:  source scripts/pipeline_common.sh
#
#   latest_run_dir NAME [EXPS]            newest RDPO run folder EXPS/NNNNN-NAME (default EXPS: $EXPS_DIR or exps)
#   latest_table RUN_DIR                  RUN_DIR/table-mean.pkl, else the newest RUN_DIR/export/table-mean-step*.pkl
#   score_all_metrics NAME [PROMPTS]      score_all_metrics_dir samples/NAME PROMPTS NAME
#   score_all_metrics_dir DIR PROMPTS PREFIX [RESULTS]
#       runs every metric (clip hps aesthetic pick imagereward mps) whose weights are present (the manifest,
#       training/rewards/pretrained.py; one "skip" message for each other metric), writes RESULTS/PREFIX_<metric>.json
#       and one summary RESULTS/PREFIX-summary.{json,md} (metric -> mean / std / count). With FID_REF set (an .npz
#       with mu and sigma, or a folder) it adds FID (and KID when FID_KID=1). PROMPTS may be empty: the images'
#       JSON sidecars carry their prompts.
#
# Variables: PYTHON (python), WEIGHTS_DIR (weights), RESULTS_DIR (results), EXPS_DIR (exps), FID_REF, FID_KID.
# Nothing downloads: HF_HOME defaults to $WEIGHTS_DIR/hf_cache and the Hugging Face libraries run offline.

PIPELINE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${PYTHON:=python}"
: "${WEIGHTS_DIR:=weights}"
: "${RESULTS_DIR:=results}"
: "${EXPS_DIR:=exps}"
export HF_HOME="${HF_HOME:-$WEIGHTS_DIR/hf_cache}"
export HUGGINGFACE_HUB_CACHE="${HUGGINGFACE_HUB_CACHE:-$HF_HOME/hub}"
export TRANSFORMERS_CACHE="${TRANSFORMERS_CACHE:-$HF_HOME/hub}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"

PIPELINE_METRICS=(clip hps aesthetic pick imagereward mps)

# The reward head of a metric name (the authors' script names: pick = pickscore).
metric_head() {
  case "$1" in
    pick) echo pickscore ;;
    *) echo "$1" ;;
  esac
}

latest_run_dir() {
  local name=${1:?usage: latest_run_dir NAME [EXPS]} root=${2:-$EXPS_DIR} last
  last=$(ls -d "$root"/[0-9][0-9][0-9][0-9][0-9]-"$name" 2>/dev/null | sort | tail -n 1 || true)
  if [ -z "$last" ]; then
    echo "error: no run folder $root/NNNNN-$name (train it first: python -m training.ppo.launch --config" \
         "training/ppo/cfgs/$name.yaml)" >&2
    return 1
  fi
  echo "$last"
}

latest_table() {
  local run=${1:?usage: latest_table RUN_DIR} last
  if [ -f "$run/table-mean.pkl" ]; then
    echo "$run/table-mean.pkl"
    return 0
  fi
  last=$(ls "$run"/export/table-mean-step*.pkl 2>/dev/null | sort | tail -n 1 || true)
  if [ -z "$last" ]; then
    echo "error: $run has no table-mean.pkl (nor export/table-mean-step*.pkl); export it with:" \
         "python -m training.ppo.export $run" >&2
    return 1
  fi
  echo "$last"
}

# The metrics of PIPELINE_METRICS whose weights are all present, one a line; a "skip" line on stderr for the others.
present_metrics() {
  local heads=() m h present
  for m in "${PIPELINE_METRICS[@]}"; do heads+=("$(metric_head "$m")"); done
  # Run by path (standard library only): no torch import just to look at files.
  present=$("$PYTHON" "$PIPELINE_ROOT/training/rewards/pretrained.py" present --root "$WEIGHTS_DIR" "${heads[@]}")
  for m in "${PIPELINE_METRICS[@]}"; do
    h=$(metric_head "$m")
    if grep -qx -- "$h" <<<"$present"; then echo "$m"; fi
  done
}

# python -m MODULE ARGS..., with the repository on the module path wherever the caller stands.
_py_module() {
  PYTHONPATH="$PIPELINE_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m "$@"
}

_write_summary() {  # RESULTS PREFIX IMAGES PROMPTS "scored" "skipped" "failed"
  "$PYTHON" - "$@" <<'PY'
import json, math, os, sys, tempfile, time
results, prefix, images, prompts, scored, skipped, failed = sys.argv[1:8]
metrics = {}
for name in scored.split():
    path = os.path.join(results, f"{prefix}_{name}.json")
    with open(path) as handle:
        data = json.load(handle)
    if name == "fid":
        metrics[name] = {"fid": data.get("fid"), "kid_mean": data.get("kid_mean"), "kid_std": data.get("kid_std"),
                         "count": data.get("count"), "file": path}
    else:
        stats = data.get("stats", {})
        metrics[name] = {"mean": stats.get("mean"), "std": stats.get("std"), "count": stats.get("count"),
                         "head": data.get("metadata", {}).get("head"), "file": path}
summary = {"name": prefix, "images_dir": images, "prompts_file": prompts or None, "metrics": metrics,
           "skipped": skipped.split(), "failed": failed.split(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

def fmt(value):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.4f}" if isinstance(value, float) else str(value))

lines = [f"# {prefix}: evaluation of {images}", "", "| metric | mean | std | count |", "| --- | --- | --- | --- |"]
for name, m in metrics.items():
    if name == "fid":
        lines.append(f"| fid | {fmt(m['fid'])} | - | {fmt(m['count'])} |")
        if m.get("kid_mean") is not None:
            lines.append(f"| kid | {fmt(m['kid_mean'])} | {fmt(m['kid_std'])} | {fmt(m['count'])} |")
    else:
        lines.append(f"| {name} | {fmt(m['mean'])} | {fmt(m['std'])} | {fmt(m['count'])} |")
if not metrics:
    lines.append("| (none scored) | - | - | - |")
if summary["skipped"]:
    lines += ["", f"Skipped (weights missing): {', '.join(summary['skipped'])}."]
if summary["failed"]:
    lines += ["", f"Failed: {', '.join(summary['failed'])} (see the log)."]

def atomic(path, text):
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)

base = os.path.join(results, f"{prefix}-summary")
atomic(base + ".json", json.dumps(summary, indent=2) + "\n")
atomic(base + ".md", "\n".join(lines) + "\n")
print(f"summary: {base}.json, {base}.md")
PY
}

score_all_metrics_dir() {
  local dir=${1:?usage: score_all_metrics_dir IMG_DIR PROMPTS PREFIX [RESULTS]} prompts=${2:-}
  local prefix=${3:?usage: score_all_metrics_dir IMG_DIR PROMPTS PREFIX [RESULTS]} results=${4:-$RESULTS_DIR}
  if [ ! -d "$dir" ]; then
    echo "error: image folder $dir does not exist" >&2
    return 1
  fi
  mkdir -p "$results"
  local present m out scored="" skipped="" failed=""
  present=$(present_metrics)
  local args=(--images "$dir" --pattern "**/*.png" --cache-dir "$WEIGHTS_DIR")
  if [ -n "$prompts" ]; then args+=(--prompts "$prompts"); fi
  for m in "${PIPELINE_METRICS[@]}"; do
    if ! grep -qx -- "$m" <<<"$present"; then
      skipped+=" $m"
      continue
    fi
    out="$results/${prefix}_${m}.json"
    echo "[score] $m on $dir -> $out"
    if _py_module "training.ppo.scripts.score_$m" "${args[@]}" --output-json "$out" >/dev/null; then
      scored+=" $m"
    else
      echo "warning: metric $m failed on $dir (see above); left out of the summary" >&2
      failed+=" $m"
    fi
  done
  if [ -n "${FID_REF:-}" ]; then
    out="$results/${prefix}_fid.json"
    local fid_args=(--images "$dir" --ref "$FID_REF" --pattern "**/*.png" --cache-dir "$WEIGHTS_DIR")
    if [ "${FID_KID:-0}" = 1 ]; then fid_args+=(--kid); fi
    echo "[score] fid on $dir against $FID_REF -> $out"
    if _py_module training.ppo.scripts.score_fid "${fid_args[@]}" --output-json "$out" >/dev/null; then
      scored+=" fid"
    else
      echo "warning: FID failed on $dir (see above); left out of the summary" >&2
      failed+=" fid"
    fi
  fi
  _write_summary "$results" "$prefix" "$dir" "$prompts" "$scored" "$skipped" "$failed"
}

score_all_metrics() {
  local name=${1:?usage: score_all_metrics NAME [PROMPTS]} prompts=${2:-}
  if [ -z "$prompts" ] && [ -f src/prompts/test.txt ]; then prompts=src/prompts/test.txt; fi
  score_all_metrics_dir "samples/$name" "$prompts" "$name" "$RESULTS_DIR"
}
