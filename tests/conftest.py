import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def gmm():
    from backends.analytic import make_analytic

    return make_analytic("gmm")


@pytest.fixture(scope="session")
def digits():
    from backends.analytic import make_analytic

    return make_analytic("digits")


# Nothing in the tests may reach the network (weights never download at run time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Tiny random-weight SD1.5 / SD3 / FLUX pipelines saved in diffusers format, once per session:
    ``{"sd15": Path, "sd3": Path, "flux": Path}`` (load them through the real loading code)."""
    from backends.random_init import save_random_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {model: save_random_pipeline(model, root / model, "tiny") for model in ("sd15", "sd3", "flux")}
