"""Fault injection at named points, for the reliability tests: `install()` wraps production functions (nothing in
the production modules knows about it); each wrapper does nothing unless VP_FAULTS names its point. In this process
through the tests' fixtures, in a subprocess through tests/fault_launcher.py (which installs, then calls main).

VP_FAULTS is a comma-separated list of `point[:key=value]...`, e.g. `kill:rank=1:step=3:attempt=0`.
Conditions (all optional): rank=R (default: any), step=S (the optimizer steps done when the point is reached),
attempt=A (torchrun's TORCHELASTIC_RESTART_COUNT, 0 on the first attempt), times=N (fire at most N times in this
process), nth=K (fire only the K-th time the point is reached with the other conditions met).
Parameters: secs=X (sleep points, default 3600).

Points in the training step (before any collective of that step):
  raise      RuntimeError("injected fault ...")        sleep    stall for `secs`
  kill       SIGKILL this rank                         sigterm  SIGTERM this rank (a preemption notice)
  sigint     SIGINT this rank (Ctrl-C)
  nan_loss   the loss of that rank/step becomes NaN (the graph stays connected, so the grads are NaN too)
Points in a checkpoint write (rank 0, `step` = the checkpoint's step, from the temp file's name), after half of the
payload is written:
  save_crash SIGKILL in the middle of the write        disk_full the write fails with ENOSPC
  save_sleep stall the write for `secs`
Points elsewhere:
  join_late    sleep `secs` (default 3) before joining the process group
  prune_crash  SIGKILL in retention pruning, right after an old checkpoint is deleted
  worker_kill  a DataLoader worker of that rank SIGKILLs itself at its first training window
  wandb_init_sleep  wandb.init stalls for `secs` (wandb online without a network), then fails
"""
from __future__ import annotations

import errno
import functools
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

_fired: Counter = Counter()  # spec item -> times fired in this process
_reached: Counter = Counter()  # spec item -> times its point was reached with the other conditions met


def reset() -> None:
    """Forget how often each point fired (for `times=N` across runs in one process, as in tests)."""
    _fired.clear()
    _reached.clear()


def enabled() -> bool:
    return bool(os.environ.get("VP_FAULTS"))


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _match(name: str, step: int | None, rank: int | None) -> dict | None:
    """The parameters of the first VP_FAULTS item for `name` whose conditions hold here, else None."""
    spec = os.environ.get("VP_FAULTS", "")
    if not spec:
        return None
    rank = _rank() if rank is None else rank
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if parts[0] != name:
            continue
        cond = dict(p.split("=", 1) for p in parts[1:])
        if "rank" in cond and int(cond["rank"]) != rank:
            continue
        if "step" in cond and (step is None or int(cond["step"]) != step):
            continue
        if "attempt" in cond and int(cond["attempt"]) != attempt:
            continue
        _reached[item] += 1
        if "nth" in cond and _reached[item] != int(cond["nth"]):
            continue
        if "times" in cond and _fired[item] >= int(cond["times"]):
            continue
        _fired[item] += 1
        return cond
    return None


def _say(what: str, step: int | None) -> None:
    print(f"[rank {_rank()}] VP_FAULTS: {what} at step {step}", flush=True)


def at_step(step: int, rank: int) -> None:
    """Fault points `raise`, `sleep`, `kill`, `sigterm` at the start of a training step."""
    if not enabled():
        return
    if _match("raise", step, rank) is not None:
        raise RuntimeError(f"injected fault: raise at step {step} on rank {rank}")
    if (c := _match("sleep", step, rank)) is not None:
        _say("sleep", step)
        time.sleep(float(c.get("secs", 3600)))
    if _match("sigterm", step, rank) is not None:
        _say("sigterm", step)
        os.kill(os.getpid(), signal.SIGTERM)
    if _match("sigint", step, rank) is not None:
        _say("sigint", step)
        os.kill(os.getpid(), signal.SIGINT)
    if _match("kill", step, rank) is not None:
        _say("kill", step)
        os.kill(os.getpid(), signal.SIGKILL)


def corrupt_loss(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fault point `nan_loss`: returns loss * NaN when active."""
    if enabled() and _match("nan_loss", step, rank) is not None:
        return loss * float("nan")
    return loss


def mid_write(f, step: int | None) -> None:
    """Fault points `save_crash`, `disk_full`, `save_sleep`, called with the half-written checkpoint file `f`."""
    if not enabled() or step is None:
        return
    if _match("save_crash", step, None) is not None:
        f.flush()
        os.fsync(f.fileno())  # the partial temp file really is on disk when the process dies
        _say("save_crash", step)
        os.kill(os.getpid(), signal.SIGKILL)
    if _match("disk_full", step, None) is not None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if (c := _match("save_sleep", step, None)) is not None:
        f.flush()
        time.sleep(float(c.get("secs", 3600)))


def after_prune_delete(step: int | None) -> None:
    """Fault point `prune_crash`: SIGKILL right after retention deleted one old checkpoint."""
    if enabled() and _match("prune_crash", step, None) is not None:
        _say("prune_crash", step)
        os.kill(os.getpid(), signal.SIGKILL)


def before_process_group() -> None:
    """Fault point `join_late`: this rank reaches init_process_group `secs` after its peers."""
    if enabled() and (c := _match("join_late", None, None)) is not None:
        time.sleep(float(c.get("secs", 3)))


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn; fault point `worker_kill` (the worker inherits RANK from its rank's process)."""
    if enabled() and _match("worker_kill", None, None) is not None:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- where the points sit in the production code
_in_step: list = [None]  # (step, rank) while Trainer.train_step runs, for nan_loss


def _train_step(original):
    @functools.wraps(original)
    def train_step(self, *args, **kwargs):
        at_step(self.step, self.info.rank)
        _in_step[0] = (self.step, self.info.rank)
        try:
            return original(self, *args, **kwargs)
        finally:
            _in_step[0] = None
    return train_step


def _batch_loss(original):
    @functools.wraps(original)
    def batch_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss if _in_step[0] is None else corrupt_loss(loss, *_in_step[0])
    return batch_loss


class _HalfThenFault:
    """A checkpoint temp file whose first write (the payload) is split in two, with the save points between."""

    def __init__(self, f, step: int):
        self._f, self._step, self._first = f, step, True

    def write(self, data):
        if not self._first:
            return self._f.write(data)
        self._first = False
        half = memoryview(data)[:len(data) // 2]
        self._f.write(half)
        mid_write(self._f, self._step)
        return self._f.write(memoryview(data)[len(half):])

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


_TEMP_CKPT = re.compile(r"^\.ckpt_(\d{9})\.pt\.tmp\.")
_NAME = re.compile(r"^ckpt_(\d{9})\.pt$")


def _checkpoint_open(file, mode="r", *args, **kwargs):
    f = open(file, mode, *args, **kwargs)
    m = _TEMP_CKPT.match(Path(file).name) if "w" in mode else None
    return _HalfThenFault(f, int(m.group(1))) if m and enabled() else f


def _prune(original):
    @functools.wraps(original)
    def prune(folder, keep_last, protect=()):
        names = [_NAME.match(Path(p).name) for p in protect]
        step = max((int(m.group(1)) for m in names if m), default=None)  # the checkpoint just saved
        real_unlink = Path.unlink

        def unlink(path, missing_ok=False):
            real_unlink(path, missing_ok=missing_ok)
            after_prune_delete(step)

        Path.unlink = unlink
        try:
            return original(folder, keep_last, protect=protect)
        finally:
            Path.unlink = real_unlink
    return prune


def _wandb_init(original):
    @functools.wraps(original)
    def init(*args, **kwargs):
        if enabled() and (c := _match("wandb_init_sleep", None, _rank())) is not None:
            _say("wandb_init_sleep", None)
            time.sleep(float(c.get("secs", 3600)))
            raise TimeoutError("injected: wandb.init found no network")
        return original(*args, **kwargs)
    return init


def _init_process_group(original):
    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        before_process_group()
        return original(*args, **kwargs)
    return init_process_group


def _getitem(original):
    @functools.wraps(original)
    def getitem(self, index):
        if torch.utils.data.get_worker_info() is not None:
            worker_init(0)
        return original(self, index)
    return getitem


def install(monkeypatch=None) -> None:
    """Wrap the production functions at the fault points (with pytest's `monkeypatch`, undone after the test)."""
    import video_prediction_trainer
    from model.video_prediction_diffusion import VideoPredictionDiffusion
    from model import checkpoint
    from data.latent_cache import LatentWindowDataset
    from data.dataset import VideoWindowDataset

    def patch(owner, name, value):
        if monkeypatch is not None:
            monkeypatch.setattr(owner, name, value, raising=False)
        else:
            setattr(owner, name, value)

    patch(video_prediction_trainer.Trainer, "train_step", _train_step(video_prediction_trainer.Trainer.train_step))
    patch(VideoPredictionDiffusion, "batch_loss", _batch_loss(VideoPredictionDiffusion.batch_loss))
    patch(checkpoint, "open", _checkpoint_open)
    patch(checkpoint, "prune", _prune(checkpoint.prune))
    patch(dist, "init_process_group", _init_process_group(dist.init_process_group))
    import wandb
    patch(wandb, "init", _wandb_init(wandb.init))
    for dataset in (LatentWindowDataset, VideoWindowDataset):
        patch(dataset, "__getitem__", _getitem(dataset.__getitem__))
    reset()
