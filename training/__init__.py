"""Training machinery: distributed setup, checkpoints, latent cache, evaluation, pictures, logging."""
