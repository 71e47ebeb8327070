"""Score a folder of images with any reward head (the authors' ``score_{hps,pick,...}`` CLIs,
docs/authors-code.md §8.5).

    python -m training.rewards.score_cli --head hps --images samples/sd15
    python -m training.ppo.scripts.score_pick --images samples/sd15 --prompts src/prompts/test.txt --output-json r.json
    python -m training.rewards.score_cli --head digit_class --images samples/digits --per-image

Images are the sorted matches of ``--pattern`` (default ``**/*.png``) under ``--images`` (sorted by relative
path: our samplers' ``000000/000123.png`` names sort by seed). **Pairing with prompts** (``--pairing auto``):

1. if every image has a JSON sidecar (``000123.json``, written by ``sample*.py``) with a ``prompt``, that prompt
   is used (it is what the image was sampled with; ``--prompts``, if also given, is only compared with it);
2. else, with no sidecars at all, line ``i`` of ``--prompts`` (.txt lines or a .csv ``text`` column, via
   :func:`backends.prompts.read_prompts`) goes with the ``i``-th image in sorted order, as the authors do; the
   counts must match exactly. (This equals the sidecar pairing for our samplers when the seeds are ``0..N-1``
   and the prompt list has ``N`` lines.)
3. some images with sidecars and others without is an error. Heads that ignore prompts (``aesthetic``,
   ``image_contrast``, ``digit_realism``) score with empty prompts when neither is available.

``--pairing sidecar`` / ``index`` forces one rule. The main weights file comes from ``--weights``, else the
head's environment variable, else ``<--cache-dir>/<manifest default>`` (:mod:`training.rewards.pretrained`), and is
passed as ``weights_path``; a missing file is one error message naming it and where to get it. Other files of the
head (PickScore's ``processor_path``, ImageReward's ``tokenizer_path``, the aesthetic head's ``clip_path``) are
passed when present and the head's factory takes them (explicitly or through ``**options``), and so is
``device``; ``--disable-amp`` passes ``amp=False`` (otherwise each head keeps its own autocast default). The
result is ``{images_dir, pattern, prompts_file, stats{count, mean, std (population), min, max},
metadata{duration, num_images, batch_size, device, head, weights, pairing, ...}}``, printed and optionally
written atomically (``--output-json``); ``--per-image`` adds every image's score.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from safeio import atomic_write
from safeio.cli import ArgumentParser, entry_point
from training.rewards import registry
from training.rewards.pretrained import head_entries, resolve

__all__ = ["HEAD_DEFAULTS", "PROMPT_FREE_HEADS", "MAX_IMAGE_PIXELS", "list_images", "load_image", "iter_image_batches", "read_sidecar",
           "pair_prompts", "parse_options", "build_head", "score_images", "summarise", "write_json", "build_parser",
           "main"]

HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "hps": {"batch_size": 8}, "hpsv21": {"batch_size": 8}, "hpsv2": {"batch_size": 8}, "pickscore": {"batch_size": 8},
    "imagereward": {"batch_size": 4}, "clip": {"batch_size": 8}, "aesthetic": {"batch_size": 32},
    "mps": {"batch_size": 4}, "image_contrast": {"batch_size": 32},
    "digit_class": {"batch_size": 256, "mode": "L", "size": 8},
    "digit_realism": {"batch_size": 256, "mode": "L", "size": 8},
}
PROMPT_FREE_HEADS = frozenset({"aesthetic", "image_contrast", "digit_realism"})
# Modules that register a head, tried in order when the head is not registered yet.
_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "hps": ("training.rewards.hps",), "hpsv21": ("training.rewards.hps",), "hpsv2": ("training.rewards.hps",),
    "pickscore": ("training.rewards.pickscore",), "imagereward": ("training.rewards.imagereward",),
    "clip": ("training.rewards.clip_score",), "aesthetic": ("training.rewards.aesthetic", "training.rewards.clip_score"),
    "mps": ("training.rewards.mps",),
}


class ScoreError(ValueError):
    """A usage or data error of the score CLI (one message)."""


#: Pixels an image to score may have: 8192 x 8192, four times the largest sample any backend writes (SDXL /
#: FLUX at 2048 x 2048). A PNG header can claim 10^9 pixels in 74 bytes; it is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


# -- images ------------------------------------------------------------------------------------------------

def list_images(folder: str | os.PathLike, pattern: str = "**/*.png") -> list[Path]:
    """Files under ``folder`` matching ``pattern`` (hidden files skipped), sorted by their path relative to
    ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    # Hidden files (a killed writer's temporaries among them) are never images of the run.
    found = {p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")}
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_image(path: str | os.PathLike, mode: str = "RGB", size: int | None = None) -> torch.Tensor:
    """One image as float32 ``[C, H, W]`` in ``[-1, 1]`` (``u / 127.5 - 1``, the inverse of the samplers' rounding).

    ``mode`` is a PIL mode (``RGB`` or ``L``). ``size`` resizes to ``size x size``: nearest-neighbour when the image
    is an integer multiple of it (undoing the samplers' nearest upscale exactly), bicubic otherwise.
    """
    try:
        with warnings.catch_warnings():       # the size is checked below, with a clearer message than PIL's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except (OSError, Image.DecompressionBombError) as err:
        raise ScoreError(f"{path}: not a readable image ({err})") from None
    with opened as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ScoreError(f"{path}: {image.width} x {image.height} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                             "(8192 x 8192); no sample image is that large")
        try:
            image = image.convert(mode)
        except (OSError, ValueError) as err:       # truncated or corrupt pixel data
            raise ScoreError(f"{path}: not a readable image ({err})") from None
        if size is not None and image.size != (size, size):
            exact = image.width % size == 0 and image.height % size == 0
            image = image.resize((size, size), Image.NEAREST if exact else Image.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def iter_image_batches(paths: Sequence[Path], batch_size: int, mode: str = "RGB",
                       size: int | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, images [B, C, H, W])`` over ``paths`` in order, at most ``batch_size`` at a time; a chunk with
    images of different sizes is split into runs of equal size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(paths), batch_size):
        run: list[int] = []
        images: list[torch.Tensor] = []
        for i in range(start, min(start + batch_size, len(paths))):
            image = load_image(paths[i], mode, size)
            if images and image.shape != images[0].shape:
                yield run, torch.stack(images)
                run, images = [], []
            run.append(i)
            images.append(image)
        if images:
            yield run, torch.stack(images)


# -- prompts -----------------------------------------------------------------------------------------------

def read_sidecar(image: Path) -> dict | None:
    """The JSON sidecar ``<image>.json`` of an image, or None when there is none (or it has no ``prompt``)."""
    path = image.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ScoreError(f"sidecar {path} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) and isinstance(data.get("prompt"), str) else None


def pair_prompts(paths: Sequence[Path], prompts_file: str | os.PathLike | None = None, pairing: str = "auto",
                 prompt_free: bool = False) -> tuple[list[str], str]:
    """``(prompts, rule)``: one prompt per image, by the rule in the module docstring."""
    if pairing not in ("auto", "sidecar", "index"):
        raise ScoreError(f"--pairing must be auto, sidecar or index, got {pairing!r}")
    listed = None
    if prompts_file is not None:
        from backends.prompts import read_prompts

        listed = read_prompts(prompts_file)
    sidecars = [read_sidecar(p) for p in paths] if pairing != "index" else []
    have = sum(s is not None for s in sidecars)
    if pairing == "sidecar" or (pairing == "auto" and paths and have == len(paths)):
        if have != len(paths):
            first = next(p for p, s in zip(paths, sidecars) if s is None)
            raise ScoreError(f"--pairing sidecar: {len(paths) - have} of {len(paths)} images have no JSON sidecar "
                             f"with a prompt (first: {first.with_suffix('.json')})")
        prompts = [s["prompt"] for s in sidecars]
        if listed is not None and len(listed) == len(prompts):
            differ = sum(a != b for a, b in zip(prompts, listed))
            if differ:
                print(f"note: {differ} of {len(prompts)} sidecar prompts differ from the lines of {prompts_file} in "
                      "sorted order; using the sidecars (--pairing index uses the file)", file=sys.stderr)
        return prompts, "sidecar"
    if pairing == "auto" and have:
        raise ScoreError(f"{have} of {len(paths)} images have a JSON sidecar with a prompt and the others do not; "
                         "use --pairing index with --prompts to pair by sorted order")
    if listed is None:
        if prompt_free:
            return [""] * len(paths), "none"
        raise ScoreError("no JSON sidecars with prompts next to the images; give --prompts FILE (line i pairs "
                         "with the i-th image in sorted order)")
    if len(listed) != len(paths):
        raise ScoreError(f"{len(paths)} images but {len(listed)} prompts in {prompts_file}: pairing by sorted order "
                         "needs the counts to match exactly")
    return listed, "index"


# -- heads -------------------------------------------------------------------------------------------------

def parse_options(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings -> dict; values are read as JSON when they parse (numbers, true, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ScoreError(f"--option takes key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _ensure_registered(name: str) -> None:
    for module in (f"training.rewards.{name}", *_HEAD_MODULES.get(name, ())):
        if name in registry.available_rewards():
            return
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            try:
                importlib.import_module(module)
            except Exception as err:  # a broken head module: one message, not a traceback
                raise ScoreError(f"could not import {module} (for head {name!r}): {type(err).__name__}: {err}") from None


def _factory_parameters(name: str) -> tuple[set[str], bool]:
    """(explicit keyword parameters, takes **kwargs) of the head's factory; empty when unknown."""
    if name not in registry.available_rewards():
        return set(), False
    return registry.reward_options(name)


def build_head(name: str, weights: str | os.PathLike | None = None, cache_dir: str | os.PathLike = "weights",
               device: str | None = None, amp: bool = True,
               options: dict[str, Any] | None = None) -> tuple[registry.RewardHead, dict[str, Any]]:
    """Build head ``name`` with its files resolved through the manifest; returns ``(head, info)`` with the
    weights path and the options actually passed. A missing main file raises FileNotFoundError first."""
    _ensure_registered(name)
    explicit, var_kw = _factory_parameters(name)

    def takes(key: str) -> bool:  # a factory with **options passes them on to its head class
        return key in explicit or var_kw

    opts = dict(options or {})
    info: dict[str, Any] = {"weights": None, "amp": None}
    files = head_entries(name)
    if files:
        entry, option = files[0]
        if option not in opts:
            opts[option] = str(resolve(entry, weights, root=cache_dir))
        info["weights"] = str(opts[option])
        for entry, option in files[1:]:
            if option not in opts and takes(option):
                try:
                    opts[option] = str(resolve(entry, root=cache_dir))
                except FileNotFoundError:
                    pass  # the head reports what it needs
    elif weights is not None:
        if not takes("weights_path"):
            raise ScoreError(f"head {name!r} takes no weights file (--weights)")
        opts["weights_path"] = str(weights)
        info["weights"] = str(weights)
    if device is not None and takes("device") and "device" not in opts:
        opts["device"] = device
    amp_key = next((k for k in ("amp", "use_amp") if k in explicit), "amp" if var_kw else None)
    if amp_key is not None:
        if not amp:  # --disable-amp; otherwise each head keeps its own default (ImageReward: off)
            opts.setdefault(amp_key, False)
        info["amp"] = opts.get(amp_key, "head default")
    try:
        head = registry.build_reward(name, **opts)
    except TypeError as err:
        raise ScoreError(f"head {name!r} rejected its options {sorted(opts)}: {err}") from None
    info["options"] = {k: v for k, v in opts.items()}
    return head, info


def score_images(head: registry.RewardHead, paths: Sequence[Path], prompts: Sequence[str], batch_size: int,
                 mode: str = "RGB", size: int | None = None) -> np.ndarray:
    """Raw scores ``[N]`` (float64) of the images for their prompts, ``batch_size`` images per head call."""
    if len(prompts) != len(paths):
        raise ScoreError(f"{len(paths)} images but {len(prompts)} prompts")
    out = np.empty(len(paths), dtype=np.float64)
    with torch.no_grad():
        for indices, images in iter_image_batches(paths, batch_size, mode, size):
            scores = torch.as_tensor(head.score(images, [prompts[i] for i in indices])).detach()
            if scores.shape != (len(indices),):
                raise ScoreError(f"head returned shape {tuple(scores.shape)} for {len(indices)} images")
            out[indices] = scores.to("cpu", torch.float64).numpy()
    return out


def summarise(scores: np.ndarray) -> dict[str, float | int]:
    """``{count, mean, std (population), min, max}``; NaN statistics for no scores."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return {"count": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"count": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max())}


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (non-JSON values via ``str``)."""
    path = Path(path)
    atomic_write(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())
    return path


# -- command line ------------------------------------------------------------------------------------------

def build_parser(head: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of every ``score_*`` CLI; ``head`` fixes the default ``--head``."""
    parser = ArgumentParser(prog=prog, description=f"Score images with the {head or 'chosen'} reward head")
    parser.add_argument("--head", default=head, required=head is None,
                        help="reward head (hps, hpsv2, pickscore, imagereward, clip, aesthetic, mps, digit_class, "
                             "digit_realism, image_contrast, ...)")
    parser.add_argument("--images", required=True, help="folder of images")
    parser.add_argument("--pattern", default="**/*.png", help="glob under --images (default **/*.png)")
    parser.add_argument("--prompts", help=".txt (one per line) or .csv (text column): line i pairs with the i-th "
                                          "image in sorted order when there are no JSON sidecars")
    parser.add_argument("--pairing", choices=("auto", "sidecar", "index"), default="auto",
                        help="auto: sidecars if every image has one, else --prompts by sorted order")
    parser.add_argument("--weights", help="the head's main weights (passed as weights_path); default: manifest")
    parser.add_argument("--cache-dir", default="weights", help="weights root for the manifest defaults")
    parser.add_argument("--batch-size", type=int, help="images per head call (default: per head, e.g. 8 for hps)")
    parser.add_argument("--device", help="default: cuda if available, else cpu (for heads that take a device)")
    parser.add_argument("--disable-amp", action="store_true", help="no autocast (heads with an amp option)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="another head option (repeatable; JSON values)")
    parser.add_argument("--image-mode", choices=("auto", "RGB", "L"), default="auto",
                        help="PIL mode the images are read in (auto: L for the digit heads, else RGB)")
    parser.add_argument("--image-size", type=int, help="resize to N x N first (auto: 8 for the digit heads)")
    parser.add_argument("--per-image", action="store_true", help="include every image's score in the JSON")
    parser.add_argument("--output-json", help="also write the result here (atomically)")
    return parser


@entry_point
def main(argv: Iterable[str] | None = None, head: str | None = None, prog: str | None = None) -> int:
    """Score, print the JSON result, optionally write it; an error is one ``error: ...`` line and exit 2."""
    args = build_parser(head, prog).parse_args(list(argv) if argv is not None else None)
    start = time.perf_counter()
    name = args.head
    defaults = HEAD_DEFAULTS.get(name, {})
    batch_size = args.batch_size if args.batch_size is not None else defaults.get("batch_size", 16)
    mode = defaults.get("mode", "RGB") if args.image_mode == "auto" else args.image_mode
    size = args.image_size if args.image_size is not None else defaults.get("size")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Everything cheap first: the head, its options and files, the flags; then the images, then the network.
    if batch_size < 1:
        raise ScoreError(f"--batch-size must be >= 1, got {batch_size}")
    if size is not None and size < 1:
        raise ScoreError(f"--image-size must be >= 1, got {size}")
    _ensure_registered(name)
    if name not in registry.available_rewards():
        raise ScoreError(f"unknown reward head {name!r}; available: {', '.join(sorted(registry.available_rewards()))}")
    options = parse_options(args.option)
    if args.weights is not None and not Path(args.weights).exists():
        raise FileNotFoundError(f"--weights {args.weights} does not exist")
    paths = list_images(args.images, args.pattern)
    if not paths:
        raise ScoreError(f"no images matching {args.pattern!r} in {args.images}")
    prompts, rule = pair_prompts(paths, args.prompts, args.pairing, prompt_free=name in PROMPT_FREE_HEADS)
    model, info = build_head(name, args.weights, args.cache_dir, device, not args.disable_amp, options)
    scores = score_images(model, paths, prompts, batch_size, mode, size)
    result: dict[str, Any] = {
        "images_dir": str(args.images), "pattern": args.pattern, "prompts_file": args.prompts,
        "stats": summarise(scores),
        "metadata": {"duration": time.perf_counter() - start, "num_images": len(paths), "batch_size": batch_size,
                     "device": device, "head": name, "weights": info["weights"], "pairing": rule,
                     "amp": info["amp"], "image_mode": mode, "image_size": size,
                     "options": {k: v for k, v in info["options"].items()}},
    }
    if args.per_image:
        root = Path(args.images)
        result["per_image"] = [{"image": p.relative_to(root).as_posix(), "prompt": q, "score": float(s)}
                               for p, q, s in zip(paths, prompts, scores)]
    print(json.dumps(result, indent=2, default=str))
    if args.output_json:
        write_json(args.output_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m training.rewards.score_cli"))
