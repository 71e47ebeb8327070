"""FID and KID on FID-Inception-v3 pool features, for any number of images (docs/authors-code.md §9.33 is fixed).

    python -m training.ppo.scripts.score_fid --images samples/sd15 --ref refs/coco-val.npz
    python -m training.ppo.scripts.score_fid --images samples/sd15 --ref data/coco-val-images --kid
    python -m training.rewards.fid --images data/coco-val-images --save-stats refs/coco-val.npz   # reference stats

* Features: :class:`training.features.InceptionFeatures` (pytorch-fid's ``InceptionV3``, pool3, 2048-d, with
  ``resize_input=True``: every image is resized bilinearly to 299 x 299 inside the network, so any image size
  works) from the local ``pt_inception-2015-12-05-6726825d.pth`` (manifest entry ``inception``). PNGs are read
  as RGB uint8 exactly as pytorch-fid reads them, so statistics match pytorch-fid's ``--save-stats``.
* Reference: a ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid ``--save-stats``, EDM ``fid.py ref``; optionally
  ``features`` for KID, written with ``--save-features``), or a folder of images. EDM's references come from its
  own Inception pickle and resizer, so they differ slightly from these features; compare like with like.
* FID = ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))``, computed by :mod:`solvers.frechet` (re-exported
  here as :func:`frechet_distance`, :func:`statistics_from_features` and :func:`fid_from_features`): scipy's
  ``sqrtm`` as pytorch-fid, or the exact low-rank form when fewer than 2048 images are scored.
* KID: unbiased MMD^2 with the kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over 100 random subsets of
  ``min(1000, n_gen, n_ref)`` samples of each set, with the standard deviation over subsets.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from safeio import atomic_write
from safeio.cli import ArgumentParser, entry_point
from solvers.frechet import feature_frechet_distance as fid_from_features
from solvers.frechet import frechet_distance, statistics_from_features
from training.rewards.score_cli import iter_image_batches, list_images, write_json
from training.rewards.pretrained import resolve

__all__ = ["Reference", "compute_features", "statistics_from_features", "compute_statistics", "save_statistics",
           "load_statistics", "load_reference", "frechet_distance", "fid_from_features", "kernel_inception_distance",
           "make_extractor", "main"]

Extractor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Reference:
    """Reference statistics (and its features when known: needed for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    count: int | None
    source: str


def make_extractor(weights_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                   root: str | os.PathLike | None = None) -> Extractor:
    """FID Inception pool features from the manifest's ``inception`` file (``weights_path`` overrides)."""
    from training.features import InceptionFeatures

    return InceptionFeatures(resolve("inception", weights_path, root=root), device=device)


def _features_of(images: torch.Tensor, extractor: Extractor, device: str | torch.device | None) -> np.ndarray:
    if device is not None:
        images = images.to(device)
    with torch.no_grad():
        feats = extractor(images)
    return feats.detach().to("cpu", torch.float64).reshape(images.shape[0], -1).numpy()


def compute_features(source: "str | os.PathLike | Sequence[str | os.PathLike] | torch.Tensor",
                     weights_path: str | os.PathLike | None = None, *, pattern: str = "**/*.png",
                     batch_size: int = 50, device: str | torch.device | None = None,
                     extractor: Extractor | None = None, root: str | os.PathLike | None = None) -> np.ndarray:
    """Features ``[N, D]`` (float64) of a folder (``pattern``), a list of image files, or a tensor
    ``[N, C, H, W]`` in ``[-1, 1]``. ``extractor`` (images -> ``[B, D]``) replaces the Inception network."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if extractor is None:
        extractor = make_extractor(weights_path, device, root)
    parts: list[np.ndarray] = []
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W] in [-1, 1], got shape {tuple(source.shape)}")
        for start in range(0, source.shape[0], batch_size):
            parts.append(_features_of(source[start:start + batch_size].float(), extractor, device))
    else:
        paths = list_images(source, pattern) if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
        if not paths:
            raise ValueError(f"no images matching {pattern!r} in {source}")
        for _, images in iter_image_batches(paths, batch_size, mode="RGB"):
            parts.append(_features_of(images, extractor, device))
    if not parts:
        raise ValueError("no images")
    return np.concatenate(parts, axis=0)


def compute_statistics(source: "str | os.PathLike | Sequence[str | os.PathLike] | torch.Tensor",
                       weights_path: str | os.PathLike | None = None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a folder, a list of files or a tensor (arguments of :func:`compute_features`)."""
    return statistics_from_features(compute_features(source, weights_path, **kwargs))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
                    features: np.ndarray | None = None) -> Path:
    """Write ``mu``, ``sigma`` (and ``features``) to a ``.npz`` atomically (the keys pytorch-fid and EDM use)."""
    path = Path(path)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    arrays = {"mu": mu, "sigma": sigma}
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a ``.npz`` with keys ``mu`` and ``sigma``."""
    ref = load_reference(path)
    return ref.mu, ref.sigma


#: Uncompressed bytes one array of a reference .npz may have (50k x 2048 float64 features are 0.8 GB).
MAX_REFERENCE_ARRAY_BYTES = 1 << 30


def load_reference(ref: str | os.PathLike, weights_path: str | os.PathLike | None = None, *,
                   pattern: str = "**/*.png", batch_size: int = 50, device: str | torch.device | None = None,
                   extractor: Extractor | None = None, root: str | os.PathLike | None = None) -> Reference:
    """A ``.npz`` (``mu``, ``sigma``, optional ``features``; no pickles) or a folder of images."""
    path = Path(ref)
    if path.is_dir():
        feats = compute_features(path, weights_path, pattern=pattern, batch_size=batch_size, device=device,
                                 extractor=extractor, root=root)
        mu, sigma = statistics_from_features(feats)
        return Reference(mu, sigma, feats, feats.shape[0], str(path))
    if not path.is_file():
        raise FileNotFoundError(f"reference {path} is neither a .npz file nor a folder of images")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single array, not an .npz archive")
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ValueError(f"a FID reference needs arrays 'mu' and 'sigma' (has {data.files[:10]})")
            # A compressed member can expand a thousandfold: bound what each array may become before reading it.
            for info in data.zip.infolist():
                if info.file_size > MAX_REFERENCE_ARRAY_BYTES:
                    raise ValueError(f"array {info.filename} expands to {info.file_size} bytes (limit "
                                     f"{MAX_REFERENCE_ARRAY_BYTES}; 50k Inception features in float64 are 0.8 GB)")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            feats = data["features"].astype(np.float64) if "features" in data.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable FID reference .npz ({err})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    return Reference(mu, sigma, feats, None if feats is None else feats.shape[0], str(path))


def kernel_inception_distance(features: np.ndarray, ref_features: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """``(mean, std)`` over subsets of the unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``.

    Each subset draws ``m = min(max_subset_size, N1, N2)`` samples of each set without replacement.
    """
    x_all, y_all = np.asarray(features, np.float64), np.asarray(ref_features, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"feature shapes {x_all.shape} and {y_all.shape} do not match")
    m = min(max_subset_size, x_all.shape[0], y_all.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values[i] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * kxy.sum() / (m * m))
    return float(values.mean()), float(values.std())


def _default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``score_fid`` flags."""
    parser = ArgumentParser(prog=prog, description="FID (and KID) of a folder of images against a "
                                     "reference .npz (mu, sigma) or folder")
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--ref", help="reference: .npz with mu and sigma (and features for KID) or a folder")
    parser.add_argument("--pattern", default="**/*.png", help="glob under --images (and a --ref folder)")
    parser.add_argument("--kid", action="store_true", help="also KID (needs reference features: a folder, or "
                        "an .npz written with --save-features)")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="KID subset sampling seed")
    parser.add_argument("--method", choices=("auto", "sqrtm"), default="auto",
                        help="auto: exact low-rank form when N < 2048, else scipy sqrtm; sqrtm: always sqrtm")
    parser.add_argument("--weights", help="FID Inception weights (default: <cache-dir>/pt_inception-2015-12-05-"
                        "6726825d.pth or $FID_INCEPTION_PATH)")
    parser.add_argument("--cache-dir", default="weights", help="weights root for the manifest defaults")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--save-stats", help="write the statistics of --images to this .npz")
    parser.add_argument("--save-features", action="store_true", help="include the features in --save-stats")
    parser.add_argument("--output-json", help="also write the result here (atomically)")
    return parser


@entry_point
def main(argv: Iterable[str] | None = None, prog: str | None = None) -> int:
    """``score_fid``: prints ``{fid, kid_mean, kid_std, count, ref, ...}`` as JSON; errors exit 2 with one line."""
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    start = time.perf_counter()
    device = _default_device(args.device)
    if not args.ref and not args.save_stats:
        raise ValueError("give --ref (to compute FID) and/or --save-stats (to write reference statistics)")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"--images {args.images} is not a folder")
    if args.kid and not args.ref:
        raise ValueError("--kid needs --ref")
    ref = None
    if args.ref and not Path(args.ref).is_dir():  # an .npz: read (and check) it before the weights or any network
        ref = load_reference(args.ref)
        if args.kid and ref.features is None:
            raise ValueError(f"--kid needs reference features, but {args.ref} holds only mu and sigma; use a "
                             "folder of reference images, or an .npz written with --save-features")
    weights = resolve("inception", args.weights, root=args.cache_dir)
    extractor = make_extractor(weights, device)
    feats = compute_features(args.images, pattern=args.pattern, batch_size=args.batch_size, device=device,
                             extractor=extractor)
    result: dict = {"images_dir": str(args.images), "pattern": args.pattern, "count": int(feats.shape[0])}
    if args.save_stats:
        mu, sigma = statistics_from_features(feats)
        save_statistics(args.save_stats, mu, sigma, feats if args.save_features else None)
        result["saved_stats"] = str(args.save_stats)
    if args.ref:
        if ref is None:
            ref = load_reference(args.ref, pattern=args.pattern, batch_size=args.batch_size, device=device,
                                 extractor=extractor)
        result["fid"] = fid_from_features(feats, ref.mu, ref.sigma, ref.features, method=args.method)
        result["kid_mean"], result["kid_std"] = (None, None)
        if args.kid:
            result["kid_mean"], result["kid_std"] = kernel_inception_distance(
                feats, ref.features, args.kid_subsets, args.kid_subset_size, args.seed)
        result["ref"] = str(args.ref)
        result["ref_count"] = ref.count
    result["metadata"] = {"duration": time.perf_counter() - start, "num_images": int(feats.shape[0]),
                          "batch_size": args.batch_size, "device": device, "head": "fid",
                          "weights": str(weights), "method": args.method}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output_json:
        write_json(args.output_json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m training.rewards.fid"))
