"""Property-based fuzzing of the table readers (ours and the authors' format): random byte mutations and
truncations of real files give a clear error naming the file, or a valid table; never a traceback. The crafted
files of each hostile class are in tests/hostile_battery.py (run by tests/test_hostile_battery.py)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeio.limits import LimitError
from solvers.table import TableError, UnsafePickleError, load_table

ROOT = Path(__file__).resolve().parents[1]


# --- fuzzing: mutations and truncations of real files never give a traceback -------------------------------------
REAL = sorted((ROOT / "exps" / "digits").glob("epd-nfe*.pkl"))[:2] + [ROOT / "exps" / "gmm" / "00001-gmm-nfe5" / "table.json"]
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
