"""One code path for 1 process, torchrun on N GPUs and several nodes: process group, ranks, step seeds, reductions.

Every collective here is entered by every rank; nothing is rank-0-only except printing.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm



@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str = "auto") -> str:
    """A --device choice as every entry point takes it: "auto" = "cuda" when a CUDA device is present, else "cpu";
    any other name (cpu, cuda, cuda:1) as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def setup(timeout_s: int = 600, device: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device, create the process group (NCCL on GPU, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = resolve_device(device) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = {}
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            store = {"store": _attempt_store(rank, world, timeout), "rank": rank, "world_size": world}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout, **store,
                                **({"device_id": dev} if use_cuda else {}))
    return DistInfo(rank, world, local_rank, dev)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, its keys prefixed with the restart attempt.

    Why: torchrun keeps one agent store across `--max-restarts` restarts, so a rank of the new attempt that reaches
    init_process_group before its peers reads the old attempt's addresses (gloo: "connectFullMesh failed ...
    Connection refused"; NCCL: a stale unique id) and the restart fails. A prefix per attempt keeps them apart."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)


def teardown() -> None:
    """Destroy the process group while the interpreter is fully alive.

    Why the gc.collect(): destroy_process_group only drops c10d's own references. The Trainer and its DDP wrapper
    sit in reference cycles, so DDP's reducer (which holds the group and its bucket tensors) would otherwise live
    until the interpreter's final collection, where destroying gloo's work objects needs a GIL that is being torn
    down. That is the likely cause (inferred, not reproduced) of a finished 2-rank run that died once in CI with
    SIGABRT ("terminate called without an active exception") after its last checkpoint, failing the whole job."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def printer(info: DistInfo):
    """print() for rank 0 that keeps tqdm's bars intact; a no-op on the other ranks."""
    def say(*args) -> None:
        if info.is_main:
            tqdm.write(" ".join(str(a) for a in args))
    return say


def wrap(unet: torch.nn.Module, cfg, info: DistInfo) -> torch.nn.Module:
    """The UNet as the training step calls it: in DDP on several ranks, compiled with speed.compile on GPU."""
    compiled = cfg.speed.compile and info.device.type == "cuda"  # like every speed switch, GPU only
    net = unet
    if info.enabled:
        net = DDP(unet, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                  bucket_cap_mb=_ddp_bucket_mb(unet, cfg.ddp, compiled),
                  gradient_as_bucket_view=cfg.ddp.bucket_view)
        if cfg.ddp.grad_dtype == "bf16":
            net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    if compiled:
        net = torch.compile(net, mode=cfg.speed.compile_mode)
    return net


def _ddp_bucket_mb(unet: torch.nn.Module, dc, compiled: bool) -> float:
    """ddp.bucket_mb, or auto (0): one bucket holding every gradient when compiled, else DDP's 25 MiB."""
    if dc.bucket_mb > 0:
        return dc.bucket_mb
    grad_mib = sum(p.numel() * p.element_size() for p in unet.parameters() if p.requires_grad) / 2 ** 20
    return grad_mib + 1.0 if compiled else 25.0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce(t: torch.Tensor, info: DistInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (no-op on one process); returns t."""
    if info.enabled:
        dist.all_reduce(t, op=op)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_bytes(data: bytes | None, info: DistInfo, chunk_mib: int = 256) -> bytes:
    """Rank 0's `data` on every rank, through the process group in chunks (on the GPU under NCCL, so a multi-GiB
    checkpoint takes one chunk of device memory at a time). The other ranks pass None."""
    if not info.enabled:
        return data
    size = broadcast_object(len(data) if info.is_main else None, info)
    received = bytearray() if not info.is_main else None
    step = chunk_mib << 20
    for a in range(0, size, step):
        n = min(step, size - a)
        if info.is_main:
            chunk = torch.from_numpy(np.frombuffer(data, np.uint8, n, a).copy()).to(info.device)
        else:
            chunk = torch.empty(n, dtype=torch.uint8, device=info.device)
        dist.broadcast(chunk, src=0)
        if not info.is_main:
            received += chunk.cpu().numpy().tobytes()
    return data if info.is_main else bytes(received)


def step_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """The seed of one random stream (`stream`: "noise", "global", "loader") of one training step on one rank: a pure
    function of (train.seed, rank, step), as JAX folds the step into a key (`jax.random.fold_in`). Nothing is saved,
    and a resume at any step draws what an uninterrupted run draws there. sha256: every argument changes every bit, so
    neighbouring ranks and steps get unrelated streams; 63 bits (torch takes up to 64)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class StallWatchdog:
    """Ends this process (exit code 1, naming the rank and the step) when a guarded section overruns.

    Why: when one rank stalls (a hung read, a deadlock), its peers' collectives time out after ddp.timeout_s
    and they exit, but the stalled rank ignores torchrun's SIGTERM (the handler only asks for a stop at the next
    step) and holds the job for torchrun's 30 s grace, with no line saying which rank stalled. The allowance is
    `timeout_s` plus twice the longest guarded section so far, so a uniformly slow step is never mistaken for a stall.
    """

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = float(timeout_s), rank
        self._deadline: float | None = None
        self._what = ""
        self._longest = 0.0
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str):
        t0 = time.monotonic()
        self._what, self._deadline = what, t0 + self.timeout_s + 2 * self._longest
        try:
            yield
        finally:
            self._deadline = None
            self._longest = max(self._longest, time.monotonic() - t0)

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 20))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"[rank {self.rank}] error: stalled: {self._what} made no progress for "
                      f"{time.monotonic() - deadline + self.timeout_s + 2 * self._longest:.0f} s "
                      "(ddp.timeout_s); exiting so the job ends instead of hanging", file=sys.stderr, flush=True)
                os._exit(1)
