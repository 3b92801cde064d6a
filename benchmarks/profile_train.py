"""Where the time of a graphed training step goes, on a GPU: the kernels one replayed step
launches, their count and device time, grouped by what they do, for our cell and for cuDNN.

    python benchmarks/profile_train.py --json profile_train.json    # GPU
    python benchmarks/profile_train.py --quick                      # CPU smoke test (emulated steps)

The model and batches are benchmarks/bench_train.py's (Multi30k sizes, bf16, B = 128, T = 20,
E = H = 512, V = 8000) and the step is its `ours_graphs` / `cudnn_graphs` column:
mt.graphs.GraphedTrainStep (forward, label-smoothed loss, backward, clip_grad_norm_, capturable
Adam, in one CUDA graph). For each cell it prints the step's wall time (median over --reps
passes of --steps replays, synchronized at both ends), then a torch.profiler table of the
device kernels of one replayed step, by group (our gate cell, cuDNN's RNN kernels, matmuls,
the optimizer, loss and softmax, reductions, copies and concatenations, other elementwise
work) and the --top kernels. The sum of the kernels' time against the step's wall time shows
what the gaps between kernels cost; the groups show where our step and cuDNN's differ under
the same graphs. Needs only torch, triton and numpy.

Cells: ours (our Triton gate cell, the decoder's attention as mt/kernels/decode_attention.py's
forward and backward kernels, the decoder steps' weight gradients as one matmul after the loop:
triton_cell.DeferredWeightGrad), ours-torch-attention (the attention as PyTorch's ops: what that
pair of kernels gives), ours-per-step-weight-grads (a weight-gradient matmul and an addition per
step and layer, as autograd does by itself), ours-fused-loss (the label-smoothed loss and its
gradient in two Triton kernels, mt/kernels/cross_entropy.py: trainer.fused_loss=true), cudnn.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_train as bt  # noqa: E402
from profile_decode import kernel_table, patched  # noqa: E402

from mt.modules.lstm import DecoderLSTM  # noqa: E402

WARMUP = 2  # eager steps before the capture (as bench_train's)

# (group, pattern on the kernel's name), first match wins
GROUPS = (
    ("gate cell (ours)", r"^_(lstm_step|cell)_"),
    ("cuDNN RNN", r"(?i)rnn|lstm|cudnn"),
    ("matmul", r"(?i)gemm|nvjet|cutlass|xmma|splitk|cublas"),
    ("optimizer", r"(?i)adam|multi_tensor|foreach"),
    ("loss, softmax", r"(?i)softmax|cross_entropy|nll_loss|label_smooth"),
    ("embedding", r"(?i)embedding|index_select|indexSelect|index_put|scatter|gather"),
    ("reduction", r"(?i)reduce"),
    ("copy, cat", r"(?i)memcpy|memset|copy|CatArray|cat_"),
    ("elementwise", r"(?i)elementwise|vectorized|unrolled"),
)


def group_of(kernel: str) -> str:
    for name, pattern in GROUPS:
        if re.search(pattern, kernel):
            return name
    return "other"


def by_group(rows: list[dict]) -> list[dict]:
    """kernel_table's rows (kernel, per_step, us_per_step) summed per GROUPS entry, largest first."""
    out: dict[str, list[float]] = {}
    for r in rows:
        acc = out.setdefault(group_of(r["kernel"]), [0.0, 0.0])
        acc[0] += r["per_step"]
        acc[1] += r["us_per_step"]
    return sorted(
        (dict(group=g, per_step=c, us_per_step=us) for g, (c, us) in out.items()), key=lambda r: -r["us_per_step"]
    )


_OFF = lambda *a: False  # noqa: E731
_step_weights = DecoderLSTM.step_weights


def _step_weights_without_bank(self, dtype, defer_grads: bool = False):
    """DecoderLSTM.step_weights that never attaches a DeferredWeightGrad bank: autograd then
    computes the decoder's weight gradients step by step, as it does by itself."""
    return _step_weights(self, dtype, defer_grads=False)


def _fused_criterion(args):
    """bench_train.make_criterion as with --fused-loss: the loss in Triton kernels."""
    from mt.loss import FusedCrossEntropyLoss

    return FusedCrossEntropyLoss(ignore_index=bt.PAD, label_smoothing=0.1)


VARIANTS = {  # our cell with a kernel off or on: (module, attribute, what it is set to), ...
    "ours-torch-attention": (("mt.kernels.decode_attention", "supported", _OFF),),  # the attention as PyTorch's ops
    "ours-per-step-weight-grads": (("mt.modules.lstm", "DecoderLSTM.step_weights", _step_weights_without_bank),),
    "ours-fused-loss": (("bench_train", "make_criterion", _fused_criterion),),  # trainer.fused_loss=true
}


def profile_cell(args, cell: str, batches: list, steps: int, reps: int, top: int, variant: str | None = None) -> dict:
    """variant: None, or a key of VARIANTS (patched for this call only)."""
    with patched(VARIANTS, variant):
        return _profile_cell(args, cell, batches, steps, reps, top)


def _profile_cell(args, cell: str, batches: list, steps: int, reps: int, top: int) -> dict:
    device = args.device
    _, step = bt.train_step(args, cell, graphed=True, warmup=WARMUP)  # (CPU: emulated steps)

    def one(b) -> None:
        step.forward_backward(b)
        step.update()

    def run(n: int) -> None:
        for i in range(n):
            one(batches[i % len(batches)])

    t0 = time.perf_counter()
    run(WARMUP + 2)  # eager warm-up steps (Triton compiles), the capture (runs nothing), a replay
    bt.sync(device)
    res: dict = dict(cell=cell, warmup_s=time.perf_counter() - t0)
    times = []
    for _ in range(reps):
        bt.sync(device)
        t0 = time.perf_counter()
        run(steps)
        bt.sync(device)
        times.append((time.perf_counter() - t0) / steps)
    res["step_ms"] = statistics.median(times) * 1e3
    res["stats"] = dict(step.stats)  # warmup / replayed (emulated on CPU): what ran
    res["tokens_per_s"] = sum(b.ntokens for b in batches) / len(batches) / (res["step_ms"] / 1e3)
    if device == "cuda":
        try:
            table = kernel_table(lambda: run(steps), steps, top=10_000)
            rows = table.pop("top")
            res["profile"] = dict(table, groups=by_group(rows), top=rows[:top])
        except Exception as e:  # the profiler is a nice-to-have
            res["profile"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes")
    p.add_argument("--steps", type=int, default=10, help="replayed steps per timed pass and in the profile")
    p.add_argument("--reps", type=int, default=5, help="timed passes (median)")
    p.add_argument("--top", type=int, default=30, help="kernels listed per cell")
    p.add_argument(
        "--cells",
        nargs="+",
        default=["ours", "ours-torch-attention", "ours-per-step-weight-grads", "ours-fused-loss", "cudnn"],
        choices=["ours", "cudnn", *VARIANTS],
    )
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    args = bt.parse_args(["--quick"] if a.quick else [])
    steps, reps = (2, 1) if a.quick else (a.steps, a.reps)
    ours = "triton" if args.device == "cuda" else "torch"
    batches = bt.random_batches(args, args.batches, args.batch, seed=args.seed)
    env = bt.environment(args, ours)
    print(
        f"# profile_train on {env.get('gpu') or env.get('cpu')}  torch {env['torch']}  triton {env['triton']}  "
        f"B={args.batch} T={args.steps} H={args.hidden} V={args.vocab} {args.precision}"
    )
    results = []
    for name in a.cells:
        try:
            r = profile_cell(
                args,
                "cudnn" if name == "cudnn" else ours,
                batches,
                steps,
                reps,
                a.top,
                variant=name if name in VARIANTS else None,
            )
        except Exception as e:
            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {e}"[:400])
        r["name"] = name
        results.append(r)
        prof = r.get("profile", {})
        print(
            f"{name:20} step {r.get('step_ms', 0):7.3f} ms ({r.get('tokens_per_s', 0):9.0f} tok/s) | kernels/step "
            f"{prof.get('kernels_per_step', 0):6.1f} summing {prof.get('kernel_us_per_step', 0):8.1f} us | "
            f"warm-up {r.get('warmup_s', 0):.1f} s | {r.get('stats', {})}"
        )
        for g in prof.get("groups", []):
            print(f"   {g['per_step']:7.1f} x {g['us_per_step']:8.1f} us  [{g['group']}]")
        for k in prof.get("top", []):
            print(f"      {k['per_step']:5.1f} x {k['us_per_step']:7.1f} us  {k['kernel']}")
        if "error" in r or "error" in prof:
            print("   !", r.get("error") or prof.get("error"))
    if a.json:
        a.json.write_text(json.dumps(dict(environment=env, results=results), indent=2) + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
