"""PSNR and SSIM per horizon step on decoded frames in [0, 1], for the model and three references on the same clips:
copy-the-last-past-frame (the floor to beat), the same copy made in the model's latent space and decoded
(copy_last_vae: what a model that predicts "nothing moves" perfectly would output, the VAE's reconstruction error
included), and the VAE round trip of the true future (the latent ceiling). Where copy_last beats the model but
copy_last_vae does not, the gap is the VAE's reconstruction floor, not the predictor.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from data.pixels import to_unit
from model.sliding import WindowKey, precision_context, predict_windows
from training.distributed import DistInfo, all_reduce


PSNR_MAX_DB = 100.0  # identical frames (MSE 0, e.g. copy_last on a still clip) score this instead of inf


def frame_psnr(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """The project's one PSNR: images (..., 3, H, W) in [0, 1] (data.pixels.to_unit) -> dB per image (...), peak 1,
    at most PSNR_MAX_DB. NaN where an image holds a NaN."""
    return peak_signal_noise_ratio(pred, true, data_range=1.0, reduction="none",
                                   dim=(-3, -2, -1)).clamp_max(PSNR_MAX_DB)


def frame_metrics(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, true: (B, T, 3, H, W) pixels in [-1, 1] -> PSNR (B, T) in dB and SSIM (B, T), both on [0, 1] images."""
    p, t = to_unit(pred.float()), to_unit(true.float())
    B, T = p.shape[:2]
    # fp32 even inside the trainer's bf16 autocast: SSIM's Gaussian filter is a conv2d, which autocast runs in
    # bf16, and its variances E[x^2] - E[x]^2 then cancel to noise (a 41 dB VAE round trip scored SSIM 0.34)
    with torch.autocast(p.device.type, enabled=False):
        ssim = structural_similarity_index_measure(p.flatten(0, 1), t.flatten(0, 1), data_range=1.0,
                                                   reduction="none")
    return frame_psnr(p, t), ssim.reshape(B, T)


def sample_rows(name: str, samples: int) -> dict[str, str]:
    """The rows a net gets with K samples per window, and what each one means (written into the result)."""
    rows = {name: "one sample per window (sample 0, the headline row)"}
    if samples > 1:
        rows[f"{name}.k{samples}_mean"] = f"metric averaged over {samples} samples per window (expected quality)"
        rows[f"{name}.k{samples}_best"] = (f"best of {samples} samples per window, chosen by its mean over the horizons "
                                           "of that metric (SVG / SRVP / MCVD protocol)")
        rows[f"{name}.k{samples}_avg"] = f"metric of the pixel average of {samples} samples (posterior mean)"
    return rows


REFERENCE_ROWS = {
    "copy_last": "the last past frame repeated",
    "copy_last_vae": "the last past latent decoded and repeated",
    "vae_roundtrip": "the true future encoded (posterior mean) and decoded: the latent ceiling",
}


def window_key(item: dict, index: int) -> WindowKey:
    """The window's seed key: its clip and first frame (any dataset of windows), else its index."""
    if "clip" in item and "frame_indices" in item:
        return WindowKey(str(item["clip"]), int(item["frame_indices"][0]))
    return WindowKey("", index)


def _sample_metrics(name: str, per_sample: list[tuple[torch.Tensor, torch.Tensor]], average: torch.Tensor,
                    future: torch.Tensor) -> dict:
    """Rows of one net from its K samples' (psnr, ssim) (B, Hz) each and their average frames: sample 0, and with
    K > 1 the mean over samples, the best of K per window (by its horizon mean) and the metric of the average."""
    rows = {name: per_sample[0]}
    if len(per_sample) > 1:
        K = len(per_sample)
        psnr, ssim = (torch.stack([m[j] for m in per_sample]) for j in (0, 1))  # (K, B, Hz)
        rows[f"{name}.k{K}_mean"] = (psnr.mean(0), ssim.mean(0))
        rows[f"{name}.k{K}_best"] = tuple(m.gather(0, m.mean(2).argmax(0)[None, :, None].expand(1, *m.shape[1:]))[0]
                                          for m in (psnr, ssim))
        rows[f"{name}.k{K}_avg"] = frame_metrics(average, future)
    return rows


@torch.no_grad()
def evaluate(model, dataset, indices: list[int], info: DistInfo, nets: dict, steps: int, batch_size: int,
             seed: int = 1234, samples: int = 1, rounds: int = 1, precision: str = "no",
             decodes: dict[str, tuple[str, float]] | None = None) -> dict:
    """Evaluate `nets` (name -> UNet) on dataset[indices], the work split over ranks; every rank returns the same dict
    {"num_clips", "samples", "rounds", "precision", "protocol": {row: meaning}, "psnr": {row: [per horizon]},
    "ssim": {...}} with rows per net (K-sample rows when samples > 1, `sample_rows`) plus the references.

    Items hold "frames" (t_past + rounds * t_future, 3, H, W) and "cond"; windows are predicted by
    model/sliding.predict_windows, seeded by (seed, clip, first frame, sample), so results depend neither on world size
    nor batch size. precision: "bf16" | "no" (train.mixed_precision), through sliding.precision_context.
    decodes: {name: (residual_decode mode, threshold)} to decode the same samples several ways (a study of the
    decoding without sampling again); the result then also holds "decode": {name: {"psnr", "ssim"}}, and its own
    "psnr" / "ssim" are the first entry's. Default: the model's sampler.residual_decode, once."""
    device = model.vae.device
    Tp, Hz = model.t_past, rounds * model.t_future
    protocol = {row: text for name in nets for row, text in sample_rows(name, samples).items()}
    protocol.update(REFERENCE_ROWS)
    names = list(protocol)
    ways = decodes or {"": (None, None)}  # decoding name -> (mode, threshold); None: the config's
    sums = torch.zeros(len(ways), 2, len(names), Hz, dtype=torch.float64)
    mine = indices[info.rank::info.world_size]
    with precision_context(device, precision):
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            items = [dataset[i] for i in chunk]
            frames = torch.stack([it["frames"] for it in items]).to(device)
            assert frames.shape[1] == Tp + Hz, f"windows of {frames.shape[1]} frames, evaluating {Tp} + {Hz}"
            cond = torch.stack([it["cond"] for it in items]).to(device)
            cond = cond if cond.numel() else None
            past, future = frames[:, :Tp], frames[:, Tp:]
            past_mean, past_std = model.vae.encode_moments(past)
            keys = [window_key(it, i) for it, i in zip(items, chunk)]
            last_rec = model.vae.decode(past_mean[:, -1:])  # D(z_last): copy_last_vae, and every residual decoding
            metrics = [{} for _ in ways]  # per decoding: row -> (psnr (B, Hz), ssim (B, Hz))
            for name, net in nets.items():
                per_sample = [[] for _ in ways]
                frame_sum = [torch.zeros_like(future) for _ in ways]
                for k in range(samples):
                    latents = predict_windows(model, net, past_mean, keys, past_std, cond, rounds, steps, seed, k)
                    decoded = model.vae.decode(latents)  # once; each way only reads it differently
                    for d, (mode, threshold) in enumerate(ways.values()):
                        pred = model.residual_decode(decoded, past, past_mean, mode, last_rec, threshold)
                        per_sample[d].append(frame_metrics(pred, future))
                        frame_sum[d] += pred
                for d, m in enumerate(metrics):
                    m.update(_sample_metrics(name, per_sample[d], frame_sum[d] / samples, future))
            references = {"copy_last": frame_metrics(past[:, -1:].expand_as(future), future),
                          "copy_last_vae": frame_metrics(last_rec.expand_as(future), future),
                          "vae_roundtrip": frame_metrics(model.vae.decode(model.vae.encode_moments(future)[0]),
                                                         future)}
            for d, m in enumerate(metrics):
                m.update(references)
                for j, name in enumerate(names):
                    psnr, ssim = m[name]
                    sums[d, 0, j] += psnr.double().sum(0).cpu()
                    sums[d, 1, j] += ssim.double().sum(0).cpu()
    count = torch.tensor([float(len(mine))], dtype=torch.float64)
    if info.device.type == "cuda":
        sums, count = sums.to(info.device), count.to(info.device)
    all_reduce(sums, info)
    all_reduce(count, info)
    n = max(int(count.item()), 1)
    mean = (sums / n).cpu()
    effective = "bf16 autocast" if device.type == "cuda" and precision == "bf16" else "fp32"
    tables = [{"psnr": {name: [round(float(v), 4) for v in mean[d, 0, j]] for j, name in enumerate(names)},
               "ssim": {name: [round(float(v), 5) for v in mean[d, 1, j]] for j, name in enumerate(names)}}
              for d in range(len(ways))]
    result = {"num_clips": int(count.item()), "samples": samples, "rounds": rounds, "precision": effective,
              "protocol": protocol, **tables[0]}
    if decodes:
        result["decode"] = dict(zip(decodes, tables))
    return result


def format_table(result: dict, what: str = "val clips") -> str:
    """A plain-text table: rows = model / references, columns = horizon steps t+1 .. t+H and mean; then what each
    row means when the result carries K-sample rows."""
    names = list(result["psnr"])
    Tf = len(result["psnr"][names[0]])
    width = max(16, 2 + max(len(n) for n in names))
    head = f"{'':<{width}}" + "".join(f"{'t+' + str(k + 1):>9}" for k in range(Tf)) + f"{'mean':>9}"
    extra = [f"{k} {result[k]}" for k in ("samples", "rounds", "precision") if k in result]
    lines = [f"evaluation on {result['num_clips']} {what}" + (f" ({', '.join(extra)})" if extra else ""),
             "PSNR (dB)", head]
    for metric, fmt in (("psnr", "{:9.2f}"), ("ssim", "{:9.4f}")):
        if metric == "ssim":
            lines += ["SSIM", head]
        for name in names:
            vals = result[metric][name]
            lines.append(f"{name:<{width}}" + "".join(fmt.format(v) for v in vals) + fmt.format(sum(vals) / len(vals)))
    if result.get("samples", 1) > 1:
        lines += ["rows:"] + [f"  {row}: {text}" for row, text in result["protocol"].items()]
    return "\n".join(lines)
