"""Latent cache: VAE posterior moments of every frame, computed once (split over ranks) and reused.

Training then never runs the VAE encoder (the SD-VAE encoder costs ~30x a UNet step at 256x448).
Folder: <cache_dir>/<key>/ with one `<clip>.mean.npy` (and `.std.npy`) per clip, (N, C, h, w) float16 scaled
latents, and `manifest.json` written last. The key hashes everything the latents depend on: the VAE's identity
(config, scale, dtype), the resolution and resize mode, and the data fingerprint (file names, sizes, mtimes).
A manifest that is missing, for another key, or whose files' sizes or checksums differ means the cache is
incomplete or corrupt: it is rebuilt, never used.
cache.dir may be shared by every node or local to each (found out at start, `sharing_ranks`): each group of ranks
that sees one folder builds, keys and verifies its own copy, from the frames its own data.root holds.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.clips import Clip, clips_fingerprint
from data.dataset import VideoWindowDataset, read_clip_frames, read_cond
from data.errors import DataError
from data.windows import Window, build_windows
from data.workers import ignore_stop_signals

_VERSION = 1


# The build is shared by the ranks of a job; `info` is training.distributed.DistInfo (rank, world_size, device). These
# two collectives are all this module needs of torch.distributed, so the data layer does not import the training one.
def _barrier(info) -> None:
    if info.enabled:
        dist.barrier(**({"device_ids": [info.device.index]} if info.device.type == "cuda" else {}))


def _gather(obj, info) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def sharing_ranks(cache_dir: Path, info) -> list[list[int]]:
    """For each rank, the ranks that see the same `cache_dir` as it does (itself included): on a filesystem shared by
    all nodes, every rank; on a node-local disk, the ranks of its node. Found by each rank creating a token file named
    for its rank and looking for the others' by name (a collective). DataError when the answer is not a partition
    (rank a sees b's token but b does not see a's)."""
    if not info.enabled:
        return [[0]]
    run = _gather(uuid.uuid4().hex[:12] if info.is_main else None, info)[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    token = cache_dir / f".rank-probe-{run}-{info.rank}"
    token.touch()
    _barrier(info)
    seen = [r for r in range(info.world_size) if (cache_dir / f".rank-probe-{run}-{r}").exists()]
    _barrier(info)
    token.unlink(missing_ok=True)
    groups = _gather(seen, info)
    if any(groups[r] != groups[q] for r in range(info.world_size) for q in groups[r]):
        raise DataError(f"cache.dir {cache_dir}: the ranks see it inconsistently ("
                        + "; ".join(f"rank {r} sees the files of ranks {g}" for r, g in enumerate(groups))
                        + "); use a folder that is either shared by every node or local to each")
    return groups


def cache_key(clips: list[Clip], data_cfg, vae_identity: dict, store_std: bool) -> tuple[str, dict]:
    ident = {"version": _VERSION, "vae": vae_identity, "height": data_cfg.height, "width": data_cfg.width,
             "resize_mode": data_cfg.resize_mode, "data": clips_fingerprint(clips), "std": store_std,
             "clips": [c.name for c in clips]}
    if data_cfg.convert_modes != "off":  # only then do the pixels depend on it (caches made before stay valid)
        ident["convert_modes"] = data_cfg.convert_modes
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], ident


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _clip_file(folder: Path, i: int, what: str) -> Path:
    return folder / f"{i:06d}.{what}.npy"


def _valid(folder: Path, key: str, n_clips: int) -> str | None:
    """None if the cache folder is complete and intact, else why not."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest (never finished)"
    try:
        m = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return "manifest unreadable"
    if m.get("key") != key or len(m.get("files", {})) == 0 or m.get("num_clips") != n_clips:
        return "manifest is for other data or another VAE"
    for name, meta in m["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return f"{p} missing or of the wrong size"
        if _sha256(p) != meta["sha256"]:
            return f"{p} checksum mismatch"
    return None


class _FrameChunks(Dataset):
    """(clip index, first frame, frames) chunks of the clips this rank encodes; decoded in DataLoader workers."""

    def __init__(self, clips: list[Clip], clip_ids: list[int], data_cfg, chunk: int):
        self.clips, self.cfg = clips, data_cfg
        self.items = [(ci, s, min(s + chunk, clips[ci].num_frames)) for ci in clip_ids
                      for s in range(0, clips[ci].num_frames, chunk)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ci, a, b = self.items[i]
        return ci, a, read_clip_frames(self.clips[ci], list(range(a, b)), self.cfg)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_clip(folder: Path, ci: int, arrays: dict[str, np.ndarray]) -> None:
    for what in sorted(arrays, key=lambda w: w == "mean"):  # mean last: it marks the clip complete (_encoded)
        _save_npy(_clip_file(folder, ci, what), arrays[what])


def _encoded(folder: Path, clips: list[Clip]) -> set[int]:
    """Clips of an unfinished build (stopped by SIGTERM, a crash, a full disk) whose files are complete: each file
    is written under its final name only when whole (_save_npy), and a clip's mean last, so a mean file of the
    clip's frame count means the clip is done. A rebuild encodes only the others."""
    done = set()
    for ci, clip in enumerate(clips):
        path = _clip_file(folder, ci, "mean")
        try:
            if path.is_file() and np.load(path, mmap_mode="r").shape[0] == clip.num_frames:
                done.add(ci)
        except (OSError, ValueError):  # unreadable: encoded again
            pass
    return done


_WRITERS = 2  # threads writing finished clips (np.save + fsync) while the main thread keeps the GPU fed
_MAX_QUEUED_CLIPS = 4  # finished clips held in memory until written; a fifth waits for the oldest write


@dataclass
class _EncodedChunk:
    """One chunk's moments on their way to the host: fp16 (t, C, h, w) host tensors (pinned on GPU), valid once
    `ready()` returns. On GPU the device-to-host copies are queued behind the encoder and `event` marks them done,
    so the host waits only when it needs the numbers; on CPU (event None) everything is done already."""

    ci: int  # clip index
    a: int  # first frame
    mean: torch.Tensor
    std: torch.Tensor | None
    event: torch.cuda.Event | None

    def ready(self) -> "_EncodedChunk":
        if self.event is not None:
            self.event.synchronize()
        return self


def _to_host(moments: torch.Tensor) -> torch.Tensor:
    """Queue a copy of moments into a host fp16 tensor (pinned when they are on GPU, so the copy is asynchronous).
    The cast happens on the device (half the bytes over PCIe) and rounds as numpy's float32 -> float16 cast does."""
    src = moments.to(torch.float16).contiguous()
    host = torch.empty(src.shape, dtype=torch.float16, pin_memory=src.device.type == "cuda")
    return host.copy_(src, non_blocking=True)


def _encode_chunk(vae, ci: int, a: int, frames: torch.Tensor, pad: bool) -> _EncodedChunk:
    """Start encoding frames (t, 3, H, W) of clip ci from frame a; t <= vae.chunk_size.

    With `pad`, a short chunk (a clip's last) is padded to vae.chunk_size by repeating its last frame; the padded outputs
    are dropped: every encoder call then has one shape, so cuDNN autotuning and torch.compile keep one plan instead
    of re-tuning or recompiling for each clip's remainder. The encoder treats frames independently (convs,
    per-sample GroupNorm, attention within a frame), so the padding does not change the real frames' moments."""
    t = frames.shape[0]
    x = frames.to(vae.device, non_blocking=True)
    if pad and t < vae.chunk_size:
        x = torch.cat([x, x[-1:].expand(vae.chunk_size - t, *x.shape[1:])])
    mean, std = vae.encode_moments(x.unsqueeze(0))  # (1, chunk_size, C, h, w) each
    host_mean = _to_host(mean[0, :t])
    host_std = None if std is None else _to_host(std[0, :t])
    event = None
    if mean.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return _EncodedChunk(ci, a, host_mean, host_std, event)


def _wait_for(writes: deque[Future], keep: int) -> None:
    """Wait until at most `keep` clip writes are outstanding, oldest first; re-raises a failed write's error."""
    while len(writes) > keep:
        writes.popleft().result()


def build_or_load(clips: list[Clip], data_cfg, vae, cache_dir: str | Path, info, store_std: bool = True,
                  num_workers: int = 2, log=print, pad_chunks: bool | None = None) -> Path:
    """Return the folder of a valid cache for these clips and this VAE, building it when it is missing, stale or
    corrupt. Every rank must call this. The ranks that see the same cache_dir (sharing_ranks: all of them on a shared
    filesystem, one node's on a node-local disk) check, build and verify their copy together, the first of them
    leading; the work is split over them. pad_chunks: encode every chunk at vae.chunk_size frames (None = on CUDA
    only, where fixed shapes keep one cuDNN/compiled plan; on a CPU the padding is only extra work: 32-frame clips
    in 64-frame chunks doubled the demo's cache build)."""
    key, ident = cache_key(clips, data_cfg, vae.identity(), store_std)  # this rank's data files (sizes, mtimes)
    folder = Path(cache_dir) / key
    groups = sharing_ranks(Path(cache_dir), info)
    group = groups[info.rank]
    leader, lead = group[0], info.rank == group[0]
    keys = _gather(key, info)
    if differ := [(r, g[0]) for r, g in enumerate(groups) if keys[r] != keys[g[0]]]:  # raised on every rank
        raise DataError(f"ranks {differ[0][1]} and {differ[0][0]} share cache.dir {cache_dir} but see other data "
                        "files under data.root (names, sizes or mtimes differ): every node must read the same data")
    reasons = _gather(_valid(folder, key, len(clips)) if lead else None, info)
    reason = reasons[leader]
    if len(group) < info.world_size and info.is_main:
        log(f"latent cache: cache.dir {cache_dir} is not shared by all ranks (rank 0 shares it with ranks {group}): "
            "each node builds and verifies its own copy")
    if all(r is None for r in reasons):
        log(f"latent cache: using {folder}")
        return folder
    done: set[int] = set()
    if lead and reason is not None:
        if folder.exists() and not (folder / "manifest.json").exists():  # an unfinished build: keep its clips
            for tmp in folder.glob("*.tmp*"):
                tmp.unlink()
            done = _encoded(folder, clips)
        elif folder.exists():  # a stale or corrupt finished cache
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        kept = f"; continuing: {len(done)} of {len(clips)} clips already encoded" if done else ""
        log(f"latent cache: building {folder} ({reason}); {sum(c.num_frames for c in clips)} frames{kept}")
    done = _gather(done, info)[leader]
    _barrier(info)
    todo = [] if reason is None else [ci for ci in range(len(clips)) if ci not in done]
    mine = todo[group.index(info.rank)::len(group)]
    chunks = _FrameChunks(clips, mine, data_cfg, vae.chunk_size)
    loader = DataLoader(chunks, batch_size=None, num_workers=num_workers, worker_init_fn=ignore_stop_signals,
                        pin_memory=info.device.type == "cuda", persistent_workers=False)
    buffers: dict[int, dict[str, np.ndarray]] = {}
    remaining = {ci: clips[ci].num_frames for ci in mine}
    bar = tqdm(total=sum(remaining.values()), desc="latent cache", unit="frame", disable=not info.is_main,
               dynamic_ncols=True)
    # Finished clips are written (np.save + fsync) by writer threads; `writes` holds their outstanding jobs.
    pool = ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="latent-cache-write")
    writes: deque[Future] = deque()

    def store(chunk: _EncodedChunk) -> None:
        """Copy a chunk's moments into its clip's buffer; hand a finished clip to a writer thread."""
        ci, a = chunk.ci, chunk.a
        b = a + chunk.mean.shape[0]
        if ci not in buffers:
            shape = (clips[ci].num_frames, *chunk.mean.shape[1:])
            buffers[ci] = {"mean": np.empty(shape, np.float16)}
            if store_std and chunk.std is not None:
                buffers[ci]["std"] = np.empty(shape, np.float16)
        buffers[ci]["mean"][a:b] = chunk.mean.numpy()
        if "std" in buffers[ci]:
            buffers[ci]["std"][a:b] = chunk.std.numpy()
        remaining[ci] -= b - a
        bar.update(b - a)
        if remaining[ci] == 0:  # clip done: a writer thread writes it and frees its buffer
            arrays = buffers.pop(ci)
            for arr in arrays.values():
                if not np.isfinite(arr).all():
                    raise RuntimeError(f"latent cache: non-finite latents for clip {clips[ci].path} "
                                       "(fp16 overflow? check the VAE's scaling factor and vae.dtype)")
            _wait_for(writes, _MAX_QUEUED_CLIPS - 1)
            writes.append(pool.submit(_save_clip, folder, ci, arrays))

    pad = vae.device.type == "cuda" if pad_chunks is None else pad_chunks
    # Pipelined: chunk k+1's encoder is queued before chunk k's results are waited for, so the GPU keeps working
    # while the host copies, the DataLoader hands over the next chunk and finished clips are written.
    try:
        in_flight: _EncodedChunk | None = None
        for ci, a, frames in loader:
            launched = _encode_chunk(vae, ci, a, frames, pad)
            if in_flight is not None:
                store(in_flight.ready())
            in_flight = launched
        if in_flight is not None:
            store(in_flight.ready())
        _wait_for(writes, 0)  # every file complete (or its error raised) before the manifest step
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    _barrier(info)
    if lead and reason is not None:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.glob("*.npy"))}
        manifest = {"key": key, "num_clips": len(clips), "identity": ident, "files": files}
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        os.replace(tmp, folder / "manifest.json")
    _barrier(info)
    return folder


class LatentWindowDataset(Dataset):
    """Windows over cached latents. Item: {"latent_mean": (T, C, h, w) float16 scaled latents (as stored: the
    model upcasts on its device, so a batch crosses PCIe at half the bytes), ["latent_std": same],
    ["latent_anchors": (Tf, C, h, w) float16, after attach_anchors], "cond": (cond_dim,), "clip": name,
    "index": window index}."""

    def __init__(self, clips: list[Clip], data_cfg, windows: list[Window], folder: Path, clip_ids: list[int],
                 with_std: bool = True):
        """clip_ids[i] is the index of clips[i] in the clip list the cache was built from. with_std=False leaves
        the cached std out of the items (vae.latent = mean never reads it)."""
        self.clips, self.cfg, self.windows = clips, data_cfg, windows
        self.folder, self.clip_ids = Path(folder), clip_ids
        self.with_std = with_std
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self.anchors: torch.Tensor | None = None  # (windows, Tf, C, h, w) float16, from attach_anchors

    def attach_anchors(self, anchors_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       decode: Callable[[torch.Tensor], torch.Tensor], positions: Sequence[int], batch_size: int,
                       show_progress: bool = True) -> None:
        """Compute, once, anchors_of(past latent means (B, Tp, C, h, w) float32, decoded) for every window and hand
        them out with the items as "latent_anchors" (diffusion.motion_anchor: the VAE decode, block matching and VAE
        encode behind them cost 7x a CPU training step when done every step; a window's anchors never change when its
        past is the posterior mean). `decoded` is the window's past frames at `positions`, (B, len(positions), 3, H,
        W), by `decode` ((N, T, C, h, w) latents -> (N, T, 3, H, W) frames), each cached frame decoded once for all
        the windows that share it (a frame is the last past frame of one window and the earlier one of another).
        Held in memory: windows x t_future latents, float16."""
        tp, out, frames = self.cfg.t_past, [], {}  # frames: (clip, frame index) -> decoded, for the batch's clips
        for a in tqdm(range(0, len(self.windows), batch_size), desc="motion anchors", unit="batch",
                      disable=not show_progress, dynamic_ncols=True):
            batch = self.windows[a:a + batch_size]
            past = torch.stack([torch.from_numpy(np.asarray(self._array(w.clip, "mean")[list(w.frames)[:tp]]))
                                for w in batch])
            wanted = [[(w.clip, w.frames[p]) for p in positions] for w in batch]
            clips = {w.clip for w in batch}
            frames = {k: v for k, v in frames.items() if k[0] in clips}  # windows run clip by clip
            missing = sorted({k for row in wanted for k in row} - frames.keys())
            for c, keys in itertools.groupby(missing, key=lambda k: k[0]):
                idx = [f for _, f in keys]
                lat = torch.from_numpy(np.asarray(self._array(c, "mean")[idx])).float()
                frames.update({(c, f): x for f, x in zip(idx, decode(lat[None])[0])})
            decoded = torch.stack([torch.stack([frames[k] for k in row]) for row in wanted])
            out.append(anchors_of(past.float(), decoded).to("cpu", torch.float16))
        self.anchors = torch.cat(out) if out else None

    def _array(self, clip: int, what: str) -> np.ndarray | None:
        k = (clip, what)
        if k not in self._arrays:  # memory-mapped lazily, per worker process
            p = _clip_file(self.folder, self.clip_ids[clip], what)
            self._arrays[k] = np.load(p, mmap_mode="r") if p.is_file() else None
        return self._arrays[k]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        w = self.windows[index]
        idx = list(w.frames)
        item = {"latent_mean": torch.from_numpy(np.asarray(self._array(w.clip, "mean")[idx])),
                "clip": self.clips[w.clip].name, "index": index}
        std = self._array(w.clip, "std") if self.with_std else None
        if std is not None:
            item["latent_std"] = torch.from_numpy(np.asarray(std[idx]))
        if self.anchors is not None:
            item["latent_anchors"] = self.anchors[index]
        clip = self.clips[w.clip]
        future = idx[self.cfg.t_past:]
        item["cond"] = (torch.cat([read_cond(clip, i, self.cfg) for i in future]) if self.cfg.cond_keys
                        else torch.zeros(0))
        return item


def training_set(splits, cfg, vae, info, min_windows: int = 1, log=print) -> Dataset:
    """The training windows: over cached latents (cache.enabled, the cache built here when missing or stale,
    a collective) or over pixels encoded on the fly. DataError when there are fewer than `min_windows`."""
    windows = build_windows(splits.train, cfg.data)
    if cfg.cache.enabled:
        folder = build_or_load(splits.clips, cfg.data, vae, cfg.cache.dir, info, store_std=cfg.cache.std,
                               num_workers=cfg.data.num_workers, log=log)
        ids = [splits.clips.index(c) for c in splits.train]
        dataset = LatentWindowDataset(splits.train, cfg.data, windows, folder, ids, with_std=cfg.vae.latent == "sample")
    else:
        dataset = VideoWindowDataset(splits.train, cfg.data, windows)
    if len(dataset) < min_windows:
        raise DataError(f"the training split has {len(dataset)} windows, fewer than one global batch "
                         f"({min_windows}); add data or lower train.batch_size")
    return dataset
