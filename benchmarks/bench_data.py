"""Data preparation at WMT size: wall time per stage, peak resident memory and time to the first
training step, cold (empty caches) and warm (everything cached), on generated corpora.

    python benchmarks/bench_data.py --pairs 500000 1000000 4500000 --work /tmp/bench_data --json bench_data.json
    python benchmarks/bench_data.py --corpus /path/to/tatoeba_de_en --work /tmp/bench_data   # a real corpus
    python benchmarks/bench_data.py --pairs 20000 --work /tmp/bd --quick                      # a smoke test

For each size it writes a corpus with benchmarks/make_corpus.py (kept in --work for the next
run), then runs `python -m mt.train` on it twice in a child process: cold, with fresh caches
(SentencePiece, the corpus read into Arrow, tokenized splits, HF datasets), and warm, again on the
caches the cold run left. Each run trains --steps steps of a small model (E = H = 256, 1 layer,
the joint --vocab SentencePiece model on a --spm-sample sentence sample, learnt from its word
counts or, with --train-on sentences, from its sentences; data.num_proc = CPUs).
From the child's log it reads the time of each preparation stage (the "data: ... in X s" lines);
from /proc it samples the resident memory of the child and its worker processes together every
0.1 s: the peak while preparing (until the first step) and the peak while training, split into
anonymous memory (the process's own) and file-backed pages (memory-mapped caches, which the
kernel can drop), and the peak within each stage (from the previous stage's line, the first from
the child's launch; "to the first step" runs from the last stage's line to the first step: the
model, the loaders and their token files). Time to the first step is from the child's launch to
its "first step" line.

A row per (corpus, cold|warm); --json writes them all. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^\[(?P<ts>[\d-]+ [\d:,]+)\]\[[^\]]+\]\[INFO\] - (?P<msg>.*)$")
STAGE_TIME = re.compile(r"^data: (?P<what>.+) in (?P<s>[\d.]+)s$")
AFTER_STAGES = "to the first step"  # the last stage's line to the "first step" line: model, loaders, token files


# ============================================================================ memory sampling
def _tree(root: int) -> list[int]:
    """root and its descendants (datasets' num_proc workers, SentencePiece has threads only)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of one process."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(("RssFile:", "RssShmem:")):
                    file += int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


class MemorySampler(threading.Thread):
    """Samples the process tree's summed RSS every `every` seconds: [(time, anon, file), ...]."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            tot_anon = tot_file = 0
            for p in _tree(self.pid):
                a, f = _rss(p)
                tot_anon, tot_file = tot_anon + a, tot_file + f
            self.samples.append((time.time(), tot_anon, tot_file))
            self.stop.wait(self.every)

    def peak(self, t0: float, t1: float) -> dict[str, float]:
        """The highest summed RSS in [t0, t1], and its anonymous and file-backed parts then."""
        window = [s for s in self.samples if t0 <= s[0] <= t1] or [(0, 0, 0)]
        _, anon, file = max(window, key=lambda s: s[1] + s[2])
        return {
            "peak_rss_gb": round((anon + file) / 2**30, 3),
            "anon_gb": round(anon / 2**30, 3),
            "file_gb": round(file / 2**30, 3),
        }


# ================================================================================ one run
def _log_lines(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = STAGE.match(line)
        if m:
            ts = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((ts, m["msg"]))
    return out


def run_once(corpus: Path, caches: Path, out: Path, args: argparse.Namespace) -> dict:
    """One `mt.train` child on `corpus` with its caches under `caches`: stage times and memory."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(caches / "hf"),
        "XDG_CACHE_HOME": str(caches / "xdg"),
    }
    cmd = [
        sys.executable, "-m", "mt.train",
        f"data.path={corpus}", "data.src=de", "data.tgt=en", f"data.num_proc={args.num_proc}",
        f"tokenizer.vocab_size={args.vocab}", f"tokenizer.input_sentence_size={args.spm_sample}",
        f"tokenizer.train_on={args.train_on}",
        "model.emb_dim=256", "model.hidden_dim=256", "model.enc_layers=1", "model.dec_layers=1", "model.cell=cudnn",
        "trainer.device=cpu", f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps * 10}",
        "trainer.log_every=10", "trainer.progress=false", "data.max_valid_examples=200",
        "trainer.auto_recipe=false", f"hydra.run.dir={out}",
    ]  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(child.pid)
    sampler.start()
    _, err = child.communicate()
    t_end = time.time()
    sampler.stop.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"error: mt.train failed on {corpus}: {err.strip().splitlines()[-1] if err else '?'}")
    lines = _log_lines(out / "train.log")
    first = next((ts for ts, msg in lines if msg.startswith("first step")), t_end)
    stages, stage_peaks, began = {}, {}, t0
    for ts, msg in lines:
        m = STAGE_TIME.match(msg)
        if m:
            stages[m["what"]] = float(m["s"])
            stage_peaks[m["what"]] = sampler.peak(began, ts)["peak_rss_gb"]
            began = ts
    stage_peaks[AFTER_STAGES] = sampler.peak(began, first)["peak_rss_gb"]
    vocab = next((m[1] for _, msg in lines if (m := re.search(r"training tokens; vocab (\d+)", msg))), None)
    row = {
        "stages_s": stages,
        "stage_peak_rss_gb": stage_peaks,
        "prepare_s": round(sum(stages.values()), 1),
        "first_step_s": round(first - t0, 1),
        "prepare": sampler.peak(t0, first),
        "training": sampler.peak(first, t_end),
        "wall_s": round(t_end - t0, 1),
        "vocab": int(vocab) if vocab else None,
        "train_on": args.train_on,
    }
    return row


def make_corpus(pairs: int, fmt: str, work: Path, source: str | None) -> Path:
    out = work / f"corpus-{pairs}-{fmt}"
    if not (out / "done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(REPO / "benchmarks" / "make_corpus.py"), "--pairs", str(pairs), "--format", fmt]
        cmd += ["--source", source] if source else []
        subprocess.run([*cmd, str(out)], check=True, cwd=REPO)
        (out / "done").write_text("")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="*", default=[500_000, 1_000_000, 4_500_000])
    p.add_argument("--format", default="text", choices=["jsonl", "text", "tsv"], help="generated corpus format")
    p.add_argument("--corpus", action="append", default=[], help="also measure this corpus folder (real text)")
    p.add_argument("--source", help="make_corpus.py's --source (the sentences it joins)")
    p.add_argument("--work", type=Path, required=True, help="corpora, caches and run folders go here")
    p.add_argument("--vocab", type=int, default=32000, help="joint SentencePiece vocabulary")
    p.add_argument("--spm-sample", type=int, default=2_000_000, help="sentences SentencePiece trains on")
    p.add_argument("--train-on", choices=["words", "sentences"], default="words", help="tokenizer.train_on")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="data.num_proc")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (memory while training)")
    p.add_argument("--quick", action="store_true", help="a small vocabulary and sample: a smoke test")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.vocab, args.spm_sample, args.steps = min(args.vocab, 2000), min(args.spm_sample, 20000), min(args.steps, 5)
    args.work.mkdir(parents=True, exist_ok=True)
    corpora = [(f"generated {n:,} pairs ({args.format})", make_corpus(n, args.format, args.work, args.source))
               for n in args.pairs]  # fmt: skip
    corpora += [(str(Path(c).name), Path(c).resolve()) for c in args.corpus]
    rows = []
    print("| corpus | run | prepare (s) | stages (s) | first step (s) | peak RSS preparing, GB (anon + file) "
          f"| peak RSS per stage and {AFTER_STAGES}, GB | peak RSS training, GB (anon + file) |", flush=True)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, corpus in corpora:
        caches = args.work / f"caches-{corpus.name}"
        shutil.rmtree(caches, ignore_errors=True)
        for run in ("cold", "warm"):
            row = {"corpus": name, "path": str(corpus), "run": run, **run_once(corpus, caches, args.work / "run", args)}
            rows.append(row)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_s"].items())
            peaks = ", ".join(f"{v:.2f}" for v in row["stage_peak_rss_gb"].values())
            pr, tr = row["prepare"], row["training"]
            print(
                f"| {name} | {run} | {row['prepare_s']:.1f} | {stages} | {row['first_step_s']:.1f} "
                f"| {pr['peak_rss_gb']:.2f} ({pr['anon_gb']:.2f} + {pr['file_gb']:.2f}) | {peaks} "
                f"| {tr['peak_rss_gb']:.2f} ({tr['anon_gb']:.2f} + {tr['file_gb']:.2f}) |",
                flush=True,
            )
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
