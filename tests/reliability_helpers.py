"""Shared pieces of the reliability suite (tests/test_reliability_*.py): a tiny world, launching the real command line
(one process or torchrun with 2 gloo ranks) with faults injected through VP_FAULTS, timestamped output, bitwise
checkpoint comparison, and the figures each test records.

Sizes: 16x16 frames, 2 past + 2 future, a two-level 16/32-channel UNet without attention (dropout 0.1, so the
global RNG matters to exact resume), 4 synthetic clips of 8 frames, no val split (no evaluation or pictures: these
tests are about failures, not quality).
20 windows; global batch 4 = 2 ranks x 2, so an epoch is 5 optimizer steps and an 8-step run crosses an epoch.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from helpers import World

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_video_pred.py"
FAULT_LAUNCHER = Path(__file__).resolve().with_name("fault_launcher.py")  # main() with the fault points installed
TORCHRUN = Path(sys.executable).with_name("torchrun")
FIGURES_FILE = os.environ.get("VP_RELIABILITY_FIGURES")  # where record() appends one JSON line per figure


def record(item: str, **figures) -> None:
    """A figure for the report (trials, faults survived, seconds to exit, bytes lost), printed and, when
    VP_RELIABILITY_FIGURES names a file, appended to it as one JSON line."""
    line = json.dumps({"item": item, **figures}, default=str)
    print(f"FIGURE {line}")
    if FIGURES_FILE:
        with open(FIGURES_FILE, "a") as f:
            f.write(line + "\n")


def make_world(root: Path, **changes: dict) -> World:
    """The reliability tests' world: 4 synthetic clips of 8 16x16 frames, no val split, a two-level UNet without
    attention and with dropout 0.1 (so the global RNG matters to exact resume), 8 steps, a checkpoint every 2.
    `changes`: keys replaced within a section, e.g. eval={"every": 4}."""
    sections = dict(
        data={"height": 16, "width": 16, "t_past": 2, "t_future": 2, "val_fraction": 0.0, "num_workers": 0,
              "synthetic": {"enabled": True, "num_clips": 4, "frames_per_clip": 8, "height": 16, "width": 16}},
        unet={"block_out_channels": [16, 32], "attention": [False, False], "layers_per_block": 1, "dropout": 0.1,
              "attention_head_dim": 8, "norm_num_groups": 8},
        sampler={"num_inference_steps": 2},
        train={"batch_size": 4, "max_steps": 8, "log_every": 1},
        optim={"warmup_steps": 2},
        ema={"decay": 0.99},
        eval={"visualize_every": 0, "every": 0},
        checkpoint={"every": 2, "keep_last": 3},
        ddp={"timeout_s": 30})
    for section, keys in changes.items():
        sections[section] = {**sections.get(section, {}), **keys}
    return helpers.make_world(root, **sections)


def child_env(tmp: Path, faults: str = "", **extra: str) -> dict:
    """A training subprocess's environment: repo importable, offline, one intra-op thread, faults as given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VP_FAULTS", "TORCHELASTIC_RESTART_COUNT")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               WANDB_SILENT="true", WANDB_DIR=str(tmp), PYTHONUNBUFFERED="1")
    if faults:
        env["VP_FAULTS"] = faults
    env.update(extra)
    return env


@dataclass
class Run:
    """A launched command: its process, every output line with the time it arrived, and when it exited."""
    proc: subprocess.Popen
    t0: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    t_exit: float | None = None

    @property
    def out(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def time_of(self, pattern: str) -> float | None:
        """Seconds after launch at which a line matching `pattern` (regex) first appeared."""
        rx = re.compile(pattern)
        return next((t - self.t0 for t, line in self.lines if rx.search(line)), None)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and every rank: nothing outlives a test
            self.proc.wait()
            raise AssertionError(f"still running after {timeout} s (killed)\n{self.tail()}")
        self._reader.join(10)
        self.t_exit = time.monotonic()
        return rc

    @property
    def seconds(self) -> float:
        return self.t_exit - self.t0

    def tail(self, n: int = 60) -> str:
        keep = [line for _, line in self.lines
                if not re.fullmatch(r"\s*[\w ]+:\s+\d+%\|.*", line)]  # tqdm redraws, unless something follows
        return "\n".join(keep[-n:])


def launch(args: list[str], tmp: Path, nproc: int = 0, faults: str = "", torchrun_args: tuple = (),
           cwd: Path = REPO, standalone: bool = True, **env: str) -> Run:
    """Start `python train_video_pred.py ARGS`, or torchrun with `nproc` ranks (gloo on CPU; one node unless
    `standalone` is False and torchrun_args give the rendezvous), in `cwd` and its own process group; stdout and
    stderr are merged and timestamped line by line."""
    launcher = ([str(TORCHRUN), *(["--standalone"] if standalone else []), f"--nproc_per_node={nproc}",
                 *torchrun_args] if nproc else [sys.executable])
    script = FAULT_LAUNCHER if faults else SCRIPT
    proc = subprocess.Popen([*launcher, str(script), *args, "--device", "cpu"], cwd=cwd,
                            env=child_env(tmp, faults, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    run = Run(proc, time.monotonic())

    def read():
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):  # tqdm redraws with \r
                run.lines.append((time.monotonic(), part))

    run._reader = threading.Thread(target=read, daemon=True)
    run._reader.start()
    return run


def run_to_end(args: list[str], tmp: Path, timeout: float = 240, **kw) -> tuple[int, Run]:
    run = launch(args, tmp, **kw)
    return run.wait(timeout), run


def flatten(x, prefix: str = "") -> dict:
    """Nested dicts/lists of a checkpoint -> {dotted path: leaf}."""
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in flatten(v, f"{prefix}.{k}").items()}
    if isinstance(x, (list, tuple)):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in flatten(v, f"{prefix}[{i}]").items()}
    return {prefix: x}


def differences(a: dict, b: dict, sections: tuple[str, ...]) -> list[str]:
    """Paths under `sections` of two checkpoint states whose leaves differ bit for bit (dtype and shape included)."""
    fa = flatten({s: a.get(s) for s in sections})
    fb = flatten({s: b.get(s) for s in sections})
    out = [k for k in sorted(set(fa) ^ set(fb))]
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y))
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            same = np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype
        else:
            same = x == y
        if not same:
            out.append(k)
    return out


TRAINING_STATE = ("unet", "ema", "optimizer", "lr_scheduler", "step", "epoch", "position", "nonfinite_skips", "rng")


def ckpt_files(run_dir: Path) -> dict[int, Path]:
    from model.checkpoint import list_checkpoints
    return {int(p.stem.split("_")[1]): p for p in list_checkpoints(Path(run_dir) / "checkpoints")}


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if ".tmp" in p.name) if Path(folder).is_dir() else []


@pytest.fixture
def cli(monkeypatch):
    """`train_video_pred.main(args)` in this process, one rank (imports paid once), with the fault points installed;
    VP_FAULTS from the test's env. Restores the signal handlers that Trainer.fit installs."""
    import train_video_pred
    import faults

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VP_FAULTS", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    faults.install(monkeypatch)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield lambda *args: train_video_pred.main([*map(str, args), "--device", "cpu"])
    for s, handler in saved.items():
        signal.signal(s, handler)
