#!/usr/bin/env python
"""Choose the beam size and length penalty on the validation split (never on test).

    python scripts/tune_decoding.py RUN/checkpoints/best.pt --data /path/to/multi30k
    python scripts/tune_decoding.py CKPT --beams 1 5 10 --length-penalties none 0.6 1.0 avg --json tune.json
    python scripts/tune_decoding.py RUN_A/checkpoints/best.pt RUN_B/checkpoints/best.pt --data DIR   # an ensemble

Loads the checkpoint and the split once, decodes it with every (beam, length penalty) pair of the
grid (beam 1 is greedy search and is run once, without a length penalty), scores each with
sacreBLEU and prints one row per setting, then the best by cased BLEU (ties: the smaller beam,
then the earlier length penalty in the list) and the `python -m mt.evaluate` command that decodes
test2016 with it, and the `decoding:` lines to put in the experiment YAML (saved in the
checkpoint, they become the defaults of mt.evaluate and translate.py). --json writes every row,
the choice and the signatures.

Several checkpoints decode as one ensemble (mt/ensemble.py; `--combine prob` for the average of
probabilities), so an ensemble's decoding is chosen the same way, and the printed command scores
that same ensemble (`checkpoint=[A,B]`).

Tuning on a test split is refused: a test score chosen by looking at test is not a test score.
A missing or corrupt checkpoint, a missing split or a bad setting prints one `error: ...` line
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

log = logging.getLogger("tune_decoding")

TEST_NAMES = ("test", "testing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mt.translate import add_device_args

    p = argparse.ArgumentParser(
        description="Grid-search beam size and length penalty on a validation split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        nargs="+",
        help="checkpoint file (e.g. RUN/checkpoints/best.pt), model folder (mt-export) or Hugging Face model id; "
        "several: an ensemble",
    )
    p.add_argument(
        "--combine",
        choices=("logprob", "prob"),
        default="logprob",
        help="an ensemble's combination: mean log-probabilities or mean probabilities",
    )
    p.add_argument("--revision", default=None, help="with a Hugging Face model id: branch, tag or commit")
    p.add_argument("--data", default=None, help="data.path override (default: the checkpoint's)")
    p.add_argument("--split", default="validation", help="split to tune on (validation, valid, val, dev)")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3, 5, 8, 12], help="beam sizes")
    p.add_argument(
        "--length-penalties",
        "--lps",
        nargs="+",
        default=["none", "0.6", "0.8", "1.0", "1.2", "1.5"],
        help="GNMT alphas, 'avg' or 'none' (used with beams > 1)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="sentences per decoding batch")
    p.add_argument("--max-len-a", type=float, default=1.5, help="output length limit: a * src_len + b")
    p.add_argument("--max-len-b", type=int, default=10)
    add_device_args(p, cell=False)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", metavar="FILE", help="write the rows and the choice to this JSON file")
    return p.parse_args(argv)


def grid(beams: list[int], lps: list) -> list[tuple[int, object]]:
    """(beam, length penalty) pairs: beam 1 once with no penalty, every larger beam with each lp."""
    from mt.errors import MTError
    from mt.search import parse_length_penalty

    pairs: list[tuple[int, object]] = []
    parsed = []
    for lp in lps:
        v = parse_length_penalty(lp)
        if v not in parsed:
            parsed.append(v)
    for b in dict.fromkeys(beams):
        if b < 1:
            raise MTError(f"beam sizes must be >= 1 (got {b})")
        pairs.extend([(1, None)] if b == 1 else [(b, v) for v in parsed])
    return pairs


def best_row(rows: list[dict]) -> dict:
    """Highest cased BLEU; ties go to the smaller beam, then to the earlier row."""
    return max(enumerate(rows), key=lambda ir: (round(ir[1]["bleu"], 6), -ir[1]["beam"], -ir[0]))[1]


def yaml_lp(length_penalty) -> str:
    """A length penalty as Hydra overrides and YAML spell it (None -> null)."""
    return "null" if length_penalty is None else str(length_penalty)


def evaluate_command(args: argparse.Namespace, best: dict) -> str:
    """The mt.evaluate command that decodes test exactly as the chosen row decoded validation."""
    lp = yaml_lp(best["length_penalty"])
    many = len(args.checkpoint) > 1
    words = [
        "python",
        "-m",
        "mt.evaluate",
        f"checkpoint=[{','.join(args.checkpoint)}]" if many else f"checkpoint={args.checkpoint[0]}",
    ]
    if args.revision:
        words.append(f"revision={args.revision}")
    if many and args.combine != "logprob":
        words.append(f"ensemble_combine={args.combine}")
    if args.data:
        words.append(f"data.path={args.data}")
    words += ["split=test", f"beam={best['beam']}", f"length_penalty={lp}"]
    defaults = parse_args(args.checkpoint)
    for name in ("max_len_a", "max_len_b", "batch_size"):  # these change the output: pass them on
        if getattr(args, name) != getattr(defaults, name):
            words.append(f"{name}={getattr(args, name)}")
    if args.device != defaults.device:
        words.append(f"device={args.device}")
    return " ".join(shlex.quote(w) for w in words)


def tune(args: argparse.Namespace) -> dict:
    import torch

    from mt.errors import MTError
    from mt.evaluate import EvalDataConfig, decode_and_score, load_split
    from mt.translator import Translator

    if args.split.strip().lower() in TEST_NAMES:
        raise MTError(
            f"refusing to tune on split {args.split!r}: choose decoding settings on validation, "
            "then score test once with python -m mt.evaluate"
        )
    if args.batch_size < 1:
        raise MTError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pairs = grid(args.beams, args.length_penalties)
    tr = Translator.load(
        args.checkpoint, revision=args.revision, device=args.device, cuda_graphs=args.cuda_graphs, combine=args.combine
    )
    data_cfg, srcs, refs = load_split(tr, EvalDataConfig(path=args.data), args.split)
    src_ids = tr.tokenizer.encode_src(srcs)
    log.info(
        "tuning on %s split %r: %d sentences, %s->%s, %d settings",
        data_cfg.path,
        args.split,
        len(srcs),
        data_cfg.src,
        data_cfg.tgt,
        len(pairs),
    )
    rows: list[dict] = []
    print(f"{'beam':>4} {'lp':>5} {'BLEU':>6} {'chrF':>6} {'BLEU(lc)':>8} {'len ratio':>9} {'seconds':>7}", flush=True)
    for beam, lp in pairs:
        hyps, s, seconds = decode_and_score(
            tr,
            src_ids,
            refs,
            beam=beam,
            length_penalty=lp,
            batch_size=args.batch_size,
            max_len_a=args.max_len_a,
            max_len_b=args.max_len_b,
        )
        ratio = sum(len(h.split()) for h in hyps) / max(1, sum(len(r.split()) for r in refs))
        row = {
            "beam": beam,
            "length_penalty": lp,
            "bleu": s["bleu"],
            "chrf": s["chrf"],
            "bleu_lc": s["bleu_lc"],
            "word_length_ratio": ratio,
            "decode_seconds": round(seconds, 3),
        }
        rows.append(row)
        print(
            f"{beam:>4} {str(lp):>5} {s['bleu']:6.2f} {s['chrf']:6.2f} {s['bleu_lc']:8.2f} {ratio:9.3f} {seconds:7.1f}",
            flush=True,
        )
    best = best_row(rows)
    command = evaluate_command(args, best)
    result = {
        "checkpoint": args.checkpoint[0] if len(args.checkpoint) == 1 else list(args.checkpoint),
        "combine": args.combine if len(args.checkpoint) > 1 else None,
        "data_path": data_cfg.path,
        "split": args.split,
        "src": data_cfg.src,
        "tgt": data_cfg.tgt,
        "sentences": len(srcs),
        "device": str(tr.device),
        "rows": rows,
        "best": best,
        "test_command": command,
        "bleu_signature": s["bleu_signature"],
        "chrf_signature": s["chrf_signature"],
        "bleu_lc_signature": s["bleu_lc_signature"],
    }
    print(
        f"best on {args.split}: beam {best['beam']}, length penalty {best['length_penalty']} "
        f"(BLEU {best['bleu']:.2f}, chrF {best['chrf']:.2f}, BLEU(lc) {best['bleu_lc']:.2f})"
    )
    print(f"  {s['bleu_signature']}")
    print(f"test once with: {command}")
    print(
        f"for the recipe's YAML (the default of mt.evaluate and translate.py):\n"
        f"decoding:\n  beam: {best['beam']}\n  length_penalty: {yaml_lp(best['length_penalty'])}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    from mt.errors import MTError, first_line

    try:
        tune(args)
    except (MTError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
