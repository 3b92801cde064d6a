"""Time to best validation BLEU, read from a training run's train.log:

    python benchmarks/recipe_timing.py RUN/train.log [--started EPOCH_SECONDS] [--json OUT.json]

Every `mt.train` log line starts with its wall-clock time; this prints, for each validation, the
seconds since training started (the "model: ..." line, after data and tokenizer preparation)
and, with --started (e.g. `date +%s.%N` just before `python -m mt.train`), since the process
started. Validation time is included. Needs only the standard library.

A validation's time is that of its "step N | valid loss ... | BLEU ..." line, logged once BLEU
is known; chrF and BLEU(lc) come from the "step N | valid chrF ..." line the background report
logs later (older logs carry all three on the first line; both forms are read). The Triton
lines, "precompile: ..." (kernels compiled before the first step) and "triton: ..." (the time
first launches took at the end), are copied into the JSON too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[\w+\] - (.*)$")
VALID = re.compile(r"^step (\d+) \| valid loss ([\d.]+) .*?\| BLEU ([\d.]+)(?: chrF ([\d.]+) BLEU\(lc\) ([\d.]+))? \|")
REPORT = re.compile(r"^step (\d+) \| valid chrF ([\d.]+) BLEU\(lc\) ([\d.]+) \|")
NOTES = ("precompile", "triton")  # "precompile: ..." (after the dry run), "triton: ..." (at the end)


def parse(text: str) -> dict:
    first = model = last = None
    notes = {}  # the NOTES lines
    valids = []
    reported = {}  # step -> (chrF, BLEU(lc)) from the background report's line
    for line in text.splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        msg = m.group(2)
        first = t if first is None else first
        last = t
        if model is None and msg.startswith("model: "):
            model = t
        for tag in NOTES:
            if msg.startswith(tag + ": "):
                notes[tag] = dict(text=msg[len(tag) + 2 :], since_training=None if model is None else t - model)
        v = VALID.match(msg)
        if v:
            valids.append(
                dict(
                    step=int(v.group(1)),
                    valid_loss=float(v.group(2)),
                    bleu=float(v.group(3)),
                    chrf=float(v.group(4)) if v.group(4) else None,
                    bleu_lc=float(v.group(5)) if v.group(5) else None,
                    time=t,
                )
            )
        r = REPORT.match(msg)
        if r:
            reported[int(r.group(1))] = float(r.group(2)), float(r.group(3))
    for v in valids:
        if v["chrf"] is None and v["step"] in reported:
            v["chrf"], v["bleu_lc"] = reported[v["step"]]
    if model is None:
        raise SystemExit("recipe_timing: no 'model: ...' line in the log (training never started)")
    return dict(first=first, model=model, last=last, valids=valids, **notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log", type=Path)
    p.add_argument("--started", type=float, help="epoch seconds when the process started")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    try:
        info = parse(args.log.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        print(f"recipe_timing: cannot read {args.log}: {e}", file=sys.stderr)
        return 1
    start = args.started if args.started is not None else info["first"]
    rows = []
    print(f"{'step':>6} {'BLEU':>6} {'BLEU(lc)':>8} {'s since training start':>22} {'s since process start':>22}")
    for v in info["valids"]:
        row = dict(v, since_training=v["time"] - info["model"], since_start=v["time"] - start)
        rows.append(row)
        lc = "-" if v["bleu_lc"] is None else f"{v['bleu_lc']:.2f}"
        print(f"{v['step']:>6} {v['bleu']:>6.2f} {lc:>8} {row['since_training']:>22.1f} {row['since_start']:>22.1f}")
    best = max(rows, key=lambda r: r["bleu"]) if rows else None
    summary = dict(
        log=str(args.log),
        preparation_s=info["model"] - start,
        validations=rows,
        best=best,
        run_s=info["last"] - start,
        **{tag: info.get(tag) for tag in NOTES},
    )
    for tag in NOTES:
        if info.get(tag):
            print(f"{tag}: {info[tag]['text']}")
    if best:
        print(
            f"best BLEU {best['bleu']:.2f} at step {best['step']}: {best['since_training']:.1f} s after training "
            f"started, {best['since_start']:.1f} s after the process started "
            f"(data + tokenizer: {summary['preparation_s']:.1f} s)"
        )
    else:
        print("no validation in the log")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
