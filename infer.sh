#!/usr/bin/env bash
# Stage 5-7: 8-view TTA predictions of every fold model, ensemble/stacker choice, submission.
#   bash infer.sh                      (after bash train.sh; same demo/competition choice)
#   LAUNCH="accelerate launch --num_processes 4" bash infer.sh
#   ALLOW_DEGENERATE=1 bash infer.sh   write the submission even if it predicts one class for every patch
#   KAGGLE_COMPETITION=SLUG bash infer.sh   also upload it with the official kaggle client (message: its lineage)
#   LOG_WITH=tensorboard bash infer.sh the stack's comparison table to Accelerate's trackers
#   FOURIER=1 bash infer.sh            also the Fourier transfer sets (one per beta; FOURIER_BETAS="0.01 0.03 0.05",
#                                      the default), so that the stack's rule can weigh them against plain and adapted
#   RULE=loco bash infer.sh            the stack's choice rule (default: margin; `histoshift stack --help` lists them)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
source scripts/mode.sh
start=$(date +%s)
"$PY" -m histoshift --root "$ROOT" prepare --verify   # the inputs' bytes against the cache's digests (a rebuild makes what follows recompute or refuse)
# plain and adapted predictions (AdaBN, feature shifts), with FOURIER=1 the Fourier transfer sets too
$LAUNCH -m histoshift --root "$ROOT" infer --adapt ${FOURIER:+--fourier} ${FOURIER:+${FOURIER_BETAS:+--fourier-betas $FOURIER_BETAS}}
# every combiner on every set leave one center out; the rule (default margin: adapted unless LOCO shows it worse by
# more than a point beyond doubt) picks the set, chosen by its regret on unseen centers (docs/benchmarks.md)
"$PY" -m histoshift --root "$ROOT" stack ${LOG_WITH:+--log-with "$LOG_WITH"} ${RULE:+--rule "$RULE"}
# one class for all: refused unless ALLOW_DEGENERATE; KAGGLE_COMPETITION=SLUG also uploads it (never without)
"$PY" -m histoshift --root "$ROOT" submit ${ALLOW_DEGENERATE:+--allow-degenerate} ${KAGGLE_COMPETITION:+--kaggle "$KAGGLE_COMPETITION"}
"$PY" -m histoshift --root "$ROOT" report
if [ "$DEMO" = 1 ]; then
  "$PY" -m histoshift --root "$ROOT" score --labels "$ROOT/input/test_labels.csv"
  echo "== DEMO submission (synthetic data): $ROOT/submissions/submission.csv"
else
  echo "== submission: $ROOT/submissions/submission.csv"
fi
echo "== infer.sh done in $(( $(date +%s) - start )) s"
