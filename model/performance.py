"""GPU speed settings in one place: memory format, torch.compile, cuDNN autotuning. Each is a no-op on CPU.

Nothing here changes what is computed, only how. Measured on an H200 for the reference workload (BENCHMARKS.md):
torch.compile fuses the elementwise work (GroupNorm, SiLU, residual adds) around the convs, 1.9x for the training
step and 2.4x for DDIM and the decoder (with NHWC); NHWC alone is SLOWER in eager mode (ATen's group_norm makes a
CUDA input `.contiguous()`, i.e. NCHW, so every GroupNorm -> conv pair transposes twice): channels_last goes with
compile.
"""
from __future__ import annotations

import functools
import inspect
import re
import types
import warnings
from collections.abc import Callable

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

# ---------------------------------------------------------------- the speed patches to diffusers internals
# Three switches of the config's speed section give diffusers modules a forward or a flag of ours, the same function,
# faster: speed.nhwc_shortcuts (ResnetBlock2D's `training` flag, `nhwc_shortcuts`) and speed.fuse_upsample /
# speed.vae_fuse_upsample (Upsample2D's forward, `fuse_upsample_convs`). Each relies on diffusers' code as it was in
# the versions below. `diffusers_mismatches()` names every assumption that no longer holds: the test suite fails on
# any (tests/test_performance.py), and at run time a patch whose assumption broke is skipped with a warning naming
# its config keys, leaving diffusers' own forward. (speed.nhwc_group_norm replaces torch's nn.GroupNorm.forward, not
# diffusers code.) requirements.txt pins diffusers to the same range.
DIFFUSERS_TESTED = ((0, 35), (0, 43))  # diffusers versions [low, high) these patches were written against
PATCH_KEYS = {"nhwc_shortcuts": "speed.nhwc_shortcuts",  # patch -> the config switches that ask for it
              "fuse_upsample": "speed.fuse_upsample and speed.vae_fuse_upsample"}


def _version(text: str) -> tuple[int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


@functools.cache
def diffusers_mismatches() -> dict[str, str]:
    """{patch: why diffusers no longer matches what it relies on}; {} when every assumption holds."""
    low, high = DIFFUSERS_TESTED
    if not low <= _version(diffusers.__version__) < high:
        why = f"diffusers {diffusers.__version__} is outside the tested versions [{low}, {high})"
        return {"nhwc_shortcuts": why, "fuse_upsample": why}
    found = {}
    src = inspect.getsource(ResnetBlock2D.forward)
    if src.count("self.training") != 1 or not re.search(
            r"if self\.training:\s*input_tensor = input_tensor\.contiguous\(\)\s*input_tensor = self\.conv_shortcut",
            src):
        found["nhwc_shortcuts"] = ("ResnetBlock2D.forward no longer reads self.training only to make the shortcut's "
                                   "input contiguous")
    try:
        with torch.random.fork_rng(devices=[]):  # the probe's init must not move the global RNG (model init, dropout)
            torch.manual_seed(0)
            up = Upsample2D(8, use_conv=True).eval()
            x = torch.randn(1, 8, 4, 5)
        if not _fusable(up):  # the attributes the patch selects modules by changed meaning
            raise TypeError("a nearest-2x + 3x3 conv Upsample2D no longer passes fuse_upsample_convs' selection")
        with torch.no_grad():
            same = torch.allclose(_subpixel_upsample_forward(up, x), Upsample2D.forward(up, x), atol=1e-5)
        if not same:
            found["fuse_upsample"] = "Upsample2D's nearest-2x + 3x3 conv no longer equals the sub-pixel form"
    except Exception as e:  # noqa: BLE001 - a renamed attribute or argument: the patch must not run
        found["fuse_upsample"] = f"Upsample2D changed ({type(e).__name__}: {e})"
    return found


def _patch_allowed(name: str) -> bool:
    why = diffusers_mismatches().get(name)
    if why is not None:
        warnings.warn(f"{name} is off ({PATCH_KEYS[name]}): {why}; diffusers' own forward is used (the same "
                      "function, slower)", stacklevel=3)
    return why is None



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


def _train_children(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    """nn.Module.train for a block whose own flag stays False: its children (dropout) still follow `mode`."""
    for child in self.children():
        child.train(mode)
    return self


def nhwc_shortcuts(module: torch.nn.Module) -> int:
    """Keep NHWC through the 1x1 shortcut convs of diffusers' ResnetBlock2D in training; returns the blocks changed.

    In training mode ResnetBlock2D.forward makes its shortcut input `.contiguous()` (NCHW) before `conv_shortcut`, a
    workaround for a DDP stride warning (diffusers#12975). On a channels_last net cuDNN converts it back, and the
    backward converts the saved input and the gradients again: layout copies of the largest activations in every
    up block. That is the block's only use of its own `training` flag (its dropout is a child module with a flag of
    its own), so the flag is kept False on those blocks, and `train()` still sets their children. Same function,
    same parameters and state_dict; GPU channels_last nets only (speed.channels_last and speed.nhwc_shortcuts)."""
    if not _patch_allowed("nhwc_shortcuts"):
        return 0
    changed = 0
    for m in module.modules():
        if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None:
            m.train = types.MethodType(_train_children, m)
            m.training = False
            changed += 1
    return changed


def _group_norm_keep_layout(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm.forward as views and elementwise ops, which keep the input's memory format (ATen's group_norm
    returns NCHW whatever it is given). Computed in fp32; the output dtype is group_norm's (fp32 under CUDA autocast,
    else the input's). With gradients off (sampling, evaluation) it is ATen's group_norm: there is no backward whose
    convolutions would copy, and the compiled DDIM loop ran slower with this form (H100: 20 UNet calls 178.3 vs
    154.9 ms). torch.compile guards on the grad mode, so training and sampling each trace their own form."""
    if not torch.is_grad_enabled():
        return torch.nn.GroupNorm.forward(self, x)
    c, g = x.shape[1], self.num_groups
    v = x.float().unflatten(1, (g, c // g))  # (N, G, C/G, *spatial): a view in NCHW and NHWC alike
    var, mean = torch.var_mean(v, dim=tuple(range(2, v.dim())), unbiased=False, keepdim=True)
    y = ((v - mean) * torch.rsqrt(var + self.eps)).flatten(1, 2)
    if self.affine:
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
    fp32_policy = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")  # CUDA autocast: group_norm in fp32
    return y if fp32_policy else y.to(x.dtype)


def nhwc_group_norms(module: torch.nn.Module) -> int:
    """Every nn.GroupNorm of `module` computes in a layout-keeping form (`_group_norm_keep_layout`); returns how many.

    Why: under torch.compile the traced graph takes each op's output strides from its meta function, and
    group_norm's are NCHW. On a channels_last net the convolutions around every GroupNorm then receive NCHW
    activations and gradients, and each convolution_backward copies them to NHWC (session 4 profile: 80 copies, 15
    ms of a 96 ms step on an H100). Var-mean and elementwise ops keep the input's strides, so the whole graph stays
    NHWC. The same function (to float rounding), parameters and state_dict; in no-grad mode ATen's group_norm."""
    changed = 0
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.forward = types.MethodType(_group_norm_keep_layout, m)
            changed += 1
    return changed


def compile_in_place(module: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """torch.compile a GPU module's forward in place (`nn.Module.compile`): state_dict keys and parameters stay
    those of the module, so checkpoints, EMA and DDP see no wrapper. CPU: untouched."""
    if on_gpu(module):
        module.compile(mode=mode)
    return module


# Which 3x3 taps of the conv land on which of two low-resolution rows (or columns), for the output row's phase a:
# an output row 2i + a of conv3x3(nearest_up2(x)) reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. low-resolution
# rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1.
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
               ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) conv weights -> (4 O, I, 2, 2): one 2x2 kernel per output phase (a, b), in the order (a, b, o)."""
    taps = torch.tensor(_PHASE_TAPS, device=weight.device, dtype=torch.float32)  # (phase, 2 taps, 3 taps)
    k = torch.einsum("ark,bsl,oikl->aboirs", taps, taps, weight.float())
    return k.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def _subpixel_upsample_forward(self: Upsample2D, hidden_states: torch.Tensor, output_size=None, *args, **kwargs):
    """Upsample2D.forward for nearest 2x + 3x3 conv (padding 1), computed without the 4x-larger upsampled input:
    each output phase (a, b) is a 2x2 conv of the zero-padded low-resolution input with the kernel's taps summed as
    nearest-neighbour upsampling would have them meet (`subpixel_weight`). The same function; 16 instead of 36 taps
    per low-resolution pixel, i.e. 2.25x fewer FLOPs. `output_size` (odd sizes) falls back to the original."""
    if output_size is not None or args or kwargs:
        return Upsample2D.forward(self, hidden_states, output_size, *args, **kwargs)
    conv = self.conv
    n, _, h, w = hidden_states.shape
    o = conv.out_channels
    nhwc = hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous()
    weight = subpixel_weight(conv.weight)
    if nhwc:
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = F.conv2d(F.pad(hidden_states, (1, 1, 1, 1)), weight, bias)  # (N, 4 O, H + 1, W + 1)
    y = y.unflatten(1, (2, 2, o))  # (N, a, b, O, H + 1, W + 1); phase (a, b) is the window starting at (a, b)
    if nhwc:  # each phase as (N, H, W, O): interleaved into (N, H, a, W, b, O) memory, then an NHWC view of NCHW
        y = y.permute(0, 1, 2, 4, 5, 3)
        out = torch.stack([torch.stack([y[:, a, b, a:a + h, b:b + w] for b in (0, 1)], 3) for a in (0, 1)], 2)
        return out.reshape(n, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
    out = torch.stack([torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], -1) for a in (0, 1)], 3)
    return out.reshape(n, o, 2 * h, 2 * w)  # (N, O, H, a, W, b)


def fuse_upsample_convs(module: torch.nn.Module) -> int:
    """Give every diffusers Upsample2D in `module` that is nearest 2x + a plain 3x3 conv (padding 1, no norm) the
    sub-pixel forward above, in place; parameters and state_dict keys are untouched. Returns how many."""
    if not _patch_allowed("fuse_upsample"):
        return 0
    count = 0
    for m in module.modules():
        if _fusable(m):
            m.forward = types.MethodType(_subpixel_upsample_forward, m)
            count += 1
    return count


def _fusable(m: torch.nn.Module) -> bool:
    """A diffusers Upsample2D that is nearest 2x + a plain 3x3 conv (padding 1, no norm), read from its attributes."""
    conv = getattr(m, "conv", None)
    return (type(m) is Upsample2D and m.use_conv and not m.use_conv_transpose and m.interpolate and m.norm is None
            and m.name == "conv" and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def speed_up_vae(vae, speed):
    """speed.vae_*: a FrozenVAE's decoder upsampling fused (any device), its convs in NHWC and its encoder and
    decoder compiled (GPU only); returns the same object. `speed`: the config's SpeedConfig."""
    if speed.vae_fuse_upsample:
        fuse_upsample_convs(vae.vae)
    channels_last(vae.vae, speed.vae_channels_last)
    if speed.vae_compile:
        for name in ("encoder", "decoder"):
            part = getattr(vae.vae, name, None)
            if isinstance(part, torch.nn.Module):
                compile_in_place(part, speed.vae_compile_mode)
    return vae


def speed_up_unet(unet: torch.nn.Module, speed) -> torch.nn.Module:
    """speed.channels_last, speed.nhwc_shortcuts and speed.nhwc_group_norm on a GPU UNet, in place (CPU: untouched);
    returns it. speed.fuse_upsample is applied where the model is built (VideoPredictionDiffusion), on any device."""
    channels_last(unet, speed.channels_last)
    if speed.channels_last and on_gpu(unet):
        if speed.nhwc_shortcuts:
            nhwc_shortcuts(unet)
        if speed.nhwc_group_norm and speed.compile:  # measured compiled; eager keeps ATen's (memory)
            nhwc_group_norms(unet)
    return unet


GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def copy_out(fn: Callable) -> Callable:
    """fn with its output cloned. A CUDA-graph replay returns its graph's static output buffer, and torch.compile
    starts a new iteration at every call in inference, so the next call overwrites (and frees) the previous
    output: guidance's two or three calls per DDIM step, or a callback keeping a step's output, would read
    another call's numbers or fail. The clone is one latent-sized copy per call."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs).clone()
    return call


class CompiledNets:
    """torch.compile wrappers of the nets a sampler is given, made once per net (GPU nets only; CPU nets are
    returned as they are). The wrapper shares the net's parameters, so EMA updates and loaded weights show
    through; in a CUDA-graph mode it returns a copy of each output (`copy_out`). It holds the net (a model has two
    or three nets, the raw, EMA and DDP-free ones, for its lifetime)."""

    def __init__(self, mode: str = "default"):
        self.mode = mode
        self._compiled: dict[int, tuple[torch.nn.Module, Callable]] = {}  # id(net) -> (net, compiled call)

    def __call__(self, net: torch.nn.Module) -> torch.nn.Module | Callable:
        if not on_gpu(net):
            return net
        if id(net) not in self._compiled:
            compiled = torch.compile(net, mode=self.mode)
            self._compiled[id(net)] = (net, copy_out(compiled) if self.mode in GRAPH_MODES else compiled)
        return self._compiled[id(net)][1]


def match_param_layout(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, ema=None) -> None:
    """Give optimizer state and EMA shadow tensors their parameter's strides, after loading a checkpoint saved
    in the other memory format (speed.channels_last changed). Fused AdamW walks param and state memory in
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
