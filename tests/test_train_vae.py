"""Tests of tools/train_vae.py and of the bundled VAE in assets/vae_synthetic.

The tool runs through its real command line, end to end, on a tiny synthetic world (twice at once, to check that
the same seed gives the same weights); its saved folder is checked against what the test measures itself: the latent
std behind scaling_factor, the sample grid's top row, the round trip through FrozenVAE. The bundled VAE must load
through FrozenVAE and round-trip frames of a synthetic world it was not trained on (seed 0; it saw seed 1).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from torchmetrics.functional.image import peak_signal_noise_ratio

from configs.schema import DataConfig, SyntheticConfig, VAEConfig
from data import discover_clips, read_clip_frames, render_clip, split_clips, to_uint8_hwc, to_unit, uint8_to_frames
from model.checkpoint import save_checkpoint
from model.vae import FrozenVAE, load_diffusers_vae

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "train_vae.py"
ASSET = REPO / "assets" / "vae_synthetic"
SIZE = 32
VAL_FRACTION = 0.25  # 4 clips -> 3 train, 1 val
TINY_RUN = ["--synthetic", "--synthetic-clips", "4", "--synthetic-frames", "6", "--height", str(SIZE), "--width",
            str(SIZE), "--block-out-channels", "16", "32", "--norm-num-groups", "8", "--steps", "4", "--batch-size",
            "4", "--sample-every", "2", "--val-fraction", str(VAL_FRACTION), "--lr", "1e-3", "--seed", "3",
            "--threads", "1", "--device", "cpu"]
# Bundled VAE on unseen frames: measured 38.3 dB (still) / 38.6 dB (pan) mean PSNR over 256 frames each of seed 0,
# and 39.2 dB on the 32 frames of the test below; scaled-latent std 1.01 and 1.02.
ASSET_MIN_PSNR = 35.0


def psnr(frames: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-frame PSNR (dB) of (n, 3, H, W) frames in [-1, 1], measured in [0, 1]."""
    return float(peak_signal_noise_ratio(to_unit(frames), to_unit(target), data_range=1.0, reduction="none",
                                         dim=(1, 2, 3)).mean())


def load_tool():
    spec = importlib.util.spec_from_file_location("train_vae", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same command (each with its own world folder), started at once; returns their folders."""
    root = tmp_path_factory.mktemp("train_vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, str(TOOL), *TINY_RUN, "--data-root", str(root / f"world_{name}"),
               "--out", str(root / f"vae_{name}")]
        procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    return {"a": root / "vae_a", "b": root / "vae_b", "world": root / "world_a" / "still", "log": output}


def train_val_frames(world: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All frames of the run's train clips and of its val clips, split exactly as the tool splits them."""
    cfg = DataConfig(root=str(world), height=SIZE, width=SIZE, val_fraction=VAL_FRACTION, t_past=1, t_future=1)
    train, val = split_clips(discover_clips(cfg), cfg.val_fraction, cfg.split_seed)
    assert len(train) == 3 and len(val) == 1
    read = lambda clips: torch.cat([read_clip_frames(c, range(c.num_frames), cfg) for c in clips])  # noqa: E731
    return read(train), read(val)


def test_tool_writes_a_diffusers_folder_with_metrics_and_pictures(runs):
    out = runs["a"]
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "metrics.json", "reconstructions.png",
                 "samples/step_000002.png", "samples/step_000004.png"):
        assert (out / name).is_file(), name
    vae = AutoencoderKL.from_pretrained(out)  # loads like stabilityai/sd-vae-ft-mse
    assert list(vae.config.block_out_channels) == [16, 32] and vae.config.latent_channels == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["heldout_psnr_db"]) and metrics["train_frames_psnr_db"] is None
    assert (metrics["train_clips"], metrics["val_clips"], metrics["steps"]) == (3, 1, 4)
    assert metrics["latent_shape"] == [4, SIZE // 2, SIZE // 2] and metrics["downsample"] == 2
    assert metrics["scaling_factor"] == pytest.approx(vae.config.scaling_factor, rel=1e-12)
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert "held-out PSNR" in runs["log"]


def test_scaling_factor_is_one_over_the_measured_latent_std(runs):
    train_frames, _ = train_val_frames(runs["world"])  # 18 frames: all of them measured (--scale-frames 1024)
    raw = AutoencoderKL.from_pretrained(runs["a"]).eval()
    with torch.no_grad():
        z = raw.encode(train_frames).latent_dist.mode().double()
    assert raw.config.scaling_factor == pytest.approx(1.0 / z.std(unbiased=False).item(), rel=1e-4)
    assert raw.config.shift_factor is None  # no --shift
    latents = FrozenVAE(load_diffusers_vae(str(runs["a"]))).encode(train_frames[None])  # (1, 18, 4, 16, 16)
    assert latents.shape == (1, 18, 4, SIZE // 2, SIZE // 2)
    assert 0.5 < latents.std().item() < 2.0
    assert latents.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)  # the scale is measured, not a literal


def test_sample_grid_is_input_over_reconstruction_and_psnr_matches(runs):
    _, val_frames = train_val_frames(runs["world"])  # 6 held-out frames: all of them in the grid (--sample-count 8)
    frozen = FrozenVAE(load_diffusers_vae(str(runs["a"])))
    recon = frozen.decode(frozen.encode(val_frames[None]))[0]
    grid = np.asarray(Image.open(runs["a"] / "reconstructions.png").convert("RGB"))
    assert grid.shape == (2 * SIZE, 6 * SIZE, 3)
    top, bottom = grid[:SIZE], grid[SIZE:]
    np.testing.assert_array_equal(top, np.concatenate(list(to_uint8_hwc(val_frames)), axis=1))
    expected = np.concatenate(list(to_uint8_hwc(recon)), axis=1).astype(int)
    assert np.abs(bottom.astype(int) - expected).max() <= 1  # float noise across thread counts may flip a rounding
    metrics = json.loads((runs["a"] / "metrics.json").read_text())
    assert metrics["heldout_psnr_db"] == pytest.approx(psnr(recon, val_frames), abs=1e-3)


def test_same_seed_same_weights(runs):
    a = load_file(runs["a"] / "diffusion_pytorch_model.safetensors")
    b = load_file(runs["b"] / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", "--init", "some/vae", "--latent-channels", "8"], "--latent-channels"),
    (["--synthetic", "--block-out-channels", "16", "32", "--norm-num-groups", "32"], "does not divide"),
    (["--synthetic", "--height", "34"], "multiples of the downsampling factor 4"),
    (["--synthetic", "--height", "36"], "data.height: 36 must be a multiple of 8"),
    (["--steps", "10"], "--data-root is required"),
    (["--synthetic", "--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_fail_at_parse_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().parse_args(argv + ["--out", "unused"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bundled_vae_loads_and_round_trips_unseen_synthetic_frames():
    vae = FrozenVAE.from_config(VAEConfig(pretrained=str(ASSET), chunk_size=64))
    assert (vae.latent_channels, vae.downsample) == (4, 4)
    assert vae.scaling_factor != 0.18215  # measured for this VAE, not SD's constant
    clips = []
    for pan in (False, True):  # the demo's world (seed 0) with and without camera pan; the VAE was trained on seed 1
        sc = SyntheticConfig(seed=0, action_pan=pan, height=64, width=64)
        clips += [uint8_to_frames(render_clip(sc, c)[0][::8]) for c in range(4)]  # 4 frames of each clip
    frames = torch.stack(clips)  # (8, 4, 3, 64, 64)
    latents = vae.encode(frames)
    assert latents.shape == (8, 4, 4, 16, 16)
    assert 0.7 <= latents.std().item() <= 1.4
    assert abs(latents.mean().item()) < 0.5
    recon = vae.decode(latents)
    assert psnr(recon.flatten(0, 1), frames.flatten(0, 1)) > ASSET_MIN_PSNR


# ------------------------------------------------------------------------------- issue 16 item 6: bad data, resume
def tool_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def jpeg_clips(root: Path, clips: int = 3, frames: int = 8) -> list[Path]:
    """root/<clip>/<frame>.jpg of synthetic-world frames; returns the frame paths."""
    paths = []
    for c in range(clips):
        (root / f"clip{c}").mkdir(parents=True)
        for f, frame in enumerate(render_clip(SyntheticConfig(height=SIZE, width=SIZE), c)[0][:frames]):
            paths.append(root / f"clip{c}" / f"{f:04d}.jpg")
            Image.fromarray(frame).save(paths[-1], quality=95)
    return paths


def test_a_truncated_jpeg_is_found_before_training(tmp_path, capsys):
    """The scan runs first: --bad-data error stops before the first step naming the file (exit 2); skip trains on
    the rest. Before the scan, the run read the frame mid-training and died with a traceback."""
    paths = jpeg_clips(tmp_path / "clips")
    bad = paths[4]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    run = ["--data-root", str(tmp_path / "clips"), "--frame-glob", "*.jpg", "--height", str(SIZE), "--width",
           str(SIZE), "--block-out-channels", "16", "32", "--norm-num-groups", "8", "--steps", "12", "--batch-size",
           "6", "--sample-every", "0", "--val-fraction", "0", "--threads", "1", "--device", "cpu", "--val-frames", "4"]
    tool = load_tool()
    with pytest.raises(SystemExit) as exit_info:
        tool.main(run + ["--out", str(tmp_path / "stopped")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}: corrupt or truncated image" in err and "--bad-data skip" in err
    assert not (tmp_path / "stopped" / "checkpoints").exists()
    metrics = tool.main(run + ["--out", str(tmp_path / "skipped"), "--bad-data", "skip"])
    assert metrics["steps"] == 12 and metrics["train_frames"] == len(paths) - 1  # clip0 cut into frames 0-3 and 5-7
    assert str(bad) in capsys.readouterr().out


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_sigint_and_sigterm_save_and_resume_continues_bit_exactly(tmp_path):
    """One run stopped by Ctrl-C, resumed, stopped by SIGTERM, resumed to the end, equals an uninterrupted run
    weight for weight (batches, posterior noise, optimizer and LR schedule all restored)."""
    steps = 80
    args = [*TINY_RUN, "--steps", str(steps), "--sample-every", "20", "--save-every", "5"]  # later flags win

    def start(name: str, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, str(TOOL), *args, "--data-root", str(tmp_path / f"world_{name}"),
               "--out", str(tmp_path / name), *extra]
        return subprocess.Popen(cmd, cwd=tmp_path, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    reference = start("reference")
    ckpts = tmp_path / "run" / "checkpoints"
    newest = lambda: max((int(p.stem.split("_")[1]) for p in ckpts.glob("ckpt_*.pt")), default=0)  # noqa: E731
    stopped_at = []
    for sig, code, extra in ((signal.SIGINT, 130, ()), (signal.SIGTERM, 143, ("--resume", "latest"))):
        before = newest()
        proc = start("run", *extra)
        wait_for(lambda: newest() > before or proc.poll() is not None)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == code, output[-3000:]
        assert "continue with --resume latest" in output and "Traceback" not in output
        stopped_at.append(newest())
        assert stopped_at[-1] < steps
    assert stopped_at[0] < stopped_at[1]
    final = start("run", "--resume", "latest")
    output, _ = final.communicate(timeout=300)
    assert final.returncode == 0 and f"resumed from {ckpts / f'ckpt_{stopped_at[1]:09d}.pt'}" in output, output[-3000:]
    ref_output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_output[-3000:]
    a = load_file(tmp_path / "run" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "reference" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((tmp_path / n / "metrics.json").read_text())["history"] for n in ("run", "reference")]
    assert [(h["step"], h["val_psnr"], h["loss"]) for h in history[0]] == \
        [(h["step"], h["val_psnr"], h["loss"]) for h in history[1]]


def test_resume_refuses_other_settings_and_foreign_files(tmp_path, capsys):
    tool = load_tool()
    run = [*TINY_RUN, "--steps", "2", "--save-every", "1", "--data-root", str(tmp_path / "world"),
           "--out", str(tmp_path / "vae")]
    tool.main(run)
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*run, "--resume", "latest", "--lr", "5e-4"])
    assert exit_info.value.code == 2 and "--lr: 0.001 -> 0.0005" in capsys.readouterr().err
    foreign = save_checkpoint({"step": 1, "w": torch.zeros(2)}, tmp_path / "other", 1)
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*run, "--resume", str(foreign)])
    assert exit_info.value.code == 2 and f"{foreign} is not a checkpoint of tools/train_vae.py" in capsys.readouterr().err
