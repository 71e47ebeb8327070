"""Low-latency sampling pieces that run on a CPU: the K parallel points split across processes (gloo), the
sample.py flag that uses it, and the replay bookkeeping of the CUDA-graph wrapper (its GPU capture is checked
by bench/gpu_latency.py on the device machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backends.cuda_graphs import GraphedCall, _Captured, _rebuild
from solvers.epd import sample_epd
from solvers.parallel import local_points
from tests.parallel_points_worker import case

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("num_points", [1, 2, 3, 5])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_local_points_partition_the_points(num_points, world):
    shares = [list(range(num_points))[local_points(num_points, rank, world)] for rank in range(world)]
    assert sorted(sum(shares, [])) == list(range(num_points))
    assert max(map(len, shares)) == -(-num_points // world)       # the slowest rank does ceil(K / P)
    with pytest.raises(ValueError):
        local_points(num_points, world, world)


def _torchrun(*args, nproc):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.parametrize("num_points,nproc,plugin", [(3, 2, False), (2, 3, True)])
def test_sharded_points_give_the_one_process_result(tmp_path, num_points, nproc, plugin):
    """Uneven shares (3 points on 2 ranks) and an idle rank (2 points on 3 ranks), with both scale tables, AFS
    and the iPNDM plugin: the all-reduced step equals the one-process step to rounding."""
    backend, table, x, cond = case(num_points, plugin)
    expected = sample_epd(backend, x, table, cond)
    out = tmp_path / "rank0.pt"
    proc = _torchrun("tests/parallel_points_worker.py", out, num_points, "plugin" if plugin else "epd", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))
    # and the points matter: dropping one of them changes the result by far more than that
    assert not torch.allclose(sample_epd(backend, x, table, cond, shard=_OnlyFirst()), expected, atol=1e-3)


class _OnlyFirst:
    """A one-process 'shard' that evaluates only point 0 and does not reduce (a broken split)."""

    def local(self, num_points):
        return slice(0, 1)

    def reduce(self, partial):
        return partial


def test_sample_cli_shard_points_writes_the_one_process_images(tmp_path):
    table = ROOT / "exps" / "digits" / "uniform-start-nfe9.pkl"
    common = ["sample.py", "--predictor_path", table, "--seeds", "0-4", "--prompt", "3", "--no-subdirs"]
    single = subprocess.run([sys.executable, *map(str, common), "--outdir", tmp_path / "one"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert single.returncode == 0, single.stderr
    proc = _torchrun(*common, "--shard-points", "--outdir", tmp_path / "two", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: sampled 5 images" in proc.stdout and "rank 1: sampled 5 images" in proc.stdout
    for seed in range(5):
        one, two = (np.asarray(Image.open(tmp_path / d / f"{seed:06d}.png")) for d in ("one", "two"))
        assert np.array_equal(one, two)
        assert json.loads((tmp_path / "two" / f"{seed:06d}.json").read_text())["seed"] == seed
    bad = subprocess.run([sys.executable, "sample.py", "--solver", "euler", "--steps", "4", "--shard-points"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode == 2 and "--shard-points" in bad.stderr


# -- CUDA-graph replay bookkeeping ------------------------------------------------------------------------
class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay recomputes the function from the static inputs into the
    static output, as a real graph rewrites the same memory."""

    def __init__(self, fn, inputs, output):
        self.fn, self.inputs, self.output = fn, inputs, output

    def replay(self):
        self.output.copy_(self.fn(*self.inputs))


class _FakeGraphedCall(GraphedCall):
    """The bookkeeping of GraphedCall with a stand-in graph that recomputes on replay (runs on the CPU)."""

    def usable(self, leaves):
        return True

    def _capture(self, call, leaves):
        static = [t.clone() for t in leaves]
        args, kwargs = _rebuild(call, iter(static))
        output = self.fn(*args, **kwargs)
        self.captures += 1
        return _Captured(_FakeGraph(lambda *a: self.fn(*args, **kwargs), static, output), static, output)


def test_graph_replay_copies_inputs_in_and_outputs_out():
    calls = []

    def fn(x, scale, bias):
        calls.append(x.shape)
        return x * scale + (0 if bias is None else bias)

    graphed = _FakeGraphedCall(fn, max_graphs=2)
    graphed.captures = 0
    a, s = torch.randn(2, 3), torch.tensor(2.0)
    first = graphed(a, s, None, key=7.5)
    b = torch.randn(2, 3)
    second = graphed(b, s, None, key=7.5)                  # same signature: replay, no new capture
    assert graphed.captures == 1 and graphed.replays == 2
    assert torch.equal(second, b * 2) and torch.equal(first, a * 2)   # the first result was a copy
    second.add_(100)                                        # callers may modify what they get
    assert torch.equal(graphed(b, s, None, key=7.5), b * 2)
    graphed(torch.randn(4, 3), s, None, key=7.5)            # new shape -> new graph
    assert graphed.captures == 2
    eager_before = len(calls)
    out = graphed(a, s, torch.ones(2, 3), key=7.5)          # a third signature (bias given) exceeds max_graphs
    assert graphed.captures == 2 and len(calls) == eager_before + 1 and torch.equal(out, a * 2 + 1)
    graphed.reset()
    graphed(a, s, None, key=4.0)
    assert graphed.captures == 3 and len(graphed.graphs) == 1
    graphed(a, 2.0, None, key=4.0)                          # a plain constant is part of the signature
    assert graphed.captures == 4
    with pytest.raises(TypeError, match="tensors or None"):
        graphed(a, object(), None)


def test_graphs_are_not_used_on_cpu_or_with_autograd():
    graphed = GraphedCall(lambda x: x * 3)
    x = torch.randn(3, requires_grad=True)
    y = graphed(x)                                          # CPU: eager, so gradients flow
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 3.0)) and not graphed.graphs and graphed.replays == 0


def test_latency_benchmark_dry_run_on_cpu(tmp_path):
    """bench/gpu_latency.py end to end on a tiny SD1.5 on the CPU (graphs fall back to eager there), then the
    chart and table script on its JSON."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_latency
    import plot_latency

    out = tmp_path / "bench.json"
    methods = {"diffusers_dpmpp2m_20", "dpmpp2m_20", "epd_k2_nfe20", "dpmpp2m_20_graph", "epd_k2_nfe20_graph",
               "euler_20_graph"}   # the _fast ones compile, minutes on a CPU (tests/test_fast_path.py covers them)
    assert gpu_latency.main(["--models", "sd15", "--size", "tiny", "--device", "cpu", "--repeats", "1",
                             "--methods", ",".join(sorted(methods)), "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert set(result["latency_ms"]) == methods and not result["failures"]
    assert result["checks"]["finite"] and result["checks"]["epd_k2_nfe20_graph_vs_epd_k2_nfe20"] == 0.0
    assert result["call_ms"]["gflop_b2"] == pytest.approx(2 * result["call_ms"]["gflop_b1"], rel=1e-6)
    assert plot_latency.main([str(out), "--png", str(tmp_path / "chart.png"), "--md", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| sd15 | ours DPM++(2M) 20, graphs |" in table and "| 1.000 |" in table
    assert (tmp_path / "chart.png").stat().st_size > 10_000
