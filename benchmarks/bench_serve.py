#!/usr/bin/env python
"""Serving throughput and latency: mt-serve under N concurrent clients, with dynamic batching and
with one request decoded at a time.

    python benchmarks/bench_serve.py --model RUN/checkpoints/best.pt --data test.de --clients 32 --seconds 20 --json bench_serve.json
    python benchmarks/bench_serve.py --model RUN/checkpoints/best.pt --data /path/to/multi30k/test.jsonl --beam 5
    python benchmarks/bench_serve.py --model CKPT --data test.de --modes batched --server-args "--device cuda"

For each mode it starts `python -m mt.serve --model MODEL` on a free local port (a fresh server
per mode, so one mode's queue never leaks into the next), waits for /health, then runs --clients
asyncio clients (httpx) for --warmup seconds (not counted) and --seconds seconds. Each client
sends one POST /translate of --lines-per-request consecutive sentences of --data at a time and
sends the next as soon as the answer arrives (a closed loop: the load is the client count).

  batched        the server's own batching settings (its --max-batch-sentences default, or
                 --batch-sentences)
  one-at-a-time  the server started with --max-batch-sentences 1: every request is decoded alone,
                 in arrival order

Printed per mode: requests/s and sentences/s over the timed window (requests completed inside
it), and the p50/p95/p99 latency of those requests (send to full answer, in ms). Requests the
server refused (e.g. 503 for a full queue) or that failed are counted as errors, not as latency.
--json FILE also writes the settings, the server's /info and every number.

--data is a text file, one source sentence per line (blank lines skipped), or a JSON-lines file
(`.jsonl`) whose --src field (default: the server's source language from /info) is read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("batched", "one-at-a-time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark mt-serve: requests/s, sentences/s and latency percentiles under concurrent clients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="what mt-serve --model takes: a checkpoint (best.pt)")
    p.add_argument("--data", required=True, help="source sentences: a text file (one per line) or a .jsonl file")
    p.add_argument("--src", default=None, help=".jsonl only: the source field (default: the server's source language)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=20.0, help="timed window per mode")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed load before the window, per mode")
    p.add_argument("--lines-per-request", type=int, default=1, help="sentences per request")
    p.add_argument("--beam", type=int, default=None, help="beam size sent with each request (default: the server's)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which runs, in order")
    p.add_argument(
        "--batch-sentences",
        type=int,
        default=None,
        help="the batched run's --max-batch-sentences (default: the server's)",
    )
    p.add_argument("--server-args", default="", help='extra mt-serve arguments, one string (e.g. "--device cuda")')
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the server's /health")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.clients < 1 or args.lines_per_request < 1:
        p.error("--clients and --lines-per-request must be >= 1")
    if args.seconds <= 0 or args.warmup < 0:
        p.error("--seconds must be > 0 and --warmup >= 0")
    return args


# ------------------------------------------------------------------------------- data
def read_sentences(path: str, src: str | None) -> list[str]:
    """The non-blank source sentences of a text file, or of a .jsonl file's `src` field."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: --data file not found: {path}")
    out: list[str] = []
    with open(p, encoding="utf-8", errors="replace") as f:
        if p.suffix == ".jsonl":
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                row = row.get("translation", row)  # flat rows or Hugging Face translation rows
                if src not in row:
                    raise SystemExit(f"error: {path} line {n} has no {src!r} field (--src)")
                out.append(str(row[src]).strip())
        else:
            out = [line.strip() for line in f]
    out = [s for s in out if s]
    if not out:
        raise SystemExit(f"error: no sentences in {path}")
    return out


# ------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mt.serve` in a subprocess on a free port; its output goes to a temporary log."""

    def __init__(self, model: str, extra: list[str], startup_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "mt.serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port)]
        self.cmd += extra
        self.timeout = startup_timeout
        self.log = tempfile.NamedTemporaryFile(prefix="bench_serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def log_tail(self, n: int = 2000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def __enter__(self) -> Server:
        import httpx

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"error: mt.serve exited with status {self.proc.returncode}: {shlex.join(self.cmd)}\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise SystemExit(f"error: mt.serve did not answer /health within {self.timeout:.0f} s")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if exc[0] is None:
            os.unlink(self.log.name)


# ------------------------------------------------------------------------------- load
def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def drive(url: str, sentences: list[str], args: argparse.Namespace) -> dict:
    """--clients closed-loop clients for --warmup + --seconds; the numbers of the timed window."""
    import httpx

    k = args.lines_per_request
    next_index = 0
    latencies: list[float] = []
    counted = {"requests": 0, "sentences": 0, "errors": 0}
    error_samples: list[str] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + args.warmup
    end = start + args.seconds

    def next_request() -> list[str]:
        nonlocal next_index
        batch = [sentences[(next_index + j) % len(sentences)] for j in range(k)]
        next_index = (next_index + k) % len(sentences)
        return batch

    async def client(http: httpx.AsyncClient) -> None:
        while (t0 := loop.time()) < end:
            lines = next_request()
            body: dict = {"text": lines}
            if args.beam is not None:
                body["beam"] = args.beam
            try:
                r = await http.post("/translate", json=body)
                ok = r.status_code == 200 and len(r.json()["translations"]) == len(lines)
                why = f"status {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError) as e:
                ok, why = False, f"{type(e).__name__}: {e}"
            t1 = loop.time()
            if not ok:
                await asyncio.sleep(0.01)  # a refusing server is not hammered in a tight loop
            if not start <= t1 <= end:  # throughput counts what completes inside the window, whenever sent
                continue
            if ok:
                latencies.append(t1 - t0)
                counted["requests"] += 1
                counted["sentences"] += len(lines)
            else:
                counted["errors"] += 1
                if len(error_samples) < 3:
                    error_samples.append(why)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
    lat_ms = sorted(x * 1000 for x in latencies)
    return {
        "seconds": args.seconds,
        **counted,
        "requests_per_s": counted["requests"] / args.seconds,
        "sentences_per_s": counted["sentences"] / args.seconds,
        "latency_ms": {
            "p50": percentile(lat_ms, 50),
            "p95": percentile(lat_ms, 95),
            "p99": percentile(lat_ms, 99),
            "mean": sum(lat_ms) / len(lat_ms) if lat_ms else float("nan"),
            "max": lat_ms[-1] if lat_ms else float("nan"),
        },
        "error_samples": error_samples,
    }


def server_args(mode: str, args: argparse.Namespace) -> list[str]:
    extra = shlex.split(args.server_args)
    if mode == "one-at-a-time":
        extra += ["--max-batch-sentences", "1"]
    elif args.batch_sentences is not None:
        extra += ["--max-batch-sentences", str(args.batch_sentences)]
    return extra


def run_mode(mode: str, args: argparse.Namespace, sentences: list[str] | None) -> tuple[dict, dict, list[str]]:
    import httpx

    extra = server_args(mode, args)
    with Server(args.model, extra, args.startup_timeout) as server:
        info = httpx.get(server.url + "/info", timeout=10).json()
        if sentences is None:
            src = args.src or (info.get("languages") or {}).get("src")
            sentences = read_sentences(args.data, src)
        result = asyncio.run(drive(server.url, sentences, args))
    return {"mode": mode, "server_args": extra, **result}, info, sentences


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("error: bench_serve needs httpx (pip install -e '.[dev]')", file=sys.stderr)
        return 2
    sentences = None if Path(args.data).suffix == ".jsonl" else read_sentences(args.data, None)
    results, info = [], {}
    for mode in args.modes:
        row, info, sentences = run_mode(mode, args, sentences)
        results.append(row)

    print(
        f"mt-serve {args.model}: {args.clients} clients, {args.lines_per_request} sentence(s) per request, "
        f"{args.seconds:g} s per mode, {len(sentences)} sentences from {args.data}"
    )
    print(
        f"{'mode':<14} {'requests/s':>10} {'sentences/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    for r in results:
        lat = r["latency_ms"]
        print(
            f"{r['mode']:<14} {r['requests_per_s']:>10.1f} {r['sentences_per_s']:>11.1f} "
            f"{lat['p50']:>8.1f} {lat['p95']:>8.1f} {lat['p99']:>8.1f} {r['errors']:>6d}"
        )
        for why in r["error_samples"]:
            print(f"  {r['mode']} error: {why}")
    if args.json:
        out = {
            "model": args.model,
            "data": args.data,
            "sentences": len(sentences),
            "clients": args.clients,
            "lines_per_request": args.lines_per_request,
            "beam": args.beam,
            "warmup_s": args.warmup,
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
            "server_info": info,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["requests"] > 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
