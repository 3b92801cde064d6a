"""Compile a run's Triton kernel variants in parallel processes, before the run launches them.

Triton compiles a kernel variant (its constexprs, dtypes and argument alignment: triton_cell.py,
"Compiled variants") the first time a launch needs it, on the launching thread, and keeps it in
its on-disk cache (TRITON_CACHE_DIR, ~/.triton/cache by default). A first run of the de->en
recipe meets about a dozen variants (12, 13 with the search's top-k), each about a second of compiling (docs/benchmarks.md):
seconds of the recipe's first minute, one after another. mt.train does this instead
(trainer.precompile_workers; README "GPU speed"):

    workers = CompileWorkers.start(8)        # processes that import Triton while data is prepared
    variants = record_variants(dry_run)      # the run's own code, with every Triton launch skipped
    workers.compile(variants, current_target())   # into the on-disk cache, in parallel
    report = workers.wait(timeout=120)       # the real launches then load them from the cache
    watch = CompileWatch(variants)           # which first launches still compile, and how long

How: Triton calls `knobs.runtime.jit_cache_hook` before it compiles a variant, with the
variant's specialization data (JSON: signature, constexprs, attributes, options: what
`JITFunction.preload` compiles from); a hook that returns True skips the compile and the launch.
A worker rebuilds the `ASTSource` from that data and calls `triton.compile` for the recorded
target, which stores the result under the very cache key the JIT looks up later. The round
trip is tested on CPU, compiling for sm_90 (tests/test_precompile.py). The key also covers
Triton's environment variables (TRITON_*, LLVM_*, ...): the workers get a copy of this
process's environment when they start, so nothing may change those variables, or Triton's
knobs, between `start` and the run's launches.

Worker protocol (`python -m mt.kernels.precompile MODULE...`): import the kernel modules (and
compute each kernel's source hash), read one line from stdin, the path of a JSON job
{"target": [backend, arch, warp_size], "variants": [specialization data, ...]} (an empty line or
EOF: nothing to do), compile each variant, and write one JSON line per variant to the job's
"results" file: {"i": index, "seconds": s} or {"i": index, "error": "one line"}.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KERNEL_MODULES = (
    "mt.kernels.triton_cell",
    "mt.kernels.decode_attention",
    "mt.kernels.search_topk",
    "mt.kernels.search_greedy",
    "mt.kernels.search_beam",
    "mt.kernels.cross_entropy",
)


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: `name` (module.qualname), the JIT's in-memory cache `key`
    (specialization and launch options) and Triton's serialized specialization `data` (JSON)."""

    name: str
    key: str
    data: str


def _triton_knobs():
    import triton

    return triton.knobs.runtime


def _full_name(fn_info) -> str:
    return f"{fn_info.module}.{fn_info.name}"


def record_variants(fn: Callable[[], Any]) -> list[Variant]:
    """Run `fn` with every Triton JIT launch that would compile skipped (neither compiled nor
    launched: outputs stay uninitialized, so `fn` must not depend on their values); return the
    distinct variants those launches needed, in first-seen order. A variant this process has
    already compiled is launched as usual and not returned (it needs no compiling)."""
    runtime = _triton_knobs()
    seen: dict[tuple[str, str], Variant] = {}
    lock = threading.Lock()

    def hook(*, key, fn, compile, **_) -> bool:
        name = _full_name(fn)
        with lock:
            seen.setdefault((name, str(key)), Variant(name, str(key), compile["specialization_data"]))
        return True  # skip: no compile, no launch

    previous = runtime.jit_cache_hook
    runtime.jit_cache_hook = hook
    try:
        fn()
    finally:
        runtime.jit_cache_hook = previous
    return list(seen.values())


def current_target() -> tuple[str, Any, int]:
    """The active device's Triton target, (backend, arch, warp_size), e.g. ("cuda", 90, 32)."""
    from triton.runtime.driver import driver

    t = driver.active.get_current_target()
    return (t.backend, t.arch, t.warp_size)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def compile_variant(data: str, target: Sequence) -> None:
    """Compile one variant from Triton's specialization data into the on-disk cache (no device
    needed: any target the installed Triton has a backend for)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    spec = json.loads(data)
    module, _, name = spec["name"].rpartition(".")
    kernel = getattr(importlib.import_module(module), name)

    def constant(v):
        if isinstance(v, dict) and "constexpr" in v:
            return tl.constexpr(v["constexpr"])
        if isinstance(v, str) and tl.dtype.is_dtype(v):
            return tl.dtype(v)
        return v

    constexprs = {tuple(k): constant(v) for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])}
    signature = {k: _tuples(v) for k, v in spec["signature"].items()}
    gpu = GPUTarget(*target)
    options = make_backend(gpu).parse_options({k: _tuples(v) for k, v in spec["options"].items()})
    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__)


@dataclass
class CompileReport:
    """What the workers did: variants compiled (or found in the cache), one-line errors, the wall
    seconds from `compile()` to the end of `wait()`, the seconds `wait()` itself blocked, and
    `work`, the workers' seconds per variant summed (about what compiling them one after another
    on the launching thread would have taken)."""

    variants: int = 0
    compiled: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    waited: float = 0.0
    work: float = 0.0
    workers: int = 0

    def summary(self) -> str:
        text = (
            f"{self.compiled} of {self.variants} Triton kernel variants precompiled by {self.workers} "
            f"processes in {self.seconds:.1f} s ({self.work:.1f} s of compiling; waited {self.waited:.1f} s)"
        )
        if self.errors:
            text += f"; {len(self.errors)} failed, first: {self.errors[0]}"
        return text


class CompileWorkers:
    """Worker processes that compile Triton kernel variants into the on-disk cache.

    Started early (`start`), they import Triton and the kernel modules while the caller does
    other work, then wait for one job each (`compile`). Never raises for a failing worker: what
    did not compile shows in the report, and the run's own launches compile it as before.
    """

    def __init__(self, procs: list[subprocess.Popen], tmp: Path):
        self.procs, self.tmp = procs, tmp
        self._jobs: list[tuple[subprocess.Popen, Path, list[int]]] = []
        self._variants = 0
        self._started: float | None = None

    @classmethod
    def start(cls, n: int, modules: Sequence[str] = KERNEL_MODULES) -> CompileWorkers:
        tmp = Path(tempfile.mkdtemp(prefix="mt_precompile_"))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parents[2])  # the directory that holds mt/
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        procs = []
        try:
            for i in range(n):
                with open(tmp / f"stderr-{i}.txt", "wb") as err:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "mt.kernels.precompile", *modules],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            stderr=err,
                            env=env,
                            text=True,
                        )
                    )
        except BaseException:
            cls(procs, tmp).close()
            raise
        return cls(procs, tmp)

    def compile(self, variants: Sequence[Variant], target: Sequence) -> None:
        """Hand the variants to the workers (round robin) and return at once."""
        self._started = time.perf_counter()
        self._variants = len(variants)
        for w, proc in enumerate(self.procs):
            mine = list(range(w, len(variants), len(self.procs)))
            line = ""
            if mine:
                job = self.tmp / f"job-{w}.json"
                results = self.tmp / f"results-{w}.jsonl"
                job.write_text(
                    json.dumps(
                        {"target": list(target), "variants": [variants[i].data for i in mine], "results": str(results)}
                    )
                )
                self._jobs.append((proc, results, mine))
                line = str(job)
            try:
                proc.stdin.write(line + "\n")
                proc.stdin.close()
            except OSError:  # the worker is gone: its variants show up as failed
                pass

    def wait(self, timeout: float) -> CompileReport:
        """Wait for every job (at most `timeout` seconds; late workers are killed), then clean up."""
        t0 = time.perf_counter()
        report = CompileReport(variants=self._variants, workers=len(self.procs))
        deadline = t0 + timeout
        for proc, results, mine in self._jobs:
            stopped = False
            try:
                proc.wait(max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                stopped = True
                report.errors.append(f"a worker was still compiling after {timeout:.0f} s and was stopped")
            done = set()
            if results.exists():
                for line in results.read_text().splitlines():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a worker killed while writing it
                        continue
                    if "error" in r:
                        report.errors.append(r["error"])
                    else:
                        done.add(r["i"])
                        report.work += r["seconds"]
            report.compiled += len(done)
            if not stopped and proc.returncode != 0 and len(done) < len(mine):
                report.errors.append(f"a worker exited with status {proc.returncode}: {self._stderr_tail(proc)}")
        report.waited = time.perf_counter() - t0
        report.seconds = time.perf_counter() - (self._started if self._started is not None else t0)
        self.close()
        return report

    def _stderr_tail(self, proc: subprocess.Popen) -> str:
        i = self.procs.index(proc)
        try:
            lines = (self.tmp / f"stderr-{i}.txt").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1][:300] if lines else "no output"

    def close(self) -> None:
        """Stop every worker still running (after `wait`: only idle ones, which had no job)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class CompileWatch:
    """Times every variant this process's JIT compiles (or loads from the on-disk cache) on first
    launch, from now until `close()`; `missed` counts those not among `precompiled`."""

    def __init__(self, precompiled: Iterable[Variant] = ()):
        self.precompiled = {(v.name, v.key) for v in precompiled}
        self.first_launches = 0
        self.missed = 0
        self.seconds = 0.0
        self.missed_seconds = 0.0
        self._t0: dict[tuple[str, str], float] = {}
        runtime = _triton_knobs()
        self._previous = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook = self._before
        runtime.jit_post_compile_hook = self._after

    def expect(self, precompiled: Iterable[Variant]) -> None:
        """Count `precompiled` as precompiled from now on."""
        self.precompiled.update((v.name, v.key) for v in precompiled)

    def _before(self, *, key, fn, **_) -> None:
        self._t0[(_full_name(fn), str(key))] = time.perf_counter()
        return None  # go on and compile

    def _after(self, *, key, fn, **_) -> None:
        k = (_full_name(fn), str(key))
        dt = time.perf_counter() - self._t0.pop(k, time.perf_counter())
        self.first_launches += 1
        self.seconds += dt
        if k not in self.precompiled:
            self.missed += 1
            self.missed_seconds += dt

    def summary(self) -> str:
        return (
            f"first launches of {self.first_launches} Triton kernel variants took {self.seconds:.1f} s on the "
            f"launching thread (loading or compiling); {self.missed} of them were not precompiled "
            f"({self.missed_seconds:.1f} s)"
        )

    def close(self) -> None:
        runtime = _triton_knobs()
        if (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == (self._before, self._after):
            runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._previous


def warm_keys(modules: Sequence[str] = KERNEL_MODULES) -> None:
    """Compute now what Triton hashes at a process's first compile or cache lookup: the key of
    the Triton installation (it hashes Triton's own files) and each kernel's source
    hash. Both are cached for the life of the process."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # elsewhere in another Triton version: then it is computed at first use
        pass
    else:
        triton_key()
    for module in modules:
        for obj in vars(importlib.import_module(module)).values():
            if hasattr(obj, "arg_names") and hasattr(obj, "cache_key"):
                obj.cache_key  # noqa: B018 (a property, cached by Triton)


def _worker(modules: Sequence[str]) -> int:
    warm_keys(modules)  # while the parent prepares its data
    line = sys.stdin.readline().strip()
    if not line:
        return 0
    job = json.loads(Path(line).read_text())
    with open(job["results"], "a") as out:
        for i, data in enumerate(job["variants"]):
            t0 = time.perf_counter()
            try:
                compile_variant(data, job["target"])
                result = {"i": i, "seconds": time.perf_counter() - t0}
            except Exception as e:  # one line, the parent logs it
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                result = {"i": i, "error": f"{json.loads(data).get('name', '?')}: {type(e).__name__}: {first}"[:300]}
            out.write(json.dumps(result) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
