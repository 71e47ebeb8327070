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
    from backends.testing.random_init import save_random_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {model: save_random_pipeline(model, root / model, "tiny") for model in ("sd15", "sd3", "flux")}


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test (nothing may be downloaded)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """A random-weight FID Inception-v3 (built by pytorch_fid itself, He-scaled so features carry signal),
    saved under the weights manifest's file name."""
    import torchvision
    from pytorch_fid import inception as fid_inception

    from training.rewards import pretrained as weights

    built = {}
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(torchvision.models.inception.Inception3, "load_state_dict",
                   lambda self, *a, **k: built.setdefault("net", self))
        fid_inception.fid_inception_v3()
    finally:
        mp.undo()
    gen = torch.Generator().manual_seed(0)
    state = built["net"].state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if t.ndim > 1:
                t.copy_(noise * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("bn.weight"):
                t.copy_(1.0 + 0.1 * noise)
            else:
                t.copy_(0.1 * noise)
    path = tmp_path_factory.mktemp("fid") / weights.MANIFEST["inception"].path
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny networks (a second thread costs more in synchronisation than it
    gains, badly so on a busy 2-core machine); restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
