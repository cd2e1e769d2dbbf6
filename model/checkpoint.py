"""Checkpoint files: atomic writes, a checksum and commit marker, a `latest` pointer, retention, fallback on load.

Written by the trainer, read by `model/loading.py` (inference) and `training/resume.py`; it knows nothing of either.

File layout: torch.save payload, then a 96-byte footer  b"VPCKPT1\\n" + sha256(payload) hex + payload length
(zero-padded) + b"\\n". The footer is written last and the file renamed into place only after fsync, so a file
under a final name is complete; a missing or wrong footer means the file is not a committed checkpoint.

Loading never runs code from the file: `torch.load(weights_only=True)` rebuilds only tensors, plain containers and
primitives, plus the numpy arrays of `np.random.get_state()` (allow-listed in SAFE_GLOBALS: the trainer's checkpoints
held it before their RNG states gave way to derived step seeds, and those must still load). A file that names any
other callable (a pickled object's `__reduce__`) is refused with UnsafeCheckpointError, even when its checksum is
valid: the checksum proves the file is complete, not that it is harmless. Weights to share go through
tools/export.py (safetensors) instead.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch

MAGIC = b"VPCKPT1\n"
_FOOTER_LEN = len(MAGIC) + 64 + 20 + 1
_NAME_RE = re.compile(r"^ckpt_(\d{9})\.pt$")
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


class UnsafeCheckpointError(CheckpointError):
    """A complete checkpoint that holds something a weights-only load refuses (code, or a class not allow-listed).

    Never skipped over silently: a file under a final name with a valid checksum that carries code is not an
    accident of a crash, so resuming stops instead of falling back to an older checkpoint."""


# numpy's RNG state (np.random.get_state(): a uint32 array) as numpy 2 and numpy 1 pickle it; nothing else. Only
# checkpoints written before step seeds were derived hold it (their "rng" entry, ignored at resume).
_reconstruct = np._core.multiarray._reconstruct
SAFE_GLOBALS = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                np.dtypes.UInt32DType]


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:09d}.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: list[bytes]) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write {path}: {e.strerror or e} (disk full or not writable?); "
                                  "the previous checkpoint is intact") from e
        raise
    _fsync_dir(path.parent)


def list_checkpoints(folder: Path) -> list[Path]:
    """Committed-name checkpoint files, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove temp files of interrupted saves (rank 0, at start). Returns what was removed."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and ".tmp." in p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def save_checkpoint(state: dict, folder: str | Path, step: int, keep_last: int = 3,
                    protect: tuple[Path, ...] = ()) -> Path:
    """Write `state` as checkpoint `step` atomically, point `latest` at it, prune to the last `keep_last`.

    Files in `protect` (the one resumed from) are never deleted. Call on one rank only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    footer = MAGIC + hashlib.sha256(payload).hexdigest().encode() + f"{len(payload):020d}".encode() + b"\n"
    path = folder / checkpoint_name(step)
    _atomic_write(path, [payload, footer])
    _atomic_write(folder / LATEST, [path.name.encode() + b"\n"])  # pointer updated only after the file is in place
    prune(folder, keep_last, protect=(*protect, path))
    return path


def prune(folder: Path, keep_last: int, protect: tuple[Path, ...] = ()) -> None:
    """Delete all but the newest `keep_last` checkpoints, never a protected one or the one `latest` names."""
    ckpts = list_checkpoints(folder)
    keep = {p.resolve() for p in ckpts[-keep_last:]} | {Path(p).resolve() for p in protect}
    target = read_latest_pointer(folder)
    if target is not None:
        keep.add(target.resolve())
    for p in ckpts:
        if p.resolve() not in keep:
            p.unlink(missing_ok=True)


def verify(path: Path) -> str | None:
    """None if `path` is a complete, uncorrupted checkpoint, else the reason it is not."""
    try:
        size = path.stat().st_size
        if size < _FOOTER_LEN:
            return f"truncated ({size} bytes)"
        with open(path, "rb") as f:
            f.seek(size - _FOOTER_LEN)
            footer = f.read()
            if not footer.startswith(MAGIC):
                return "no commit marker (interrupted or truncated write)"
            digest, length = footer[len(MAGIC):len(MAGIC) + 64].decode(), int(footer[len(MAGIC) + 64:-1])
            if length != size - _FOOTER_LEN:
                return f"length mismatch (footer says {length}, file holds {size - _FOOTER_LEN})"
            f.seek(0)
            h = hashlib.sha256()
            remaining = length
            while remaining:
                block = f.read(min(1 << 24, remaining))
                if not block:
                    return "truncated"
                h.update(block)
                remaining -= len(block)
        if h.hexdigest() != digest:
            return "checksum mismatch (corrupted bytes)"
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"unreadable: {e}"
    return None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Verify and load one checkpoint; CheckpointError naming the file if it is not valid."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    reason = verify(path)
    if reason:
        raise CheckpointError(f"checkpoint {path} is not valid: {reason}")
    return _unpickle(path.read_bytes()[:-_FOOTER_LEN], path, map_location)


def footer_digest(path: Path) -> str | None:
    """The payload checksum a checkpoint's footer records (reads only the footer), or None when it has none: two
    files with the same digest hold the same state."""
    try:
        with open(path, "rb") as f:
            f.seek(-_FOOTER_LEN, os.SEEK_END)
            footer = f.read()
    except OSError:
        return None
    return footer[len(MAGIC):len(MAGIC) + 64].decode() if footer.startswith(MAGIC) else None


def load_bytes(data: bytes, name: str | Path, map_location="cpu") -> dict:
    """A checkpoint file's bytes received from another rank (`name`: the file there, for messages), checked against
    their footer and loaded as load_checkpoint loads a file; CheckpointError when they do not verify."""
    if len(data) < _FOOTER_LEN or not data[-_FOOTER_LEN:].startswith(MAGIC):
        raise CheckpointError(f"checkpoint {name} as received: no commit marker ({len(data)} bytes)")
    footer, payload = data[-_FOOTER_LEN:], data[:-_FOOTER_LEN]
    digest, length = footer[len(MAGIC):len(MAGIC) + 64].decode(), int(footer[len(MAGIC) + 64:-1])
    if length != len(payload) or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {name} as received: checksum or length mismatch")
    return _unpickle(payload, name, map_location)


def _unpickle(payload: bytes, name: str | Path, map_location) -> dict:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        try:
            named = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(payload))) or "?"
        except Exception:  # noqa: BLE001 - the listing is only for the message
            named = "?"
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {name}: besides tensors and plain data it names {named}, which loading "
            "would call (this project's checkpoints never do; do not use this file unless you know who made it "
            "and why)") from None


def read_latest_pointer(folder: Path) -> Path | None:
    p = Path(folder) / LATEST
    try:
        name = p.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return folder / name if _NAME_RE.match(name) else None


def resolve_resume(folder: str | Path, which: str = "latest") -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state.

    which = "latest": the file `latest` names, else the newest valid one; each invalid candidate is skipped
    with a warning naming it. None when the folder holds no checkpoint at all (a fresh start);
    CheckpointError when checkpoints exist but none is valid (never silently start over).
    which = a path: exactly that file, or CheckpointError."""
    if which != "latest":
        path = Path(which)
        return path, load_checkpoint(path)
    folder = Path(folder)
    ckpts = list_checkpoints(folder)
    pointer = read_latest_pointer(folder)
    if (folder / LATEST).exists() and (pointer is None or not pointer.is_file()):
        warnings.warn(f"checkpoint pointer {folder / LATEST} is bad (names {pointer}); using the newest valid "
                      "checkpoint instead", stacklevel=2)
        pointer = None
    candidates = ([pointer] if pointer else []) + [p for p in reversed(ckpts) if p != pointer]
    if not candidates:
        return None
    bad = []
    for path in candidates:
        reason = verify(path)
        if reason is None:
            try:
                return path, load_checkpoint(path)
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - a verified file that still fails to unpickle
                reason = f"failed to load: {e}"
        warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
        bad.append(f"{path.name}: {reason}")
    raise CheckpointError(f"no valid checkpoint in {folder}; refusing to start over. Bad files: " + "; ".join(bad))
