"""The video prediction model: a frozen VAE, a conditional UNet and one noise schedule, composed.

Not an nn.Module on purpose: only `unet` is trained (the trainer wraps it in DDP and tracks it with EMA),
and the frozen VAE never enters checkpoints or DDP. Methods take an optional `net` (the DDP-wrapped UNet or
its EMA copy); it defaults to `self.unet`.

Spaces: frames are pixels in [-1, 1], (B, T, 3, H, W); latents are scaled VAE latents, (B, T, C, h, w).
The diffused variable `x0` is the future latents themselves (diffusion.target = absolute) or their residual from
the last past latent (residual) or from the motion anchors (anchor); `to_x0` / `from_x0` convert, and only they know
which.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from configs.schema import Config
from model import performance
from model.motion import copy_decode, extrapolate, motion_compensated_copy, segment_copy, still_weight
from model.sampler import ddim_sample
from model.schedule import NoiseSchedule
from model.unet import ConditionalUNet
from model.vae import FrozenVAE


class VideoPredictionDiffusion:
    def __init__(self, cfg: Config, vae: FrozenVAE, unet: ConditionalUNet | None = None):
        self.cfg = cfg
        self.vae = vae
        self.schedule = NoiseSchedule(cfg.diffusion)
        self.t_past, self.t_future = cfg.data.t_past, cfg.data.t_future
        self.unet = unet if unet is not None else ConditionalUNet(cfg.unet, vae.latent_channels, cfg.context_frames,
                                                                  self.t_future, cfg.cond_dim)
        if self.unet.latent_channels != vae.latent_channels:
            raise ValueError(f"the UNet expects {self.unet.latent_channels} latent channels but the VAE "
                             f"{vae.name} has {vae.latent_channels}")
        self.unet.check_latent_size(cfg.data.height // vae.downsample, cfg.data.width // vae.downsample)
        if cfg.speed.fuse_upsample:  # sub-pixel up blocks, any device; before the trainer's EMA copy is made
            performance.fuse_upsample_convs(self.unet)
        self.compiled_nets = performance.CompiledNets(cfg.speed.compile_mode)  # for speed.sampler_compile (GPU)

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str = "cpu") -> "VideoPredictionDiffusion":
        """Frozen VAE and UNet on `device`, sped up as the config's speed section says (NHWC, compiled: GPU only)."""
        vae = performance.speed_up_vae(FrozenVAE.from_config(cfg.vae).to(device), cfg.speed)
        model = cls(cfg, vae)
        performance.speed_up_unet(model.unet.to(device), cfg.speed)
        return model

    # ------------------------------------------------------------------ batches -> latents
    def split_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tp+Tf, C, h, w) -> past (B, Tp, ...), future (B, Tf, ...)."""
        assert latents.shape[1] == self.t_past + self.t_future, f"window of {latents.shape[1]} frames"
        return latents[:, :self.t_past], latents[:, self.t_past:]

    def batch_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of a window batch: from the latent cache ("latent_mean"[, "latent_std"]) when present,
        else by encoding "frames" (pixels in [-1, 1]) with the frozen VAE."""
        device = self.vae.device
        if "latent_mean" in batch:  # non_blocking: the DataLoader pins its batches on GPU runs
            std = batch.get("latent_std")
            mean = batch["latent_mean"].to(device, non_blocking=True).float()
            std = None if std is None else std.to(device, non_blocking=True).float()
            return self.vae.latents_from_moments(mean, std, generator=generator)
        return self.vae.encode(batch["frames"].to(device, non_blocking=True), generator=generator)

    # ------------------------------------------------------------------ latents <-> diffused variable
    def _origin(self, past: torch.Tensor, anchors: torch.Tensor | None) -> torch.Tensor:
        """What a residual target is measured from: the last past latent, or (target anchor) the motion anchors
        (computed from `past` unless given)."""
        if self.cfg.diffusion.target == "anchor":
            return self.anchor_latents(past) if anchors is None else anchors
        return past[:, -1:]

    def to_x0(self, future: torch.Tensor, past: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """Future latents (B, Tf, C, h, w) -> the variable the schedule noises and the sampler returns. `anchors`:
        anchor_latents(past) when the caller has them already."""
        d = self.cfg.diffusion
        if d.target == "absolute":
            return future
        return (future - self._origin(past, anchors)) * d.residual_scale

    def from_x0(self, x0: torch.Tensor, past: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of `to_x0`: the sampler's x0 -> future latents (B, Tf, C, h, w)."""
        d = self.cfg.diffusion
        if d.target == "absolute":
            return x0
        return self._origin(past, anchors) + x0 / d.residual_scale

    # ------------------------------------------------------------------ what the UNet is conditioned on
    def context(self, past: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """Past latents (B, Tp, C, h, w) -> the UNet's conditioning frames: the past itself, followed, under
        diffusion.motion_anchor, by the anchor latents of every future frame (B, Tp + Tf, C, h, w); `anchors`:
        anchor_latents(past) when the caller has them already."""
        if not self.cfg.diffusion.motion_anchor:
            return past
        return torch.cat([past, self.anchor_latents(past) if anchors is None else anchors], 1)

    @property
    def anchor_positions(self) -> tuple[int, int]:
        """The past frames (indices into the Tp past) that the motion anchors are measured between."""
        return self.t_past - 1 - self.cfg.diffusion.anchor_gap, self.t_past - 1

    @torch.no_grad()
    def anchor_latents(self, past: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Past latents (B, Tp, C, h, w) -> (B, Tf, C, h, w): the last past frame carried on at each pixel's velocity
        (or its colour region's: diffusion.anchor_motion) over the last anchor_gap past frames (model/motion.py
        extrapolate, on the decoded latents, so training on the latent cache and rolling out on predicted latents see
        the same thing), encoded (posterior mean). `frames`: those two past latents decoded, (B, 2, 3, H, W) at
        anchor_positions, when the caller has them already (LatentWindowDataset.attach_anchors decodes each cached
        frame once for all the windows that share it)."""
        d = self.cfg.diffusion
        if frames is None:
            frames = self.vae.decode(past[:, list(self.anchor_positions)])
        frames = frames.to(past.device, torch.float32)
        with torch.autocast(frames.device.type, enabled=False):  # matching costs in fp32 under a bf16 run too
            ahead = extrapolate(frames[:, 1], frames[:, 0], d.anchor_gap, self.t_future, d.anchor_radius,
                                d.anchor_window, d.anchor_motion, d.anchor_segment_tol, d.anchor_edge)
        return self.vae.encode_moments(ahead)[0].to(past.dtype)

    # ------------------------------------------------------------------ training
    def loss(self, past: torch.Tensor, future: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None, net: torch.nn.Module | None = None,
             anchors: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on latents: weighted MSE between the net's output and the schedule's target. `anchors`
        (diffusion.motion_anchor): anchor_latents(past) computed ahead (the latent cache's), else computed here.

        Randomness (t, noise, condition dropout) comes from `generator`, so a resumed run draws the same."""
        net = self.unet if net is None else net  # not `net or`: a torch.compile wrapper has no truth value
        B, device = future.shape[0], future.device

        def rand(*shape):
            return torch.rand(shape, generator=generator, device=generator.device if generator else "cpu").to(device)

        d = self.cfg.diffusion
        if d.timestep_sampling == "logit_normal":
            z = torch.randn(B, generator=generator, device=generator.device if generator else "cpu").to(device)
            u = torch.sigmoid(math.log(d.timestep_median / (1 - d.timestep_median)) + d.timestep_logit_std * z)
        else:  # uniform: the draw every existing run was trained with
            u = rand(B)
        t = (u * self.schedule.num_train_timesteps).long().clamp_max(self.schedule.num_train_timesteps - 1)
        noise = torch.randn(future.shape, generator=generator,
                            device=generator.device if generator else "cpu").to(device)
        if d.motion_anchor and anchors is None:
            anchors = self.anchor_latents(past)
        x0 = self.to_x0(future, past, anchors)  # before past dropout: the target never depends on the dropped context
        noisy = self.schedule.add_noise(x0, noise, t)
        weights = self.change_weights(past, future) if d.change_weight > 0 else None  # from the true past, undropped
        past = self.context(past, anchors)  # what the net sees (the anchors are dropped with the past)
        if d.past_dropout > 0:
            keep_past = (rand(B) >= d.past_dropout).to(past.dtype).reshape(B, 1, 1, 1, 1)
            past = past * keep_past
        cond_keep = (rand(B) >= d.cond_dropout).float() if (cond is not None and d.cond_dropout > 0) else None
        out = net(noisy, past, t, cond, cond_keep).float()
        target = self.schedule.target(x0, noise, t)
        err = (out - target).pow(2)
        if weights is not None:
            w = weights.expand_as(err)
            per_sample = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)
        else:
            per_sample = err.flatten(1).mean(1)
        return (per_sample * self.schedule.loss_weights(t).to(device)).mean()

    def change_weights(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """(B, Tf, 1, h, w) loss weights of diffusion.change_weight: 1 + change_weight where the future latent differs
        from the last past one by more than change_threshold (max over channels), else 1."""
        d = self.cfg.diffusion
        changed = (future - past[:, -1:]).abs().amax(2, keepdim=True) > d.change_threshold
        return 1 + d.change_weight * changed.float()

    def batch_loss(self, batch: dict, generator: torch.Generator | None = None,
                   net: torch.nn.Module | None = None) -> torch.Tensor:
        latents = self.batch_latents(batch, generator)
        past, future = self.split_latents(latents)
        cond = batch.get("cond")
        cond = cond.to(latents.device) if cond is not None and cond.numel() else None
        anchors = batch.get("latent_anchors")  # computed once per window (LatentWindowDataset.attach_anchors)
        if anchors is not None:
            anchors = anchors.to(latents.device, non_blocking=True).float()
        return self.loss(past, future, cond, generator, net, anchors)

    # ------------------------------------------------------------------ sampling
    def denoiser(self, past: torch.Tensor, cond: torch.Tensor | None, net: torch.nn.Module,
                 guidance_past: float = 1.0, guidance_cond: float = 1.0) -> Callable:
        """The (x_t, t) -> output closure for the sampler, with classifier-free guidance (Ho & Salimans 2022) on
        the past frames and the conditioning vector as two separate terms (Brooks et al. 2023, InstructPix2Pix, eq. 3):
            out = e(0, 0) + g_past * (e(past, 0) - e(0, 0)) + g_cond * (e(past, cond) - e(past, 0)).
        A scale of 1 drops its term and its extra network call."""
        B = past.shape[0]
        use_p = guidance_past != 1.0
        use_c = guidance_cond != 1.0 and cond is not None
        no_cond = torch.zeros(B, device=past.device) if use_c else None

        def denoise(x_t, t):
            out_pc = net(x_t, past, t, cond, None)
            if not (use_p or use_c):
                return out_pc
            out_p = net(x_t, past, t, cond, no_cond) if use_c else out_pc  # past, no conditioning vector
            base = out_p
            if use_p:
                out_0 = net(x_t, torch.zeros_like(past), t, cond, no_cond)  # neither (cond kept when unguided)
                base = out_0 + guidance_past * (out_p - out_0)
            return base + guidance_cond * (out_pc - out_p) if use_c else base

        return denoise

    def noise_like(self, past_one: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T for one clip: standard normal of shape (Tf, C, h, w), drawn on the generator's device (CPU default)."""
        _, C, h, w = past_one.shape
        return torch.randn((self.t_future, C, h, w), generator=generator,
                           device=generator.device if generator else "cpu")

    @torch.no_grad()
    def predict_latents(self, past: torch.Tensor, cond: torch.Tensor | None = None, steps: int | None = None,
                        generator: torch.Generator | list[torch.Generator] | None = None,
                        net: torch.nn.Module | None = None, callback: Callable | None = None,
                        noise: torch.Tensor | None = None, **sampler_overrides) -> torch.Tensor:
        """Past latents (B, Tp, C, h, w) -> predicted future latents (B, Tf, C, h, w). Sampler settings come
        from cfg.sampler; keyword overrides (eta, spacing, clip, clip_bound, ...) replace them for this call.
        `noise` (B, Tf, C, h, w) is x_T; drawn from `generator` when not given. `generator` may be one per window
        (a list of B): each window's draws are then its own. The callback sees the sampler's own space (`to_x0`);
        the return value is latents."""
        net = self.unet if net is None else net  # not `net or`: a torch.compile wrapper has no truth value
        s = self.cfg.sampler
        kw = dict(eta=s.eta, spacing=s.timestep_spacing, clip=s.clip_x0, clip_bound=s.clip_bound,
                  clip_percentile=s.clip_percentile)
        guidance = dict(guidance_past=sampler_overrides.pop("guidance_past", s.guidance_past),
                        guidance_cond=sampler_overrides.pop("guidance_cond", s.guidance_cond))
        kw.update(sampler_overrides)
        if noise is None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator] * len(past)
            noise = torch.stack([self.noise_like(p, g) for p, g in zip(past, gens)])
        noise = noise.to(past.device)
        was_training = net.training
        net.eval()
        try:
            # speed.sampler_compile: the same weights, a compiled forward (GPU only)
            call = self.compiled_nets(net) if self.cfg.speed.sampler_compile else net
            anchors = self.anchor_latents(past) if self.cfg.diffusion.motion_anchor else None
            x0 = ddim_sample(self.denoiser(self.context(past, anchors), cond, call, **guidance), noise, self.schedule,
                             steps or s.num_inference_steps, generator=generator, callback=callback, **kw)
            return self.from_x0(x0, past, anchors)
        finally:
            net.train(was_training)

    @torch.no_grad()
    def predict(self, past_frames: torch.Tensor, cond: torch.Tensor | None = None, steps: int | None = None,
                generator: torch.Generator | None = None, net: torch.nn.Module | None = None,
                **sampler_overrides) -> torch.Tensor:
        """Past frames (B, Tp, 3, H, W) in [-1, 1] -> predicted future frames (B, Tf, 3, H, W) in [-1, 1]."""
        assert past_frames.ndim == 5 and past_frames.shape[1] == self.t_past, f"past {tuple(past_frames.shape)}"
        # a posterior draw (vae.latent = sample) comes from the caller's generator too, so a seed fixes the prediction
        past = self.vae.encode(past_frames.to(self.vae.device), generator=generator)
        if cond is not None:
            cond = cond.to(past.device) if cond.numel() else None
        future = self.predict_latents(past, cond, steps, generator, net, **sampler_overrides)
        return self.decode_future(future, past_frames.to(self.vae.device), past)

    @torch.no_grad()
    def decode_future(self, future: torch.Tensor, past_frames: torch.Tensor, past: torch.Tensor,
                      mode: str | None = None, last_rec: torch.Tensor | None = None,
                      threshold: float | None = None) -> torch.Tensor:
        """Predicted future latents (B, Tf, C, h, w) -> frames (B, Tf, 3, H, W) in [-1, 1]: the VAE's decoding, then
        residual decoding (`residual_decode`)."""
        return self.residual_decode(self.vae.decode(future), past_frames, past, mode, last_rec, threshold)

    @torch.no_grad()
    def residual_decode(self, pred: torch.Tensor, past_frames: torch.Tensor, past: torch.Tensor,
                        mode: str | None = None, last_rec: torch.Tensor | None = None,
                        threshold: float | None = None) -> torch.Tensor:
        """Decoded prediction D(z) (B, Tf, 3, H, W) -> frames in [-1, 1] under sampler.residual_decode (or `mode`):
        the last past frame's VAE reconstruction error x_last - D(z_last) is added back where the prediction did not
        move away from D(z_last), so pixels that stay put come out as the camera saw them rather than as the VAE
        redraws them; "copy" goes one step further and also drops the prediction's own small change there (x_last
        where it stays put, shrinking towards D(z) as the change nears the threshold); "warp" is copy with motion
        (model/motion.py: the last frame's pixels moved to where the prediction put them). past_frames (B, Tp, 3, H, W),
        past their latents; last_rec = D(z_last), (B, 1, 3, H, W), when the caller has it already (decoded here
        otherwise); mode and threshold default to sampler.residual_decode and sampler.residual_decode_threshold.
        Separate from the VAE's decoding so one decoded sample can be read several ways."""
        s = self.cfg.sampler
        mode = s.residual_decode if mode is None else mode
        threshold = s.residual_decode_threshold if threshold is None else threshold
        if mode == "off":
            return pred
        last = past_frames[:, -1:].to(pred.device, torch.float32)  # (B, 1, 3, H, W)
        last_rec = self.vae.decode(past[:, -1:]) if last_rec is None else last_rec
        if mode == "warp":  # copy with motion: the last frame's pixels moved to where the prediction put them
            return motion_compensated_copy(pred, last, last_rec, s.warp_radius, s.warp_window, threshold)
        if mode == "segment":  # copy with whole objects: each colour region moved to where the prediction put it
            return segment_copy(pred, last, last_rec, s.warp_radius, self.cfg.diffusion.anchor_segment_tol,
                                s.segment_threshold, threshold)
        if mode == "copy":  # a change below the threshold is taken for sampling noise: the last frame as it was
            return copy_decode(pred, last, last_rec, threshold)
        correction = last - last_rec
        if mode == "full":
            return (pred + correction).clamp(-1, 1)
        return (pred + still_weight(pred, last_rec, threshold) * correction).clamp(-1, 1)  # masked
