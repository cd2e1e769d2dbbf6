"""The checks of `diagnose_diffusion.py`: each looks for one cause of bad pictures (DESIGN.md) and returns
pass / warn / fail with the measured value, the expected range and a one-line hint.

The sampler is only ever run, never re-implemented: what it does is read through its `callback`. The noise schedule
the run was TRAINED with is rebuilt from the checkpoint's stored config and compared with what the sampler uses.

Spaces: `frames` pixels in [-1, 1], (B, T, 3, H, W); `latents` scaled VAE latents, (B, T, C, h, w).
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from configs import config_from_dict
from diagnosis import plots
from diagnosis.inputs import PixelTransform, Windows, val_windows
from diagnosis.report import FAIL, PASS, WARN, Check, grade
from model.loading import LoadedModel, ema_schedule, nonfinite_names
from model.schedule import NoiseSchedule
from training.evaluation import frame_psnr
from training.visualize import error_frames, frame_rows

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# thresholds (one place, so that report and tests agree)
ROUNDTRIP_PSNR = (22.0, 17.0)  # dB: pass at or above the first, warn at or above the second
# pass range, warn range of the scaled latents' std: a correctly scaled VAE gives ~1 on its own domain (SD-VAE: about
# 0.8 to 1.2 on natural images); a factor near 2 is a wrong or foreign scaling_factor, not dataset variation
LATENT_STD = ((0.7, 1.4), (0.55, 1.8))
CLIP_FRACTION = (1e-4, 1e-3)  # true latents beyond the clip bound: pass <= 0.01 %, warn <= 0.1 %
EMA_INITIAL_WEIGHT = (0.01, 0.1)  # weight the EMA still gives its starting (random) weights: pass <=, warn <=
EMA_OVER_RAW = (1.2, 1.5)  # EMA one-step x0 MSE over the raw weights': pass <=, warn <=
CONTEXT_GAIN = (1.2, 1.02)  # x0 error with another clip's past / with its own past: pass >=, warn >=


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def _finite(*xs) -> bool:
    return all(math.isfinite(float(x)) for x in xs)


class OracleNet(torch.nn.Module):
    """A perfect denoiser for a known x0: returns the exact eps (or v) of x_t under `schedule`. Takes the UNet's
    arguments, so the model's own sampling path (guidance included) runs it unchanged."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.x0, self.schedule = x0, schedule

    def forward(self, x_t, past, t, cond=None, cond_keep=None):
        ab = self.schedule.alpha_bar(t).to(x_t.device, torch.float64).reshape(-1, *[1] * (x_t.ndim - 1))
        x0 = self.x0.to(x_t.device, torch.float64)
        eps = (x_t.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = eps if self.schedule.prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.to(x_t.dtype)


@dataclass
class Trace:
    """What the sampler's callback reported, one dict per step (tensors on CPU), and what it returned."""

    steps: list[dict]
    final: torch.Tensor


@dataclass
class Context:
    """Everything the checks share, computed once: the model, validation windows and their latents."""

    loaded: LoadedModel
    windows: Windows
    out: Path
    net_name: str = "ema"  # the weights the sampler uses: ema (raw when the run has none) | raw
    seed: int = 1234
    pictures: dict[str, str] = field(default_factory=dict)  # caption -> file name in `out`

    @property
    def model(self):
        return self.loaded.model

    @property
    def cfg(self):
        return self.loaded.cfg

    @property
    def net(self) -> torch.nn.Module:
        return self.loaded.net(self.net_name)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    @cached_property
    def latents(self) -> torch.Tensor:
        """Scaled latents of the windows' frames, (B, Tp + Tf, C, h, w) (posterior means)."""
        vae = self.model.vae
        mean, _ = vae.encode_moments(self.windows.frames.to(vae.device))
        return mean.cpu()

    @property
    def past(self) -> torch.Tensor:
        return self.latents[:, :self.model.t_past]

    @property
    def future(self) -> torch.Tensor:
        return self.latents[:, self.model.t_past:self.model.t_past + self.model.t_future]

    @cached_property
    def anchors(self) -> torch.Tensor | None:
        """The windows' motion anchors (diffusion.motion_anchor), computed once for every check; None without."""
        if not self.cfg.diffusion.motion_anchor:
            return None
        return self.model.anchor_latents(self.past.to(self.model.vae.device)).cpu()

    @property
    def x0(self) -> torch.Tensor:
        """The true windows' x0 in the sampler's space (the future latents, or their residual: diffusion.target)."""
        return self.model.to_x0(self.future, self.past, self.anchors)

    @property
    def cond(self) -> torch.Tensor | None:
        c = self.windows.cond
        return None if c is None or not c.numel() else c[:, :len(self.cfg.data.cond_keys) * self.model.t_future]

    @cached_property
    def train_schedule(self) -> NoiseSchedule:
        """The schedule the model was trained with, rebuilt from the checkpoint's stored config (no overrides)."""
        stored = self.loaded.state.get("config")
        return NoiseSchedule(config_from_dict(stored).diffusion if stored else self.cfg.diffusion)

    def noise(self, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator(offset))

    def run_net(self, net, x_t: torch.Tensor, t: int, past=None, cond=None, latents: bool = True) -> torch.Tensor:
        """Future latents (latents=False: the sampler-space x0) predicted in one step from x_t (sampler space) at
        timestep t, converted as in training (the stored config's schedule)."""
        dev = self.model.vae.device
        # the windows' own anchors are computed once (self.anchors); another past (a context check) gets its own
        anchors = self.anchors if past is None else None
        past = self.past if past is None else past
        if anchors is None and self.cfg.diffusion.motion_anchor:
            anchors = self.model.anchor_latents(past.to(dev)).cpu()
        cond = self.cond if cond is None else cond
        tb = torch.full((x_t.shape[0],), t, dtype=torch.long, device=dev)
        with torch.no_grad():
            context = self.model.context(past.to(dev), None if anchors is None else anchors.to(dev))
            out = net(x_t.to(dev), context, tb, None if cond is None else cond.to(dev), None).float()
        x0 = self.train_schedule.split_output(out, x_t.to(dev), tb)[0].cpu()
        return self.model.from_x0(x0, past.cpu(), anchors) if latents else x0

    @cached_property
    def trace(self) -> Trace:
        """One sampling run of the first (up to) 2 windows with the run's sampler settings, watched step by step."""
        B = min(2, self.past.shape[0])
        dev = self.model.vae.device
        steps: list[dict] = []

        def watch(info: dict) -> None:
            steps.append({k: (v[:B].detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in info.items()})

        cond = None if self.cond is None else self.cond[:B].to(dev)
        final = self.model.predict_latents(self.past[:B].to(dev), cond, net=self.net, generator=self.generator(1),
                                           noise=self.noise(self.future[:B], 1), callback=watch)
        return Trace(steps, final.cpu())

    @cached_property
    def one_step(self) -> dict:
        """One-step x0 prediction error vs t: noise the true future latents to t, predict x0, MSE against the truth.
        For the EMA and raw weights and four trivial predictors: x0 = 0, copy the last past latent, x_t/sqrt(ab), and
        "blind": the best context-free linear guess, x_t shrunk by sqrt(ab) s2 / (ab s2 + 1 - ab), s2 = E[x0^2]
        (the Wiener filter for x0 of variance s2 in unit noise; it beats both x0 = 0 and x_t/sqrt(ab) at every t)."""
        T = self.train_schedule.num_train_timesteps
        ts = sorted({round(f * (T - 1)) for f in (0, .02, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1)})
        future, x0, noise = self.future, self.x0, self.noise(self.future, 2)
        last = self.past[:, -1:].expand_as(future)
        to_latents = lambda v: self.model.from_x0(v, self.past)  # noqa: E731  (sampler space -> latents)
        nets = {"ema": self.loaded.ema_unet, "raw": self.loaded.raw_unet}
        curves = {name: [] for name, net in nets.items() if net is not None}
        curves.update({"zero": [], "copy_last": [], "x_t/sqrt(ab)": [], "blind": []})
        s2 = float(x0.double().pow(2).mean())
        for t in ts:
            ab = float(self.train_schedule.alpha_bar(t))
            x_t = self.train_schedule.add_noise(x0, noise, torch.full((future.shape[0],), t))
            for name, net in nets.items():
                if net is not None:
                    curves[name].append(_mse(self.run_net(net, x_t, t), future))
            curves["zero"].append(_mse(torch.zeros_like(future), future))
            curves["copy_last"].append(_mse(last, future))
            curves["x_t/sqrt(ab)"].append(_mse(to_latents(x_t / math.sqrt(max(ab, 1e-12))), future))
            curves["blind"].append(_mse(to_latents(x_t * (math.sqrt(ab) * s2 / (ab * s2 + 1 - ab))), future))
        return {"t": ts, "mse": curves}

    def picture(self, img, file: str, caption: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        img.save(self.out / file)
        self.pictures[caption] = file


# ---------------------------------------------------------------------------------------------- 1. pixels
def check_pixels(ctx: Context) -> list[Check]:
    frames = ctx.windows.frames
    lo, hi = float(frames.min()), float(frames.max())
    ch_mean = frames.transpose(0, 2).reshape(3, -1).mean(1)
    ch_std = frames.transpose(0, 2).reshape(3, -1).std(1)
    value = {"min": lo, "max": hi, "mean": float(frames.mean()), "std": float(frames.std())}
    imagenet_like = bool((ch_mean.abs() < 0.7).all() and ((ch_std > 0.4) & (ch_std < 1.6)).all()) and lo < -1.2
    if not _finite(lo, hi):
        status, hint = FAIL, "non-finite pixels: the data pipeline produced NaN/Inf"
    elif lo < -1.01 or hi > 1.01:
        status = FAIL
        hint = (f"pixels reach [{lo:.2f}, {hi:.2f}], outside the VAE's [-1, 1]"
                + ("; per-channel mean ~0 and std ~1 look like ImageNet mean/std normalisation"
                   if imagenet_like else "")
                + ": feed x/127.5 - 1 (data/pixels.py), and decode back with the same map")
    elif lo > -0.01:
        status, hint = FAIL, ("pixels are all >= 0: they look like [0, 1] images; the VAE expects [-1, 1] "
                              "(data.pixels.from_unit)")
    elif hi - lo < 1.0:
        status, hint = WARN, (f"pixels span only [{lo:.2f}, {hi:.2f}] of [-1, 1]: very dark/flat data, or a wrong "
                              "scaling in the pipeline")
    else:
        status, hint = PASS, "pixels are in [-1, 1] and use the range"
    checks = [Check("pixel_range", status, value, "min >= -1, max <= 1, spanning most of [-1, 1]", hint,
                    {"channel_mean": ch_mean.tolist(), "channel_std": ch_std.tolist()})]

    vae = ctx.model.vae
    recon = vae.decode(ctx.latents.to(vae.device)).cpu()
    # per frame, on [0, 1] images, without clamping the input: pixels out of range must cost round-trip PSNR
    psnr = float(frame_psnr((recon.double() + 1) / 2, (frames.double() + 1) / 2).mean())
    status = grade(psnr, lambda v: v >= ROUNDTRIP_PSNR[0], lambda v: v >= ROUNDTRIP_PSNR[1])
    hint = ("the VAE reconstructs the pipeline's frames well" if status == PASS else
            f"VAE round trip only {psnr:.1f} dB: wrong pixel range (see pixel_range), a VAE not meant for this data "
            "or resolution, or a broken VAE folder")
    checks.append(Check("vae_roundtrip_psnr", status, psnr, f">= {ROUNDTRIP_PSNR[0]} dB (warn >= {ROUNDTRIP_PSNR[1]})",
                        hint))
    ctx.picture(frame_rows({"input (clamped)": frames[0], "VAE round trip": recon[0],
                            "|error|": error_frames(recon[0], frames[0].clamp(-1, 1))},
                           column_labels=[f"frame {k}" for k in range(frames.shape[1])]),
                "pixels_roundtrip.png", "input frames (as the data pipeline gives them) and their VAE round trip")
    return checks


# ---------------------------------------------------------------------------------------------- 2. latent scale
def check_latent_scale(ctx: Context) -> list[Check]:
    z = ctx.latents
    std, mean = float(z.std()), float(z.mean())
    vae = ctx.model.vae
    (pass_lo, pass_hi), (warn_lo, warn_hi) = LATENT_STD
    status = grade(std, lambda v: pass_lo <= v <= pass_hi and abs(mean) <= 0.5,
                   lambda v: warn_lo <= v <= warn_hi and abs(mean) <= 1.0)
    suggested = vae.scaling_factor / std if std > 0 else float("nan")
    hint = ("scaled latents have std ~1" if status == PASS else
            f"scaled latents have std {std:.3g}, mean {mean:.3g}: the scaling_factor {vae.scaling_factor:g} in the "
            f"VAE's config.json does not fit it (about {suggested:.4g} gives std 1; a mean far from 0 needs a "
            "shift_factor); the scale must come from vae.config, never a literal")
    per_channel = z.transpose(0, 2).flatten(1)
    checks = [Check("latent_scale", status, {"std": std, "mean": mean}, f"std in [{pass_lo}, {pass_hi}], |mean| <= 0.5",
                    hint, {"channel_std": per_channel.std(1).tolist(), "channel_mean": per_channel.mean(1).tolist(),
                           "scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor})]

    trained = ctx.loaded.state.get("vae")
    if trained is None:
        checks.append(Check("vae_matches_checkpoint", PASS, "no checkpoint", "the VAE the UNet was trained with",
                            "random weights: nothing to compare"))
    else:
        keys = ("class", "scaling_factor", "shift_factor", "latent_channels")
        now = vae.identity()
        diff = {k: {"trained": trained.get(k), "now": now.get(k)} for k in keys if trained.get(k) != now.get(k)}
        checks.append(Check(
            "vae_matches_checkpoint", FAIL if diff else PASS, diff or {k: now[k] for k in keys[1:3]},
            "the same VAE class, scaling and shift as in training",
            f"the VAE differs from the one the UNet was trained with ({', '.join(diff)}): restore its config.json or "
            "retrain; the UNet only understands latents scaled as in training" if diff else
            "the VAE has the class, scale and shift the UNet was trained with"))
    return checks


# ---------------------------------------------------------------------------------------------- 3. clip bound
def check_clip_bound(ctx: Context) -> list[Check]:
    s = ctx.cfg.sampler
    z = ctx.x0  # the sampler clips in its own space (diffusion.target)
    peak = float(z.abs().max())
    frac = float((z.abs() > s.clip_bound).double().mean())
    suggested = math.ceil(2 * 1.1 * peak) / 2  # 10 % above the measured peak, to the next 0.5
    if s.clip_x0 == "none":
        status, hint = PASS, f"x0 clipping is off (sampler.clip_x0=none); {frac:.2%} of latents exceed {s.clip_bound}"
    else:
        status = grade(frac, lambda v: v <= CLIP_FRACTION[0], lambda v: v <= CLIP_FRACTION[1])
        hint = (f"the clip bound {s.clip_bound} is above the data's latents (max |z| = {peak:.2f})" if status == PASS
                else f"{frac:.3%} of the data's own latents exceed sampler.clip_bound={s.clip_bound} (max |z| = "
                     f"{peak:.2f}), so clipping cuts real content: set sampler.clip_bound to about {suggested}")
    checks = [Check("clip_bound_vs_data", status, {"fraction_beyond": frac, "clip_bound": s.clip_bound,
                                                   "max_abs_latent": peak},
                    f"<= {CLIP_FRACTION[0]:.2%} of true latents beyond the bound (warn <= {CLIP_FRACTION[1]:.2%})",
                    hint, {"mode": s.clip_x0, "suggested_bound": suggested})]

    fractions = [st["clip_fraction"] for st in ctx.trace.steps]
    last = fractions[-1] if fractions else 0.0
    if s.clip_x0 == "none":
        status, hint = PASS, "x0 clipping is off"
    else:
        status = PASS if last <= CLIP_FRACTION[1] else WARN
        hint = (f"clipping fires on {sum(f > 0 for f in fractions)} of {len(fractions)} steps, on "
                f"{last:.3%} of the final sample" if status == PASS else
                f"clipping still cuts {last:.2%} of x0 at the final step: the samples are clipped, not denoised "
                "(clip bound below the data, or a model/scale problem upstream)")
    checks.append(Check("clip_in_sampling", status, {"mean_fraction": sum(fractions) / max(len(fractions), 1),
                                                     "final_step_fraction": last},
                        f"final step <= {CLIP_FRACTION[1]:.2%}", hint, {"per_step": fractions}))
    hist_range = max(peak, s.clip_bound) * 1.1
    counts = torch.histc(z.flatten().float(), bins=60, min=-hist_range, max=hist_range)
    centres = torch.linspace(-hist_range, hist_range, 61)[:-1] + hist_range / 60
    ctx.picture(plots.line_plot({"count": (centres.tolist(), counts.tolist())}, "scaled latents of val frames",
                                "latent value", logy=True,
                                xlines={f"-{s.clip_bound:g}": -s.clip_bound, f"+{s.clip_bound:g}": s.clip_bound}),
                "latent_histogram.png", "histogram of the data's scaled latents, with the clip bound")
    return checks


# ---------------------------------------------------------------------------------------------- 4. schedule
def _fit_two(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Least-squares (p, q) in target = p * a + q * b."""
    A = torch.stack([a.flatten().double(), b.flatten().double()], 1)
    sol = torch.linalg.lstsq(A, target.flatten().double()[:, None]).solution
    return float(sol[0]), float(sol[1])


def check_schedule(ctx: Context) -> list[Check]:
    steps, train = ctx.trace.steps, ctx.train_schedule
    T = train.num_train_timesteps
    pred_type = ctx.model.schedule.prediction_type
    # the alpha_bar the sampler used at each t, read back from the callback's (x_t, output, x0) triples
    measured = []
    for st in steps:
        if pred_type == "epsilon":  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
            a, _ = _fit_two(st["x_t"], st["x0_pred_raw"], st["output"])
        else:  # x0 = sqrt(ab) x_t - sqrt(1 - ab) v
            a, _ = _fit_two(st["x0_pred_raw"], st["x_t"], -st["output"])
        measured.append((st["t"], a * a))
    # ... and at each step's target t_prev, from the update x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
    # (exact for eta = 0, and for the last step at any eta, where sigma = 0)
    final = ctx.trace.final  # latents; the steps live in the sampler's space (diffusion.target)
    nexts = [s["x_t"] for s in steps[1:]] + [ctx.model.to_x0(final, ctx.past[:final.shape[0]])]
    for i, (st, x_next) in enumerate(zip(steps, nexts)):
        if ctx.cfg.sampler.eta == 0 or i == len(steps) - 1:
            a, _ = _fit_two(x_next, st["x0_pred"], st["eps_pred"])
            measured.append((st["t_prev"], a * a))
    dev = [abs(ab - float(train.alpha_bar(t))) / max(float(train.alpha_bar(t)), 1e-3) for t, ab in measured]
    direct = float((ctx.model.schedule.alphas_cumprod - train.alphas_cumprod).abs().max()) \
        if ctx.model.schedule.num_train_timesteps == T else float("inf")
    worst = max(dev + [direct])
    ok = worst < 1e-3
    checks = [Check("schedule_match", PASS if ok else FAIL, {"max_rel_alpha_bar_error": worst},
                    "the sampler's alpha_bar equals training's (relative error < 1e-3)",
                    "training and sampling share one noise schedule" if ok else
                    "the sampler uses another noise schedule than training (betas, beta_schedule or T differ): build "
                    "both from the one NoiseSchedule(cfg.diffusion)",
                    {"measured": [[t, ab, float(train.alpha_bar(t))] for t, ab in measured]})]

    first = steps[0]["t"]
    spacing = ctx.cfg.sampler.timestep_spacing
    checks.append(Check(
        "first_timestep", PASS if first == T - 1 else FAIL, first, f"{T - 1} (= T - 1)",
        "sampling starts from pure noise at t = T-1" if first == T - 1 else
        f"sampling starts at t = {first}, not {T - 1} (timestep_spacing={spacing}): the model gets pure noise "
        f"labelled as t = {first}, a noise level it was trained with signal in; set sampler.timestep_spacing=trailing"))

    last_t_prev = steps[-1]["t_prev"]
    final_ab = next(ab for t, ab in reversed(measured) if t == last_t_prev)
    ok = last_t_prev == -1 and abs(final_ab - 1) < 1e-5  # alpha_bar_0 = 1 - beta_1 is 0.9999 for the default betas
    checks.append(Check("final_alpha_bar", PASS if ok else FAIL, {"t_prev": last_t_prev, "alpha_bar": final_ab},
                        "the last step lands on alpha_bar = 1 (t_prev = -1)",
                        "the last step returns clean latents" if ok else
                        "the last step does not land on alpha_bar = 1: the output keeps residual noise"))

    ts = [st["t"] for st in steps]
    broken = [(st["t"], st["t_prev"]) for st, nxt in zip(steps, ts[1:] + [-1]) if st["t_prev"] != nxt]
    descending = all(a > b for a, b in zip(ts, ts[1:])) and all(0 <= t < T for t in ts)
    ok = not broken and descending and len(steps) == ctx.cfg.sampler.num_inference_steps
    checks.append(Check(
        "step_pairs", PASS if ok else FAIL, {"steps": len(steps), "non_consecutive": len(broken)},
        f"{ctx.cfg.sampler.num_inference_steps} steps, each to the next timestep visited",
        "every step goes to the next timestep actually in the schedule" if ok else
        f"steps {broken[:3]} jump to timesteps the schedule never visits (or t is not descending in [0, T-1])",
        {"timesteps": ts}))
    return checks


# ---------------------------------------------------------------------------------------------- 5. oracle
def check_oracle(ctx: Context) -> list[Check]:
    """A perfect denoiser for known x0 (the true future latents) through the model's own sampling path."""
    x0, future = ctx.x0, ctx.future
    dev = ctx.model.vae.device

    def run(**overrides) -> float:
        out = ctx.model.predict_latents(ctx.past.to(dev), None if ctx.cond is None else ctx.cond.to(dev),
                                        net=OracleNet(x0, ctx.train_schedule), generator=ctx.generator(3),
                                        noise=ctx.noise(x0, 3), **overrides).cpu()
        return float((out - future).abs().max() / future.abs().max())

    err = run()
    ok = err < 1e-3
    if ok:
        hint = "with a perfect denoiser the sampler returns the true latents"
    else:
        unclipped = run(clip="none")
        hint = (f"with a perfect denoiser the sampler misses the true latents by {err:.2%}"
                + (f"; without clipping it recovers them ({unclipped:.1e}): the clip bound "
                   f"{ctx.cfg.sampler.clip_bound} cuts the data" if unclipped < 1e-3 else
                   "; also without clipping: the sampler's update or schedule is wrong"))
    return [Check("oracle_sampler", PASS if ok else FAIL, err, "max |x0_rec - x0| / max |x0| < 1e-3", hint,
                  {"settings": {k: getattr(ctx.cfg.sampler, k) for k in
                                ("num_inference_steps", "eta", "timestep_spacing", "clip_x0", "clip_bound")}})]


# ---------------------------------------------------------------------------------------------- 6. one-step x0
def _worst_ratio(curves: dict, ts: list[int], name: str, baselines: tuple[str, ...], T: int,
                 floor_fraction: float) -> tuple[float, int]:
    """(worst ratio, its t) over t <= T/2 of the net's x0 MSE over the best of `baselines`, the latter floored at
    floor_fraction of E[x0^2]. The blind predictors need a floor of 1 %: at t ~ 0 every predictor is near exact, and
    differences that small do not show in a picture. Copy-last's error does not shrink with t, and on a still camera
    it is far below 1 % of E[x0^2] (0.24 % on UCSD Ped2, where a 1 % floor hid a model 2x worse than copying)."""
    floor = floor_fraction * curves["zero"][0]
    worst, worst_t = 0.0, ts[0]
    for i, t in enumerate(ts):
        if t <= T // 2:
            m, best = curves[name][i], min(curves[b][i] for b in baselines)
            ratio = m / max(best, floor) if math.isfinite(m) else math.inf
            if ratio > worst:
                worst, worst_t = ratio, t
    return worst, worst_t


def check_one_step(ctx: Context) -> list[Check]:
    """Fail: worse than the best predictor that ignores the context (x0 = 0, x_t / sqrt(alpha_bar), the blind linear
    shrinkage of x_t), i.e. the weights have learned nothing usable. Warn: worse than copying the last past latent,
    i.e. the model adds nothing to copying. Judged at t <= T/2, where the sampler's last, decisive steps run."""
    res, T = ctx.one_step, ctx.train_schedule.num_train_timesteps
    ts, curves = res["t"], res["mse"]
    name = ctx.net_name if ctx.net_name in curves else "raw"
    blind, _ = _worst_ratio(curves, ts, name, ("zero", "x_t/sqrt(ab)", "blind"), T, 1e-2)
    copy, copy_t = _worst_ratio(curves, ts, name, ("copy_last",), T, 1e-4)
    status = FAIL if not blind <= 1.1 else WARN if copy > 1.1 else PASS
    i_mid = min(range(len(ts)), key=lambda i: abs(ts[i] - T // 2))
    hint = {PASS: f"the {name} weights predict x0 better than trivial predictors at every t <= T/2: if samples look "
                  "wrong, suspect the sampler",
            WARN: f"the {name} weights denoise but predict x0 up to {copy:.2f}x worse than copying the last past "
                  f"frame (at t = {copy_t}): an under-trained model, or one that ignores its context (see "
                  "uses_past_frames); the sampler starts from those steps, and its samples can then lose to "
                  "copy-last at short horizons. Train longer; with diffusion.snr_gamma (min-SNR) the high-noise "
                  "steps carry little x0 weight in the loss",
            FAIL: f"the {name} weights predict x0 up to {blind:.3g}x worse than a guess that ignores the context "
                  "(x0 = 0, or x_t shrunk) at t <= T/2: a MODEL problem (untrained or lagging EMA weights, NaN, "
                  "latents scaled unlike training), not a sampler one"}[status]
    value = {"worst_ratio_to_blind": blind, "worst_ratio_to_copy_last": copy, "worst_copy_last_t": copy_t,
             f"mse_t{ts[i_mid]}": curves[name][i_mid], "copy_last_mse": curves["copy_last"][i_mid]}
    blind_curve = [min(z, x, b) for z, x, b in zip(curves["zero"], curves["x_t/sqrt(ab)"], curves["blind"])]
    relative = {k: (ts, [m / max(b, 1e-12) for m, b in zip(v, blind_curve)])
                for k, v in curves.items() if k not in ("x_t/sqrt(ab)", "blind")}
    ctx.picture(plots.tile([plots.line_plot({k: (ts, v) for k, v in curves.items()}, "one-step x0 MSE vs t",
                                            "timestep t", logy=True),
                            plots.line_plot(relative, "x0 MSE / best blind predictor's (below 1 = skill)",
                                            "timestep t", logy=True, hlines={"1": 1.0})]),
                "one_step_x0.png", "one-step x0 prediction error against t, for the model and trivial predictors")
    return [Check("one_step_x0", status, value,
                  "x0 MSE <= 1.1x the best trivial predictor (blind or copy-last) at every t <= T/2", hint,
                  {"t": ts, "mse": curves})]


# ---------------------------------------------------------------------------------------------- 7. sampling trace
def check_trace(ctx: Context) -> list[Check]:
    steps, final = ctx.trace.steps, ctx.trace.final
    xs = list(range(len(steps)))
    rows = {"latent std (x_t)": [_rms(s["x_t"] - s["x_t"].mean()) for s in steps],
            "x0_pred min": [float(s["x0_pred_raw"].min()) for s in steps],
            "x0_pred max": [float(s["x0_pred_raw"].max()) for s in steps],
            "clip fraction": [s["clip_fraction"] for s in steps],
            "eps rms": [_rms(s["eps_pred"]) for s in steps]}
    bound = ctx.cfg.sampler.clip_bound
    panels = [plots.line_plot({"std(x_t)": (xs, rows["latent std (x_t)"])}, "latent std per step", "step",
                              hlines={"data std": _rms(ctx.x0 - ctx.x0.mean())}),
              plots.line_plot({"min": (xs, rows["x0_pred min"]), "max": (xs, rows["x0_pred max"])},
                              "x0_pred range (before clipping)", "step",
                              hlines={f"+{bound:g}": bound, f"-{bound:g}": -bound} if ctx.cfg.sampler.clip_x0 != "none"
                              else None),
              plots.line_plot({"clipped": (xs, rows["clip fraction"])}, "fraction of x0 clipped", "step"),
              plots.line_plot({"rms(eps)": (xs, rows["eps rms"])}, "eps_pred rms (1 = unit noise)", "step")]
    ctx.picture(plots.tile(panels), "sampling_trace.png", "sampling trace: per-step statistics")
    # film strip: decoded x0_pred of the first window across (up to 10) steps, then the final sample and the truth
    pick = sorted({round(i * (len(steps) - 1) / 9) for i in range(10)}) if len(steps) > 10 else xs
    past0 = ctx.past[:1]
    x0s = torch.cat([ctx.model.from_x0(steps[i]["x0_pred"][:1], past0) for i in pick]
                    + [final[:1], ctx.future[:1]])  # (S+2, Tf, C, h, w) latents
    decoded = ctx.model.vae.decode(x0s.to(ctx.model.vae.device)).cpu()  # (S+2, Tf, 3, H, W)
    labels = [f"t={steps[i]['t']}" for i in pick] + ["sample", "truth*"]
    ctx.picture(frame_rows({f"t+{k + 1}": decoded[:, k] for k in range(decoded.shape[1])}, column_labels=labels),
                "x0_filmstrip.png", "decoded x0_pred across sampling steps (*truth = VAE round trip)")

    data_std = _rms(ctx.future[:final.shape[0]] - ctx.future[:final.shape[0]].mean())
    ratio = _rms(final - final.mean()) / max(data_std, 1e-8)
    finite = all(torch.isfinite(s["x_t"]).all() and torch.isfinite(s["x0_pred_raw"]).all() for s in steps)
    status = grade(ratio if finite else float("nan"), lambda v: 1 / 1.5 <= v <= 1.5, lambda v: 0.5 <= v <= 2)
    hint = ("the samples' latent std matches the data's" if status == PASS else
            "non-finite values during sampling" if not finite else
            f"the final samples have {ratio:.2f}x the data's latent std: "
            + ("over-dispersed, i.e. noise left in the output (model or schedule problem)" if ratio > 1 else
               "washed out (over-clipped or an under-trained model predicting the mean)"))
    return [Check("sampling_trace", status, {"final_std_over_data_std": ratio, "steps": len(steps)},
                  "final sample std within 1.5x of the data's latent std, all finite", hint, rows)]


# ---------------------------------------------------------------------------------------------- 8. EMA
def check_ema(ctx: Context) -> list[Check]:
    state = ctx.loaded.ema_state
    if state is None:
        return [Check("ema_horizon", PASS, "no EMA", "EMA weight on the initial weights <= 1%",
                      "the run keeps no EMA (ema.decay = 0): samples use the raw weights")]
    ema = ema_schedule(state)
    n = ema.optimization_step
    decays = [ema.get_decay(k) for k in range(1, n + 1)]
    # EMA_n = (prod of the decays) * theta_start + ...: the weights the average started from (~ the random init;
    # diffusers copies the weights on its first update(s), where the decay is 0) still carry this weight
    initial = math.exp(sum(math.log(d) for d in decays if d > 0)) if n else 1.0
    final = decays[-1] if decays else 0.0
    horizon = 1 / (1 - final) if final < 1 else float("inf")
    status = grade(initial, lambda v: v <= EMA_INITIAL_WEIGHT[0], lambda v: v <= EMA_INITIAL_WEIGHT[1])
    value = {"initial_weight": initial, "ema_updates": n, "steps_trained": ctx.loaded.step, "final_decay": final,
             "horizon_steps": horizon}
    hint = (f"the EMA averages the last ~{horizon:.0f} of {n} steps" if status == PASS else
            f"the EMA still holds {initial:.1%} of its starting (random) weights after {n} updates: decay {final:g} "
            f"averages over ~{horizon:.0f} steps. Warm the decay up (ema.warmup_power=0.75), train longer, "
            "or sample with the raw weights (--raw)")
    checks = [Check("ema_horizon", status, value,
                    f"weight on the initial weights <= {EMA_INITIAL_WEIGHT[0]:.0%} "
                    f"(warn <= {EMA_INITIAL_WEIGHT[1]:.0%})",
                    hint, {k: state[k] for k in ("decay", "min_decay", "use_ema_warmup", "power", "inv_gamma",
                                                 "update_after_step") if k in state})]

    res, T = ctx.one_step, ctx.train_schedule.num_train_timesteps
    low = [i for i, t in enumerate(res["t"]) if t <= T // 2]
    ema_mse = sum(res["mse"]["ema"][i] for i in low) / len(low)
    raw_mse = sum(res["mse"]["raw"][i] for i in low) / len(low)
    ratio = ema_mse / raw_mse if _finite(ema_mse, raw_mse) and raw_mse > 0 else float("nan")
    status = grade(ratio, lambda v: v <= EMA_OVER_RAW[0], lambda v: v <= EMA_OVER_RAW[1])
    hint = ("EMA and raw weights predict about equally well" if status == PASS else
            f"{'raw' if not _finite(raw_mse) else 'EMA' if not _finite(ema_mse) else ''} weights give non-finite "
            "predictions" if not _finite(ratio) else
            f"the EMA weights predict x0 {ratio:.2f}x worse than the raw ones: the EMA lags (see ema_horizon); sample "
            "with --raw meanwhile")
    checks.append(Check("ema_vs_raw", status, {"ema_over_raw_mse": ratio, "ema_mse": ema_mse, "raw_mse": raw_mse},
                        f"EMA x0 MSE <= {EMA_OVER_RAW[0]}x raw at t <= T/2 (warn <= {EMA_OVER_RAW[1]}x)", hint))
    return checks


# ---------------------------------------------------------------------------------------------- 9. weights
def check_weights(ctx: Context) -> list[Check]:
    bad = dict(ctx.loaded.nonfinite)
    vae_bad = nonfinite_names(ctx.model.vae.vae.named_parameters())
    if vae_bad:
        bad["vae"] = vae_bad
    names = [n for v in bad.values() for n in v]
    return [Check("weights_finite", FAIL if names else PASS, {k: len(v) for k, v in bad.items()} or 0,
                  "no NaN/Inf in UNet, EMA or VAE weights",
                  f"non-finite weights in {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: training diverged "
                  "(lower optim.lr, keep train.nonfinite=halt) or the file is damaged; use an earlier checkpoint"
                  if names else "all weights are finite", {"tensors": bad})]


# ---------------------------------------------------------------------------------------------- 10. context
def _context_gain(ctx: Context, swap: Callable[[torch.Tensor | None], torch.Tensor | None], what: str) -> dict:
    """x0 MSE with another window's `what` over x0 MSE with the window's own, at noise levels where the past matters
    (alpha_bar 0.3, 0.1, 0.03: the picture is mostly noise, so the prediction must come from the context).
    Compared in the sampler's space, so a residual target (diffusion.target) cannot pass by its own arithmetic."""
    ab = ctx.train_schedule.alphas_cumprod
    ts = sorted({int((ab - target).abs().argmin()) for target in (0.3, 0.1, 0.03)})
    future, noise = ctx.x0, ctx.noise(ctx.future, 4)
    own = other = change = 0.0
    for t in ts:
        x_t = ctx.train_schedule.add_noise(future, noise, torch.full((future.shape[0],), t))
        a = ctx.run_net(ctx.net, x_t, t, latents=False)
        b = ctx.run_net(ctx.net, x_t, t, latents=False, **{what: swap(getattr(ctx, what))})
        own, other, change = own + _mse(a, future), other + _mse(b, future), change + _rms(a - b) / max(_rms(a), 1e-12)
    return {"gain": other / own if own > 0 else float("nan"), "relative_change": change / len(ts), "t": ts}


def check_context(ctx: Context) -> list[Check]:
    B = ctx.past.shape[0]
    if B < 2:
        return [Check("uses_past_frames", WARN, "n/a", ">= 2 windows", "need at least 2 windows (--clips 2)")]
    perm = torch.roll(torch.arange(B), 1)
    res = _context_gain(ctx, lambda p: p[perm], "past")
    status = grade(res["gain"], lambda v: v >= CONTEXT_GAIN[0], lambda v: v >= CONTEXT_GAIN[1])
    hint = (f"with another clip's past frames x0 is {res['gain']:.2f}x worse: the model uses its context"
            if status == PASS else
            f"the prediction barely depends on the past frames (error x{res['gain']:.3f} with another clip's past, "
            f"output change {res['relative_change']:.1%}): the model ignores its context (past latents not fed, "
            "zeroed, or diffusion.past_dropout too high), so it can only produce generic frames")
    checks = [Check("uses_past_frames", status, {"error_ratio_other_past": res["gain"],
                                                 "relative_change": res["relative_change"]},
                    f"x0 error with another clip's past >= {CONTEXT_GAIN[0]}x (warn >= {CONTEXT_GAIN[1]}x)", hint,
                    {"t": res["t"]})]
    if ctx.cond is not None:
        res = _context_gain(ctx, lambda c: c[perm], "cond")
        status = PASS if res["gain"] >= 1.01 else WARN
        checks.append(Check(
            "uses_cond_vector", status,
            {"error_ratio_other_cond": res["gain"], "relative_change": res["relative_change"]},
            "x0 error with another clip's conditioning vector >= 1.01x",
            "the conditioning vector changes the prediction" if status == PASS else
            f"the prediction barely depends on the conditioning vector ({', '.join(ctx.cfg.data.cond_keys)}): check "
            "the sidecars, diffusion.cond_dropout, or whether the signal matters for this data", {"t": res["t"]}))
    return checks


CHECKS = [check_pixels, check_latent_scale, check_clip_bound, check_schedule, check_oracle, check_one_step,
          check_trace, check_ema, check_weights, check_context]


def run_checks(loaded: LoadedModel, out: Path, num_clips: int = 8, net: str = "ema", seed: int = 1234,
               pixel_transform: PixelTransform | None = None,
               windows: Windows | None = None) -> tuple[list[Check], dict[str, str]]:
    """Every check on `num_clips` validation windows (or the `windows` given). A check that crashes is reported as a
    failure naming the exception (with the traceback on stderr), and the others still run."""
    if windows is None:
        windows = val_windows(loaded.cfg.data, num_clips, loaded.cfg.data.t_future, pixel_transform)
    ctx = Context(loaded, windows, Path(out), net, seed)
    checks: list[Check] = []
    for fn in CHECKS:
        try:
            checks.extend(fn(ctx))
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others' verdicts
            traceback.print_exc()
            name = fn.__name__.removeprefix("check_")
            checks.append(Check(name, FAIL, f"error: {type(e).__name__}", "the check runs",
                                f"the check crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    return checks, ctx.pictures
