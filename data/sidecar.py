"""Per-frame JSON sidecars: where a frame's sidecar lives and how a dotted key is read from it."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from data.errors import DataError


def sidecar_path(frame: Path, clip_dir: Path, sidecar_dir: str) -> Path | None:
    """`<stem>.json` or `<stem>.json.gz` beside the frame (sidecar_dir "") or in clip_dir/sidecar_dir; None if absent."""
    folder = frame.parent if not sidecar_dir else clip_dir / sidecar_dir
    for name in (f"{frame.stem}.json", f"{frame.stem}.json.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_sidecar(path: Path) -> Any:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON sidecar ({e})") from None


def get_dotted(doc: Any, key: str, path: Path) -> float:
    """doc["a"]["b"] for key "a.b" (integer parts index lists) as a float; booleans -> 0/1."""
    value = doc
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise DataError(f"{path}: sidecar has no key {key!r} (missing part {part!r})")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise DataError(f"{path}: sidecar key {key!r} is {value!r}, not a finite number or boolean")


def read_sidecar_values(frame: Path, clip_dir: Path, sidecar_dir: str, keys: list[str]) -> list[float]:
    """The values of `keys` in the sidecar of `frame`; a missing sidecar or key is a DataError naming it."""
    path = sidecar_path(frame, clip_dir, sidecar_dir)
    if path is None:
        folder = frame.parent if not sidecar_dir else clip_dir / sidecar_dir
        raise DataError(f"{frame}: no sidecar {folder / (frame.stem + '.json')}[.gz] (needed for data.cond_keys {keys})")
    doc = load_sidecar(path)
    return [get_dotted(doc, key, path) for key in keys]
