#!/bin/bash
# Issue 15's synthetic anomaly study on one GPU, about 6 minutes: demo-sized models trained side by side on a NORMAL
# synthetic world (configs/anomaly_synthetic.yaml), each scored by tools/anomaly.py on an anomalous world of another
# seed (data.synthetic.anomalies; labels in its anomalies.json), next to copying the last frame.
#
#   bash bench/anomaly_study.sh OUTDIR
#
# Out, in OUTDIR: <variant>/ per scoring (anomaly.json, roc.png, curves.png, curves/, scores.csv), train_<v>.log,
# score_<variant>.log, metrics_<v>.jsonl, summary.json (AUC of every scoring) and the table printed at the end.
# Environment:
#   ANOM_VARIANTS="res abs ..."  variants to train (default: all below)
#   ANOM_STEPS                   optimizer steps (default 5000); a run still going at ANOM_TRAIN_S is stopped by
#                                SIGTERM, which saves a checkpoint, and is scored at the step it reached
#   ANOM_TRAIN_S / ANOM_SCORE_S  time limits of each training run / each scoring, seconds (default 230 / 110)
#   ANOM_SAMPLES                 K samples per window for the K-sample scorings (default 3)
#   ANOM_TINY=1                  a tiny CPU smoke run of the whole pipeline (small worlds, a few steps)
#   ANOM_WORLD="key=value ..."   overrides of the NORMAL (training) world, e.g. data.synthetic.num_clips=1024
#   ANOM_EVENT_FRAMES=N          frames of each event in the anomalous world (default: the config's, 3)
#   ANOM_SET="key=value ..."     overrides added last to every training run (e.g. train.max_steps=10000)
#   ANOM_SMOOTH="1 2"            --smooth sigmas of every scoring
#   ANOM_SCORINGS="plain off k rollout eta1"   which scorings of each run (default: the first four)
#   ANOM_RUNS                    parent folder of the run folders (default runs)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python3}
OUT=${1:?usage: bash bench/anomaly_study.sh OUTDIR}
CONFIG=configs/anomaly_synthetic.yaml
RUNS=${ANOM_RUNS:-runs}
TRAIN_S=${ANOM_TRAIN_S:-230}
SCORE_S=${ANOM_SCORE_S:-$([ "${ANOM_TINY:-0}" = 1 ] && echo 600 || echo 110)}
K=${ANOM_SAMPLES:-3}
mkdir -p "$OUT" "$RUNS"

# the worlds: normal (training) and anomalous (scoring, another seed); tiny = a smoke run of the pipeline on a CPU
if [ "${ANOM_TINY:-0}" = 1 ]; then
  NORMAL=data_cache/anomaly_tiny_normal ABNORMAL=data_cache/anomaly_tiny_anomalous
  WORLD="data.synthetic.num_clips=12 data.synthetic.frames_per_clip=20"
  ABWORLD="data.synthetic.num_clips=3 data.synthetic.frames_per_clip=20 data.synthetic.anomalies=1"
  SIZE="train.batch_size=4 train.max_steps=${ANOM_STEPS:-6} optim.warmup_steps=2 checkpoint.every=3 eval.clips=1 eval.steps=2"
  SCORE_ARGS="--steps 2 --smooth ${ANOM_SMOOTH:-1}"
  TINY_LAST="train.max_steps=${ANOM_STEPS:-6}"  # after the variants: a long variant stays a smoke run here
else
  NORMAL=data_cache/anomaly_normal ABNORMAL=data_cache/anomaly_anomalous
  WORLD=${ANOM_WORLD:-}
  [ -n "$WORLD" ] && NORMAL=data_cache/anomaly_normal_custom
  ABWORLD="data.synthetic.num_clips=40 data.synthetic.anomalies=2"
  if [ -n "${ANOM_EVENT_FRAMES:-}" ]; then
    ABNORMAL=data_cache/anomaly_anomalous_${ANOM_EVENT_FRAMES}frame
    ABWORLD="$ABWORLD data.synthetic.anomaly_frames=$ANOM_EVENT_FRAMES"
  fi
  SIZE="train.max_steps=${ANOM_STEPS:-5000}"
  SCORE_ARGS="--batch-size 128 --smooth ${ANOM_SMOOTH:-1 2}"
fi

# variants: --set overrides on the config (its default is the demo's recipe: residual target, snr_gamma 0)
declare -A VARIANTS=(
  [res]=""                                                             # the config as shipped
  [abs]="diffusion.target=absolute diffusion.snr_gamma=5.0"            # the previous demo recipe
  [res_tf4]="data.t_future=4"                                          # 4 horizons to average over
  [res_wide]="unet.block_out_channels=[64,128,256]"                    # 4x the parameters
  [res_tp8]="data.t_past=8"                                            # a past that reaches back before a short event
  [res_tp2]="data.t_past=2"                                            # a past that forgets an event sooner
  [res_long]="train.max_steps=7000"                                    # smaller errors on normal frames by training longer?
)
picked() { [ -z "${ANOM_VARIANTS:-}" ] || [[ " $ANOM_VARIANTS " == *" $1 "* ]]; }
SCORINGS=${ANOM_SCORINGS:-plain off k rollout}
scoring() { [[ " $SCORINGS " == *" $1 "* ]]; }

world() {  # root overrides... : write a synthetic world of the config once (ensure_synthetic), bounded in time
  local root=$1; shift
  timeout -k 10 300 $PY -c "import sys; from configs.loader import load_config; from data.synthetic import ensure_synthetic
ensure_synthetic(load_config(sys.argv[1], sys.argv[2:]).data, progress=False)" "$CONFIG" data.root="$root" "$@" \
    > "$OUT/world_$(basename "$root").log" 2>&1 || { echo "world $root failed:"; tail -5 "$OUT/world_$(basename "$root").log"; exit 1; }
}

score() {  # variant label [anomaly.py args] : score the anomalous world with run <variant> into $OUT/<label>
  local v=$1 label=$2; shift 2
  timeout -k 10 "$SCORE_S" $PY tools/anomaly.py --run "$RUNS/anomaly_$v" --data-root "$ABNORMAL" \
    --labels "$ABNORMAL/anomalies.json" --out "$OUT/$label" $SCORE_ARGS "$@" > "$OUT/score_$label.log" 2>&1 \
    || echo "scoring $label failed or timed out (see score_$label.log)"
}

echo "worlds: $NORMAL (normal), $ABNORMAL (anomalous)"
world "$NORMAL" $WORLD
world "$ABNORMAL" data.synthetic.seed=1 $ABWORLD

# ---- train the variants side by side (own latent cache each: runs starting together would build one cache twice)
for v in "${!VARIANTS[@]}"; do
  picked "$v" || continue
  timeout -k 30 "$TRAIN_S" $PY train_video_pred.py --config "$CONFIG" --overwrite --set data.root="$NORMAL" \
    logging.run_dir="$RUNS" logging.name="anomaly_$v" logging.wandb.mode=disabled cache.dir="data_cache/latents_anomaly_$v" \
    $WORLD $SIZE ${VARIANTS[$v]} ${ANOM_SET:-} ${TINY_LAST:-} > "$OUT/train_$v.log" 2>&1 &
done
wait
for v in "${!VARIANTS[@]}"; do
  picked "$v" || continue
  cp "$RUNS/anomaly_$v/metrics.jsonl" "$OUT/metrics_$v.jsonl" 2>/dev/null
  ls "$RUNS/anomaly_$v/checkpoints/"*.pt > /dev/null 2>&1 || { echo "run $v left no checkpoint:"; tail -5 "$OUT/train_$v.log"; }
done

# ---- score, all side by side: each run as trained (masked residual decoding), without it, over K samples per
# window, and with 2 rounds of rollout (twice the horizons to average over: a stop or a reversal is predictable from
# its own second frame on, but not by the windows that ended before it). Every scoring also reports the worst-patch
# scores (*_patch) beside the paper's whole-frame PSNR.
for v in "${!VARIANTS[@]}"; do
  picked "$v" || continue
  scoring plain && score "$v" "$v" &
  scoring off && score "$v" "${v}_decode_off" --set "sampler.residual_decode='off'" &
  scoring k && score "$v" "${v}_k$K" --samples "$K" &
  scoring rollout && score "$v" "${v}_rollout2" --rollout 2 &
  scoring eta1 && score "$v" "${v}_eta1" --set sampler.eta=1.0 &
done
wait

# ---- summary: AUC of every scoring, model and copy-last
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("*/anomaly.json")):
    r = json.loads(f.read_text())
    rows[f.parent.name] = {"step": r.get("step"), "frames": r.get("frames_scored"),
                           "anomalous": r.get("frames_anomalous"), "auc": r.get("auc", {})}
(out / "summary.json").write_text(json.dumps(rows, indent=1))
smooth = sorted({k.split("_smooth")[1] for r in rows.values() for k in r["auc"] if k.startswith("model_t+1_smooth")},
                key=float)
keys = [k for k in ("model_t+1", "model_mean", *(f"model_{h}_smooth{s}" for s in smooth for h in ("t+1", "mean")),
                    "model_t+1_patch", "model_mean_patch", "model_t+1_raw",
                    "copy_last_t+1", "copy_last_mean", "copy_last_t+1_smooth1", "copy_last_t+1_patch") if any(k in r["auc"] for r in rows.values())]
print(f"frame-level AUC ({next(iter(rows.values()))['frames'] if rows else 0} frames scored)")
print(f"{'scoring':<22}{'step':>6}  " + "  ".join(f"{k:>{max(len(k), 6)}}" for k in keys))
for name, r in rows.items():
    cells = [r["auc"].get(k) for k in keys]
    print(f"{name:<22}{r['step'] or 0:>6}  " + "  ".join(
        f"{c:>{max(len(k), 6)}.3f}" if isinstance(c, float) else f"{str(c):>{max(len(k), 6)}}" for k, c in zip(keys, cells)))
EOF
echo "anomaly study done: $OUT/summary.json"
