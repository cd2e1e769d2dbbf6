"""tools/split_video.py: a video or frame folder cut into training clips and a held-out last part, on real files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import split_video


def grey_frames(folder: Path, n: int, size=(48, 32)) -> None:
    """n PNG frames whose grey level is 5 * their number: which source frame a written frame came from is readable."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 5 * i, np.uint8)).save(folder / f"{i:03d}.png")


def level(path: Path, step: int = 5) -> int:
    return round(float(np.asarray(Image.open(path)).mean()) / step)


def test_a_frame_folder_becomes_consecutive_training_clips_and_a_last_part(tmp_path):
    grey_frames(tmp_path / "src", 20)
    out = tmp_path / "root"
    assert split_video.main(["--input", str(tmp_path / "src"), "--out", str(out), "--height", "16", "--width", "24",
                             "--train-clips", "2", "--test-fraction", "0.25", "--format", "png"]) == 0
    expected = {"train_0": range(0, 7), "train_1": range(7, 15), "test_last25": range(15, 20)}
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "split.json"])
    for name, frames in expected.items():
        files = sorted((out / name).glob("*.png"))
        assert [f.name for f in files] == [f"{k:04d}.png" for k in range(len(frames))]
        assert [level(f) for f in files] == list(frames)  # the right source frames, in order
        assert Image.open(files[0]).size == (24, 16)
    split = json.loads((out / "split.json").read_text())
    assert split["clips"] == {name: [r.start, r.stop - 1] for name, r in expected.items()}
    assert not list(tmp_path.glob(".root.*"))  # no temporary folder left


def test_the_car_configs_find_their_layout_and_hold_out_the_last_part(tmp_path):
    """The layout configs/car_detection*.yaml expect: data.split_seed puts exactly test_last20 in validation."""
    from configs.loader import load_config
    from data import discover_clips, split_clips

    grey_frames(tmp_path / "src", 50)
    out = tmp_path / "car"
    assert split_video.main(["--input", str(tmp_path / "src"), "--out", str(out), "--height", "16", "--width",
                             "24"]) == 0
    for config in ("configs/car_detection.yaml", "configs/car_detection_cpu.yaml"):
        cfg = load_config(config, [f"data.root={out}"])
        train, val = split_clips(discover_clips(cfg.data), cfg.data.val_fraction, cfg.data.split_seed)
        assert [c.name for c in val] == ["test_last20"] and len(train) == 4


def test_bad_input_gets_a_clear_error_and_writes_nothing(tmp_path, capsys):
    grey_frames(tmp_path / "src", 6)
    out = tmp_path / "root"
    args = ["--input", str(tmp_path / "src"), "--out", str(out), "--height", "16", "--width", "24"]
    assert split_video.main(args) == 2  # 6 frames: a clip of fewer than 2 frames
    assert "too few" in capsys.readouterr().err and not out.exists()
    grey_frames(tmp_path / "long", 30)
    (tmp_path / "long" / "017.png").write_bytes(b"not a png")  # a broken frame in the middle
    assert split_video.main(["--input", str(tmp_path / "long"), *args[2:]]) == 2
    assert "017.png" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob(".root.*"))
    # an existing root is not written over without --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    del_frame = tmp_path / "long" / "017.png"
    del_frame.unlink()
    assert split_video.main(["--input", str(tmp_path / "long"), *args[2:]]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert split_video.main(["--input", str(tmp_path / "long"), *args[2:], "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "test_last20").is_dir()
    with pytest.raises(SystemExit):
        split_video.main([*args, "--test-fraction", "1"])


def test_a_video_file_is_split_too(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (requirements.txt) is not installed")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8),
                                                                    format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "root"
    assert split_video.main(["--input", str(video), "--out", str(out), "--height", "16", "--width", "16",
                             "--train-clips", "2", "--test-fraction", "0.25"]) == 0
    assert [len(list((out / n).glob("*.jpg"))) for n in ("train_0", "train_1", "test_last25")] == [4, 5, 3]
    assert [level(f, 10) for f in sorted((out / "test_last25").glob("*.jpg"))] == [9, 10, 11]
