"""benchmarks/bench_data.py: a smoke run on a small generated corpus (real mt.train children,
cold then warm), and its /proc memory sampling on its own."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from conftest import REPO
from test_make_corpus import write_source

SCRIPT = REPO / "benchmarks" / "bench_data.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_sampler_sees_a_child_that_allocates():
    bench = load_bench()
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(300 << 20); time.sleep(1.5)"])
    sampler = bench.MemorySampler(os.getpid(), every=0.05)  # this process and its children
    t0 = time.time()
    sampler.start()
    child.wait()
    sampler.stop.set()
    sampler.join()
    peak = sampler.peak(t0, time.time())
    assert peak["anon_gb"] >= 0.28  # the child's 300 MB counted with this process
    assert abs(peak["peak_rss_gb"] - peak["anon_gb"] - peak["file_gb"]) < 0.002


def test_smoke_run_cold_then_warm(tmp_path):
    source = write_source(tmp_path / "source.jsonl", n=300)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--pairs", "3000", "--source", str(source), "--work", str(tmp_path / "w")]
    r = subprocess.run(
        [*cmd, "--quick", "--vocab", "200", "--steps", "2", "--num-proc", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["run"] for row in rows] == ["cold", "warm"]
    for row in rows:
        assert "read 3000 training pairs" in row["stages_s"] and "tokenizer ready" in row["stages_s"]
        assert 0 <= row["prepare_s"] < row["first_step_s"] < row["wall_s"]
        peaks = row["stage_peak_rss_gb"]
        assert list(peaks) == [*row["stages_s"], "to the first step"]
        assert 0 < max(peaks.values()) <= row["prepare"]["peak_rss_gb"]
        assert row["prepare"]["peak_rss_gb"] > 0.1 and row["training"]["peak_rss_gb"] > 0.1
    assert r.stdout.count("| generated 3,000 pairs (text) |") == 2  # one table row per run
