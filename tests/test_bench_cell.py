"""benchmarks/bench_cell.py and its CUDA-graph runner, benchmarks/graphed_sequence.py
(`GraphedLSTMSequence`: `lstm_sequence` captured as CUDA graphs; only this benchmark uses it).

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter
(tests/kernel_utils.py); the CUDA-graph test, marked gpu, runs the compiled kernels in a
subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_utils import REPO, interpreted, run_without_interpreter

pytest.importorskip("triton")


def _graphed_sequence():
    """benchmarks/graphed_sequence.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("graphed_sequence", REPO / "benchmarks" / "graphed_sequence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@interpreted
def test_graphed_sequence_falls_back_to_eager_on_cpu():
    from test_triton_cell import seq_inputs, triton_cell

    inputs = seq_inputs(torch.float32, 2, 3, 3, 16, [3, 1, 2], True)
    graphed = _graphed_sequence().GraphedLSTMSequence()
    a = graphed(*inputs)
    b = triton_cell.lstm_sequence(*inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert graphed._cache == {}  # nothing captured on CPU


_GRAPH_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from mt.kernels import reference
    sys.path.insert(0, "benchmarks")
    from graphed_sequence import GraphedLSTMSequence
    torch.manual_seed(0)
    D, B, T, H = 2, 5, 6, 32
    dev = "cuda"
    lengths = torch.tensor([6, 2, 0, 5, 3], device=dev)
    graphed = GraphedLSTMSequence()
    for it in range(3):  # capture on the first call, replay afterwards, with new data each time
        xproj = torch.randn(D, B, T, 4 * H, device=dev)
        w = (torch.randn(D, 4 * H, H, device=dev) / H**0.5).transpose(1, 2)
        results = []
        for fn in (graphed, reference.lstm_sequence):
            xp = xproj.clone().requires_grad_()
            ww = w.detach().clone().requires_grad_()
            out, h_n, c_n = fn(xp, ww, lengths)
            (out.sum() + 2 * h_n.sum() + 3 * c_n.sum()).backward()
            results.append([out.clone(), h_n.clone(), c_n.clone(), xp.grad, ww.grad])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(graphed._cache) == 1
    with torch.no_grad():  # inference graph
        for it in range(2):
            xproj = torch.randn(D, B, T, 4 * H, device=dev)
            a = [t.clone() for t in graphed(xproj, w, lengths)]
            b = reference.lstm_sequence(xproj, w, lengths)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert len(graphed._cache) == 2
    print("ok")
    """
)


@pytest.mark.gpu
def test_graphed_lstm_sequence_cuda():
    run_without_interpreter(_GRAPH_SCRIPT, timeout=600)


def test_bench_cell_script_runs_under_interpreter(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_cell.py"), "--interpret"]
    cmd += ["--warmup", "0", "--iters", "1", "--steps", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {(r["workload"], r["mode"]) for r in results} == {
        (w, m) for w in ("encoder", "decoder") for m in ("fwd", "fwd+bwd")
    }
    for r in results:
        assert not r["errors"], r["errors"]
        assert set(r["ms"]) == {"cudnn", "reference", "triton"}
        for backend, diff in r["max_abs_diff_vs_cudnn"].items():
            assert diff < 1e-4, (backend, diff)
