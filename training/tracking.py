"""Rank-0 logging: metrics.jsonl always; wandb (online | offline | disabled) and TensorBoard optionally.

wandb is never fatal: if it is missing, fails to start, fails mid-run or hangs at finish, training goes on
with a warning and metrics.jsonl stays complete. It starts in a thread of its own, so rank 0 goes on training
(and the other ranks' collectives never wait for it, whatever ddp.timeout_s is); what is logged before it is up is
sent once it is, and after logging.wandb.init_timeout_s without it, wandb is off for the run.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
import warnings
from pathlib import Path

from configs import config_to_dict, dump_config


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Tracker:
    def __init__(self, run_dir: Path, cfg, config_dict: dict, enabled: bool, resume_id: str | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        self.wandb_id = resume_id
        self.tb = None
        self.finish_timeout_s = cfg.logging.wandb.finish_timeout_s
        self.init_timeout_s = cfg.logging.wandb.init_timeout_s
        self._starting: threading.Thread | None = None  # wandb.init running
        self._queued: list = []  # wandb calls made while it starts, sent once it is up
        self._lock = threading.Lock()
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.wandb.mode != "disabled":
            self._init_deadline = time.monotonic() + self.init_timeout_s
            self._starting = threading.Thread(target=self._start_wandb, args=(cfg, config_dict, resume_id),
                                              name="wandb-init", daemon=True)
            self._starting.start()
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"TensorBoard disabled: {e}", stacklevel=2)

    def _start_wandb(self, cfg, config_dict: dict, resume_id: str | None) -> None:
        w = cfg.logging.wandb
        try:
            import wandb
            run = wandb.init(
                project=w.project, entity=w.entity or None, name=cfg.logging.name or run_dir_name(self.run_dir),
                tags=w.tags or None, mode=w.mode, dir=str(self.run_dir), config=config_dict,
                id=resume_id, resume="allow" if resume_id else None,
                settings={"init_timeout": max(1.0, self.init_timeout_s)})  # a dict: wandb.init takes both forms
        except Exception as e:  # noqa: BLE001 - wandb must never stop training
            run, error = None, e
        with self._lock:
            if self._starting is None:  # given up on meanwhile (_wandb_up, which said so): leave it behind
                return
            self.wandb, self._starting = run, None
            self.wandb_id = run.id if run is not None else self.wandb_id
        if run is None:
            warnings.warn(f"wandb could not start ({type(error).__name__}: {error}); continuing with metrics.jsonl "
                          "only", stacklevel=2)

    def _wandb_up(self) -> bool:
        """Whether wandb calls can be made now; while it starts, False (queue them); past its deadline, give up."""
        with self._lock:
            if self._starting is None:
                queued, self._queued = self._queued, []
            elif time.monotonic() < self._init_deadline:
                return False
            else:
                self._starting, self._queued = None, []
                warnings.warn(f"wandb did not start within logging.wandb.init_timeout_s={self.init_timeout_s:g} s "
                              "(no network?); continuing with metrics.jsonl only", stacklevel=3)
                return False
        for what, fn in queued:  # what was logged while it started, in order
            self._wandb_call(what, fn)
        return self.wandb is not None

    def _wandb_call(self, what: str, fn) -> None:
        if self.wandb is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"wandb failed at {what} ({type(e).__name__}: {e}); wandb off for the rest of the run",
                          stacklevel=3)
            self.wandb = None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self._send("log", lambda: self.wandb.log(metrics, step=step))
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(_jsonable(v), (int, float)):
                    self.tb.add_scalar(k, _jsonable(v), step)

    def _send(self, what: str, fn) -> None:
        """A wandb call now, or queued while wandb starts."""
        if self._starting is not None and not self._wandb_up():
            with self._lock:
                if self._starting is not None:
                    self._queued.append((what, fn))
                    return
            if not self._wandb_up():  # it came up meanwhile (True), or was given up (False)
                return
        self._wandb_call(what, fn)

    def log_media(self, images: dict[str, Path], videos: dict[str, Path], step: int) -> None:
        if not self.enabled or (self.wandb is None and self._starting is None):
            return

        def send():
            import wandb
            media = {k: wandb.Image(str(p)) for k, p in images.items()}
            media.update({k: wandb.Video(str(p), format="gif") for k, p in videos.items()})
            self.wandb.log(media, step=step)

        self._send("log_media", send)

    def close(self, timeout_s: float | None = None) -> None:
        """Close wandb in a daemon thread so a hanging finish cannot keep the process alive
        (waits logging.wandb.finish_timeout_s)."""
        if not self.enabled:
            return
        timeout_s = self.finish_timeout_s if timeout_s is None else timeout_s
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self._starting is not None:  # still starting: wait for it until its deadline, then send what is queued
            self._starting.join(max(0.0, self._init_deadline - time.monotonic()))
            self._wandb_up()
        if self.wandb is not None:
            run = self.wandb
            t = threading.Thread(target=lambda: self._wandb_call("finish", run.finish), daemon=True)
            t.start()
            t.join(timeout_s)
            if t.is_alive():
                warnings.warn(f"wandb.finish did not return within {timeout_s:.0f} s; leaving it behind", stacklevel=2)


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl without the records of steps after `step` and without torn lines; returns how many
    lines were dropped. On resume: a run killed after its last checkpoint logged steps that the resumed run logs
    again (with other values), and a kill mid-write can leave half a line that the next record would be glued to."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def run_dir_name(run_dir: Path) -> str:
    return Path(run_dir).name


RUN_ITEMS = ("checkpoints", "metrics.jsonl", "eval", "samples", "profile", "tensorboard", "wandb", "config.yaml")


def earlier_run(run_dir: Path) -> list[str]:
    """What of an earlier run `run_dir` holds (its checkpoints, its metrics); [] for a new or empty folder."""
    run_dir = Path(run_dir)
    found = []
    if any((run_dir / "checkpoints").glob("ckpt_*")):
        found.append("checkpoints/")
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        found.append("metrics.jsonl")
    return found


def clear_run_folder(run_dir: Path) -> list[str]:
    """Rank 0, on --overwrite: delete what an earlier run wrote into `run_dir` (RUN_ITEMS); returns their names."""
    removed = []
    for name in RUN_ITEMS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def make_run_folder(run_dir: Path) -> None:
    """Rank 0: the run folder with samples/ (grids, GIFs) and eval/ (tables)."""
    for sub in ("samples", "eval"):
        (Path(run_dir) / sub).mkdir(parents=True, exist_ok=True)


def start(run_dir: Path, cfg, info, resumed_from: Path | None, step: int, wandb_id: str | None,
          say=print) -> Tracker:
    """The resolved config written into the run folder, metrics.jsonl cut back to the resumed step, and the
    tracker (rank 0 writes; on the other ranks it does nothing)."""
    if info.is_main:
        dump_config(cfg, Path(run_dir) / "config.yaml")
        # also with no checkpoint to resume (--resume latest before the first save): that attempt's records go
        if (n := drop_records_after(Path(run_dir) / "metrics.jsonl", step)):
            say(f"metrics.jsonl: dropped {n} record(s) logged after step {step} (they are redone now)")
    return Tracker(Path(run_dir), cfg, config_to_dict(cfg), enabled=info.is_main, resume_id=wandb_id)
