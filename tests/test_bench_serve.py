"""benchmarks/bench_serve.py: a ~2 s smoke run against the toy checkpoint (both modes, real
mt.serve subprocesses), and its data reading and percentiles on their own."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_serve.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_percentile_matches_linear_interpolation():
    bench = load_bench()
    values = sorted([5.0, 1.0, 3.0, 2.0, 4.0])
    assert bench.percentile(values, 50) == 3.0
    assert bench.percentile(values, 0) == 1.0 and bench.percentile(values, 100) == 5.0
    assert bench.percentile(values, 95) == pytest.approx(4.8)
    assert bench.percentile([7.0], 99) == 7.0


def test_read_sentences_text_and_jsonl(tmp_path):
    bench = load_bench()
    text = tmp_path / "src.de"
    text.write_text("hund sieht katze\n\n  rot auto \n", encoding="utf-8")
    assert bench.read_sentences(str(text), None) == ["hund sieht katze", "rot auto"]
    rows = tmp_path / "test.jsonl"
    rows.write_text(
        json.dumps({"de": "hund", "en": "dog"})
        + "\n\n"
        + json.dumps({"translation": {"de": "katze", "en": "cat"}})
        + "\n",
        encoding="utf-8",
    )
    assert bench.read_sentences(str(rows), "de") == ["hund", "katze"]
    with pytest.raises(SystemExit, match="no 'fr' field"):
        bench.read_sentences(str(rows), "fr")
    with pytest.raises(SystemExit, match="not found"):
        bench.read_sentences(str(tmp_path / "missing.de"), None)


def test_smoke_run_reports_sane_numbers(tiny_run, tmp_path):
    data = tmp_path / "src.de"
    data.write_text("hund sieht katze\nrot auto und blau haus\nfrau liest buch nicht\nklein kind hat gross tisch\n")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_run["checkpoint"]), "--data", str(data)]
    cmd += ["--clients", "4", "--seconds", "1", "--warmup", "0.3", "--lines-per-request", "2", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr

    report = json.loads(out.read_text())
    assert [row["mode"] for row in report["results"]] == ["batched", "one-at-a-time"]
    assert report["clients"] == 4 and report["sentences"] == 4
    assert report["server_info"]["languages"]["src"] == "de"
    for row in report["results"]:
        assert row["errors"] == 0, row["error_samples"]
        assert row["requests"] > 0 and row["requests_per_s"] > 0
        assert row["sentences"] == 2 * row["requests"]
        assert row["sentences_per_s"] == pytest.approx(2 * row["requests_per_s"])
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert "--max-batch-sentences" not in report["results"][0]["server_args"]
    assert report["results"][1]["server_args"][-2:] == ["--max-batch-sentences", "1"]

    # the printed table: a header and one row per mode with the same numbers
    lines = r.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["mode", "requests/s", "sentences/s"])
    for row, printed in zip(report["results"], lines[header + 1 : header + 3]):
        fields = printed.split()
        assert fields[0] == row["mode"]
        assert float(fields[1]) == pytest.approx(row["requests_per_s"], abs=0.05)
        assert float(fields[3]) == pytest.approx(row["latency_ms"]["p50"], abs=0.05)
