"""Training-step and decoding speed: cuDNN vs our gate cell, eager vs CUDA graphs, in one run.

Run from the repository root (no install needed: only torch, triton and numpy; no hydra, no
datasets; the model is built from mt.config.ModelConfig + mt.model.Seq2Seq directly):

    python benchmarks/bench_train.py --json bench_train.json     # GPU: Multi30k-sized model, bf16, B=128, T=20
    python benchmarks/bench_train.py --batch 64 --steps 30       # other shapes (--hidden, --emb, --vocab, ...)
    python benchmarks/bench_train.py --quick                     # CPU: tiny sizes, eager columns only
    python benchmarks/bench_train.py --quick --interpret         # CPU: "ours" through the Triton interpreter
    python benchmarks/bench_train.py --preset wmt --json bench_train_wmt.json                  # WMT-size, lengths <= 128
    python benchmarks/bench_train.py --preset wmt --max-len 256 --json bench_train_wmt256.json # ... <= 256

Model (defaults): 2-layer bidirectional LSTM encoder, 2-layer input-feeding LSTM decoder, Luong
general attention, E = H = 512, V = 8000 (source and target), dropout 0.3, tied output layer:
the shape of the Multi30k recipe. Batches are random token ids with real shapes: B sentences,
source and target lengths uniform in [T/2, T] (EOS/BOS included), the longest exactly T, so
every batch has the shape (B, T, T); the same batches for every column.

--preset wmt: the WMT-size model (4-layer bidirectional encoder, 4-layer input-feeding decoder,
E = H = 1024, V = 32000) trained as mt.train trains it: token-budget batches (--max-tokens 16384,
at most --max-sentences 256) made by mt.batching.TokenBucketSampler from the lengths of
--pairs synthetic sentence pairs (source lengths log-normal around --median-len pieces, targets
within about 15 % of their source, all below --max-len), and, in the graph columns, one CUDA graph
per bucket of mt.graphs.ShapeBuckets.from_budget (the buckets mt.train derives). Every bucket is
warmed up and captured before the timing (`capture_s`: the time that takes, for all buckets);
then --iters of the sampler's batches are timed. Decoding: --decode-batch sentences of lengths
from the same distribution. `peak_mem_gb`: torch.cuda.max_memory_reserved() over the column (the
graphs' shared memory pool included), `peak_alloc_gb` the allocated part. --max-tokens alone
(without the preset) runs the bucketed mode on the default model. --emulate-graphs runs the graph
columns without capturing (emulate=True) off CUDA: a check of the script's own logic.

Columns (the same model, same initial weights, same batches):
  cudnn_eager    model.cell=cudnn (nn.LSTM packed / nn.LSTMCell), eager: trainer.cuda_graphs=false
  cudnn_graphs   model.cell=cudnn under mt.graphs (encoder: cuDNN on the padded batch, no packing)
  ours_eager     model.cell=triton (our Triton kernels: the gate cell, and in decoding the
                 search's fused log-softmax + top-k; on CPU: the PyTorch reference, or Triton
                 interpreted with --interpret), eager
  ours_graphs    model.cell=triton under mt.graphs

Rows:
  train   target tokens per second of a full training step: forward, label-smoothed loss
          (PyTorch's ops; --fused-loss: mt/kernels/cross_entropy.py's kernel, in every column),
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
    p.add_argument("--preset", choices=("multi30k", "wmt"), default="multi30k", help="model and batch sizes")
    p.add_argument("--max-tokens", type=int, help="bucketed mode: token budget per batch (wmt: 16384; quick 256)")
    p.add_argument("--max-sentences", type=int, default=256, help="bucketed mode: sentences per batch at most")
    p.add_argument("--max-len", type=int, help="bucketed mode: longest sentence, EOS/BOS included (wmt: 128; quick 16)")
    p.add_argument(
        "--median-len", type=float, help="bucketed mode: median source length in pieces (default 24; quick 6)"
    )
    p.add_argument("--pairs", type=int, default=20000, help="bucketed mode: synthetic pairs the batches are made of")
    p.add_argument("--emulate-graphs", action="store_true", help="off CUDA: graph columns emulated (logic check)")
    p.add_argument("--interpret", action="store_true", help="CPU: run ours through TRITON_INTERPRET=1")
    p.add_argument(
        "--fused-loss", action="store_true", help="every column: the loss in Triton kernels (trainer.fused_loss)"
    )
    p.add_argument("--batch", type=int, help="sentences per training batch (default 128; quick 8)")
    p.add_argument("--steps", type=int, help="T: longest source and target length (default 20; quick 6)")
    p.add_argument("--emb", type=int, help="embedding size E (default 512; quick 32)")
    p.add_argument("--hidden", type=int, help="hidden size H (default 512; quick 32)")
    p.add_argument("--vocab", type=int, help="source and target vocabulary (default 8000; quick 64)")
    p.add_argument("--enc-layers", type=int, help="default 2 (wmt: 4)")
    p.add_argument("--dec-layers", type=int, help="default 2 (wmt: 4)")
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
    wmt = args.preset == "wmt"
    defaults = dict(
        batch=8 if small else 128,
        steps=6 if small else 20,
        emb=32 if small else (1024 if wmt else 512),
        hidden=32 if small else (1024 if wmt else 512),
        vocab=64 if small else (32000 if wmt else 8000),
        enc_layers=4 if wmt else 2,
        dec_layers=4 if wmt else 2,
        max_tokens=(256 if small else 16384) if wmt else None,
        max_len=16 if small else 128,
        median_len=6 if small else 24,
        warmup=1 if small else 5,
        iters=2 if small else (10 if args.quick else (60 if wmt else 30)),
        decode_batch=4 if small else (64 if wmt else 128),
        decode_iters=1 if small else 3,
        max_len_b=2 if small else 10,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.bucketed = args.max_tokens is not None
    if args.bucketed:
        args.steps = args.max_len  # the longest side any batch can have
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


def make_batch(args, g: torch.Generator, src_l: list[int], tgt_l: list[int]):
    """A collated batch of random token ids: source i has src_l[i] - 1 pieces (+EOS), target
    tgt_l[i] - 1 (+BOS/EOS)."""
    from mt.batching import collate

    rows = [
        {
            "src_ids": torch.randint(4, args.vocab, (ls - 1,), generator=g).tolist(),
            "tgt_ids": torch.randint(4, args.vocab, (lt - 1,), generator=g).tolist(),
            "idx": i,
        }
        for i, (ls, lt) in enumerate(zip(src_l, tgt_l))
    ]
    return collate(rows, PAD, BOS, EOS)


def random_batches(args, count: int, n: int, seed: int) -> list:
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(seed + k)
        out.append(make_batch(args, g, random_lengths(g, n, args.steps), random_lengths(g, n, args.steps)))
    return out


def corpus_lengths(args, n: int, seed: int) -> tuple[list[int], list[int]]:
    """Piece counts of n synthetic pairs (EOS/BOS not included): sources log-normal around
    --median-len, targets within about 15 % of their source, both in [1, max_len - 1]."""
    g = torch.Generator().manual_seed(seed)
    src = torch.exp(torch.randn(n, generator=g) * 0.6) * args.median_len
    tgt = src * torch.exp(torch.randn(n, generator=g) * 0.15)
    top = args.max_len - 1

    def clip(x):
        return x.round().clamp(1, top).long().tolist()

    return clip(src), clip(tgt)


def bucketed_batches(args, count: int, seed: int) -> list:
    """The first `count` batches mt.train's TokenBucketSampler makes of --pairs synthetic pairs."""
    from mt.batching import TokenBucketSampler

    src, tgt = corpus_lengths(args, args.pairs, seed)
    sampler = TokenBucketSampler(src, tgt, args.max_tokens, args.max_sentences, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in sampler:
        out.append(make_batch(args, g, [src[i] + 1 for i in rows], [tgt[i] + 1 for i in rows]))
        if len(out) == count:
            break
    return out


def bucket_shapes(args):
    """The graph shapes mt.train derives for this budget (bucketed mode), or the one (B, T, T)."""
    from mt import graphs

    if not args.bucketed:
        return graphs.ShapeBuckets([(args.batch, args.steps, args.steps)])
    return graphs.ShapeBuckets.from_budget(args.max_tokens, args.max_sentences, args.max_len)


def filling_batch(args, shape, seed: int):
    """A batch that fills a bucket shape (B, L, L): B sentences, the longest exactly L."""
    B, S, T = shape
    g = torch.Generator().manual_seed(seed)
    return make_batch(args, g, random_lengths(g, B, S), random_lengths(g, B, T))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# the columns
# ----------------------------------------------------------------------------------------------


def make_criterion(args) -> nn.Module:
    """The label-smoothed loss (0.1, as the recipes), summed: PyTorch's, or with --fused-loss
    mt.loss.FusedCrossEntropyLoss (trainer.fused_loss=true: Triton kernels for the loss and
    its gradient) in every column."""
    if getattr(args, "fused_loss", False):
        from mt.loss import FusedCrossEntropyLoss

        return FusedCrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1)
    return nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1, reduction="sum")


def train_step(args, cell: str, graphed: bool, warmup: int = 2):
    """The bench's training step for `cell`: (optimizer, step). Graphed: mt.graphs.GraphedTrainStep
    for the bucket shapes (`bucket_shapes`), capturable Adam, `warmup` eager steps of each shape
    before its capture (emulated, no capture, off CUDA); else mt.graphs.TrainStep."""
    from mt import graphs

    model = build_model(args, cell).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    crit = make_criterion(args)
    kw = dict(pad_id=PAD, amp_dtype=args.amp_dtype, clip_norm=5.0, device=args.device)
    if not graphed:
        return opt, graphs.TrainStep(model, opt, crit, **kw)
    cuda = args.device == "cuda"
    if cuda:  # (capturable Adam runs on CUDA only)
        graphs.make_capturable(opt, args.device)
    return opt, graphs.GraphedTrainStep(
        model, opt, crit, buckets=bucket_shapes(args), warmup=warmup, emulate=not cuda, **kw
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

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    capture_s = None
    if graphed and args.bucketed:  # every bucket warmed up and captured first (mt.train meets them as they come)
        for k, shape in enumerate(step.buckets):
            b = filling_batch(args, shape, seed=5000 + k)
            for _ in range(3):  # 2 eager warm-up steps, then the capture
                one(b)
        pending.drain()  # (the last warm-up step's numbers: not the timed run's)
        losses.clear()
        sync(args.device)
        capture_s = time.perf_counter() - t_warm
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
    if capture_s is not None:
        res.update(capture_s=capture_s, buckets=len(step.buckets))
    if args.device == "cuda":
        res.update(
            peak_mem_gb=torch.cuda.max_memory_reserved() / 1e9, peak_alloc_gb=torch.cuda.max_memory_allocated() / 1e9
        )
    if graphed:
        res["stats"] = dict(step.stats)
    return res


def bench_decode(args, cell: str, graphed: bool, batch, beam: int) -> dict:
    from mt import graphs
    from mt.runtime import autocast
    from mt.search import search

    model = build_model(args, cell).eval()
    runner = graphs.GraphedDecoder(model, emulate=args.device != "cuda") if graphed else None
    src, src_len = batch.src.to(args.device), batch.src_len.to(args.device)
    amp = args.amp_dtype

    def run():
        with autocast(args.device, amp):
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
        if "peak_mem_gb" in a and "peak_mem_gb" in b:
            print(
                f"# {task}: peak memory (GB, reserved) "
                + ", ".join(f"{c} {r['peak_mem_gb']:.2f}" for c, r in cols.items() if "peak_mem_gb" in r)
            )
            print(f"# {task}: ours_graphs / cudnn_graphs peak memory = {a['peak_mem_gb'] / b['peak_mem_gb']:.2f}")
        for c, r in cols.items():
            if r.get("capture_s") is not None:
                print(f"# {task} {c}: {r['buckets']} buckets warmed up and captured in {r['capture_s']:.1f} s")
        for c, r in cols.items():
            if "error" in r:
                print(f"! {task} {c}: {r['error']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (lazily, by mt.kernels)
    ours = "triton" if args.device == "cuda" or args.interpret else "torch"
    columns = [c for c in args.columns if args.device == "cuda" or args.emulate_graphs or not c.endswith("_graphs")]
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
        + (
            f"train batches of <= {args.max_tokens} tokens and <= {args.max_sentences} sentences, lengths <= "
            f"{args.max_len} (median source {args.median_len:g}), {len(bucket_shapes(args))} graph buckets"
            if args.bucketed
            else f"train B={args.batch} S=T={args.steps}"
        )
        + f", {args.precision}; decode {args.decode_batch} sentences, beam {args.beam}; ours = model.cell={ours}"
    )
    if args.device != "cuda":
        print(
            "# no CUDA: graph columns "
            + ("emulated (no capture: a logic check)" if args.emulate_graphs else "skipped")
            + "; the cudnn columns run PyTorch's CPU LSTM kernels"
        )
    if args.bucketed:  # mt.train's batches: no cycling, each timed step a new batch
        train_batches = bucketed_batches(args, args.warmup + args.iters, seed=1000 + args.seed)
        g = torch.Generator().manual_seed(2000 + args.seed)
        src, tgt = corpus_lengths(args, args.decode_batch, seed=2000 + args.seed)
        decode_batch = make_batch(args, g, [n + 1 for n in src], [n + 1 for n in tgt])
    else:
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
