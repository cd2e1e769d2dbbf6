"""A deterministic synthetic world: coloured objects bouncing over a textured background, optionally panned by an action.

Each clip is a pure function of (SyntheticConfig.seed, clip index), drawn with vectorised numpy:
- background: a smooth, low-contrast texture (a sum of sinusoids, periodic in x so the camera can pan forever;
  background_contrast scales its amplitude);
- objects: circles and squares of distinct saturated hues, constant velocity, bouncing off the frame borders,
  drawn in a fixed order (later ones occlude earlier ones), with 1-pixel antialiased edges;
- action_pan: a piecewise-constant action a_t in {-1, -0.5, 0, 0.5, 1}, redrawn every 2-5 frames; the camera moves
  by pan_speed * a_t pixels from frame t-1 to t (a > 0: camera right, so the background moves LEFT on screen).
  Objects live in screen coordinates (the camera follows them), so only the background depends on the action.
  Frame t's sidecar <stem>.json holds {"action": a_t}; a_0 = 0 (nothing precedes frame 0). No pan: no sidecars.
- anomalies (SyntheticConfig.anomalies > 0): in each event one object runs on its own clock tau(t) instead of t for
  anomaly_frames frames [a, b]: stop (tau frozen), reverse (tau runs backwards), speedup (3x), jump (tau random
  every frame: the object teleports along its own track); after b it moves on normally from where it got to (jump:
  back on its track). Labelled interval: [a, b + 1], the abnormal frames and the frame where normal motion resumes
  (itself a change of motion). Written to <root>/anomalies.json as {"clips": {clip: [[a, b + 1]]}, "events": ...},
  frame numbers 0-based and inclusive, the format tools/anomaly.py reads.
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from configs.schema import DataConfig, SyntheticConfig
from data.errors import DataError

MARKER = "synthetic.json"  # written last; its presence means the world is complete
LABELS = "anomalies.json"  # anomalous intervals per clip (worlds with anomalies only)
FORMAT_VERSION = 1  # bump when the generator's output changes, so old worlds are regenerated
ACTION_LEVELS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_TEXTURE_TERMS = 6  # sinusoids in the background texture
_TEXTURE_PERIOD = 4  # the texture repeats every this many frame widths


# fields added after worlds were first written: left out of the spec at their default, so the markers of worlds
# written before them stay valid
_LATER_FIELDS = ("background_contrast",)


def _world_spec(sc: SyntheticConfig) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(SyntheticConfig)}
    spec = {k: v for k, v in dataclasses.asdict(sc).items()
            if k != "enabled" and not (k.startswith("anomal") and sc.anomalies == 0)  # normal worlds keep their marker
            and not (k in _LATER_FIELDS and v == defaults[k])}
    return {"format": FORMAT_VERSION, "synthetic": spec}


def _actions(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    actions = np.zeros(num_frames)
    t = 1
    while t < num_frames:
        hold = int(rng.integers(2, 6))  # frames the action is held: 2..5
        actions[t:t + hold] = rng.choice(ACTION_LEVELS)
        t += hold
    return actions


def _background(rng: np.random.Generator, sc: SyntheticConfig, camera_x: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) in [0, 1]: a smooth texture seen through a camera at horizontal offsets camera_x (T,)."""
    h, w = sc.height, sc.width
    period = _TEXTURE_PERIOD * w
    base = rng.uniform(0.3, 0.55) + rng.uniform(-0.06, 0.06, size=3)  # muted, slightly tinted grey
    fx = rng.integers(2, 4 * _TEXTURE_PERIOD + 1, size=_TEXTURE_TERMS) / period  # cycles per pixel; whole per period
    fy = rng.uniform(0.0, 3.0, size=_TEXTURE_TERMS) / h
    phase = rng.uniform(0, 2 * np.pi, size=_TEXTURE_TERMS)
    # low contrast at the default background_contrast of 1, slightly different per channel
    amp = rng.uniform(0.02, 0.05, size=(_TEXTURE_TERMS, 3)) * sc.background_contrast
    # sin(a x + b y + p) = sin(a x) cos(b y + p) + cos(a x) sin(b y + p): separable, so the (T, H, W, 3) image is
    # a sum of outer products of per-column (T, W) and per-row (H) factors instead of T*H*W*K sines.
    x = np.arange(w)[None, :] + camera_x[:, None]  # (T, W) world x of each screen column
    ax = 2 * np.pi * fx * x[..., None]  # (T, W, K)
    by = 2 * np.pi * fy * np.arange(h)[:, None] + phase  # (H, K)
    cols = np.concatenate([np.sin(ax), np.cos(ax)], -1)  # (T, W, 2K)
    rows = np.concatenate([np.cos(by), np.sin(by)], -1)  # (H, 2K)
    weights = rows.T[:, :, None] * np.concatenate([amp, amp])[:, None, :]  # (2K, H, 3)
    cols, weights = cols.astype(np.float32), weights.astype(np.float32)
    img = np.broadcast_to(base.astype(np.float32), (len(camera_x), h, w, 3)).copy()
    for k in range(len(weights)):  # broadcast multiply-adds, not BLAS: its thread pool oversubscribes small products
        img += cols[:, None, :, k, None] * weights[k][None, :, None, :]
    return img  # (T, H, W, 3)


def _bounce(p0: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Positions at times t ((T,), or (T, N) per point) of points moving at v inside [lo, hi], reflecting at the
    walls: (T, N)."""
    length = hi - lo
    u = np.mod(p0 - lo + v * (t[:, None] if t.ndim == 1 else t), 2 * length)  # t: (T,) or per object (T, N)
    return lo + length - np.abs(u - length)


@dataclasses.dataclass(frozen=True)
class ObjectTracks:
    """Where the objects of one clip are: the ground truth of the synthetic world's motion (bounces included)."""

    x: np.ndarray  # (T, N) centre x, pixels
    y: np.ndarray  # (T, N) centre y, pixels
    radius: np.ndarray  # (N,) half size, pixels
    square: np.ndarray  # (N,) bool: square (else disc)
    colour: np.ndarray  # (N, 3) RGB in [0, 1]; object k is drawn over objects < k


def _anomaly_clock(rng: np.random.Generator, sc: SyntheticConfig, n: int) -> tuple[np.ndarray, list[dict]]:
    """Each object's clock tau (T, N) (tau = t when nothing happens) and the events, drawn after every other draw
    (a world without anomalies draws nothing here, so its clips are unchanged)."""
    T, L = sc.frames_per_clip, sc.anomaly_frames
    tau = np.repeat(np.arange(T, dtype=np.float64)[:, None], n, 1)
    events: list[dict] = []
    if sc.anomalies == 0 or n == 0:
        return tau, events
    first = T // 4  # normal motion first, so every event has a past to be predicted from
    segment = (T - first) // sc.anomalies
    for j in range(sc.anomalies):  # one event per segment, so events never overlap
        a = first + j * segment + int(rng.integers(0, segment - (L + 1) + 1))
        b = a + L - 1
        k, kind = int(rng.integers(n)), str(rng.choice(sc.anomaly_kinds))
        t0 = tau[a - 1, k]
        steps = np.arange(1, L + 1, dtype=np.float64)
        if kind == "stop":
            inside = np.full(L, t0)
        elif kind == "reverse":
            inside = t0 - steps
        elif kind == "speedup":
            inside = t0 + 3 * steps
        else:  # jump: anywhere on its own track, at least 4 frames of motion away from where it was
            inside = (t0 + rng.choice([-1, 1], size=L) * rng.uniform(4, T, size=L))
        tau[a:b + 1, k] = inside
        after = np.arange(b + 1, T)
        tau[b + 1:, k] = after if kind == "jump" else inside[-1] + (after - b)
        events.append({"object": k, "kind": kind, "start": a, "end": b, "label": [a, min(b + 1, T - 1)]})
    return tau, events


def _scene(sc: SyntheticConfig, clip_index: int, actions: np.ndarray | None = None, clock: np.ndarray | None = None,
           ) -> tuple[np.ndarray, np.ndarray, ObjectTracks, list[dict], np.ndarray]:
    """(background (T, H, W, 3) float, actions (T,), object tracks, anomalous events, the objects' clock (T, N)) of
    one clip: every random draw, in one order. `actions`: the camera driven by these instead of the clip's own;
    `clock`: the objects run on this (T, N) clock instead of their own (every draw unchanged in both cases)."""
    rng = np.random.default_rng([sc.seed, clip_index])
    t_frames, h, w, n = sc.frames_per_clip, sc.height, sc.width, sc.num_objects
    drawn = _actions(rng, t_frames) if sc.action_pan else np.zeros(t_frames)
    actions = drawn if actions is None else np.asarray(actions, dtype=np.float64)
    camera_x = np.cumsum(actions * sc.pan_speed) + rng.uniform(0, _TEXTURE_PERIOD * w)
    img = _background(rng, sc, camera_x)

    radius = rng.uniform(0.09, 0.17, size=n) * min(h, w)
    square = rng.random(n) < 0.5
    hue0 = rng.random()
    colours = np.array([colorsys.hsv_to_rgb((hue0 + k / max(n, 1)) % 1.0, rng.uniform(0.8, 1.0),
                                            rng.uniform(0.85, 1.0)) for k in range(n)]).reshape(n, 3).astype(np.float32)
    lo = np.stack([radius, radius], 1)  # (N, 2) as (x, y)
    hi = np.stack([w - radius, h - radius], 1)
    hi = np.maximum(hi, lo + 1e-3)  # objects larger than the frame still get a valid (tiny) range
    pos0 = rng.uniform(lo, hi)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    speed = rng.uniform(0.5, 1.0, size=n) * sc.speed
    vel = np.stack([np.cos(angle), np.sin(angle)], 1) * speed[:, None]
    t, events = _anomaly_clock(rng, sc, n)  # (T, N) each object's clock: t itself unless an event changes it
    if clock is not None:
        t = np.asarray(clock, dtype=np.float64).reshape(t.shape)
    px = _bounce(pos0[:, 0], vel[:, 0], lo[:, 0], hi[:, 0], t)  # (T, N)
    py = _bounce(pos0[:, 1], vel[:, 1], lo[:, 1], hi[:, 1], t)

    tracks = ObjectTracks(px.astype(np.float32), py.astype(np.float32), radius, square, colours)
    return img, actions, tracks, events, t


def object_clock(sc: SyntheticConfig, clip_index: int) -> np.ndarray:
    """(T, N): where on its own track each object of clip `clip_index` is in each frame, in frames of normal motion
    (t itself in a normal world; an anomalous event freezes, reverses, speeds up or scrambles it)."""
    return _scene(sc, clip_index)[4]


def object_tracks(sc: SyntheticConfig, clip_index: int) -> ObjectTracks:
    """The objects' positions in every frame of clip `clip_index` (what render_clip draws)."""
    return _scene(sc, clip_index)[2]


def anomaly_events(sc: SyntheticConfig, clip_index: int) -> list[dict]:
    """The anomalous events of clip `clip_index`: object, kind, start, end (abnormal frames) and label interval."""
    return _scene(sc, clip_index)[3]


def render_clip(sc: SyntheticConfig, clip_index: int, actions: np.ndarray | None = None,
                clock: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (T, H, W, 3), actions float (T,)) of one clip; a pure function of (sc, clip_index). `actions`:
    the same clip with the camera driven by these (a counterfactual; objects and texture unchanged); `clock` (T, N):
    with the objects at these points of their tracks (object_clock's units)."""
    return _draw(sc, *_scene(sc, clip_index, actions, clock)[:3])


def _draw(sc: SyntheticConfig, img: np.ndarray, actions: np.ndarray, tr: ObjectTracks) -> tuple[np.ndarray, np.ndarray]:
    h, w, n = sc.height, sc.width, sc.num_objects
    px, py, radius, square, colours = tr.x, tr.y, tr.radius, tr.square, tr.colour
    ys = np.arange(h, dtype=np.float32)[None, :, None] + 0.5  # pixel centres
    xs = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
    for k in range(n):  # fixed draw order: object k occludes objects < k
        dx, dy = xs - px[:, k, None, None], ys - py[:, k, None, None]  # (T, H, W)
        dist = np.maximum(np.abs(dx), np.abs(dy)) if square[k] else np.hypot(dx, dy)
        cover = np.clip(np.float32(radius[k] + 0.5) - dist, 0.0, 1.0)[..., None]  # 1-pixel antialiased edge
        img += (colours[k] - img) * cover
    frames = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    return frames, actions


def _write_clip(sc: SyntheticConfig, out: Path, clip_index: int) -> list[dict]:
    img, actions, tracks, events, _ = _scene(sc, clip_index)
    frames, actions = _draw(sc, img, actions, tracks)
    clip_dir = out / f"clip_{clip_index:04d}"
    clip_dir.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(clip_dir / f"{i:06d}.png", compress_level=1)
        if sc.action_pan:
            (clip_dir / f"{i:06d}.json").write_text(json.dumps({"action": float(actions[i])}))
    return events


def write_world(sc: SyntheticConfig, out: Path, progress: bool = True) -> None:
    """Write every clip as out/clip_XXXX/NNNNNN.png (+ NNNNNN.json with pan), then the marker file, last.
    Clips are independent, so threads write them in parallel (numpy and zlib release the GIL)."""
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
        jobs = {pool.submit(_write_clip, sc, out, c): c for c in range(sc.num_clips)}
        events = {}
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="synthetic world", unit="clip",
                        disable=not progress, leave=False):
            events[f"clip_{jobs[job]:04d}"] = job.result()
    if sc.anomalies:
        names = sorted(events)
        (out / LABELS).write_text(json.dumps({
            "format": "anomalous frame intervals per clip, [first, last], 0-based, inclusive",
            "clips": {c: [e["label"] for e in events[c]] for c in names},
            "events": {c: events[c] for c in names}}, indent=1))
    (out / MARKER).write_text(json.dumps(_world_spec(sc), indent=1, sort_keys=True))


def _holds_world(root: Path, sc: SyntheticConfig) -> bool | None:
    """True: root holds this world; False: it holds another synthetic world; None: no marker."""
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()) == _world_spec(sc)
    except (OSError, json.JSONDecodeError):
        return False


def ensure_synthetic(cfg: DataConfig, progress: bool = True) -> Path:
    """With cfg.synthetic.enabled, make cfg.root hold the world of cfg.synthetic (generated into a temporary
    sibling folder and renamed into place, so a reader never sees half a world); return cfg.root.
    A world of other settings (ours: it has the marker) is replaced; a non-empty folder without the marker is
    never touched (DataError). Safe when several processes call it at once: all write the same bytes."""
    root = Path(cfg.root)
    sc = cfg.synthetic
    if not sc.enabled:
        return root
    state = _holds_world(root, sc)
    if state:
        return root
    if state is None and root.exists() and any(root.iterdir()):
        raise DataError(f"data.root {root} is not empty and holds no synthetic world ({MARKER} missing); "
                        f"refusing to write into it: choose another data.root or remove the folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write_world(sc, tmp, progress)
        if state is False:
            warnings.warn(f"{root} holds a synthetic world of other settings; regenerating it", stacklevel=2)
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, old / "world")  # may race with another process doing the same: then checked below
            shutil.rmtree(old, ignore_errors=True)
        elif root.exists():
            root.rmdir()  # empty folder
        os.rename(tmp, root)
    except OSError:
        if _holds_world(root, sc):  # another process finished first with the same world
            return root
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
