#!/usr/bin/env bash
# RDPO on FLUX.1-dev (docs/authors-code.md §8.4), the authors' train_flux.sh with the same variables:
#   FLUX_SNAPSHOT_PATH   start table (default exps/flux/flux-start.pkl: the authors' file, read without running its code)
#   FLUX_MODEL_PATH      local FLUX.1-dev diffusers folder (required; nothing is downloaded)
#   FLUX_PROMPT_CSV      prompt file (.csv with a text column, or .txt); default: the config's
#   FLUX_MAX_STEPS       PPO steps; default: the config's (20000)
#   FLUX_NPROC_PER_NODE  GPUs (torchrun when > 1; default 1)
#   FLUX_EXPORT_AFTER    1 (default): export the policy's mean table when training ends
# Extra arguments are passed to the launcher (e.g. --override ppo.learning_rate=5e-5).
set -euo pipefail
cd "$(dirname "$0")"
snapshot=${FLUX_SNAPSHOT_PATH:-exps/flux/flux-start.pkl}
[ -f "$snapshot" ] || { echo "error: start table $snapshot not found (set FLUX_SNAPSHOT_PATH)" >&2; exit 2; }
[ -n "${FLUX_MODEL_PATH:-}" ] || { echo "error: set FLUX_MODEL_PATH to a local FLUX.1-dev diffusers folder" >&2; exit 2; }
args=(--config training/ppo/cfgs/flux_dev.yaml --override run.run_name=flux_dev
      --override "data.predictor_snapshot=$snapshot" --override "model.backend_options.model_path=$FLUX_MODEL_PATH")
[ -n "${FLUX_PROMPT_CSV:-}" ] && args+=(--override "data.prompt_csv=$FLUX_PROMPT_CSV")
[ -n "${FLUX_MAX_STEPS:-}" ] && args+=(--max-steps "$FLUX_MAX_STEPS")
python -m training.ppo.launch "${args[@]}" "$@" --dry-run          # preflight: config, table, reward heads
nproc=${FLUX_NPROC_PER_NODE:-1}
if [ "$nproc" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$nproc" -m training.ppo.launch "${args[@]}" "$@"
else
  python -m training.ppo.launch "${args[@]}" "$@"
fi
if [ "${FLUX_EXPORT_AFTER:-1}" = 1 ]; then
  run=$(ls -d exps/[0-9]*-flux_dev | tail -1)
  python -m training.ppo.export "$run"
fi
