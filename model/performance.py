"""GPU speed settings in one place: memory format, torch.compile, cuDNN autotuning. Each is a no-op on CPU.

Nothing here changes what is computed, only how. Measured on an H200 for the reference workload (BENCHMARKS.md):
torch.compile fuses the elementwise work (GroupNorm, SiLU, residual adds) around the convs, 1.9x for the training
step and 2.4x for DDIM and the decoder (with NHWC); NHWC alone is SLOWER in eager mode (ATen's group_norm makes a
CUDA input `.contiguous()`, i.e. NCHW, so every GroupNorm -> conv pair transposes twice): channels_last goes with
compile.
"""
from __future__ import annotations

import torch


def on_gpu(module: torch.nn.Module) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.device.type == "cuda"


def set_cudnn_benchmark(enabled: bool) -> None:
    """cuDNN times its convolution algorithms on the first call of each input shape and keeps the fastest."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = enabled


def channels_last(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Move a GPU module's 4-D weights to NHWC in place (its convs then produce NHWC activations); CPU: untouched."""
    if enabled and on_gpu(module):
        module.to(memory_format=torch.channels_last)
    return module


def compile_in_place(module: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """torch.compile a GPU module's forward in place (`nn.Module.compile`): state_dict keys and parameters stay
    those of the module, so checkpoints, EMA and DDP see no wrapper. CPU: untouched."""
    if on_gpu(module):
        module.compile(mode=mode)
    return module


def speed_up_vae(vae, channels_last_format: bool, compile_modules: bool, mode: str = "default"):
    """A FrozenVAE's convs in NHWC and/or its encoder and decoder compiled (GPU only); returns the same object."""
    channels_last(vae.vae, channels_last_format)
    if compile_modules:
        for name in ("encoder", "decoder"):
            part = getattr(vae.vae, name, None)
            if isinstance(part, torch.nn.Module):
                compile_in_place(part, mode)
    return vae


class CompiledNets:
    """torch.compile wrappers of the nets a sampler is given, made once per net (GPU nets only; CPU nets are
    returned as they are). The wrapper shares the net's parameters, so EMA updates and loaded weights show
    through. It holds the net (a model has two or three nets, the raw, EMA and DDP-free ones, for its lifetime)."""

    def __init__(self, mode: str = "default"):
        self.mode = mode
        self._compiled: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}  # id(net) -> (net, compiled)

    def __call__(self, net: torch.nn.Module) -> torch.nn.Module:
        if not on_gpu(net):
            return net
        if id(net) not in self._compiled:
            self._compiled[id(net)] = (net, torch.compile(net, mode=self.mode))
        return self._compiled[id(net)][1]


def match_param_layout(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, ema=None) -> None:
    """Give optimizer state and EMA shadow tensors their parameter's strides, after loading a checkpoint saved
    in the other memory format (train.channels_last changed). Fused AdamW walks param and state memory in
    lockstep, so a channels_last param with an NCHW exp_avg is updated with other elements' moments: silently
    wrong, not an error. `params` in the order the EMA was built with."""
    def like(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if v.shape != p.shape or v.stride() == p.stride():
            return v
        return torch.empty_like(p, dtype=v.dtype).copy_(v)

    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = like(p, v)
    if ema is not None and len(ema.shadow_params) == len(params):
        ema.shadow_params = [like(p, s) for p, s in zip(params, ema.shadow_params)]
