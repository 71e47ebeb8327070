#!/usr/bin/env bash
# Recipe-searched EPD tables for the trained embedded models on one GPU: train digits_ddpm (optional), run the
# Stage-1 recipe search (python -m training.distill.launch --search) for NFE 3/5/7/9 of each model, and benchmark
# every model with its tables (python -m solvers.bench). docs/distill/recipe.md says what the search does.
#
#   OUT=/tmp/out MODELS="digits_ddpm" bash scripts/gpu_recipe_search.sh                 # train the DDPM, its tables
#   OUT=/tmp/out MODELS="digits_edm" SKIP_TRAIN=1 bash scripts/gpu_recipe_search.sh     # the EDM network's tables
#   TINY=1 DEVICE=cpu OUT=/tmp/x MODELS=digits_ddpm bash scripts/gpu_recipe_search.sh   # CPU smoke test of the plumbing
#
# $OUT receives flat files: recipe-<model>.tar.gz (exps/<model>/... and docs/bench/<model>.{json,md,png} under their
# repository paths, without checkpoints: install with  tar -xzf recipe-<model>.tar.gz -C REPO), recipe-logs.tar.gz
# and summary.txt; they are refreshed after every stage, so a stage cut off by TOTAL_S leaves the earlier results.
#
# Variables: OUT (required), MODELS (digits_ddpm digits_edm), NFES (3 5 7 9), PYTHON (python3), DEVICE (auto),
# SKIP_TRAIN (0: train digits_ddpm when it is in MODELS; 1: use the repository's network), TRAIN_BUDGET_S (210),
# KIMG (16: each table's full budget), SEARCH_KIMG (2: each candidate's), BENCH_SAMPLES (2000), TOTAL_S (560), TINY (0).
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUT:?set OUT to the output folder}"
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-digits_ddpm digits_edm}
NFES=${NFES:-3 5 7 9}
DEVICE=${DEVICE:-auto}
SKIP_TRAIN=${SKIP_TRAIN:-0}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-210}
KIMG=${KIMG:-16}
SEARCH_KIMG=${SEARCH_KIMG:-2}
BENCH_SAMPLES=${BENCH_SAMPLES:-2000}
TOTAL_S=${TOTAL_S:-560}
TINY=${TINY:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE=$(mktemp -d /tmp/recipe_stage.XXXXXX)
mkdir -p "$STAGE/logs" "$STAGE/exps" "$STAGE/docs/bench" "$STAGE/configs"
cp -r "$REPO/configs/distill" "$STAGE/configs/"
cd "$STAGE" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DIGITS_EDM_PATH="$STAGE/exps/digits_edm/network.safetensors" DIGITS_DDPM_PATH="$STAGE/exps/digits_ddpm/network.safetensors"
STAGE_TAG=recipe MIN_STAGE_S=10
source "$REPO/scripts/gpu_stages.sh"

publish() {
  local model
  for model in $MODELS; do
    local items=()
    for f in "exps/$model" "docs/bench/$model.json" "docs/bench/$model.md" "docs/bench/$model.png"; do
      [ -e "$f" ] && items+=("$f")
    done
    [ ${#items[@]} -gt 0 ] && tar --exclude=checkpoint.pt --exclude=.run-ids.lock --exclude='*.tmp' \
      -czf "$STAGE/a.tgz" "${items[@]}" && mv -f "$STAGE/a.tgz" "$OUT/recipe-$model.tar.gz"
  done
  tar -czf "$STAGE/l.tgz" logs && mv -f "$STAGE/l.tgz" "$OUT/recipe-logs.tar.gz"
}


if ! $PYTHON -c "import omegaconf" 2>/dev/null; then   # the device machine lacks it: carry .whl/omegaconf-*.whl
  whl=$(ls "$REPO"/.whl/omegaconf-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] && $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_rs "$whl" \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site_rs"
fi
say "repository $REPO, stage $STAGE, models: $MODELS, NFE: $NFES, TINY=$TINY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PYTHON -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

common=(--override "teacher.cache=$STAGE/.cache/teacher" --override "validation.cache=$STAGE/.cache/validation")
[ "$DEVICE" != auto ] && common+=(--override "device=$DEVICE")
if [ "$TINY" = 1 ]; then
  train_extra=(--tiny --steps 20 --batch 16 --log-every 10 --eval-every 20 --eval-repeats 1 --checkpoint-every 20
               --card-samples 20 --sample-steps 4)
  common+=(--override batch=8 --override total_kimg=0.032 --override teacher.rtol=1e-2 --override validation.num=8
           --override validation.reference.steps=16 --override "compare.solvers=[euler,dpmpp3m]")
  bench_extra=(--solvers euler,dpmpp3m --nfe 3,5 --num-samples 16 --ref-steps 16 --batch 16)
else
  train_extra=(--batch 512 --time-budget-s "$TRAIN_BUDGET_S")
  common+=(--override "total_kimg=$KIMG" --override "search.kimg=$SEARCH_KIMG")
  bench_extra=(--solvers ipndm,dpmpp3m,dpmpp2m,unipc,dpm2,heun,euler --nfe "${BENCH_NFE:-3,4,5,6,7,8,9,10,11,14}"
               --num-samples "$BENCH_SAMPLES" --batch "$BENCH_SAMPLES")
fi

for model in $MODELS; do
  mkdir -p "exps/$model"
  if [ "$model" = digits_ddpm ] && [ "$SKIP_TRAIN" != 1 ]; then
    run_stage train-$model $(( TRAIN_BUDGET_S + 120 )) $PYTHON "$REPO/scripts/train_digits_edm.py" --kind ddpm \
      --out "exps/$model" --device "$DEVICE" --no-progress "${train_extra[@]}"
  else   # the repository's network and tables (the search keeps a table that scores better than its own)
    cp -r "$REPO/exps/$model/." "exps/$model/" 2>/dev/null
    STATUS[train-$model]="repository network"
  fi
  publish
  [ -f "exps/$model/network.safetensors" ] || { say "no $model network: its tables are skipped"; continue; }
  for n in $NFES; do
    run_stage search-$model-nfe$n 400 $PYTHON -m training.distill.launch --config "configs/distill/$model-nfe$n.yaml" \
      --search --no-progress "${common[@]}"
    publish
  done
  tables=()
  for n in $NFES; do
    [ -f "exps/$model/epd-nfe$n.pkl" ] && tables+=(--table "epd-nfe$n=exps/$model/epd-nfe$n.pkl")
  done
  kinds=polynomial,logsnr,time_uniform
  [ "$model" = digits_ddpm ] && kinds=$kinds,discrete
  bench_device=()
  [ "$DEVICE" != auto ] && bench_device=(--device "$DEVICE")
  run_stage bench-$model 240 $PYTHON -m solvers.bench --model "$model" "${bench_device[@]}" --schedules "$kinds" \
    "${bench_extra[@]}" "${tables[@]}" --json "docs/bench/$model.json"
  [ -f "docs/bench/$model.json" ] && $PYTHON -c "import json; from solvers.bench import markdown; \
print(markdown(json.load(open('docs/bench/$model.json'))))" > "docs/bench/$model.md"
  publish
done

{
  say "done in $(( $(date +%s) - T0 )) s"
  for name in "${!STATUS[@]}"; do echo "  $name: ${STATUS[$name]}"; done | sort
  for f in exps/*/*/search.json; do
    [ -f "$f" ] && $PYTHON - "$f" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); f = s.get("final") or {}
scores = ", ".join("%s %.4g" % (c["label"], c["val_rmse"]) for c in s["candidates"])
print(f"  {sys.argv[1]}: chose {s['chosen']} ({scores}); final {f.get('val_rmse')}, kept {s.get('kept')}, "
      f"seconds {s.get('seconds')}")
for line in f.get("verdict") or []:
    print("    " + line)
PY
  done
  for model in $MODELS; do [ -f "docs/bench/$model.md" ] && grep -E "^- table|^Reference" "docs/bench/$model.md"; done
} | tee "$OUT/summary.txt"
