"""The hostile-input battery (docs/errors.md): crafted files and command lines against every reader and entry
point, in the classes of issue 18, each case run in-process under the same bounds.

    python tests/hostile_battery.py --report            # every class, a table of outcomes per class
    python tests/hostile_battery.py --class 1 --json    # one class, one JSON line per case (tests/test_hostile_battery.py)

A case expects either a refusal (exit status 2 and exactly one ``error:`` line holding the named words: the
file or the argument) or a success whose result it checks. Each outcome is one of

- ``clear``: refused as expected; ``ok``: succeeded and its check passed;
- ``traceback``: an uncaught exception, another exit status, or more than one line;
- ``wrong``: exit status 0 where a refusal was due, or a success whose check failed;
- ``hang``: over the time bound; ``memory``: the case's peak resident memory rose past the bound above what
  the process held when the case started (Linux resets the peak per case; elsewhere it is the high-water mark);
- ``code``: the payload ran (its sentinel file appeared or a process-spawning audit event fired).

The files are generated here; nothing hostile is committed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import re
import resource
import signal
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for entry in (str(ROOT), str(TESTS)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import numpy as np  # noqa: E402

from test_table import _call, _dict, _fake_state, _frag, _pickle, _predictor, _tensor  # noqa: E402

MEMORY_BOUND_MB = 1024       # a case may raise resident memory by this much above what the process held before it
TIME_BOUND_S = 60            # per case
CLASSES = {
    0: "code payloads (pickles that would run code)",
    1: "tiny files that exhaust memory or hang the readers",
    2: "network files: constructor arguments and headers",
    3: "tracebacks where a one-line error is due",
    4: "wrong results with exit code 0",
    5: "debris and permissions",
}
DIGITS_TABLE = ROOT / "exps" / "digits" / "epd-nfe9.pkl"
GMM_TABLE = ROOT / "exps" / "gmm" / "00001-gmm-nfe5" / "table.json"
SPAWN_EVENTS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "pty.spawn",
                "socket.connect", "webbrowser.open")


@dataclass
class Case:
    """One input. ``argv`` and ``words`` may hold ``{d}`` (the case's folder) and ``{s}`` (the sentinel path);
    ``files`` maps names in the folder to bytes (or a function of the sentinel giving bytes); ``setup(folder)``
    prepares anything else; ``check(folder, stdout, stderr)`` returns what is wrong with a success, or None."""

    klass: int
    name: str
    module: str
    argv: list[str]
    words: tuple[str, ...] = ()
    files: dict[str, Any] = field(default_factory=dict)
    expect: str = "error"
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, str, str], str | None] | None = None


# --- crafted bytes ---------------------------------------------------------------------------------------------------
def _ours(**changes: Any) -> dict:
    from solvers.table import uniform_table

    table = uniform_table(np.array([80.0, 5.0, 0.5, 0.002]), 2, (0.335, 0.665), backend="digits").to_dict()
    table.update(changes)
    return table


def _laughs(depth: int) -> list:
    node: list = [0]
    for _ in range(depth):
        node = [node, node]
    return node


def _nested(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _official(state: dict | None = None, **kwargs: Any) -> bytes:
    state = state or _fake_state()
    state["_init_kwargs"] = {**state["_init_kwargs"], **kwargs}
    return _pickle(b"}(" + pickle.dumps("model", 2)[2:-1] + _predictor(state) + b"u")


def _official_params(r_params: bytes) -> bytes:
    state = _fake_state()
    state["_parameters"] = _dict({"r_params": r_params, "weight_s": _tensor(np.zeros((3, 2)))})
    return _official(state)


def _storage_claiming(count: int, stored: int = 6) -> bytes:
    """A legacy torch storage stream whose header claims ``count`` float32 elements but stores ``stored``."""
    persid = _pickle(b"(" + _frag("storage") + b"ctorch\nFloatStorage\n" + _frag("0") + _frag("cpu")
                     + _frag(int(count)) + b"tQ")
    stream = (pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2) + persid
              + pickle.dumps(["0"], 2) + struct.pack("<q", count) + np.zeros(stored, "<f4").tobytes())
    return _call("torch.storage", "_load_from_bytes", _frag(stream))


def _tensor_over(storage: bytes, size: tuple, stride: tuple, offset: int = 0) -> bytes:
    return _call("torch._utils", "_rebuild_tensor_v2", storage, _frag(offset), _frag(size), _frag(stride),
                 _frag(False), _call("collections", "OrderedDict"))


def table_bombs() -> dict[str, bytes | Callable[[], bytes]]:
    """Name -> file bytes (the suffix is in the name): small files built to exhaust memory, time or recursion."""
    dumps = lambda obj: pickle.dumps(obj, protocol=4)  # noqa: E731
    bombs: dict[str, Any] = {
        "memo-long-binput-2^22.pkl": b"\x80\x04N" + b"r" + (1 << 22).to_bytes(4, "little") + b".",
        "memo-long-binput-2^31.pkl": b"\x80\x04N" + b"r" + (1 << 31).to_bytes(4, "little") + b".",
        "memo-long-binput-2^32-1.pkl": b"\x80\x04N" + b"r" + (2 ** 32 - 1).to_bytes(4, "little") + b".",
        "memo-binput-200.pkl": b"\x80\x04Nq\xc8.",
        "memo-put-text-10^12.pkl": b"\x80\x02Np1000000000000\n.",
        "memo-get-unwritten.pkl": b"\x80\x04h\x05.",
        "memoize-5e6-entries.pkl": lambda: b"\x80\x04" + b"N\x94" * 5_000_000 + b".",
        "laughs-positions-40.pkl": lambda: dumps(_ours(positions=_laughs(40))),
        "laughs-positions-64.pkl": lambda: dumps(_ours(positions=_laughs(64))),
        "laughs-weights-40.pkl": lambda: dumps(_ours(weights=_laughs(40))),
        "laughs-sigmas-40.pkl": lambda: dumps(_ours(sigmas=_laughs(40))),
        "laughs-metadata-40.pkl": lambda: dumps(_ours(metadata={"x": _laughs(40)})),
        "laughs-metadata-key.pkl": lambda: dumps(_ours(metadata={"a": {"b": _laughs(30)}, "c": _laughs(30)})),
        "deep-pickle-200.pkl": _nested(200),
        "deep-pickle-10^4.pkl": _nested(10_000),
        "deep-pickle-10^6.pkl": lambda: _nested(1_000_000),
        "deep-dict-pickle.pkl": lambda: b"\x80\x02" + b"}(X\x01\x00\x00\x00k" * 50_000 + b"Nu" + b"u" * 49_999 + b".",
        "deep-json-200.json": b"[" * 200 + b"]" * 200,
        "deep-json-10^5.json": lambda: b"[" * 100_000 + b"]" * 100_000,
        "deep-json-metadata.json": lambda: json.dumps(_ours(metadata="@")).encode().replace(
            b'"@"', b'{"a":' * 5000 + b"1" + b"}" * 5000),
        "cyclic-metadata-list.pkl": lambda: dumps(_ours(metadata={"loop": (lambda l: (l.append(l), l)[1])([])})),
        "cyclic-metadata-dict.pkl": lambda: dumps(_ours(metadata=(lambda d: (d.update(me=d), d)[1])({}))),
        "wide-list-10^7.pkl": lambda: b"\x80\x04(" + b"N" * 10_000_000 + b"l.",
        "json-bigint.json": lambda: re.sub(rb'"version": \d+', b'"version": ' + b"9" * 100_000,
                                           json.dumps(_ours()).encode()),
        "json-exp-overflow.json": lambda: json.dumps(_ours()).encode().replace(b"80.0", b"1e999999", 1),
        "official-num-steps-1e9.pkl": lambda: _official(num_steps=10 ** 9),
        "official-num-steps-1e6.pkl": lambda: _official(num_steps=10 ** 6),
        "official-num-steps-negative.pkl": lambda: _official(num_steps=-5),
        "official-num-points-1e9.pkl": lambda: _official(num_points=10 ** 9),
        "official-broadcast-2e8.pkl": lambda: _official_params(_tensor([0.5], size=(200_000_000, 2), stride=(0, 0))),
        "official-broadcast-1e12.pkl": lambda: _official_params(_tensor([0.5], size=(10 ** 6, 10 ** 6), stride=(0, 0))),
        "official-view-past-storage.pkl": lambda: _official_params(_tensor(np.zeros(6), size=(3, 2), stride=(2, 1),
                                                                          offset=10 ** 9)),
        "official-negative-size.pkl": lambda: _official_params(_tensor(np.zeros(6), size=(-3, 2), stride=(2, 1))),
        "official-storage-claims-1e12.pkl": lambda: _official_params(_tensor_over(_storage_claiming(10 ** 12), (3, 2),
                                                                                  (2, 1))),
        "official-storage-claims-2e9.pkl": lambda: _official_params(_tensor_over(_storage_claiming(2 * 10 ** 9), (3, 2),
                                                                                 (2, 1))),
        "official-laughs-kwargs.pkl": lambda: _official(scale_dir=_laughs(40)),
        "oversized-65MiB.pkl": None,      # made sparse by _write (a size check must not read it)
    }
    return bombs


def payloads(sentinel: str) -> dict[str, bytes]:
    """Name -> pickle bytes that would create ``sentinel`` (or run other code) if anything executed them."""
    touch = f"touch {sentinel}"
    py = f"open({sentinel!r}, 'w').close()"
    system = b"cos\nsystem\n(S'" + touch.encode() + b"'\ntR"
    gadgets = {
        "os.system": system,
        "posix.system": b"cposix\nsystem\n(S'" + touch.encode() + b"'\ntR",
        "builtins.eval": _call("builtins", "eval", _frag(py)),
        "builtins.exec": _call("builtins", "exec", _frag(py)),
        "builtins.__import__": _call("builtins", "__import__", _frag("os")),
        "builtins.getattr": _call("builtins", "getattr", _call("builtins", "__import__", _frag("os")), _frag("system")),
        "subprocess.Popen": _call("subprocess", "Popen", _frag(["touch", sentinel])),
        "subprocess.check_output": _call("subprocess", "check_output", _frag(["touch", sentinel])),
        "importlib.import_module": _call("importlib", "import_module", _frag("antigravity")),
        "runpy.run_path": _call("runpy", "run_path", _frag(sentinel)),
        "pickle.loads-nested": _call("pickle", "loads", _frag(system + b".")),
        "shutil.rmtree": _call("shutil", "rmtree", _frag(str(Path(sentinel).parent / "nothing"))),
        "stack-global": _frag("os") + _frag("system") + b"\x93" + b"(" + _frag(touch) + b"tR",
        "inst-opcode": b"(" + _frag(touch) + b"ios\nsystem\n",
        "obj-opcode": b"(cos\nsystem\n" + _frag(touch) + b"o",
        "newobj": b"cos\nsystem\n(" + _frag(touch) + b"t)\x81",
        "copyreg-reconstructor": _call("copyreg", "_reconstructor", b"cos\nsystem\n", b"cbuiltins\nobject\n", b"N"),
        "numpy-reconstruct": _call("numpy.core.multiarray", "_reconstruct", b"cos\nsystem\n", _frag((0,)),
                                   _frag(b"b")),
        "persistent-id": _frag(touch) + b"Q",
        "ext1-opcode": b"\x82\x01",
        "torch-rebuild-parameter": _call("torch._utils", "_rebuild_parameter", system, _frag(False),
                                         _call("collections", "OrderedDict")),
    }
    wrappers = {
        "bare": lambda g: _pickle(g),
        "in-metadata": lambda g: _pickle(_dict({**{k: v for k, v in _ours().items() if k != "metadata"},
                                                "metadata": _dict({"note": g})})),
        "in-authors-record": lambda g: _pickle(_dict({"model": _predictor(_fake_state({"payload": g}))})),
    }
    return {f"{g}-{w}.pkl": wrap(gadget) for g, gadget in gadgets.items() for w, wrap in wrappers.items()}


def _edm_file(changes: dict | None = None, precond: str = "EDMPrecond", header: Callable[[dict], dict] | None = None,
              tensors: Callable[[dict], dict] | None = None) -> bytes:
    """A tiny EDM network in our safetensors format, its recorded constructor keywords or header then changed."""
    from safetensors.torch import save

    from backends.edm_checkpoint import FORMAT
    from backends.edm_networks import tiny_precond

    net = tiny_precond(precond, img_resolution=8)
    config = {"class_name": type(net).__name__, "init_args": [], "init_kwargs": {**net.init_kwargs, **(changes or {})},
              "source": {}}
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state = tensors(state) if tensors else state
    metadata = {"format": FORMAT, "version": "1", "config": json.dumps(config)}
    metadata = header(metadata) if header else metadata
    return save(state, metadata=metadata)


def _raw_safetensors(header: bytes, body: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


def network_cases() -> dict[str, Callable[[], bytes]]:
    """Name -> network file bytes (suffix in the name) and the words its refusal must hold."""
    import torch

    def shrink(state: dict) -> dict:
        key = next(k for k, v in state.items() if v.ndim >= 2)
        state[key] = state[key][:1].contiguous()
        return state

    def drop(state: dict) -> dict:
        state.pop(next(iter(state)))
        return state

    def extra(state: dict) -> dict:
        state["smuggled.weight"] = torch.zeros(4)
        return state

    def edm_pickle() -> bytes:
        from backends.edm_networks import tiny_precond
        from test_edm import edm_pickle_bytes

        return edm_pickle_bytes(tiny_precond("EDMPrecond", img_resolution=8))

    cases: dict[str, tuple[Callable[[], bytes], tuple[str, ...]]] = {
        "model-channels-2048.safetensors": (lambda: _edm_file({"model_channels": 2048}), ("model_channels",)),
        "model-channels-512-vs-stored.safetensors": (lambda: _edm_file({"model_channels": 512}), ("shape",)),
        "model-channels-10^6.safetensors": (lambda: _edm_file({"model_channels": 10 ** 6}), ()),
        "model-channels-negative.safetensors": (lambda: _edm_file({"model_channels": -16}), ()),
        "model-channels-string.safetensors": (lambda: _edm_file({"model_channels": "x"}), ()),
        "img-resolution-2^20.safetensors": (lambda: _edm_file({"img_resolution": 1 << 20}), ()),
        "img-channels-10^5.safetensors": (lambda: _edm_file({"img_channels": 10 ** 5}), ()),
        "num-blocks-10^4.safetensors": (lambda: _edm_file({"num_blocks": 10 ** 4}), ()),
        "channel-mult-1000-levels.safetensors": (lambda: _edm_file({"channel_mult": [1] * 1000}), ()),
        "channel-mult-huge.safetensors": (lambda: _edm_file({"channel_mult": [1, 10 ** 6]}), ()),
        "attn-resolutions-10^5.safetensors": (lambda: _edm_file({"attn_resolutions": list(range(10 ** 5))}), ()),
        "label-dim-10^9.safetensors": (lambda: _edm_file({"label_dim": 10 ** 9}), ()),
        "unknown-keyword.safetensors": (lambda: _edm_file({"exec": "print(1)"}), ()),
        "iddpm-M-10^6.safetensors": (lambda: _edm_file({"M": 10 ** 6}, "iDDPMPrecond"), ("M = 1000000",)),
        "iddpm-M-10^9.safetensors": (lambda: _edm_file({"M": 10 ** 9}, "iDDPMPrecond"), ()),
        "class-name-os-system.safetensors": (lambda: _edm_file(header=lambda m: {**m, "config": m["config"].replace(
            '"EDMPrecond"', '"os.system"')}), ()),
        "class-name-unknown.safetensors": (lambda: _edm_file(header=lambda m: {**m, "config": m["config"].replace(
            '"EDMPrecond"', '"MysteryNet"')}), ()),
        "config-not-json.safetensors": (lambda: _edm_file(header=lambda m: {**m, "config": "{not json"}), ()),
        "config-a-list.safetensors": (lambda: _edm_file(header=lambda m: {**m, "config": "[1, 2]"}), ()),
        "config-missing.safetensors": (lambda: _edm_file(header=lambda m: {k: v for k, v in m.items() if k != "config"}),
                                       ()),
        "config-deep.safetensors": (lambda: _edm_file(header=lambda m: {**m, "config": "[" * 100_000 + "]" * 100_000}),
                                    ()),
        "format-other.safetensors": (lambda: _edm_file(header=lambda m: {**m, "format": "something-else"}), ()),
        "version-99.safetensors": (lambda: _edm_file(header=lambda m: {**m, "version": "99"}), ()),
        "tensor-shape-shrunk.safetensors": (lambda: _edm_file(tensors=shrink), ()),
        "tensor-missing.safetensors": (lambda: _edm_file(tensors=drop), ()),
        "tensor-extra.safetensors": (lambda: _edm_file(tensors=extra), ()),
        "header-length-2^60.safetensors": (lambda: _raw_safetensors(b"{}", length=1 << 60), ()),
        "header-length-past-file.safetensors": (lambda: _raw_safetensors(b'{"a": 1}', length=10 ** 6), ()),
        "header-not-json.safetensors": (lambda: _raw_safetensors(b"{oops" + b" " * 10), ()),
        "header-offsets-past-file.safetensors": (lambda: _raw_safetensors(json.dumps({
            "w": {"dtype": "F32", "shape": [10 ** 6], "data_offsets": [0, 4 * 10 ** 6]}}).encode()), ()),
        "header-dtype-unknown.safetensors": (lambda: _raw_safetensors(json.dumps({
            "w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\x00" * 4), ()),
        "empty.safetensors": (lambda: b"", ()),
        "empty.pkl": (lambda: b"", ("not a readable",)),
        "junk.pkl": (lambda: b"\x80\x04junk" * 20, ("not a readable",)),
        "zip-format.pkl": (lambda: b"PK\x03\x04" + b"\x00" * 200, ()),
        "truncated-edm-pickle.pkl": (lambda: edm_pickle()[:-300], ()),
        "edm-pickle-half.pkl": (lambda: (lambda b: b[:len(b) // 2])(edm_pickle()), ()),
        "memo-bomb.pkl": (lambda: b"\x80\x04N" + b"r" + (1 << 31).to_bytes(4, "little") + b".", ("memo entry",)),
        "laughs.pkl": (lambda: pickle.dumps({"ema": _laughs(40)}, protocol=4), ("expands",)),
        "deep.pkl": (lambda: _nested(200_000), ("nests deeper",)),
        "not-a-snapshot.pkl": (lambda: pickle.dumps({"something": 1}, protocol=4), ()),
        "code-os-system.pkl": (lambda: b"cos\nsystem\n(S'true'\ntR.", ("os.system",)),
    }
    return cases


# --- the catalogue ---------------------------------------------------------------------------------------------------
def _sample(*extra: str, table: str | Path = DIGITS_TABLE) -> list[str]:
    return ["--predictor_path", str(table), "--seeds", "0-1", "--outdir", "{d}/out", *extra]


def _no_images(folder: Path, out: str, err: str) -> str | None:
    return None


def _file_readers(path: str) -> list[tuple[str, str, list[str]]]:
    """(reader name, module, argv) for every entry point that reads a predictor table."""
    return [
        ("table-show", "tools.table_cli", ["show", path]),
        ("table-convert", "tools.table_cli", ["convert", path, "--out", "{d}/converted.json"]),
        ("sample", "sample", ["--predictor_path", path, "--seeds", "0", "--outdir", "{d}/out"]),
        ("bench", "bench.exact", ["--model", "digits", "--solvers", "euler", "--nfe", "3", "--num-samples", "4",
                                  "--batch", "4", "--table", f"t={path}", "--no-cache"]),
        ("distill-init", "training.distill.launch", ["--config", str(ROOT / "configs/distill/digits.yaml"),
                                                     "--override", f"student.init={path}", "--override", "outdir={d}/runs",
                                                     "--override", "total_kimg=0.001", "--no-progress"]),
        ("rdpo-start", "training.ppo.launch", ["--config", str(ROOT / "training/ppo/cfgs/digits.yaml"), "--dry-run",
                                               "--override", f"data.predictor_snapshot={path}"]),
    ]


def class_0(sentinel: str = "{s}") -> list[Case]:
    cases = []
    readers = [r for r in _file_readers("{d}/evil.pkl") if r[0] in ("table-show", "sample", "distill-init",
                                                                     "rdpo-start")]
    readers.append(("edm-show", "tools.edm_cli", ["show", "{d}/evil.pkl"]))
    for name, data in payloads(sentinel).items():
        for reader, module, argv in readers:
            cases.append(Case(0, f"{reader}:{name}", module, argv, ("{d}/evil.pkl",), {"evil.pkl": data}))
    return cases


def class_1() -> list[Case]:
    cases = []
    heavy = ("bench", "distill-init", "rdpo-start")
    for number, (name, data) in enumerate(table_bombs().items()):
        for reader, module, argv in _file_readers("{d}/" + name):
            if reader in heavy and number % 3 != heavy.index(reader):   # each bomb through one of the heavy readers
                continue
            cases.append(Case(1, f"{reader}:{name}", module, argv, ("{d}/" + name,), {name: data}))
    special = {   # paths that are not regular files
        "dev-zero": "/dev/zero", "fifo": "{d}/fifo.pkl", "directory": "{d}", "missing": "{d}/nothing.pkl",
        "symlink-loop": "{d}/loop.pkl", "dev-urandom-json": "/dev/urandom",
    }

    def make_special(folder: Path) -> None:
        os.mkfifo(folder / "fifo.pkl")
        os.symlink(folder / "loop.pkl", folder / "loop.pkl")

    for name, path in special.items():
        for reader, module, argv in _file_readers(path)[:3]:
            cases.append(Case(1, f"{reader}:{name}", module, argv, (path,), setup=make_special))
    for flag, value in (("--prompt-file", "/dev/zero"), ("--prompt-file", "{d}/fifo.pkl")):
        cases.append(Case(1, f"sample:prompt-file-{Path(value).name}", "sample", _sample(flag, value), (value,),
                          setup=make_special))
    from backends.prompts import MAX_PROMPT_FILE_BYTES

    cases.append(Case(1, "sample:prompt-file-over-limit", "sample", _sample("--prompt-file", "{d}/big.txt"),
                      ("{d}/big.txt", "limit"), setup=lambda d: _sparse(d / "big.txt", MAX_PROMPT_FILE_BYTES + 1)))
    cases.append(Case(1, "sample:prompt-file-64MiB-of-NUL", "sample", _sample("--prompt-file", "{d}/nul.txt"),
                      ("{d}/nul.txt", "NUL"), setup=lambda d: _sparse(d / "nul.txt", 64 << 20)))
    cases.append(Case(1, "sample:prompt-file-one-64MiB-line", "sample", _sample("--prompt-file", "{d}/line.txt"),
                      ("{d}/line.txt", "names no digit"),
                      setup=lambda d: (d / "line.txt").write_bytes(b"x" * (64 << 20))))
    cases.append(Case(1, "distill:yaml-alias-bomb", "training.distill.launch", ["--config", "{d}/bomb.yaml"],
                      ("{d}/bomb.yaml",), {"bomb.yaml": _yaml_bomb()}))
    cases.append(Case(1, "rdpo:yaml-alias-bomb", "training.ppo.launch", ["--config", "{d}/bomb.yaml", "--dry-run"],
                      ("{d}/bomb.yaml",), {"bomb.yaml": _yaml_bomb()}))
    for name, (width, height) in {"png-9e8-pixels": (30000, 30000), "png-1.4e8-pixels": (12000, 12000),
                                  "png-1x10^8": (1, 100_000_000)}.items():
        cases.append(Case(1, f"score:{name}", "training.rewards.score_cli",
                          ["--head", "image_contrast", "--images", "{d}/imgs"], ("{d}/imgs/000000.png",),
                          {"imgs/000000.png": (lambda w=width, h=height: _png(w, h))}))
    return cases


def class_2() -> list[Case]:
    cases = []
    for name, (make, words) in network_cases().items():
        path = "{d}/" + name
        readers = [("edm-show", "tools.edm_cli", ["show", path]),
                   ("edm-convert", "tools.edm_cli", ["convert", path, "{d}/out.safetensors"]),
                   ("sample-model-path", "sample", ["--backend", "edm", "--solver", "euler", "--steps", "2",
                                                    "--model_path", path, "--seeds", "0", "--outdir", "{d}/out",
                                                    "--device", "cpu"])]
        for reader, module, argv in readers:
            cases.append(Case(2, f"{reader}:{name}", module, argv, (path, *words), {name: make}))
    return cases


def class_3() -> list[Case]:
    """Command lines: each must be refused with one line naming the argument (the words)."""
    t = str(DIGITS_TABLE)
    sample = {
        "outdir-is-file": (_sample("--outdir", "{d}/file"), ("--outdir", "is a file")),
        "outdir-under-file": (_sample("--outdir", "{d}/file/sub"), ("--outdir",)),
        "backend-config-unknown-key": (_sample("--backend-config", '{"bogus": 1}'), ("bogus",)),
        "backend-config-not-json": (_sample("--backend-config", "{x"), ("--backend-config",)),
        "backend-config-list": (_sample("--backend-config", "[1]"), ("--backend-config",)),
        "device-tpu9": (_sample("--device", "tpu9"), ("--device",)),
        "device-cuda7": (_sample("--device", "cuda:7"), ("--device",)),
        "class-99": (_sample("--class", "99"), ("99",)),
        "class-abc": (_sample("--class", "abc"), ("--class",)),
        "prompt-not-a-class": (_sample("--prompt", "a cat"), ("a cat",)),
        "prompt-and-class": (_sample("--prompt", "3", "--class", "3"), ("--prompt", "--class")),
        "prompt-file-missing": (_sample("--prompt-file", "{d}/none.txt"), ("{d}/none.txt",)),
        "prompt-file-not-utf8": (_sample("--prompt-file", "{d}/latin1.txt"), ("{d}/latin1.txt", "UTF-8")),
        "prompt-file-empty": (_sample("--prompt-file", "{d}/empty.txt"), ("{d}/empty.txt",)),
        "seeds-empty": (_sample("--seeds", ","), ("seeds",)),
        "seeds-words": (_sample("--seeds", "one-two"), ("one-two",)),
        "seeds-reversed": (_sample("--seeds", "9-3"), ("9-3",)),
        "seeds-negative": (_sample("--seeds", "-3"), ("-3",)),
        "batch-zero": (_sample("--batch", "0"), ("--batch",)),
        "batch-negative": (_sample("--batch", "-4"), ("--batch",)),
        "batch-abc": (_sample("--batch", "abc"), ("--batch",)),
        "table-missing": (["--predictor_path", "{d}/none.pkl", "--seeds", "0", "--outdir", "{d}/o"], ("{d}/none.pkl",)),
        "table-and-solver": (_sample("--solver", "euler", "--steps", "3"), ("--predictor_path", "--solver")),
        "solver-unknown": (["--solver", "magic", "--steps", "3", "--outdir", "{d}/o", "--seeds", "0"], ("magic",)),
        "solver-no-steps": (["--solver", "euler", "--outdir", "{d}/o", "--seeds", "0"], ("--steps",)),
        "solver-steps-zero": (["--solver", "euler", "--steps", "0", "--outdir", "{d}/o", "--seeds", "0"], ("--steps",)),
        "backend-unknown": (["--solver", "euler", "--steps", "3", "--backend", "nope", "--outdir", "{d}/o",
                             "--seeds", "0"], ("nope",)),
        "backend-factory-missing": (["--solver", "euler", "--steps", "3", "--backend", "nomodule.x:make",
                                     "--outdir", "{d}/o", "--seeds", "0"], ("nomodule",)),
        "schedule-unknown": (["--solver", "euler", "--steps", "3", "--schedule", "zigzag", "--outdir", "{d}/o"],
                             ("--schedule",)),
        "afs-with-table": (_sample("--afs"), ("--afs",)),
        "resolution-mismatch": (_sample("--resolution", "64"), ("resolution",)),
        "compile-cache-without-compile": (_sample("--compile-cache", "{d}/c"), ("--compile-cache",)),
        "shard-points-without-table": (["--solver", "euler", "--steps", "3", "--shard-points", "--outdir", "{d}/o",
                                        "--seeds", "0"], ("--shard-points",)),
        "unknown-flag": (_sample("--bogus"), ("--bogus",)),
        "model-path-missing": (["--backend", "edm", "--solver", "euler", "--steps", "2", "--model_path",
                                "{d}/none.pkl", "--outdir", "{d}/o", "--seeds", "0", "--device", "cpu"],
                               ("{d}/none.pkl",)),
    }
    bench = {
        "solver-unknown": (["--solvers", "magic"], ("magic",)),
        "nfe-zero": (["--nfe", "0"], ("--nfe",)),
        "nfe-negative": (["--nfe", "-3"], ("--nfe",)),
        "nfe-abc": (["--nfe", "abc"], ("--nfe",)),
        "batch-zero": (["--batch", "0"], ("--batch",)),
        "num-samples-zero": (["--num-samples", "0"], ("--num-samples",)),
        "table-no-equals": (["--table", t], ("NAME=PATH",)),
        "table-missing": (["--table", "x={d}/none.pkl"], ("{d}/none.pkl",)),
        "table-code": (["--table", "x={d}/evil.pkl"], ("{d}/evil.pkl", "os.system")),
        "schedules-unknown": (["--schedules", "zigzag"], ("--schedules",)),
        "rho-with-schedules": (["--schedules", "polynomial,logsnr", "--rho", "3"], ("--rho",)),
        "model-unknown": (["--model", "nope"], ("nope",)),
        "backend-config-not-json": (["--model", "digits_edm", "--backend-config", "{x"], ("--backend-config",)),
        "model-path-for-analytic": (["--model", "gmm", "--model-path", "x"], ("--model-path",)),
        "device-for-analytic": (["--model", "gmm", "--device", "cpu"], ("--device",)),
        "ref-steps-abc": (["--ref-steps", "abc"], ("--ref-steps",)),
    }
    table = {
        "show-missing": (["show", "{d}/none.pkl"], ("{d}/none.pkl",)),
        "convert-bad-suffix": (["convert", t, "--out", "{d}/x.txt"], (".txt",)),
        "convert-out-is-dir": (["convert", t, "--out", "{d}"], ("{d}",)),
        "uniform-no-out": (["uniform", "--num-steps", "4"], ("--out",)),
        "uniform-steps-1": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "1"], ("num",)),
        "uniform-steps-abc": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "abc"], ("--num-steps",)),
        "uniform-points-0": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--num-points", "0"], ("--num-points",)),
        "uniform-positions-abc": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--positions", "a,b"],
                                  ("a,b",)),
        "uniform-position-1": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--positions", "0.5,1.0"],
                               ("positions",)),
        "uniform-backend-unknown": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--backend", "nope"],
                                    ("nope",)),
        "uniform-backend-config-list": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--backend-config",
                                         "[1]"], ("--backend-config",)),
        "uniform-discrete-analytic": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--schedule", "discrete",
                                       "--backend", "gmm"], ("discrete",)),
        "uniform-sigma-order": (["uniform", "--out", "{d}/u.pkl", "--num-steps", "4", "--sigma-min", "90"],
                                ("sigma",)),
        "no-command": ([], ("command",)),
        "unknown-command": (["explode"], ("explode",)),
    }
    distill_config = str(ROOT / "configs/distill/digits.yaml")
    distill = {
        "override-no-equals": (["--config", distill_config, "--override", "optim.lr"], ("optim.lr",)),
        "override-unknown-key": (["--config", distill_config, "--override", "optim.bogus=1"], ("optim.bogus",)),
        "override-list-value": (["--config", distill_config, "--override", "optim.lr=[1,2]"], ("optim.lr",)),
        "override-dict-value": (["--config", distill_config, "--override", "batch={a: 1}"], ("batch",)),
        "override-wrong-type": (["--config", distill_config, "--override", "batch=abc"], ("batch",)),
        "batch-zero": (["--config", distill_config, "--override", "batch=0"], ("batch",)),
        "backend-unknown": (["--config", distill_config, "--override", "backend.name=nope"], ("nope",)),
        "backend-keyword-unknown": (["--config", distill_config, "--override", "backend.bogus=1"], ("bogus",)),
        "config-missing": (["--config", "{d}/none.yaml"], ("{d}/none.yaml",)),
        "config-not-yaml": (["--config", "{d}/latin1.txt"], ("{d}/latin1.txt",)),
        "config-a-list": (["--config", "{d}/list.yaml"], ("{d}/list.yaml",)),
        "resume-missing": (["--resume", "{d}/none"], ("{d}/none",)),
        "resume-truncated-checkpoint": (["--resume", "{d}/run"], ("{d}/run",)),
        "dataset-unknown": (["--dataset_name", "nope"], ("nope",)),
        "init-missing": (["--config", distill_config, "--override", "student.init={d}/none.pkl"], ("student.init",)),
        "num-points-zero": (["--config", distill_config, "--override", "student.num_points=0"], ("num_points",)),
    }
    rdpo_config = str(ROOT / "training/ppo/cfgs/digits.yaml")
    rdpo = {
        "no-config": ([], ("--config",)),
        "config-missing": (["--config", "{d}/none.yaml"], ("{d}/none.yaml",)),
        "override-unknown": (["--config", rdpo_config, "--dry-run", "--override", "ppo.bogus=1"], ("ppo.bogus",)),
        "override-no-equals": (["--config", rdpo_config, "--dry-run", "--override", "ppo.steps"], ("ppo.steps",)),
        "start-table-missing": (["--config", rdpo_config, "--dry-run", "--override",
                                 "data.predictor_snapshot={d}/none.pkl"], ("{d}/none.pkl",)),
        "reward-unknown": (["--config", rdpo_config, "--dry-run", "--override", "reward.type=nope"], ("nope",)),
        "max-steps-abc": (["--config", rdpo_config, "--max-steps", "abc"], ("--max-steps",)),
        "resume-missing": (["--resume", "{d}/none", "--dry-run"], ("{d}/none",)),
        "learning-rate-negative": (["--config", rdpo_config, "--dry-run", "--override", "ppo.learning_rate=-1"],
                                   ("learning_rate",)),
    }
    export = {
        "run-missing": (["{d}/none"], ("{d}/none",)),
        "checkpoint-truncated": (["{d}/run", "--checkpoint", "{d}/run/checkpoint.pt"], ("{d}/run",)),
        "kind-unknown": (["{d}", "--kind", "best"], ("--kind",)),
    }
    score = {
        "images-missing": (["--head", "image_contrast", "--images", "{d}/none"], ("{d}/none",)),
        "images-empty": (["--head", "image_contrast", "--images", "{d}/emptydir"], ("{d}/emptydir",)),
        "head-unknown": (["--head", "nope", "--images", "{d}/imgs"], ("nope",)),
        "batch-zero": (["--head", "image_contrast", "--images", "{d}/imgs", "--batch-size", "0"], ("--batch-size",)),
        "image-junk": (["--head", "image_contrast", "--images", "{d}/junk"], ("{d}/junk/000000.png",)),
        "image-empty-file": (["--head", "image_contrast", "--images", "{d}/zero"], ("{d}/zero/000000.png",)),
        "prompts-missing": (["--head", "digit_class", "--images", "{d}/imgs", "--prompts", "{d}/none.txt"],
                            ("{d}/none.txt",)),
        "prompts-too-few": (["--head", "digit_class", "--images", "{d}/imgs2", "--prompts", "{d}/one.txt"],
                            ("prompt",)),
        "option-no-equals": (["--head", "image_contrast", "--images", "{d}/imgs", "--option", "x"], ("x",)),
        "option-unknown": (["--head", "image_contrast", "--images", "{d}/imgs", "--option", "bogus=1"], ("bogus",)),
        "weights-missing": (["--head", "hps", "--images", "{d}/imgs", "--prompts", "{d}/one.txt", "--weights",
                             "{d}/none.pt"], ("{d}/none.pt",)),
        "image-size-zero": (["--head", "image_contrast", "--images", "{d}/imgs", "--image-size", "0"],
                            ("--image-size",)),
    }
    fid = {
        "no-ref": (["--images", "{d}/imgs"], ("--ref",)),
        "images-missing": (["--images", "{d}/none", "--ref", "{d}/imgs"], ("{d}/none",)),
        "ref-npz-junk": (["--images", "{d}/imgs", "--ref", "{d}/junk.npz"], ("{d}/junk.npz",)),
        "kid-without-ref": (["--images", "{d}/imgs", "--save-stats", "{d}/s.npz", "--kid"], ("--kid",)),
        "weights-missing": (["--images", "{d}/imgs", "--ref", "{d}/imgs", "--weights", "{d}/none.pt"], ("{d}/none.pt",)),
    }
    edm = {
        "show-missing": (["show", "{d}/none.pkl"], ("{d}/none.pkl",)),
        "convert-bad-target": (["convert", "{d}/none.pkl", "{d}/x.pt"], (".safetensors",)),
        "no-command": ([], ("command",)),
    }
    reproduce = {
        "no-nfe": (["--dataset", "cifar10", "--method", "epd"], ("--nfe",)),
        "nfe-and-all": (["--dataset", "cifar10", "--method", "epd", "--all", "--nfe", "3"], ("--all",)),
        "nfe-abc": (["--dataset", "cifar10", "--method", "epd", "--nfe", "abc"], ("abc",)),
        "method-unknown": (["--dataset", "cifar10", "--nfe", "3", "--method", "magic"], ("magic",)),
        "dataset-unknown": (["--dataset", "nope", "--method", "epd", "--nfe", "3"], ("--dataset",)),
        "num-images-1": (["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--num-images", "1"], ("--num-images",)),
        "batch-zero": (["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--batch", "0"], ("--batch",)),
        "seeds-bad": (["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--seeds", "x"], ("'x'",)),
        "seeds-vs-num-images": (["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--seeds", "0-9", "--num-images", "5"],
                                ("--num-images",)),
        "table-missing": (["--dataset", "cifar10", "--method", "epd", "--nfe", "3", "--table", "{d}/none.pkl",
                           "--dry-run"], ("{d}/none.pkl",)),
    }
    pretrained = {
        "no-command": ([], ("command",)),
        "where-unknown": (["where", "nope"], ("nope",)),
    }
    random_pipeline = {
        "model-unknown": (["--model", "nope", "--out", "{d}/p"], ("--model",)),
        "no-out": (["--model", "sd15"], ("--out",)),
    }
    groups = {"sample": sample, "bench.exact": bench, "tools.table_cli": table, "training.distill.launch": distill,
              "training.ppo.launch": rdpo, "training.ppo.export": export, "training.rewards.score_cli": score,
              "training.rewards.fid": fid, "tools.edm_cli": edm, "scripts.reproduce_iccv": reproduce,
              "training.rewards.pretrained": pretrained, "tools.random_pipeline": random_pipeline}
    cases = []
    for module, entries in groups.items():
        for name, (argv, words) in entries.items():
            cases.append(Case(3, f"{module}:{name}", module, argv, words, setup=_cli_fixtures))
    cases.append(Case(3, "training.distill.launch:resume-grid-changed", "training.distill.launch",
                      ["--resume", "{d}/run", "--override", "schedule.rho=3", "--no-progress"], ("{d}/run", "grid"),
                      setup=finished_run))
    return cases


def _cli_fixtures(folder: Path) -> None:
    """The files class 3's command lines point at."""
    (folder / "file").write_text("x")
    (folder / "latin1.txt").write_bytes(b"\xff\xfe caf\xe9\n")
    (folder / "empty.txt").write_text("\n\n")
    (folder / "one.txt").write_text("3\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    (folder / "junk.npz").write_bytes(b"PK\x03\x04junk")
    for sub in ("imgs", "imgs2", "junk", "zero", "emptydir"):
        (folder / sub).mkdir()
    (folder / "imgs" / "000000.png").write_bytes(_png(8, 8))
    for i in range(2):
        (folder / "imgs2" / f"00000{i}.png").write_bytes(_png(8, 8))
    (folder / "junk" / "000000.png").write_bytes(b"not a png")
    (folder / "zero" / "000000.png").write_bytes(b"")
    run = folder / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)      # a write cut short
    (run / "config.yaml").write_text((ROOT / "configs/distill/digits.yaml").read_text())


def class_4() -> list[Case]:
    """Inputs that once gave a wrong image (or table) with exit status 0."""
    from test_table import BAD

    cases = []
    for name, (mutate, field_name, why) in BAD.items():
        data = _ours()
        mutate(data)
        for suffix, encode in ((".json", lambda d: json.dumps(d).encode()), (".pkl", lambda d: pickle.dumps(d, 4))):
            file = f"bad-{name}{suffix}"
            for reader, module, argv in _file_readers("{d}/" + file)[:3]:
                cases.append(Case(4, f"{reader}:{file}", module, argv, ("{d}/" + file, field_name),
                                  {file: encode(data)}))
    sample_args = {
        "guidance-nan": (_sample("--backend-config", '{"guidance": NaN}'), ("guidance", "finite")),
        "guidance-infinity": (_sample("--backend-config", '{"guidance": Infinity}'), ("guidance", "finite")),
        "guidance-negative": (_sample("--backend-config", '{"guidance": -2}'), ("guidance",)),
        "guidance-string": (_sample("--backend-config", '{"guidance": "2"}'), ("guidance",)),
        "class-negative": (_sample("--class", "-1"), ("--class",)),
        "seed-2^32": (_sample("--seeds", "4294967296"), ("2^32",)),
        "seed-range-past-2^32": (_sample("--seeds", "4294967290-4294967300"), ("2^32",)),
        "anonymous-table": (_sample(table="{d}/anonymous.pkl"), ("records no backend", "--backend")),
        "gmm-table-on-digits": (_sample("--backend", "digits", table=GMM_TABLE), ("'gmm'", "--force-backend")),
        "huge-range-then-bad-batch": (_sample("--seeds", "0-4294967295", "--batch", "0"), ("--batch",)),
    }
    for name, (argv, words) in sample_args.items():
        cases.append(Case(4, f"sample:{name}", "sample", argv, words, setup=_anonymous_table))
    cases.append(Case(4, "bench:table-of-another-model", "bench.exact",
                      ["--model", "gmm", "--solvers", "euler", "--nfe", "3", "--num-samples", "4", "--batch", "4",
                       "--table", f"d={DIGITS_TABLE}", "--no-cache"], ("'digits'", "--force-backend")))
    return cases


def finished_run(folder: Path) -> None:
    """A short finished distillation run at ``folder/run`` (a copy of its table at ``folder/stamp``)."""
    import training.distill.launch as launch

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        launch.main(["--config", str(ROOT / "configs/distill/gmm.yaml"), "--override", f"outdir={folder}/runs",
                     "--override", "total_kimg=0.064", "--override", "batch=32", "--no-progress"])
    run = next(p for p in (folder / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))
    (folder / "stamp").write_bytes((run / "table.pkl").read_bytes())
    (folder / "run").symlink_to(run)


def _anonymous_table(folder: Path) -> None:
    from solvers.table import save_table, uniform_table

    save_table(uniform_table(np.array([80.0, 5.0, 0.5, 0.002])), folder / "anonymous.pkl")


def class_5() -> list[Case]:
    """Debris and permissions: these run to success and check what they left."""

    def killed_writer(folder: Path) -> None:
        images = folder / "out" / "000000"
        images.mkdir(parents=True)
        for name in (".000000.png.k3j2x.tmp", ".000001.json.q8w1z.tmp"):     # left by a kill -9 two minutes ago
            (images / name).write_bytes(b"")
            os.utime(images / name, (time.time() - 120, time.time() - 120))
        (images / ".000005.png.live1.tmp").write_bytes(b"")       # another process's write in progress: kept

    def no_debris(folder: Path, out: str, err: str) -> str | None:
        images = folder / "out" / "000000"
        left = sorted(p.name for p in images.iterdir() if p.name.startswith("."))
        names = sorted(p.name for p in images.iterdir() if not p.name.startswith("."))
        if left != [".000005.png.live1.tmp"]:
            return f"temporaries left: {left}"
        return None if names == ["000000.json", "000000.png", "000001.json", "000001.png"] else f"files {names}"

    def normal_modes(folder: Path, out: str, err: str) -> str | None:
        wrong = [f"{p.name} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in (folder / "out").rglob("*")
                 if p.is_file() and stat.S_IMODE(p.stat().st_mode) != 0o666 & ~_umask()]
        return f"modes {wrong}" if wrong else None

    def symlinked_output(folder: Path) -> None:
        (folder / "out" / "000000").mkdir(parents=True)
        (folder / "target.txt").write_text("keep me")
        os.symlink(folder / "target.txt", folder / "out" / "000000" / "000000.png")    # no sidecar: not done

    def link_replaced(folder: Path, out: str, err: str) -> str | None:
        if (folder / "target.txt").read_text() != "keep me":
            return "the symlink's target was overwritten"
        image = folder / "out" / "000000" / "000000.png"
        return None if not image.is_symlink() and image.stat().st_size > 0 else "the symlink is still there"

    def scored(folder: Path, out: str, err: str) -> str | None:
        result = json.loads(out)
        return None if result["metadata"]["num_images"] == 2 else f"scored {result['metadata']['num_images']}"

    def scorer_folder(folder: Path) -> None:
        (folder / "imgs").mkdir()
        for i in range(2):
            (folder / "imgs" / f"00000{i}.png").write_bytes(_png(8, 8))
        (folder / "imgs" / ".000002.png").write_bytes(b"")
        (folder / "imgs" / ".000003.png.x1.tmp").write_bytes(b"")

    def not_rewritten(folder: Path, out: str, err: str) -> str | None:
        return None if (folder / "run" / "table.pkl").read_bytes() == (folder / "stamp").read_bytes() \
            else "the finished run's table.pkl was rewritten"

    def strict_umask(folder: Path) -> None:
        os.umask(0o027)

    def group_modes(folder: Path, out: str, err: str) -> str | None:
        wrong = [f"{p.name} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in (folder / "out").rglob("*")
                 if p.is_file() and stat.S_IMODE(p.stat().st_mode) != 0o640]
        return f"modes under umask 027: {wrong}" if wrong else None

    def result_mode(folder: Path, out: str, err: str) -> str | None:
        mode = stat.S_IMODE((folder / "result.json").stat().st_mode)
        return None if mode == 0o666 & ~_umask() else f"result.json mode {oct(mode)}"

    forced = _sample("--backend", "digits", "--force-backend", table=GMM_TABLE)
    return [
        Case(5, "sample:resume-after-kill", "sample", _sample("--grid"), expect="ok", setup=killed_writer,
             check=no_debris),
        Case(5, "sample:file-modes", "sample", _sample(), expect="ok", check=normal_modes),
        Case(5, "sample:symlinked-image-path", "sample", _sample(), expect="ok", setup=symlinked_output,
             check=link_replaced),
        Case(5, "score:hidden-temporaries", "training.rewards.score_cli",
             ["--head", "image_contrast", "--images", "{d}/imgs"], expect="ok", setup=scorer_folder, check=scored),
        Case(5, "distill:resume-finished-run", "training.distill.launch", ["--resume", "{d}/run", "--no-progress"],
             expect="ok", setup=finished_run, check=not_rewritten),
        Case(5, "sample:file-modes-umask-027", "sample", _sample(), expect="ok", setup=strict_umask,
             check=group_modes),
        Case(5, "score:result-file-mode", "training.rewards.score_cli", ["--head", "image_contrast", "--images",
             "{d}/imgs", "--output-json", "{d}/result.json"], expect="ok", setup=scorer_folder, check=result_mode),
        Case(5, "sample:forced-backend-warns", "sample", forced, expect="ok",
             check=lambda d, out, err: None if "warning: running the table" in err else "no warning"),
    ]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _png(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = zlib.compress(b"\x00" * (width + 1) * min(height, 64), 9)     # the header is what matters
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _yaml_bomb() -> bytes:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return ("\n".join(lines) + "\n").encode()


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


def all_cases(sentinel: str = "{s}") -> dict[int, list[Case]]:
    """Every case by class; the payloads of class 0 name ``sentinel`` (the file they would create)."""
    return {0: class_0(sentinel), 1: class_1(), 2: class_2(), 3: class_3(), 4: class_4(), 5: class_5()}


# --- the runner ------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith(key + ":")), None)
    except OSError:
        return None


def start_peak() -> int:
    """Reset the process's peak resident memory where Linux allows it (``/proc/self/clear_refs``), so that the
    peak read after a case is that case's own; returns the resident memory now (KB). Elsewhere the peak stays
    the process's high-water mark since it started."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _status_kb("VmRSS") or 0
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_kb() -> int:
    """The peak resident memory since :func:`start_peak` (KB)."""
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the code under test swallows it."""


def _subst(text: str, folder: Path, sentinel: Path) -> str:
    return text.replace("{d}", str(folder)).replace("{s}", str(sentinel))


def run_case(case: Case, folder: Path, sentinel: Path, spawned: list[str], time_bound_s: int = TIME_BOUND_S,
             memory_bound_mb: float = MEMORY_BOUND_MB) -> dict:
    for name, data in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            _sparse(path, 65 << 20)
            continue
        path.write_bytes(data() if callable(data) else data)
    umask = _umask()          # a case may change it (class 5); the next one starts from the same
    if case.setup:
        case.setup(folder)
    argv = [_subst(a, folder, sentinel) for a in case.argv]
    words = [_subst(w, folder, sentinel) for w in case.words]
    module_name, _, function = case.module.partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    out, err = io.StringIO(), io.StringIO()
    rss_before = start_peak()
    start = time.perf_counter()
    spawned.clear()
    outcome, detail, code = None, "", None

    def alarm(*_: Any) -> None:
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(time_bound_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = entry(argv)
    except _Timeout:
        outcome, detail = "hang", f"over {time_bound_s} s"
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int) and done.code is not None:
            err.write(str(done.code) + "\n")
    except MemoryError:
        outcome, detail = "memory", "MemoryError"
    except BaseException as exc:  # noqa: BLE001 - any escape is the finding
        outcome, detail = "traceback", f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.umask(umask)
    seconds = time.perf_counter() - start
    peak = peak_kb()
    grown_mb = (peak - rss_before) / 1024
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith("warning:")
             and "\r" not in line and not line.startswith(("sampling", "  0%"))]
    if sentinel.exists() or spawned:
        outcome, detail = "code", f"sentinel {sentinel.exists()}, events {spawned[:3]}"
    elif outcome is None and grown_mb > memory_bound_mb:
        outcome, detail = "memory", f"peak grew {grown_mb:.0f} MB"
    elif outcome is None and seconds > time_bound_s:
        outcome, detail = "hang", f"{seconds:.0f} s"
    elif outcome is None and case.expect == "error":
        missing = [w for w in words if not lines or w not in lines[0]]
        if code == 0:
            outcome, detail = "wrong", "exit status 0"
        elif code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not missing:
            outcome, detail = "clear", lines[0][:300]
        elif code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            outcome, detail = "unclear", f"{lines[0][:300]} (lacks {missing})"
        else:
            outcome, detail = "traceback", f"exit {code}: {' | '.join(lines[-3:])[:300]}"
    elif outcome is None:
        problem = f"exit {code}: {' | '.join(lines[-3:])[:300]}" if code != 0 else \
            (case.check(folder, out.getvalue(), err.getvalue()) if case.check else None)
        outcome, detail = ("ok", "") if problem is None else ("wrong", problem)
    return {"class": case.klass, "name": case.name, "outcome": outcome, "detail": detail,
            "seconds": round(seconds, 3), "grown_mb": round(grown_mb, 1), "peak_kb": peak}


def run_class(klass: int, emit: Callable[[dict], None]) -> dict:
    """Run every case of ``klass`` here (after its imports), each in a fresh folder; returns the peak growth."""
    spawned: list[str] = []

    def audit(event: str, _args: Any) -> None:
        if event.startswith(SPAWN_EVENTS):
            spawned.append(event)

    with tempfile.TemporaryDirectory() as scratch:
        sentinel = Path(scratch) / "PWNED"
        cases = all_cases(str(sentinel))[klass]
        for module in sorted({c.module.partition(":")[0] for c in cases}):
            importlib.import_module(module)
        import torch

        torch.set_num_threads(1)
        baseline = start_peak()
        highest = baseline
        sys.addaudithook(audit)
        for number, case in enumerate(cases):
            folder = Path(scratch) / f"case{number:04d}"
            folder.mkdir()
            result = run_case(case, folder, sentinel, spawned)
            highest = max(highest, result.pop("peak_kb"))
            emit(result)
    return {"class": klass, "cases": len(cases), "peak_grown_mb": (highest - baseline) / 1024}


OUTCOMES = ("clear", "ok", "unclear", "traceback", "wrong", "hang", "memory", "code")


def report(results: list[dict]) -> str:
    rows = ["| class | inputs | " + " | ".join(OUTCOMES) + " |", "|---|---:|" + "---:|" * len(OUTCOMES)]
    for klass, title in CLASSES.items():
        mine = [r for r in results if r["class"] == klass]
        counts = [sum(r["outcome"] == o for r in mine) for o in OUTCOMES]
        rows.append(f"| {klass}. {title} | {len(mine)} | " + " | ".join(map(str, counts)) + " |")
    totals = [sum(r["outcome"] == o for r in results) for o in OUTCOMES]
    rows.append(f"| all | {len(results)} | " + " | ".join(map(str, totals)) + " |")
    bad = [r for r in results if r["outcome"] not in ("clear", "ok")]
    rows += ["", f"{len(bad)} case(s) not as expected:"] + [f"- [{r['class']}] {r['name']}: {r['outcome']}: "
                                                             f"{r['detail']}" for r in bad]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--class", dest="klass", type=int, choices=sorted(CLASSES))
    parser.add_argument("--json", action="store_true", help="one JSON line per case, then a summary line")
    parser.add_argument("--report", action="store_true", help="run every class (each in its own process)")
    args = parser.parse_args(argv)
    if args.report:
        import subprocess

        results = []
        for klass in CLASSES:
            proc = subprocess.run([sys.executable, __file__, "--class", str(klass), "--json"], capture_output=True,
                                  text=True, cwd=ROOT)
            lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
            results += [r for r in lines if "outcome" in r]
            summary = next((r for r in lines if "peak_grown_mb" in r), None)
            print(f"class {klass}: {summary}", file=sys.stderr)
        print(report(results))
        return 0
    if args.klass is None:
        parser.error("give --class N or --report")
    stdout = sys.stdout
    summary = run_class(args.klass, lambda r: print(json.dumps(r) if args.json else
                                                    f"{r['outcome']:>9}  {r['name']}  {r['detail'][:120]}",
                                                    file=stdout, flush=True))
    print(json.dumps(summary), file=stdout)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
