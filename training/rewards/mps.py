"""MPS (multi-dimensional human preference score) reward head: tensor-only weights, never a pickled model.

The authors load ``MPS_overall_checkpoint.pth`` with ``torch.load(..., weights_only=False)``: the file is a whole
pickled model, so loading it runs code stored in the file (spec 8.5, 9.18). This module refuses such files. It
reads only a tensor-only state dict, made **once**, in a trusted and isolated environment (a throw-away
container or VM with the MPS code on the path and no credentials), from the published checkpoint::

    import torch
    m = torch.load("MPS_overall_checkpoint.pth", map_location="cpu", weights_only=False)  # runs the pickle
    torch.save(m.state_dict(), "MPS_overall_state_dict.pt")

and copied to ``weights/MPS_overall_state_dict.pt`` (or ``$MPS_MODEL_PATH``). The head ``mps`` validates that
file with ``torch.load(weights_only=True)``. Building the MPS architecture (CLIP ViT-H-14 with the condition
cross-model, 22 fixed aspects, text-to-condition mask at 0.3, score = logit_scale * cos) is not implemented yet:
after validation the factory raises NotImplementedError.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from training.rewards.registry import register_reward

__all__ = ["PickledModelError", "refuse_pickled_model", "load_mps_state_dict", "CONVERSION_HELP"]

CONVERSION_HELP = (
    "Convert it once, in a trusted isolated environment with the MPS code importable: "
    "m = torch.load('MPS_overall_checkpoint.pth', map_location='cpu', weights_only=False); "
    "torch.save(m.state_dict(), 'MPS_overall_state_dict.pt'); then put MPS_overall_state_dict.pt under weights/ "
    "(or set $MPS_MODEL_PATH). See training/rewards/mps.py.")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PickledModelError(ValueError):
    """The file holds pickled objects other than tensors (a whole model): loading it would run code."""


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the non-allow-listed globals in a checkpoint, read without unpickling (torch >= 2.5)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return list(finder(str(path)))
    except Exception:  # not a zip checkpoint (legacy format): the load error below still says why
        return []


def refuse_pickled_model(path: str | os.PathLike) -> Any:
    """Load ``path`` with ``torch.load(weights_only=True)`` (safe: no code runs) and return the object.

    A file that needs other globals (a pickled ``nn.Module``, like ``MPS_overall_checkpoint.pth``) raises
    :class:`PickledModelError` naming the offending globals and the one-time conversion.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        names = _unsafe_globals(path)
        if names:
            found = f" (it pickles {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
        else:
            reason = _ANSI.sub("", str(err)).strip().splitlines()
            found = f" ({type(err).__name__}: {reason[0][:200] if reason else ''})"
        raise PickledModelError(
            f"{path} is not a tensor-only checkpoint{found}. A pickled model is refused: loading it would run code "
            f"stored in the file. {CONVERSION_HELP}") from None


def load_mps_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The converted MPS state dict (``{name: tensor}``, or wrapped in ``{"state_dict": ...}``), validated."""
    obj = refuse_pickled_model(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise PickledModelError(f"{path} holds {type(obj).__name__}, not a state dict of tensors. {CONVERSION_HELP}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise PickledModelError(f"{path}: entries {', '.join(bad[:5])} are not named tensors; expected "
                                f"model.state_dict(). {CONVERSION_HELP}")
    return dict(obj)


@register_reward("mps")
def _make_mps(weights_path: str | os.PathLike | None = None, processor_path: str | os.PathLike | None = None,
              device: str | torch.device | None = None, root: str | os.PathLike | None = None) -> Any:
    """Validate the converted weights, then stop: the MPS network is not implemented yet."""
    from training.rewards.weights import resolve      # at call time: `python -m training.rewards.weights` stays clean

    path = resolve("mps", weights_path, root=root)
    state = load_mps_state_dict(path)
    raise NotImplementedError(
        f"MPS: {path} is a valid tensor-only state dict ({len(state)} tensors), but the MPS architecture is not "
        "yet implemented in this repository, so the mps head cannot score images.")
