"""The training loop: one optimizer step, then named jobs on their own cadence (log, visualise, evaluate, save).

The Trainer receives finished parts (built in order by `train_video_pred.build`) and owns only the loop. One code
path for 1 process, torchrun on N GPUs and several nodes. Every collective is entered by every rank; jobs decide
for themselves what runs on rank 0. Randomness is derived, never saved: each step's from (train.seed, rank, step)
(`_seed_step`), the data order from (train.seed, epoch), a fixed visualisation batch and noise seed, so grids at step
1k and 50k compare.
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from configs import Config, config_to_dict
from data.dataset import VideoWindowDataset
from data.windows import spread
from data.workers import ignore_stop_signals
from model import VideoPredictionDiffusion
from model import checkpoint as ckpt
from training.distributed import DistInfo, StallWatchdog, all_reduce, broadcast_object, printer, step_seed
from training.evaluation import evaluate, format_table
from training.optim import Optimization
from training.profiling import StepProfiler
from training.resume import Progress
from training.tracking import Tracker
from training.visualize import clip_gif, sample_grid

EXIT_PREEMPTED = 143  # 128 + SIGTERM: saved and stopped on request; `--resume latest` continues
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the same after Ctrl-C (a second Ctrl-C exits at once, without saving)


class TrainingHalted(RuntimeError):
    """Raised on every rank together (non-finite loss/gradient with train.nonfinite=halt, or too many skips)."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1/SIGINT was received by some rank; every rank saved and stops. `exit_code`: 130 on a rank
    that got SIGINT, else 143."""

    def __init__(self, message: str, exit_code: int = EXIT_PREEMPTED):
        super().__init__(message)
        self.exit_code = exit_code


class WriteFailed(RuntimeError):
    """A log or picture could not be written (a full disk); every rank saved after the next step and stopped."""


class _EpochStream(torch.utils.data.Sampler):
    """The rank's window indices epoch after epoch, without end, from (epoch, skip_batches) on. Each epoch is the
    DistributedSampler's order for that epoch cut to whole batches (what drop_last did per epoch), so the order is
    that of one DataLoader per epoch; but one endless iterator lets the workers prefetch across epoch boundaries,
    where a new iterator per epoch stalled every step that starts an epoch (BENCHMARKS.md)."""

    def __init__(self, sampler: DistributedSampler, batch: int, epoch: int, skip_batches: int):
        self.sampler, self.batch, self.epoch, self.skip = sampler, batch, epoch, skip_batches

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            yield from order[skip * self.batch:len(order) // self.batch * self.batch]
            epoch, skip = epoch + 1, 0


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path, model: VideoPredictionDiffusion,
                 net: torch.nn.Module, optim: Optimization, train_set: Dataset, val_set: VideoWindowDataset | None,
                 tracker: Tracker, progress: Progress):
        """model: the VAE, UNet and schedule; net: the UNet as trained (DDP, compiled); optim: AdamW, LR schedule
        and EMA, all already restored from a checkpoint when resuming; progress: where training stands."""
        tc = cfg.train
        self.cfg, self.info, self.run_dir, self.device = cfg, info, Path(run_dir), info.device
        self.model, self.unet, self.net = model, model.unet, net
        self.optimizer, self.lr_scheduler, self.ema, self.ema_unet = (optim.optimizer, optim.lr_scheduler, optim.ema,
                                                                      optim.ema_unet)
        self.train_set, self.val_set, self.tracker = train_set, val_set, tracker
        self.print = printer(info)

        # ---- the training data's order: the rank's share of each epoch, resumable at any batch
        self.micro_batch = tc.batch_size // (info.world_size * tc.grad_accum_steps)
        self.sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=tc.seed, drop_last=True)
        self.batches_per_epoch = len(self.sampler) // self.micro_batch
        self._iter = None

        # ---- randomness of the training step (t, noise, posterior draws, condition dropout): reseeded each step
        self.generator = torch.Generator(self.device)

        # ---- state that checkpoints carry
        self.step, self.epoch, self.position = progress.step, progress.epoch, progress.position
        self.nonfinite_skips = progress.nonfinite_skips
        self.resumed_from = progress.resumed_from

        # ---- the loop's own state
        self.stop_requested = False  # set on every rank at the same step, from the all-reduced flags
        self._signalled = False  # this rank got SIGTERM/SIGUSR1/SIGINT; goes into the next step's flags
        self._signal_name = ""  # the first of them, for the log and the exit code
        self._write_error = ""  # rank 0: a log or picture write that failed (stop after a save, then exit 1)
        self._pending = None  # (step, host flags, CUDA event, lr) of the step whose flags are not read yet
        pin = self.device.type == "cuda"
        self._host_flags = [torch.zeros(4, pin_memory=pin) for _ in range(2)]  # two: step k+1 fills one while k is read
        self._t_log, self._last_log_step = time.perf_counter(), self.step
        self._vis_indices = self._fixed_indices(cfg.eval.vis_clips)
        self._eval_indices = self._fixed_indices(cfg.eval.clips or 10 ** 9)

    # ------------------------------------------------------------------ small helpers
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _fixed_indices(self, n: int) -> list[int]:
        """n val windows evenly spread over the val split (deterministic, so pictures compare across steps)."""
        return [] if self.val_set is None else spread(len(self.val_set), n)

    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.train.mixed_precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _disk_write(self, path: Path | str):
        """Rank 0's write of a log, table or picture (`path`: what it writes). An OSError (a full disk) does not stop
        the step in the middle: the file is named, this rank asks every rank to save after the next step and stop
        (the SIGTERM path), and fit() then ends with WriteFailed."""
        try:
            yield
        except OSError as e:
            if not self._write_error:
                self._write_error = f"could not write {e.filename or path}: {e.strerror or e}"
                self.print(f"error: {self._write_error}; saving a checkpoint after the next step, then stopping")
            self._signalled = True

    def _ema_net(self) -> torch.nn.Module:
        if self.ema is not None:
            self.ema.copy_to(self.ema_unet.parameters())
        return self.ema_unet

    def _seed_step(self) -> None:
        """This step's randomness on this rank, a pure function of (train.seed, rank, step): the step's generator
        (t, noise, posterior draws, condition dropout) and the global RNG of the CPU and of this rank's GPU (nn.Dropout
        in the UNet, compiled or not). Nothing to save: a resume draws at step s what an uninterrupted run drew there,
        whatever ran in between (evaluation, a cache build, a new DataLoader). About 10 us a step; not
        torch.manual_seed, which on a CPU-only run queues a lazy CUDA seed with a formatted stack each call (0.3 ms)."""
        seed, rank = self.cfg.train.seed, self.info.rank
        self.generator.manual_seed(step_seed(seed, rank, self.step, "noise"))
        global_seed = step_seed(seed, rank, self.step, "global")
        torch.default_generator.manual_seed(global_seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(global_seed)  # the current device: this rank's

    # ------------------------------------------------------------------ data iteration (resumable)
    def _next_batch(self) -> dict:
        if self._iter is None:  # once per run (and per resume): workers persist and prefetch across epochs
            self.epoch += self.position // self.batches_per_epoch  # a checkpoint taken at an epoch's very end
            self.position %= self.batches_per_epoch
            stream = _EpochStream(self.sampler, self.micro_batch, self.epoch, self.position)
            # the order is the sampler's, a function of (train.seed, epoch); the generator only gives the workers'
            # base seed (the data pipeline draws no random numbers), and keeps the iterator off the global RNG
            worker_seeds = torch.Generator().manual_seed(
                step_seed(self.cfg.train.seed, self.info.rank, self.step, "loader"))
            loader = DataLoader(self.train_set, batch_size=self.micro_batch, sampler=stream,
                                num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                generator=worker_seeds, worker_init_fn=ignore_stop_signals)
            self._iter = iter(loader)
        batch = next(self._iter)
        self.position += 1
        if self.position >= self.batches_per_epoch:  # the epoch's last batch: the next one starts epoch + 1
            self.epoch += 1
            self.position = 0
        return batch

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batch: dict | None = None) -> dict:
        """One optimizer step on the next micro-batches (or on `batch` for each of them). Returns the metrics of the
        step BEFORE this one ({} at the first): each step's flags (mean loss, any rank non-finite, any rank asked to
        stop) are read one step late, so the host never waits for the GPU here (16% faster, BENCHMARKS.md).

        A step whose loss or gradient is not finite on any rank changes neither the weights nor AdamW's moments:
        its update is masked on the device. It keeps its number (the LR schedule and the EMA advance, as with AMP's
        GradScaler; the EMA moves towards the unchanged weights), is not logged, and train.nonfinite decides, one
        step late, whether training halts or goes on."""
        tc = self.cfg.train
        accum = tc.grad_accum_steps
        self._seed_step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            micro_batch = self._next_batch() if batch is None else batch
            sync = contextlib.nullcontext() if (micro == accum - 1 or not self.info.enabled) else self.net.no_sync()
            with sync:
                with self._autocast():
                    loss = self.model.batch_loss(micro_batch, self.generator, net=self.net) / accum
                loss.backward()
            loss_sum += loss.detach()
        params = [p for p in self.unet.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        # one collective per step. new_full fills on the device; torch.tensor(..., device=cuda) would be a blocking
        # copy, a host-GPU sync in every step
        flags = torch.stack([loss_sum.float(), (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float(),
                             loss_sum.new_full((), float(self._signalled)), grad_norm.float()])
        all_reduce(flags, self.info)
        # fused AdamW reads `found_inf` the way torch.amp.GradScaler sets it: 1 leaves that step's update out
        self.optimizer.found_inf = (flags[1] > 0).float()  # 0-dim, like the step counters it is subtracted from
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.unet.parameters())
        self.step += 1
        host = self._host_flags[self.step % 2]
        host.copy_(flags, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        previous, self._pending = self._pending, (self.step, host, event, self.lr_scheduler.get_last_lr()[0])
        return self._settle(previous) if previous is not None else {}

    def flush(self) -> dict:
        """Read the last step's flags now (waits for the GPU); its metrics, or {} if there is none."""
        pending, self._pending = self._pending, None
        return self._settle(pending) if pending is not None else {}

    def _settle(self, pending: tuple) -> dict:
        step, host, event, lr = pending
        if event is not None:
            event.synchronize()
        loss_sum, nonfinite, stop, norm_sum = host.tolist()
        loss_mean = loss_sum / self.info.world_size
        self.stop_requested |= stop > 0
        if nonfinite > 0:
            self._on_nonfinite(loss_mean, step - 1)
            return {"step": step, "loss": loss_mean, "nonfinite": 1}
        self.nonfinite_skips = 0
        return {"step": step, "loss": loss_mean, "grad_norm": norm_sum / self.info.world_size, "lr": lr}

    def _on_nonfinite(self, loss_mean: float, index: int) -> None:
        """A non-finite step (0-based `index`, its update masked): raise (halt, or too many in a row) or go on."""
        tc = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        if tc.nonfinite == "halt":
            raise TrainingHalted(f"non-finite loss or gradient at step {index} (mean loss {loss_mean}) on at "
                                 "least one rank; its update was masked and training stopped (train.nonfinite=halt). "
                                 "Lower optim.lr, check the data, or set train.nonfinite=skip")
        self.nonfinite_skips += 1
        self.print(f"warning: non-finite loss/gradient at step {index}; step skipped, its update masked "
                   f"({self.nonfinite_skips}/{tc.max_nonfinite_skips} in a row)")
        if self.nonfinite_skips >= tc.max_nonfinite_skips:
            raise TrainingHalted(f"{self.nonfinite_skips} non-finite steps in a row (train.max_nonfinite_skips); "
                                 "giving up")

    # ------------------------------------------------------------------ jobs on their own cadence
    def _due(self, every: int, step: int | None = None) -> bool:
        return every > 0 and (self.step if step is None else step) % every == 0

    def _jobs_due(self) -> bool:
        """Whether a job that reads the weights or saves runs after this step (the same answer on every rank)."""
        cfg = self.cfg
        return self.step >= cfg.train.max_steps or any(self._due(e) for e in (cfg.eval.visualize_every, cfg.eval.every,
                                                                                  cfg.checkpoint.every))

    def log(self, metrics: dict, force: bool = False) -> None:
        step = metrics.get("step", self.step)
        if not (force or self._due(self.cfg.train.log_every, step)) or "loss" not in metrics or "nonfinite" in metrics:
            return
        now = time.perf_counter()
        steps = step - self._last_log_step
        metrics = {**metrics, "epoch": self.epoch,
                   "samples_per_s": steps * self.cfg.train.batch_size / max(now - self._t_log, 1e-9)}
        if self.ema is not None:
            metrics["ema_decay"] = self.ema.get_decay(self.ema.optimization_step)
        self._t_log, self._last_log_step = now, step
        with self._disk_write(self.run_dir / "metrics.jsonl"):
            self.tracker.log({k: v for k, v in metrics.items() if k != "step"}, step)

    @torch.no_grad()
    def visualize(self, force: bool = False) -> None:
        """Rank 0: grid of fixed val clips (past | truth | EMA | raw | |error|) and a GIF per clip."""
        if not (force or self._due(self.cfg.eval.visualize_every)) or not self.info.is_main or not self._vis_indices:
            return
        items = [self.val_set[i] for i in self._vis_indices]
        frames = torch.stack([it["frames"] for it in items])
        cond = torch.stack([it["cond"] for it in items])
        past, truth = frames[:, :self.model.t_past], frames[:, self.model.t_past:]
        nets = {"ema": self._ema_net(), "raw": self.unet} if self.ema is not None else {"prediction": self.unet}
        preds = {}
        for name, net in nets.items():
            g = torch.Generator().manual_seed(self.cfg.train.seed + 4242)  # same noise every time
            with self._autocast():
                preds[name] = self.model.predict(past, cond, generator=g, net=net).cpu()
        out = self.run_dir / "samples"
        with self._disk_write(out / f"step_{self.step:07d}.png"):
            grid = sample_grid(past, truth, preds, out / f"step_{self.step:07d}.png")
            gifs = {f"samples/clip{j}": clip_gif(past[j], truth[j], {k: v[j] for k, v in preds.items()},
                                                 out / f"step_{self.step:07d}_clip{j}.gif") for j in range(len(items))}
            self.tracker.log_media({"samples/grid": grid}, gifs, self.step)

    @torch.no_grad()
    def evaluate(self, force: bool = False) -> dict | None:
        """All ranks: PSNR/SSIM per horizon step on the val split; rank 0 writes eval/step_<step>.json."""
        if not (force or self._due(self.cfg.eval.every)) or not self._eval_indices:
            return None
        nets = {"model": self._ema_net()}
        if self.ema is not None:
            nets["raw"] = self.unet
        steps = self.cfg.eval.steps or self.cfg.sampler.num_inference_steps
        with self._autocast():
            result = evaluate(self.model, self.val_set, self._eval_indices, self.info, nets, steps,
                              batch_size=max(self.micro_batch, 1), seed=self.cfg.train.seed + 777,
                              samples=self.cfg.eval.samples, precision=self.cfg.train.mixed_precision)
        result = {"step": self.step, **result}
        if self.info.is_main:
            path = self.run_dir / "eval" / f"step_{self.step:07d}.json"
            with self._disk_write(path):
                path.write_text(json.dumps(result, indent=1))
            scalars = {f"eval/{m}_{k}": sum(v) / len(v) for m in ("psnr", "ssim") for k, v in result[m].items()}
            with self._disk_write(self.run_dir / "metrics.jsonl"):
                self.tracker.log(scalars, self.step)
        return result

    def save(self, force: bool = False) -> Path | None:
        """Rank 0 writes atomically; all ranks agree on success."""
        if not (force or self._due(self.cfg.checkpoint.every)):
            return None
        error = None
        path = None
        if self.info.is_main:
            try:
                if not all(torch.isfinite(p).all() for p in self.unet.parameters()):
                    raise ckpt.CheckpointError(f"refusing to save step {self.step}: the weights are not finite")
                path = ckpt.save_checkpoint(self._state(), self.ckpt_dir, self.step, self.cfg.checkpoint.keep_last,
                                            protect=(self.resumed_from,) if self.resumed_from else ())
            except ckpt.CheckpointError as e:
                error = str(e)
        error = broadcast_object(error, self.info)
        if error:
            raise ckpt.CheckpointError(error)
        return path

    def _state(self) -> dict:
        """What a resume needs. No RNG state: each step's randomness is derived from (train.seed, rank, step)."""
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "step": self.step, "epoch": self.epoch, "position": self.position,
                "nonfinite_skips": self.nonfinite_skips, "world_size": self.info.world_size,
                "config": config_to_dict(self.cfg), "vae": self.model.vae.identity(),
                "model_args": {"latent_channels": self.unet.latent_channels, "t_past": self.unet.t_past,
                               "t_future": self.unet.t_future, "cond_dim": self.unet.cond_dim},
                "wandb_id": self.tracker.wandb_id if self.info.is_main else None}

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGUSR1/SIGINT only set a flag; every rank agrees on it at the next step, saves and stops. A second
        SIGINT (Ctrl-C again) raises KeyboardInterrupt at once, without saving. Returns the old handlers."""
        def handler(signum, frame):
            if signum == signal.SIGINT and self._signal_name == "SIGINT":
                raise KeyboardInterrupt
            if not self._signalled:
                self._signal_name = signal.Signals(signum).name
                tqdm.write(f"[rank {self.info.rank}] {self._signal_name}: saving a checkpoint after this step, then "
                           "stopping" + (" (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else ""))
            self._signalled = True
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def _report(self, metrics: dict, bar) -> None:
        if "loss" in metrics and "nonfinite" not in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        self.log(metrics)

    def fit(self) -> dict | None:
        tc = self.cfg.train
        previous_handlers = self._install_signal_handlers()
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step", disable=not self.info.is_main,
                   dynamic_ncols=True)
        start = self.step
        # a rank stuck in a step exits by itself (multi-rank only; the first step may compile for minutes)
        watchdog = StallWatchdog(self.cfg.ddp.timeout_s, self.info.rank) if self.info.enabled else None
        profiler = StepProfiler(self.cfg.profile.at, self.cfg.profile.steps, self.run_dir / "profile", self.info.rank, self.device)
        try:
            while self.step < tc.max_steps:
                first = self.step == start
                with contextlib.nullcontext() if watchdog is None or first else watchdog.guard(f"step {self.step}"):
                    profiler.before_step(self.step)
                    metrics = self.train_step()
                    if (written := profiler.after_step(self.step)) is not None:
                        self.print(f"profile of steps {self.cfg.profile.at}..{self.step - 1}: {written.parent}")
                    if self.stop_requested or self._jobs_due():
                        self._report(metrics, bar)  # the step before; then this one, before jobs read the weights
                        metrics = self.flush()
                if self.stop_requested:
                    self.log(metrics, force=True)  # the saved step, whatever the cadence: a resume logs from the next
                    self.save(force=True)
                    if self._write_error:
                        raise WriteFailed(f"{self._write_error}; saved step {self.step} and stopped: free space, "
                                          "then continue with --resume latest")
                    raise Preempted(f"stop requested (SIGTERM/SIGUSR1/SIGINT): saved step {self.step}; "
                                    "continue with --resume latest",
                                    EXIT_INTERRUPTED if self._signal_name == "SIGINT" else EXIT_PREEMPTED)
                bar.update(1)
                self._report(metrics, bar)
                if self.step < tc.max_steps:  # the final step's jobs run once, forced, below
                    self.visualize()
                    self.evaluate()
                    self.save()
            bar.close()
            self.save(force=True)  # first: a failure in the final sampling below loses nothing
            self.visualize(force=True)
            result = self.evaluate(force=True)
            if self._write_error:  # in the final jobs: the final checkpoint is already saved
                raise WriteFailed(f"{self._write_error}; the final checkpoint (step {self.step}) is saved")
            if result is not None:
                self.print(format_table(result))
            self.print(f"run folder: {self.run_dir}  (samples/: grids and GIFs, eval/: tables, checkpoints/)")
            return result
        finally:
            bar.close()
            self.tracker.close()
            for sig, old in previous_handlers.items():  # leave the process as we found it
                signal.signal(sig, old)
