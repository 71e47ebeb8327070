"""The manifest of pretrained files: every weights file or folder a reward head or feature model reads (where
it is expected, what uses it, where to get it), in one place.

    python -m training.rewards.pretrained check [--root weights] [--verify]  # table of present / missing files
    python -m training.rewards.pretrained present hps pickscore mps  # prints the heads whose files are all there
    python -m training.rewards.pretrained where pickscore            # the files a head needs and where to get them

Nothing here downloads anything. Each entry names its default path under the weights root (``--root``, else
``$EPD_WEIGHTS_DIR``, else ``weights``), the heads that use it, where to obtain it, and an environment variable
that overrides its path. :func:`resolve` gives the path to use (explicit override, then the variable, then the
default) or raises :class:`FileNotFoundError` with one message naming the file, the head and the source.

Sizes and sha256 sums are recorded only where they are known reliably; they are ``None`` otherwise (the FID
Inception file carries the first 8 hex digits of its sha256 in its name, the torch.hub convention, and
``--verify`` checks that prefix). This module uses the standard library only, so the shell pipeline can run it
as ``python training/rewards/pretrained.py`` without importing torch. (``training/rewards/weights.py`` is
the old name of this module, kept as a deprecated alias for the shell scripts and users that call it.)
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from safeio.cli import ArgumentParser, entry_point

__all__ = ["WeightFile", "MANIFEST", "HEAD_FILES", "ROOT_ENV", "DEFAULT_ROOT", "weights_root", "entry",
           "resolve", "is_present", "head_entries", "missing_for_head", "path_size", "sha256_of", "check_rows",
           "main"]

ROOT_ENV = "EPD_WEIGHTS_DIR"
DEFAULT_ROOT = "weights"


@dataclass(frozen=True)
class WeightFile:
    """One expected file (or folder) of pretrained weights."""

    name: str                      # manifest key
    path: str                      # default location relative to the weights root
    used_by: tuple[str, ...]       # heads / metrics that read it
    description: str
    source: str                    # URL, or a Hugging Face repo (and file)
    env: str                       # environment variable overriding the path
    is_dir: bool = False
    marker: str | None = None      # for folders: a file that must exist inside
    size: int | None = None        # bytes, where known reliably
    sha256: str | None = None      # full digest, where known reliably
    sha256_prefix: str | None = None
    note: str = ""

    def default_path(self, root: str | os.PathLike | None = None) -> Path:
        """``<root>/<path>`` (root: argument, else ``$EPD_WEIGHTS_DIR``, else ``weights``)."""
        return weights_root(root) / self.path


_HF = "https://huggingface.co/"

MANIFEST: dict[str, WeightFile] = {w.name: w for w in (
    WeightFile("hps_v2.1", "HPS_v2.1_compressed.pt", ("hps", "hpsv21"),
               "HPSv2.1 (OpenCLIP ViT-H-14 fine-tuned on HPD v2), full state dict",
               _HF + "xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt", "HPS_MODEL_PATH"),
    WeightFile("hps_v2", "HPS_v2_compressed.pt", ("hpsv2",),
               "HPSv2.0 (OpenCLIP ViT-H-14), full state dict",
               _HF + "xswu/HPSv2/resolve/main/HPS_v2_compressed.pt", "HPSV2_MODEL_PATH"),
    WeightFile("pickscore", "PickScore_v1", ("pickscore",),
               "PickScore v1 model folder (transformers CLIPModel)",
               _HF + "yuvalkirstain/PickScore_v1 (whole repository)", "PICKSCORE_MODEL_PATH",
               is_dir=True, marker="config.json"),
    WeightFile("clip_vit_h14_processor", "CLIP-ViT-H-14-laion2B-s32B-b79K", ("pickscore", "mps"),
               "CLIP ViT-H-14 processor and tokenizer folder (the model weights in it are not needed)",
               _HF + "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (preprocessor_config.json and tokenizer files)",
               "PICKSCORE_PROCESSOR_PATH", is_dir=True, marker="preprocessor_config.json"),
    WeightFile("imagereward", "ImageReward/ImageReward.pt", ("imagereward",),
               "ImageReward v1.0 (BLIP + MLP) state dict",
               _HF + "THUDM/ImageReward/resolve/main/ImageReward.pt", "IMAGEREWARD_MODEL_PATH"),
    WeightFile("bert_base_uncased", "bert-base-uncased", ("imagereward",),
               "BERT tokenizer folder for ImageReward's text encoder",
               _HF + "google-bert/bert-base-uncased (vocab.txt, tokenizer_config.json, config.json)",
               "IMAGEREWARD_TOKENIZER_PATH", is_dir=True, marker="vocab.txt"),
    WeightFile("clip_vit_l14", "clip-vit-large-patch14", ("clip", "aesthetic"),
               "OpenAI CLIP ViT-L/14 folder (transformers CLIPModel + processor)",
               _HF + "openai/clip-vit-large-patch14 (whole repository)", "CLIP_MODEL_PATH",
               is_dir=True, marker="config.json"),
    WeightFile("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", ("aesthetic",),
               "LAION improved aesthetic predictor v2 (MLP on CLIP ViT-L/14 image embeddings)",
               "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
               "sac+logos+ava1-l14-linearMSE.pth", "AESTHETIC_MODEL_PATH"),
    WeightFile("inception", "pt_inception-2015-12-05-6726825d.pth", ("fid",),
               "FID Inception-v3 (pytorch-fid's port of TF inception-2015-12-05)",
               "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth", "FID_INCEPTION_PATH", sha256_prefix="6726825d"),
    WeightFile("mps", "MPS_overall_state_dict.pt", ("mps",),
               "MPS (multi-dimensional preference score), tensors only: converted once from the pickled model",
               "https://github.com/Kwai-Kolors/MPS (MPS_overall_checkpoint.pth, linked from its README), converted "
               "once to a state dict as training/rewards/mps.py explains", "MPS_MODEL_PATH",
               note="the published checkpoint is a pickled model and is never loaded here; the mps head also needs "
                    "the CLIP ViT-H-14 processor folder (clip_vit_h14_processor)"),
)}

# For each head: (manifest entry, head option it is passed as). The first one is the head's main file
# (``--weights`` / ``weights_path``); the others are passed only if the head's factory takes that option.
HEAD_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "hps": (("hps_v2.1", "weights_path"),),
    "hpsv21": (("hps_v2.1", "weights_path"),),
    "hpsv2": (("hps_v2", "weights_path"),),
    "pickscore": (("pickscore", "weights_path"), ("clip_vit_h14_processor", "processor_path")),
    "imagereward": (("imagereward", "weights_path"), ("bert_base_uncased", "tokenizer_path")),
    "clip": (("clip_vit_l14", "weights_path"),),
    "aesthetic": (("aesthetic", "weights_path"), ("clip_vit_l14", "clip_path")),
    "mps": (("mps", "weights_path"), ("clip_vit_h14_processor", "processor_path")),
    "fid": (("inception", "weights_path"),),
}


def weights_root(root: str | os.PathLike | None = None) -> Path:
    """The weights root: ``root``, else ``$EPD_WEIGHTS_DIR``, else ``weights`` (relative to the working dir)."""
    return Path(root if root is not None else (os.environ.get(ROOT_ENV) or DEFAULT_ROOT))


def entry(name: str) -> WeightFile:
    """The manifest entry ``name``; an unknown name is a KeyError listing the known ones."""
    try:
        return MANIFEST[name]
    except KeyError:
        raise KeyError(f"no weights entry {name!r}; known: {', '.join(MANIFEST)}") from None


def is_present(item: WeightFile, path: Path) -> bool:
    """A file that exists, or a folder that exists and holds its marker file."""
    if item.is_dir:
        return path.is_dir() and (item.marker is None or (path / item.marker).is_file())
    return path.is_file()


def _candidate(item: WeightFile, override: str | os.PathLike | None, root: str | os.PathLike | None) -> tuple[Path, str]:
    if override is not None and str(override) != "":
        return Path(override), "given path"
    env = os.environ.get(item.env)
    if env:
        return Path(env), f"${item.env}"
    return item.default_path(root), "default location"


def resolve(name: str, override: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> Path:
    """The path of weights ``name``: ``override``, else ``$<env>``, else ``<root>/<default path>``.

    Raises FileNotFoundError (one message: the file, the heads that need it, where to get it, how to point to it).
    """
    item = entry(name)
    path, how = _candidate(item, override, root)
    if is_present(item, path):
        return path
    kind = "folder" if item.is_dir else "file"
    inside = f" containing {item.marker}" if item.is_dir and item.marker else ""
    raise FileNotFoundError(
        f"{item.description}: {kind} {path}{inside} not found ({how}); needed by {', '.join(item.used_by)}. "
        f"Get it from {item.source} and put it at {item.default_path(root)}, or set ${item.env}"
        f"{' (' + item.note + ')' if item.note else ''}. Nothing is downloaded at run time.")


def head_entries(head: str) -> tuple[tuple[str, str], ...]:
    """``(entry name, option name)`` pairs of a head (empty for heads that need no files)."""
    return HEAD_FILES.get(head, ())


def missing_for_head(head: str, root: str | os.PathLike | None = None) -> list[str]:
    """Error messages of the files ``head`` needs that are missing (empty when all are present)."""
    out = []
    for name, _ in head_entries(head):
        try:
            resolve(name, root=root)
        except FileNotFoundError as err:
            out.append(str(err))
    return out


def path_size(path: Path) -> int:
    """Bytes of a file, or of all files under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_rows(root: str | os.PathLike | None = None, verify: bool = False) -> list[dict]:
    """One row per manifest entry: name, path, status (present / missing), size, checksum status, used_by."""
    rows = []
    for item in MANIFEST.values():
        path, how = _candidate(item, None, root)
        present = is_present(item, path)
        row = {"name": item.name, "path": str(path), "from": how, "status": "present" if present else "missing",
               "size": path_size(path) if present else None, "expected_size": item.size,
               "checksum": "-", "used_by": list(item.used_by), "source": item.source}
        if present and verify and not item.is_dir and (item.sha256 or item.sha256_prefix):
            digest = sha256_of(path)
            want = item.sha256 or item.sha256_prefix
            row["checksum"] = "ok" if digest.startswith(want) else f"MISMATCH ({digest[:16]}...)"
        elif present and verify:
            row["checksum"] = "unknown"
        rows.append(row)
    return rows


def _print_table(rows: Sequence[dict], out=None) -> None:
    out = out or sys.stdout
    header = ("name", "status", "size", "checksum", "used by", "path")
    table = [(r["name"], r["status"], _human(r["size"]), r["checksum"], ",".join(r["used_by"]), r["path"])
             for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), file=out)
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip(), file=out)
    missing = [r for r in rows if r["status"] == "missing"]
    print(f"{len(rows) - len(missing)} of {len(rows)} present", file=out)
    for r in missing:
        print(f"  {r['name']}: get it from {r['source']}", file=out)


@entry_point
def main(argv: Iterable[str] | None = None) -> int:
    """``check`` (table, exit 0; 1 only on a checksum mismatch), ``present HEAD...``, ``where HEAD``."""
    parser = ArgumentParser(prog="python -m training.rewards.pretrained", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="list every expected file, present or missing")
    p_check.add_argument("--root", help=f"weights root (default ${ROOT_ENV} or {DEFAULT_ROOT})")
    p_check.add_argument("--verify", action="store_true", help="compute sha256 where the expected value is known")
    p_present = sub.add_parser("present", help="print the given heads whose files are all present (one a line); "
                                               "one message on stderr for each other head")
    p_present.add_argument("heads", nargs="+")
    p_present.add_argument("--root")
    p_where = sub.add_parser("where", help="the files a head needs")
    p_where.add_argument("head")
    p_where.add_argument("--root")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.command == "check":
        rows = check_rows(args.root, args.verify)
        print(f"weights root: {weights_root(args.root)}")
        _print_table(rows)
        return 1 if any(r["checksum"].startswith("MISMATCH") for r in rows) else 0
    if args.command == "present":
        for head in args.heads:
            absent = []
            for name, _ in head_entries(head):
                item = MANIFEST[name]
                path, how = _candidate(item, None, args.root)
                if not is_present(item, path):
                    absent.append(f"{path} ({how}; from {item.source}; or set ${item.env})")
            if absent:
                print(f"skip {head}: missing {'; '.join(absent)}", file=sys.stderr)
            else:
                print(head)
        return 0
    items = head_entries(args.head)
    if not items:
        from training.rewards.registry import available_rewards

        if args.head not in available_rewards():
            raise ValueError(f"unknown head {args.head!r}; heads with files: {', '.join(sorted(HEAD_FILES))}")
        print(f"{args.head}: no weights files in the manifest (an offline head)")
    for name, option in items:
        item = MANIFEST[name]
        path, how = _candidate(item, None, args.root)
        state = "present" if is_present(item, path) else "missing"
        print(f"{args.head}.{option}: {path} ({how}, {state}); source {item.source}; override ${item.env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
