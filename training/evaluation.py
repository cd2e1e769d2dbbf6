"""PSNR and SSIM per horizon step on decoded frames in [0, 1], for the model and three references on the same clips:
copy-the-last-past-frame (the floor to beat), the same copy made in the model's latent space and decoded
(copy_last_vae: what a model that predicts "nothing moves" perfectly would output, the VAE's reconstruction error
included), and the VAE round trip of the true future (the latent ceiling). Where copy_last beats the model but
copy_last_vae does not, the gap is the VAE's reconstruction floor, not the predictor.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from data.pixels import to_unit
from training.distributed import DistInfo, all_reduce


def frame_metrics(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, true: (B, T, 3, H, W) pixels in [-1, 1] -> PSNR (B, T) in dB and SSIM (B, T), both on [0, 1] images."""
    p, t = to_unit(pred.float()), to_unit(true.float())
    mse = (p - t).pow(2).flatten(2).mean(2)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    B, T = p.shape[:2]
    # fp32 even inside the trainer's bf16 autocast: SSIM's Gaussian filter is a conv2d, which autocast runs in
    # bf16, and its variances E[x^2] - E[x]^2 then cancel to noise (a 41 dB VAE round trip scored SSIM 0.34)
    with torch.autocast(p.device.type, enabled=False):
        ssim = structural_similarity_index_measure(p.flatten(0, 1), t.flatten(0, 1), data_range=1.0,
                                                   reduction="none")
    return psnr, ssim.reshape(B, T)


@torch.no_grad()
def evaluate(model, dataset, indices: list[int], info: DistInfo, nets: dict, steps: int, batch_size: int,
             seed: int = 1234) -> dict:
    """Evaluate `nets` (name -> UNet) on dataset[indices], the work split over ranks; every rank returns the
    same dict {"num_clips", "psnr": {name: [per horizon]}, "ssim": {...}} with keys per net plus "copy_last",
    "copy_last_vae" and "vae_roundtrip". Noise is seeded per clip index, so results do not depend on world size."""
    device = model.vae.device
    names = [*nets, "copy_last", "copy_last_vae", "vae_roundtrip"]
    Tf = model.t_future
    sums = torch.zeros(2, len(names), Tf, dtype=torch.float64)
    mine = indices[info.rank::info.world_size]
    for start in range(0, len(mine), batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        frames = torch.stack([it["frames"] for it in items]).to(device)
        cond = torch.stack([it["cond"] for it in items]).to(device)
        cond = cond if cond.numel() else None
        past, future = frames[:, :model.t_past], frames[:, model.t_past:]
        past_latents = model.vae.encode(past)
        # noise seeded per clip by its dataset index: the same prediction whatever the sharding or batch size
        noise = torch.stack([model.noise_like(past_latents[0], torch.Generator().manual_seed(seed + i))
                             for i in mine[start:start + batch_size]])
        g = torch.Generator().manual_seed(seed + mine[start])
        preds = {name: model.vae.decode(model.predict_latents(past_latents, cond, steps=steps, generator=g,
                                                              net=net, noise=noise.clone()))
                 for name, net in nets.items()}
        preds["copy_last"] = past[:, -1:].expand_as(future)
        preds["copy_last_vae"] = model.vae.decode(past_latents[:, -1:]).expand_as(future)
        preds["vae_roundtrip"] = model.vae.decode(model.vae.encode(future))
        for j, name in enumerate(names):
            psnr, ssim = frame_metrics(preds[name], future)
            sums[0, j] += psnr.double().sum(0).cpu()
            sums[1, j] += ssim.double().sum(0).cpu()
    count = torch.tensor([float(len(mine))], dtype=torch.float64)
    if info.device.type == "cuda":
        sums, count = sums.to(info.device), count.to(info.device)
    all_reduce(sums, info)
    all_reduce(count, info)
    n = max(int(count.item()), 1)
    mean = (sums / n).cpu()
    return {"num_clips": int(count.item()),
            "psnr": {name: [round(float(v), 4) for v in mean[0, j]] for j, name in enumerate(names)},
            "ssim": {name: [round(float(v), 5) for v in mean[1, j]] for j, name in enumerate(names)}}


def format_table(result: dict) -> str:
    """A plain-text table: rows = model / references, columns = horizon steps t+1 .. t+T and mean."""
    names = list(result["psnr"])
    Tf = len(result["psnr"][names[0]])
    head = f"{'':<16}" + "".join(f"{'t+' + str(k + 1):>9}" for k in range(Tf)) + f"{'mean':>9}"
    lines = [f"evaluation on {result['num_clips']} val clips", "PSNR (dB)", head]
    for metric, fmt in (("psnr", "{:9.2f}"), ("ssim", "{:9.4f}")):
        if metric == "ssim":
            lines += ["SSIM", head]
        for name in names:
            vals = result[metric][name]
            lines.append(f"{name:<16}" + "".join(fmt.format(v) for v in vals) + fmt.format(sum(vals) / len(vals)))
    return "\n".join(lines)
