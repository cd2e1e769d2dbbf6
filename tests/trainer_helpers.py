"""Builders and readers for the trainer tests: a tiny world (VAE + synthetic clips) shared by a test module, YAML
configs that point into it, the real command line as a subprocess, metrics.jsonl and checkpoint comparisons.

Sizes are the smallest that exercise everything: 16x16 frames, 2 past + 2 future, a two-level 16/32-channel UNet,
6 synthetic clips of 8 frames (windows every 2nd frame: 4 train clips x 3 windows = 12 windows = 3 batches of 4).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

import helpers
from helpers import World

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_video_pred.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def make_world(root: Path) -> World:
    """The trainer tests' world: 6 synthetic clips of 8 16x16 frames (a val split), a two-level UNet with
    attention, 4 steps, jobs off unless a test turns them on."""
    return helpers.make_world(
        root,
        data={"height": 16, "width": 16, "t_past": 2, "t_future": 2, "window_stride": 2, "val_fraction": 0.34,
              "num_workers": 0,
              "synthetic": {"enabled": True, "num_clips": 6, "frames_per_clip": 8, "height": 16, "width": 16}},
        unet={"block_out_channels": [16, 32], "attention": [False, True], "layers_per_block": 1,
              "attention_head_dim": 8, "norm_num_groups": 8},
        sampler={"num_inference_steps": 2},
        train={"batch_size": 4, "max_steps": 4, "log_every": 1},
        optim={"warmup_steps": 2, "lr_schedule": "constant"},
        eval={"visualize_every": 0, "every": 0, "clips": 1, "vis_clips": 1},
        checkpoint={"every": 0})


def write_yaml(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def subprocess_env(tmp: Path, **extra: str) -> dict:
    """Environment for a training subprocess: repo importable, no network, one intra-op thread (tiny tensors on a
    shared 2-core machine), wandb's own files under tmp."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VP_FAULTS")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp / "wandb_cfg"),
               WANDB_CACHE_DIR=str(tmp / "wandb_cache"), WANDB_DATA_DIR=str(tmp / "wandb_data"))
    env.update(extra)
    return env


def run_cli(args: list[str], tmp: Path, timeout: float = 180, torchrun_procs: int = 0,
            **env: str) -> subprocess.CompletedProcess:
    """`python train_video_pred.py ARGS` (or `torchrun --standalone --nproc_per_node=N train_video_pred.py ARGS`)."""
    launcher = ([str(TORCHRUN), "--standalone", f"--nproc_per_node={torchrun_procs}"] if torchrun_procs
                else [sys.executable])
    return subprocess.run([*launcher, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(tmp, **env),
                          capture_output=True, text=True, timeout=timeout)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSON-lines file as an object (fails on a line that is not one)."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        record = json.loads(line)
        assert isinstance(record, dict), f"{path}:{i + 1} is not a JSON object: {line!r}"
        records.append(record)
    return records


def train_records(run_dir: Path) -> dict[int, dict]:
    """step -> the training record of metrics.jsonl (the ones with a loss); a step logged twice is an error."""
    out: dict[int, dict] = {}
    for r in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice in {run_dir}/metrics.jsonl"
            out[r["step"]] = r
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in train_records(run_dir).items()}


def assert_bitwise_equal(a, b, path: str = "state") -> None:
    """Nested dicts/lists of tensors, arrays and plain values are identical, bit for bit (dtype included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: values differ (max |diff| {(a.double() - b.double()).abs().max():.3g})"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), f"{path}: arrays differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
