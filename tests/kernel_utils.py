"""What the kernel tests share (test_triton_cell.py, test_decode_attention.py, test_search_topk.py,
test_search_greedy.py, test_search_beam.py, test_kernels.py, test_bench_cell.py): where a case
runs, the kernel modules as built for the interpreter, a run of a script with the real Triton
compiler, and the record of the variants Triton's JIT compiles.

Where the kernels run. Triton builds a kernel for the interpreter or for the compiler when its
module is imported, after TRITON_INTERPRET, for the whole process. conftest.py sets
TRITON_INTERPRET=1 where there is no GPU: the kernels run on CPU tensors through the interpreter,
and the `cpu` cases (`interpreted`) run. On a GPU machine the kernels are compiled: the `cuda`
cases (marked `gpu`: `pytest -m gpu`) run them on CUDA tensors, and the interpreter's cases skip,
since a compiled kernel takes no CPU tensor. (A test module that set TRITON_INTERPRET itself
would turn every later test of the session, the CUDA-graph ones included, to the interpreter.)
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

interpreted = pytest.mark.skipif(
    not INTERPRETING,
    reason="runs the Triton kernels on CPU tensors through the "
    "interpreter (TRITON_INTERPRET=1, which conftest.py sets where there is no GPU)",
)
compiled = pytest.mark.skipif(
    INTERPRETING and torch.cuda.is_available(), reason="checks the compiled kernels on CUDA: unset TRITON_INTERPRET"
)


def cpu(*values, id: str | None = None):
    """A parameter set ("cpu", *values): the kernels through the interpreter."""
    return pytest.param("cpu", *values, marks=interpreted, id=id)


def cuda(*values, id: str | None = None):
    """A parameter set ("cuda", *values): the compiled kernels on a GPU (marked gpu)."""
    return pytest.param("cuda", *values, marks=(pytest.mark.gpu, compiled), id=id)


def _built_for_interpreter(module) -> bool:
    return not any(type(v).__name__ == "JITFunction" for v in vars(module).values())


def kernel_module(name: str):
    """mt.kernels.<name> with its kernels built for the interpreter: a module imported before
    TRITON_INTERPRET was set is rebuilt (mt.kernels.common first: its `@triton.jit` functions are
    inlined into the kernels that call them)."""
    module = importlib.import_module(f"mt.kernels.{name}")
    if INTERPRETING and not _built_for_interpreter(module):
        from mt.kernels import common

        if not _built_for_interpreter(common):
            importlib.reload(common)
        module = importlib.reload(module)
    return module


def record_variants(monkeypatch, kernels=None) -> set:
    """Record the key under which Triton's JIT would compile each kernel launch from now on
    (constexpr values, num_warps, and the specialization of every other argument: dtype,
    16-byte alignment, ints equal to 1 or divisible by 16, unless `do_not_specialize`d).
    Each distinct key is one compilation (about 1 s each on a GPU machine's CPU).
    kernels: (module, kernel name) pairs; default the gate cell's four."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    keys: set = set()
    triton_cell = kernel_module("triton_cell")
    for module, name in kernels or [
        (triton_cell, n)
        for n in (
            "_cell_forward_kernel",
            "_cell_backward_kernel",
            "_lstm_step_forward_kernel",
            "_lstm_step_backward_kernel",
        )
    ]:
        kernel = getattr(module, name)
        params = list(inspect.signature(kernel.fn).parameters.values())
        dns = set(kernel.kwargs.get("do_not_specialize") or ())

        def run(*args, grid, warmup, _name=name, _params=params, _dns=dns, _run=kernel.run, **kw):
            bound = {**dict(zip((p.name for p in _params), args)), **kw}
            key = [_name, kw.get("num_warps")]
            for p in _params:
                v = bound[p.name]
                if "constexpr" in str(p.annotation):
                    key.append((p.name, v))
                else:
                    key.append((p.name, native_specialize_impl(BaseBackend, v, False, p.name not in _dns, True)))
            keys.add(tuple(key))
            return _run(*args, grid=grid, warmup=warmup, **kw)

        monkeypatch.setattr(kernel, "run", run)
    return keys


def run_without_interpreter(script: str, timeout: int) -> None:
    """Run `script` in a fresh Python with the real Triton compiler (TRITON_INTERPRET unset);
    it must exit 0 and print "ok"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout


def decodes_with_and_without_search_kernels(monkeypatch, device: str, beam: int, amp_dtype) -> dict:
    """Greedy (beam 1) or beam search with our Triton cell on 37 sentences of an untrained model,
    with the search's bookkeeping kernels (the step's update, the decoder state's gather, beam
    search's walk back) and then, under `monkeypatch`, with PyTorch's ops and the host's walk back
    instead (the top-k and attention kernels run in both) -> {True: kernels, False: PyTorch}, each
    [the graphed decoder's third search (a replay), an eager search]."""
    from test_graphs import make_batch
    from test_graphs_gpu import VOCAB, decode, small_model

    from mt import graphs, search

    search_beam, search_greedy = kernel_module("search_beam"), kernel_module("search_greedy")
    model = small_model(device, "triton", 0.0).eval()
    batch = make_batch(37, 19, 2, seed=7, vocab=VOCAB)
    outs = {}
    for with_kernels in (True, False):
        if not with_kernels:
            for owner, attr in (
                (search_beam, "supported"),
                (search_greedy, "supported"),
                (search, "_backtrack_kernel_takes"),
                (search_beam, "gather_rows_supported"),
            ):
                monkeypatch.setattr(owner, attr, lambda *a: False)
        decoder = graphs.GraphedDecoder(model)  # its own: one that captured the other setting would replay it
        graphed = [decode(device, model, batch, decoder, beam, amp_dtype) for _ in range(3)][-1]
        outs[with_kernels] = [graphed, decode(device, model, batch, None, beam, amp_dtype)]
    return outs


def assert_same_decodes(outs: dict) -> None:
    """`decodes_with_and_without_search_kernels`'s two settings decode the same: the same tokens
    (ties included: both give a tie to the lower beam, then the better rank), scores within 1e-5
    relative and attention weights within 1e-5."""
    from test_graphs_gpu import max_rel

    for a, b in zip(outs[True], outs[False]):
        assert a.tokens == b.tokens
        assert max_rel(a.scores, b.scores) <= 1e-5, (a.scores, b.scores)
        for x, y in zip(a.attention, b.attention):
            assert x.shape == y.shape and (not x.numel() or (x - y).abs().max().item() <= 1e-5)
