"""Crafted files against the table readers (ours and the authors' format), each in a fresh process: none runs
code, each stays under a memory and time bound, exits 2 and says in one line which file and why (the limits
are safeio/limits.py's). The files are generated here, not committed."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeio.limits import LimitError
from solvers.table import TableError, UnsafePickleError, load_table, uniform_table
from test_table import _dict, _fake_state, _pickle, _predictor, _tensor

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BOUND_MB = 1024      # peak resident memory above the interpreter's own, after its imports
TIME_BOUND_S = 60
OURS = uniform_table(np.array([80.0, 5.0, 0.5, 0.002]), 2, (0.335, 0.665)).to_dict()

# Runs the table CLI in-process after its imports, so the peak it reports is what the file cost.
RUNNER = r"""
import importlib, json, resource, sys, time
cli = importlib.import_module(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = cli.main(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"code": code, "grown_mb": (peak - base) / 1024, "seconds": time.perf_counter() - start}))
"""


def _laughs(depth: int = 40) -> list:
    node: list = [0]
    for _ in range(depth):
        node = [node, node]          # 2^depth leaves for whoever walks it, 40 list objects in the file
    return node


def _nested_pickle(depth: int) -> bytes:
    """A list nested ``depth`` deep, in opcodes (pickle.dumps itself would recurse too deep)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _cyclic() -> dict:
    loop: list = []
    loop.append(loop)
    return {**OURS, "metadata": {"loop": loop}}


def _official(**kwargs) -> bytes:
    state = _fake_state()
    state["_init_kwargs"] = {**state["_init_kwargs"], **kwargs}
    return _pickle(b"}(" + pickle.dumps("model", 2)[2:-1] + _predictor(state) + b"u")


def _broadcast_view() -> bytes:
    """An authors'-format file whose r_params is a zero-stride view claiming 2e8 elements over one number."""
    state = _fake_state()
    big = _tensor([0.5], size=(200_000_000, 2), stride=(0, 0))
    state["_parameters"] = _dict({"r_params": big, "weight_s": _tensor(np.zeros((3, 2)))})
    return _pickle(b"}(" + pickle.dumps("model", 2)[2:-1] + _predictor(state) + b"u")


CASES = {   # name -> (file bytes, suffix, what the one-line error must say)
    "memo-index-bomb": (b"\x80\x04N" + b"r" + (2 ** 31).to_bytes(4, "little") + b".", ".pkl", "memo entry"),
    "laughs-positions": (pickle.dumps({**OURS, "positions": _laughs()}, protocol=4), ".pkl", "expands"),
    "laughs-metadata": (pickle.dumps({**OURS, "metadata": {"x": _laughs()}}, protocol=4), ".pkl", "expands"),
    "deep-pickle": (_nested_pickle(200_000), ".pkl", "nests deeper"),
    "deep-json": (b"[" * 200_000 + b"]" * 200_000, ".json", "nests deeper"),
    "cyclic-metadata": (pickle.dumps(_cyclic(), protocol=4), ".pkl", "nests deeper"),
    "official-num-steps-1e9": (_official(num_steps=10 ** 9), ".pkl", "num_steps"),
    "official-broadcast-view": (_broadcast_view(), ".pkl", "tensor view"),
    "truncated-official": (_official()[:-40], ".pkl", "not a readable"),
    "junk": (b"\x80\x04\x95garbage\x00\xff" * 10, ".pkl", "not a readable"),
    "empty": (b"", ".pkl", "not a readable"),
}


def _edm_safetensors(**changes) -> bytes:
    """A tiny EDM network in our safetensors format whose recorded constructor arguments were then changed."""
    from safetensors.torch import save

    from backends.edm_checkpoint import FORMAT
    from backends.edm_networks import tiny_precond

    net = tiny_precond("iDDPMPrecond" if "M" in changes else "EDMPrecond", img_resolution=8)
    config = {"class_name": type(net).__name__, "init_args": [], "init_kwargs": {**net.init_kwargs, **changes},
              "source": {}}
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    return save(tensors, metadata={"format": FORMAT, "version": "1", "config": json.dumps(config)})


EDM_CASES = {   # the EDM network reader: name -> (file bytes, suffix, what the one-line error must say)
    "edm-model-channels-2048": (lambda: _edm_safetensors(model_channels=2048), ".safetensors", "shape"),
    "edm-iddpm-M-1e6": (lambda: _edm_safetensors(M=10 ** 6), ".safetensors", "M = 1000000"),
    "edm-empty-pickle": (lambda: b"", ".pkl", "not a readable"),
    "edm-junk-pickle": (lambda: b"\x80\x04junk" * 20, ".pkl", "not a readable"),
    "edm-memo-bomb": (lambda: CASES["memo-index-bomb"][0], ".pkl", "memo entry"),
    "edm-laughs": (lambda: CASES["laughs-metadata"][0], ".pkl", "expands"),
}


def _run_hostile(module: str, path: Path, why: str) -> None:
    proc = subprocess.run([sys.executable, "-c", RUNNER, module, "show", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIME_BOUND_S)
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[-1]) if "RESULT " in proc.stdout else None
    assert result is not None, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert result["code"] == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: ") and str(path) in errors[0] and why in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    assert result["grown_mb"] < MEMORY_BOUND_MB and result["seconds"] < TIME_BOUND_S, result


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_table_file_is_refused_within_bounds(case, tmp_path):
    data, suffix, why = CASES[case]
    path = tmp_path / f"{case}{suffix}"
    path.write_bytes(data)
    _run_hostile("tools.table_cli", path, why)


@pytest.mark.parametrize("case", sorted(EDM_CASES))
def test_crafted_network_file_is_refused_within_bounds(case, tmp_path):
    make, suffix, why = EDM_CASES[case]
    path = tmp_path / f"{case}{suffix}"
    path.write_bytes(make())
    _run_hostile("tools.edm_cli", path, why)


# --- fuzzing: mutations and truncations of real files never give a traceback -------------------------------------
REAL = sorted((ROOT / "exps" / "digits").glob("epd-nfe*.pkl"))[:2] + sorted((ROOT / "exps" / "gmm").glob("epd-nfe*.json"))[:1]
OFFICIAL = sorted((ROOT.parent / "shared" / "official").rglob("*.pkl"))[:2]
SEEDS = [path.read_bytes() for path in REAL + OFFICIAL]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(SEEDS) - 1), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))
def test_mutated_real_files_give_a_clear_error_or_a_valid_table(which, cut, flips, tmp_path_factory):
    data = bytearray(SEEDS[which])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[:max(1, int(cut * len(data)) if cut < 0.9 else len(data))])
    suffix = ".json" if data[:1] in (b"{", b"[") else ".pkl"
    path = tmp_path_factory.mktemp("fuzz") / f"mutated{suffix}"
    path.write_bytes(data)
    try:
        table = load_table(path)
    except (TableError, UnsafePickleError, LimitError) as err:
        assert str(path) in str(err) or "tensor" in str(err) or "storage" in str(err), str(err)
    else:
        table.validate()     # whatever loads is a valid table
