#!/bin/bash
# Every benchmark on the GPU machine, each printing one JSON line per measurement (also appended to
# $OUT/results.jsonl when OUT is set). Run from anywhere:  bash bench/run_all.sh [--tiny]
# On the lent device, first install the carried wheels (diffusers):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# Budgets (seconds after which each script skips its optional variants) keep the whole run near 15 minutes.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
status=0
$PY bench/bench_train.py --budget-s "${TRAIN_BUDGET_S:-360}" "$@" || status=1
$PY bench/bench_sample.py --budget-s "${SAMPLE_BUDGET_S:-200}" "$@" || status=1
$PY bench/bench_cache.py --budget-s "${CACHE_BUDGET_S:-120}" "$@" || status=1
GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -ge 2 ]; then
  $PY bench/bench_ddp.py --gpus "$GPUS" "$@" || status=1
else
  echo '{"bench": "ddp", "name": "skipped", "reason": "fewer than 2 GPUs"}'
fi
exit $status
