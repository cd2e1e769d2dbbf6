"""Tests of the data pipeline: discovery, windows, pixels, video, sidecars, split, scan, synthetic world.

Small images are written into tmp_path; frame i of a test clip encodes i in its colour, so every test can read back
which frame it got. Real footage from ../shared/data is used where present and skipped with a reason otherwise.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

# PyAV is in requirements.txt; the GPU machine's image lacks it, and a failed import here stopped the
# collection of `pytest -m gpu` there
av = pytest.importorskip("av", reason="PyAV (requirements.txt) is not installed")

from configs.schema import DataConfig, SyntheticConfig  # noqa: E402
from data import (Clip, DataError, VideoWindowDataset, apply_bad_data_policy, build_datasets, build_windows,
                  check_clips, count_frames, discover_clips, ensure_synthetic, from_unit, pil_to_frames,
                  read_clip_frames, read_cond, read_video_frames, render_clip, scan_clips, split_clips, to_uint8_hwc,
                  to_unit, uint8_to_frames)
from configs.loader import ConfigError, config_from_dict
from data.dataset import read_image
from data.scan import LISTED, main as scan_main
from data.synthetic import MARKER, _world_spec, object_tracks

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared/data/intel_sample_videos"
SIZE = 16


def make_cfg(root: Path, **overrides) -> DataConfig:
    base = dict(root=str(root), height=SIZE, width=SIZE, t_past=2, t_future=2, val_fraction=0.0, num_workers=0)
    base.update(overrides)
    return DataConfig(**base)


def frame_image(i: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> Image.Image:
    """Frame i < 1024: red = 8 * (i % 32), green = 255 - red, blue = 8 * (i // 32); size is (width, height)."""
    w, h = size
    arr = np.empty((h, w, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 8 * (i % 32), 255 - 8 * (i % 32), 8 * (i // 32)
    img = Image.fromarray(arr)
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE)  # exact colours (the web palette would dither)
    return img if mode == "RGB" else img.convert(mode)


def write_clip(folder: Path, n: int, fmt: str = "{:03d}.png", start: int = 0, size=(SIZE, SIZE)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / fmt.format(i)
        frame_image(i, size).save(p)
        paths.append(p)
    return paths


def frame_ids(frames: torch.Tensor) -> list[int]:
    """Which test frame each (3, H, W) frame in [-1, 1] is, read back from its red and blue channels."""
    rgb = to_uint8_hwc(frames).reshape(len(frames), -1, 3).astype(int)
    assert (rgb == rgb[:, :1]).all(), "a test frame should be flat"
    return [round(r / 8) + 32 * round(b / 8) for r, _, b in rgb[:, 0]]


# ---------------------------------------------------------------- pixels

def test_pixel_spaces_round_trip_exactly():
    u8 = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    frames = uint8_to_frames(u8)
    assert frames.shape == (1, 3, 16, 16) and frames.dtype == torch.float32
    assert frames.min() == -1.0 and frames.max() == 1.0
    assert np.array_equal(to_uint8_hwc(frames), u8)
    unit = to_unit(frames)
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert torch.allclose(from_unit(unit), frames, atol=1e-6)
    assert to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]  # clamped


@pytest.mark.parametrize("mode", ["L", "P", "RGB"])
def test_pil_modes_become_rgb_in_range(mode):
    img = frame_image(7, mode=mode)
    frames = pil_to_frames(img, SIZE, SIZE)
    assert frames.shape == (3, SIZE, SIZE) and frames.dtype == torch.float32
    assert -1.0 <= frames.min() and frames.max() <= 1.0
    if mode == "L":
        assert torch.equal(frames[0], frames[1]) and torch.equal(frames[1], frames[2])
    else:
        assert frame_ids(frames[None]) == [7]


def test_resize_crop_keeps_centre_and_stretch_keeps_all():
    arr = np.zeros((16, 48, 3), np.uint8)  # three 16x16 squares: red | green | blue
    arr[:, :16, 0] = arr[:, 16:32, 1] = arr[:, 32:, 2] = 255
    img = Image.fromarray(arr)
    crop = to_uint8_hwc(pil_to_frames(img, 8, 8, "crop"))
    assert crop.shape == (8, 8, 3)
    assert (crop[..., 1] > 200).all() and (crop[..., 0] < 30).all() and (crop[..., 2] < 30).all()  # only green
    stretch = to_uint8_hwc(pil_to_frames(img, 8, 24, "stretch"))
    assert stretch[4, 2, 0] > 200 and stretch[4, 12, 1] > 200 and stretch[4, 21, 2] > 200
    with pytest.raises(ValueError, match="RGBA"):
        pil_to_frames(img.convert("RGBA"), 8, 8)


# ---------------------------------------------------------------- discovery, windows, dataset

def test_windows_have_right_frames_shapes_and_range(tmp_path):
    write_clip(tmp_path / "a", 20)
    write_clip(tmp_path / "b", 9)
    cfg = make_cfg(tmp_path, frame_interval=2, window_stride=3)  # span 7, starts every 6 frames
    clips = discover_clips(cfg)
    assert [c.name for c in clips] == ["a", "b"] and [c.num_frames for c in clips] == [20, 9]
    windows = build_windows(clips, cfg)
    assert [(w.clip, w.frames) for w in windows] == [
        (0, (0, 2, 4, 6)), (0, (6, 8, 10, 12)), (0, (12, 14, 16, 18)), (1, (0, 2, 4, 6))]
    ds = VideoWindowDataset(clips, cfg)
    for i in range(len(ds)):
        item = ds[i]
        assert item["frames"].shape == (4, 3, SIZE, SIZE) and item["frames"].dtype == torch.float32
        assert item["frames"].min() >= -1.0 and item["frames"].max() <= 1.0
        assert frame_ids(item["frames"]) == list(windows[i].frames)
        assert item["cond"].shape == (0,) and item["index"] == i
    assert ds[3]["clip"] == "b"
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["frames"].shape == (3, 4, 3, SIZE, SIZE) and batch["cond"].shape == (3, 0)
    exact = ds[1]["frames"][0, 0, 0, 0].item()
    assert exact == pytest.approx(48 / 127.5 - 1.0, abs=1e-6)  # frame 6, red 48: no resampling at native size


def test_natural_sort_of_frames_and_clips(tmp_path):
    for name in ("clip10", "clip2", "clip1"):
        folder = tmp_path / name
        folder.mkdir()
        for i in (1, 2, 10, 11, 3):
            frame_image(i).save(folder / f"frame{i}.png")
    cfg = make_cfg(tmp_path, t_past=3, t_future=2)
    clips = discover_clips(cfg)
    assert [c.name for c in clips] == ["clip1", "clip2", "clip10"]
    assert [p.name for p in clips[0].frames] == ["frame1.png", "frame2.png", "frame3.png", "frame10.png", "frame11.png"]
    assert frame_ids(VideoWindowDataset(clips, cfg)[0]["frames"]) == [1, 2, 3, 10, 11]


def test_driving_glob_layout_and_sidecar_dir(tmp_path):
    for route, n in (("route_b", 6), ("route_a", 5)):
        write_clip(tmp_path / route / "camera/rgb_front", n, "{:04d}.jpg")
        write_clip(tmp_path / route / "camera/rgb_left", n + 3, "{:04d}.jpg")  # other cameras are not frames
        (tmp_path / route / "measurements").mkdir()
        for i in range(n):
            (tmp_path / route / "measurements" / f"{i:04d}.json").write_text(json.dumps({"ego": {"speed": i + 0.5}}))
    cfg = make_cfg(tmp_path, frame_glob="camera/rgb_front/*.jpg", cond_keys=["ego.speed"],
                   sidecar_dir="measurements")
    clips = discover_clips(cfg)
    assert [(c.name, c.num_frames) for c in clips] == [("route_a", 5), ("route_b", 6)]
    assert all(p.parent.name == "rgb_front" for c in clips for p in c.frames)
    ds = VideoWindowDataset(clips, cfg)
    assert len(ds) == 2 + 3
    item = ds[1]  # route_a frames 1..4
    assert item["cond"].tolist() == [3.5, 4.5]  # the two FUTURE frames' speeds
    red = to_uint8_hwc(item["frames"])[..., 0].mean(axis=(1, 2))
    assert np.allclose(red, [8, 16, 24, 32], atol=3)  # JPEG: close, in order


def test_missing_root_empty_root_and_empty_clip_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        discover_clips(make_cfg(tmp_path / "nope"))
    with pytest.raises(DataError, match=f"{tmp_path}.*holds no clips"):
        discover_clips(make_cfg(tmp_path))
    write_clip(tmp_path / "good", 5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match=f"(?s){tmp_path / 'empty'}.*{tmp_path / 'broken.mp4'}"):
        discover_clips(make_cfg(tmp_path))
    with pytest.warns(UserWarning, match=str(tmp_path / "empty")):
        assert [c.name for c in discover_clips(make_cfg(tmp_path, bad_data="skip"))] == ["good"]


def test_too_short_clip_error_names_path_and_lengths(tmp_path):
    write_clip(tmp_path / "long", 8)
    write_clip(tmp_path / "short", 3)
    cfg = make_cfg(tmp_path, frame_interval=2)  # span (4 - 1) * 2 + 1 = 7
    clips = discover_clips(cfg)
    with pytest.raises(DataError, match=rf"{tmp_path / 'short'}: 3 frames, a window needs 7"):
        build_windows(clips, cfg)
    with pytest.warns(UserWarning, match="short"):
        windows = build_windows(clips, make_cfg(tmp_path, frame_interval=2, bad_data="skip"))
    assert {w.clip for w in windows} == {0}


# ---------------------------------------------------------------- split

def test_split_by_clip_is_deterministic_disjoint_and_never_empty():
    clips = [Clip(f"clip_{i:02d}", "frames", Path(f"/x/{i}"), (), 0) for i in range(20)]
    train, val = split_clips(clips, 0.2, seed=0)
    names = lambda cs: [c.name for c in cs]  # noqa: E731
    assert len(val) == 4 and len(train) == 16
    assert not set(names(train)) & set(names(val)) and set(names(train)) | set(names(val)) == set(names(clips))
    shuffled = clips[:]
    random.Random(1).shuffle(shuffled)
    assert sorted(names(split_clips(shuffled, 0.2, seed=0)[1])) == sorted(names(val))  # a function of names only
    assert any(names(split_clips(clips, 0.2, seed=s)[1]) != names(val) for s in range(1, 4))
    assert len(split_clips(clips[:2], 0.01, 0)[1]) == 1  # at least one val clip
    assert len(split_clips(clips[:2], 0.9, 0)[0]) == 1  # never an empty train split
    assert split_clips(clips, 0.0, 0)[1] == [] and split_clips(clips[:1], 0.5, 0) == (clips[:1], [])
    segments = [Clip(f"clip_{i:02d}@{s:06d}", "frames", Path("/x"), (), 0, source=f"clip_{i:02d}")
                for i in range(6) for s in (0, 50)]
    tr, va = split_clips(segments, 0.3, 0)
    assert {c.source for c in tr}.isdisjoint({c.source for c in va}) and len(va) == 4  # 2 sources x 2 segments


# ---------------------------------------------------------------- video

def test_real_mp4_windows_match_an_independent_sequential_decode(tmp_path):
    video = SHARED_VIDEOS / "car-detection.mp4"
    if not video.is_file():
        pytest.skip(f"{video} absent (shared data lives beside the repo only on the dev machines)")
    (tmp_path / video.name).symlink_to(video)
    cfg = make_cfg(tmp_path, height=72, width=128, t_past=2, t_future=2, frame_interval=3, window_stride=50)
    clips = discover_clips(cfg)
    assert [(c.name, c.kind, c.num_frames) for c in clips] == [("car-detection.mp4", "video", 377)]
    ds = VideoWindowDataset(clips, cfg)
    assert len(ds) == len(range(0, 377 - 10 + 1, 150))
    window = ds.windows[1]  # frames 150..159, past a keyframe: exercises seeking
    item = ds[1]
    assert item["frames"].shape == (4, 3, 72, 128) and -1 <= item["frames"].min() and item["frames"].max() <= 1
    reference = {}
    with av.open(str(video)) as container:  # decode from the start, no seeking, count frames
        for i, frame in enumerate(container.decode(video=0)):
            if i in window.frames:
                reference[i] = pil_to_frames(frame.to_image(), 72, 128, "crop")
            if i >= window.frames[-1]:
                break
    assert torch.equal(item["frames"], torch.stack([reference[i] for i in window.frames]))


def _write_mp4(path: Path, n: int, gop: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.gop_size = gop
        for i in range(n):
            grey = np.full((32, 32, 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_written_mp4_and_gif_are_counted_and_read_in_order(tmp_path):
    _write_mp4(tmp_path / "grey.mp4", 12, gop=4)
    frames = [frame_image(i, (24, 16)) for i in range(10)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert count_frames(tmp_path / "grey.mp4") == 12 and count_frames(tmp_path / "anim.gif") == 10
    means = [a.mean() for a in read_video_frames(tmp_path / "grey.mp4", [9, 2, 10, 10, 5])]
    assert np.allclose(means, [180, 40, 200, 200, 100], atol=6)
    gif = read_video_frames(tmp_path / "anim.gif", [7, 0, 3])
    assert [int(a[0, 0, 0]) for a in gif] == [56, 0, 24]  # few colours, no dithering: exact
    cfg = make_cfg(tmp_path, t_past=1, t_future=1, frame_interval=4)
    clips = discover_clips(cfg)
    assert [(c.name, c.kind) for c in clips] == [("anim.gif", "video"), ("grey.mp4", "video")]
    gif_window = read_clip_frames(clips[0], [2, 6], cfg)
    assert frame_ids(gif_window) == [2, 6]
    with pytest.raises(DataError, match="out of range"):
        read_clip_frames(clips[1], [12], cfg)
    cond_cfg = make_cfg(tmp_path, t_past=1, t_future=1, cond_keys=["speed"])
    with pytest.raises(DataError, match="grey.mp4.*sidecars"):
        read_cond(clips[1], 0, cond_cfg)
    assert [p.path for p in scan_clips(clips, cond_cfg, progress=False).problems] == [str(c.path) for c in clips]


# ---------------------------------------------------------------- sidecars

def test_sidecars_json_and_gz_dotted_keys_frame_major(tmp_path):
    write_clip(tmp_path / "c", 4)
    for i in range(4):
        doc = {"ego": {"speed": float(i), "brake": i % 2 == 1}, "cmd": [i * 10, 7]}
        if i % 2:
            with gzip.open(tmp_path / "c" / f"{i:03d}.json.gz", "wt") as f:
                json.dump(doc, f)
        else:
            (tmp_path / "c" / f"{i:03d}.json").write_text(json.dumps(doc))
    cfg = make_cfg(tmp_path, cond_keys=["ego.speed", "ego.brake", "cmd.0"])
    clip = discover_clips(cfg)[0]
    assert read_cond(clip, 3, cfg).tolist() == [3.0, 1.0, 30.0]
    item = VideoWindowDataset([clip], cfg)[0]
    assert item["cond"].dtype == torch.float32
    assert item["cond"].tolist() == [2.0, 0.0, 20.0, 3.0, 1.0, 30.0]  # future frames 2 and 3, frame-major
    with pytest.raises(DataError, match=r"003\.json\.gz.*'ego\.throttle'"):
        read_cond(clip, 3, make_cfg(tmp_path, cond_keys=["ego.throttle"]))
    (tmp_path / "c" / "002.json").unlink()
    with pytest.raises(DataError, match=r"002\.png.*no sidecar"):
        read_cond(clip, 2, cfg)


# ---------------------------------------------------------------- scan and the bad-data policy

def _bad_dataset(root: Path) -> dict[str, str]:
    """Clip "a" with one bad file of each kind, clip "b" with a numbering gap, clip "c" too short, clip "d" good.
    Returns {bad path: a word its reason must contain}."""
    paths = write_clip(root / "a", 30)
    bad = {}
    paths[3].write_bytes(b"")
    bad[str(paths[3])] = "empty"
    paths[5].write_bytes(paths[5].read_bytes()[:60])
    bad[str(paths[5])] = "truncated"
    paths[7].write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    bad[str(paths[7])] = "random bytes"
    for i, mode in ((9, "RGBA"), (11, "I;16")):
        frame_image(i, mode="RGB").convert("RGBA" if mode == "RGBA" else "L").save(paths[i])
        if mode == "I;16":
            Image.fromarray(np.full((SIZE, SIZE), 4000, np.uint16)).save(paths[i])
        bad[str(paths[i])] = mode
    paths[13].unlink()
    cmyk = root / "a" / "013.jpg"
    frame_image(13).convert("CMYK").save(cmyk)
    bad[str(cmyk)] = "CMYK"
    frame_image(20, size=(SIZE + 8, SIZE)).save(paths[20])
    bad[str(paths[20])] = "differs"
    write_clip(root / "b", 8)
    write_clip(root / "b", 8, start=10)  # 008, 009 missing
    bad[str(root / "b")] = "2 frame(s) missing between 007.png and 010.png"
    write_clip(root / "c", 3)
    bad[str(root / "c")] = "shorter than one window"
    write_clip(root / "d", 10)
    return bad


def test_scan_lists_every_bad_path_with_its_reason(tmp_path):
    bad = _bad_dataset(tmp_path)
    cfg = make_cfg(tmp_path)
    clips = discover_clips(cfg)
    report = scan_clips(clips, cfg, progress=False)
    listed = {}
    for p in report.problems:
        listed.setdefault(p.path, []).append(p.reason)
    assert set(listed) == set(bad), set(listed) ^ set(bad)
    for path, word in bad.items():
        assert any(word in reason for reason in listed[path]), (path, listed[path])
    assert report.num_bad == 7 and report.num_frames == 30 + 16 + 3 + 10
    with pytest.raises(DataError) as err:
        check_clips(clips, cfg, progress=False)
    for path in bad:
        assert path in str(err.value)


def test_skip_policy_cuts_clips_at_bad_frames_and_threshold_aborts(tmp_path):
    _bad_dataset(tmp_path)
    cfg = make_cfg(tmp_path, bad_data="skip", max_bad_fraction=0.2)
    clips = discover_clips(cfg)
    kept, report = check_clips(clips, cfg, progress=False)
    # a: bad frames 3 5 7 9 11 13 20 leave runs 14..19 (6) and 21..29 (9) of >= 4 frames; b: cut at the gap; c: short
    assert [(c.name, c.num_frames) for c in kept] == [
        ("a@000014", 6), ("a@000021", 9), ("b@000000", 8), ("b@000008", 8), ("d", 10)]
    assert kept[0].source == "a" and kept[-1] is clips[-1]
    assert frame_ids(read_clip_frames(kept[3], [0, 7], cfg)) == [10, 17]
    ds = VideoWindowDataset(kept, cfg)
    for i in range(len(ds)):  # every window of what is kept reads cleanly
        assert ds[i]["frames"].shape == (4, 3, SIZE, SIZE)
    with pytest.raises(DataError, match="above data.max_bad_fraction=0.1"):
        apply_bad_data_policy(clips, report, make_cfg(tmp_path, bad_data="skip", max_bad_fraction=0.1))


def test_scan_of_missing_sidecars_and_pool_matches_inline(tmp_path):
    for c in range(3):
        write_clip(tmp_path / f"c{c}", 100)
        for i in range(100):
            (tmp_path / f"c{c}" / f"{i:03d}.json").write_text(json.dumps({"v": i}))
    (tmp_path / "c1" / "050.json").unlink()
    (tmp_path / "c2" / "007.json").write_text(json.dumps({"w": 1}))
    cfg = make_cfg(tmp_path, cond_keys=["v"])
    clips = discover_clips(cfg)
    inline = scan_clips(clips, cfg, workers=1, progress=False)
    pooled = scan_clips(clips, cfg, workers=2, progress=False)
    assert inline.problems == pooled.problems
    assert [(Path(p.path).relative_to(tmp_path).as_posix(), p.frame) for p in inline.problems] == [
        ("c1/050.png", 50), ("c2/007.png", 7)]
    assert "no sidecar" in inline.problems[0].reason and "'v'" in inline.problems[1].reason


# ---------------------------------------------------------------- synthetic world

def _world(root: Path, **overrides) -> DataConfig:
    synth = dict(enabled=True, num_clips=3, frames_per_clip=10, height=32, width=32, num_objects=3, speed=2.0)
    synth.update(overrides)
    return make_cfg(root, height=32, width=32, synthetic=SyntheticConfig(**synth))


def _world_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_world_is_a_function_of_its_seed(tmp_path):
    a = ensure_synthetic(_world(tmp_path / "a", seed=1), progress=False)
    b = ensure_synthetic(_world(tmp_path / "b", seed=1), progress=False)
    c = ensure_synthetic(_world(tmp_path / "c", seed=2), progress=False)
    files_a = _world_bytes(a)
    assert len([f for f in files_a if f.endswith(".png")]) == 30 and MARKER in files_a
    assert files_a == _world_bytes(b)
    assert {k: v for k, v in files_a.items() if k != MARKER} != {k: v for k, v in _world_bytes(c).items() if k != MARKER}
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
    frames = np.stack([np.asarray(Image.open(a / "clip_0000" / f"{i:06d}.png")) for i in range(10)])
    assert frames.shape == (10, 32, 32, 3)
    assert all((np.abs(frames[i + 1].astype(int) - frames[i]).max() > 50) for i in range(9))  # objects move
    saturation = frames.max(-1).astype(int) - frames.min(-1)
    assert (saturation > 150).mean() > 0.05 and np.median(saturation) < 60  # saturated objects, muted background
    mtime = (a / MARKER).stat().st_mtime_ns
    ensure_synthetic(_world(tmp_path / "a", seed=1), progress=False)
    assert (a / MARKER).stat().st_mtime_ns == mtime  # complete world: not regenerated
    with pytest.warns(UserWarning, match="regenerating"):
        ensure_synthetic(_world(tmp_path / "a", seed=1, num_clips=2), progress=False)
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == ["clip_0000", "clip_0001"]
    write_clip(tmp_path / "user", 4)
    with pytest.raises(DataError, match=str(tmp_path / "user")):
        ensure_synthetic(_world(tmp_path / "user"), progress=False)


def _shift(prev: np.ndarray, cur: np.ndarray, max_shift: int = 6) -> int:
    """The integer d that best explains cur[:, x] = prev[:, x + d] (content moving left by d pixels)."""
    w = prev.shape[1]
    errors = {d: np.mean((cur[:, max_shift:w - max_shift] - prev[:, max_shift + d:w - max_shift + d]) ** 2)
              for d in range(-max_shift, max_shift + 1)}
    return min(errors, key=errors.get)


def test_synthetic_pan_follows_the_action_sign(tmp_path):
    sc = SyntheticConfig(enabled=True, frames_per_clip=24, height=32, width=64, num_objects=0, action_pan=True,
                         pan_speed=3.0, seed=3)
    checked = 0
    for clip in range(3):
        frames, actions = render_clip(sc, clip)
        assert actions[0] == 0.0 and set(actions[1:]) <= {-1.0, -0.5, 0.0, 0.5, 1.0} and len(set(actions)) >= 3
        grey = frames.astype(float).mean(-1)
        for t in range(1, len(frames)):
            d = _shift(grey[t - 1], grey[t])
            assert abs(d - sc.pan_speed * actions[t]) <= 1, (clip, t, d, actions[t])
            if abs(actions[t]) == 1.0:
                assert np.sign(d) == np.sign(actions[t])
                checked += 1
    assert checked >= 5
    still, _ = render_clip(SyntheticConfig(**{**sc.__dict__, "action_pan": False}), 0)
    assert not np.array_equal(still, render_clip(sc, 0)[0])  # the frames depend on the actions


def test_synthetic_background_contrast_scales_the_texture_around_its_base_colour():
    """background_contrast c multiplies the texture's amplitude and nothing else: with the same draws, frames at
    c = 1 and c = 2 satisfy 2 x1 - x2 = the clip's base colour (constant over pixels and frames), up to uint8
    rounding; c = 0 is that flat colour itself; the default world's marker spec stays as it was."""
    sc = SyntheticConfig(enabled=True, frames_per_clip=6, height=32, width=48, num_objects=0, action_pan=True, seed=2)
    x1, x2, x0 = (render_clip(SyntheticConfig(**{**sc.__dict__, "background_contrast": c}), 1)[0].astype(float)
                  for c in (1.0, 2.0, 0.0))
    assert x1.std(axis=(0, 1, 2)).min() > 3  # a visible texture at the default contrast
    assert (x2 - x2.mean(axis=(0, 1, 2))).std() > 1.8 * (x1 - x1.mean(axis=(0, 1, 2))).std()
    base = 2 * x1 - x2  # (T, H, W, 3): each channel one value
    assert np.abs(base - base.mean(axis=(0, 1, 2))).max() <= 1.5
    assert np.abs(x0 - base.mean(axis=(0, 1, 2))).max() <= 1.5
    assert "background_contrast" not in _world_spec(sc)["synthetic"]
    assert _world_spec(SyntheticConfig(**{**sc.__dict__, "background_contrast": 2.0}))["synthetic"]["background_contrast"] == 2.0


def test_object_tracks_are_where_the_objects_are_drawn_and_bounce_off_the_walls():
    """The tracks (bounce_check's ground truth) against the rendered frames: the drawn pixels of each object centre
    on its track, and each object stays inside the frame, reflecting (its velocity flips) at the walls."""
    sc = SyntheticConfig(enabled=True, frames_per_clip=64, height=48, width=64, num_objects=1, speed=2.0, seed=5)
    flips = 0
    for clip in range(4):
        frames, _ = render_clip(sc, clip)
        tr = object_tracks(sc, clip)
        img = frames.astype(np.float32) / 255
        for t in range(len(frames)):  # one object: never occluded
            ys, xs = np.nonzero(np.abs(img[t] - tr.colour[0]).max(-1) < 0.1)
            assert abs(xs.mean() + 0.5 - tr.x[t, 0]) < 0.6 and abs(ys.mean() + 0.5 - tr.y[t, 0]) < 0.6, (clip, t)
        r = tr.radius[0]
        assert (tr.x >= r - 1e-3).all() and (tr.x <= sc.width - r + 1e-3).all()
        assert (tr.y >= r - 1e-3).all() and (tr.y <= sc.height - r + 1e-3).all()
        v = np.diff(tr.x[:, 0])
        flips += int((np.sign(v[1:]) * np.sign(v[:-1]) < 0).sum())
    assert flips >= 2  # 4 clips x 64 frames at up to 2 px/frame across 64 px: walls are hit


def test_synthetic_world_through_the_whole_pipeline(tmp_path):
    cfg = _world(tmp_path / "w", num_clips=4, frames_per_clip=8, action_pan=True)
    cfg.cond_keys, cfg.val_fraction = ["action"], 0.25
    train, val, report = build_datasets(cfg, progress=False)
    assert report.ok and len(train.clips) == 3 and len(val.clips) == 1
    assert {c.name for c in train.clips}.isdisjoint({c.name for c in val.clips})
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2, shuffle=False)))
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["cond"].shape == (2, 2)
    clip_dir = Path(cfg.root) / batch["clip"][0]
    future = batch["frame_indices"][0, 2:].tolist()
    sidecar = [json.loads((clip_dir / f"{i:06d}.json").read_text())["action"] for i in future]
    assert batch["cond"][0].tolist() == sidecar


# ---------------------------------------------------------------- other image modes (issue 16 item 11)

def _mode_frames(folder: Path) -> dict[str, Path]:
    """One flat 16x16 frame per mode, with known pixel values (see test_convert_modes_give_the_oracle_pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {"RGBA": Image.new("RGBA", (SIZE, SIZE), (200, 100, 50, 128)),
              "LA": Image.new("LA", (SIZE, SIZE), (100, 128)),
              "I;16": Image.fromarray(np.full((SIZE, SIZE), 257 * 100 + 100, np.uint16)),
              "CMYK": Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).convert("CMYK")}
    paths = {}
    for mode, img in images.items():
        paths[mode] = folder / f"{len(paths):03d}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(paths[mode], **({"quality": 100} if mode == "CMYK" else {}))
        assert Image.open(paths[mode]).mode == mode
    return paths


@pytest.mark.parametrize("convert_modes, expected", [
    ("composite", {"RGBA": (100, 50, 25), "LA": (50, 50, 50), "I;16": (100, 100, 100)}),  # 200 * 128/255 = 100.4
    ("drop_alpha", {"RGBA": (200, 100, 50), "LA": (100, 100, 100), "I;16": (100, 100, 100)}),
])
def test_convert_modes_give_the_oracle_pixels(tmp_path, convert_modes, expected):
    """Alpha over black multiplies by alpha / 255; dropped alpha keeps the colour; 16-bit v -> round(v / 257);
    CMYK through PIL (its conversion is exact for these values); with convert_modes off each is refused by name."""
    paths = _mode_frames(tmp_path)
    cfg = make_cfg(tmp_path, convert_modes=convert_modes)
    for mode, rgb in {**expected, "CMYK": (10, 20, 30)}.items():
        frames = read_image(paths[mode], cfg)
        pixels = to_uint8_hwc(frames).reshape(-1, 3)
        assert (pixels == rgb).all(), (mode, pixels[0], rgb)
        with pytest.raises(DataError, match=f"image mode {re.escape(mode)} .*data.convert_modes"):
            read_image(paths[mode], make_cfg(tmp_path))
    u16 = Image.fromarray(np.array([[0, 128, 65535, 4000]], np.uint16))
    assert to_uint8_hwc(pil_to_frames(u16, 1, 4, convert_modes="composite"))[0, :, 0].tolist() == [0, 0, 255, 16]


def test_scan_reads_converted_modes_and_still_lists_the_rest(tmp_path):
    bad = _bad_dataset(tmp_path)
    cfg = make_cfg(tmp_path, convert_modes="composite")
    report = scan_clips(discover_clips(cfg), cfg, progress=False)
    converted = {p for p, word in bad.items() if word in ("RGBA", "I;16", "CMYK")}
    assert len(converted) == 3
    assert {p.path for p in report.problems} == set(bad) - converted
    assert report.num_bad == 7 - 3
    with pytest.raises(ConfigError, match="data.convert_modes: 'sepia'"):
        config_from_dict({"data": {"convert_modes": "sepia"}})


def test_scan_report_names_the_first_problems_and_counts_all_by_kind(tmp_path, capsys):
    paths = write_clip(tmp_path / "a", 40)
    for p in paths[:30]:
        p.write_bytes(p.read_bytes()[:60])
    paths[35].write_bytes(b"")
    cfg = make_cfg(tmp_path)
    report = scan_clips(discover_clips(cfg), cfg, progress=False)
    text = str(report)
    assert "by kind: corrupt or truncated image 30, empty file 1" in text
    assert all(str(p) in text for p in paths[:LISTED]) and str(paths[LISTED]) not in text
    assert f"... and {31 - LISTED} more" in text
    full = report.text(listed=None)
    assert all(full.count(str(p)) == 1 for p in [*paths[:30], paths[35]])
    # the CLI lists every one
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(tmp_path), "height": SIZE, "width": SIZE, "t_past": 2,
                                               "t_future": 2}}))
    assert scan_main([str(config)]) == 1
    assert capsys.readouterr().out.strip() == full
