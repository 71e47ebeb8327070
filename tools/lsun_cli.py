"""``python -m tools.lsun_cli convert model.ckpt OUT.safetensors [--ema]`` / ``show PATH``: the CompVis
latent-diffusion LSUN-Bedroom checkpoint read without executing its pickle (:mod:`backends.lightning_checkpoint`),
converted to diffusers parts (:mod:`backends.compvis_ldm`) and written once as a pickle-free safetensors file
(atomically), or described. A bad file or argument is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backends.compvis_ldm import load_model_file, save_converted
from safeio.cli import ArgumentParser, entry_point

__all__ = ["main"]


def _describe(path: Path, ema: bool) -> dict:
    model = load_model_file(path, ema=ema)
    return {**model.config, "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
            "vqvae_parameters": sum(p.numel() for p in model.vqvae.parameters()),
            "latent_shape": [int(model.unet.config.in_channels), int(model.unet.config.sample_size),
                             int(model.unet.config.sample_size)]}


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tools.lsun_cli",
                            description="Convert the latent-diffusion LSUN-Bedroom model.ckpt without running it.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="model.ckpt -> a pickle-free .safetensors file (diffusers layout)")
    convert.add_argument("source", type=Path)
    convert.add_argument("target", type=Path)
    convert.add_argument("--ema", action="store_true", help="take the UNet's EMA weights (model_ema.*)")
    show = sub.add_parser("show", help="print a model file's parameters, scale factor and provenance")
    show.add_argument("path", type=Path)
    show.add_argument("--ema", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "convert":
        if args.target.suffix != ".safetensors":
            raise ValueError(f"the target must end in .safetensors (got {args.target})")
        if not args.source.is_file():
            raise FileNotFoundError(f"no checkpoint at {args.source} (the latent-diffusion release's "
                                    "lsun_bedrooms.zip holds model.ckpt)")
        if args.source.suffix == ".safetensors":
            raise ValueError(f"{args.source} is converted already")
        model = load_model_file(args.source, ema=args.ema)
        save_converted(model, args.target)
        count = sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in model.vqvae.parameters())
        print(f"wrote {args.target}: UNet2DModel + VQModel, {count} parameters, from {args.source}")
        return 0
    if not args.path.is_file():
        raise FileNotFoundError(f"no model file at {args.path}")
    print(json.dumps(_describe(args.path, args.ema), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
