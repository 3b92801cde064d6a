"""Training-step and decoding speed: cuDNN vs our gate cell, eager vs CUDA graphs, in one run.

Run from the repository root (no install needed: only torch, triton and numpy; no hydra, no
datasets; the model is built from mt.config.ModelConfig + mt.model.Seq2Seq directly):

    python benchmarks/bench_train.py --json bench_train.json     # GPU: Multi30k-sized model, bf16, B=128, T=20
    python benchmarks/bench_train.py --batch 64 --steps 30       # other shapes (--hidden, --emb, --vocab, ...)
    python benchmarks/bench_train.py --quick                     # CPU: tiny sizes, eager columns only
    python benchmarks/bench_train.py --quick --interpret         # CPU: "ours" through the Triton interpreter

Model (defaults): 2-layer bidirectional LSTM encoder, 2-layer input-feeding LSTM decoder, Luong
general attention, E = H = 512, V = 8000 (source and target), dropout 0.3, tied output layer:
the shape of the Multi30k recipe. Batches are random token ids with real shapes: B sentences,
source and target lengths uniform in [T/2, T] (EOS/BOS included), the longest exactly T, so
every batch has the shape (B, T, T); the same batches for every column.

Columns (the same model, same initial weights, same batches):
  cudnn_eager    model.cell=cudnn (nn.LSTM packed / nn.LSTMCell), eager: trainer.cuda_graphs=false
  cudnn_graphs   model.cell=cudnn under mt.graphs (encoder: cuDNN on the padded batch, no packing)
  ours_eager     model.cell=triton (our Triton kernels: the gate cell, and in decoding the
                 search's fused log-softmax + top-k; on CPU: the PyTorch reference, or Triton
                 interpreted with --interpret), eager
  ours_graphs    model.cell=triton under mt.graphs

Rows:
  train   target tokens per second of a full training step: forward, label-smoothed loss,
          backward, clip_grad_norm_, Adam, and reading the step's numbers back a step late
          (mt.step_stats, as mt.train does: the host prepares step k+1 while the GPU runs k).
          Eager: mt.graphs.TrainStep, plain Adam. Graphs: mt.graphs.GraphedTrainStep (one
          shape, captured after 2 eager warm-up steps), capturable Adam.
  greedy  sentences per second, greedy search, --decode-batch sentences per batch
  beam    sentences per second, beam search (--beam, GNMT length penalty 1.0)
          (graphs: mt.graphs.GraphedDecoder, the whole search step replayed: decoder and
          bookkeeping; the encoder a second graph, replayed once per batch). The model is
          untrained, so it seldom emits EOS and most outputs run to the length limit
          1.5 * T + 10: a worst case for decoding length.

Timing: wall clock (time.perf_counter) around --iters steps after --warmup, with
torch.cuda.synchronize() on both ends on GPU; decoding: the median of --decode-iters passes after
2 untimed passes. Ratios are to cudnn_eager (> 1 = faster). --json writes every number, the first
losses of each training column, the seconds of each column's untimed warm-up (`warmup_s`: graph
captures, and Triton's compiles, most of them in the first "ours" column), the agreement of
graphed with eager decodes, the device and the versions. Without CUDA the graph columns are skipped (CUDA graphs need CUDA).
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

PAD, UNK, BOS, EOS = 0, 1, 2, 3
COLUMNS = ("cudnn_eager", "cudnn_graphs", "ours_eager", "ours_graphs")
TASKS = ("train", "greedy", "beam")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (CPU smoke test)")
    p.add_argument("--interpret", action="store_true", help="CPU: run ours through TRITON_INTERPRET=1")
    p.add_argument("--batch", type=int, help="sentences per training batch (default 128; quick 8)")
    p.add_argument("--steps", type=int, help="T: longest source and target length (default 20; quick 6)")
    p.add_argument("--emb", type=int, help="embedding size E (default 512; quick 32)")
    p.add_argument("--hidden", type=int, help="hidden size H (default 512; quick 32)")
    p.add_argument("--vocab", type=int, help="source and target vocabulary (default 8000; quick 64)")
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--dec-layers", type=int, default=2)
    p.add_argument("--attention", default="general", help="dot, general, concat or bahdanau")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--warmup", type=int, help="untimed training steps per column (default 5; quick 1)")
    p.add_argument("--iters", type=int, help="timed training steps per column (default 30; quick 2)")
    p.add_argument("--batches", type=int, default=4, help="distinct random batches, cycled")
    p.add_argument("--decode-batch", type=int, help="sentences per decoding batch (default 128; quick 4)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--decode-iters", type=int, help="timed decoding passes (median; default 3; quick 1)")
    p.add_argument("--max-len-a", type=float, default=1.5)
    p.add_argument("--max-len-b", type=int, help="decode length limit a * src_len + b (default 10; quick 2)")
    p.add_argument("--columns", nargs="+", choices=COLUMNS, default=list(COLUMNS))
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write results to this JSON file")
    args = p.parse_args(argv)
    if args.interpret:
        args.device = "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.quick and args.device == "cpu"
    defaults = dict(
        batch=8 if small else 128,
        steps=6 if small else 20,
        emb=32 if small else 512,
        hidden=32 if small else 512,
        vocab=64 if small else 8000,
        warmup=1 if small else 5,
        iters=2 if small else (10 if args.quick else 30),
        decode_batch=4 if small else 128,
        decode_iters=1 if small else 3,
        max_len_b=2 if small else 10,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    args.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    return args


# ----------------------------------------------------------------------------------------------
# model and data
# ----------------------------------------------------------------------------------------------


def build_model(args, cell: str):
    from mt.config import ModelConfig
    from mt.model import Seq2Seq

    cfg = ModelConfig(
        cell=cell,
        emb_dim=args.emb,
        hidden_dim=args.hidden,
        enc_layers=args.enc_layers,
        dec_layers=args.dec_layers,
        attention=args.attention,
        dropout=args.dropout,
        emb_dropout=args.dropout,
        tie_output=args.emb == args.hidden,
    )
    torch.manual_seed(args.seed)  # the same initial weights in every column
    return Seq2Seq(cfg, args.vocab, args.vocab, PAD).to(args.device)


def random_lengths(g: torch.Generator, n: int, longest: int) -> list[int]:
    """n lengths (EOS/BOS included) uniform in [longest // 2, longest], the first exactly longest."""
    lo = max(2, longest // 2)
    rest = torch.randint(lo, longest + 1, (n - 1,), generator=g).tolist() if n > 1 else []
    return [longest] + rest


def random_batches(args, count: int, n: int, seed: int) -> list:
    from mt.batching import collate

    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(seed + k)
        src_l, tgt_l = random_lengths(g, n, args.steps), random_lengths(g, n, args.steps)
        rows = [
            {
                "src_ids": torch.randint(4, args.vocab, (ls - 1,), generator=g).tolist(),
                "tgt_ids": torch.randint(4, args.vocab, (lt - 1,), generator=g).tolist(),
                "idx": i,
            }
            for i, (ls, lt) in enumerate(zip(src_l, tgt_l))
        ]
        out.append(collate(rows, PAD, BOS, EOS))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# the columns
# ----------------------------------------------------------------------------------------------


def train_step(args, cell: str, graphed: bool, warmup: int = 2):
    """The bench's training step for `cell`: (optimizer, step). Graphed: mt.graphs.GraphedTrainStep
    for the one (batch, T, T) shape, capturable Adam, `warmup` eager steps before the capture
    (emulated, no capture, off CUDA); else mt.graphs.TrainStep."""
    from mt import graphs

    model = build_model(args, cell).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    crit = nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1, reduction="sum")
    kw = dict(pad_id=PAD, amp_dtype=args.amp_dtype, clip_norm=5.0, device=args.device)
    if not graphed:
        return opt, graphs.TrainStep(model, opt, crit, **kw)
    cuda = args.device == "cuda"
    if cuda:  # (capturable Adam runs on CUDA only)
        graphs.make_capturable(opt, args.device)
    shape = (args.batch, args.steps, args.steps)
    return opt, graphs.GraphedTrainStep(
        model, opt, crit, buckets=graphs.ShapeBuckets([shape]), warmup=warmup, emulate=not cuda, **kw
    )


def bench_train(args, cell: str, graphed: bool, batches: list) -> dict:
    from mt.step_stats import StepStats, step_values

    opt, step = train_step(args, cell, graphed)

    pending = StepStats(args.device, lag=1)
    losses: list[float] = []

    def one(b) -> None:  # mt.train's per-step work: the step, its numbers copied out, the last step's read
        loss_sum, nll_sum = step.forward_backward(b)
        grad_norm = step.update()
        pending.push(
            b.ntokens,
            step_values(loss_sum, nll_sum, b.ntokens, False, grad_norm, opt.param_groups[0]["lr"], args.device),
        )
        losses.extend(row[0] / ntok for ntok, row in pending.ready())

    t_warm = time.perf_counter()
    for i in range(args.warmup):
        one(batches[i % len(batches)])
    losses.extend(row[0] / ntok for ntok, row in pending.drain())
    sync(args.device)
    t0 = time.perf_counter()
    warmup_s = t0 - t_warm  # Triton compiles (the first "ours" column), graph captures, warm-up steps
    tokens = 0
    for i in range(args.warmup, args.warmup + args.iters):
        b = batches[i % len(batches)]
        one(b)
        tokens += b.ntokens
    losses.extend(row[0] / ntok for ntok, row in pending.drain())
    sync(args.device)
    dt = time.perf_counter() - t0
    res = dict(
        per_s=tokens / dt,
        ms_per_step=dt / args.iters * 1e3,
        tokens_per_step=tokens / args.iters,
        first_losses=losses[:4],
        last_loss=losses[-1],
        warmup_s=warmup_s,
    )
    if graphed:
        res["stats"] = dict(step.stats)
    return res


def bench_decode(args, cell: str, graphed: bool, batch, beam: int) -> dict:
    from mt import graphs
    from mt.search import search

    model = build_model(args, cell).eval()
    runner = graphs.GraphedDecoder(model) if graphed else None
    src, src_len = batch.src.to(args.device), batch.src_len.to(args.device)
    amp = args.amp_dtype

    def run():
        with torch.autocast(args.device, dtype=amp or torch.float32, enabled=amp is not None):
            out = search(
                model,
                src,
                src_len,
                BOS,
                EOS,
                beam=beam,
                length_penalty=1.0 if beam > 1 else None,
                max_len_a=args.max_len_a,
                max_len_b=args.max_len_b,
                graphs=runner,
            )
        sync(args.device)
        return out

    t_warm = time.perf_counter()
    out = run()  # untimed: Triton compiles, each graph shape warms up ...
    out = run()  # ... and is captured
    warmup_s = time.perf_counter() - t_warm
    times = []
    for _ in range(args.decode_iters):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    res = dict(
        per_s=src.shape[0] / dt,
        ms_per_batch=dt * 1e3,
        output_tokens=sum(len(t) for t in out.tokens),
        tokens=out.tokens,
        warmup_s=warmup_s,
    )
    if graphed:
        res["stats"] = dict(runner.stats)
    return res


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------


def environment(args, ours: str) -> dict:
    env = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
        device=args.device,
        ours_cell=ours,
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env.update(cpu=cpu, threads=torch.get_num_threads(), interpret=os.environ.get("TRITON_INTERPRET") == "1")
    return env


def print_table(results: dict, columns: list[str], args) -> None:
    labels = {"train": "train tok/s", "greedy": "greedy sent/s", "beam": f"beam{args.beam} sent/s"}
    head = f"{'':22}" + "".join(f"{c:>15}" for c in columns)
    print(head)
    print("-" * len(head))
    for task, cols in results.items():
        line = f"{labels[task]:22}"
        ratio = f"{'  x cudnn eager':22}"
        base = cols.get("cudnn_eager", {}).get("per_s")
        for c in columns:
            r = cols.get(c)
            if r is None:
                line += f"{'-':>15}"
                ratio += f"{'':>15}"
            elif "error" in r:
                line += f"{'error':>15}"
                ratio += f"{'':>15}"
            else:
                line += f"{r['per_s']:>15.1f}"
                ratio += f"{r['per_s'] / base:>15.2f}" if base else f"{'':>15}"
        print(line)
        print(ratio)
    for task, cols in results.items():
        a, b = cols.get("ours_graphs", {}), cols.get("cudnn_graphs", {})
        if "per_s" in a and "per_s" in b:
            print(f"# {task}: ours_graphs / cudnn_graphs = {a['per_s'] / b['per_s']:.2f}")
        for c, r in cols.items():
            if "error" in r:
                print(f"! {task} {c}: {r['error']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (lazily, by mt.kernels)
    ours = "triton" if args.device == "cuda" or args.interpret else "torch"
    columns = [c for c in args.columns if args.device == "cuda" or not c.endswith("_graphs")]
    env = environment(args, ours)
    print(
        f"# bench_train  device={env.get('gpu') or env.get('cpu')} ({args.device})  torch {env['torch']}  "
        f"triton {env['triton']}  "
        + (f"CUDA {env['cuda']} cuDNN {env['cudnn']}  " if args.device == "cuda" else "")
        + env["date"]
    )
    print(
        f"# model: {args.enc_layers}-layer bi-LSTM encoder, {args.dec_layers}-layer input-feeding decoder, "
        f"{args.attention} attention, E={args.emb} H={args.hidden} V={args.vocab}, dropout {args.dropout}; "
        f"train B={args.batch} S=T={args.steps}, {args.precision}; decode {args.decode_batch} sentences, "
        f"beam {args.beam}; ours = model.cell={ours}"
    )
    if args.device != "cuda":
        print("# no CUDA: graph columns skipped; the cudnn columns run PyTorch's CPU LSTM kernels")
    train_batches = random_batches(args, args.batches, args.batch, seed=1000 + args.seed)
    decode_batch = random_batches(args, 1, args.decode_batch, seed=2000 + args.seed)[0]
    results: dict = {t: {} for t in args.tasks}
    for col in columns:
        cell = "cudnn" if col.startswith("cudnn") else ours
        graphed = col.endswith("_graphs")
        for task in args.tasks:
            try:
                if task == "train":
                    results[task][col] = bench_train(args, cell, graphed, train_batches)
                else:
                    beam = 1 if task == "greedy" else args.beam
                    results[task][col] = bench_decode(args, cell, graphed, decode_batch, beam)
            except Exception as e:  # report, keep measuring the others
                traceback.print_exc()
                results[task][col] = {"error": f"{type(e).__name__}: {e}"[:400]}
            if args.device == "cuda":
                torch.cuda.empty_cache()
    # graphed decodes against eager ones of the same cell (untrained model: near-ties are possible)
    for task in ("greedy", "beam"):
        for cell in ("cudnn", "ours"):
            a, b = results.get(task, {}).get(f"{cell}_graphs"), results.get(task, {}).get(f"{cell}_eager")
            if a and b and "tokens" in a and "tokens" in b:
                a["same_output_as_eager"] = sum(x == y for x, y in zip(a["tokens"], b["tokens"])) / len(b["tokens"])
    print_table(results, columns, args)
    for task in ("greedy", "beam"):
        for r in results.get(task, {}).values():
            r.pop("tokens", None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in vars(args).items() if k not in ("json", "amp_dtype")}
        args.json.write_text(json.dumps(dict(environment=env, config=cfg, results=results), indent=2) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
