#!/usr/bin/env bash
# Stages 0-4: preflight (weights reachable, disk, GPU memory, projected time: stops here on any problem),
# prepare the cache, write the folds, train a config's stain GAN (aug.stain_norm: gan), tune its backbone for stain
# robustness (model.robustify), embed (heads on frozen features), train every config on every fold.
#   bash train.sh                      input/*.h5 present -> competition run; absent -> offline demo
#   CONFIGS="configs/a.yaml configs/b.yaml" SEEDS="0 1 2" bash train.sh
#   LAUNCH="accelerate launch --num_processes 4" bash train.sh      (several GPUs or nodes)
#   LOG_WITH=tensorboard bash train.sh  curves in Accelerate's trackers (files in each run's tracker/ folder)
#   PSEUDO=0.9 bash train.sh           after train.sh + infer.sh: one round of pseudo-labelling, every
#                                      config again as NAME_pl; then bash infer.sh ensembles both rounds
# Finished runs are kept: running it again trains only what is missing.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
source scripts/mode.sh
start=$(date +%s)
if [ "$DEMO" = 1 ]; then "$PY" -m histoshift --root "$ROOT" demo-data; fi
"$PY" -m histoshift --root "$ROOT" preflight $(for cfg in $CONFIGS; do printf -- '--config %s ' "$cfg"; done)
"$PY" -m histoshift --root "$ROOT" prepare
"$PY" -m histoshift --root "$ROOT" folds
for cfg in $CONFIGS; do
  $LAUNCH -m histoshift --root "$ROOT" stain-gan --config "$cfg"   # aug.stain_norm: gan's generator, once (others: nothing)
  $LAUNCH -m histoshift --root "$ROOT" robustify --config "$cfg"   # model.robustify: the stain-robust backbone, once (others: nothing)
  $LAUNCH -m histoshift --root "$ROOT" embed --config "$cfg"   # a frozen backbone's features, once (others: nothing to do)
  for seed in $SEEDS; do
    $LAUNCH -m histoshift --root "$ROOT" train --config "$cfg" --seed "$seed" ${PSEUDO:+--pseudo "$PSEUDO"} \
      ${LOG_WITH:+train.log_with=$LOG_WITH}
  done
done
echo "== train.sh done in $(( $(date +%s) - start )) s; next: bash infer.sh"
