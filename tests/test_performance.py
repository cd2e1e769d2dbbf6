"""The speed switches' CPU-visible behaviour: a compiled net goes through the loss like the eager one, a resume into
the other memory format keeps fused AdamW exact, the cached windows leave the std out when unused and keep fp16,
the Trainer's one endless DataLoader yields each epoch's DistributedSampler order (and resumes mid-epoch), and the
profiler's summary adds up."""
from __future__ import annotations

import copy
import gzip
import json
import types

import numpy as np
import pytest
import torch

from configs.loader import config_from_dict, load_config
from data import build_windows, discover_clips
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from helpers import tiny_config, tiny_kl_vae
from model import FrozenVAE, VideoPredictionDiffusion, performance
from trainer_helpers import make_world
from training import profiling
from training.distributed import DistInfo
from data.latent_cache import LatentWindowDataset, build_or_load
from train_video_pred import build


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("perf_world"))


def test_loss_accepts_a_compiled_net_and_matches_eager():
    """`net or self.unet` raised TypeError for a torch.compile wrapper (it has no truth value): speed.compile=true
    crashed at the first step."""
    torch.manual_seed(0)
    model = VideoPredictionDiffusion(tiny_config(), FrozenVAE(tiny_kl_vae()))
    compiled = torch.compile(model.unet, backend="eager")  # dynamo's tracing without code generation
    g = torch.Generator().manual_seed(3)
    past, future = torch.randn(2, 2, 4, 8, 8, generator=g), torch.randn(2, 2, 4, 8, 8, generator=g)
    eager = model.loss(past, future, generator=torch.Generator().manual_seed(0))
    traced = model.loss(past, future, generator=torch.Generator().manual_seed(0), net=compiled)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)


def _adamw_after_resume(param_format, fix: bool) -> torch.Tensor:
    """One AdamW step saved from an NCHW run, loaded into a param of `param_format`, then one more step."""
    g = torch.Generator().manual_seed(0)
    w0, g1, g2 = (torch.randn(6, 5, 3, 3, generator=g) for _ in range(3))
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = g1.clone()
    opt.step()
    saved = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone().contiguous(memory_format=param_format))
    opt2 = torch.optim.AdamW([q], lr=0.1, fused=True)
    opt2.load_state_dict(saved)
    if fix:
        performance.match_param_layout([q], opt2)
    q.grad = g2.clone().contiguous(memory_format=param_format)
    opt2.step()
    return q.detach().contiguous()


def test_resume_into_channels_last_keeps_fused_adamw_exact():
    reference = _adamw_after_resume(torch.contiguous_format, fix=False)
    torch.testing.assert_close(_adamw_after_resume(torch.channels_last, fix=True), reference, rtol=0, atol=1e-7)


def test_cached_windows_are_fp16_and_leave_out_an_unused_std(world, tmp_path):
    cfg = config_from_dict(world.config(tmp_path / "runs"))
    clips = discover_clips(cfg.data)
    vae = FrozenVAE.from_config(cfg.vae)
    folder = build_or_load(clips, cfg.data, vae, tmp_path / "cache", DistInfo(), num_workers=0, log=lambda *a: None)
    windows = build_windows(clips, cfg.data)
    ids = list(range(len(clips)))
    with_std = LatentWindowDataset(clips, cfg.data, windows, folder, ids, with_std=True)[0]
    without = LatentWindowDataset(clips, cfg.data, windows, folder, ids, with_std=False)[0]
    assert "latent_std" in with_std and "latent_std" not in without
    assert without["latent_mean"].dtype == torch.float16
    stored = np.load(folder / f"{windows[0].clip:06d}.mean.npy")[list(windows[0].frames)]
    assert np.array_equal(without["latent_mean"].numpy(), stored)


def _indices(batch: dict) -> list[int]:
    return [int(i) for i in batch["index"]]


def test_epoch_stream_follows_the_sampler_each_epoch_and_resumes_mid_epoch(world, tmp_path):
    raw = world.config(tmp_path / "runs", **{"data.num_workers": 1, "cache.dir": str(tmp_path / "cache")})
    cfg = config_from_dict(raw)
    trainer = build(cfg, DistInfo(), tmp_path / "runs" / "a")
    per_epoch = trainer.batches_per_epoch
    seen = [_indices(trainer._next_batch()) for _ in range(2 * per_epoch + 1)]
    for epoch in (0, 1):
        trainer.sampler.set_epoch(epoch)
        expected = list(trainer.sampler)[:per_epoch * trainer.micro_batch]
        got = sum(seen[epoch * per_epoch:(epoch + 1) * per_epoch], [])
        assert got == expected, f"epoch {epoch}"
    assert trainer.epoch == 2 and seen[:per_epoch] != seen[per_epoch:2 * per_epoch]

    resumed = build(cfg, DistInfo(), tmp_path / "runs" / "b")
    resumed.epoch, resumed.position = 1, 1  # as `_resume` sets them: one batch of epoch 1 already consumed
    rest = [_indices(resumed._next_batch()) for _ in range(per_epoch)]  # the rest of epoch 1, then epoch 2's first
    assert rest == seen[per_epoch + 1:2 * per_epoch + 1]
    assert (resumed.epoch, resumed.position) == (2, 1)

    at_end = build(cfg, DistInfo(), tmp_path / "runs" / "c")
    at_end.epoch, at_end.position = 0, per_epoch  # saved after an epoch's last batch (before the rollover)
    assert _indices(at_end._next_batch()) == seen[per_epoch] and (at_end.epoch, at_end.position) == (1, 1)


# ---------------------------------------------------------------- latent-cache build: padded chunks, writer threads

@pytest.fixture
def uneven_clips(tmp_path):
    """Three clips of 5, 7 and 9 random 16x16 frames (none a multiple of chunk_size 4), a 4-frame-chunk tiny VAE."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in (("a", 5), ("b", 7), ("c", 9)):
        (tmp_path / "clips" / name).mkdir(parents=True)
        for i in range(n):
            frame = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(frame).save(tmp_path / "clips" / name / f"{i}.png")
    cfg = tiny_config(**{"data.root": str(tmp_path / "clips"), "vae.chunk_size": 4})
    return discover_clips(cfg.data), cfg.data, FrozenVAE(tiny_kl_vae(), chunk_size=4)


def test_latent_cache_of_uneven_clips_matches_direct_encoding_with_one_encoder_shape(uneven_clips, tmp_path):
    from data.dataset import read_clip_frames

    clips, data_cfg, vae = uneven_clips
    batch_sizes = []
    hook = vae.vae.encoder.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    try:  # the CPU default does not pad (pure extra work there); the CUDA default does, forced here
        build_or_load(clips, data_cfg, vae, tmp_path / "plain", DistInfo(), num_workers=0, log=lambda *a: None)
        assert sorted(set(batch_sizes)) == [1, 3, 4], batch_sizes
        batch_sizes.clear()
        folder = build_or_load(clips, data_cfg, vae, tmp_path / "cache", DistInfo(), num_workers=0,
                               log=lambda *a: None, pad_chunks=True)
    finally:
        hook.remove()
    assert set(batch_sizes) == {4}, batch_sizes  # the short last chunks were padded, not encoded at their own size
    for i, clip in enumerate(clips):
        mean, std = vae.encode_moments(read_clip_frames(clip, range(clip.num_frames), data_cfg)[None])
        for what, direct in (("mean", mean), ("std", std)):
            cached = np.load(folder / f"{i:06d}.{what}.npy")
            assert cached.dtype == np.float16 and cached.shape == tuple(direct.shape[1:])
            # to one fp16 step (2^-10 relative): padded and unpadded encoder calls may sum in another order
            np.testing.assert_allclose(cached.astype(np.float32), direct[0].numpy(), rtol=2 ** -10, atol=1e-6,
                                       err_msg=f"clip {clip.name} {what}")


def test_latent_cache_write_failure_raises_and_leaves_no_manifest(uneven_clips, tmp_path, monkeypatch):
    import errno

    import data.latent_cache as latent_cache

    clips, data_cfg, vae = uneven_clips
    real_save = latent_cache._save_npy

    def disk_full_at_second_clip(path, array):
        if path.name.startswith("000001."):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(path, array)

    monkeypatch.setattr(latent_cache, "_save_npy", disk_full_at_second_clip)
    with pytest.raises(OSError, match="No space left"):
        build_or_load(clips, data_cfg, vae, tmp_path / "cache", DistInfo(), num_workers=0, log=lambda *a: None)
    assert list((tmp_path / "cache").glob("*/manifest.json")) == []

    monkeypatch.undo()
    logs = []
    folder = build_or_load(clips, data_cfg, vae, tmp_path / "cache", DistInfo(), num_workers=0, log=logs.append)
    assert "building" in logs[-1] and "no manifest" in logs[-1], logs
    build_or_load(clips, data_cfg, vae, tmp_path / "cache", DistInfo(), num_workers=0, log=logs.append)
    assert logs[-1] == f"latent cache: using {folder}"
    expected = [f"{i:06d}.{what}.npy" for i in range(3) for what in ("mean", "std")]
    assert sorted(p.name for p in folder.glob("*.npy")) == expected


def test_an_interrupted_cache_build_keeps_the_clips_it_encoded(uneven_clips, tmp_path, monkeypatch):
    """Issue 16 item 13: a build stopped after two clips (SIGTERM, a crash) is continued, not started over: the next
    build encodes only the third clip, and the cache equals one built in one go."""
    import data.latent_cache as latent_cache

    clips, data_cfg, vae = uneven_clips
    fresh = build_or_load(clips, data_cfg, vae, tmp_path / "fresh", DistInfo(), num_workers=0, log=lambda *a: None)
    real_save = latent_cache._save_npy

    def stopped_at_third_clip(path, array):
        if path.name.startswith("000002."):
            raise KeyboardInterrupt  # the process stops here, as a signal would stop it
        real_save(path, array)

    monkeypatch.setattr(latent_cache, "_save_npy", stopped_at_third_clip)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(clips, data_cfg, vae, tmp_path / "cache", DistInfo(), num_workers=0, log=lambda *a: None)
    monkeypatch.undo()
    (folder,) = (tmp_path / "cache").iterdir()
    (folder / "000001.mean.npy.tmp999").write_bytes(b"half")  # a write the stop cut short

    frames, logs = [], []
    hook = vae.vae.encoder.register_forward_pre_hook(lambda m, args: frames.append(args[0].shape[0]))
    try:
        assert build_or_load(clips, data_cfg, vae, tmp_path / "cache", DistInfo(), num_workers=0,
                             log=logs.append) == folder
    finally:
        hook.remove()
    assert sum(frames) == clips[2].num_frames, frames  # clips 0 and 1 were not encoded again
    assert "continuing: 2 of 3 clips already encoded" in logs[0], logs
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(p.name for p in fresh.glob("*.npy"))
    for p in fresh.glob("*.npy"):
        assert np.array_equal(np.load(p), np.load(folder / p.name)), p.name
    assert not list(folder.glob("*.tmp*"))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsample_equals_nearest_upsample_then_conv(memory_format):
    """speed.vae_fuse_upsample: the four 2x2 phase convs give diffusers' Upsample2D output (nearest 2x, then 3x3
    conv), on odd sizes, in both memory formats (NHWC stays NHWC), with the same input and weight gradients."""
    from diffusers.models.upsampling import Upsample2D
    torch.manual_seed(0)
    ref = Upsample2D(6, use_conv=True, out_channels=5).to(memory_format=memory_format)
    fused = Upsample2D(6, use_conv=True, out_channels=5).to(memory_format=memory_format)
    fused.load_state_dict(ref.state_dict())
    assert performance.fuse_upsample_convs(fused) == 1
    x = torch.randn(3, 6, 7, 5).contiguous(memory_format=memory_format)
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref, out_fused = ref(xr), fused(xf)
    assert out_fused.shape == (3, 5, 14, 10)
    torch.testing.assert_close(out_fused, out_ref, rtol=0, atol=1e-5)
    assert out_fused.is_contiguous(memory_format=memory_format)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_fused.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(fused.conv.weight.grad, ref.conv.weight.grad, rtol=1e-5, atol=1e-4)
    # an explicit output_size (odd target sizes) takes diffusers' own path
    torch.testing.assert_close(fused(x, output_size=(13, 9)), ref(x, output_size=(13, 9)))


def test_fused_decoder_decodes_like_diffusers_and_keeps_its_state_dict(tmp_path):
    """Through the config, as the trainer and the sampler build it: same pixels (fp32), same state_dict keys (the
    checkpoint and the VAE fingerprint do not change), and speed.vae_fuse_upsample=false leaves diffusers' forward."""
    from helpers import tiny_vae_folder
    folder = tiny_vae_folder(tmp_path)
    fused = VideoPredictionDiffusion.from_config(tiny_config(folder))
    plain = VideoPredictionDiffusion.from_config(tiny_config(folder, **{"speed.vae_fuse_upsample": False}))
    ups = [m for m in fused.vae.vae.decoder.modules() if type(m).__name__ == "Upsample2D"]
    assert ups and all("forward" in vars(m) for m in ups)
    assert not any("forward" in vars(m) for m in plain.vae.vae.decoder.modules())
    assert list(fused.vae.vae.state_dict()) == list(plain.vae.vae.state_dict())
    latents = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fused.vae.decode(latents), plain.vae.decode(latents), rtol=0, atol=1e-5)


def test_fused_unet_upsampling_trains_like_diffusers_and_survives_the_ema_copy():
    """speed.fuse_upsample, through the config as the trainer and the tools build the model: same loss and gradients
    as diffusers' up blocks (fp32), and the EMA's deepcopy of the net keeps the sub-pixel forward bound to the copy
    (its own weights), not to the trained net."""
    import copy
    torch.manual_seed(0)
    vae = FrozenVAE(tiny_kl_vae())
    plain, fused = (VideoPredictionDiffusion(tiny_config(**{"speed.fuse_upsample": f}), vae).unet for f in (False, True))
    assert not any("forward" in vars(m) for m in plain.modules())
    assert any("forward" in vars(m) for m in fused.modules())
    fused.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    noisy, past = torch.randn(2, 2, 4, 8, 8, generator=g), torch.randn(2, 2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    outs = []
    for net in (plain, fused):
        out = net(noisy, past, t)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    ema = copy.deepcopy(fused).requires_grad_(False)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(fused(noisy, past, t), outs[1])  # the copy's change does not leak back
        up = next(m for m in ema.modules() if "forward" in vars(m))
        assert up.forward.__self__ is up


def test_nhwc_shortcuts_keep_the_layout_and_the_function_and_still_train_the_dropout():
    """performance.nhwc_shortcuts: in training, diffusers' ResNet shortcut conv gets its channels_last input as it
    is (diffusers hands it an NCHW copy); outputs and gradients are those of diffusers' forward; dropout inside
    the blocks still follows train()/eval(); the EMA's deepcopy keeps the change bound to the copy."""
    import copy
    from diffusers.models.resnet import ResnetBlock2D
    from model.unet import ConditionalUNet
    torch.manual_seed(0)
    cfg = tiny_config(**{"unet.dropout": 0.1}).unet
    plain = ConditionalUNet(cfg, 4, 2, 2).to(memory_format=torch.channels_last)
    kept = copy.deepcopy(plain)
    assert performance.nhwc_shortcuts(kept) == sum(isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None
                                                   for m in kept.modules()) > 0
    formats = {}

    def record(name):
        def hook(module, args):
            formats.setdefault(name, []).append(args[0].is_contiguous(memory_format=torch.channels_last))
        return hook
    for name, net in (("plain", plain), ("kept", kept)):
        for m in net.modules():
            if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None:
                m.conv_shortcut.register_forward_pre_hook(record(name))
    g = torch.Generator().manual_seed(1)
    noisy, past = torch.randn(2, 2, 4, 8, 8, generator=g), torch.randn(2, 2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    outs = []
    for net in (plain, kept):
        net.train()
        torch.manual_seed(2)  # the same dropout masks
        out = net(noisy, past, t)
        out.square().mean().backward()
        outs.append(out)
    assert not any(formats["plain"]) and all(formats["kept"])  # diffusers: NCHW copies; kept: NHWC as produced
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), kept.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    block = next(m for m in kept.modules() if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None)
    assert not block.training and block.dropout.training  # train(): the children follow, the block's flag not
    kept.eval()
    assert not block.dropout.training
    ema = copy.deepcopy(kept).train()
    ema_block = next(m for m in ema.modules() if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None)
    assert ema_block.train.__self__ is ema_block and ema_block.dropout.training and not block.dropout.training


def test_nhwc_group_norms_compute_group_norm_and_keep_nhwc_where_aten_returns_nchw():
    """performance.nhwc_group_norms: GroupNorm's values, gradients and autocast dtype, in NCHW and NHWC; and in fake
    tensors (what torch.compile traces) the output keeps NHWC where ATen's group_norm gives NCHW strides, in
    training; with gradients off (sampling) it is ATen's own group_norm, strides included."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        plain = torch.nn.GroupNorm(4, 16)
        with torch.no_grad():
            plain.weight.normal_()
            plain.bias.normal_()
        kept = copy.deepcopy(plain)
        assert performance.nhwc_group_norms(kept) == 1
        x = (torch.randn(3, 16, 5, 7) * 3 + 1).to(memory_format=fmt).requires_grad_()
        grads = []
        for gn in (plain, kept):
            out = gn(x)
            grads.append((out, *torch.autograd.grad(out.square().sum(), [x, gn.weight, gn.bias])))
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kept(x.detach().bfloat16()).dtype == plain(x.detach().bfloat16()).dtype
        assert kept(x.detach().bfloat16()).dtype == torch.bfloat16  # no autocast: the input's dtype, as ATen's
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 16, 5, 7).to(memory_format=torch.channels_last)
        assert not plain(x).is_contiguous(memory_format=torch.channels_last)
        assert kept(x).is_contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            assert not kept(x).is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 16, 5, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(kept(x), plain(x))  # bit for bit: the same ATen op


def test_nhwc_switches_give_every_unet_conv_but_the_first_an_nhwc_input_as_the_compiler_sees_it():
    """With nhwc_shortcuts, nhwc_group_norms and the sub-pixel up blocks, a channels_last UNet traced with fake
    tensors (torch.compile's view of strides) feeds NHWC to every conv but conv_in (whose input is the stacked
    latents); diffusers' own forward feeds NCHW to nearly all of them, which each conv backward then copies."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def nchw_inputs(kept: bool) -> list[str]:
        net = VideoPredictionDiffusion(tiny_config(**{"speed.fuse_upsample": kept}), FrozenVAE(tiny_kl_vae())).unet
        net = net.to(memory_format=torch.channels_last).train()
        if kept:
            performance.nhwc_shortcuts(net)
            performance.nhwc_group_norms(net)
        found = []
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_pre_hook(lambda mod, args, name=name: found.append(name)
                                            if not args[0].is_contiguous(memory_format=torch.channels_last) else None)
        with FakeTensorMode(allow_non_fake_inputs=True):
            net(torch.randn(64, 2, 4, 8, 8), torch.randn(64, 2, 4, 8, 8), torch.zeros(64, dtype=torch.long))
        return found

    assert nchw_inputs(kept=True) == ["unet.conv_in"]
    assert len(nchw_inputs(kept=False)) > 10


def test_ddp_bucket_auto_is_one_bucket_when_compiled_and_ddp_default_otherwise():
    """ddp.bucket_mb = 0 (auto): a compiled step gets one bucket above the UNet's gradient size (dynamo splits
    the compiled graph at every bucket); eager keeps DDP's 25 MiB; a set value is used as given."""
    from model.unet import ConditionalUNet
    from training.distributed import _ddp_bucket_mb
    cfg = tiny_config()
    unet = ConditionalUNet(cfg.unet, 4, 2, 2)
    grad_mib = sum(p.numel() * 4 for p in unet.parameters()) / 2 ** 20
    assert cfg.ddp.bucket_mb == 0
    assert _ddp_bucket_mb(unet, cfg.ddp, compiled=True) == pytest.approx(grad_mib + 1)
    assert _ddp_bucket_mb(unet, cfg.ddp, compiled=False) == 25.0
    tc = tiny_config(**{"ddp.bucket_mb": 4.0}).ddp
    assert _ddp_bucket_mb(unet, tc, compiled=True) == _ddp_bucket_mb(unet, tc, compiled=False) == 4.0


def test_fused_decoder_traces_under_torch_compile():
    """speed.vae_compile compiles the decoder whose Upsample2D modules carry the sub-pixel forward as an instance
    attribute: dynamo must trace it (no graph break, same pixels). backend="eager": tracing without code generation."""
    from helpers import tiny_kl_vae
    torch._dynamo.reset()
    vae = tiny_kl_vae().eval()
    assert performance.fuse_upsample_convs(vae) == 1
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = vae.decoder(z)
        explanation = torch._dynamo.explain(vae.decoder)(z)
        compiled = torch.compile(vae.decoder, backend="eager", fullgraph=True)(z)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------- profiling: the summary's arithmetic

def _kernel(name: str, start: float, end: float):
    """A CUDA kernel as torch.profiler lists it (prof.events()): name, device type, time range in microseconds."""
    return types.SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA,
                                 time_range=types.SimpleNamespace(start=start, end=end))


def test_kernel_summary_counts_idle_time_and_only_the_nccl_time_no_compute_kernel_hides():
    cpu_op = types.SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU,
                                   time_range=types.SimpleNamespace(start=0, end=1000))
    events = [cpu_op,  # a host op is not GPU time
              _kernel("sm90_xmma_fprop_implicit_gemm_bf16", 0, 400),
              _kernel("triton_poi_fused_silu_0", 400, 500),
              _kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 450, 700),  # 50 us under the Triton kernel
              _kernel("flash_fwd_kernel", 800, 900),  # 700..800: nothing runs
              _kernel("multi_tensor_apply_kernel", 900, 1000),
              # an annotation on the GPU timeline spans kernels and idle time alike; it is not a kernel
              types.SimpleNamespace(name="DistributedDataParallel.forward", device_type=torch.autograd.DeviceType.CUDA,
                                    time_range=types.SimpleNamespace(start=0, end=1000), is_user_annotation=True)]
    s = profiling.kernel_summary(events, steps=2)
    ms = 1e-3 / 2  # microseconds over two steps -> ms per step
    assert s["span_ms_per_step"] == pytest.approx(1000 * ms)
    assert s["busy_ms_per_step"] == pytest.approx(900 * ms)
    assert s["idle_ms_per_step"] == pytest.approx(100 * ms) and s["busy_fraction"] == pytest.approx(0.9)
    assert s["exposed_nccl_ms_per_step"] == pytest.approx(200 * ms)
    assert s["kinds_ms_per_step"] == pytest.approx({"conv": 400 * ms, "nccl": 250 * ms, "inductor_fused": 100 * ms,
                                                   "attention": 100 * ms, "optimizer_ema": 100 * ms})
    assert s["kernels_per_step"] == 2.5
    assert s["top"][0]["kernel"].startswith("sm90_xmma_fprop") and s["top"][0]["kind"] == "conv"
    assert profiling.kernel_summary([cpu_op], steps=1) == {"error": "no CUDA kernels recorded"}


def test_step_profiler_writes_its_summary_and_a_trace_of_the_chosen_steps(tmp_path):
    prof = profiling.StepProfiler(start=2, steps=2, folder=tmp_path / "profile", rank=1, device=torch.device("cpu"))
    x = torch.randn(64, 64)
    written = []
    for step in range(6):
        prof.before_step(step)
        torch.mm(x, x)
        if (path := prof.after_step(step + 1)) is not None:
            written.append((step + 1, path))
    assert written == [(4, tmp_path / "profile" / "rank1.json")]  # once, after steps 2 and 3
    summary = json.loads(written[0][1].read_text())
    assert summary["rank"] == 1 and summary["first_step"] == 2 and summary["steps"] == 2
    assert summary["host_ms_per_step"] > 0
    with gzip.open(tmp_path / "profile" / "rank1.trace.json.gz", "rt") as f:
        trace = json.load(f)
    assert sum(e.get("name") == "aten::mm" for e in trace["traceEvents"]) == 2  # the two profiled steps' products
    off = profiling.StepProfiler(start=0, steps=5, folder=tmp_path / "off", rank=0, device=torch.device("cpu"))
    off.before_step(0)
    assert off.after_step(5) is None and not (tmp_path / "off").exists()


def test_bench_train_parts_run_through_the_trainer_on_a_cpu(tmp_path):
    """bench/bench_train.py --tiny, the parts a device call picks with --variants: the loader blocks and the real
    fit loop (CUDA-graph mode on a GPU; here torch.compile traces only). Every part prints its JSON line, the fit's
    sample grids reach $OUT, and an unknown part is refused by name."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(root / "bench" / "bench_train.py"), "--tiny", "--skip-naive",
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd + ["--variants", "loader_reduce_overhead,fit_reduce_overhead"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    names = [r["name"] for r in recs]
    assert names.count("loader_reduce_overhead_loader") == 2 and names[-1] == "done"
    fit = next(r for r in recs if r["name"] == "fit_reduce_overhead")
    assert fit["steps"] == 20 and all(sps > 0 for _, sps in fit["samples_per_s_by_step"])
    assert sorted(p.name for p in tmp_path.glob("fit_reduce_overhead_step_*.png")) == \
        [f"fit_reduce_overhead_{g}" for g in fit["grids"]] and len(fit["grids"]) >= 3
    bad = subprocess.run(cmd + ["--variants", "compiled,nope"], env=env, cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown ['nope']" in bad.stderr


def test_diffusers_internals_under_the_speed_patches_are_as_they_were_written_for(monkeypatch):
    """The speed patches (speed.nhwc_shortcuts, speed.fuse_upsample, speed.vae_fuse_upsample) rely on diffusers'
    code: this fails loudly when an upgrade changes it, naming the patch and why. The tested range is the one
    requirements.txt pins. Negative control: under a diffusers version outside that range every patch is refused
    with a warning naming its config keys, and a module is left with diffusers' own forward."""
    import re
    from pathlib import Path
    from diffusers.models.upsampling import Upsample2D
    assert performance.diffusers_mismatches() == {}, performance.diffusers_mismatches()
    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    pin = re.search(r"^diffusers>=([\d.]+),<([\d.]+)", requirements, re.M)
    assert pin and (performance._version(pin[1]), performance._version(pin[2])) == performance.DIFFUSERS_TESTED

    performance.diffusers_mismatches.cache_clear()
    monkeypatch.setattr(performance.diffusers, "__version__", "0.99.0")
    try:
        assert set(performance.diffusers_mismatches()) == {"nhwc_shortcuts", "fuse_upsample"}
        block = torch.nn.Sequential(Upsample2D(8, use_conv=True))
        with pytest.warns(UserWarning, match=r"fuse_upsample is off \(speed\.fuse_upsample and "
                                             r"speed\.vae_fuse_upsample\): diffusers 0\.99\.0 is outside"):
            assert performance.fuse_upsample_convs(block) == 0
        assert "forward" not in vars(block[0])  # diffusers' own forward
    finally:
        performance.diffusers_mismatches.cache_clear()


def test_the_diffusers_check_reads_the_code_not_only_the_version(monkeypatch):
    """Inside the tested versions, diffusers code that changed under a patch turns that patch off by name: a
    ResnetBlock2D.forward that uses its training flag for more than the shortcut's contiguous copy, an Upsample2D
    whose forward is no longer nearest 2x + conv, and one that lost an attribute the patch selects modules by."""
    import torch.nn.functional as F
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    def resnet_forward(self, input_tensor, temb, *args, **kwargs):
        if self.training:
            input_tensor = input_tensor * 2
        return input_tensor

    def bilinear_forward(self, hidden_states, output_size=None, *args, **kwargs):
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="bilinear"))

    init = Upsample2D.__init__

    def init_without_interpolate(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self.interpolate

    performance.diffusers_mismatches.cache_clear()
    try:
        monkeypatch.setattr(ResnetBlock2D, "forward", resnet_forward)
        monkeypatch.setattr(Upsample2D, "forward", bilinear_forward)
        found = performance.diffusers_mismatches()
        assert set(found) == {"nhwc_shortcuts", "fuse_upsample"}, found
        assert "self.training" in found["nhwc_shortcuts"] and "sub-pixel" in found["fuse_upsample"]
        monkeypatch.undo()
        performance.diffusers_mismatches.cache_clear()
        monkeypatch.setattr(Upsample2D, "__init__", init_without_interpolate)
        found = performance.diffusers_mismatches()
        assert set(found) == {"fuse_upsample"} and "interpolate" in found["fuse_upsample"], found
    finally:
        monkeypatch.undo()
        performance.diffusers_mismatches.cache_clear()
    assert performance.diffusers_mismatches() == {}


def test_the_diffusers_check_leaves_the_global_rng_alone():
    """The check builds a probe module once per process; its init must not shift the RNG that initialises the UNet
    (a second run in one process got other initial weights, and exact resume failed)."""
    performance.diffusers_mismatches.cache_clear()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert performance.diffusers_mismatches() == {}
    assert torch.equal(torch.get_rng_state(), before)


def test_bench_cpu_step_measures_each_lever_against_the_shipped_step_of_the_same_run(tmp_path):
    """bench/bench_cpu_step.py: each lever's row carries the steps/s of the project's own loss + backward + AdamW
    and its ratio to the shipped demo step measured in the same process (the baseline a ratio needs); a lever it
    does not know is refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu_step.json"
    cmd = [sys.executable, str(root / "bench" / "bench_cpu_step.py"), "--steps", "1"]
    variant = "unet.block_out_channels=[32,32,64] unet.layers_per_block=2"
    proc = subprocess.run(cmd + ["--widths", "32,64,64", "--variants", variant, "--levers", "eager", "channels_last",
                                 "--batch", "2", "--json", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    shipped = ",".join(str(c) for c in load_config(root / "configs" / "demo.yaml").unet.block_out_channels)
    assert (rec["baseline"]["widths"], rec["baseline"]["lever"], rec["baseline"]["batch"]) == (shipped, "eager", 16)
    assert [(r["widths"], r["lever"], r["batch"]) for r in rec["rows"]] == [
        ("32,64,64", "eager", 2), ("32,64,64", "channels_last", 2), ("32,32,64", "eager", 2),
        ("32,32,64", "channels_last", 2)]
    assert rec["rows"][-1]["variant"] == variant
    speeds = rec["baseline"]["measurements"]  # the baseline before the first row and after every row
    assert len(speeds) == len(rec["rows"]) + 1 and rec["baseline"]["steps_per_s"] == pytest.approx(sum(speeds) / len(speeds))
    for i, r in enumerate(rec["rows"]):
        assert r["baseline_steps_per_s"] == pytest.approx((speeds[i] + speeds[i + 1]) / 2)
        assert r["steps_per_s"] > 0 and r["ratio_steps"] == r["steps_per_s"] / r["baseline_steps_per_s"]
        assert 0 < r["params_m"] < rec["baseline"]["params_m"]  # both are smaller than the shipped UNet
    assert "baseline: shipped UNet" in proc.stdout
    bad = subprocess.run(cmd + ["--levers", "warp"], cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid choice: 'warp'" in bad.stderr


def test_bench_anchor_motion_times_both_motions_against_each_other(tmp_path):
    """bench/bench_anchor_motion.py: rows alternate pixel and segment on the demo's rendered frames, and each ratio is
    a segment row over the mean of the pixel rows around it (the baseline a ratio needs, from the same run)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "anchor_motion.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_anchor_motion.py"), "--windows", "2",
                           "--rounds", "2", "--iters", "1", "--json", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert [r["motion"] for r in rec["rows"]] == ["pixel", "segment", "pixel", "segment", "pixel"]
    ms = [r["ms"] for r in rec["rows"]]
    assert all(m > 0 for m in ms) and rec["windows"] == 2
    for k, ratio in enumerate(rec["segment_over_pixel"]):
        i = 2 * k + 1
        assert ratio == pytest.approx(ms[i] / ((ms[i - 1] + ms[i + 1]) / 2), rel=1e-2)
    assert "segment / pixel:" in proc.stdout


def test_bench_vae_chunk_times_each_chunk_size_against_the_configs_own(tmp_path):
    """bench/bench_vae_chunk.py: the config's chunk size comes first, at ratio 1; every other size's ratio is the
    config size's median time over its own; outputs are compared with the config size's to the bit (the bundled VAE
    per-frame convolutions: another chunking must not change them)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vae_chunk.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_vae_chunk.py"), "--frames", "6",
                           "--sizes", "4", "2", "--rounds", "1", "--iters", "1", "--threads", "1",
                           "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    own = rows[0]
    assert own["config_default"] and own["chunk_size"] == 8  # configs/demo.yaml
    assert [r["chunk_size"] for r in rows] == [8, 4, 2] and not any(r["config_default"] for r in rows[1:])
    for part in ("encode", "decode"):
        assert own[part]["speedup_vs_config"] == 1.0 and own[part]["bit_equal"]
        for r in rows[1:]:
            assert r[part]["ms"] > 0
            assert r[part]["speedup_vs_config"] == pytest.approx(own[part]["ms"] / r[part]["ms"], rel=2e-2)
            assert r[part]["frames_per_s"] == pytest.approx(1e3 * 6 / r[part]["ms"], rel=2e-2)
            assert isinstance(r[part]["bit_equal"], bool)
    assert rec["size"] == [64, 64] and "chunk   2" in proc.stdout
