"""Model parts: frozen VAE wrapper, conditional UNet, noise schedule, DDIM sampler, and their composition."""
from model.sampler import clip_x0, ddim_sample
from model.schedule import NoiseSchedule
from model.unet import ConditionalUNet
from model.vae import FrozenVAE, VAEError, load_diffusers_vae
from model.video_prediction_diffusion import VideoPredictionDiffusion

__all__ = ["ConditionalUNet", "FrozenVAE", "NoiseSchedule", "VAEError", "VideoPredictionDiffusion", "clip_x0",
           "ddim_sample", "load_diffusers_vae"]
