"""The hostile-input battery (tests/hostile_battery.py, docs/errors.md), one class per fresh process: every case
must end as expected (a one-line refusal naming the file or argument, or a checked success), and no case may run
code, hang or grow the process's peak memory past the bound."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hostile_battery as battery

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalogue() -> dict:
    return battery.all_cases()


@pytest.mark.parametrize("klass", sorted(battery.CLASSES))
def test_every_input_of_the_class_is_handled(klass, catalogue):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile_battery.py"), "--class", str(klass), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cases, summary = rows[:-1], rows[-1]
    assert summary["cases"] == len(cases) == len(catalogue[klass]) > 0
    assert [c["name"] for c in cases] == [c.name for c in catalogue[klass]]
    bad = [f"{c['name']}: {c['outcome']}: {c['detail']}" for c in cases if c["outcome"] not in ("clear", "ok")]
    assert not bad, "\n".join(bad)
    assert summary["peak_grown_mb"] < battery.MEMORY_BOUND_MB, summary
    assert max(c["seconds"] for c in cases) < battery.TIME_BOUND_S
    assert time.perf_counter() - start < 600


def test_the_catalogue_covers_every_entry_point_and_class(catalogue):
    modules = {case.module for cases in catalogue.values() for case in cases}
    assert {"sample", "bench.exact", "tools.table_cli", "tools.edm_cli", "training.distill.launch",
            "training.ppo.launch", "training.ppo.export", "training.rewards.score_cli", "training.rewards.fid",
            "training.rewards.pretrained", "scripts.reproduce_iccv", "tools.random_pipeline"} <= modules
    assert sum(map(len, catalogue.values())) >= 420
    names = [case.name for cases in catalogue.values() for case in cases]
    assert len(names) == len(set(names))


# --- the detectors themselves: each outcome is reported when it happens ------------------------------------------
def unsafe_reader(argv: list[str]) -> int:
    """What the authors' loader amounts to: a plain pickle.load of an untrusted file."""
    with open(argv[0], "rb") as handle:
        pickle.load(handle)   # noqa: S301 - deliberately unsafe: the battery must notice
    return 2


def crashing(argv: list[str]) -> int:
    raise RuntimeError("a bug")


def accepting(argv: list[str]) -> int:
    return 0


def sleeping(argv: list[str]) -> int:
    time.sleep(5)
    return 2


def allocating(argv: list[str]) -> int:
    block = np.ones(int(argv[0]) << 20, dtype=np.uint8)
    print(f"error: refused after touching {block.sum() >> 20} MB", file=sys.stderr)
    return 2


def two_lines(argv: list[str]) -> int:
    print("error: first\nsecond", file=sys.stderr)
    return 2


CONTROLS = [   # (function above, argv, the outcome the runner must report)
    ("allocating", ["400"], "memory"),      # first: the peak is a high-water mark, so later cases could hide it
    ("allocating", ["1"], "clear"),
    ("unsafe_reader", ["{d}/evil.pkl"], "code"),
    ("crashing", [], "traceback"),
    ("two_lines", [], "traceback"),
    ("accepting", [], "wrong"),
    ("sleeping", [], "hang"),
]


def run_controls() -> list[str]:
    """Each control through battery.run_case (2 s and 200 MB bounds); returns the outcomes."""
    import tempfile

    outcomes = []
    with tempfile.TemporaryDirectory() as scratch:
        sentinel = Path(scratch) / "PWNED"
        payload = battery.payloads(str(sentinel))["os.system-bare.pkl"]
        for number, (function, argv, _) in enumerate(CONTROLS):
            folder = Path(scratch) / f"case{number}"
            folder.mkdir()
            case = battery.Case(0, function, f"test_hostile_battery:{function}", argv, files={"evil.pkl": payload})
            outcomes.append(battery.run_case(case, folder, sentinel, [], time_bound_s=2, memory_bound_mb=200)["outcome"])
            sentinel.unlink(missing_ok=True)
    return outcomes


def test_the_runner_reports_each_kind_of_failure():
    """In a fresh process, so that the memory control is measured against a small peak."""
    code = "import json, test_hostile_battery as t; print(json.dumps(t.run_controls()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [expected for _, _, expected in CONTROLS]
