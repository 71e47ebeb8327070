#!/usr/bin/env bash
# The digits_edm pipeline in one go on one GPU (about 8 minutes): train the network (scripts/train_digits_edm.py),
# distil the EPD tables NFE 3/5/7/9 (scripts/distill_digits_edm.py), run the benchmark (python -m solvers.bench).
#
#   OUT=/tmp/out bash scripts/gpu_digits_edm.sh                                  # the real run (GPU)
#   TINY=1 TRAIN_BUDGET_S=20 DEVICE=cpu OUT=/tmp/x bash scripts/gpu_digits_edm.sh  # CPU smoke test of the plumbing
#
# $OUT receives at most 7 flat files (the device tool brings back few files, none deep):
#   digits_edm-artifacts.tar.gz   exps/digits_edm/... and docs/bench/digits_edm.{json,md,png} under their
#                                 repository paths: install with  tar -xzf digits_edm-artifacts.tar.gz -C REPO
#   digits_edm-logs.tar.gz        logs/{train,distill,bench}.log
#   summary.txt, MODEL_CARD.md, samples.png, digits_edm.md, digits_edm.png   (copies, for a quick look)
# They are refreshed after every stage, so a later stage that fails or is cut off leaves the earlier results.
#
# Variables: OUT (required), PYTHON (python3), DEVICE (auto), TRAIN_BUDGET_S (240), TRAIN_STEPS (40000),
# TRAIN_BATCH (512), DISTILL_BUDGET_S (120), DISTILL_BATCH (128), BENCH_SAMPLES (2000), BENCH_TIMEOUT_S (200),
# TOTAL_S (560: no stage runs past this many seconds from the start), STAGE (a fresh temporary folder where the
# stages run, with the repository layout), TINY (0).
# omegaconf (the distillation configs) is installed from the repository's .whl/ folder when python lacks it: carry
# .whl to the device machine.
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${OUT:?set OUT to the output folder}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-auto}
TINY=${TINY:-0}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-240}
TRAIN_STEPS=${TRAIN_STEPS:-40000}
TRAIN_BATCH=${TRAIN_BATCH:-512}
DISTILL_BUDGET_S=${DISTILL_BUDGET_S:-120}
DISTILL_BATCH=${DISTILL_BATCH:-128}
BENCH_SAMPLES=${BENCH_SAMPLES:-2000}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-200}
TOTAL_S=${TOTAL_S:-560}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE=${STAGE:-$(mktemp -d /tmp/digits_edm_stage.XXXXXX)}
mkdir -p "$STAGE/logs"
cd "$STAGE" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DIGITS_EDM_PATH="$STAGE/exps/digits_edm/network.safetensors"   # where stage 1 writes it
export PYTHONUNBUFFERED=1
STAGE_TAG=gpu_digits_edm
source "$REPO/scripts/gpu_stages.sh"

publish() {   # refresh $OUT from the stage folder
  local items=() f
  for f in exps/digits_edm docs/bench/digits_edm.json docs/bench/digits_edm.md docs/bench/digits_edm.png; do
    [ -e "$f" ] && items+=("$f")
  done
  if [ ${#items[@]} -gt 0 ]; then
    tar --exclude=checkpoint.pt --exclude=.run-ids.lock --exclude='*.tmp' -czf "$STAGE/artifacts.tgz" "${items[@]}" &&
      mv -f "$STAGE/artifacts.tgz" "$OUT/digits_edm-artifacts.tar.gz"
  fi
  tar -czf "$STAGE/logs.tgz" logs && mv -f "$STAGE/logs.tgz" "$OUT/digits_edm-logs.tar.gz"
  for f in exps/digits_edm/MODEL_CARD.md exps/digits_edm/samples.png docs/bench/digits_edm.md docs/bench/digits_edm.png; do
    [ -f "$f" ] && cp -f "$f" "$OUT/"
  done
}


say "repository $REPO, stage folder $STAGE, output $OUT, TINY=$TINY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! $PYTHON -c "import omegaconf" 2>/dev/null; then
  whl=$(ls "$REPO"/.whl/omegaconf-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ] && $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target /tmp/site "$whl"; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"; say "installed $(basename "$whl") into /tmp/site"
  else
    say "WARNING: omegaconf is missing and no .whl/omegaconf-*.whl was carried: the distillation stage will fail"
  fi
fi
$PYTHON -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ "$TINY" = 1 ]; then
  train_extra=(--tiny --batch 16 --log-every 10 --eval-every 40 --eval-repeats 1 --checkpoint-every 40
               --card-samples 20 --sample-steps 4)
  distill_extra=(--batch 8 --min-iterations 2 --max-iterations 3 --teacher-chunk 16 --override teacher.rtol=1e-2
                 --override checkpoint_every=1 --override validation.num=8 --override validation.reference.steps=16
                 --override "compare.solvers=[euler,dpmpp3m]")
  bench_extra=(--solvers euler,dpmpp3m --nfe 3,5 --num-samples 24 --ref-steps 32 --batch 24)
else
  train_extra=(--batch "$TRAIN_BATCH")
  distill_extra=(--batch "$DISTILL_BATCH")
  bench_extra=(--schedules polynomial,logsnr,time_uniform --solvers ipndm,dpmpp3m,dpmpp2m,unipc,dpm2,heun,euler
               --nfe 3,4,5,6,7,8,9,10,11,14 --num-samples "$BENCH_SAMPLES" --batch "$BENCH_SAMPLES")
fi

[ "$DEVICE" != auto ] && distill_extra+=(--override "device=$DEVICE")

# 1. train the network (the script stops itself at the budget and still writes everything), or with
#    SKIP_TRAIN=1 take the committed one and its card (to redo only the tables and the benchmark)
if [ "${SKIP_TRAIN:-0}" = 1 ]; then
  mkdir -p exps/digits_edm
  for f in network.safetensors MODEL_CARD.md train-log.jsonl train-info.json loss.png samples.png; do
    cp "$REPO/exps/digits_edm/$f" exps/digits_edm/ 2>/dev/null
  done
  STATUS[train]="skipped (SKIP_TRAIN=1: the committed network)"
else
  run_stage train $(( TRAIN_BUDGET_S + 200 )) $PYTHON "$REPO/scripts/train_digits_edm.py" --out exps/digits_edm \
    --device "$DEVICE" --steps "$TRAIN_STEPS" --time-budget-s "$TRAIN_BUDGET_S" --no-progress "${train_extra[@]}"
fi
publish
if [ ! -f exps/digits_edm/network.safetensors ]; then
  say "no network was written: distillation and benchmark skipped"
  STATUS[distill]="skipped"; STATUS[bench]="skipped"
else
  # 2. the EPD tables (exps/digits_edm/epd-nfe{3,5,7,9}.pkl and their run folders)
  run_stage distill $(( DISTILL_BUDGET_S * 2 + 60 )) $PYTHON "$REPO/scripts/distill_digits_edm.py" \
    --budget-s "$DISTILL_BUDGET_S" "${distill_extra[@]}"
  publish
  # 3. the benchmark, with whichever tables exist
  tables=()
  for n in 3 5 7 9; do
    [ -f "exps/digits_edm/epd-nfe$n.pkl" ] && tables+=(--table "epd-nfe$n=exps/digits_edm/epd-nfe$n.pkl")
  done
  bench_device=()
  [ "$DEVICE" != auto ] && bench_device=(--device "$DEVICE")
  mkdir -p docs/bench
  run_stage bench "$BENCH_TIMEOUT_S" $PYTHON -m solvers.bench --model digits_edm "${bench_device[@]}" \
    "${bench_extra[@]}" "${tables[@]}" --json docs/bench/digits_edm.json
  if [ -f docs/bench/digits_edm.json ]; then   # the markdown report, as the benchmark printed it
    $PYTHON -c "import json; from solvers.bench import markdown; \
print(markdown(json.load(open('docs/bench/digits_edm.json'))))" > docs/bench/digits_edm.md
  fi
  publish
fi

summary() {
  say "done in $(( $(date +%s) - T0 )) s"
  for name in train distill bench; do echo "  $name: ${STATUS[$name]:-not run}"; done
  if [ -f exps/digits_edm/train-info.json ]; then
    $PYTHON - exps/digits_edm/train-info.json <<'PY'
import json, sys
info = json.load(open(sys.argv[1])); t = info["training"]
print(f"  network: {info['parameters']:,} parameters, {info['file_bytes'] / 1e6:.2f} MB; {t['steps']} steps "
      f"({t['kimg']:.0f} kimg) in {t['seconds']:.0f} s on {t['device']} ({t['steps_per_second']:.1f} steps/s); "
      f"loss {t['final_loss']:.4f}, EMA loss train {t['train_loss_ema']:.4f} / held-out {t['heldout_loss_ema']:.4f}")
print(f"  statistics: {json.dumps(info.get('statistics'))}")
PY
  fi
  grep -h '^{' logs/distill.log 2>/dev/null | sed 's/^/  /'
  [ -f docs/bench/digits_edm.md ] && grep -E "^- |^Reference" docs/bench/digits_edm.md
  echo "files in $OUT:"
  (cd "$OUT" && ls -l)
}
summary | tee "$STAGE/summary.txt"
cp -f "$STAGE/summary.txt" "$OUT/summary.txt"
