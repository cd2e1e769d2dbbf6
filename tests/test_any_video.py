"""Using a trained model on any video: .tif frames, stored paths that work from any directory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from configs.loader import PROJECT_ROOT, config_from_dict, dump_config, load_config, parse_yaml
from data import discover_clips, read_clip_frames
from helpers import one_torch_thread, tiny_config  # noqa: F401 (fixture)


def test_tif_frames_are_clips_and_hidden_files_are_not_frames(tmp_path):
    """UCSD's release: grey 8-bit .tif frames (with macOS '._' resource forks beside them in some archives)."""
    clip = tmp_path / "root" / "Test001"
    clip.mkdir(parents=True)
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (16, 24), dtype=np.uint8) for _ in range(3)]
    for i, g in enumerate(grey):
        Image.fromarray(g).save(clip / f"{i + 1:03d}.tif")
        (clip / f"._{i + 1:03d}.tif").write_bytes(b"\x00\x05\x16\x07 not an image")
    cfg = tiny_config(**{"data.root": str(tmp_path / "root"), "data.height": 16, "data.width": 24}).data
    (found,) = discover_clips(cfg)
    assert [p.name for p in found.frames] == ["001.tif", "002.tif", "003.tif"]
    frames = read_clip_frames(found, [0, 2], cfg)  # (2, 3, 16, 24) in [-1, 1], grey -> equal channels
    expected = np.stack([grey[0], grey[2]]).astype(np.float32) / 127.5 - 1
    assert np.allclose(frames[:, 0].numpy(), expected, atol=1e-6) and (frames[:, 0] == frames[:, 2]).all()


def test_stored_relative_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    """A run's stored config keeps `vae.pretrained: assets/vae_synthetic` (which also reads as a hub id owner/name);
    loaded from another directory it must name the project's folder, not the hub."""
    raw = {"vae": {"pretrained": "assets/vae_synthetic"}, "data": {"root": "configs"}}
    monkeypatch.chdir(PROJECT_ROOT)
    here = config_from_dict(raw)
    assert here.vae.pretrained == "assets/vae_synthetic" and here.data.root == "configs"  # unchanged where they exist
    assert config_from_dict(parse_yaml(dump_config(here))) == here
    monkeypatch.chdir(tmp_path)
    away = config_from_dict(raw)
    assert Path(away.vae.pretrained) == PROJECT_ROOT / "assets" / "vae_synthetic" and Path(away.vae.pretrained).is_dir()
    assert Path(away.data.root) == PROJECT_ROOT / "configs"
    # a folder of that name where the command runs wins; a name that exists nowhere (a hub id) is left alone
    (tmp_path / "configs").mkdir()
    other = config_from_dict({"data": {"root": "configs"}, "vae": {"pretrained": "stabilityai/sd-vae-ft-mse"}})
    assert other.data.root == "configs" and other.vae.pretrained == "stabilityai/sd-vae-ft-mse"
    assert load_config(PROJECT_ROOT / "configs" / "demo.yaml").vae.pretrained == str(PROJECT_ROOT / "assets/vae_synthetic")


def test_a_run_made_with_relative_paths_loads_from_another_directory_and_checkout(tmp_path, monkeypatch):
    """A run launched in folder P with `vae.pretrained: vae`, `data.root: world`, `logging.run_dir: runs` (relative
    to P, which is not this checkout) loads from anywhere: the stored relative paths are read against P, found
    from the checkpoint's place P/runs/<name>/checkpoints/."""
    import train_video_pred
    from model.loading import load_model
    from reliability_helpers import make_world

    project = tmp_path / "P"
    world = make_world(project)
    raw = world.config(Path("runs"), "rel", **{"train.max_steps": 2, "vae.pretrained": "vae", "data.root": "world",
                                              "cache.dir": "cache"})
    (project / "run.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(project)
    assert train_video_pred.main(["--config", "run.yaml", "--device", "cpu"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_model(run=project / "runs" / "rel")
    assert Path(loaded.cfg.vae.pretrained) == (project / "vae").resolve()
    assert Path(loaded.cfg.data.root) == (project / "world").resolve()
    assert loaded.step == 2 and os.getcwd() == str(elsewhere)
