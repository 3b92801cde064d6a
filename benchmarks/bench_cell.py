"""Benchmark the gate cell: Triton (eager and CUDA-graph replay) vs the reference vs cuDNN.

Run from the repository root (no install needed; only torch, triton and the standard library):

    python benchmarks/bench_cell.py --json bench_cell.json                  # full grid (GPU)
    python benchmarks/bench_cell.py --quick                                 # B=64, H=512 (GPU)
    python benchmarks/bench_cell.py --batch 64 --hidden 512 --dtype bf16    # one configuration
    python benchmarks/bench_cell.py --quick --interpret                     # CPU: tiny, tests the script

Two workloads, each timed forward-only (under no_grad) and forward+backward:

  encoder  a 2-layer bidirectional LSTM, input dim = H, over T steps, all sequences full length.
           ours:  per layer, ONE input-projection matmul for both directions, then
                  `lstm_sequence` (both directions per launch) on the projections;
           cuDNN: nn.LSTM(H, H, num_layers=2, bidirectional=True) with the same parameters.
  decoder  an input-feeding decoder step loop, one layer, embedding size E = H:
           ours:  pre = emb @ W_emb + b precomputed for all T steps (one matmul), then per step
                  `cell_step(inp=[feed; h], c, W=[W_feed; W_hh], pre=pre_t)` (K = 2H);
           cuDNN: nn.LSTMCell(2H, H) on [emb_t; feed] per step (PyTorch's fused cell kernel on
                  GPU), the same maths. There is no attention here: the "feed" is simply the
                  previous h, which is enough to time the cell.

Columns (milliseconds, and the ratio to the cuDNN column: < 1 is faster than cuDNN):
  cudnn      nn.LSTM / nn.LSTMCell loop
  reference  mt.kernels.reference (plain PyTorch ops, autograd through the loop)
  triton     mt.kernels.triton_cell launched eagerly from Python (one launch per step)
  graph      the same captured as CUDA graphs and replayed (encoder: one
             `GraphedLSTMSequence` (graphed_sequence.py) per layer; decoder: the whole step loop through
             `torch.cuda.make_graphed_callables`, or a hand-captured graph for forward-only)

fp32 rows compute as `--tf32` says (trainer.tf32's values; default auto: PyTorch's defaults, under
which cuDNN and our cell, which follows cuDNN's flag, use TF32); `--tf32 false` compares IEEE fp32.

Timing: CUDA events after warm-up (median of --iters) on GPU; time.perf_counter on CPU.
On a CPU-only machine only the reference and cuDNN (nn.LSTM on CPU) columns run, at small sizes,
unless --interpret is given: then TRITON_INTERPRET=1 is set and the Triton column runs through
the interpreter at tiny sizes (slow; only to test this script). --json writes all numbers,
the device and the versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("cudnn", "reference", "triton", "graph")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (GPU default 64 128 256)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (GPU default 256 512 1024)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default fp32 bf16")
    p.add_argument("--steps", type=int, help="sequence length T (default 30)")
    p.add_argument("--quick", action="store_true", help="one size, fewer iterations")
    p.add_argument("--warmup", type=int, help="warm-up iterations per measurement")
    p.add_argument("--iters", type=int, help="timed iterations per measurement (median reported)")
    p.add_argument("--workload", nargs="+", choices=["encoder", "decoder"], default=None)
    p.add_argument("--interpret", action="store_true", help="CPU: run Triton via TRITON_INTERPRET=1")
    p.add_argument(
        "--tf32",
        default="auto",
        choices=("auto", "true", "false"),
        help="fp32 rows, as trainer.tf32: auto (PyTorch's defaults: cuDNN and our cell TF32), true, false (IEEE)",
    )
    p.add_argument("--json", type=Path, help="write results to this JSON file")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.interpret
    if args.interpret:
        defaults = dict(batch=[4], hidden=[16], dtype=["fp32"], steps=4, warmup=2, iters=3)
    elif cuda:
        defaults = dict(
            batch=[64] if args.quick else [64, 128, 256],
            hidden=[512] if args.quick else [256, 512, 1024],
            dtype=["fp32", "bf16"],
            steps=30,
            warmup=5 if args.quick else 10,
            iters=20 if args.quick else 50,
        )
    else:  # CPU: small sizes only
        defaults = dict(
            batch=[16] if args.quick else [16, 64],
            hidden=[64] if args.quick else [64, 256],
            dtype=["fp32", "bf16"],
            steps=30,
            warmup=2 if args.quick else 3,
            iters=3 if args.quick else 5,
        )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.workload = args.workload or ["encoder", "decoder"]
    args.device = "cuda" if cuda else "cpu"
    return args


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def time_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def forward_graph(fn, args):
    """Capture fn(*args) (no grad) in a CUDA graph; returns a replay function."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn(*args)

    def replay():
        graph.replay()
        return out

    return replay


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------


def encoder_ours(x, lstm: nn.LSTM, seq_fns):
    """2-layer bidirectional encoder on the gate cell. x: (B, T, H) -> (B, T, 2H)."""
    B, T, _ = x.shape
    H = lstm.hidden_size
    inp = x
    for layer, seq in enumerate(seq_fns):
        w_ih = [getattr(lstm, f"weight_ih_l{layer}{s}") for s in ("", "_reverse")]  # (4H, in)
        w_hh = [getattr(lstm, f"weight_hh_l{layer}{s}") for s in ("", "_reverse")]  # (4H, H)
        bias = [getattr(lstm, f"bias_ih_l{layer}{s}") + getattr(lstm, f"bias_hh_l{layer}{s}") for s in ("", "_reverse")]
        # one matmul projects all steps for both directions: (B*T, in) @ (in, 8H)
        xproj = torch.addmm(torch.cat(bias), inp.reshape(B * T, -1), torch.cat(w_ih).t())
        xproj = xproj.view(B, T, 2, 4 * H).permute(2, 0, 1, 3)  # (2, B, T, 4H) view
        out, _, _ = seq(xproj, torch.stack([w.t() for w in w_hh]))  # out: (2, B, T, H)
        inp = out.permute(1, 2, 0, 3).reshape(B, T, 2 * H)
    return inp


def encoder_cudnn(x, lstm: nn.LSTM):
    return lstm(x)[0]


def decoder_ours(emb, w_ih, w_hh, bias, step_fn):
    """Input-feeding step loop on the gate cell. emb: (B, T, H) -> (B, T, H).

    w_ih (4H, 2H) = [W_emb | W_feed] acting on [emb_t; feed], w_hh (4H, H), bias (4H,).
    """
    B, T, H = emb.shape
    pre = torch.addmm(bias, emb.reshape(B * T, H), w_ih[:, :H].t()).view(B, T, 4 * H)
    weight = torch.cat([w_ih[:, H:], w_hh], dim=1).t()  # (2H, 4H): acts on [feed; h]
    h = emb.new_zeros(B, H)
    c = emb.new_zeros(B, H, dtype=torch.float32)
    feed = h
    outs = []
    for t in range(T):
        h, c = step_fn(torch.cat([feed, h], dim=1), c, weight, pre=pre[:, t])
        feed = h  # stands in for the attentional vector
        outs.append(h)
    return torch.stack(outs, dim=1)


def decoder_cudnn(emb, cell: nn.LSTMCell):
    B, T, H = emb.shape
    h = emb.new_zeros(B, H)
    c = emb.new_zeros(B, H)
    feed = h
    outs = []
    for t in range(T):
        h, c = cell(torch.cat([emb[:, t], feed], dim=1), (h, c))
        feed = h
        outs.append(h)
    return torch.stack(outs, dim=1)


def build_case(workload, B, H, T, dtype, device, backends, seed=0):
    """Returns {backend: (forward_fn, params)}; each fn takes the input tensor."""
    torch.manual_seed(seed)
    from mt.kernels import reference

    tc = None
    if "triton" in backends or "graph" in backends:
        from mt.kernels import triton_cell as tc
    fns = {}
    if workload == "encoder":
        lstm = nn.LSTM(H, H, num_layers=2, bidirectional=True, batch_first=True)
        lstm = lstm.to(device=device, dtype=dtype)
        params = list(lstm.parameters())
        fns["cudnn"] = lambda x: encoder_cudnn(x, lstm)
        fns["reference"] = lambda x: encoder_ours(x, lstm, [reference.lstm_sequence] * 2)
        if tc is not None:
            fns["triton"] = lambda x: encoder_ours(x, lstm, [tc.lstm_sequence] * 2)
            # benchmarks/ is on sys.path: Python puts the script's folder first
            from graphed_sequence import GraphedLSTMSequence

            graphed = [GraphedLSTMSequence(), GraphedLSTMSequence()]  # one per layer
            fns["graph"] = lambda x: encoder_ours(x, lstm, graphed)
    else:
        cell = nn.LSTMCell(2 * H, H).to(device=device, dtype=dtype)
        params = list(cell.parameters())
        w_ih, w_hh = cell.weight_ih, cell.weight_hh

        def bias():
            return cell.bias_ih + cell.bias_hh

        fns["cudnn"] = lambda x: decoder_cudnn(x, cell)
        fns["reference"] = lambda x: decoder_ours(x, w_ih, w_hh, bias(), reference.cell_step)
        if tc is not None:
            fns["triton"] = lambda x: decoder_ours(x, w_ih, w_hh, bias(), tc.cell_step)
            if "graph" in backends:
                # the whole loop (incl. the pre matmul) as one graph; params are graph inputs
                fns["graph_src"] = lambda x, wi, wh, bi, bh: decoder_ours(x, wi, wh, bi + bh, tc.cell_step)
    return fns, params


def run_case(workload, B, H, T, dtype, args, backends):
    device = args.device
    fns, params = build_case(workload, B, H, T, dtype, device, backends)
    # Inputs come from the CPU generator: a CUDA graph capture that fails half way leaves the
    # CUDA generator registered to it ("Offset increment outside graph capture encountered
    # unexpectedly" at the next CUDA randn), which would end the run and hide the first error.
    x = torch.randn(B, T, H, dtype=dtype).to(device)
    out_dim = 2 * H if workload == "encoder" else H
    gy = torch.randn(B, T, out_dim, dtype=dtype).to(device)
    rows = []
    with torch.no_grad():
        expected = fns["cudnn"](x).float()
    for mode in ("fwd", "fwd+bwd"):
        train = mode == "fwd+bwd"
        xin = x.detach().clone().requires_grad_(train)
        times, errors, diffs = {}, {}, {}
        for backend in backends:
            try:
                fn = make_timed(backend, fns, params, xin, gy, train, device)
                if fn is None:
                    continue
                times[backend] = time_ms(fn, device, args.warmup, args.iters)
                if not train:
                    with torch.no_grad():
                        diffs[backend] = (fn().float() - expected).abs().max().item()
            except Exception as e:  # report, keep benchmarking the others
                errors[backend] = f"{type(e).__name__}: {e}"[:300]
                print(f"# {workload} {dtype} B={B} H={H} {mode} {backend} failed:", file=sys.stderr)
                traceback.print_exc()  # the whole story, on stderr (the table keeps one line)
        rows.append(
            dict(
                workload=workload,
                dtype=str(dtype).replace("torch.", ""),
                B=B,
                H=H,
                T=T,
                mode=mode,
                ms=times,
                ratio_to_cudnn={k: v / times["cudnn"] for k, v in times.items() if "cudnn" in times},
                max_abs_diff_vs_cudnn=diffs,
                errors=errors,
            )
        )
    return rows


def make_timed(backend, fns, params, x, gy, train, device):
    """A zero-argument function running one forward (or forward+backward) of `backend`."""

    def zero_grads():
        for p in params:
            p.grad = None
        x.grad = None

    if backend == "graph" and "graph_src" in fns:  # decoder: the whole loop as a graph
        src = fns["graph_src"]
        if train:
            graphed = torch.cuda.make_graphed_callables(src, (x, *params))

            def run():
                zero_grads()
                graphed(x, *params).backward(gy)
        else:
            run = forward_graph(src, (x, *[p.detach() for p in params]))
        return run
    if backend not in fns:
        return None
    fn = fns[backend]
    if train:

        def run():
            zero_grads()
            fn(x).backward(gy)

        return run

    def run_fwd():
        with torch.no_grad():
            return fn(x)

    return run_fwd


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    env = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
        device=args.device,
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        from mt.kernels.triton_cell import fp32_precision

        env["tf32"] = dict(
            setting=args.tf32,
            matmul=torch.backends.cuda.matmul.allow_tf32,
            cudnn=torch.backends.cudnn.allow_tf32,
            ours=fp32_precision(),
        )
    else:
        env["cpu"] = cpu_name()
        env["threads"] = torch.get_num_threads()
        env["interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


def print_table(rows, backends):
    head = f"{'workload':8} {'dtype':8} {'B':>4} {'H':>5} {'T':>3} {'pass':8}"
    for b in backends:
        head += f" {b + ' ms':>12} {'x':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['workload']:8} {r['dtype']:8} {r['B']:>4} {r['H']:>5} {r['T']:>3} {r['mode']:8}"
        for b in backends:
            ms = r["ms"].get(b)
            ratio = r["ratio_to_cudnn"].get(b)
            cell = "err" if b in r["errors"] else "-"
            line += f" {ms:>12.3f}" if ms is not None else f" {cell:>12}"
            line += f" {ratio:>6.2f}" if ratio is not None else f" {'':>6}"
        print(line)
    for r in rows:
        for b, e in r["errors"].items():
            print(f"! {r['workload']} {r['dtype']} B={r['B']} H={r['H']} {r['mode']} {b}: {e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (lazily, below)
    backends = ["cudnn", "reference"]
    try:
        import triton  # noqa: F401

        have_triton = True
    except ImportError:
        have_triton = False
    if have_triton and (args.device == "cuda" or args.interpret):
        backends.append("triton")
        if args.device == "cuda":
            backends.append("graph")
    from mt.runtime import set_tf32

    set_tf32(args.tf32)
    env = environment(args)
    print(
        f"# bench_cell  device={env.get('gpu') or env.get('cpu')} ({args.device})  "
        f"torch {env['torch']}  triton {env['triton']}  "
        + (f"CUDA {env['cuda']} cuDNN {env['cudnn']}  " if args.device == "cuda" else "")
        + f"{env['date']}"
        + (f"  fp32: {env['tf32']}" if "tf32" in env else "")
    )
    if args.device == "cpu":
        print("# the cudnn column is nn.LSTM / nn.LSTMCell: cuDNN on GPU, PyTorch's CPU kernels here")
    if "triton" not in backends:
        print("# Triton columns skipped (no CUDA; use --interpret for a tiny interpreter run)")
    rows = []
    for dname in args.dtype:
        dtype = DTYPES[dname]
        for workload in args.workload:
            for B in args.batch:
                for H in args.hidden:
                    rows += run_case(workload, B, H, args.steps, dtype, args, backends)
    print_table(rows, backends)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(environment=env, results=rows), indent=2) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
