#!/usr/bin/env bash
# Train -> sample -> evaluate (the authors' launch.sh, docs/authors-code.md §8.4, for this code base).
#
#   1. RDPO for sd15, sd3_512 and sd3_1024 (python -m training.ppo.launch --config training/ppo/cfgs/<name>.yaml;
#      torchrun when NPROC_PER_NODE > 1), then ./train_flux.sh (run name flux_dev).
#   2. Samples from each model's newest run folder exps/NNNNN-<name> and its table-mean.pkl: $PROMPTS (default
#      src/prompts/test.txt, the authors' 1000 prompts) with seeds $SEEDS (0-999) into samples/<name> (samples/flux
#      for FLUX): sample.py (batch 16) for sd15, sample_sd3.py (batch 4) for SD3, sample_flux.py (batch 1) for FLUX.
#   3. score_all_metrics <name> for every sample folder: each metric whose weights are present
#      (python -m training.rewards.pretrained check), summary in results/<name>-summary.{json,md}.
#
# Variables:
#   MODELS       models to run (default "sd15 sd3_512 sd3_1024 flux_dev")
#   SKIP_TRAIN=1 SKIP_FLUX=1 SKIP_SAMPLE=1 SKIP_EVAL=1    skip a stage (SKIP_FLUX: only FLUX training)
#   PROMPTS SEEDS SD15_BATCH SD3_BATCH FLUX_BATCH         sampling settings
#   NPROC_PER_NODE (1), RDPO_ARGS (extra launcher flags, e.g. "--max-steps 100")
#   SD15_MODEL_PATH SD3_MODEL_PATH FLUX_MODEL_PATH        local diffusers folders (read by the backends)
#   PYTHON WEIGHTS_DIR RESULTS_DIR EXPS_DIR FID_REF FID_KID  see scripts/pipeline_common.sh
#
# Targets (instead of the pipeline above; docs/reproduce_iccv.md):
#   ./launch.sh reproduce_iccv DATASET METHOD NFE [FLAGS]   one cell of the ICCV paper's Table 1: sample 50k images
#       (resumable), FID against the reference, "ours X | paper Y", $ICCV_OUTDIR/<dataset>/<method>-nfe<N>/fid.json
#   ./launch.sh reproduce_iccv_row DATASET METHOD [FLAGS]   the same for NFE 3, 5, 7 and 9 (a row of the table)
#   ./launch.sh help                                       this text
#   DATASET: cifar10 ffhq imagenet64 lsun_bedroom (digits: the offline analytic model); METHOD: epd epd_plugin
#   ddim edm dpm2 dpmpp3m unipc ipndm (a comma list, or all); FLAGS go to scripts/reproduce_iccv.py, e.g.
#   --model_path NET.pkl --ref REF.npz --num-images 10000 --batch 256. With NPROC_PER_NODE > 1 it runs under
#   torchrun (every GPU samples its share of the seeds; rank 0 computes FID). Defaults: networks in
#   $EDM_MODELS_DIR (weights/edm), references in $FID_REFS_DIR (weights/fid-refs), results in $ICCV_OUTDIR
#   ($RESULTS_DIR/iccv), Inception weights in $WEIGHTS_DIR (pt_inception-2015-12-05-6726825d.pth). Paths are
#   relative to the checkout (launch.sh runs there).
#   ./launch.sh reproduce_tpami BACKBONE METHOD [FLAGS]     one cell of the EPD-Solver++ (TPAMI) tables
#       (docs/reproduce_tpami.md): sample one image per prompt of $PROMPTS (resumable), score HPSv2.1, PickScore,
#       ImageReward, CLIP and Aesthetic (weights from $WEIGHTS_DIR; a missing file stops the run before sampling
#       unless --skip-metrics names its metric), "ours X | paper Y" per metric, $TPAMI_OUTDIR/<backbone>/<cell>/
#       scores.json
#   ./launch.sh reproduce_tpami_table BACKBONE [FLAGS]     the same for every row of that backbone's table
#   BACKBONE: sd15 sd3_512 sd3_1024; METHOD: epd (the released <model>-best.pkl) or a baseline row such as ddim-50,
#   ipndm-20, heun-10-uniform, dpm2-10-logsnr, heun-14 (a comma list, or all; scripts/reproduce_tpami.py --help
#   lists every cell); FLAGS go to scripts/reproduce_tpami.py, e.g. --model_path weights/sd3-medium --batch 8.
#   torchrun when NPROC_PER_NODE > 1 (seeds dealt round robin; rank 0 scores). Models: --model_path, else
#   $SD15_MODEL_PATH / $SD3_MODEL_PATH; results in $TPAMI_OUTDIR ($RESULTS_DIR/tpami).
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/pipeline_common.sh
source scripts/pipeline_common.sh

MODELS=${MODELS:-"sd15 sd3_512 sd3_1024 flux_dev"}
PROMPTS=${PROMPTS:-src/prompts/test.txt}
SEEDS=${SEEDS:-0-999}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}

die() { echo "error: $*" >&2; exit 2; }

# The targets ------------------------------------------------------------------------------------------------------
run_reproduce_iccv() {
  local args=(--outdir "${ICCV_OUTDIR:-$RESULTS_DIR/iccv}" --cache-dir "$WEIGHTS_DIR" "$@")
  if [ "$NPROC_PER_NODE" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" scripts/reproduce_iccv.py "${args[@]}"
  else
    "$PYTHON" scripts/reproduce_iccv.py "${args[@]}"
  fi
}

run_reproduce_tpami() {
  local args=(--outdir "${TPAMI_OUTDIR:-$RESULTS_DIR/tpami}" --cache-dir "$WEIGHTS_DIR")
  # test.txt is the script's own default; passing it would override a --prompt-set among the FLAGS
  if [ "$PROMPTS" != src/prompts/test.txt ]; then args+=(--prompt-file "$PROMPTS"); fi
  args+=("$@")
  if [ "$NPROC_PER_NODE" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" scripts/reproduce_tpami.py \
      "${args[@]}"
  else
    "$PYTHON" scripts/reproduce_tpami.py "${args[@]}"
  fi
}

case "${1:-}" in
  "") ;;  # the pipeline below
  reproduce_iccv)
    [ $# -ge 4 ] || die "usage: ./launch.sh reproduce_iccv DATASET METHOD NFE [FLAGS] (./launch.sh help)"
    run_reproduce_iccv --dataset "$2" --method "$3" --nfe "$4" "${@:5}"
    exit $? ;;
  reproduce_iccv_row)
    [ $# -ge 3 ] || die "usage: ./launch.sh reproduce_iccv_row DATASET METHOD [FLAGS] (./launch.sh help)"
    run_reproduce_iccv --dataset "$2" --method "$3" --all "${@:4}"
    exit $? ;;
  reproduce_tpami)
    [ $# -ge 3 ] || die "usage: ./launch.sh reproduce_tpami BACKBONE METHOD [FLAGS] (./launch.sh help)"
    run_reproduce_tpami --backbone "$2" --method "$3" "${@:4}"
    exit $? ;;
  reproduce_tpami_table)
    [ $# -ge 2 ] || die "usage: ./launch.sh reproduce_tpami_table BACKBONE [FLAGS] (./launch.sh help)"
    run_reproduce_tpami --backbone "$2" --all "${@:3}"
    exit $? ;;
  help | -h | --help)
    sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0 ;;
  *) die "unknown target '$1' (reproduce_iccv, reproduce_iccv_row, reproduce_tpami, reproduce_tpami_table, help;" \
         "no argument: the pipeline)" ;;
esac

wants() { [[ " $MODELS " == *" $1 "* ]]; }
sample_name() { if [ "$1" = flux_dev ]; then echo flux; else echo "$1"; fi; }

run_rdpo() {
  local config=$1
  local extra=()
  if [ -n "${RDPO_ARGS:-}" ]; then read -r -a extra <<<"$RDPO_ARGS"; fi
  if [ "$NPROC_PER_NODE" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m training.ppo.launch --config "$config" "${extra[@]}"
  else
    "$PYTHON" -m training.ppo.launch --config "$config" "${extra[@]}"
  fi
}

for name in $MODELS; do
  case $name in
    sd15 | sd3_512 | sd3_1024 | flux_dev) ;;
    *) die "unknown model '$name' in MODELS (sd15, sd3_512, sd3_1024, flux_dev)" ;;
  esac
done

# 1. Training ---------------------------------------------------------------------------------------------------
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  if [ -z "$("$PYTHON" training/rewards/pretrained.py present --root "$WEIGHTS_DIR" hps)" ]; then
    die "the RDPO configs reward HPSv2.1: put HPS_v2.1_compressed.pt under $WEIGHTS_DIR/ (see above), or SKIP_TRAIN=1"
  fi
  for name in sd15 sd3_512 sd3_1024; do
    wants "$name" || continue
    config=training/ppo/cfgs/$name.yaml
    echo "[train] RDPO $name ($config)"
    run_rdpo "$config" || die "RDPO training of $name failed (the message above names the missing start table, model or weights)"
  done
  if wants flux_dev && [ "${SKIP_FLUX:-0}" != 1 ]; then
    echo "[train] RDPO flux_dev (./train_flux.sh)"
    ./train_flux.sh || die "FLUX training failed (see above)"
  fi
else
  echo "[train] skipped (SKIP_TRAIN=1)"
fi

# 2. Sampling ---------------------------------------------------------------------------------------------------
if [ "${SKIP_SAMPLE:-0}" != 1 ]; then
  [ -f "$PROMPTS" ] || die "prompt file $PROMPTS not found: copy the authors' src/prompts/test.txt (see" \
                           "src/prompts/README.md) or set PROMPTS"
  for name in $MODELS; do
    run=$(latest_run_dir "$name") || die "no run to sample for $name"
    table=$(latest_table "$run") || die "no table to sample for $name"
    case $name in
      sd15) script=sample.py; batch=${SD15_BATCH:-16} ;;
      sd3_512 | sd3_1024) script=sample_sd3.py; batch=${SD3_BATCH:-4} ;;
      flux_dev) script=sample_flux.py; batch=${FLUX_BATCH:-1} ;;
    esac
    outdir=samples/$(sample_name "$name")
    echo "[sample] $name: $table -> $outdir"
    "$PYTHON" "$script" --predictor_path "$table" --prompt-file "$PROMPTS" --seeds "$SEEDS" --batch "$batch" \
      --outdir "$outdir" || die "sampling $name failed (the message above names the missing model or table)"
  done
else
  echo "[sample] skipped (SKIP_SAMPLE=1)"
fi

# 3. Evaluation -------------------------------------------------------------------------------------------------
if [ "${SKIP_EVAL:-0}" != 1 ]; then
  prompts_arg=""
  if [ -f "$PROMPTS" ]; then prompts_arg=$PROMPTS; fi
  for name in $MODELS; do
    folder=$(sample_name "$name")
    if [ ! -d "samples/$folder" ]; then
      echo "[eval] skip $name: no samples/$folder"
      continue
    fi
    echo "[eval] $name"
    score_all_metrics "$folder" "$prompts_arg"
  done
else
  echo "[eval] skipped (SKIP_EVAL=1)"
fi
