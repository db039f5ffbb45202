#!/usr/bin/env bash
# Every GPU row of docs/benchmarks.md in one run, for a person with one GPU (an H100/H200 is meant to take under
# 8 minutes; not measured here: no GPU was lent while this was written):
#   1. bench/speed.py    the data path, engine.fit (image and feature task), the Embedder and the infer TTA, each
#                        beside its model-only ceiling
#   2. bench/fm.py       the embedding path against its ceiling for two foundation models at full width (random
#                        weights, the card's architecture: H-optimus-0's ViT-g/14 and MedImageInsight's DaViT-H)
#   3. bench/scale.py    the frozen-feature path at the competition's size, 219,958 patches x 8 views x 1536, on
#                        the GPU (train every fold -> infer plain and adapted -> stack -> submit)
# Raw output (each tool's JSON and this log) goes to $OUT (default bench/results/gpu-<date>/); copy the rows into
# docs/benchmarks.md with the machine and the date.
#   bash bench/gpu.sh            on the GPU
#   bash bench/gpu.sh --smoke    the same tools, recipes and stages at tiny sizes on the CPU (the tests run it): the
#                                script works, the numbers mean nothing
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # the project's environment, as train.sh uses it (PY=... for one of your own)
smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--smoke]" >&2; exit 2 ;;
esac
stamp=$(date +%F)
OUT="${OUT:-bench/results/gpu-$stamp$([ "$smoke" = 1 ] && echo -smoke)}"
mkdir -p "$OUT"
log="$OUT/gpu.log"
: > "$log"
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1
step() {  # step NAME COMMAND...: runs it, its output in the log and on the screen, its seconds after it
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  echo "== $name done in $(( SECONDS - start )) s" | tee -a "$log"
}
if [ "$smoke" = 1 ]; then
  device=cpu
  step speed "$PY" bench/speed.py --smoke --out "$OUT"
  step fm "$PY" bench/fm.py --device cpu --depth 1 --patches 2 --views 1 --repeats 1 --recipes hoptimus0,medimageinsight --out "$OUT/fm.json"
  step scale "$PY" bench/scale.py --sizes 1500 --dim 32 --epochs 1 --device cpu --out "$OUT/scale.jsonl"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no GPU (torch.cuda.is_available() is False); --smoke runs it on the CPU')"
  device=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
  step speed "$PY" bench/speed.py --out "$OUT"
  step fm "$PY" bench/fm.py --device cuda --recipes hoptimus0,medimageinsight --out "$OUT/fm.json"
  step scale "$PY" bench/scale.py --sizes 219958 --dim 1536 --views 8 --device cuda --out "$OUT/scale.jsonl"
fi
echo "== bench/gpu.sh ($device) done in $SECONDS s; raw output in $OUT" | tee -a "$log"
