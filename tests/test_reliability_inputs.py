"""Reliability against bad input: broken frames and clips, config traps, broken VAEs, a failing or hanging wandb,
non-finite losses that do not stop. Runs the real entry point (`train_video_pred.main`) in this process as one rank,
or as a subprocess / torchrun where the exit code or both ranks are the point.

Each test records its figures (trials, faults survived, seconds to exit, bytes lost) with `record`.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
import types

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image

from configs.loader import config_from_dict
from data import check_clips, discover_clips
from helpers import one_torch_thread, tiny_kl_vae, tiny_vae_folder  # noqa: F401  (autouse: one intra-op thread)
import faults
from reliability_helpers import ckpt_files, cli, make_world, record, run_to_end  # noqa: F401
from model.checkpoint import load_checkpoint
from training.distributed import DistInfo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("inputs_world"))


# ---------------------------------------------------------------------------------------------- 8. bad data

def bad_world(world, root):
    """The 4 good clips plus: a zero-byte, a truncated, a random-bytes and an RGBA frame in copies of them, a clip of
    3 frames (a window needs 4) and a clip with frame 4 missing. Returns (root, every path the scan must name)."""
    src = world.root / "world"
    for i in range(4):
        shutil.copytree(src / f"clip_{i:04d}", root / f"good_{i}")
    bad = {}
    for name, frame, how in (("zero", 3, "zero"), ("trunc", 5, "trunc"), ("noise", 2, "noise"), ("rgba", 6, "rgba")):
        shutil.copytree(src / "clip_0000", root / name)
        p = root / name / f"{frame:06d}.png"
        if how == "zero":
            p.write_bytes(b"")
        elif how == "trunc":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        elif how == "noise":
            p.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
        else:
            Image.open(p).convert("RGBA").save(p)
        bad[name] = p
    (root / "short").mkdir()
    for i in range(3):
        shutil.copy(src / "clip_0001" / f"{i:06d}.png", root / "short")
    shutil.copytree(src / "clip_0002", root / "gap")
    (root / "gap" / "000004.png").unlink()
    bad["short"], bad["gap"] = root / "short", root / "gap"
    return root, bad


def test_bad_data_is_caught_by_the_scan_before_training_with_every_path_listed(world, tmp_path, cli, capfd):
    root, bad = bad_world(world, tmp_path / "frames")
    run_dir = tmp_path / "runs" / "b"
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "b", **{"data.root": str(root),
                                                                     "data.synthetic.enabled": False})
    t0 = time.monotonic()
    assert cli("--config", cfg) == 2  # data.bad_data=error (the default): a user error, one listing
    seconds = time.monotonic() - t0
    err = capfd.readouterr().err
    assert "[rank 0] error: DataError: scan:" in err and "data.bad_data=error" in err and "Traceback" not in err
    for name, path in bad.items():
        assert str(path) in err, f"{name}: {path} is not listed\n{err}"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()

    # skip, but more than data.max_bad_fraction of the frames are bad: abort, listing them too
    assert cli("--config", cfg, "data.bad_data=skip", "data.max_bad_fraction=0.01") == 2
    err = capfd.readouterr().err
    assert "above data.max_bad_fraction=0.01" in err and all(str(p) in err for p in bad.values()), err
    assert not (run_dir / "checkpoints").exists()
    record("8 bad data (abort)", trials=2, bad_paths=len(bad), all_listed=True, seconds_to_exit=round(seconds, 1))


def test_bad_data_skip_is_a_pure_function_of_the_files(world, tmp_path):
    """The skip decision (made by rank 0 and broadcast) is the same whoever computes it, with or without a pool."""
    root, bad = bad_world(world, tmp_path / "frames")
    data = config_from_dict(world.config(tmp_path, **{"data.root": str(root), "data.synthetic.enabled": False,
                                                      "data.bad_data": "skip", "data.max_bad_fraction": 0.5})).data
    kept_inline, report_inline = check_clips(discover_clips(data), data, workers=0, progress=False)
    kept_pool, report_pool = check_clips(discover_clips(data), data, workers=2, progress=False)
    assert kept_inline == kept_pool and report_inline.problems == report_pool.problems
    listed = {p.path for p in report_inline.problems}
    assert {str(p) for p in bad.values()} <= listed
    names = {c.name for c in kept_inline}
    assert "short" not in names and {f"good_{i}" for i in range(4)} <= names
    assert not names & {"zero", "trunc", "noise", "rgba", "gap"}  # cut at the bad frame or gap, kept as runs
    assert {"trunc@000000", "rgba@000000", "gap@000000"} <= names


@pytest.mark.slow
def test_bad_data_skip_under_torchrun_trains_on_both_ranks(world, tmp_path):
    root, bad = bad_world(world, tmp_path / "frames")
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "s",
                     **{"data.root": str(root), "data.synthetic.enabled": False, "data.bad_data": "skip",
                        "data.max_bad_fraction": 0.5, "train.max_steps": 4})
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, nproc=2)
    assert rc == 0, run.tail()
    assert "skipping them (data.bad_data=skip)" in run.out
    assert all(run.out.count(str(p)) >= 1 for p in bad.values()), run.tail()
    assert sorted(ckpt_files(tmp_path / "runs" / "s")) == [2, 4]
    record("8 bad data (skip, torchrun)", trials=1, bad_paths=len(bad), seconds_total=round(run.seconds, 1))


# ---------------------------------------------------------------------------------------------- 9. config traps

def _yaml_with(world, tmp_path, name, lines: str):
    """The world's config as YAML with raw lines `section: key: value` inserted at the top of their section (to
    write what a dict cannot hold: duplicate keys, quoted numbers)."""
    text = yaml.safe_dump(world.config(tmp_path / "runs", "t"), sort_keys=False)
    for line in lines.splitlines():
        section, entry = line.split(": ", 1)
        text = text.replace(f"\n{section}:\n", f"\n{section}:\n  {entry}\n", 1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


TRAPS = {
    "unknown_key": ("train: batchsize: 4\n", [], r"train\.batchsize: unknown key; did you mean 'batch_size'\?"),
    "moved_key": ("train: lr: 1.0e-4\n", [], r"train\.lr: unknown key; it moved to optim\.lr"),
    "wrong_type": ("optim: grad_clip: high\n", [], r"optim\.grad_clip: expected float, got str 'high'"),
    "quoted_1e-4": ("optim: lr: '1e-4'\n", [], r"optim\.lr: expected float, got str '1e-4' \(quoted number\?"),
    "duplicate_key": ("optim: lr: 1.0e-4\noptim: lr: 2.0e-4\n", [],
                      r"optim\.lr: duplicate key \(lines \d+ and \d+\)"),
    "bad_choice": ("train: nonfinite: stop\n", [], r"train\.nonfinite: 'stop' is not one of \['halt', 'skip'\]"),
    "batch_vs_ranks": ("", ["train.batch_size=6", "train.grad_accum_steps=2"],
                       r"train\.batch_size: 6 \(global\) is not divisible by 2 ranks x train\.grad_accum_steps=2"),
    "changed_shape": ("", ["--resume", "latest", "unet.block_out_channels=[32, 64]"],
                      r"cannot resume from \S*ckpt_000000002\.pt: the model's shape changed .*"
                      r"unet\.block_out_channels: \[16, 32\] -> \[32, 64\]"),
}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_config_trap_fails_before_any_process_group_identically_on_every_rank(world, tmp_path, cli, capfd,
                                                                              monkeypatch, trap):
    """Each rank of a 2-rank job (RANK/WORLD_SIZE as torchrun sets them) alone: creating a process group would wait
    for the missing rank (dist_timeout_s = 30); the trap must instead end it at once with exit 2 and one message."""
    lines, extra, pattern = TRAPS[trap]
    cfg = _yaml_with(world, tmp_path, trap, lines)
    if trap == "changed_shape":
        assert cli("--config", cfg, "train.max_steps=2") == 0  # the run to resume, one rank
    capfd.readouterr()
    messages, seconds = {}, []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29999")
        t0 = time.monotonic()
        assert cli("--config", cfg, *extra) == 2
        seconds.append(time.monotonic() - t0)
        assert not torch.distributed.is_initialized()
        err = capfd.readouterr().err
        prefix = f"[rank {rank}] "
        assert err.startswith(prefix) and re.search(pattern, err), err
        messages[rank] = err[len(prefix):]
    assert messages[0] == messages[1]
    # waiting for the missing rank would take dist_timeout_s (30 s); both calls must end before that. (A fixed 10 s
    # here failed once in CI at 16 s on rank 0's first call, on the loaded 2-core machine, with no group created:
    # a speed, not the property. The is_initialized check above catches any process group.)
    assert max(seconds) < world.raw["ddp"]["timeout_s"], seconds
    record(f"9 config trap {trap}", trials=2, seconds_to_exit=round(max(seconds), 2))


# ---------------------------------------------------------------------------------------------- 10. VAE

def _broken_vae(tmp_path, how):
    folder = tiny_vae_folder(tmp_path, name=f"vae_{how}")
    if how == "missing":
        shutil.rmtree(folder)
    elif how == "truncated":
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "nan":
        vae = tiny_kl_vae()
        with torch.no_grad():
            vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
        vae.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how,pattern", [
    ("missing", r"VAEError: VAE not found: '{path}'"),
    ("truncated", r"VAEError: could not load the VAE from folder {path}"),
    ("nan", r"VAEError: VAE {path} has non-finite weights in decoder\.conv_out\.weight"),
])
def test_broken_vae_fails_fast_naming_its_path(world, tmp_path, cli, capfd, how, pattern):
    folder = _broken_vae(tmp_path, how)
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "v", **{"vae.pretrained": str(folder)})
    t0 = time.monotonic()
    assert cli("--config", cfg) == 2
    seconds = time.monotonic() - t0
    err = capfd.readouterr().err
    assert re.search(r"\[rank 0\] error: " + pattern.format(path=re.escape(str(folder))), err), err
    assert "Traceback" not in err, err
    assert not (tmp_path / "runs" / "v" / "checkpoints").exists()
    record(f"10 VAE {how}", trials=1, seconds_to_exit=round(seconds, 1))


def test_resume_with_a_vae_of_other_latent_channels_fails_naming_the_vae(world, tmp_path, cli, capfd):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "l", **{"train.max_steps": 2})
    assert cli("--config", cfg) == 0
    other = tiny_vae_folder(tmp_path, name="vae8", latent_channels=8)
    capfd.readouterr()
    assert cli("--config", cfg, "--resume", "latest", f"vae.pretrained={other}") == 2
    err = capfd.readouterr().err
    assert re.search(rf"resume error: cannot resume from \S*ckpt_000000002\.pt: its UNet works on 4-channel latents "
                     rf"but the VAE {re.escape(str(other))} has latent_channels=8", err), err


def test_frozen_vae_is_bit_identical_after_training(world, tmp_path):
    """Encoding on the fly (no latent cache) runs the VAE every step; its weights must not move."""
    from train_video_pred import build

    cfg = config_from_dict(world.config(tmp_path / "runs", "f", **{"cache.enabled": False,
                                                                    "train.max_steps": 3}))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        trainer = build(cfg, DistInfo(), tmp_path / "runs" / "f")
        trainer.fit()
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert trainer.step == 3
    on_disk = AutoencoderKL.from_pretrained(cfg.vae.pretrained).state_dict()
    after = trainer.model.vae.vae.state_dict()
    assert set(after) == set(on_disk)
    changed = [k for k in on_disk if not torch.equal(after[k], on_disk[k])]
    assert changed == [] and not any(p.requires_grad for p in trainer.model.vae.parameters())
    record("10 frozen VAE", trials=1, tensors_compared=len(on_disk), tensors_changed=len(changed))


# ---------------------------------------------------------------------------------------------- 12. wandb

SHIM = '''
"""A stand-in wandb for the reliability tests; VP_WANDB_SHIM picks how it fails."""
import json, os, time
MODE = os.environ.get("VP_WANDB_SHIM", "")
if MODE == "import":
    raise ImportError("wandb shim: not importable")


class Run:
    id = "shim0001"

    def __init__(self, folder):
        self.folder, self.calls = folder, 0

    def log(self, data, step=None):
        self.calls += 1
        if MODE == "log" and self.calls >= 3:
            raise ConnectionError("wandb shim: connection lost mid-run")

    def finish(self):
        ckpts = sorted(os.listdir(os.path.join(self.folder, "checkpoints")))
        with open(os.path.join(self.folder, "finish_saw.json"), "w") as f:
            json.dump(ckpts, f)
        if MODE == "finish":
            time.sleep(10 ** 6)


def init(dir=".", **kwargs):
    if MODE == "init":
        raise RuntimeError("wandb shim: init failed (no network)")
    return Run(dir)


class Image:
    def __init__(self, *a, **k):
        pass


Video = Image
'''


def _check_metrics(run_dir, max_steps):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, max_steps + 1))


@pytest.mark.parametrize("mode", ["import", "init", "log"])
def test_wandb_unavailable_or_failing_never_stops_training(world, tmp_path, cli, monkeypatch, mode):
    monkeypatch.setenv("VP_WANDB_SHIM", mode)
    if mode == "import":
        monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    else:
        shim = types.ModuleType("wandb")
        exec(SHIM, shim.__dict__)
        monkeypatch.setitem(sys.modules, "wandb", shim)
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "w", **{"logging.wandb.mode": "offline",
                                                                     "train.max_steps": 6})
    with pytest.warns(UserWarning, match="wandb"):
        assert cli("--config", cfg) == 0
    run_dir = tmp_path / "runs" / "w"
    _check_metrics(run_dir, 6)
    assert sorted(ckpt_files(run_dir)) == [2, 4, 6]
    record(f"12 wandb {mode}", trials=1, exit_code=0)


@pytest.mark.slow  # a subprocess: the exit code and a process that really ends are the point
def test_wandb_hanging_at_finish_exits_0_after_the_final_checkpoint(world, tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "wandb.py").write_text(SHIM)
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "h",
                     **{"logging.wandb.mode": "offline", "logging.wandb.finish_timeout_s": 2, "train.max_steps": 4})
    from reliability_helpers import REPO
    rc, run = run_to_end(["--config", str(cfg)], tmp_path, timeout=120, VP_WANDB_SHIM="finish",
                         PYTHONPATH=f"{tmp_path / 'shim'}:{REPO}")
    run_dir = tmp_path / "runs" / "h"
    assert rc == 0, run.tail()
    assert "wandb.finish did not return within 2 s" in run.out
    assert json.loads((run_dir / "finish_saw.json").read_text())[-2:] == ["ckpt_000000004.pt", "latest"]
    _check_metrics(run_dir, 4)
    t_end = run.time_of("run folder:")
    record("12 wandb finish hangs", trials=1, exit_code=rc, finish_timeout_s=2,
           seconds_from_end_to_exit=round(run.seconds - t_end, 1) if t_end else None)


# ---------------------------------------------------------------------------------------------- 7. skip gives up

def test_nonfinite_skip_gives_up_after_k_in_a_row_but_not_after_k_scattered(world, tmp_path, cli, capfd, monkeypatch):
    cfg = world.yaml(tmp_path / "c.yaml", tmp_path / "runs", "n",
                     **{"train.nonfinite": "skip", "train.max_nonfinite_skips": 3, "train.max_steps": 6})
    monkeypatch.setenv("VP_FAULTS", "nan_loss:step=2,nan_loss:step=3,nan_loss:step=4")  # 3 bad steps in a row
    assert cli("--config", cfg) == 1
    captured = capfd.readouterr()
    for k, step in ((1, 2), (2, 3), (3, 4)):
        assert f"non-finite loss/gradient at step {step}; step skipped, its update masked ({k}/3 in a row)" \
            in captured.out, captured.out
    assert "training halted: 3 non-finite steps in a row (train.max_nonfinite_skips); giving up" in captured.err
    # step 4's checkpoint holds step 2's weights (both of its steps were masked), finite; nothing after it
    saved = {s: load_checkpoint(p) for s, p in ckpt_files(tmp_path / "runs" / "n").items()}
    assert max(saved) == 4 and all(torch.equal(saved[4]["unet"][k], v) for k, v in saved[2]["unet"].items())

    faults.reset()  # 2 + 2 bad steps, never 3 in a row: the run completes
    monkeypatch.setenv("VP_FAULTS", "nan_loss:step=1,nan_loss:step=2,nan_loss:step=4,nan_loss:step=5")
    assert cli("--config", cfg, "logging.name=n2") == 0
    assert capfd.readouterr().out.count("step skipped") == 4
    assert max(ckpt_files(tmp_path / "runs" / "n2")) == 6
    record("7 skip gives up", trials=2, skips_in_a_row_to_give_up=3, scattered_skips_survived=4)
