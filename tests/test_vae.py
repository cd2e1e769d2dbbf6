"""The frozen VAE wrapper, on tiny diffusers VAEs saved to a temporary folder and loaded by path: it owns the
latent scale and shift (DESIGN cause 3), stays frozen, chunks without changing results, and fails loudly on a
missing, incomplete, truncated or non-finite checkpoint."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from configs.schema import VAEConfig
from helpers import DOWNSAMPLE, LATENT_CHANNELS, smooth_frames, tiny_kl_vae, tiny_taesd_folder, tiny_vae_folder
from helpers import one_torch_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from model.vae import FrozenVAE, VAEError


def load(folder, **kw) -> FrozenVAE:
    return FrozenVAE.from_config(VAEConfig(pretrained=str(folder), **kw))


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    return tiny_vae_folder(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def kl_raw(kl_folder) -> AutoencoderKL:
    """The saved tiny VAE read back by diffusers itself (the reference); never handed to a wrapper uncopied."""
    return AutoencoderKL.from_pretrained(kl_folder).eval()


@pytest.fixture(scope="module")
def kl_vae(kl_folder) -> FrozenVAE:
    return load(kl_folder)


def wrap(raw: AutoencoderKL, **kw) -> FrozenVAE:
    """A wrapper variant (chunk size, latent mode) around a copy of an already loaded VAE (loading is slow)."""
    return FrozenVAE(copy.deepcopy(raw), **kw)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> dict[str, FrozenVAE]:
    """The same weights saved with different scaling/shift factors in their config.json."""
    root = tmp_path_factory.mktemp("scaled")
    return {"0.5": load(tiny_vae_folder(root, "a", scaling_factor=0.5)),
            "0.125": load(tiny_vae_folder(root, "b", scaling_factor=0.125)),
            "shifted": load(tiny_vae_folder(root, "c", scaling_factor=2.0, shift_factor=0.25))}


# ---------------------------------------------------------------- encode / decode

def test_round_trip_matches_raw_diffusers(kl_vae, kl_raw):
    vae = kl_vae
    frames = smooth_frames(2, 3)  # (B, T, 3, 16, 16) in [-1, 1]
    latents = vae.encode(frames)
    assert latents.shape == (2, 3, LATENT_CHANNELS, 16 // DOWNSAMPLE, 16 // DOWNSAMPLE)
    assert latents.dtype == torch.float32 and vae.downsample == DOWNSAMPLE
    decoded = vae.decode(latents)
    assert decoded.shape == frames.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    # the tiny VAE is untrained, so compare with diffusers' own encode -> posterior mean -> decode
    raw = kl_raw
    flat = frames.reshape(6, 3, 16, 16)
    with torch.no_grad():
        z = raw.encode(flat).latent_dist.mean
        expected = raw.decode(z).sample.clamp(-1, 1)
    sf = raw.config.scaling_factor
    assert sf == pytest.approx(0.18215) and vae.scaling_factor == sf
    torch.testing.assert_close(latents.reshape(6, *latents.shape[2:]), z * sf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded.reshape(flat.shape), expected, rtol=1e-5, atol=1e-5)


def test_scaling_factor_comes_from_the_vae_config(scaled):
    """Same weights saved with a different scaling_factor: latents scale by the exact ratio, pixels do not change."""
    a, b = scaled["0.5"], scaled["0.125"]
    frames = smooth_frames(1, 2)
    la, lb = a.encode(frames), b.encode(frames)
    assert a.scaling_factor == 0.5 and b.scaling_factor == 0.125 and a.shift_factor == b.shift_factor == 0.0
    torch.testing.assert_close(la, 4 * lb, rtol=0, atol=0)  # powers of two: exact
    torch.testing.assert_close(a.decode(la), b.decode(lb), rtol=1e-6, atol=1e-6)


def test_shift_factor_is_subtracted_before_scaling(scaled):
    plain, shifted = scaled["0.125"], scaled["shifted"]
    assert shifted.shift_factor == 0.25 and shifted.scaling_factor == 2.0
    frames = smooth_frames(1, 2)
    z = plain.encode(frames) / 0.125  # raw posterior mean (exact: power of two)
    torch.testing.assert_close(shifted.encode(frames), (z - 0.25) * 2.0, rtol=0, atol=1e-6)
    torch.testing.assert_close(shifted.unscale(shifted.scale(z)), z, rtol=0, atol=1e-6)
    torch.testing.assert_close(shifted.decode(shifted.encode(frames)), plain.decode(plain.encode(frames)),
                               rtol=1e-5, atol=1e-5)
    assert shifted.identity()["shift_factor"] == 0.25 and shifted.identity()["scaling_factor"] == 2.0


def test_chunking_does_not_change_results(kl_raw):
    frames = smooth_frames(2, 5, seed=3)
    one = wrap(kl_raw, chunk_size=64)
    small = wrap(kl_raw, chunk_size=3)  # 10 frames -> chunks of 3, 3, 3, 1
    mean1, std1 = one.encode_moments(frames)
    mean3, std3 = small.encode_moments(frames)
    torch.testing.assert_close(mean3, mean1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std3, std1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.decode(mean1), one.decode(mean1), rtol=1e-5, atol=1e-5)
    # frame order survives the chunked reshape: frame (b, t) of the batch equals that frame encoded alone
    torch.testing.assert_close(mean3[1, 4], one.encode(frames[1:2, 4:5])[0, 0], rtol=1e-5, atol=1e-6)


def test_frozen_and_eval_even_after_train(kl_folder):
    vae = load(kl_folder)  # a fresh one: this test calls .train() on it
    assert not vae.training and not vae.vae.training
    assert vae.train() is vae
    assert not vae.training and all(not m.training for m in vae.modules())
    assert all(not p.requires_grad for p in vae.parameters())
    frames = smooth_frames(1, 1).requires_grad_(True)
    assert not vae.encode(frames).requires_grad
    assert not vae.decode(torch.randn(1, 1, LATENT_CHANNELS, 8, 8, requires_grad=True)).requires_grad


def test_posterior_sample_mode(kl_vae, kl_raw, kl_folder):
    frames = smooth_frames(2, 2)
    mean_vae, sample_vae = kl_vae, load(kl_folder, latent="sample")
    mean = mean_vae.encode(frames, generator=torch.Generator().manual_seed(0))
    s1 = sample_vae.encode(frames, generator=torch.Generator().manual_seed(0))
    s2 = sample_vae.encode(frames, generator=torch.Generator().manual_seed(0))
    s3 = sample_vae.encode(frames, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.allclose(s1, mean) and not torch.allclose(s1, s3)
    # the sample is mean + std * z with z drawn from the generator, std in scaled units
    m, std = sample_vae.encode_moments(frames)
    z = torch.randn(m.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1, m + std * z, rtol=0, atol=0)
    raw = kl_raw
    with torch.no_grad():
        raw_std = raw.encode(frames.reshape(4, 3, 16, 16)).latent_dist.std
    torch.testing.assert_close(std.reshape(raw_std.shape), raw_std * 0.18215, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean, m, rtol=0, atol=0)


def test_bf16_weights_give_float32_latents(kl_raw, kl_vae):
    vae = wrap(kl_raw, dtype="bf16")
    assert next(vae.vae.parameters()).dtype == torch.bfloat16
    latents = vae.encode(smooth_frames(1, 2))
    assert latents.dtype == torch.float32
    torch.testing.assert_close(latents, kl_vae.encode(smooth_frames(1, 2)), rtol=0.1, atol=0.05)
    assert vae.decode(latents).dtype == torch.float32


def test_autoencoder_tiny_loads_and_round_trips(tmp_path):
    vae = load(tiny_taesd_folder(tmp_path), latent="sample")
    assert vae.is_tiny and vae.latent_channels == LATENT_CHANNELS and vae.downsample == 2
    frames = smooth_frames(1, 3)
    mean, std = vae.encode_moments(frames)
    assert std is None and mean.shape == (1, 3, LATENT_CHANNELS, 8, 8)
    torch.testing.assert_close(vae.encode(frames, generator=torch.Generator().manual_seed(0)), mean)  # no posterior
    raw = AutoencoderTiny.from_pretrained(tmp_path / "taesd").eval()
    with torch.no_grad():
        expected = raw.encode(frames[0]).latents * raw.config.scaling_factor
    torch.testing.assert_close(mean[0], expected, rtol=1e-5, atol=1e-6)
    assert vae.decode(mean).shape == frames.shape


def test_shape_checks(kl_vae):
    vae = kl_vae
    with pytest.raises(ValueError, match="B, T, 3, H, W"):
        vae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 2, LATENT_CHANNELS + 1, 8, 8))


# ---------------------------------------------------------------- bad checkpoints

def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(VAEError, match=re.escape(str(missing))):
        load(missing)


def test_folder_without_config_names_the_path(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(VAEError, match=re.escape(str(folder)) + ".*config.json"):
        load(folder)


def test_invalid_config_json_names_the_file(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(VAEError, match=re.escape(str(folder / "config.json"))):
        load(folder)


def test_unsupported_class_is_refused(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "VQModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VAEError, match="VQModel"):
        load(folder)


def test_truncated_weights_name_the_path(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    (weights,) = folder.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VAEError, match=re.escape(str(folder))):
        load(folder)


def test_missing_weights_name_the_path(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(VAEError, match=re.escape(str(folder))):
        load(folder)


def test_nan_weights_are_refused(tmp_path):
    vae = tiny_kl_vae()
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    vae.save_pretrained(tmp_path / "nan")
    with pytest.raises(VAEError, match="decoder.conv_out.weight"):
        load(tmp_path / "nan")


def test_subfolder_of_a_pipeline_folder(tmp_path):
    pipeline = tmp_path / "pipe"
    tiny_vae_folder(pipeline, "vae")
    with pytest.raises(VAEError, match="subfolder"):
        load(pipeline)
    vae = load(pipeline, subfolder="vae")
    assert vae.latent_channels == LATENT_CHANNELS
