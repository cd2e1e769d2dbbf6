"""The one typed config schema. YAML files supply values; this file owns defaults, units, choices and checks.

Each field's comment says what it does, its unit, and how to turn it off. `Config.validate()` returns every
problem at once, each naming its dotted key path; the loader (`configs/loader.py`) raises them together.
Style after torchtitan's `config/` and litgpt's `args.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's


# keys that moved when issue 17 split `train` into one section per concern and gathered the speed switches: old
# dotted key -> new one (the loader names the new place; checkpoints that store the old layout still load,
# model/loading.py)
MOVED_KEYS = {
    "train.lr": "optim.lr", "train.weight_decay": "optim.weight_decay", "train.adam_betas": "optim.adam_betas",
    "train.lr_schedule": "optim.lr_schedule", "train.warmup_steps": "optim.warmup_steps",
    "train.min_lr_ratio": "optim.min_lr_ratio", "train.grad_clip": "optim.grad_clip", "train.ema_decay": "ema.decay",
    "train.ema_warmup_power": "ema.warmup_power", "train.visualize_every": "eval.visualize_every",
    "train.vis_clips": "eval.vis_clips", "train.eval_every": "eval.every", "train.eval_clips": "eval.clips",
    "train.eval_steps": "eval.steps", "train.eval_samples": "eval.samples", "train.save_every": "checkpoint.every",
    "train.keep_last": "checkpoint.keep_last", "train.latent_cache": "cache.enabled", "train.cache_std": "cache.std",
    "train.cache_dir": "cache.dir", "train.compile": "speed.compile", "train.compile_mode": "speed.compile_mode",
    "train.channels_last": "speed.channels_last", "train.cudnn_benchmark": "speed.cudnn_benchmark",
    "train.ddp_bucket_mb": "ddp.bucket_mb", "train.ddp_grad_dtype": "ddp.grad_dtype",
    "train.ddp_bucket_view": "ddp.bucket_view", "train.dist_timeout_s": "ddp.timeout_s",
    "train.profile_at": "profile.at", "train.profile_steps": "profile.steps",
    # issue 17 (8): every speed switch in the speed section
    "vae.channels_last": "speed.vae_channels_last", "vae.compile": "speed.vae_compile",
    "vae.compile_mode": "speed.vae_compile_mode", "vae.fuse_upsample": "speed.vae_fuse_upsample",
    "unet.fuse_upsample": "speed.fuse_upsample", "unet.nhwc_shortcuts": "speed.nhwc_shortcuts",
    "unet.nhwc_group_norm": "speed.nhwc_group_norm", "sampler.compile": "speed.sampler_compile",
}


def _choice(problems: list[str], path: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{path}: {value!r} is not one of {list(choices)}")


def _at_least(problems: list[str], path: str, value, low, strict: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):  # `.nan` passes every `<` test; `.inf` is no setting
        problems.append(f"{path}: {value!r} must be a finite number")
    elif (value <= low) if strict else (value < low):
        problems.append(f"{path}: {value!r} must be {'>' if strict else '>='} {low}")


def _in_unit(problems: list[str], path: str, value, closed_high: bool = True) -> None:
    if value is None:
        return
    if not (0.0 <= value <= 1.0) or (not closed_high and value == 1.0):
        problems.append(f"{path}: {value!r} must be in [0, 1{']' if closed_high else ')'}")


@dataclass
class SyntheticConfig:
    """A deterministic synthetic world written to `data.root` on first use (then read like any frame folder)."""

    enabled: bool = False  # generate the world into data.root when the folder is absent; false = read real frames
    num_clips: int = 24  # clips written (the val split takes data.val_fraction of them)
    frames_per_clip: int = 32  # frames per clip
    height: int = 64  # pixels of the written frames (data.height/width may resize them further)
    width: int = 64  # pixels
    num_objects: int = 3  # coloured objects per clip, moving at constant velocity and bouncing off the walls
    speed: float = 2.0  # object speed, pixels per frame (max); 0 = static objects
    action_pan: bool = False  # camera pans by a per-frame action in [-1, 1] written to sidecars as "action"
    pan_speed: float = 3.0  # background pan, pixels per frame at action = 1
    # the background texture's amplitude, x the default low contrast: the higher, the more PSNR a wrong pan costs,
    # i.e. the more the actions can matter
    background_contrast: float = 1.0
    seed: int = 0  # the world is a pure function of this seed
    # anomalous events per clip: in each, one object breaks the world's law for anomaly_frames frames (stop: stands
    # still; jump: teleports along its track every frame; reverse: moves backwards; speedup: 3x speed), then moves on;
    # the labels go to <root>/anomalies.json (data/synthetic.py). 0 = off: a normal world
    anomalies: int = 0
    anomaly_kinds: list[str] = field(default_factory=lambda: ["stop", "jump", "reverse", "speedup"])
    anomaly_frames: int = 3  # frames of abnormal motion per event (the frame where it ends is labelled too)

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.anomalies", self.anomalies, 0)
        _at_least(p, f"{path}.anomaly_frames", self.anomaly_frames, 1)
        bad = [k for k in self.anomaly_kinds if k not in ("stop", "jump", "reverse", "speedup")]
        if bad or not self.anomaly_kinds:
            p.append(f"{path}.anomaly_kinds: {self.anomaly_kinds} must be a non-empty list of stop, jump, reverse, speedup")
        if self.anomalies and (self.frames_per_clip - self.frames_per_clip // 4) // self.anomalies < self.anomaly_frames + 2:
            p.append(f"{path}.anomalies: {self.anomalies} events of {self.anomaly_frames} frames do not fit in the last "
                     f"three quarters of {self.frames_per_clip} frames")
        _at_least(p, f"{path}.num_clips", self.num_clips, 2)
        _at_least(p, f"{path}.frames_per_clip", self.frames_per_clip, 2)
        _at_least(p, f"{path}.height", self.height, 8)
        _at_least(p, f"{path}.width", self.width, 8)
        _at_least(p, f"{path}.num_objects", self.num_objects, 0)
        _at_least(p, f"{path}.speed", self.speed, 0.0)
        _at_least(p, f"{path}.pan_speed", self.pan_speed, 0.0)
        _at_least(p, f"{path}.background_contrast", self.background_contrast, 0.0)
        _at_least(p, f"{path}.seed", self.seed, 0)  # numpy's generators refuse negative seeds


@dataclass
class DataConfig:
    """Where clips come from and how they are cut into windows of past + future frames."""

    root: str = "data_cache/synthetic"  # folder of clips: root/<clip>/<frames>, or video files root/<clip>.mp4
    frame_glob: str = "*"  # frames inside a clip folder, e.g. "camera/rgb_front/*.jpg"; "*" = all images directly inside
    height: int = 256  # frame height fed to the VAE, pixels (multiple of 8)
    width: int = 448  # frame width, pixels (multiple of 8)
    resize_mode: str = "crop"  # crop: resize to cover then centre-crop (keeps aspect); stretch: resize to exactly H x W
    t_past: int = 4  # context frames given to the model
    t_future: int = 4  # frames predicted jointly
    frame_interval: int = 1  # take every k-th frame of a clip; 1 = consecutive frames
    window_stride: int = 1  # windows start every s frames (in sampled frames); 1 = every frame
    val_fraction: float = 0.1  # fraction of clips (never windows) held out for validation; 0 = no val split
    split_seed: int = 0  # the clip split is a pure function of this seed and the clip names
    # dotted keys read from per-frame JSON sidecars of the FUTURE frames (the actions/ego state that lead to each
    # predicted frame); the conditioning vector is their values, frame-major: len(cond_keys) * t_future. [] = none
    cond_keys: list[str] = field(default_factory=list)
    sidecar_dir: str = ""  # sidecar folder relative to the clip folder; "" = beside each frame (<frame>.json or .json.gz)
    bad_data: str = "error"  # error: stop at the first scan with every bad path listed; skip: drop bad clips/frames (decided before training)
    max_bad_fraction: float = 0.05  # with bad_data=skip, abort if more than this fraction of frames is bad
    # frames of other image modes: off = bad data (only RGB/L/P read); composite = RGBA/LA/PA over black, 16-bit
    # grey scaled to 8 bit, CMYK/YCbCr converted by PIL; drop_alpha = the same but alpha ignored (data/pixels.to_rgb)
    convert_modes: str = "off"
    num_workers: int = 2  # DataLoader worker processes; 0 = load in the main process
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    @property
    def window_frames(self) -> int:
        return self.t_past + self.t_future

    def validate(self, p: list[str], path: str) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v % 8:
                p.append(f"{path}.{name}: {v} must be a multiple of 8 (VAE downsampling)")
            _at_least(p, f"{path}.{name}", v, 8)
        _choice(p, f"{path}.resize_mode", self.resize_mode, ("crop", "stretch"))
        _at_least(p, f"{path}.t_past", self.t_past, 1)
        _at_least(p, f"{path}.t_future", self.t_future, 1)
        _at_least(p, f"{path}.frame_interval", self.frame_interval, 1)
        _at_least(p, f"{path}.window_stride", self.window_stride, 1)
        _in_unit(p, f"{path}.val_fraction", self.val_fraction, closed_high=False)
        _choice(p, f"{path}.bad_data", self.bad_data, ("error", "skip"))
        _in_unit(p, f"{path}.max_bad_fraction", self.max_bad_fraction)
        _choice(p, f"{path}.convert_modes", self.convert_modes, ("off", "composite", "drop_alpha"))
        _at_least(p, f"{path}.num_workers", self.num_workers, 0)
        _at_least(p, f"{path}.split_seed", self.split_seed, 0)
        if self.synthetic.action_pan and self.synthetic.enabled and self.cond_keys not in ([], ["action"]):
            p.append(f"{path}.cond_keys: the synthetic world writes only 'action'; got {self.cond_keys}")
        self.synthetic.validate(p, f"{path}.synthetic")


@dataclass
class VAEConfig:
    """The frozen, pretrained VAE. Its scaling/shift factors come from its own config, never from here."""

    pretrained: str = "stabilityai/sd-vae-ft-mse"  # local folder or hub id (diffusers format)
    subfolder: str = ""  # e.g. "vae" inside a full pipeline folder; "" = none
    latent: str = "mean"  # mean: posterior mean (deterministic); sample: posterior sample
    dtype: str = "fp32"  # fp32 | bf16 | fp16: precision of the VAE's weights and compute
    # frames per encoder/decoder call (bounds memory); must be >= 1. On a CPU small chunks are also faster: the
    # bundled VAE at 64x64 on a 2-core CPU encodes 1.4x and decodes 1.6x the frames/s at 8 as at 64 (the activations
    # stay in the caches; bench/bench_vae_chunk.py, BENCHMARKS.md session 21), so the CPU configs use 8
    chunk_size: int = 32

    def validate(self, p: list[str], path: str) -> None:
        if not self.pretrained:
            p.append(f"{path}.pretrained: must name a folder or hub id")
        _choice(p, f"{path}.latent", self.latent, ("mean", "sample"))
        _choice(p, f"{path}.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        _at_least(p, f"{path}.chunk_size", self.chunk_size, 1)


@dataclass
class UNetConfig:
    """The denoiser: a diffusers UNet2DModel on [noisy future latents | clean past latents] stacked on channels."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 384, 512])  # channels per resolution level
    attention: list[bool] = field(default_factory=lambda: [False, False, True, True])  # self-attention at each level
    layers_per_block: int = 2  # ResNet blocks per level
    attention_head_dim: int = 32  # channels per attention head
    norm_num_groups: int = 32  # GroupNorm groups; must divide every block_out_channels entry
    dropout: float = 0.0  # dropout in ResNet blocks; 0 = off
    gradient_checkpointing: bool = False  # trade compute for memory

    def validate(self, p: list[str], path: str) -> None:
        if not self.block_out_channels:
            p.append(f"{path}.block_out_channels: must not be empty")
        if len(self.attention) != len(self.block_out_channels):
            p.append(f"{path}.attention: needs one entry per block_out_channels level "
                     f"({len(self.block_out_channels)}), got {len(self.attention)}")
        for i, c in enumerate(self.block_out_channels):
            _at_least(p, f"{path}.block_out_channels[{i}]", c, 1)
        _at_least(p, f"{path}.norm_num_groups", self.norm_num_groups, 1)
        _at_least(p, f"{path}.attention_head_dim", self.attention_head_dim, 1)
        for c in self.block_out_channels:
            if self.norm_num_groups >= 1 and c % self.norm_num_groups:  # (a size below 1 is reported above)
                p.append(f"{path}.norm_num_groups: {self.norm_num_groups} does not divide block_out_channels entry {c}")
            if self.attention_head_dim >= 1 and c % self.attention_head_dim:
                p.append(f"{path}.attention_head_dim: {self.attention_head_dim} does not divide block_out_channels entry {c}")
        _at_least(p, f"{path}.layers_per_block", self.layers_per_block, 1)
        _in_unit(p, f"{path}.dropout", self.dropout, closed_high=False)


@dataclass
class DiffusionConfig:
    """The one noise schedule used by both training and sampling."""

    num_train_timesteps: int = 1000  # T: discrete timesteps 0 .. T-1
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2 (as in diffusers)
    beta_start: float = 0.0001  # beta_1 (linear and scaled_linear only)
    beta_end: float = 0.02  # beta_T (linear and scaled_linear only)
    prediction_type: str = "epsilon"  # epsilon | v_prediction: the UNet's training target
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0; 0 = off (plain MSE)
    past_dropout: float = 0.0  # probability of zeroing the past latents in training (for guidance); 0 = off
    cond_dropout: float = 0.0  # probability of zeroing the conditioning vector in training; 0 = off
    # what is diffused: absolute = the future latents; residual = (future latents - last past latent) * residual_scale,
    # so "nothing moves" is x0 = 0 and costs nothing to learn (after RVD, Yang et al. 2022); anchor = (future latents -
    # motion anchors) * residual_scale, so "everything moves on as it did" is x0 = 0 (needs motion_anchor). The
    # sampler and its clip bound work in this space; predictions leave the model as absolute latents either way
    target: str = "absolute"
    residual_scale: float = 1.0  # residual and anchor targets: multiplies the residual before noising; 1 = unscaled
    # rescale the betas to zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules are flawed", alg. 1,
    # diffusers' rescale_betas_zero_snr): t = T-1 is pure noise, as trailing spacing assumes; needs v_prediction
    zero_terminal_snr: bool = False
    # which training timesteps are drawn: uniform over 0 .. T-1, or logit_normal: t / T = sigmoid(logit(median) +
    # s * N(0, 1)) (Esser et al. 2024, SD3), more draws near t / T = median; per t the loss and its minimiser are unchanged
    timestep_sampling: str = "uniform"
    timestep_median: float = 0.5  # logit_normal only, in (0, 1); 0.25 = t 250, where linear betas' SNR is ~1
    timestep_logit_std: float = 1.0  # s (logit_normal only), > 0: the spread in logit units
    # motion anchors (model/motion.py extrapolate): the UNet also sees, for each future frame, the latents of the last
    # past frame moved on at the velocity each pixel had over the last anchor_gap past frames (matching of the decoded
    # past latents, anchor_radius px per axis over that gap): an object's look, carried to where it would be without
    # bounces or collisions, for the net to take or correct
    motion_anchor: bool = False
    anchor_gap: int = 3  # past frames the velocity is measured over (< data.t_past); longer = finer than 1 px/frame
    anchor_radius: int = 6  # largest displacement searched over the gap, pixels per axis
    # whose velocity: pixel = each pixel's own (block matching over anchor_window px boxes; textured scenes);
    # segment = one per colour region (neighbours closer than anchor_segment_tol, max over RGB in [-1, 1]): flat
    # objects move whole, keep their shape and leave no smear (the demo's world; QUALITY.md, session 18)
    anchor_motion: str = "pixel"
    anchor_window: int = 9  # pixel motion: side of the matching box (odd, pixels)
    anchor_segment_tol: float = 0.15  # segment motion: largest colour step inside one region
    # what an object carried over the picture's edge does: exit = leaves, cut off; stop = an object wholly inside
    # the last frame stops where it touches the edge, whole (segment motion only; QUALITY.md, session 19)
    anchor_edge: str = "exit"
    # the loss where the picture changes: latent pixels where the future frame differs from the last past one by more
    # than change_threshold (max over channels, scaled-latent units: where things arrive and what they leave) weigh
    # 1 + change_weight against 1 for the rest (normalised per window, so the loss keeps its scale); 0 = plain MSE.
    # Puts a small net's effort on what moves rather than on the still background
    change_weight: float = 0.0
    change_threshold: float = 0.5

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.num_train_timesteps", self.num_train_timesteps, 2)
        _choice(p, f"{path}.timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
        _at_least(p, f"{path}.timestep_logit_std", self.timestep_logit_std, 0.0, strict=True)
        if not 0 < self.timestep_median < 1:  # written so that NaN fails too
            p.append(f"{path}.timestep_median: {self.timestep_median} must be in (0, 1)")
        _choice(p, f"{path}.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        _choice(p, f"{path}.prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        _at_least(p, f"{path}.beta_start", self.beta_start, 0.0, strict=True)
        if not self.beta_start < self.beta_end < 1:  # written so that NaN fails too
            p.append(f"{path}.beta_end: {self.beta_end} must be in (beta_start, 1)")
        _at_least(p, f"{path}.snr_gamma", self.snr_gamma, 0.0)
        _in_unit(p, f"{path}.past_dropout", self.past_dropout, closed_high=False)
        _in_unit(p, f"{path}.cond_dropout", self.cond_dropout, closed_high=False)
        _choice(p, f"{path}.target", self.target, ("absolute", "residual", "anchor"))
        if self.target == "anchor" and not self.motion_anchor:
            p.append(f"{path}.target: anchor needs {path}.motion_anchor: true (the net must see what it corrects)")
        _at_least(p, f"{path}.residual_scale", self.residual_scale, 0.0, strict=True)
        _at_least(p, f"{path}.anchor_gap", self.anchor_gap, 1)
        _at_least(p, f"{path}.anchor_radius", self.anchor_radius, 0)
        _at_least(p, f"{path}.anchor_window", self.anchor_window, 1)
        if self.anchor_window % 2 == 0:
            p.append(f"{path}.anchor_window: {self.anchor_window} must be odd (a box centred on the pixel)")
        _choice(p, f"{path}.anchor_motion", self.anchor_motion, ("pixel", "segment"))
        if not 0 < self.anchor_segment_tol < 2:  # written so that NaN fails too
            p.append(f"{path}.anchor_segment_tol: {self.anchor_segment_tol} must be in (0, 2) (a colour step in [-1, 1])")
        _choice(p, f"{path}.anchor_edge", self.anchor_edge, ("exit", "stop"))
        _at_least(p, f"{path}.change_weight", self.change_weight, 0.0)
        _at_least(p, f"{path}.change_threshold", self.change_threshold, 0.0, strict=True)
        if self.anchor_edge == "stop" and self.anchor_motion != "segment":
            p.append(f"{path}.anchor_edge: stop needs {path}.anchor_motion: segment (objects are its colour regions)")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            p.append(f"{path}.zero_terminal_snr: needs prediction_type v_prediction (epsilon cannot give x0 at "
                     "alpha_bar_T = 0)")


@dataclass
class SamplerConfig:
    """DDIM sampling (Song et al. 2021) with x0 clipping in scaled-latent units."""

    num_inference_steps: int = 20  # DDIM steps; any 1 .. T
    eta: float = 0.0  # DDIM stochasticity: 0 = deterministic DDIM, 1 = DDPM-like
    timestep_spacing: str = "trailing"  # trailing: first step at t = T-1 (Lin et al. 2024); leading | linspace as in diffusers
    clip_x0: str = "static"  # none | static (|x0| <= clip_bound) | dynamic (Imagen percentile thresholding)
    clip_bound: float = 4.0  # static bound / floor of the dynamic bound, scaled-latent units; set above the data's range
    clip_percentile: float = 0.995  # dynamic: per-sample quantile of |x0| used as the bound
    guidance_past: float = 1.0  # classifier-free guidance scale on the past frames; 1 = off (needs diffusion.past_dropout > 0)
    guidance_cond: float = 1.0  # guidance scale on the conditioning vector; 1 = off (needs diffusion.cond_dropout > 0)
    # residual decoding: add the last past frame's VAE reconstruction error back to the decoded prediction,
    # x = D(z) + m * (x_last - D(z_last)), so a still camera's background is not limited by the VAE (copy_last_vae).
    # off = D(z); full: m = 1; masked: m = 1 where the prediction did not change from D(z_last), falling linearly to 0
    # at a change of residual_decode_threshold; copy: x = D(z) + m * (x_last - D(z)), the last frame itself where the
    # prediction did not change (a change below the threshold is shrunk towards zero, taken for sampling noise);
    # warp: copy with motion, x = D(z) + m * (x_last(p + d) - D(z)), d found by block matching D(z) against
    # D(z_last) within warp_radius, m falling to 0 where the best match still differs by the threshold (model/motion.py);
    # segment: copy with whole objects, each colour region of D(z_last) (diffusion.anchor_segment_tol) pasted from
    # x_last where the prediction drew it (one shift within warp_radius per region), m = 1 - its mean matching cost /
    # segment_threshold, over copy decoding at the threshold (model/motion.py segment_copy)
    residual_decode: str = "off"
    residual_decode_threshold: float = 0.1  # masked, copy: pixel change (units of [-1, 1], per pixel, max over RGB) where m = 0; warp: that change averaged over the window
    warp_radius: int = 8  # warp, segment: largest motion searched, pixels per axis, from the last past frame to any future one
    segment_threshold: float = 3.0  # segment: a region's mean matching cost where its pasted copy's weight reaches 0
    warp_window: int = 9  # warp: side of the box (odd, pixels) over which a match is scored; larger = smoother motion

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.num_inference_steps", self.num_inference_steps, 1)
        _choice(p, f"{path}.residual_decode", self.residual_decode, ("off", "masked", "full", "copy", "warp", "segment"))
        _at_least(p, f"{path}.residual_decode_threshold", self.residual_decode_threshold, 0.0, strict=True)
        _at_least(p, f"{path}.warp_radius", self.warp_radius, 0)
        _at_least(p, f"{path}.segment_threshold", self.segment_threshold, 0.0, strict=True)
        _at_least(p, f"{path}.warp_window", self.warp_window, 1)
        if self.warp_window % 2 == 0:
            p.append(f"{path}.warp_window: {self.warp_window} must be odd (a box centred on the pixel)")
        _in_unit(p, f"{path}.eta", self.eta)
        _choice(p, f"{path}.timestep_spacing", self.timestep_spacing, ("trailing", "leading", "linspace"))
        _choice(p, f"{path}.clip_x0", self.clip_x0, ("none", "static", "dynamic"))
        _at_least(p, f"{path}.clip_bound", self.clip_bound, 0.0, strict=True)
        if not 0.5 <= self.clip_percentile <= 1.0:
            p.append(f"{path}.clip_percentile: {self.clip_percentile} must be in [0.5, 1]")
        _at_least(p, f"{path}.guidance_past", self.guidance_past, 0.0)
        _at_least(p, f"{path}.guidance_cond", self.guidance_cond, 0.0)


@dataclass
class TrainConfig:
    """The loop: batch, length, precision, what a non-finite step does, how often metrics are logged."""

    seed: int = 0  # global seed; each rank derives its own from it
    batch_size: int = 64  # GLOBAL clips per optimizer step, over all ranks and accumulation steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step; 1 = off
    max_steps: int = 100_000  # optimizer steps to train
    mixed_precision: Literal["bf16", "no"] = "bf16"  # bf16: autocast the UNet on GPU (ignored on CPU) | no: fp32
    # a step whose loss or gradient is not finite has its update masked (weights and AdamW moments unchanged; it
    # keeps its number, LR and EMA advance); then halt: stop | skip: go on. Read one step late
    nonfinite: Literal["halt", "skip"] = "halt"
    max_nonfinite_skips: int = 10  # with nonfinite=skip, give up after this many skipped steps in a row
    log_every: int = 10  # write metrics.jsonl / wandb scalars, optimizer steps; 0 = off

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.seed", self.seed, 0)
        _at_least(p, f"{path}.batch_size", self.batch_size, 1)
        _at_least(p, f"{path}.grad_accum_steps", self.grad_accum_steps, 1)
        _at_least(p, f"{path}.max_steps", self.max_steps, 1)
        _at_least(p, f"{path}.max_nonfinite_skips", self.max_nonfinite_skips, 1)
        _at_least(p, f"{path}.log_every", self.log_every, 0)
        if self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps:
            p.append(f"{path}.batch_size: {self.batch_size} is not divisible by "
                     f"train.grad_accum_steps={self.grad_accum_steps}")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay; 0 = off
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine: to min_lr_ratio * lr at train.max_steps
    warmup_steps: int = 1000  # linear LR warm-up from 0, optimizer steps; 0 = off
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.lr", self.lr, 0.0, strict=True)
        _at_least(p, f"{path}.weight_decay", self.weight_decay, 0.0)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            p.append(f"{path}.adam_betas: {self.adam_betas} must be two numbers in [0, 1)")
        _at_least(p, f"{path}.warmup_steps", self.warmup_steps, 0)
        _in_unit(p, f"{path}.min_lr_ratio", self.min_lr_ratio)
        _at_least(p, f"{path}.grad_clip", self.grad_clip, 0.0)


@dataclass
class EMAConfig:
    """Exponential moving average of the UNet's weights (diffusers EMAModel), updated after every optimizer step."""

    decay: float = 0.9999  # final EMA decay; 0 = no EMA
    warmup_power: float = 0.75  # decay warms up as 1 - (1 + step)^-power; 0 = no warm-up (not advised)

    def validate(self, p: list[str], path: str) -> None:
        _in_unit(p, f"{path}.decay", self.decay, closed_high=False)
        _at_least(p, f"{path}.warmup_power", self.warmup_power, 0.0)


@dataclass
class EvalConfig:
    """The loop's pictures and evaluation on the val split, in optimizer steps."""

    visualize_every: int = 500  # sample grids + GIFs of fixed val clips; 0 = off
    vis_clips: int = 4  # val clips in each sample grid
    every: int = 1000  # PSNR/SSIM evaluation on the val split; 0 = off (a final evaluation still runs)
    clips: int = 64  # val clips in each evaluation (0 = all)
    steps: int = 0  # DDIM steps in evaluation; 0 = sampler.num_inference_steps
    # samples per val window in evaluation: K > 1 adds rows for the mean over samples, the best of K per window and
    # the metric of the K-sample average (training/evaluation.py); the one-sample row stays the headline. 1 = off
    samples: int = 1

    def validate(self, p: list[str], path: str) -> None:
        for name in ("visualize_every", "vis_clips", "every", "clips", "steps"):
            _at_least(p, f"{path}.{name}", getattr(self, name), 0)
        _at_least(p, f"{path}.samples", self.samples, 1)


@dataclass
class CheckpointConfig:
    """Checkpoints of the whole training state (run_dir/name/checkpoints/)."""

    every: int = 1000  # optimizer steps between checkpoints; 0 = only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 3  # checkpoints kept (>= 2); the one resumed from is never deleted

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.every", self.every, 0)
        _at_least(p, f"{path}.keep_last", self.keep_last, 2)


@dataclass
class CacheConfig:
    """The latent cache: every frame encoded once by the frozen VAE, training reads the latents."""

    enabled: bool = True  # train on cached latents; false = run the VAE encoder on every batch
    std: bool = True  # cache the posterior std too, so vae.latent=sample still works from the cache
    dir: str = "data_cache/latents"  # cache folder (keyed by VAE, resolution and data fingerprint)

    def validate(self, p: list[str], path: str) -> None:
        if not self.dir:
            p.append(f"{path}.dir: must name a folder")


@dataclass
class SpeedConfig:
    """Every speed switch, one place: they change how the VAE, the UNet and the sampler compute, never what (the
    same function; BENCHMARKS.md has the measurements). Plain keys are the UNet's, vae_* the frozen VAE's. Each is
    ignored on CPU except the two fuse_upsample switches. Three rewrite diffusers modules (nhwc_shortcuts,
    fuse_upsample, vae_fuse_upsample): they were written against diffusers [0.35, 0.43); under another version, or
    when the code they rely on changed, they are skipped with a warning (model/performance.diffusers_mismatches)."""

    compile: bool = False  # torch.compile the UNet's training step (the first steps compile); false = eager
    # torch.compile mode of speed.compile and speed.sampler_compile; reduce-overhead = CUDA graphs; the autotuning
    # modes compile for minutes. speed.vae_compile has its own speed.vae_compile_mode
    compile_mode: CompileMode = "default"
    sampler_compile: bool = False  # torch.compile the denoiser for sampling (mode speed.compile_mode); false = eager
    channels_last: bool = False  # UNet in NHWC memory format, for speed.compile (slower eager); false = NCHW
    cudnn_benchmark: bool = False  # cuDNN times its conv algorithms per new input shape; false = its heuristics
    # with speed.channels_last: the ResNet shortcut convs keep NHWC in training (diffusers makes their input NCHW,
    # layout copies of the largest activations each step); false = diffusers' forward
    nhwc_shortcuts: bool = True
    # with speed.channels_last and speed.compile: GroupNorm as var-mean and elementwise ops, which keep NHWC through
    # the compiled graph (ATen's group_norm outputs NCHW, and every conv backward then copies); faster and larger in
    # memory; eager nets and sampling keep ATen's, where it was slower. false = ATen's group_norm
    nhwc_group_norm: bool = True
    # UNet up blocks, any device: nearest-2x upsample + 3x3 conv as four 2x2 convs of the low-resolution input
    # (sub-pixel), 8% fewer UNet FLOPs at the reference size; false = diffusers' forward
    fuse_upsample: bool = False
    # VAE decoder, any device: the same sub-pixel upsampling, 2.25x fewer FLOPs in those convs (equal to 1e-5 in
    # fp32); false = diffusers' forward
    vae_fuse_upsample: bool = True
    vae_channels_last: bool = False  # VAE weights and activations in NHWC, for speed.vae_compile (eager: slower)
    vae_compile: bool = False  # torch.compile the VAE encoder and decoder (mode speed.vae_compile_mode); false = eager
    # torch.compile mode of speed.vae_compile, its own (CUDA graphs made the encoder slower)
    vae_compile_mode: CompileMode = "default"

    def validate(self, p: list[str], path: str) -> None:
        pass


@dataclass
class DDPConfig:
    """Several processes (torchrun): the process group and DistributedDataParallel's gradient all-reduce."""

    timeout_s: int = 600  # process-group timeout: a stalled rank ends the job after this many seconds
    # gradient bucket size, MiB (DDP's bucket_cap_mb). With speed.compile, dynamo splits the compiled graph at every
    # bucket; one bucket keeps one graph (BENCHMARKS.md). 0 = auto: one bucket when compiled, else DDP's 25 MiB
    bucket_mb: float = 0.0
    grad_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: all-reduce gradients in bf16 (bf16_compress_hook)
    bucket_view: bool = False  # gradient_as_bucket_view: gradients live in the buckets (no copy in and out)

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.timeout_s", self.timeout_s, 10)
        _at_least(p, f"{path}.bucket_mb", self.bucket_mb, 0.0)


@dataclass
class ProfileConfig:
    """torch.profiler over optimizer steps [at, at + steps) on every rank: run_dir/profile/rank{r}.json (GPU
    busy/idle time, time by kernel kind, exposed NCCL time, top kernels) and rank{r}.trace.json.gz (Perfetto)."""

    at: int = 0  # first profiled optimizer step; pick one after compilation and warm-up (e.g. 50); 0 = off
    steps: int = 5  # optimizer steps profiled

    def validate(self, p: list[str], path: str) -> None:
        _at_least(p, f"{path}.at", self.at, 0)
        _at_least(p, f"{path}.steps", self.steps, 1)


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled; rank 0 only; never fatal
    project: str = "video-prediction"  # wandb project
    entity: str = ""  # wandb entity (team/user); "" = your default
    tags: list[str] = field(default_factory=list)  # run tags
    finish_timeout_s: float = 60.0  # seconds to wait for wandb.finish (uploads) at the end, then leave it behind
    # seconds wandb may take to start (in its own thread: training and the other ranks never wait for it); then
    # wandb is off for the run and metrics.jsonl alone is written
    init_timeout_s: float = 60.0

    def validate(self, p: list[str], path: str) -> None:
        _choice(p, f"{path}.mode", self.mode, ("online", "offline", "disabled"))
        _at_least(p, f"{path}.finish_timeout_s", self.finish_timeout_s, 0.0)
        _at_least(p, f"{path}.init_timeout_s", self.init_timeout_s, 0.0)


@dataclass
class LoggingConfig:
    run_dir: str = "runs"  # parent folder of run folders
    name: str = ""  # run folder name under run_dir; "" = a timestamp
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, p: list[str], path: str) -> None:
        if "/" in self.name or self.name in (".", ".."):
            p.append(f"{path}.name: {self.name!r} must be a plain folder name")
        self.wandb.validate(p, f"{path}.wandb")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def cond_dim(self) -> int:
        """Length of the per-window conditioning vector (0 = none): each cond key at each future frame."""
        return len(self.data.cond_keys) * self.data.t_future

    @property
    def context_frames(self) -> int:
        """Latent frames the UNet is conditioned on: the past, plus one motion anchor per future frame
        (diffusion.motion_anchor)."""
        return self.data.t_past + (self.data.t_future if self.diffusion.motion_anchor else 0)

    def validate(self) -> list[str]:
        problems: list[str] = []
        for f in fields(self):
            try:
                getattr(self, f.name).validate(problems, f.name)
            except TypeError:  # a field of the wrong type, reported by the loader; check the other sections
                pass
        if self.sampler.num_inference_steps > self.diffusion.num_train_timesteps:
            problems.append(f"sampler.num_inference_steps: {self.sampler.num_inference_steps} exceeds "
                            f"diffusion.num_train_timesteps={self.diffusion.num_train_timesteps}")
        if self.sampler.guidance_past != 1.0 and self.diffusion.past_dropout == 0.0:
            problems.append("sampler.guidance_past: guidance needs a model trained with diffusion.past_dropout > 0")
        if self.sampler.guidance_cond != 1.0 and self.diffusion.cond_dropout == 0.0:
            problems.append("sampler.guidance_cond: guidance needs a model trained with diffusion.cond_dropout > 0")
        if self.diffusion.motion_anchor and not self.diffusion.anchor_gap < self.data.t_past:
            problems.append(f"diffusion.anchor_gap: {self.diffusion.anchor_gap} must be below data.t_past="
                            f"{self.data.t_past} (the velocity is measured between two past frames)")
        if self.diffusion.cond_dropout > 0 and self.cond_dim == 0:
            problems.append("diffusion.cond_dropout: > 0 but data.cond_keys is empty (no conditioning vector)")
        return problems
