"""What the kernel tests share (test_triton_cell.py, test_decode_attention.py, test_search_topk.py,
test_search_greedy.py, test_search_beam.py, test_kernels.py, test_bench_cell.py): the kernel
modules as built for the interpreter, a run of a script with the real Triton compiler, and the
record of the variants Triton's JIT compiles.

The test modules set TRITON_INTERPRET=1 before anything imports triton, so the kernels run on
CPU tensors.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _built_for_interpreter(module) -> bool:
    return not any(type(v).__name__ == "JITFunction" for v in vars(module).values())


def kernel_module(name: str):
    """mt.kernels.<name> with its kernels built for the interpreter: a module imported before
    TRITON_INTERPRET was set is rebuilt (mt.kernels.common first: its `@triton.jit` functions are
    inlined into the kernels that call them)."""
    module = importlib.import_module(f"mt.kernels.{name}")
    if os.environ.get("TRITON_INTERPRET") == "1" and not _built_for_interpreter(module):
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
    for module, name in kernels or [(triton_cell, n) for n in ("_cell_forward_kernel", "_cell_backward_kernel",
                                                               "_lstm_step_forward_kernel",
                                                               "_lstm_step_backward_kernel")]:
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
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout
