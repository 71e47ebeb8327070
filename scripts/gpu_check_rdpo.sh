#!/usr/bin/env bash
# GPU check of RDPO: a few PPO steps under torchrun on a random-weight SD1.5 (full architecture, fp16), with the
# weight-free stand-in reward head `image_contrast`. Usage: bash scripts/gpu_check_rdpo.sh OUT_DIR [NPROC] [STEPS]
set -euo pipefail
out=${1:?output folder}; nproc=${2:-2}; steps=${3:-6}
mkdir -p "$out"
models=${MODELS_DIR:-/tmp/epd-models}; size=${SIZE:-full}; device=${DEVICE:-cuda}; python=${PYTHON:-python3}
dtype=float16; extra=()
if [ "$device" = cpu ]; then dtype=float32; extra+=(--override run.device=cpu); fi
if [ "$size" = tiny ]; then extra+=(--override model.resolution=32); fi
$python -m backends.testing.random_init --model sd15 --size "$size" --out "$models/sd15" --dtype "$dtype" --device "$device"
$python - "$out/sd15-uniform-start.pkl" <<'PY'
import sys
from solvers.schedules import discrete_sigmas
from solvers.table import save_table, uniform_table
# The authors' uniform start (r = 0.335, 0.665) on the SD1.5 ++ grid (N = 11, 20 sequential evaluations).
save_table(uniform_table(discrete_sigmas(11, variant="official").numpy(), positions=(0.335, 0.665), backend="ldm",
                         backend_config={}, guidance_rate=7.5), sys.argv[1])
PY
$python -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m training.ppo.launch --config training/ppo/cfgs/sd15.yaml --no-progress \
  --override run.output_root="$out/runs" --override data.predictor_snapshot="$out/sd15-uniform-start.pkl" \
  --override data.prompt_csv=src/prompts/eval.txt --override model.backend_options.model_path="$models/sd15" \
  --override reward.weights.hps=0 --override reward.weights.image_contrast=1 --override ppo.steps="$steps" \
  --override eval.seeds=0-3 --override logging.save_interval="$steps" --override model.backend_options.dtype="$dtype" \
  "${extra[@]}"
run=$(ls -d "$out"/runs/*-sd15 | tail -1)
cp "$run/log.jsonl" "$out/rdpo-log.jsonl"; cp "$run/eval.jsonl" "$out/rdpo-eval.jsonl"
$python - "$run" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl")]
later = recs[1:] or recs
print(json.dumps({"steps": len(recs), "seconds_per_step_after_first": sum(r["seconds"] for r in later) / len(later),
                  "first_step_seconds": recs[0]["seconds"], "gpu_peak_gib_max": max(r.get("gpu_peak_gib", 0) for r in recs),
                  "reward_mean": [round(r["reward_mean"], 4) for r in recs]}, indent=1))
PY
