#!/usr/bin/env python
"""Decoding speed: sentences/s and tokens/s of greedy search and beam search on the Multi30k test set.

    python benchmarks/bench_decode.py --data DATA/test.jsonl --checkpoint outputs/DATE/TIME/checkpoints/best.pt
    python benchmarks/bench_decode.py --data DATA/test.jsonl --checkpoint CKPT --device cuda --batch-size 128 --beam 5 --json bench.json
    python benchmarks/bench_decode.py --data DATA/test.jsonl --random-init --device cuda    # no checkpoint: untrained default-size model
    python benchmarks/bench_decode.py --data DATA/test.jsonl --checkpoint CKPT --device cpu --threads 1 --limit 200
    python benchmarks/bench_decode.py --data DATA/test.jsonl --checkpoint CKPT --device cuda --ensemble 1 2 4
    python benchmarks/bench_decode.py --data DATA/test.jsonl -c CKPT_A -c CKPT_B --ensemble 1 2   # two real models

Reads the test file given by --data directly (a Multi30k-style test.jsonl, one JSON object per
line), takes the source field named by the checkpoint's data.src (or --src),
and translates every line with `Translator.translate`, i.e. sorted by length into batches of
--batch-size sentences, as scripts/translate.py does. For each setting it prints the device,
batch size, wall time, sentences/s and output tokens/s (tokens = SentencePiece pieces the decoder
scored, EOS included). A warm-up batch runs first and is not timed.

--ensemble N [N ...] times ensembles of N models (mt/ensemble.py) against one model: the first N
models given with --checkpoint, filled up with copies of them (the same weights, but a model's
whole decoding cost each: what an ensemble of N different models of that size costs); each line
then also says its speed as a fraction of one model's. Without --ensemble, several --checkpoint
are timed as one ensemble of them.

--random-init builds an untrained model of the default ModelConfig size (2x512 LSTMs, Luong
attention) with a SentencePiece model trained on the test sentences themselves. An untrained
model rarely emits EOS, so most outputs run to the length limit: a worst case, not a typical one.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mt.translate import add_device_args

    p = argparse.ArgumentParser(
        description="Benchmark greedy and beam-search decoding speed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--checkpoint",
        "-c",
        action="append",
        help="checkpoint file (RUN/checkpoints/best.pt), model folder or hub id; again: more models for an ensemble",
    )
    g.add_argument("--random-init", action="store_true", help="untrained default-size model, no checkpoint needed")
    p.add_argument("--data", required=True, help="JSON-lines test file, e.g. /path/to/multi30k/test.jsonl")
    p.add_argument(
        "--src", default=None, help="source field (default: the checkpoint's data.src; de with --random-init)"
    )
    p.add_argument("--tgt", default="en", help="target field (--random-init only: trains the tokenizer)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N sentences")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    p.add_argument("--beam", type=int, default=5, help="beam size of the beam-search run")
    p.add_argument("--length-penalty", default="1.0", help="length penalty of the beam-search run")
    p.add_argument("--max-len-a", type=float, default=1.5)
    p.add_argument("--max-len-b", type=int, default=10)
    add_device_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per setting (the fastest is reported)")
    p.add_argument(
        "--ensemble",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="ensemble sizes to time, e.g. 1 2 4 (copies of the given models fill up an ensemble)",
    )
    p.add_argument(
        "--ensemble-combine", default="logprob", choices=["logprob", "prob"], help="how an ensemble averages"
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def read_sources(path: str, field: str, limit: int | None) -> list[str]:
    from mt.errors import MTError

    p = Path(path)
    if not p.is_file():
        raise MTError(f"test file not found: {p} (use --data)")
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            row = row.get("translation", row)
            if field not in row:
                raise MTError(f"{p}:{n}: no field {field!r} (fields: {', '.join(row)})")
            out.append(row[field])
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise MTError(f"{p} has no sentences")
    return out


def random_translator(args: argparse.Namespace):
    import torch

    from mt.config import TokenizerConfig, TrainConfig
    from mt.model import Seq2Seq
    from mt.runtime import resolve_device
    from mt.tokenizer import train_tokenizer
    from mt.translator import Translator, resolve_cell

    src_field = args.src or "de"
    srcs = read_sources(args.data, src_field, None)
    tgts = read_sources(args.data, args.tgt, None)
    cfg = TrainConfig()
    cfg.data.src, cfg.data.tgt = src_field, args.tgt
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(TokenizerConfig(), srcs, tgts, Path(tmp), log=lambda *_: None)
    device = resolve_device(args.device)
    cfg.model.cell = resolve_cell(args.cell, cfg.model.cell, device)
    torch.manual_seed(0)
    model = Seq2Seq(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id)
    return Translator(model, tok, cfg, device, cuda_graphs=args.cuda_graphs)


def sized(base: list, n: int, args: argparse.Namespace):
    """A Translator decoding with n models: base[0] itself for n == 1, else an ensemble of base's
    first n models, copies of them (deep: weights of their own) where base has fewer."""
    import copy

    from mt.ensemble import Ensemble
    from mt.translator import Translator

    first = base[0]
    if n == 1:
        return Translator(first.model, first.tokenizer, first.config, first.device, cuda_graphs=args.cuda_graphs)
    models = [base[i].model if i < len(base) else copy.deepcopy(base[i % len(base)].model) for i in range(n)]
    ens = Ensemble(models, args.ensemble_combine)
    return Translator(ens, first.tokenizer, first.config, first.device, cuda_graphs=args.cuda_graphs)


def bench(tr, lines: list[str], beam: int, lp, args: argparse.Namespace) -> dict:
    import torch

    kw = dict(
        beam=beam, length_penalty=lp, max_len_a=args.max_len_a, max_len_b=args.max_len_b, batch_size=args.batch_size
    )
    tr.translate(lines[: args.batch_size], **kw)  # warm-up (allocator, kernels, lazy weights)
    best = None
    for _ in range(max(1, args.repeats)):
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)
        t0 = time.perf_counter()
        hyps = tr.translate(lines, **kw)
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    tokens = sum(h.attention.shape[0] for h in hyps)
    return {
        "beam": beam,
        "length_penalty": lp,
        "sentences": len(lines),
        "output_tokens": tokens,
        "seconds": round(best, 4),
        "sentences_per_s": round(len(lines) / best, 2),
        "tokens_per_s": round(tokens / best, 1),
    }


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from mt.errors import MTError
    from mt.model import count_parameters
    from mt.search import parse_length_penalty
    from mt.translator import Translator

    if args.beam < 1 or args.batch_size < 1:
        raise MTError("--beam and --batch-size must be >= 1")
    if args.ensemble is not None and min(args.ensemble) < 1:
        raise MTError(f"--ensemble sizes must be >= 1 (got {args.ensemble})")
    lp = parse_length_penalty(args.length_penalty)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.random_init:
        base = [random_translator(args)]
        what = "random-init model"
    else:
        kw = dict(device=args.device, cell=args.cell, cuda_graphs=False, combine=args.ensemble_combine)
        base = [Translator.load(c, **kw) for c in args.checkpoint]
        if len(base) > 1:  # the same checks as an ensemble loaded for translating
            Translator.ensemble(base, args.checkpoint, args.ensemble_combine, cuda_graphs=False)
        what = ", ".join(args.checkpoint)
    sizes = sorted(set(args.ensemble or [len(base)]))
    # one Translator (and CUDA-graph cache) per size; one model's is the baseline every size is compared with
    translators = {n: sized(base, n, args) for n in sorted({*sizes, 1} if args.ensemble else sizes)}
    tr = translators[sizes[0]]
    lines = read_sources(args.data, args.src or tr.src_lang, args.limit)
    device_name = torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else platform.processor() or "cpu"
    one = base[0].model
    print(
        f"model: {what} ({count_parameters(one):,} parameters, cell {one.cfg.cell} -> "
        f"{one.backend(tr.device)}), {tr.src_lang}->{tr.tgt_lang}"
        + (f" | ensembles of {', '.join(map(str, sizes))} ({args.ensemble_combine})" if sizes != [1] else ""),
        file=sys.stderr,
    )
    print(
        f"data: {args.data} ({len(lines)} sentences) | device: {tr.device} ({device_name}) | "
        f"batch size: {args.batch_size} | CUDA graphs: {'on' if tr.graphs else 'off'} | "
        f"CPU threads: {torch.get_num_threads()} | torch {torch.__version__}",
        file=sys.stderr,
    )
    results = []
    settings = [("greedy", 1, None), (f"beam {args.beam}", args.beam, lp)]
    for name, beam, pen in settings:
        single = None  # one model's sentences/s in this setting
        for n, t in translators.items():
            r = {
                "setting": name,
                "ensemble": n,
                "device": str(t.device),
                "device_name": device_name,
                "batch_size": args.batch_size,
                "cuda_graphs": t.graphs is not None,
                **bench(t, lines, beam, pen, args),
            }
            single = r["sentences_per_s"] if n == 1 else single
            r["vs_one_model"] = round(r["sentences_per_s"] / single, 3) if single else None
            if n not in sizes:  # timed only as the baseline
                continue
            results.append(r)
            label = name if args.ensemble is None else f"{name} x{n}"
            vs = f", {r['vs_one_model']:.2f}x one model's speed" if n > 1 and single else ""
            print(
                f"{label:>8}: {r['seconds']:8.3f} s  {r['sentences_per_s']:9.1f} sent/s  {r['tokens_per_s']:10.1f} tok/s"
                f"  (device {r['device']}, batch size {r['batch_size']}, length penalty {pen}{vs})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        import mt  # noqa: F401
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO))
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s: %(message)s")
    from mt.errors import MTError

    try:
        run(args)
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
