"""Predictor tables (docs/authors-code.md §2): the authors' 43 released tables read without executing code, exact
effective values, malicious pickles refused with no side effect, data-only round trips, validation messages, the CLI."""

import collections
import dataclasses
import hashlib
import json
import os
import pickle
import pickletools
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import solvers.official as official
from safeio import UnsafePickleError, globals_in_pickle
from solvers.official import read_official
from solvers.schedules import ScheduleSpec, flowmatch_sigmas
from tools.table_cli import main
from solvers.table import (FORMAT, PredictorTable, TableError, load_table, save_table, table_from_official,
                           uniform_table)
from tests.guards import forbid_code_execution

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "official"
HAVE_OFFICIAL = (OFFICIAL / "expected.json").is_file()
SKIP_REASON = (f"the authors' released tables are not at {OFFICIAL} (CI keeps shared/official/ beside the clone; "
               "copy it there to run these tests)")
needs_official = pytest.mark.skipif(not HAVE_OFFICIAL, reason=SKIP_REASON)
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def _official_files() -> list:
    if not HAVE_OFFICIAL:
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON), id="official-missing")]
    files = sorted(OFFICIAL.glob("tpami/*.pkl")) + sorted(OFFICIAL.glob("iccv/*.pkl"))
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in files]


def _expected() -> dict:
    return json.loads((OFFICIAL / "expected.json").read_text()) if HAVE_OFFICIAL else {}


def _expected_params() -> list:
    if not HAVE_OFFICIAL:
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON), id="official-missing")]
    return [pytest.param(name, id=name) for name in sorted(_expected())]


# --- hand-assembled pickles (nothing in them is ever imported or called by the test itself) ---------------------
def _frag(obj) -> bytes:
    """Opcodes that push ``obj`` (plain data only), without PROTO header or STOP."""
    body = pickletools.optimize(pickle.dumps(obj, protocol=3))
    assert globals_in_pickle(body) == []
    return body[2:-1]


def _call(module: str, name: str, *args: bytes) -> bytes:
    """Opcodes for ``module.name(*args)``: GLOBAL, MARK, args, TUPLE, REDUCE."""
    return b"c%s\n%s\n(" % (module.encode(), name.encode()) + b"".join(args) + b"tR"


def _dict(items: dict) -> bytes:
    """Opcodes for a dict whose values are opcode fragments (bytes) or plain data."""
    body = b"".join(_frag(k) + (v if isinstance(v, bytes) else _frag(v)) for k, v in items.items())
    return b"}(" + body + b"u"


def _pickle(fragment: bytes) -> bytes:
    return b"\x80\x03" + fragment + b"."


def _storage(values, dtype=np.float32) -> bytes:
    """``torch.storage._load_from_bytes(<legacy torch.save stream of one float32 storage>)``."""
    values = np.asarray(values, dtype=dtype).ravel()
    persid = _pickle(b"(" + _frag("storage") + b"ctorch\nFloatStorage\n" + _frag("0") + _frag("cpu")
                     + _frag(int(values.size)) + b"tQ")
    stream = (pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2) + persid
              + pickle.dumps(["0"], 2) + struct.pack("<q", values.size) + values.astype("<f4").tobytes())
    return _call("torch.storage", "_load_from_bytes", _frag(stream))


def _tensor(values, size=None, stride=None, offset=0) -> bytes:
    arr = np.asarray(values, dtype=np.float32)
    size = arr.shape if size is None else size
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    return _call("torch._utils", "_rebuild_tensor_v2", _storage(arr), _frag(offset), _frag(tuple(size)),
                 _frag(tuple(stride)), _frag(False), _call("collections", "OrderedDict"))


def _predictor(state: dict, module_src: str = "class EPD_predictor: pass\n") -> bytes:
    meta = _dict({"type": "class", "version": 6, "module_src": module_src, "class_name": "EPD_predictor",
                  "state": _dict(state)})
    return _call("torch_utils.persistence", "_reconstruct_persistent_obj", meta)


def _fake_state(extra: dict | None = None) -> dict:
    rng = np.random.default_rng(0)
    params = _dict({"r_params": _tensor(rng.normal(size=(3, 2))), "weight_s": _tensor(rng.normal(size=(3, 2))),
                    "scale_dir_params": _tensor(np.zeros((3, 2))), "scale_time_params": _tensor(np.zeros((3, 2)))})
    kwargs = {"num_steps": 4, "num_points": 2, "sampler_stu": "epd", "schedule_type": "polynomial",
              "schedule_rho": 7.0, "scale_dir": 0.0, "scale_time": 0.0, "afs": False, "backend": "edm"}
    return {"_init_kwargs": kwargs, "_parameters": params, "sigma_min": 0.002, "sigma_max": 80.0, **(extra or {})}


# --- 1. all official files load, and nothing runs -----------------------------------------------------------------
@needs_official
def test_the_release_has_43_tables():
    assert len(list(OFFICIAL.glob("tpami/*.pkl"))) == 11
    assert len(list(OFFICIAL.glob("iccv/*.pkl"))) == 32


@pytest.mark.parametrize("path", _official_files())
def test_official_table_loads_without_running_code(path, monkeypatch):
    raw = path.read_bytes()
    names = {g for g in globals_in_pickle(raw)}
    assert names, "an authors' file must reference their persistence globals"
    assert names <= {f"{m}.{n}" for m, n in official._ALLOWED}, names

    asked = []
    real_find_class = official._OfficialUnpickler.find_class

    def spy(self, module, name):
        asked.append((module, name))
        return real_find_class(self, module, name)

    monkeypatch.setattr(official._OfficialUnpickler, "find_class", spy)
    forbid_code_execution(monkeypatch, "table")
    try:
        table = load_table(path)
        snap = read_official(path)
    finally:
        monkeypatch.undo()  # before pytest itself needs compile/import to report

    assert asked and all(key in official._ALLOWED for key in asked)
    assert "torch_utils" not in sys.modules
    # the embedded source is kept as inert text only
    assert isinstance(snap.predictor.module_src, str) and "EPD_predictor" in snap.predictor.module_src
    assert snap.predictor.class_name == "EPD_predictor"

    kwargs = snap.init_kwargs
    n, k = int(kwargs["num_steps"]), int(kwargs["num_points"])
    assert isinstance(table, PredictorTable)
    assert (table.num_steps, table.num_points) == (n, k)
    assert table.positions.shape == table.weights.shape == (n - 1, k)
    assert table.sigmas.shape == (n,)
    assert table.solver == kwargs["sampler_stu"] and table.afs == bool(kwargs["afs"])
    assert np.all((table.positions > 0) & (table.positions < 1))
    np.testing.assert_allclose(table.weights.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.diff(table.sigmas) < 0) and table.sigmas[-1] > 0
    for scales, flag in ((table.dir_scales, kwargs["scale_dir"]), (table.time_scales, kwargs["scale_time"])):
        if flag:
            assert scales.shape == (n - 1, k) and np.all(np.abs(scales - 1) <= flag)
        else:
            assert scales is None
    assert table.metadata["sha256"] == hashlib.sha256(raw).hexdigest()
    assert not table.positions.flags.writeable and not table.weights.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.solver = "ipndm"

    if path.parent.name == "iccv":  # 00002-cifar10-4-5-epd-uni1.0-afs: dataset, N, sequential NFE, solver
        match = re.match(r"\d+-(.+)-(\d+)-(\d+)-(epd|ipndm)-uni1\.0-afs\.pkl$", path.name)
        assert match, path.name
        assert table.num_steps == int(match[2])
        assert table.eval_count().sequential == int(match[3])
        assert table.solver == match[4] and table.afs
        assert table.metadata["grid_source"].startswith("loss_fn.t_steps")
        np.testing.assert_array_equal(table.sigmas, snap.t_steps)
        if table.solver == "ipndm":
            assert table.max_order == int(kwargs["max_order"])
    else:
        assert table.num_steps == (9 if path.name.startswith("flux") else 11)


# --- 2. exact values for the five files of expected.json ----------------------------------------------------------
@pytest.mark.parametrize("name", _expected_params())
def test_official_effective_values_match_expected(name):
    exp = _expected()[name]
    path = OFFICIAL / name
    eff = exp["effective"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == exp["sha256"]
    table = load_table(path)
    snap = read_official(path)
    assert table.metadata["sha256"] == exp["sha256"] == snap.sha256
    assert table.metadata["init_kwargs"] == exp["init_kwargs"]
    assert snap.init_kwargs == exp["init_kwargs"]
    assert (table.num_steps, table.num_points) == (exp["num_steps"], exp["num_points"])

    np.testing.assert_allclose(table.positions, eff["r"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(table.weights, eff["weights"], rtol=0, atol=1e-12)
    for got, key in ((table.dir_scales, "scale_dir"), (table.time_scales, "scale_time")):
        if eff[key] is None:
            assert got is None, f"{key} is disabled (flag 0) but the table has scales"
            assert not exp["init_kwargs"][key]
        else:
            np.testing.assert_allclose(got, eff[key], rtol=0, atol=1e-12)

    grid = eff.get("implied_t_steps") or eff.get("t_steps_from_loss_fn")
    assert grid is not None
    np.testing.assert_allclose(table.sigmas, grid, rtol=1e-6, atol=0)
    # expected.json derives the SD1.5 grid by a float64 emulation; ours is the authors' float32 grid
    # (tests/test_schedules.py checks that one exactly), so points derived from it agree to float32 precision only.
    float64_emulation = "float64 emulation" in str(eff.get("implied_t_steps_source", ""))
    np.testing.assert_allclose(table.intermediate_sigmas, eff["t_mid_unscaled"],
                               rtol=1e-6 if float64_emulation else 1e-9, atol=0)
    if "t_mid_fed_to_network" in eff:
        np.testing.assert_allclose(table.intermediate_sigmas * table.time_scales, eff["t_mid_fed_to_network"],
                                   rtol=1e-9, atol=0)

    params = snap.parameters
    assert set(params) == set(exp["raw_params"])
    for key, values in exp["raw_params"].items():
        np.testing.assert_array_equal(params[key], np.asarray(values, dtype=params[key].dtype), err_msg=key)
    # table_from_official on the snapshot is what load_table returns
    again = table_from_official(snap)
    np.testing.assert_array_equal(again.positions, table.positions)
    np.testing.assert_array_equal(again.sigmas, table.sigmas)


# --- 3. malicious pickles -----------------------------------------------------------------------------------------
class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_cases(sentinel: Path) -> dict:
    touch = f"touch {sentinel}"
    shell_global = f"{os.system.__module__}.system"          # posix.system on Linux
    return {
        "reduce-os.system": (pickle.dumps(_Reduce(os.system, touch)), shell_global),
        "authors-shaped": (pickle.dumps({"model": _Reduce(os.system, touch)}, protocol=4), shell_global),
        "builtins.eval": (pickle.dumps(_Reduce(eval, f"__import__('os').system({touch!r})")), "builtins.eval"),
        "subprocess.Popen": (pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(sentinel)])), "subprocess.Popen"),
        "opcodes-os.system": (b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR.", "os.system"),
        "hidden-in-record-state": (_pickle(_dict({"model": _predictor(
            _fake_state({"payload": _call("os", "system", _frag(touch))}))})), "os.system"),
        "hidden-in-loss-fn": (_pickle(_dict({"model": _predictor(_fake_state()),
                                             "loss_fn": _call("builtins", "exec", _frag(
                                                 f"open({str(sentinel)!r}, 'w').close()"))})), "builtins.exec"),
        "inside-storage-stream": (_pickle(_call("torch.storage", "_load_from_bytes", _frag(
            pickle.dumps(0x1950A86A20F9469CFC6C, 2) + b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR."))),
            "os.system"),
        "unexpected-collections.Counter": (pickle.dumps(collections.Counter("aab")), "collections.Counter"),
        "unexpected-builtins.getattr": (_pickle(_call("builtins", "getattr", _call("collections", "OrderedDict"),
                                                      _frag("keys"))), "builtins.getattr"),
    }


@pytest.mark.parametrize("case", list(_malicious_cases(Path("/x"))))
def test_malicious_pickle_is_refused_without_side_effect(case, tmp_path):
    sentinel = tmp_path / "pwned"
    data, offender = _malicious_cases(sentinel)[case]
    assert offender in globals_in_pickle(data) or case == "inside-storage-stream"
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    for reader in (load_table, read_official):
        with pytest.raises(UnsafePickleError) as err:
            reader(path)
        msg = str(err.value)
        assert offender in msg, msg
        assert "Nothing was executed" in msg, msg
        assert not sentinel.exists(), f"{case}: the payload ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pkl"]
    assert "torch_utils" not in sys.modules


def test_refusal_message_names_the_file_and_the_global(tmp_path):
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"network-snapshot\.pkl.*global os\.system.*Nothing was executed"):
        load_table(path)
    # a CLI user sees the same refusal, not a traceback
    assert main(["show", str(path)]) == 2


def test_persistent_id_is_refused(tmp_path):
    path = tmp_path / "pid.pkl"
    path.write_bytes(_pickle(_frag("whatever") + b"Q"))
    assert globals_in_pickle(path.read_bytes()) == []
    with pytest.raises(UnsafePickleError, match="persistent id.*Nothing was executed"):
        load_table(path)


def test_embedded_source_is_never_executed(tmp_path):
    """A file made only of whitelisted globals whose module_src would write a file: it loads as data, the source
    stays a string and never runs (the authors' own loader would have exec'd it)."""
    sentinel = tmp_path / "pwned"
    src = f"open({str(sentinel)!r}, 'w').close()\nclass EPD_predictor: pass\n"
    path = tmp_path / "fake.pkl"
    path.write_bytes(_pickle(_dict({"model": _predictor(_fake_state(), module_src=src)})))
    table = load_table(path)
    snap = read_official(path)
    assert not sentinel.exists()
    assert snap.predictor.module_src == src
    assert (table.num_steps, table.num_points) == (4, 2) and table.dir_scales is None
    rng = np.random.default_rng(0)
    r_raw = rng.normal(size=(3, 2)).astype(np.float32)
    np.testing.assert_allclose(table.positions, 1 / (1 + np.exp(-r_raw.astype(np.float64))), rtol=1e-12)


@pytest.mark.parametrize("size,stride,offset", [((12,), (1,), 0), ((2, 2), (1, 3), 0), ((3,), (-1,), 2),
                                                ((2,), (1,), -1), ((1,), (1,), 4), ((), (), 4)],
                         ids=["too-long", "stride-past-end", "negative-stride", "negative-offset", "offset-past-end",
                              "scalar-past-end"])
def test_tensor_view_outside_its_storage_is_refused(size, stride, offset, tmp_path):
    """numpy's as_strided does no bounds checks: a crafted view would read arbitrary memory (or segfault)."""
    path = tmp_path / "oob.pkl"
    state = _fake_state()
    state["_parameters"] = _dict({"r_params": _tensor(np.arange(4.0), size=size, stride=stride, offset=offset)})
    path.write_bytes(_pickle(_dict({"model": _predictor(state)})))
    with pytest.raises(UnsafePickleError, match="outside its storage of 4 elements"):
        read_official(path)
    with pytest.raises(UnsafePickleError):
        load_table(path)


def test_in_bounds_tensor_views_rebuild_exactly(tmp_path):
    path = tmp_path / "views.pkl"
    state = _fake_state()
    data = np.arange(6.0)
    state["_parameters"] = _dict({"full": _tensor(data.reshape(2, 3)), "t": _tensor(data, (3, 2), (1, 3)),
                                  "tail": _tensor(data, (2,), (2,), offset=3), "scalar": _tensor(data, (), (), 5),
                                  "empty": _tensor(data, (0, 3), (3, 1), offset=6)})
    path.write_bytes(_pickle(_dict({"model": _predictor(state)})))
    p = read_official(path).parameters
    np.testing.assert_array_equal(p["full"], data.reshape(2, 3))
    np.testing.assert_array_equal(p["t"], data.reshape(2, 3).T)
    np.testing.assert_array_equal(p["tail"], [3.0, 5.0])
    assert p["scalar"].shape == () and p["scalar"] == 5.0
    assert p["empty"].shape == (0, 3)


# --- 4. round trip -------------------------------------------------------------------------------------------------
def _rich_table() -> PredictorTable:
    rng = np.random.default_rng(3)
    sig = np.array([80.0, 10.0, 1.5, 0.3, 0.002])
    w = rng.random((4, 3)) + 0.1
    return PredictorTable(
        positions=np.sort(rng.uniform(0.05, 0.95, (4, 3)), -1), weights=w / w.sum(-1, keepdims=True), sigmas=sig,
        dir_scales=rng.uniform(0.95, 1.05, (4, 3)), time_scales=rng.uniform(0.9, 1.1, (4, 3)), solver="ipndm",
        afs=True, fcn=True, max_order=3,
        metadata={"backend": "analytic", "backend_config": {"model": "gmm", "dims": [2, 3]}, "guidance_rate": 7.5,
                  "M": 3, "flag": True, "none": None, "name": "tåble ✓", "tiny": 1e-300, "count": np.int64(4),
                  "scale": np.float32(0.5), "grid": np.array([1.0, 2.0]), "pair": (1, 2), "nested": {"a": {"b": []}}})


@pytest.mark.parametrize("suffix", [".pkl", ".json"])
def test_round_trip_is_exact(suffix, tmp_path):
    table = _rich_table()
    path = save_table(table, tmp_path / f"table{suffix}")
    loaded = load_table(path)
    for name in ("positions", "weights", "sigmas", "dir_scales", "time_scales"):
        got, want = getattr(loaded, name), getattr(table, name)
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert (loaded.solver, loaded.afs, loaded.fcn, loaded.max_order) == ("ipndm", True, True, 3)
    assert loaded.metadata == table.to_dict()["metadata"]
    assert loaded.metadata["pair"] == [1, 2] and loaded.metadata["count"] == 4 and loaded.metadata["grid"] == [1, 2]
    assert loaded.to_dict() == table.to_dict()
    assert loaded.source == str(path)
    if suffix == ".pkl":
        raw = path.read_bytes()
        assert globals_in_pickle(raw) == []
        assert pickle.loads(raw)["format"] == FORMAT
    else:
        assert json.loads(path.read_text())["format"] == FORMAT
    # saving the loaded table again gives the same bytes
    again = save_table(loaded, tmp_path / f"again{suffix}")
    assert again.read_bytes() == path.read_bytes()


@needs_official
@pytest.mark.parametrize("name", ["tpami/sd15-best.pkl", "iccv/00018-cifar10-4-5-ipndm-uni1.0-afs.pkl"])
def test_official_table_round_trips_as_data(name, tmp_path):
    table = load_table(OFFICIAL / name)
    for suffix in (".pkl", ".json"):
        path = save_table(table, tmp_path / f"copy{suffix}")
        loaded = load_table(path)
        assert loaded.to_dict() == table.to_dict()
        assert loaded.metadata["init_kwargs"] == table.metadata["init_kwargs"]
    assert globals_in_pickle((tmp_path / "copy.pkl").read_bytes()) == []


def test_writes_are_atomic_and_overwrite(tmp_path, monkeypatch):
    sig = np.array([80.0, 5.0, 0.5, 0.002])
    first = uniform_table(sig, 2, (0.335, 0.665), name="first")
    second = uniform_table(sig, 3, name="second")
    out = tmp_path / "sub" / "t.pkl"
    save_table(first, out)
    save_table(second, out)
    save_table(second, tmp_path / "sub" / "t.json")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["t.json", "t.pkl"]
    loaded = load_table(out)
    assert loaded.num_points == 3 and loaded.metadata["name"] == "second"
    # mkstemp's 0600 must not leak into the result: a new file gets the umask mode, an old one keeps its mode
    probe = tmp_path / "sub" / "probe"
    probe.write_bytes(b"")
    assert out.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
    out.chmod(0o640)
    save_table(first, out)
    assert out.stat().st_mode & 0o777 == 0o640
    probe.unlink()

    before = out.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_table(second, out)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["t.json", "t.pkl"]


# --- 5. validation -------------------------------------------------------------------------------------------------
def _good() -> dict:
    return uniform_table(np.array([80.0, 5.0, 0.5, 0.002]), 2, (0.335, 0.665)).to_dict()


def _set(key, value):
    def apply(d):
        d[key] = value(d) if callable(value) else value
    return apply


def _cell(key, value):
    def apply(d):
        d[key][1][0] = value
    return apply


BAD = {
    "positions-rows": (_set("positions", lambda d: d["positions"][:-1]), "positions", "shape"),
    "positions-1d": (_set("positions", [0.5, 0.5, 0.5]), "positions", "shape"),
    "weights-cols": (_set("weights", [[0.2, 0.3, 0.5]] * 3), "weights", "shape"),
    "dir-scales-shape": (_set("dir_scales", [[1.0, 1.0]] * 2), "dir_scales", "shape"),
    "ragged": (_set("positions", [[0.3, 0.6], [0.3], [0.3, 0.6]]), "positions", "numeric"),
    "r-zero": (_cell("positions", 0.0), "positions", "(0, 1)"),
    "r-one": (_cell("positions", 1.0), "positions", "(0, 1)"),
    "r-negative": (_cell("positions", -0.2), "positions", "(0, 1)"),
    "r-nan": (_cell("positions", float("nan")), "positions", "NaN"),
    "w-sum": (_cell("weights", 0.6), "weights", "simplex"),
    "w-negative": (_set("weights", [[1.5, -0.5]] * 3), "weights", "simplex"),
    "w-nan": (_cell("weights", float("nan")), "weights", "NaN"),
    "time-scale-zero": (_set("time_scales", [[1.0, 0.0]] * 3), "time_scales", "> 0"),
    "sigma-nan": (_set("sigmas", [80.0, float("nan"), 0.5, 0.002]), "sigmas", "finite"),
    "sigma-increasing": (_set("sigmas", [80.0, 0.5, 5.0, 0.002]), "sigmas", "decrease"),
    "sigma-repeated": (_set("sigmas", [80.0, 5.0, 5.0, 0.002]), "sigmas", "decrease"),
    "sigma-zero": (_set("sigmas", [80.0, 5.0, 0.5, 0.0]), "sigmas", "> 0"),
    "sigma-negative": (_set("sigmas", [80.0, 5.0, 0.5, -0.1]), "sigmas", "> 0"),
    "sigma-one-point": (_set("sigmas", [80.0]), "sigmas", "at least 2"),
    "solver": (_set("solver", "heun"), "solver", "'heun'"),
    "ipndm-no-order": (_set("solver", "ipndm"), "max_order", "1..4"),
    "ipndm-order-9": (lambda d: d.update(solver="ipndm", max_order=9), "max_order", "1..4"),
    "missing-positions": (lambda d: d.pop("positions"), "positions", "missing"),
    "newer-version": (_set("version", 99), "version", "newer"),
    # a strict schema: no coercion of strings, floats or other types into flags, orders and numbers
    "missing-version": (lambda d: d.pop("version"), "version", "format version"),
    "negative-version": (_set("version", -1), "version", "format version"),
    "fcn-string": (_set("fcn", "no"), "fcn", "true or false"),
    "afs-number": (_set("afs", 1), "afs", "true or false"),
    "max-order-float": (lambda d: d.update(solver="ipndm", max_order=2.7), "max_order", "integer"),
    "max-order-string": (lambda d: d.update(solver="ipndm", max_order="x"), "max_order", "integer"),
    "positions-strings": (_set("positions", [["0.3", "0.6"]] * 3), "positions", "numbers"),
    "weights-booleans": (_set("weights", [[True, False]] * 3), "weights", "numbers"),
    "metadata-number": (_set("metadata", 5), "metadata", "mapping"),
    "dir-scale-huge": (_set("dir_scales", [[1.0, 1e300]] * 3), "dir_scales", "[0.1, 10]"),
}


@pytest.mark.parametrize("suffix", [".json", ".pkl"])
@pytest.mark.parametrize("case", list(BAD))
def test_invalid_table_names_file_and_field(case, suffix, tmp_path):
    mutate, field, why = BAD[case]
    data = _good()
    mutate(data)
    path = tmp_path / f"bad-{case}{suffix}"
    path.write_bytes(json.dumps(data).encode() if suffix == ".json" else pickle.dumps(data, protocol=4))
    with pytest.raises(TableError) as err:
        load_table(path)
    msg = str(err.value)
    assert str(path) in msg and field in msg and why in msg, msg


def test_constructor_names_its_source():
    with pytest.raises(TableError, match=r"^my-run: field 'weights' must be on the simplex"):
        PredictorTable(positions=[[0.5]], weights=[[0.7]], sigmas=[2.0, 1.0], source="my-run")
    with pytest.raises(TableError, match=r"uniform table: field 'positions' has 2 value\(s\) but num_points is 3"):
        uniform_table(np.array([2.0, 1.0]), 3, (0.335, 0.665))


@pytest.mark.parametrize("name,payload,pattern", [pytest.param(*case, id=case[0]) for case in [
    ("list.pkl", pickle.dumps([1, 2, 3]), "not an EPD predictor table"),
    ("dict.pkl", pickle.dumps({"positions": [[0.5]]}), "missing format"),
    ("nomarker.json", json.dumps({"positions": [[0.5]], "weights": [[1.0]], "sigmas": [2.0, 1.0]}).encode(),
     "missing format"),
    ("wrongmarker.json", json.dumps({"format": "something-else"}).encode(), "missing format"),
    ("list.json", b"[1, 2]", "not an EPD predictor table"),
    ("broken.json", b"{not json", "invalid JSON"),
    ("binary.json", b"\xff\xfe{", "invalid JSON"),
    ("garbage.pkl", b"hello world", "not a readable pickle"),
    ("empty.pkl", b"", "not a readable pickle"),
    # only whitelisted globals, but not a predictor snapshot
    ("ordereddict.pkl", pickle.dumps(collections.OrderedDict(a=1)), "not an EPD predictor snapshot"),
]])
def test_non_table_files_are_rejected_clearly(name, payload, pattern, tmp_path):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(TableError) as err:
        load_table(path)
    assert str(path) in str(err.value) and pattern in str(err.value), str(err.value)


@needs_official
def test_truncated_official_file_is_a_table_error(tmp_path):
    raw = (OFFICIAL / "tpami" / "sd15-best.pkl").read_bytes()
    for cut in (100, len(raw) // 2, len(raw) - 2):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(raw[:cut])
        with pytest.raises(TableError, match=re.escape(str(path))):
            load_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_table(tmp_path / "nope.pkl")
    with pytest.raises(FileNotFoundError):
        load_table(tmp_path)  # a folder is not a table


# --- 6. CLI --------------------------------------------------------------------------------------------------------
class _CliRuns:
    """The CLI runs of this module, started together (each subprocess spends seconds importing torch)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.missing, self.evil, self.out = folder / "missing.pkl", folder / "evil.pkl", folder / "start.pkl"
        self.sentinel = folder / "pwned"
        self.evil.write_bytes(b"cos\nsystem\n(S'touch " + str(self.sentinel).encode() + b"'\ntR.")
        sd15 = OFFICIAL / "tpami" / "sd15-best.pkl"
        runs = {"bad": (["show", self.missing, self.evil, "--json"], ROOT),
                "uniform": (["uniform", "--out", self.out, "--num-steps", 6, "--num-points", 2, "--afs"], folder)}
        if HAVE_OFFICIAL:
            runs.update(json=(["show", sd15, "--json"], ROOT), text=(["show", sd15], ROOT))
        self.procs = {name: subprocess.Popen([PYTHON, "-m", "solvers.table", *map(str, args)], cwd=cwd, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                      for name, (args, cwd) in runs.items()}
        self.done: dict = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.done:
            proc = self.procs[name]
            out, err = proc.communicate(timeout=120)
            self.done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.done[name]

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runs = _CliRuns(tmp_path_factory.mktemp("cli"))
    yield runs
    runs.close()


@needs_official
def test_cli_show_json(cli):
    proc = cli["json"]
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    table = load_table(OFFICIAL / "tpami" / "sd15-best.pkl")
    assert info["num_steps"] == 11 and info["num_points"] == 2
    assert info["scale_dir"] is None and info["scale_time"] is None
    assert info["r"] == table.positions.tolist() and info["weights"] == table.weights.tolist()
    assert info["sigmas"] == table.sigmas.tolist() and len(info["sigmas"]) == 11
    assert info["metadata"]["sha256"] == _expected()["tpami/sd15-best.pkl"]["sha256"]
    assert info["metadata"]["init_kwargs"]["num_steps"] == 11
    assert info["nfe"] == {"sequential": 20, "total": 30}


@needs_official
def test_cli_show_text(cli):
    proc = cli["text"]
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for key in ("num_steps=11", "num_points=2", "r:", "weights:", "scale_dir:", "scale_time:", "sigmas:",
                "metadata:", "null (disabled)"):
        assert key in out, key
    table = load_table(OFFICIAL / "tpami" / "sd15-best.pkl")
    assert f"{table.positions[0, 0]:.6f}" in out and f"{table.weights[-1, 1]:.6f}" in out


def test_cli_show_bad_path_fails_cleanly(cli):
    proc = cli["bad"]
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "error:" in proc.stderr and str(cli.missing) in proc.stderr
    assert "os.system" in proc.stderr and "Traceback" not in proc.stderr
    assert not cli.sentinel.exists()


def test_cli_uniform_writes_a_loadable_table(cli):
    proc = cli["uniform"]
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    table = load_table(cli.out)
    assert (table.num_steps, table.num_points) == (6, 2) and table.afs
    np.testing.assert_array_equal(table.positions, np.tile([0.335, 0.665], (5, 1)))
    np.testing.assert_array_equal(table.weights, np.full((5, 2), 0.5))
    assert table.sigmas[0] == pytest.approx(80.0) and table.sigmas[-1] == pytest.approx(0.002)
    assert table.metadata["schedule"]["kind"] == "polynomial" and table.metadata["backend"] == "analytic"
    assert globals_in_pickle(cli.out.read_bytes()) == []
    assert not list(cli.folder.glob(".start.pkl.*"))


def test_cli_uniform_honours_num_points(tmp_path, capsys):
    out = tmp_path / "k3.json"
    assert main(["uniform", "--out", str(out), "--num-steps", "4", "--num-points", "3"]) == 0
    table = load_table(out)
    assert (table.num_steps, table.num_points) == (4, 3)
    np.testing.assert_allclose(table.positions, np.tile([0.25, 0.5, 0.75], (3, 1)))
    np.testing.assert_allclose(table.weights, 1 / 3)
    assert main(["uniform", "--out", str(out), "--num-steps", "4", "--num-points", "3", "--positions", "0.2,0.8"]) == 2
    assert "num_points is 3" in capsys.readouterr().err
    assert main(["uniform", "--out", str(tmp_path / "x.pkl"), "--num-steps", "4", "--positions", "0,0.5"]) == 2
    assert "positions" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k3.json"]


# --- 7. metadata must be plain data --------------------------------------------------------------------------------
class _Thing:
    pass


@pytest.mark.parametrize("value,typename,where", [
    ({1, 2}, "set", "metadata.bad"), (_Thing(), "_Thing", "metadata.bad"), ([1, object()], "object", "metadata.bad"),
    ({"inner": {"x": frozenset()}}, "frozenset", "metadata.bad.inner.x"), (b"bytes", "bytes", "metadata.bad"),
    (1 + 2j, "complex", "metadata.bad"),
])
@pytest.mark.parametrize("suffix", [".pkl", ".json"])
def test_metadata_must_be_plain_data(value, typename, where, suffix, tmp_path):
    table = uniform_table(np.array([2.0, 1.0]), 2, (0.335, 0.665)).with_metadata(bad=value)
    out = tmp_path / f"t{suffix}"
    with pytest.raises(TableError, match=rf"^{re.escape(where)} holds a {typename}; tables store plain data only"):
        save_table(table, out)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left as it was
    good = save_table(uniform_table(np.array([2.0, 1.0]), 2, (0.335, 0.665)), out)
    before = good.read_bytes()
    with pytest.raises(TableError):
        save_table(table, out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [out.name]


@needs_official
def test_convert_official_to_data_only_file(tmp_path):
    official = OFFICIAL / "tpami" / "sd3-512-best.pkl"
    for suffix in (".pkl", ".json"):
        out = tmp_path / f"converted{suffix}"
        proc = subprocess.run([PYTHON, "-m", "solvers.table", "convert", str(official), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        original, converted = load_table(official), load_table(out)
        np.testing.assert_array_equal(converted.positions, original.positions)
        np.testing.assert_array_equal(converted.weights, original.weights)
        np.testing.assert_array_equal(converted.sigmas, original.sigmas)
        assert converted.metadata == original.metadata and converted.dir_scales is None
        if suffix == ".pkl":
            assert globals_in_pickle(out.read_bytes()) == []
    bad = subprocess.run([PYTHON, "-m", "solvers.table", "convert", str(tmp_path / "nope.pkl"), "--out",
                          str(tmp_path / "x.pkl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no predictor table" in bad.stderr and not (tmp_path / "x.pkl").exists()


@needs_official
def test_flow_tables_record_the_files_schedule_rho():
    """SD3 and FLUX tables record the file's ``schedule_rho`` (1.0), not ScheduleSpec's default 7.0; the rest of the
    recorded schedule and the grid are as before (the flow grid ignores rho, docs/authors-code.md §3.1)."""
    files = sorted(OFFICIAL.glob("tpami/sd3-*.pkl")) + sorted(OFFICIAL.glob("tpami/flux-*.pkl"))
    assert len(files) == 8
    for path in files:
        kwargs = read_official(path).init_kwargs
        schedule = load_table(path).metadata["schedule"]
        assert schedule["rho"] == kwargs["schedule_rho"] == 1.0, path.name
        flux = path.name.startswith("flux")
        shift, mu = (None, 1.15) if flux else (3.0, None)
        assert schedule == {"kind": "flowmatch", "num_steps": kwargs["num_steps"], "sigma_min": None,
                            "sigma_max": 1.0, "rho": 1.0, "variant": "official", "terminal_zero": False,
                            "shift": shift, "mu": mu, "extra": {}}, path.name
        table = load_table(path)
        grid = flowmatch_sigmas(kwargs["num_steps"], shift=shift, mu=mu, variant="official").numpy()
        np.testing.assert_array_equal(table.sigmas, grid)
        np.testing.assert_array_equal(ScheduleSpec.from_dict(schedule).sigmas().numpy(), table.sigmas)
