"""NVIDIA EDM pixel networks: the code-free pickle reader (against pickles shaped like NVIDIA's, written here with
an embedded module source that would exit if it ran), strict loading, the preconditioners against closed forms,
class-label routing in parallel EPD sampling, the authors' ICCV tables 00001-00012 on tiny random networks,
and the safetensors export with its CLI."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from backends import load_backend, options_from_table
from backends.edm import EDMBackend, class_labels_for_seeds
from tools.edm_cli import main as edm_cli
from backends.edm_checkpoint import (CheckpointError, load_edm, network_from_checkpoint,
                                     read_edm_pickle, save_edm)
from backends.edm_networks import PRECOND_CLASSES, DhariwalUNet, SongUNet, tiny_precond
from solvers.core import EvalCounter, repeat_condition, seeded_noise
from solvers.epd import sample_epd
from safeio import UnsafePickleError, globals_in_pickle
from solvers.table import PredictorTable, load_table
from tests.guards import forbid_code_execution

ROOT = Path(__file__).resolve().parents[1]
ICCV = ROOT.parent / "shared" / "official" / "iccv"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
EXECUTED = "raise SystemExit('the embedded module source was executed')\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- writing pickles shaped like NVIDIA's (torch_utils.persistence), without any persistence code ---------------
class _GlobalRef:
    """A global name written into the stream as is; nothing by that name exists in this process."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):   # pickle insists on a callable; the writer only records the name
        raise AssertionError("never called")


class _FakeAugmentPipe:
    """Stands in for EDM's persistent AugmentPipe (plain numbers, one numpy scalar)."""

    def __init__(self):
        self.p = np.float64(0.12)
        self.xflip = 1e8
        self.yflip = 1


_SHARED_INIT = {"init_mode": "xavier_uniform", "init_weight": np.float64(np.sqrt(0.2))}


class _PersistencePickler(pickle._Pickler):
    """Pickles our edm_networks modules the way torch_utils.persistence does: every custom module, nested layers
    included, becomes ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with its ``__dict__`` as the
    state; torch tensors and ``nn.ModuleDict`` use torch's own reductions."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_ref(self, obj: _GlobalRef) -> None:
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    dispatch[_GlobalRef] = _save_ref

    def reducer_override(self, obj):
        custom = isinstance(obj, torch.nn.Module) and type(obj).__module__ == "backends.edm_networks"
        if not (custom or isinstance(obj, _FakeAugmentPipe)):
            return NotImplemented
        state = dict(obj.__dict__)
        kwargs = state.pop("init_kwargs", {})
        if isinstance(obj, PRECOND_CLASSES.get(type(obj).__name__, ())):
            kwargs = {k: np.float64(v) if k == "dropout" else v for k, v in kwargs.items()}  # a numpy scalar
        if isinstance(obj, _FakeAugmentPipe):
            kwargs = {"p": np.float64(0.12), "xflip": 1e8}
        elif not kwargs:   # nested layers record theirs too; like the release's, with numpy scalars and shared dicts
            kwargs = {"skip_scale": np.float64(np.sqrt(0.5)), "init": _SHARED_INIT, "resample_filter": [1, 1]}
        state.update(_init_args=(), _init_kwargs=kwargs)
        class_name = "AugmentPipe" if isinstance(obj, _FakeAugmentPipe) else type(obj).__name__
        meta = {"type": "class", "version": 6, "module_src": EXECUTED, "class_name": class_name, "state": state}
        return _GlobalRef("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,)


def edm_pickle_bytes(net: torch.nn.Module) -> bytes:
    snapshot = {"ema": net, "loss_fn": None, "augment_pipe": _FakeAugmentPipe(),
                "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10.zip",
                                   "use_labels": False, "resolution": 32}}
    buffer = io.BytesIO()
    _PersistencePickler(buffer, protocol=4).dump(snapshot)
    return buffer.getvalue()


def read_guarded(path: Path, monkeypatch):
    """read_edm_pickle with exec/eval/compile/os.system/Popen and imports of the pickle's modules forbidden."""
    forbid_code_execution(monkeypatch, "network pickle")
    try:
        return read_edm_pickle(path)
    finally:
        monkeypatch.undo()


NETWORKS = {   # (precondition, architecture, label_dim, extra UNet kwargs): every released family, tiny
    "vp-ddpmpp": ("VPPrecond", "SongUNet", 0, {"augment_dim": 9}),
    "ve-ncsnpp": ("VEPrecond", "SongUNet", 0, {"embedding_type": "fourier", "encoder_type": "residual",
                                               "decoder_type": "skip", "resample_filter": [1, 3, 3, 1],
                                               "channel_mult_noise": 2}),
    "iddpm-adm": ("iDDPMPrecond", "DhariwalUNet", 0, {}),
    "edm-adm-cond": ("EDMPrecond", "DhariwalUNet", 5, {}),
}


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_reader_rebuilds_the_network_exactly_without_running_code(kind, tmp_path, monkeypatch):
    precond, arch, label_dim, extra = NETWORKS[kind]
    net = tiny_precond(precond, arch, img_resolution=8, label_dim=label_dim, seed=3, **extra)
    path = tmp_path / f"{kind}.pkl"
    path.write_bytes(edm_pickle_bytes(net))
    names = set(globals_in_pickle(path.read_bytes()))
    assert "torch_utils.persistence._reconstruct_persistent_obj" in names
    assert "torch.nn.modules.container.ModuleDict" in names and "numpy._core.multiarray.scalar" in names

    checkpoint = read_guarded(path, monkeypatch)
    assert "torch_utils" not in sys.modules
    assert checkpoint.class_name == precond and checkpoint.entries == ["ema", "loss_fn", "augment_pipe",
                                                                       "dataset_kwargs"]
    assert checkpoint.init_kwargs == net.init_kwargs and isinstance(checkpoint.init_kwargs["dropout"], float)
    assert set(checkpoint.state_dict) == set(net.state_dict())
    rebuilt = network_from_checkpoint(checkpoint)
    assert type(rebuilt) is type(net) and type(rebuilt.model) is type(net.model)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    sigma = torch.tensor([0.01, 1.3, 40.0])
    labels = torch.eye(label_dim)[[0, 3, 4]] if label_dim else None
    with torch.no_grad():
        assert torch.equal(rebuilt(x, sigma, labels), net(x, sigma, labels))


def test_released_key_layout():
    """The state-dict names and shapes the released pickles carry (a few from each architecture)."""
    with torch.device("meta"):   # shapes only, no memory
        song = SongUNet(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=[2, 2, 2],
                        augment_dim=9, num_blocks=4, attn_resolutions=[16])
        adm = DhariwalUNet(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000)
    keys = {k: tuple(v.shape) for k, v in song.state_dict().items()}
    assert keys["map_augment.weight"] == (128, 9) and keys["map_layer0.weight"] == (512, 128)
    assert keys["enc.32x32_conv.weight"] == (128, 3, 3, 3) and keys["enc.16x16_down.conv0.resample_filter"] == (1, 1, 2, 2)
    assert keys["enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1) and "enc.32x32_block0.qkv.weight" not in keys
    assert keys["dec.8x8_in0.proj.weight"] == (256, 256, 1, 1) and keys["dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert keys["dec.16x16_block4.qkv.weight"] == (768, 256, 1, 1) and "dec.16x16_block3.qkv.weight" not in keys
    assert sum(v.numel() for v in song.parameters()) == 55_733_891      # the EDM paper's DDPM++: 55.73M
    keys = {k: tuple(v.shape) for k, v in adm.state_dict().items()}
    assert keys["map_label.weight"] == (768, 1000) and "map_label.bias" not in keys
    assert keys["enc.32x32_down.skip.resample_filter"] == (1, 1, 2, 2) and "enc.32x32_down.skip.weight" not in keys
    assert keys["enc.8x8_block2.qkv.weight"] == (2304, 768, 1, 1) and keys["out_conv.weight"] == (3, 192, 3, 3)
    assert sum(v.numel() for v in adm.parameters()) == 295_899_267     # the EDM paper's ADM: 295.90M


def test_strict_loading_and_unknown_classes(tmp_path):
    net = tiny_precond("VPPrecond", img_resolution=8)
    path = tmp_path / "net.pkl"
    path.write_bytes(edm_pickle_bytes(net))
    checkpoint = read_edm_pickle(path)
    dropped = dict(checkpoint.state_dict)
    del dropped["model.enc.8x8_block0.conv1.weight"]
    checkpoint.state_dict = dropped
    with pytest.raises(CheckpointError, match=r"missing 1: model\.enc\.8x8_block0\.conv1\.weight"):
        network_from_checkpoint(checkpoint)
    checkpoint = read_edm_pickle(path)
    checkpoint.state_dict = {**checkpoint.state_dict, "model.extra": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.extra"):
        network_from_checkpoint(checkpoint)
    checkpoint = read_edm_pickle(path)
    checkpoint.state_dict = {**checkpoint.state_dict, "model.map_layer0.bias": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="map_layer0.bias has shape"):
        network_from_checkpoint(checkpoint)

    renamed = edm_pickle_bytes(net).replace(b"\x8c\tVPPrecond", b"\x8c\tXYPrecond")
    (tmp_path / "other.pkl").write_bytes(renamed)
    with pytest.raises(CheckpointError, match="'XYPrecond'.*VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond"):
        read_edm_pickle(tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match="no persistent network under 'ema'"):
        (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"ema": [1, 2]}))
        read_edm_pickle(tmp_path / "plain.pkl")


def test_unknown_globals_are_refused_before_anything_runs(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    evil = b"\x80\x04}\x8c\x03ema\x8c\x02os\x8c\x06system\x93\x8c\x0btouch pwned\x85R\x73."
    (tmp_path / "evil.pkl").write_bytes(evil)
    assert globals_in_pickle(evil) == ["os.system"]
    with pytest.raises(UnsafePickleError, match="os.system.*Nothing was executed"):
        read_edm_pickle(tmp_path / "evil.pkl")
    assert not called
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        (tmp_path / "eval.pkl").write_bytes(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.")
        load_edm(tmp_path / "eval.pkl")


# --- preconditioning against closed forms ----------------------------------------------------------------------------
SIGMAS = np.array([0.002, 0.05, 0.5, 1.0, 7.5, 80.0])


def _vp_time(s):
    beta_d, beta_min = 19.9, 0.1
    return (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(s ** 2)) - beta_min) / beta_d


def _iddpm_grid(M=1000, c1=0.001, c2=0.008):
    u = np.zeros(M + 1)
    alpha_bar = lambda j: np.sin(0.5 * np.pi * j / M / (c2 + 1)) ** 2   # noqa: E731
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), c1) - 1)
    return u


def _expected(kind: str, s: np.ndarray) -> tuple:
    if kind == "VPPrecond":
        return np.ones_like(s), -s, 1 / np.sqrt(1 + s ** 2), 999 * _vp_time(s)
    if kind == "VEPrecond":
        return np.ones_like(s), s, np.ones_like(s), np.log(s / 2)
    if kind == "iDDPMPrecond":
        u = _iddpm_grid()
        return np.ones_like(s), -s, 1 / np.sqrt(1 + s ** 2), 999 - np.abs(s[:, None] - u[None]).argmin(1)
    sd = 0.5
    return sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(s ** 2 + sd ** 2), np.log(s) / 4


class _Probe(torch.nn.Module):
    """Records what the preconditioner feeds the network and returns a fixed F."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.clone(), noise_labels.clone())
        return self.out


@pytest.mark.parametrize("kind", ["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond"])
def test_preconditioning_matches_the_edm_formulas(kind):
    net = tiny_precond(kind, img_resolution=8)
    s = torch.tensor(SIGMAS, dtype=torch.float32)
    got = [c.double().numpy() for c in net.preconditioning(s)]
    for name, g, e in zip(("c_skip", "c_out", "c_in", "c_noise"), got, _expected(kind, SIGMAS)):
        # c_noise of VP is computed in float32 like the release: sqrt(b^2 + ...) - b cancels at small sigma
        atol = 1e-3 if name == "c_noise" else 1e-6
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=atol, err_msg=f"{kind} {name}")

    # D = c_skip x + c_out F(c_in x, c_noise), with F's first img_channels channels
    x = torch.randn(len(SIGMAS), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    F = torch.randn(len(SIGMAS), 3 * net.output_factor, 8, 8, generator=torch.Generator().manual_seed(2))
    net.model = _Probe(F)
    D = net(x, s).double()
    c_skip, c_out, c_in, c_noise = (torch.tensor(np.asarray(e, dtype=np.float64)).view(-1, 1, 1, 1)
                                    for e in _expected(kind, SIGMAS))
    torch.testing.assert_close(D, c_skip * x.double() + c_out * F[:, :3].double(), rtol=3e-5, atol=1e-5)
    seen_x, seen_noise = net.model.seen
    torch.testing.assert_close(seen_x.double(), c_in * x.double(), rtol=3e-5, atol=1e-6)
    np.testing.assert_allclose(seen_noise.double().numpy(), c_noise.flatten().numpy(), rtol=2e-5, atol=1e-3)


def test_network_noise_ranges():
    vp = tiny_precond("VPPrecond")
    beta = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t * t + 0.1 * t) - 1)   # noqa: E731
    # float32 like the release: s(1e-5) rounds to 2^-10 (exact value 0.0010005)
    assert vp.sigma_min == pytest.approx(beta(1e-5), rel=3e-2) and vp.sigma_max == pytest.approx(beta(1.0), rel=1e-6)
    torch.testing.assert_close(vp.sigma(vp.sigma_inv(torch.tensor(SIGMAS))), torch.tensor(SIGMAS), rtol=1e-4, atol=0)
    iddpm = tiny_precond("iDDPMPrecond")
    u = _iddpm_grid()
    np.testing.assert_allclose(iddpm.u.double().numpy(), u, rtol=1e-3)      # float32 recursion, as released
    assert iddpm.sigma_min == pytest.approx(u[999], rel=1e-3) and iddpm.sigma_max == pytest.approx(u[0], rel=1e-4)
    assert float(iddpm.round_sigma(torch.tensor(float(u[500]) * 1.0001))) == pytest.approx(u[500], rel=1e-5)
    backend = EDMBackend(vp)
    # docs/authors-code.md §3.2 for the VP nets
    assert (backend.sigma_min, backend.sigma_max) == (0.002, 80.0)
    assert EDMBackend(iddpm).sigma_min == pytest.approx(u[999], rel=1e-3)            # clamped like edm_sampler
    assert EDMBackend(tiny_precond("VEPrecond")).sigma_min == pytest.approx(0.02)
    spec = backend.default_schedule(18)
    assert (spec.kind, spec.rho, spec.sigma_min, spec.sigma_max) == ("polynomial", 7.0, 0.002, 80.0)


# --- class labels through parallel EPD ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conditional_backend():
    return EDMBackend(tiny_precond("EDMPrecond", img_resolution=8, label_dim=4, seed=5))


def _table(num_steps=4, time_scales=True) -> PredictorTable:
    rows = num_steps - 1
    rng = np.random.default_rng(0)
    weights = rng.dirichlet([1.0, 1.0], size=rows)
    return PredictorTable(positions=rng.uniform(0.2, 0.8, (rows, 2)), weights=weights,
                          sigmas=np.geomspace(80.0, 0.002, num_steps), dir_scales=rng.uniform(0.95, 1.05, (rows, 2)),
                          time_scales=rng.uniform(0.9, 1.1, (rows, 2)) if time_scales else None, afs=True)


def test_class_labels_follow_their_images_through_parallel_points(conditional_backend):
    backend, table = conditional_backend, _table()
    noise = seeded_noise([0, 1, 2], backend.shape) * 80.0
    labels = torch.tensor([0, 2, 3])
    assert repeat_condition(labels, 2).tolist() == [0, 0, 2, 2, 3, 3]       # row b*K + k
    with torch.no_grad():
        parallel = sample_epd(backend, noise, table, labels, parallel=True)
        sequential = sample_epd(backend, noise, table, labels, parallel=False)
        one_by_one = torch.cat([sample_epd(backend, noise[i:i + 1], table, labels[i:i + 1]) for i in range(3)])
        swapped = sample_epd(backend, noise[[1, 0, 2]], table, labels[[1, 0, 2]], parallel=True)
        relabelled = sample_epd(backend, noise, table, torch.tensor([2, 0, 3]), parallel=True)
        one_hot = sample_epd(backend, noise, table, torch.eye(4)[labels], parallel=True)
    torch.testing.assert_close(parallel, sequential, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parallel, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped, parallel[[1, 0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_hot, parallel, rtol=1e-6, atol=1e-6)
    assert (relabelled[0] - parallel[0]).abs().max() > 1e-2                 # the label matters
    torch.testing.assert_close(relabelled[2], parallel[2], rtol=1e-5, atol=1e-5)


def test_conditions_labels_and_batching(conditional_backend):
    backend = conditional_backend
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.1, 10, 5)
    labels = torch.tensor([1, 0, 3, -1, 2])
    full = backend(x, sigma, labels)
    chunked = EDMBackend(backend.net, max_batch=2)(x, sigma, labels)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    rows = torch.zeros(5, 4)
    rows[[0, 1, 2, 4], [1, 0, 3, 2]] = 1                                     # -1: the zero label vector
    torch.testing.assert_close(backend(x, sigma, rows), full, rtol=0, atol=0)
    assert backend(x.double(), 2.0, labels).dtype == torch.float64
    with pytest.raises(ValueError, match="class-conditional"):
        backend(x, sigma, None)
    with pytest.raises(ValueError, match="5 labels for a batch of 4|got 5 labels"):
        backend(x[:4], sigma[:4], labels)
    with pytest.raises(ValueError, match="unconditional"):
        EDMBackend(tiny_precond("VPPrecond"))(x, sigma, labels)

    a = class_labels_for_seeds([3, 4, 5, 6], 1000, (3, 64, 64))
    assert a.tolist() == class_labels_for_seeds([5, 6, 3, 4], 1000, (3, 64, 64))[[2, 3, 0, 1]].tolist()
    assert len(set(class_labels_for_seeds(range(64), 1000, (3, 64, 64)).tolist())) > 55
    assert backend.encode_prompts(["", "2", ""], seeds=[7, 8, 9]).tolist() == \
        [int(class_labels_for_seeds([7], 4, backend.shape)[0]), 2, int(class_labels_for_seeds([9], 4, backend.shape)[0])]
    with pytest.raises(ValueError, match="not a label"):
        backend.encode_prompts(["a cat"], seeds=[0])
    assert EDMBackend(tiny_precond("VPPrecond")).encode_prompts(["", ""], seeds=[0, 1]) is None


# --- the authors' ICCV tables on tiny networks -----------------------------------------------------------------------
SPEC_GRIDS = {   # docs/authors-code.md §3.1: loss_fn.t_steps of the ICCV pickles, EDM range 0.002-80
    3: [80, 2.82371, 0.0020132], 4: [80, 6.95028, 1.28668, 0.0020132],
    5: [80, 11.7343, 2.82371, 0.856473, 0.0020132], 6: [80, 16.5063, 4.74637, 1.75413, 0.650225, 0.0020132],
}
DATASET_NETS = {"cifar10": (32, 0), "ffhq": (64, 0), "imagenet64": (64, 1000)}


def _iccv_tables() -> list:
    files = sorted(ICCV.glob("000[01][0-9]-*.pkl"))[:12] if ICCV.is_dir() else []
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"the authors' ICCV tables are not at {ICCV}"))]
    return [pytest.param(p, id=p.name.split("-epd")[0]) for p in files]


@pytest.fixture(scope="module")
def dataset_networks(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm-nets")
    paths = {}
    for dataset, (resolution, label_dim) in DATASET_NETS.items():
        precond, arch = ("EDMPrecond", "DhariwalUNet") if label_dim else ("VPPrecond", "SongUNet")
        extra = {"model_channels": 32, "attn_resolutions": []} if label_dim else {"channel_mult": [1, 1]}
        net = tiny_precond(precond, arch, img_resolution=resolution, label_dim=label_dim, **extra)
        paths[dataset] = save_edm(net, root / f"tiny-{dataset}.safetensors")
    return paths


@pytest.mark.parametrize("path", _iccv_tables())
def test_iccv_tables_sample_on_their_recorded_grid(path, dataset_networks, tmp_path):
    match = re.match(r"(\d{5})-(cifar10|ffhq|imagenet64)-(\d)-(\d)-epd-", path.name)
    assert match, path.name
    dataset, n, nfe = match[2], int(match[3]), int(match[4])
    table = load_table(path)
    assert table.metadata["backend"] == "edm" and table.metadata["backend_config"] == {"dataset": dataset}
    np.testing.assert_allclose(table.sigmas, SPEC_GRIDS[n], rtol=3e-5)   # the spec gives 5-6 digits
    assert table.num_steps == n and table.eval_count().sequential == nfe and table.afs

    options = options_from_table(table.metadata["backend"], table.metadata["backend_config"],
                                 table.metadata["guidance_rate"])
    backend = load_backend("edm", model_path=str(dataset_networks[dataset]), device="cpu", **options)
    resolution, label_dim = DATASET_NETS[dataset]
    assert backend.shape == (3, resolution, resolution) and backend.num_classes == label_dim
    noise = seeded_noise([0, 1], backend.shape)
    cond = backend.encode_prompts(["", ""], seeds=[0, 1])
    counter = EvalCounter(backend, 2)
    with torch.no_grad():
        x = sample_epd(counter, noise * float(table.sigmas[0]), table, cond)
    assert bool(torch.isfinite(x).all()) and counter.calls == nfe and counter.items == 2 * (n - 1) * 3 - 2

    if n == 3 or (dataset == "imagenet64" and n == 6):   # the CLI end to end (a few tables, for time)
        out = tmp_path / "out"
        assert sample.main(["--predictor_path", str(path), "--model_path", str(dataset_networks[dataset]),
                            "--seeds", "0-1", "--outdir", str(out), "--no-subdirs", "--device", "cpu"]) == 0
        meta = json.loads((out / "000001.json").read_text())
        assert meta["nfe"]["sequential"] == nfe and meta["backend"] == "edm"
        assert meta["sigmas"] == pytest.approx(list(table.sigmas))
        from PIL import Image

        assert Image.open(out / "000001.png").size == (resolution, resolution)     # native size, for FID
        if label_dim:
            assert meta["class_label"] == int(cond[1])


# --- loading, export, CLI --------------------------------------------------------------------------------------
def test_safetensors_round_trip_and_convert_cli(tmp_path):
    net = tiny_precond("EDMPrecond", "DhariwalUNet", img_resolution=8, label_dim=3, seed=9)
    pkl = tmp_path / "edm-tiny.pkl"
    pkl.write_bytes(edm_pickle_bytes(net))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, labels = torch.tensor([0.3, 9.0]), torch.eye(3)[[2, 0]]
    expected = net(x, sigma, labels)

    out = tmp_path / "edm-tiny.safetensors"
    assert edm_cli(["convert", str(pkl), str(out)]) == 0
    assert edm_cli(["convert", str(pkl), str(tmp_path / "edm.bin")]) == 2          # a user error: one line, exit 2
    assert edm_cli(["show", str(tmp_path / "missing.safetensors")]) == 2
    assert out.read_bytes()[8:].lstrip().startswith(b"{")                  # safetensors, not a pickle
    loaded, config = load_edm(out)
    assert config["class_name"] == "EDMPrecond" and config["init_kwargs"] == net.init_kwargs
    assert config["source"]["path"] == "edm-tiny.pkl" and len(config["source"]["sha256"]) == 64
    assert torch.equal(loaded(x, sigma, labels), expected)

    direct = save_edm(net, tmp_path / "direct.safetensors")
    assert torch.equal(load_edm(direct)[0](x, sigma, labels), expected)
    with pytest.raises(CheckpointError, match="not an EDM network written by save_edm"):
        from safetensors.torch import save_file

        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_edm(tmp_path / "other.safetensors")

    proc = subprocess.run([PYTHON, "-m", "backends.edm_checkpoint", "show", str(pkl)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["class_name"] == "EDMPrecond" and shown["init_kwargs"]["label_dim"] == 3


def test_backend_loading_options_and_errors(tmp_path, monkeypatch, dataset_networks, capsys):
    monkeypatch.chdir(tmp_path)                       # no weights/edm here
    monkeypatch.delenv("EDM_CIFAR10_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match=r"weights/edm/edm-cifar10-32x32-uncond-vp\.safetensors.*"
                                                 r"edm-cifar10-32x32-uncond-vp\.pkl, published by NVIDIA"):
        load_backend("cifar10")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pkl.*\$EDM_CIFAR10_PATH"):
        load_backend("edm", dataset="cifar10", model_path=str(tmp_path / "nowhere.pkl"))
    monkeypatch.setenv("EDM_CIFAR10_PATH", str(dataset_networks["cifar10"]))
    backend = load_backend("cifar10", device="cpu", dtype="float16")
    assert backend.dataset == "cifar10" and backend.net.use_fp16 and backend.dtype == torch.float32   # fp16: CUDA only
    assert backend.describe()["file_sha256"] and backend.config() == {"dataset": "cifar10"}
    with pytest.raises(ValueError, match="needs 64x64x3 with 0 classes"):
        load_backend("ffhq", model_path=str(dataset_networks["cifar10"]), device="cpu")
    with pytest.raises(ValueError, match="resolution 64"):
        load_backend("edm", model_path=str(dataset_networks["cifar10"]), resolution=64)
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        load_backend("edm", model_path=str(dataset_networks["cifar10"]), guidance=2.0)
    # lsun_ldm has a backend now (tests/test_lsun_ldm.py); without its file it names the file and the release
    monkeypatch.delenv("LSUN_LDM_MODEL_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="lsun_bedrooms.zip"):
        load_backend("lsun_ldm", model_path=str(tmp_path / "model.ckpt"))
    with pytest.raises(FileNotFoundError, match="model.ckpt"):
        load_backend("lsun_bedroom_ldm", model_path=str(tmp_path / "model.ckpt"))
    # the weights folder convention: a converted copy under weights/edm/ is found without any flag
    monkeypatch.delenv("EDM_CIFAR10_PATH")
    (tmp_path / "weights" / "edm").mkdir(parents=True)
    (tmp_path / "weights" / "edm" / "edm-cifar10-32x32-uncond-vp.safetensors").write_bytes(
        dataset_networks["cifar10"].read_bytes())
    assert load_backend("cifar10", device="cpu").shape == (3, 32, 32)
    argv = ["--backend", "cifar10", "--solver", "heun", "--steps", "2", "--seeds", "0-1", "--device", "cpu",
            "--outdir", str(tmp_path / "s"), "--no-subdirs"]
    assert sample.main(argv) == 0                                        # a baseline on the default grid
    meta = json.loads((tmp_path / "s" / "000001.json").read_text())
    assert meta["backend_config"] == {"dataset": "cifar10"} and meta["sigmas"][0] == 80.0
    assert meta["sigmas"][-1] == pytest.approx(0.002) and meta["nfe"]["sequential"] == 4   # 2 Heun steps
    capsys.readouterr()
    assert sample.main(argv[:-3] + ["--outdir", str(tmp_path / "c"), "--class", "3"]) == 2
    assert "--class 3: the edm model is unconditional" in capsys.readouterr().err
    # a bad condition stops before any sampling, with exit code 2 (not a traceback from inside the loop)
    assert sample.main(argv[:-3] + ["--outdir", str(tmp_path / "p"), "--prompt", "a cat"]) == 2
    assert "unconditional; it takes no prompt" in capsys.readouterr().err and not (tmp_path / "p").exists()
