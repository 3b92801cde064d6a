"""Correctness checks that need a GPU: the Triton kernels on CUDA tensors, and CUDA graphs
(training step and decoder step) against the same code run eagerly.

    python scripts/gpu_checks.py --json gpu_checks.json      # about a minute on an H100
    (scripts/gpu_checks.sh runs it together with the kernel tests and the benchmarks)

Needs only torch, triton, numpy (no hydra, no datasets). Prints one line per check and exits
with status 1 if any fails. Checks:

  kernels       mt.kernels.triton_cell on CUDA (no interpreter) against mt.kernels.reference:
                cell_step (with pre and bias) and lstm_sequence (2 directions, lengths, initial
                state), outputs and gradients, fp32 (ieee dots) and bf16; the search's
                fused log_softmax_topk (mt.kernels.search_topk) against the reference; a
                decoding step's attention (mt.kernels.decode_attention) against the PyTorch
                ops, and the same bits in 10 launches; beam search's output walk
                (search_beam.backtrack) against the host's; and the decoder state's gather
                (search_beam.gather_rows) against index_select, an fp32 -> bf16 cast included.
  train_graph_vs_emulated[cell]
                20 steps of a small model (bf16 autocast, dropout 0.3, label smoothing, clipping,
                a LambdaLR warm-up read through the lr tensor) over batches of 3 shapes, one of
                which fits no bucket: mt.graphs.GraphedTrainStep with graphs captured and
                replayed, against the same steps with emulate=True (the padded static shapes run
                eagerly, same capturable Adam, same RNG). The same kernels on the same data: the
                losses, NLL sums and gradient norms must agree to 1e-5 (expected: exactly).
                The graphed run reads them a step late, as mt.train does (mt.step_stats), so
                its host runs a step ahead of the GPU through pinned, non-blocking batch copies;
                the emulated run reads them right after each step.
                Also checks that graphs were captured and replayed and one step ran eagerly.
  train_graph_vs_eager[cell]
                20 steps, fp32 with TF32 off, dropout 0: GraphedTrainStep against
                mt.graphs.TrainStep on the unpadded batches (what trainer.cuda_graphs=false
                runs: plain Adam, cuDNN packed for model.cell=cudnn). Padding and the optimizer
                implementation change rounding only: losses within 1e-3 relative.
  decode_graph_vs_emulated[cell, dtype]
                greedy and beam 5 with mt.graphs.GraphedDecoder (captured: the encoder and the
                search step, each its own graph) against emulate=True: identical tokens, scores
                within 1e-4; the encoder's graph captured once and replayed.
  search_kernels_vs_pytorch[triton, dtype, beam]
                greedy and beam 5 with the bookkeeping kernels, the state's gather and the
                output's walk back on the device (mt.kernels.search_greedy, search_beam)
                against the same search with its PyTorch / numpy code (`advance`,
                index_select, `_backtrack_host`), graphed and eager: identical tokens, scores
                and attention within 1e-5.
  decode_graph_vs_eager[cell]
                fp32: the graphed decoder against plain eager decoding (no padding): >= 95% of
                the sentences identical (padding changes float rounding; an untrained model has
                near-ties), scores of identical outputs within 1e-3.
  train_capture_large_batch[cell]
                a (64, 80, 80) batch shape: over 4096 embedding ids, where the embedding backward
                sorts (a different kernel path, which must not sync either); graph vs emulated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
RESULTS: list[dict] = []
DEVICE = "cuda"  # "cpu" with --dry-run-cpu: graphs emulated, kernels interpreted (tests this script)
HIDDEN, STEPS, CELLS = 128, 20, ["triton", "cudnn"]
JSON: Path | None = None  # --json: rewritten after every check, so a timeout keeps what was checked


def save(finished: bool = False) -> None:
    if JSON is None:
        return
    env = dict(device=DEVICE, torch=torch.__version__, cuda=torch.version.cuda)
    if DEVICE == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version())
    JSON.parent.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(dict(environment=env, finished=finished, results=RESULTS), indent=2, default=str) + "\n")


def check(name: str, ok: bool, **info) -> None:
    RESULTS.append(dict(name=name, ok=bool(ok), **info))
    detail = " ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (list, dict)))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    save()


def max_rel(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=0.0)


def max_scaled(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """The largest |x - ref| / max |ref| over pairs of tensors."""
    return max(((x - r).abs().max() / r.abs().max().clamp_min(1e-12)).item() for x, r in zip(xs, refs))


# ----------------------------------------------------------------------------------------------
def check_kernels() -> None:
    from mt.kernels import reference, triton_cell

    dev = DEVICE
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        torch.manual_seed(0)
        B, K, H = 37, 96, 64
        inp = torch.randn(B, K, device=dev, dtype=dtype)
        c = torch.randn(B, H, device=dev, dtype=torch.float32)
        w = (torch.randn(4 * H, K, device=dev, dtype=dtype) / K**0.5).t()  # a transposed view
        pre = torch.randn(B, 4 * H, device=dev, dtype=dtype)
        bias = torch.randn(4 * H, device=dev, dtype=dtype)
        outs = []
        for impl in (triton_cell, reference):
            args = [t.detach().clone().requires_grad_() for t in (inp, c, w, pre, bias)]
            h2, c2 = impl.cell_step(args[0], args[1], args[2], pre=args[3], bias=args[4])
            (h2.float().square().sum() + (c2 * 0.5).sum()).backward()
            outs.append([h2.float(), c2.float()] + [a.grad.float() for a in args])
        err = max(((x - y).abs().max() / (1 + y.abs().max())).item() for x, y in zip(*outs))
        check(f"kernels.cell_step[{str(dtype)[6:]}]", err < tol, max_scaled_err=f"{err:.2e}", tol=tol)

        D, T = 2, 9
        lengths = torch.tensor([9, 4, 1, 7, 9, 2, 5, 0][:8], device=dev)
        xproj = torch.randn(D, 8, T, 4 * H, device=dev, dtype=dtype)
        w_hh = (torch.randn(D, 4 * H, H, device=dev, dtype=dtype) / H**0.5).transpose(1, 2)
        h0 = torch.randn(D, 8, H, device=dev, dtype=dtype)
        c0 = torch.randn(D, 8, H, device=dev, dtype=torch.float32)
        outs = []
        for impl in (triton_cell, reference):
            args = [t.detach().clone().requires_grad_() for t in (xproj, w_hh, h0, c0)]
            out, h_n, c_n = impl.lstm_sequence(args[0], args[1], lengths, h0=args[2], c0=args[3])
            (out.float().square().sum() + 2 * h_n.float().sum() + 3 * c_n.sum()).backward()
            outs.append([out.float(), h_n.float(), c_n.float()] + [a.grad.float() for a in args])
        err = max(((x - y).abs().max() / (1 + y.abs().max())).item() for x, y in zip(*outs))
        check(f"kernels.lstm_sequence[{str(dtype)[6:]}]", err < tol, max_scaled_err=f"{err:.2e}", tol=tol)

    # the search's fused log-softmax + top-k, at the bench's beam-5 shape and a small one
    from mt.kernels import search_topk

    for dtype in (torch.float32, torch.bfloat16):
        shapes = ((640, 8000, 10), (128, 8000, 1), (37, 50, 10)) if dev == "cuda" else ((6, 800, 10), (37, 50, 10))
        for N, V, k in shapes:
            g = torch.Generator(device=dev).manual_seed(N + k)
            logits = (torch.randn(N, V, device=dev, generator=g) * 4).to(dtype)
            bias = torch.randn(N, device=dev, generator=g) - 3
            bias[1] = float("-inf")
            banned = torch.tensor([0, 2], device=dev)
            vals, cols = search_topk.log_softmax_topk(logits, k, row_bias=bias, banned=banned)
            ref_vals, _ = reference.log_softmax_topk(logits, k, row_bias=bias, banned=banned)
            full_vals, full_cols = reference.log_softmax_topk(logits, V, row_bias=bias, banned=banned)
            by_col = torch.empty(N, V, device=dev).scatter_(1, full_cols, full_vals)
            fin = torch.isfinite(ref_vals)
            err = max((vals[fin] - ref_vals[fin]).abs().max().item(),
                      (by_col.gather(1, cols)[fin] - vals[fin]).abs().max().item())
            ok = (err < 1e-4 and bool(torch.equal(fin, torch.isfinite(vals)))
                  and bool(((cols >= 0) & (cols < V)).all()) and not bool(torch.isin(cols[fin], banned).any()))
            check(f"kernels.log_softmax_topk[{str(dtype)[6:]}, {N}x{V}, k={k}]", ok, max_abs_err=f"{err:.2e}", tol=1e-4)

    # a decoding step's attention (decode_attention.py) against the PyTorch ops, at the beam-5
    # bench's rows and at long sources (25 tiles a row), 10 launches each: the same bits every
    # time (a race between the program's warps would show as launches that differ)
    from mt.kernels import decode_attention

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for B, S, H in ((640, 20, 512), (640, 200, 512)) if dev == "cuda" else ((6, 5, 32), (3, 70, 512)):
            g = torch.Generator(device=dev).manual_seed(S)
            query = torch.randn(B, H, device=dev, generator=g).to(dtype)
            keys, memory = (torch.randn(B, S, H, device=dev, generator=g).to(dtype) for _ in range(2))
            mask = torch.arange(S, device=dev)[None, :] < torch.randint(1, S + 1, (B, 1), device=dev, generator=g)
            runs = [decode_attention.attention_step(query, keys, memory, mask) for _ in range(10 if dev == "cuda" else 2)]
            ctx, w = runs[0]
            same = all(torch.equal(c, ctx) and torch.equal(x, w) for c, x in runs[1:])
            ref_ctx, ref_w = reference.attention_step(query, keys, memory, mask)
            err = max((w - ref_w).abs().max().item(), (ctx.float() - ref_ctx.float()).abs().max().item()
                      / (1 + ref_ctx.float().abs().max().item()))
            check(f"kernels.attention_step[{str(dtype)[6:]}, {B}x{S}x{H}]", err < tol and same, max_err=f"{err:.2e}",
                  tol=tol, same_bits_every_launch=same)

    # training's attention backward (decode_attention.attention_step_autograd) and autograd
    # through the PyTorch ops, both against the PyTorch ops in fp64: the kernel's scaled error at
    # most tol or twice the PyTorch ops' own (in bf16 they differ from each other by more than
    # either does from fp64); 10 backward launches that must agree bit for bit. At the training
    # bench's shape a loss on the context alone (what training runs), on the context and the
    # weights, and dot attention's keys that are the memory; and a long source
    cases = ((128, 20, 512, False, False), (128, 20, 512, True, False), (128, 20, 512, False, True),
             (128, 200, 512, True, False))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for B, S, H, with_dw, shared in cases if dev == "cuda" else ((6, 5, 32, True, False), (3, 70, 512, False, True)):
            g = torch.Generator(device=dev).manual_seed(S + 1)
            query = torch.randn(B, H, device=dev, generator=g).to(dtype)
            keys = (torch.randn(B, S, H, device=dev, generator=g) * 0.3).to(dtype)
            memory = torch.randn(B, S, H, device=dev, generator=g).to(dtype)
            mask = torch.arange(S, device=dev)[None, :] < torch.randint(1, S + 1, (B, 1), device=dev, generator=g)
            d_ctx = torch.randn(B, H, device=dev, generator=g).to(dtype)
            d_w = torch.randn(B, S, device=dev, generator=g) if with_dw else None
            grads = []
            for fn, dt in ((reference.attention_step, torch.float64), (reference.attention_step, dtype),
                           (decode_attention.attention_step_autograd, dtype)):
                q_, m_ = query.to(dt).clone().requires_grad_(), memory.to(dt).clone().requires_grad_()
                k_ = m_ if shared else keys.to(dt).clone().requires_grad_()
                ctx, w = fn(q_, k_, m_, mask)
                torch.autograd.backward([ctx, w] if with_dw else [ctx], [d_ctx.to(dt), d_w] if with_dw else [d_ctx.to(dt)])
                grads.append([x.grad.double() for x in ((q_, m_) if shared else (q_, k_, m_))])
            err, ref_err = max_scaled(grads[2], grads[0]), max_scaled(grads[1], grads[0])
            k_in = memory if shared else keys
            w = decode_attention.attention_step(query, k_in, memory, mask)[1]
            runs = [decode_attention.attention_step_backward(query, k_in, memory, mask, w, d_ctx, d_w)
                    for _ in range(10 if dev == "cuda" else 2)]
            same = all(all(torch.equal(x, y) for x, y in zip(r, runs[0])) for r in runs[1:])
            what = "d_context" + (" d_weights" if with_dw else "") + (" keys=memory" if shared else "")
            check(f"kernels.attention_step_backward[{str(dtype)[6:]}, {B}x{S}x{H}, {what}]",
                  err <= max(tol, 2 * ref_err) and same, max_scaled_err=f"{err:.2e}", pytorch_ops=f"{ref_err:.2e}",
                  tol=tol, same_bits_every_launch=same)

    # beam search's output: the device walk back (search_beam.backtrack) against the host's
    from mt.kernels import search_beam
    from mt.search import _backtrack_host

    shapes = ((40, 128, 128, 5, 1, 20), (41, 64, 50, 5, 5, 33)) if dev == "cuda" else ((6, 4, 3, 5, 2, 7),)
    for T, n0, n, K, m, S in shapes:
        g = torch.Generator().manual_seed(T)
        tok, bp = torch.randint(4, 8000, (T, n0, K), generator=g), torch.randint(0, K, (T, n0, K), generator=g)
        attn = torch.rand(T, n0, K, S, generator=g)
        steps = T - 1
        info = torch.stack([torch.randint(0, steps, (n0, K), generator=g), torch.randint(0, K, (n0, K), generator=g),
                            torch.randint(3, 8000, (n0, K), generator=g)], dim=-1)
        d_tok, d_attn = search_beam.backtrack(*(x.to(dev) for x in (info, tok, bp, attn)), n, m, steps)
        h_tok, h_attn = _backtrack_host(tok[:steps, :n].numpy(), bp[:steps, :n].numpy(), attn[:steps, :n],
                                        info[:n, :m].numpy())
        d_tok, d_attn, ends = d_tok.cpu(), d_attn.cpu(), info[:n, :m, 0].tolist()
        same = all(d_tok[i, k, :e].tolist() == h_tok[i, k, :e].tolist()
                   and torch.equal(d_attn[i, k, : e + 1], torch.from_numpy(h_attn[i, k, : e + 1]))
                   for i in range(n) for k in range(m) for e in [ends[i][k]])
        check(f"kernels.beam_backtrack[{n}x{m} of {n0}x{K}, {steps} steps]", same)

    # the decoder state's gather (search_beam.gather_rows) against index_select, casts included
    N, H = (640, 512) if dev == "cuda" else (12, 40)
    g = torch.Generator(device=dev).manual_seed(N)
    rows = torch.randint(0, N, (N,), device=dev, generator=g)
    srcs = [torch.randn(N, H, device=dev, generator=g).to(d) for d in (torch.bfloat16, torch.bfloat16, torch.float32,
                                                                       torch.float32, torch.float32)]
    dsts = [torch.empty(N, H, device=dev, dtype=d) for d in (torch.bfloat16, torch.bfloat16, torch.float32,
                                                             torch.float32, torch.bfloat16)]  # the last: fp32 -> bf16
    search_beam.gather_rows(rows, srcs, dsts)
    same = [bool(torch.equal(d, s.index_select(0, rows).to(d.dtype))) for s, d in zip(srcs, dsts)]
    # (on CPU the interpreter rounds fp32 to bf16 its own way: the last pair is only checked on CUDA)
    check(f"kernels.gather_rows[{N}x{H}, 5 tensors]", all(same if dev == "cuda" else same[:4]), same=same)


# ----------------------------------------------------------------------------------------------
def small_model(cell: str, dropout: float, dtype=torch.float32, attention="general"):
    from mt.config import ModelConfig
    from mt.model import Seq2Seq

    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, emb_dim=HIDDEN, hidden_dim=HIDDEN, enc_layers=2, dec_layers=2, attention=attention,
                      dropout=dropout, emb_dropout=dropout)
    return Seq2Seq(cfg, 500, 500, PAD).to(DEVICE, dtype)


def batches_for_training(n_steps: int) -> list:
    """Three kinds of batches: two fit the buckets (several times each: warm-up, capture, replay),
    one has too many sentences for any bucket (runs eagerly)."""
    from mt.batching import collate

    fits_a, fits_b, fits_none = (16, 12, 11), (8, 20, 18), (40, 9, 9)  # (sentences, longest src, longest tgt)
    out = []
    for k in range(n_steps):
        n, ls_max, lt_max = fits_none if k == 7 else (fits_a if k % 2 == 0 else fits_b)
        g = torch.Generator().manual_seed(100 + k)
        rows = []
        for i in range(n):
            ls = ls_max if i == 0 else int(torch.randint(2, ls_max + 1, (1,), generator=g))
            lt = lt_max if i == 0 else int(torch.randint(2, lt_max + 1, (1,), generator=g))
            rows.append({"src_ids": torch.randint(4, 500, (ls - 1,), generator=g).tolist(),
                         "tgt_ids": torch.randint(4, 500, (lt - 1,), generator=g).tolist(), "idx": i})
        out.append(collate(rows, PAD, BOS, EOS))
    return out


def run_training(cell: str, mode: str, batches: list, amp_dtype, dropout: float,
                 lagged: bool = False) -> tuple[list, dict]:
    """mode: graph | emulate | eager. Returns per step (loss_sum, nll_sum, grad_norm) and stats.
    lagged: read them a step late as mt.train does (mt.step_stats), so the host runs a step ahead
    of the GPU; otherwise right after each step."""
    from mt import graphs
    from mt.step_stats import StepStats, step_values

    model = small_model(cell, dropout).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 5, 1.0))
    crit = nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1, reduction="sum")
    kw = dict(pad_id=PAD, amp_dtype=amp_dtype, clip_norm=1.0, device=DEVICE)
    buckets = graphs.ShapeBuckets([(16, 12, 12), (8, 20, 20)])
    if mode == "eager":
        step = graphs.TrainStep(model, opt, crit, **kw)
    else:
        if DEVICE == "cuda":  # (a CPU Adam cannot be capturable)
            graphs.make_capturable(opt, DEVICE)
        step = graphs.GraphedTrainStep(model, opt, crit, buckets=buckets, emulate=mode == "emulate" or DEVICE != "cuda",
                                       **kw)
    torch.manual_seed(1234)  # the same dropout masks for every mode
    log = []
    pending = StepStats(DEVICE, lag=1)
    for b in batches:
        loss_sum, nll_sum = step.forward_backward(b)
        if not lagged:
            log.append([loss_sum.item(), nll_sum.item()])
        grad_norm = step.update()
        if not lagged:
            log[-1].append(float(grad_norm))
        sched.step()
        if lagged:
            pending.push(None, step_values(loss_sum, nll_sum, b.ntokens, False, grad_norm, opt.param_groups[0]["lr"],
                                           DEVICE))
            log += [[row[0], row[1], row[4]] for _, row in pending.ready()]
    log += [[row[0], row[1], row[4]] for _, row in pending.drain()]
    return log, dict(getattr(step, "stats", {}))


def check_large_batch_capture() -> None:
    """Batches with more than 4096 token ids take another embedding-backward kernel (sort and
    segment) than small ones: capture that one too (4 steps: 2 warm-up, capture, replay)."""
    from mt import graphs
    from mt.batching import collate

    shape = (64, 80, 80)  # 5120 source and 5120 target ids
    batches = []
    for k in range(4):
        g = torch.Generator().manual_seed(300 + k)
        rows = [{"src_ids": torch.randint(4, 500, (79 if i == 0 else int(torch.randint(10, 80, (1,), generator=g)),),
                                          generator=g).tolist(),
                 "tgt_ids": torch.randint(4, 500, (79 if i == 0 else int(torch.randint(10, 80, (1,), generator=g)),),
                                          generator=g).tolist(), "idx": i} for i in range(64)]
        batches.append(collate(rows, PAD, BOS, EOS))
    for cell in CELLS:
        logs = []
        for emulate in (False, True):
            model = small_model(cell, 0.1).train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            if DEVICE == "cuda":
                graphs.make_capturable(opt, DEVICE)
            crit = nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1, reduction="sum")
            step = graphs.GraphedTrainStep(model, opt, crit, pad_id=PAD, amp_dtype=torch.bfloat16 if DEVICE == "cuda"
                                           else None, clip_norm=1.0, buckets=graphs.ShapeBuckets([shape]),
                                           device=DEVICE, emulate=emulate or DEVICE != "cuda")
            torch.manual_seed(99)
            log = []
            for b in batches:
                loss_sum, _ = step.forward_backward(b)
                log.append(loss_sum.item())
            logs.append(log)
        err = max_rel(*logs)
        check(f"train_capture_large_batch[{cell}]", err <= 1e-5, max_rel_diff=f"{err:.2e}", losses=logs[0])


def check_training() -> None:
    check_large_batch_capture()
    batches = batches_for_training(STEPS)
    for cell in CELLS:
        t0 = time.perf_counter()
        g, gstats = run_training(cell, "graph", batches, torch.bfloat16, 0.3, lagged=True)
        e, _ = run_training(cell, "emulate", batches, torch.bfloat16, 0.3)
        flat_g, flat_e = [v for row in g for v in row], [v for row in e for v in row]
        err = max_rel(flat_g, flat_e)
        finite = all(math.isfinite(v) for v in flat_g)
        ok = err <= 1e-5 and finite and gstats.get("eager", 0) == int(STEPS > 7)
        if DEVICE == "cuda":
            ok = ok and gstats.get("captured") == 2 and gstats.get("replayed", 0) >= STEPS - 10
        check(f"train_graph_vs_emulated[{cell}]", ok, max_rel_diff=f"{err:.2e}", exact=flat_g == flat_e,
              stats=gstats, losses_graph=[r[0] for r in g], losses_emulated=[r[0] for r in e],
              seconds=f"{time.perf_counter() - t0:.1f}")

        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            g, _ = run_training(cell, "graph", batches, None, 0.0)
            e, _ = run_training(cell, "eager", batches, None, 0.0)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        losses_g, losses_e = [r[0] for r in g], [r[0] for r in e]
        err = max_rel(losses_g, losses_e)
        check(f"train_graph_vs_eager[{cell}]", err <= 1e-3, max_rel_diff=f"{err:.2e}", losses_graph=losses_g,
              losses_eager=losses_e, first_loss=f"{losses_e[0]:.4f}", last_loss=f"{losses_e[-1]:.4f}")


# ----------------------------------------------------------------------------------------------
def decode(model, batch, graphs, beam: int, amp_dtype):
    from mt.search import search

    with torch.autocast(DEVICE, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return search(model, batch.src.to(DEVICE), batch.src_len.to(DEVICE), BOS, EOS, beam=beam,
                      length_penalty=1.0 if beam > 1 else None, max_len_b=8, graphs=graphs)


def check_decoding() -> None:
    from mt import graphs as G
    from mt.batching import collate

    g = torch.Generator().manual_seed(7)
    rows = [{"src_ids": torch.randint(4, 500, (int(torch.randint(3, 19, (1,), generator=g)),), generator=g).tolist(),
             "tgt_ids": [], "idx": i} for i in range(37)]
    batch = collate(rows, PAD, BOS, EOS)
    for cell in CELLS:
        for amp in (None, torch.bfloat16) if DEVICE == "cuda" else (None,):
            model = small_model(cell, 0.0).eval()
            name = f"{cell}, {'bf16' if amp else 'fp32'}"
            for beam in (1, 5):
                gd, ed = G.GraphedDecoder(model), G.GraphedDecoder(model, emulate=True)
                outs = [decode(model, batch, gd, beam, amp) for _ in range(3)]  # warm-up, capture, replay
                ref = decode(model, batch, ed, beam, amp)
                same = all(o.tokens == ref.tokens for o in outs)
                err = max(max_rel(o.scores, ref.scores) for o in outs)
                # the third search replays both graphs: the encoder's (captured by the second) and the step's
                enc = dict(gd.encoder_stats)
                enc_ok = DEVICE != "cuda" or (enc.get("captured") == 1 and enc.get("replayed") == 1)
                check(f"decode_graph_vs_emulated[{name}, beam {beam}]", same and err <= 1e-4 and enc_ok,
                      same_tokens=same, max_rel_score_diff=f"{err:.2e}", stats=dict(gd.stats), encoder_stats=enc)
                if cell == "triton":
                    check_search_kernels(model, batch, beam, amp, name)
                if amp is None:
                    eager = decode(model, batch, None, beam, None)
                    agree = [a == b for a, b in zip(outs[-1].tokens, eager.tokens)]
                    sdiff = max_rel([s for s, ok in zip(outs[-1].scores, agree) if ok],
                                    [s for s, ok in zip(eager.scores, agree) if ok])
                    frac = sum(agree) / len(agree)
                    check(f"decode_graph_vs_eager[{name}, beam {beam}]", frac >= 0.95 and sdiff <= 1e-3,
                          same_output=f"{frac:.3f}", max_rel_score_diff=f"{sdiff:.2e}")


def attention_diff(a, b) -> float:
    """The largest difference between two decodes' attention weights (inf where shapes differ)."""
    return max([(x - y).abs().max().item() if x.shape == y.shape else math.inf
                for x, y in zip(a.attention, b.attention) if x.numel() or y.numel()], default=0.0)


def check_search_kernels(model, batch, beam: int, amp_dtype, name: str) -> None:
    """The search's bookkeeping kernels (mt.kernels.search_greedy, search_beam: the step's
    update, the decoder state's gather, beam search's walk back) against the search's PyTorch
    and numpy code for them (`advance`, index_select, `_backtrack_host`), on the same model and
    batch, graphed and eager: the same outputs, exact ties included (an untrained bf16 model's
    log-probs tie often; both paths give a tie to the lower beam, then the better rank:
    `mt.search.best_candidates`, which an H100 run of this check asked for)."""
    from mt import graphs as G
    from mt import search
    from mt.kernels import search_beam, search_greedy

    switches = [(search_beam, "supported"), (search_greedy, "supported"), (search, "_backtrack_kernel_takes"),
                (search_beam, "gather_rows_supported")]
    real = [getattr(owner, attr) for owner, attr in switches]
    outs = {}
    for kernel in (True, False):
        for (owner, attr), fn in zip(switches, real):
            setattr(owner, attr, fn if kernel else (lambda *a: False))
        try:  # a GraphedDecoder of its own: one that captured the other setting would replay it
            gd = G.GraphedDecoder(model)
            outs[kernel] = [[decode(model, batch, gd, beam, amp_dtype) for _ in range(3)][-1],
                            decode(model, batch, None, beam, amp_dtype)]
        finally:
            for (owner, attr), fn in zip(switches, real):
                setattr(owner, attr, fn)
    same = [a.tokens == b.tokens for a, b in zip(outs[True], outs[False])]
    err = max(max_rel(a.scores, b.scores) for a, b in zip(outs[True], outs[False]))
    attn_err = max((attention_diff(a, b) for a, b in zip(outs[True], outs[False]) if a.tokens == b.tokens),
                   default=0.0)
    check(f"search_kernels_vs_pytorch[{name}, beam {beam}]", all(same) and err <= 1e-5 and attn_err <= 1e-5,
          same_tokens_graphed_eager=same, max_rel_score_diff=f"{err:.2e}", max_attention_diff=f"{attn_err:.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--only", nargs="+", choices=["kernels", "train", "decode"], default=["kernels", "train", "decode"])
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run this script's code on CPU (graphs emulated, Triton interpreted, small sizes): "
                        "tests the script, checks nothing about the GPU")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--cells", nargs="+", choices=["triton", "cudnn"], default=["triton", "cudnn"])
    args = p.parse_args(argv)
    global DEVICE, HIDDEN, STEPS, CELLS, JSON
    HIDDEN, STEPS, CELLS, JSON = args.hidden, args.steps, args.cells, args.json
    if args.dry_run_cpu:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before mt.kernels imports triton
        torch.backends.mkldnn.enabled = False  # oneDNN's fp32 CPU LSTM takes ~0.1 s a call here
        print("# gpu_checks --dry-run-cpu: CPU, graphs emulated, Triton interpreted; this checks the script only")
    elif not torch.cuda.is_available():
        print("gpu_checks: no CUDA device; nothing to check")
        return 2
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_checks: unset TRITON_INTERPRET (the checks are about the compiled kernels)")
        return 2
    else:
        print(f"# gpu_checks on {torch.cuda.get_device_name()}  torch {torch.__version__}  "
              f"CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}", flush=True)
    for name, fn in (("kernels", check_kernels), ("train", check_training), ("decode", check_decoding)):
        if name not in args.only:
            continue
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            check(f"{name} (crashed)", False, error=f"{type(e).__name__}: {e}"[:500])
    failed = [r["name"] for r in RESULTS if not r["ok"]]
    print(f"# {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    save(finished=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
