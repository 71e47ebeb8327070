"""The RDPO step benchmark (bench/rdpo_step.py): its phase clock, and a CPU dry run of the real trainer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.rdpo_step import PHASES, PhaseClock

ROOT = Path(__file__).resolve().parents[1]


def test_nested_phases_are_taken_out_of_the_enclosing_one():
    clock = PhaseClock(torch.device("cpu"))
    inner = clock.wrap("inner", lambda: time.sleep(0.05))
    outer = clock.wrap("outer", lambda: (time.sleep(0.02), inner(), inner()))
    outer()
    assert 0.09 < clock.seconds["inner"] < 0.3
    assert 0.015 < clock.seconds["outer"] < 0.09    # its own 0.02 s only


def test_cpu_dry_run_reports_the_step_and_its_split(tmp_path):
    out = tmp_path / "rdpo.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench/rdpo_step.py"), "--models", "sd3_1024", "--size", "tiny",
                           "--device", "cpu", "--steps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["sd3_1024"]
    assert result["variant"] == "sd3_1024_eager" and result["rollout_batch_size"] == 8
    assert result["num_steps"] == 11 and result["num_points"] == 2 and result["network_calls_per_rollout"] == 30
    for step in result["per_step"]:
        assert abs(sum(step[p] for p in PHASES) - step["total"]) < 0.05 * step["total"] + 0.01
    assert result["split_s"]["sampling"] > 0 and result["network_tflop_per_rollout"] > 0
    assert "step 1/1" in done.stdout
