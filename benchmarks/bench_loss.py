"""The training loss alone: PyTorch's label-smoothed cross-entropy against the fused Triton kernel
(mt/kernels/cross_entropy.py, trainer.fused_loss=true), forward and backward, in one run.

    python benchmarks/bench_loss.py --json bench_loss.json     # GPU: the Multi30k and WMT-size logits, bf16
    python benchmarks/bench_loss.py --quick                    # CPU: tiny sizes through the Triton interpreter

For each size (rows N = target tokens of a batch, V = vocabulary) and each column it times a call
of what mt.loss.loss_sums does after the model's forward: the loss sum and the NLL sum from the
(N, V) logits in the compute dtype, then the backward of loss_sum / N to the logits.

Columns:
  torch   PyTorch: logits.float(), F.cross_entropy with label smoothing 0.1, a second one for
          the NLL under no_grad, and autograd's backward
  fused   kernels.cross_entropy_sums with backend triton: one kernel for both sums, one in the
          backward for the gradient

Rows per column: `eager_ms` (median of --reps passes of --iters calls, synchronized at both ends),
`graph_ms` (the same calls captured once in a CUDA graph and replayed: what the call costs inside
mt.train's graphed step; CUDA only), `peak_mb` (torch.cuda.max_memory_allocated over one call,
above what was allocated before it: the fp32 copies against the kernel's one gradient; CUDA only),
and the two sums' largest relative difference from the torch column. Sizes: `multi30k` N = 2560
(B = 128, T = 20), V = 8000; `wmt` N = 16384 (a 16k-token batch), V = 32000. Needs only torch and
triton.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {"multi30k": (2560, 8000), "wmt": (16384, 32000)}
QUICK_SIZES = {"tiny": (24, 300), "two-tiles": (8, 3000)}
SMOOTHING, PAD = 0.1, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes through the Triton interpreter")
    p.add_argument("--sizes", nargs="+", help=f"of {', '.join(SIZES)} (default all; quick: its own)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the logits' dtype")
    p.add_argument("--iters", type=int, help="calls per timed pass (default 20; quick 1)")
    p.add_argument("--reps", type=int, help="timed passes, median (default 5; quick 1)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    args.iters = args.iters or (1 if args.quick else 20)
    args.reps = args.reps or (1 if args.quick else 5)
    return args


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def make_call(column: str, logits, target):
    """A function that runs the column's loss sums and backward on `logits` (a leaf), returning
    the two sums."""
    from mt import kernels

    backend = "triton" if column == "fused" else "torch"
    n = target.numel()

    def call():
        logits.grad = None
        loss_sum, nll_sum = kernels.cross_entropy_sums(logits, target, SMOOTHING, PAD, backend=backend)
        (loss_sum / n).backward()
        return loss_sum.detach(), nll_sum

    return call


def bench_column(column: str, logits, target, args) -> dict:
    import torch

    device = logits.device.type
    call = make_call(column, logits, target)
    sums = call()  # also Triton's compile
    res: dict = dict(loss_sum=sums[0].item(), nll_sum=sums[1].item())
    times = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            call()
        sync(device)
        times.append((time.perf_counter() - t0) / args.iters * 1e3)
    res["eager_ms"] = statistics.median(times)
    if device == "cuda":
        logits.grad = None  # the call frees the previous gradient first: not part of the base
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        res["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss_sum, _ = call()
        times = []
        for _ in range(args.reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                graph.replay()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / args.iters * 1e3)
        res["graph_ms"] = statistics.median(times)
        res["graph_agrees"] = abs(loss_sum.item() - res["loss_sum"]) <= 1e-4 * abs(res["loss_sum"])
        del graph
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    sizes = QUICK_SIZES if args.quick else {k: SIZES[k] for k in (args.sizes or SIZES)}
    env = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        interpreter=os.environ.get("TRITON_INTERPRET") == "1",
        date=time.strftime("%Y-%m-%d"),
        command="python benchmarks/bench_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(f"# bench_loss on {env['device']}  torch {env['torch']}  triton {env['triton']}  {args.dtype}")
    results = []
    for name, (N, V) in sizes.items():
        g = torch.Generator().manual_seed(N + V)
        logits = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
        target = torch.randint(1, V, (N,), generator=g)
        target[::7] = PAD  # some padding, as in a batch
        target = target.to(device)
        row = dict(size=name, N=N, V=V, dtype=args.dtype)
        for column in ("torch", "fused"):
            row[column] = bench_column(column, logits, target, args)
        ref = row["torch"]
        row["fused"]["max_rel_diff"] = max(
            abs(row["fused"][k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ("loss_sum", "nll_sum")
        )
        results.append(row)
        cells = []
        for column in ("torch", "fused"):
            r = row[column]
            cell = f"{column} {r['eager_ms']:8.3f} ms eager"
            if "graph_ms" in r:
                cell += f", {r['graph_ms']:7.3f} ms graphed, peak {r['peak_mb']:7.1f} MB"
            cells.append(cell)
        print(
            f"{name:9} N={N:6d} V={V:6d} | " + " | ".join(cells) + f" | sums differ {row['fused']['max_rel_diff']:.1e}"
        )
        del logits
    if args.json:
        args.json.write_text(json.dumps(dict(environment=env, results=results), indent=2) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
