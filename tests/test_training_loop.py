"""The training loop both trainers share (training.runs.TrainingLoop): logging, checkpoints, resume with the
log cut back to the checkpoint, early stop, stop_after, and the final export."""

from __future__ import annotations

import json

import torch

from training.runs import TrainingLoop


class Counter(TrainingLoop):
    """A toy trainer: iteration i adds i to a running sum; it stops early once the sum passes ``stop_at``."""

    log_key = "step"
    logs = ("log.jsonl", "eval.jsonl")

    def __init__(self, run_dir, iterations=10, every=3, stop_at=None, stop_after=None):
        self.run_dir, self.rank, self.progress, self.stop_after = run_dir, 0, False, stop_after
        self.iterations, self.start_iteration = iterations, 0
        self.every, self.stop_at, self.total = every, stop_at, torch.zeros((), dtype=torch.float64)
        self.finished = None

    def checkpoint_state(self, done):
        return {"step": done, "total": self.total.clone()}

    def restore(self, saved):
        self.total = saved["total"]
        return int(saved["step"])

    def train_iteration(self, iteration):
        self.total += iteration
        return {"step": iteration + 1, "total": float(self.total)}

    def score(self, done, record):
        with (self.run_dir / "eval.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": done}) + "\n")
        return self.stop_at is not None and float(self.total) >= self.stop_at

    def checkpoints_after(self, done):
        return done % self.every == 0

    def table(self):
        return ("partial", float(self.total))

    def finish(self, seconds, record):
        self.finished = record["step"]
        return ("final", float(self.total))


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_an_interrupted_run_resumes_to_the_same_logs_and_result(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    assert Counter(whole).run() == ("final", 45.0)
    cut = tmp_path / "cut"
    cut.mkdir()
    assert Counter(cut, stop_after=5).run() == ("partial", 10.0)     # checkpoint at 3; steps 4-5 logged twice
    assert steps(cut / "log.jsonl") == [1, 2, 3, 4, 5]
    resumed = Counter(cut)
    assert resumed.run() == ("final", 45.0) and resumed.start_iteration == 3 and resumed.finished == 10
    for name in ("log.jsonl", "eval.jsonl"):            # lines past the checkpoint were dropped and written again
        assert steps(cut / name) == steps(whole / name) == list(range(1, 11))
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 10


def test_early_stop_checkpoints_and_finishes(tmp_path):
    loop = Counter(tmp_path, every=100, stop_at=10)
    assert loop.run() == ("final", 10.0)                # 0 + 1 + 2 + 3 + 4 = 10 after step 5
    assert loop.finished == 5 and steps(tmp_path / "log.jsonl") == [1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 5


def test_safeio_removes_only_stale_temporaries(tmp_path):
    import os
    import time

    from safeio import atomic_write, is_temporary, remove_stale_temporaries

    (tmp_path / "sub").mkdir()
    stale, live = tmp_path / "sub" / ".000001.png.abc.tmp", tmp_path / ".000002.png.def.tmp"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    atomic_write(tmp_path / "000003.png", b"png")
    assert is_temporary(stale) and not is_temporary(tmp_path / "000003.png")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and (tmp_path / "000003.png").read_bytes() == b"png"


def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path):
    import pytest

    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="checkpoint.pt is damaged"):
        Counter(tmp_path).run()
