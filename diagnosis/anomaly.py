"""Anomaly detection by prediction error (Liu et al., CVPR 2018, "Future Frame Prediction for Anomaly Detection - A New
Baseline", sec. 3.4): a frame the model predicts badly is unusual. Scores, labels, frame-level AUC and pictures.

Regularity score (Liu et al., eq. 12): S(t) = (P(t) - min_t P) / (max_t P - min_t P) over the frames t of one clip,
P = PSNR of the predicted frame; the anomaly score is 1 - S. Unnormalised: the anomaly score is -P, comparable across
clips. Frames no window predicts (the first t_past of a clip) are left out of the scores and the AUC.
Patch variant (an option beside the paper's score): P = the PSNR of the worst local patch of the frame (the largest
mean squared error over patch x patch windows), so a small object's error is not diluted by a frame of background
that was predicted well (the local-maximum scoring of e.g. Ramachandra et al., TPAMI 2022; Georgescu et al., 2021).

Labels are anomalous frame intervals per clip, frame numbers 0-based and inclusive, from:
  JSON   {"clip_name": [[start, end], ...], ...}, or the same mapping under "clips" (what data/synthetic.py writes)
  CSV    rows clip,start,end (a header row is allowed)
  .m     UCSD's release (UCSDped1.m / UCSDped2.m): TestDataset.gt_frame{i} = [61:180]; 1-based frames of the i-th clip
  .mat   a MATLAB cell array `gt` of 2 x K [start; end] matrices, 1-based (the ped2.mat of Liu et al.'s code), read
         with scipy; the i-th cell is the i-th clip
For .m and .mat, clips are matched by order: the i-th label entry is the i-th clip in name order.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_roc

from diagnosis import plots

Intervals = list[tuple[int, int]]


# ---------------------------------------------------------------- scores

def regularity(psnr: torch.Tensor) -> torch.Tensor:
    """Per-clip min-max normalised PSNR (Liu et al., eq. 12) over the finite entries; NaN stays NaN. A clip whose
    PSNR is constant is all ones (perfectly regular)."""
    ok = torch.isfinite(psnr)
    if not ok.any():
        return psnr.clone()
    lo, hi = psnr[ok].min(), psnr[ok].max()
    return torch.where(ok, (psnr - lo) / (hi - lo) if hi > lo else torch.ones_like(psnr), psnr)


def patch_psnr(pred: torch.Tensor, true: torch.Tensor, patch: int) -> torch.Tensor:
    """PSNR (dB, on [0, 1] images, at most 100) of the worst patch x patch window of each frame (stride patch // 2):
    pred, true (..., 3, H, W) pixels in [-1, 1] -> (...). A patch larger than the frame is the whole frame."""
    err = (pred.float() - true.float()).div(2).pow(2).mean(-3)  # (..., H, W) squared error on [0, 1] images
    lead, (H, W) = err.shape[:-2], err.shape[-2:]
    kh, kw = min(patch, H), min(patch, W)
    mse = F.avg_pool2d(err.reshape(-1, 1, H, W), (kh, kw), stride=(max(kh // 2, 1), max(kw // 2, 1)))
    return (10 * torch.log10(1.0 / mse.flatten(1).amax(1).clamp_min(1e-10))).reshape(lead)


def smooth(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """A clip's per-frame series (N,) filtered over time by a Gaussian of `sigma` frames (truncated at 3 sigma), over
    its finite entries only: the weights of each frame's finite neighbours are renormalised, so the clip's ends and
    the frames no window predicts (NaN, left NaN) do not pull it down. sigma 0: unchanged. Frame-level scores are
    smoothed this way in much of the anomaly literature after Liu et al. (e.g. Georgescu et al., CVPR 2021): an event
    that prediction error sees at its onset and its end is then seen in the frames between."""
    if sigma <= 0:
        return values.clone()
    ok = torch.isfinite(values)
    radius = max(int(math.ceil(3 * sigma)), 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (offsets / sigma) ** 2)  # (2r + 1,)
    v = F.pad(torch.where(ok, values, 0).double()[None, None], (radius, radius))[0, 0]
    m = F.pad(ok.double()[None, None], (radius, radius))[0, 0]
    num = v.unfold(0, 2 * radius + 1, 1) @ w  # (N,) weighted sums over each frame's neighbourhood
    den = m.unfold(0, 2 * radius + 1, 1) @ w  # the weight of its finite neighbours
    return torch.where(ok, num / den.clamp_min(1e-12), values).to(values.dtype)


def anomaly_scores(psnr: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Higher = more anomalous: 1 - regularity (per clip) or -PSNR."""
    return 1 - regularity(psnr) if normalise else -psnr


# ---------------------------------------------------------------- labels

def frame_labels(intervals: Intervals, frame_indices: list[int]) -> torch.Tensor:
    """(N,) bool: frame_indices[f] lies in one of the inclusive intervals."""
    idx = torch.tensor(frame_indices)
    out = torch.zeros(len(frame_indices), dtype=torch.bool)
    for a, b in intervals:
        out |= (idx >= a) & (idx <= b)
    return out


def _intervals_from_list(value, where: str) -> Intervals:
    try:
        pairs = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a list of [start, end] pairs, got {value!r}") from None
    bad = [p for p in pairs if p[0] > p[1] or p[0] < 0]
    if bad:
        raise ValueError(f"{where}: intervals must have 0 <= start <= end, got {bad[:3]}")
    return pairs


def _ranges_1based(text: str) -> Intervals:
    """A MATLAB vector of 1-based frames such as '61:180' or '1:20, 30:45' or '5 6 7' -> 0-based inclusive intervals."""
    out = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        a, _, b = part.partition(":")
        out.append((int(a) - 1, int(b or a) - 1))
    return out


def load_labels(path: str | Path, clip_names: list[str]) -> dict[str, Intervals]:
    """Anomalous intervals per clip name (0-based inclusive frame numbers) from a JSON, CSV, UCSD .m or .mat file.
    `clip_names` (in name order) match the entries of .m/.mat files, which number clips instead of naming them."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        doc = json.loads(path.read_text())
        doc = doc.get("clips", doc) if isinstance(doc, dict) else doc
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping clip -> [[start, end], ...]")
        return {str(k): _intervals_from_list(v, f"{path}: {k}") for k, v in doc.items()}
    if suffix == ".csv":
        labels: dict[str, Intervals] = {}
        with open(path, newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if not row or (i == 0 and not row[-1].strip().lstrip("-").isdigit()):
                    continue  # blank line or header
                if len(row) != 3:
                    raise ValueError(f"{path}:{i + 1}: expected clip,start,end, got {row}")
                labels.setdefault(row[0].strip(), []).extend(_intervals_from_list([row[1:]], f"{path}:{i + 1}"))
        return labels
    if suffix == ".m":
        found = re.findall(r"gt_frame\s*\{\s*(\d+)\s*\}\s*=\s*\[([^\]]*)\]", path.read_text())
        if not found:
            raise ValueError(f"{path}: no 'TestDataset.gt_frame{{i}} = [a:b];' lines (UCSD's format)")
        entries = {int(i): _ranges_1based(v) for i, v in found}
        return _by_order(entries, clip_names, path)
    if suffix == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError:
            raise ValueError(f"{path}: reading .mat needs scipy (pip install scipy)") from None
        mat = loadmat(str(path))
        if "gt" not in mat:
            raise ValueError(f"{path}: no variable 'gt' (found {[k for k in mat if not k.startswith('__')]})")
        cells = mat["gt"].reshape(-1)
        entries = {}
        for i, cell in enumerate(cells, start=1):
            arr = cell.reshape(2, -1) if cell.size else cell.reshape(2, 0)
            entries[i] = [(int(a) - 1, int(b) - 1) for a, b in zip(arr[0], arr[1])]
        return _by_order(entries, clip_names, path)
    raise ValueError(f"{path}: labels must be .json, .csv, .m (UCSD) or .mat")


def _by_order(entries: dict[int, Intervals], clip_names: list[str], path: Path) -> dict[str, Intervals]:
    if len(entries) != len(clip_names):
        raise ValueError(f"{path} labels {len(entries)} clips but {len(clip_names)} clips were given; .m/.mat entries "
                         "are matched to clips by order")
    return {name: entries[i] for i, name in zip(sorted(entries), clip_names)}


def load_events(path: str | Path) -> dict[str, list[dict]]:
    """The labelled events with their kind, per clip, where a JSON labels file has them (data/synthetic.py's
    anomalies.json: "events" {clip: [{"kind", "label": [start, end]}, ...]}); {} for every other file."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return {}
    doc = json.loads(path.read_text())
    events = doc.get("events", {}) if isinstance(doc, dict) else {}
    return {str(clip): [e for e in evs if isinstance(e, dict) and "kind" in e and "label" in e]
            for clip, evs in events.items()} if isinstance(events, dict) else {}


def by_kind(scores: dict[str, torch.Tensor], frames: dict[str, list[int]], events: dict[str, list[dict]],
            after: int = 4) -> dict:
    """Where the detector finds which event: for each kind, the AUC of its labelled frames against every normal
    frame (other kinds left out) and the mean score at each position of the label interval; and the mean score of
    normal frames 1..`after` frames after an interval (a past that still holds the event) and of the other normal
    frames. scores / frames: per clip, the (N,) anomaly scores and the frame numbers they belong to."""
    pos: dict[str, dict[int, list[float]]] = {}
    after_s: dict[int, list[float]] = {}
    normal, far = [], []
    for clip, s in scores.items():
        evs = events.get(clip, [])
        for f, v in zip(frames[clip], s.tolist()):
            if not math.isfinite(v):
                continue
            inside = [e for e in evs if e["label"][0] <= f <= e["label"][1]]
            if inside:
                e = inside[0]
                pos.setdefault(e["kind"], {}).setdefault(f - e["label"][0], []).append(v)
                continue
            normal.append(v)
            gaps = [f - e["label"][1] for e in evs if 0 < f - e["label"][1] <= after]
            (after_s.setdefault(min(gaps), []) if gaps else far).append(v)
    neg = torch.tensor(normal, dtype=torch.float64)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    out = {}
    for kind, by_pos in sorted(pos.items()):
        p = torch.tensor([v for vs in by_pos.values() for v in vs], dtype=torch.float64)
        out[kind] = {"frames": int(p.numel()),
                     "auc": auc(torch.cat([p, neg]), torch.cat([torch.ones(len(p)), torch.zeros(len(neg))]).bool()),
                     "mean_score_by_position": [mean(by_pos.get(i, [])) for i in range(max(by_pos) + 1)]}
    out["normal_after_event"] = {"mean_score_by_distance": [mean(after_s.get(d, [])) for d in range(1, after + 1)],
                                 "frames": sum(len(v) for v in after_s.values())}
    out["normal_elsewhere"] = {"mean_score": mean(far), "frames": len(far)}
    return out


# ---------------------------------------------------------------- AUC

def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Frame-level ROC AUC (torchmetrics) of finite scores; NaN when only one class is present."""
    ok = torch.isfinite(scores)
    s, y = scores[ok].double(), labels[ok].long()
    if y.numel() == 0 or y.min() == y.max():
        return math.nan
    return float(binary_auroc(s, y))


def roc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    ok = torch.isfinite(scores)
    fpr, tpr, _ = binary_roc(scores[ok].double(), labels[ok].long())
    return fpr.tolist(), tpr.tolist()


def intervals_of(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of True in a (N,) bool mask, as inclusive (first, last) positions."""
    out, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    return out


# ---------------------------------------------------------------- pictures

def roc_picture(curves: dict[str, tuple[list[float], list[float], float]], title: str):
    """ROC curves, label -> (fpr, tpr, auc), with the chance diagonal."""
    series = {f"{k} (AUC {a:.3f})": (fpr, tpr) for k, (fpr, tpr, a) in curves.items()}
    series["chance"] = ([0.0, 1.0], [0.0, 1.0])
    return plots.line_plot(series, title, xlabel="false positive rate (y: true positive rate)")


def score_curve(frames: list[int], series: dict[str, list[float]], anomalous: list[tuple[int, int]], title: str):
    """Scores against frame number, with the labelled anomalous intervals shaded."""
    return plots.line_plot({k: (frames, v) for k, v in series.items()}, title, xlabel="frame",
                           xspans=[(float(a), float(b)) for a, b in anomalous])
