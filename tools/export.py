#!/usr/bin/env python
"""Export a trained run's weights for sharing: the UNet and its EMA as safetensors plus the resolved config.

    python tools/export.py --run runs/demo --out runs/demo/export
    python tools/export.py --run runs/demo --checkpoint runs/demo/checkpoints/ckpt_000001000.pt --out shared/demo
    python tools/evaluate.py --run runs/demo/export          # every tool loads the folder as it loads a run

The folder (model/export.py) holds config.json, unet.safetensors, unet_ema.safetensors and, when the run's VAE is a
local folder of safetensors, a copy of it in vae/, so the folder is complete on another machine. Loading it never
unpickles anything, unlike a checkpoint (which also carries the optimizer and is meant for resuming).
exit codes: 0 written; 2 the run or checkpoint does not load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--run", help="run folder (its newest valid checkpoint unless --checkpoint)")
    p.add_argument("--checkpoint", default="latest", help="latest or a checkpoint file")
    p.add_argument("--out", required=True, help="the export folder (created; its files replaced)")
    p.add_argument("--no-vae", action="store_true", help="do not copy a local VAE folder into <out>/vae "
                                                         "(config.json then names the VAE's path as the run did)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from configs import config_to_dict
    from model.export import save_export
    from model.loading import LoadError, load_model

    try:
        loaded = load_model(run=args.run, checkpoint=args.checkpoint)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unet = loaded.raw_unet
    out = save_export(args.out, config=config_to_dict(loaded.cfg),
                      model_args={"latent_channels": unet.latent_channels, "t_past": unet.t_past,
                                  "t_future": unet.t_future, "cond_dim": unet.cond_dim},
                      unet=unet.state_dict(), ema_unet=loaded.ema_unet.state_dict() if loaded.ema_unet else None,
                      ema_settings=loaded.ema_state, step=loaded.step, vae=loaded.state.get("vae"),
                      source=str(loaded.checkpoint), bundle_vae=not args.no_vae)
    print(f"exported {loaded.describe()} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
