"""``python -m tools.edm_cli convert IN.pkl OUT.safetensors`` / ``show PATH``: NVIDIA EDM network pickles read
without executing them (:mod:`backends.edm_checkpoint`), rewritten as pickle-free safetensors, or described.
A bad file or argument is one ``error:`` line and exit status 2. ``python -m backends.edm_checkpoint`` is an alias.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backends.edm_checkpoint import CheckpointError, load_edm, save_edm
from safeio.cli import ArgumentParser, entry_point

__all__ = ["main"]


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m backends.edm_checkpoint",
                                     description="Read NVIDIA EDM network pickles without executing them.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="rewrite an EDM .pkl as a pickle-free .safetensors file")
    convert.add_argument("source", type=Path)
    convert.add_argument("target", type=Path)
    convert.add_argument("--key", default="ema", help="entry of the snapshot dict holding the network (ema)")
    show = sub.add_parser("show", help="print a network file's class, constructor keywords and tensor count")
    show.add_argument("path", type=Path)
    show.add_argument("--key", default="ema")
    args = parser.parse_args(argv)
    if args.command == "convert":
        if args.target.suffix != ".safetensors":
            raise CheckpointError(f"the target must end in .safetensors (got {args.target})")
        net, config = load_edm(args.source, args.key)
        save_edm(net, args.target, source=config.get("source"))
        count = sum(p.numel() for p in net.parameters())
        print(f"wrote {args.target}: {config['class_name']} ({net.model_type}), {count} parameters, "
              f"from {args.source}")
        return 0
    net, config = load_edm(args.path, args.key)
    info = {**config, "parameters": sum(p.numel() for p in net.parameters()),
            "tensors": len(net.state_dict()), "sigma_min": net.sigma_min, "sigma_max": net.sigma_max}
    print(json.dumps(info, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
