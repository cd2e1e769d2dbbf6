"""Where a training step's GPU time goes: torch.profiler over a few steps, summed by kernel kind.

`profile.at` / `profile.steps` profile those steps of a run on every rank and write
run_dir/profile/rank{r}.json (the summary below) and rank{r}.trace.json.gz (open it in https://ui.perfetto.dev or
chrome://tracing). The benchmarks summarise their own steps with `kernel_summary`.

The summary answers the questions a slow step raises: is the GPU idle between kernels (the host is late: launch
overhead, data loading, a sync), is communication exposed (NCCL kernels running while no compute kernel runs), and
which kinds of kernel dominate (convolutions, matmuls, attention, inductor's fused Triton kernels, optimizer/EMA).
Kinds come from kernel names, so they are approximate; the top kernels are listed by name to check them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

_KINDS = (("nccl", ("nccl",)), ("attention", ("flash", "fmha", "attention", "sdpa")),
          ("optimizer_ema", ("multi_tensor", "adam", "foreach")), ("inductor_fused", ("triton",)),
          ("conv", ("conv", "xmma", "cudnn", "implicit", "wgrad", "dgrad", "fprop", "nhwc")),
          ("gemm", ("gemm", "cutlass", "cublas", "sm90")), ("copy", ("memcpy", "memset")))


def kernel_kind(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in _KINDS if any(k in n for k in keys)), "other_aten")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _annotation(e) -> bool:
    """A user annotation drawn on the GPU timeline ("DistributedDataParallel.forward", "nccl:all_reduce",
    "Optimizer.step#AdamW.step"): it spans kernels, it is not one."""
    return bool(getattr(e, "is_user_annotation", False)) or "annotation" in str(getattr(e, "activity_type", ""))


def kernel_summary(events, steps: int, top: int = 15) -> dict:
    """Summary of the CUDA kernels among profiler `events` (prof.events()) recorded over `steps` steps, per step:
    span (first kernel start to last kernel end), busy (some kernel running), idle, time by kind (a kernel's own
    duration; kernels of different streams may overlap), exposed NCCL time (NCCL running, no other kernel), and the
    `top` kernels by time."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e)]
    if not kernels:
        return {"error": "no CUDA kernels recorded"}
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    compute = [s for s, e in zip(spans, kernels) if kernel_kind(e.name) != "nccl"]
    by_kind: dict[str, float] = {}
    by_name: dict[str, tuple[float, int]] = {}
    for (a, b), e in zip(spans, kernels):
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + (b - a)
        us, n = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (us + b - a, n + 1)
    span = max(b for _, b in spans) - min(a for a, _ in spans)
    busy = _union_us(spans)
    per = 1e3 * steps  # microseconds over all steps -> milliseconds per step
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    return {"steps": steps, "span_ms_per_step": span / per, "busy_ms_per_step": busy / per,
            "idle_ms_per_step": (span - busy) / per, "busy_fraction": busy / span,
            "exposed_nccl_ms_per_step": (busy - _union_us(compute)) / per,
            "kinds_ms_per_step": {k: v / per for k, v in kinds},
            "kinds_fraction_of_busy": {k: v / busy for k, v in kinds},
            "kernels_per_step": len(kernels) / steps,
            "top": [{"kernel": name[:120], "kind": kernel_kind(name), "ms_per_step": us / per, "calls_per_step": n / steps}
                    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]}


def kernel_sources(events, pattern: str, steps: int, top: int = 10, depth: int = 4) -> list[dict]:
    """Which host ops launch the kernels whose name contains `pattern`: the launching op, its `depth` nearest
    parents and its input shapes (record_shapes=True), with their kernels' time per step, largest first. Needs a
    profile of CPU and CUDA activity."""
    found: dict[tuple, list] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        us = sum(k.duration for k in getattr(e, "kernels", []) if pattern in k.name)
        if not us:
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) <= depth:
            chain.append(parent.name)
            parent = parent.cpu_parent
        key = (" <- ".join(chain), str(getattr(e, "input_shapes", "")))
        entry = found.setdefault(key, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    ranked = sorted(found.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"ops": ops, "input_shapes": shapes[:200], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
            for (ops, shapes), (us, n) in ranked]


def profile_steps(fn, warmup: int = 2, steps: int = 5, sources: str | None = None) -> dict:
    """`kernel_summary` of `steps` back-to-back calls of fn after `warmup` calls (CUDA only); with `sources`, also
    `kernel_sources` of the kernels whose name contains it (host ops recorded too, which slows the host)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if sources else [])
    with profile(activities=activities, record_shapes=bool(sources)) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    summary = kernel_summary(events, steps)
    if sources:
        try:
            summary["sources"] = {"pattern": sources, "ops": kernel_sources(events, sources, steps)}
        except Exception as e:  # a benchmark keeps its timings when the profiler's event tree is not as expected
            summary["sources"] = {"pattern": sources, "error": repr(e)}
    return summary


class StepProfiler:
    """Profiles optimizer steps [start, start + steps) of a run (0-based step counter before each step; start 0 =
    off) on CPU and CUDA, then writes folder/rank{rank}.json and .trace.json.gz. The GPU is synchronised at both
    ends, so the window holds those steps' kernels (with deferred step checks, the host is one step ahead)."""

    def __init__(self, start: int, steps: int, folder: Path, rank: int, device: torch.device):
        self.start, self.steps, self.folder, self.rank = start, steps, Path(folder), rank
        self.cuda = device.type == "cuda"
        self._prof = None
        self._t0 = 0.0
        self._done = start <= 0 or steps <= 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def before_step(self, step: int) -> None:
        if self._done or self._prof is not None or step != self.start:
            return
        from torch.profiler import ProfilerActivity, profile
        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> Path | None:
        """`step` is the counter after the step. Returns the summary's path once written."""
        if self._prof is None or step < self.start + self.steps:
            return None
        self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof, self._done = self._prof, None, True
        prof.__exit__(None, None, None)
        n = step - self.start
        summary = kernel_summary(prof.events(), n) if self.cuda else {"steps": n}
        summary = {"rank": self.rank, "first_step": self.start, "host_ms_per_step": 1e3 * wall / n, **summary}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.rank}.json"
        path.write_text(json.dumps(summary, indent=1))
        prof.export_chrome_trace(str(self.folder / f"rank{self.rank}.trace.json.gz"))
        return path
