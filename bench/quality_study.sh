#!/bin/bash
# The quality study of issue 14 on one GPU: several training runs share the card (small models, each far from
# filling it), then bench/quality_eval.py evaluates every run under each residual-decoding mode, bounce_check /
# action_ablation where they apply. Every variant is a list of --set overrides on a shipped config.
#
#   bash bench/quality_study.sh PHASE OUTDIR      # PHASE: vae | demo | ped2 | car (several: "vae demo")
#
# Data the GPU machine lacks is read from $STUDY_DATA (default .gpu_data): ped2/<clip>/*.png (UCSD Ped2 training
# frames resized to 192x128 as the config's crop does), car/{train_0..3,test_last20}/*.jpg (car-detection.mp4 at
# 256x144, first 80% in four clips, last 20% as the val clip: data.split_seed=3 puts exactly it in val).
# STUDY_TIMEOUT_S bounds each training run; STUDY_VARIANTS="name ..." picks variants of a phase (default: all);
# STUDY_VAES=folder: VAEs trained by an earlier call (folder/vae_ucsd_ped2, folder/vae_car) are copied into runs/.
# STUDY_SET="key=value ...": overrides added to every training run (e.g. train.max_steps=6000).
# STUDY_EVAL="...": extra bench/quality_eval.py arguments for the camera phases (e.g. --samples 4).
# STUDY_PACK=1: pack OUTDIR into OUTDIR.tgz at the end and remove the folder (the device returns a limited number of
# files per call: a study of six demo variants writes about 130).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python3}
DATA=${STUDY_DATA:-.gpu_data}
OUT=${2:-study_out}
TO=${STUDY_TIMEOUT_S:-540}
mkdir -p "$OUT"
if [ -n "${STUDY_VAES:-}" ]; then mkdir -p runs && cp -r "$STUDY_VAES"/vae_* runs/; fi

declare -A DEMO=(
  [base]=""
  [res]="diffusion.target=residual"
  [res_s2]="diffusion.target=residual diffusion.residual_scale=2.0"
  [res_g0]="diffusion.target=residual diffusion.snr_gamma=0.0"
  [g0]="diffusion.snr_gamma=0.0"
  [res_zt]="diffusion.target=residual diffusion.zero_terminal_snr=true"
  [lr2]="optim.lr=2e-3"                      # the same CPU minutes, a faster optimizer?
  [ema998]="ema.decay=0.998"                 # a shorter EMA window for a 3,500-step run
  [lr3]="optim.lr=3e-3"
  [seed1]="train.seed=1"                     # base and lr2 on another seed: is the lr gain more than noise?
  [seed2]="train.seed=2"                     # session 21: a third seed of the shipped config (how far shapes spread)
  [lr2_seed1]="optim.lr=2e-3 train.seed=1"
  # session 14, the shapes of goal 2 at the demo's CPU cost: more clips (no cost per step), capacity where it is cheap
  [c512]="data.synthetic.num_clips=512 data.root=data_cache/synthetic_demo_c512"
  [w256]="unet.block_out_channels=[32,64,256]"           # the width at the 4x4 level only
  [w4x]="unet.block_out_channels=[64,128,256]"            # session 11's shape reference (0.44x the CPU step)
  [s5000]="train.max_steps=5000"                          # what a 1.4x faster CPU step would buy
  [tf2]="data.t_future=2"                                # 2 frames per round, rolled out twice to t+4
  [s7000]="train.max_steps=7000"                          # twice the steps: do steps alone give the shapes?
  [w64top]="unet.block_out_channels=[64,64,128]"          # the width at the 16x16 level only
  [ln25]="diffusion.timestep_sampling=logit_normal diffusion.timestep_median=0.25"  # training draws around SNR ~1
  [ln50]="diffusion.timestep_sampling=logit_normal diffusion.timestep_median=0.5"   # both ends drawn less
  [ln65]="diffusion.timestep_sampling=logit_normal diffusion.timestep_median=0.65"  # more high-noise steps
  # session 16, the shapes at t+3 / t+4: where the net can look (attention), depth, batch, what it predicts
  [att8]="unet.attention=[false,true,true]"               # self-attention at the 8x8 level too
  [att16]="unet.attention=[true,false,true]"              # self-attention at the 16x16 level: copy from anywhere
  [lpb2]="unet.layers_per_block=2"                        # two resnet blocks per level and side
  [b32]="train.batch_size=32"                             # twice the windows per step
  [att_all]="unet.attention=[true,true,true]"             # self-attention at every level
  [lpb2_att16]="unet.layers_per_block=2 unet.attention=[true,false,true]"
  [lpb3]="unet.layers_per_block=3"
  [lpb2_seed1]="unet.layers_per_block=2 train.seed=1"     # is lpb2's gain more than one seed's luck?
  [lpb3_att16]="unet.layers_per_block=3 unet.attention=[true,false,true]"
  [lpb2_s6000]="unet.layers_per_block=2 train.max_steps=6000"
  [w4x_lpb2]="unet.block_out_channels=[64,128,256] unet.layers_per_block=2"  # an upper bound, not a CPU candidate
  # motion anchors: the last frame carried on at each pixel's velocity, beside the past (model/motion.py extrapolate).
  # Since session 17 demo.yaml ships them (3,000 steps): every variant here is on top of them, so the rows above were
  # measured on a config without anchors (add "diffusion.motion_anchor=false train.max_steps=3500" to repeat them);
  # session 16's anch / anch_lpb2 / anch_t are now base / lpb2 / base_t (session 17 ran lpb2 and seed1 as base_lpb2
  # and base_seed1)
  [anch_g2]="diffusion.motion_anchor=true diffusion.anchor_gap=2 diffusion.anchor_radius=4"
  [anch_s6000]="diffusion.motion_anchor=true train.max_steps=6000"
  # session 17: demo.yaml ships anchors at 3,000 steps (base); the recipe before it, and what could still add to it
  [noanch]="diffusion.motion_anchor=false train.max_steps=3500"       # session 15's shipped demo
  [base_t]="diffusion.target=anchor"
  [base_t_lpb2]="diffusion.target=anchor unet.layers_per_block=2"
  # session 18: one velocity per colour region (flat objects move whole, no smear, the better-matched one in front)
  [seg]="diffusion.anchor_motion=segment"
  [seg_seed1]="diffusion.anchor_motion=segment train.seed=1"
  [seg_lpb2]="diffusion.anchor_motion=segment unet.layers_per_block=2"
  [seg_t]="diffusion.anchor_motion=segment diffusion.target=anchor"   # a better anchor: is its correction easier now?
  # session 19: an object wholly in the picture stops whole at its edge instead of running out of it, cut
  [segstop]="diffusion.anchor_motion=segment diffusion.anchor_edge=stop"
  [segstop_seed1]="diffusion.anchor_motion=segment diffusion.anchor_edge=stop train.seed=1"
  # session 20 (demo.yaml = segstop since session 19): the loss where the picture changes weighs more
  [cw3]="diffusion.change_weight=3.0"
  [cw10]="diffusion.change_weight=10.0"
  [cw3_seed1]="diffusion.change_weight=3.0 train.seed=1"
)
declare -A ACTION=(
  [act_base]=""
  [act_res]="diffusion.target=residual"
)
declare -A PED2=(
  [base]=""
  [res]="diffusion.target=residual"
  [res_g0]="diffusion.target=residual diffusion.snr_gamma=0.0"
  [g0]="diffusion.snr_gamma=0.0"
  [res_s4]="diffusion.target=residual diffusion.residual_scale=4.0 sampler.clip_bound=32.0"
  [res_s4_g0]="diffusion.target=residual diffusion.residual_scale=4.0 sampler.clip_bound=32.0 diffusion.snr_gamma=0.0"
  [anch]="diffusion.motion_anchor=true"   # session 18: the demo's anchors on a real, still camera
  [anch_seg]="diffusion.motion_anchor=true diffusion.anchor_motion=segment"
  [anch_segstop]="diffusion.motion_anchor=true diffusion.anchor_motion=segment diffusion.anchor_edge=stop"
)
declare -A CAR=(
  [base]=""
  [res]="diffusion.target=residual"
)

picked() { [ -z "${STUDY_VARIANTS:-}" ] || [[ " $STUDY_VARIANTS " == *" $1 "* ]]; }
overrides() { tr ' ' '\n' <<< "$2" | grep "^$1" | tr '\n' ' '; }  # prefix "key=value ...": those of the prefix

world() {  # config [overrides...]: generate its synthetic world once, before runs that share it start side by side
  $PY -c "import sys; from configs.loader import load_config; from data.synthetic import ensure_synthetic; ensure_synthetic(load_config(sys.argv[1], sys.argv[2:]).data)" "$@"
}

train() {  # name config overrides... : one training run in the background, its log in $OUT (own latent cache:
           # runs that start together would otherwise build the same cache at the same time)
  local name=$1 config=$2; shift 2
  timeout "$TO" $PY train_video_pred.py --config "$config" --set logging.name="$name" logging.wandb.mode=disabled \
    eval.visualize_every=0 cache.dir="data_cache/latents_$name" "$@" ${STUDY_SET:-} > "$OUT/train_$name.log" 2>&1 &
}

evaluate() {  # name [extra quality_eval args]
  local name=$1; shift
  $PY bench/quality_eval.py --run "runs/$name" --label "$name" --out "$OUT/study.jsonl" "$@" \
    > "$OUT/eval_$name.log" 2>&1 || echo "eval of $name failed (see eval_$name.log)"
  cp "runs/$name"/samples/step_*.png "$OUT/grid_$name.png" 2>/dev/null
}

for phase in $1; do
  case $phase in
  vae)  # the two camera VAEs (README's Ped2 command), saved in fp16 too for carrying to the next call
    picked vae_ped2 && timeout "$TO" $PY tools/train_vae.py --data-root "$DATA/ped2" --height 128 --width 192 \
      --block-out-channels 64 128 128 --no-mid-attention --steps "${STUDY_VAE_STEPS:-4000}" --batch-size 16 --lr 1e-3 --rec-loss l2 \
      --fp16 --out runs/vae_ucsd_ped2 > "$OUT/vae_ped2.log" 2>&1 &
    picked vae_car && timeout "$TO" $PY tools/train_vae.py --data-root "$DATA/car" --height 144 --width 256 \
      --val-fraction 0.2 --split-seed 3 --block-out-channels 64 128 128 --no-mid-attention --steps "${STUDY_VAE_STEPS:-4000}" --batch-size 16 --lr 1e-3 \
      --rec-loss l2 --fp16 --out runs/vae_car > "$OUT/vae_car.log" 2>&1 &
    ;;
  demo)  # fp32 as on the CPU the demo is made for
    world configs/demo.yaml; world configs/demo_action.yaml
    for v in "${!DEMO[@]}"; do  # variants with their own world (data.root and the world's keys)
      picked "$v" || continue
      w=$(overrides 'data\.' "${DEMO[$v]}")
      [ -n "$w" ] && world configs/demo.yaml $w
    done
    for v in "${!DEMO[@]}"; do picked "$v" && train "demo_$v" configs/demo.yaml "train.mixed_precision='no'" ${DEMO[$v]}; done
    for v in "${!ACTION[@]}"; do picked "$v" && train "demo_$v" configs/demo_action.yaml "train.mixed_precision='no'" ${ACTION[$v]}; done
    ;;
  ped2)
    for v in "${!PED2[@]}"; do picked "$v" && train "ped2_$v" configs/ucsd_ped2.yaml data.root="$DATA/ped2" ${PED2[$v]}; done
    ;;
  car)
    for v in "${!CAR[@]}"; do picked "$v" && train "car_$v" configs/car_detection.yaml data.root="$DATA/car" ${CAR[$v]}; done
    ;;
  esac
done
wait

for phase in $1; do
  case $phase in
  vae)
    for v in vae_ucsd_ped2 vae_car; do
      [ -d "runs/$v" ] || continue
      $PY -c "import sys; from diffusers import AutoencoderKL; import torch; m = AutoencoderKL.from_pretrained(sys.argv[1]); m.to(torch.float16).save_pretrained(sys.argv[2])" "runs/$v" "$OUT/${v}_fp16" || true
      tail -3 "$OUT/vae_${v#vae_}.log" 2>/dev/null
    done
    ;;
  demo)
    for v in "${!DEMO[@]}"; do  # side by side, as the training ran
      picked "$v" || continue
      (evaluate "demo_$v" --decode off masked copy warp segment --threshold 0.05 0.8 1.5
       $PY tools/bounce_check.py --run "runs/demo_$v" --out "$OUT/bounce_demo_$v" > "$OUT/bounce_demo_$v.log" 2>&1
       # every variant to t+4 on the trainer's 32 windows (a t_future 2 model in 2 rounds), and its shapes
       tf=$(overrides 'data\.t_future=' "data.t_future=4 ${DEMO[$v]}"); tf=${tf% }; r=$((4 / ${tf##*=}))
       $PY tools/evaluate.py --run "runs/demo_$v" --rollout $r --windows 32 --weights ema --device cuda \
         --out "$OUT/evaluate_demo_$v" > "$OUT/evaluate_demo_$v.log" 2>&1
       $PY tools/shape_check.py --run "runs/demo_$v" --rollout $r --out "$OUT/shape_demo_$v" > "$OUT/shape_demo_$v.log" 2>&1
       $PY tools/shape_check.py --run "runs/demo_$v" --rollout $r --out "$OUT/shape_warp_demo_$v" \
         --set sampler.residual_decode=warp sampler.residual_decode_threshold=1.5 > "$OUT/shape_warp_demo_$v.log" 2>&1
       $PY tools/shape_check.py --run "runs/demo_$v" --rollout $r --out "$OUT/shape_seg_demo_$v" \
         --set sampler.residual_decode=segment > "$OUT/shape_seg_demo_$v.log" 2>&1) &
    done
    wait
    for v in "${!ACTION[@]}"; do
      picked "$v" || continue
      evaluate "demo_$v"
      $PY tools/action_ablation.py --run "runs/demo_$v" --out "$OUT/ablation_demo_$v" > "$OUT/ablation_demo_$v.log" 2>&1
    done
    ;;
  ped2) for v in "${!PED2[@]}"; do picked "$v" && evaluate "ped2_$v" --decode off masked copy warp --threshold 0.3 0.5 1.0 ${STUDY_EVAL:-} & done; wait ;;
  car) for v in "${!CAR[@]}"; do picked "$v" && evaluate "car_$v" --decode off masked copy warp --threshold 0.2 0.3 1.0 ${STUDY_EVAL:-} & done; wait ;;
  esac
done
echo "study done: $OUT/study.jsonl"
if [ -n "${STUDY_PACK:-}" ]; then
  tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && rm -rf "$OUT" && echo "packed: $OUT.tgz"
fi
