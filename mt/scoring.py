"""Forced scoring: the log-probability a model gives to given translations, and n-best rescoring.

    from mt.translator import Translator
    tr = Translator.load("RUN/checkpoints/best.pt", device="cpu")
    s = tr.score(["hund sieht katze"], ["dog sees cat"])[0]
    s.log_prob, s.token_log_probs, s.score, s.ntokens, s.tokens

A target is scored the way the searches score what they output (mt/search.py): the source is
encoded once, then the decoder is stepped incrementally with ``decoder.step_logits`` on
BOS and the given target pieces, each step's logits go through a float32 log-softmax, and the
log-probability of the next given piece is taken; the target's EOS is scored last. The sum is
accumulated in float32 step by step, as greedy search does, so the log-probability of a search's
own output (one that ended with EOS) is what the search reported, up to float rounding of the
batch shape. `score` is ``log_prob / lp(ntokens)`` with the length penalty beam search ranks by
(`mt.search.normalized_score`; ntokens = pieces + EOS).

Only ``model.encode(src, src_len) -> (memory, state)`` and
``model.decoder.step_logits(tokens, state, memory) -> (logits, state, attention)`` are used, so
anything that looks like a Seq2Seq to the searches (an ensemble of models too) is scored the same.

Conventions (also what `mt-translate --score-targets` and `--rescore` write):
- Sources are encoded and truncated as `Translator.translate` does (`max_src_len`, with a warning
  naming the line). Targets are never truncated: the LSTM decoder has no position limit, and a
  truncated target would be another sentence; past the training lengths the scores are only
  less reliable.
- An empty (or whitespace-only) target is the empty sentence: only its EOS is scored (ntokens 1).
- An empty source line is scored as what the model reads for it, a source of only EOS
  (`translate` skips such lines and reports an empty hypothesis with score 0 instead).
- EOS is always scored: a hypothesis that a search closed at its length limit without EOS was
  reported without it, so its forced score is lower by the EOS log-probability.
- A target may also be given as a list of target piece ids (`Hypothesis.ids`): that exact
  segmentation is scored. Text is segmented by the target SentencePiece model, which may
  segment differently from what a search produced (its pieces are not always the canonical
  segmentation of their own text).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch import Tensor

from .batching import collate
from .errors import MTError
from .search import LengthPenalty, normalized_score
from .translator import Hypothesis

log = logging.getLogger("mt.scoring")

FORMATS = ("tsv", "json")


@dataclass
class ScoredTranslation(Hypothesis):
    """A given translation, scored. Besides `Hypothesis`' fields (text: the target as given;
    tokens / ids: its pieces, no EOS; attention: one row per scored token, EOS last):

    token_log_probs  one log-probability per target piece, then the EOS one
    ntokens          len(token_log_probs) = pieces + EOS
    log_prob         sum(token_log_probs) (accumulated in float32)
    score            log_prob / lp(ntokens)
    """

    token_log_probs: list[float] = field(default_factory=list)
    ntokens: int = 0


# ----------------------------------------------------------------------------- the forced decoder
@torch.no_grad()
def force_batch(model, src: Tensor, src_len: Tensor, tgt_in: Tensor, tgt_out: Tensor, tgt_len: Tensor):
    """Score the targets of one padded batch through the incremental decoder.

    src (B, S), src_len (B,): sources with EOS, as `collate` pads them; tgt_in (B, T): BOS + pieces
    (the decoder's input at each step), tgt_out (B, T): pieces + EOS (the token scored at each
    step), tgt_len (B,) the scored tokens per row (EOS included). Returns token log-probs (B, T)
    float32 (0 past a row's end), their sums (B,) float32 and the attention (B, T, S) float32."""
    memory, state = model.encode(src, src_len)
    B, T = tgt_out.shape
    total = torch.zeros(B, device=src.device)
    lps, attns = [], []
    for t in range(T):
        logits, state, attn = model.decoder.step_logits(tgt_in[:, t], state, memory)  # (B, V), (B, S)
        logp = torch.log_softmax(logits.float(), dim=-1)
        lp = logp.gather(1, tgt_out[:, t : t + 1]).squeeze(1).masked_fill(tgt_len <= t, 0.0)  # (B,)
        total = total + lp  # as greedy search adds each step's log-prob: same order, same dtype
        lps.append(lp)
        attns.append(attn.float())
    return torch.stack(lps, 1), total, torch.stack(attns, 1)


@torch.no_grad()
def score_ids(
    model,
    src_ids: list[list[int] | None],
    tgt_ids: list[list[int]],
    tokenizer,
    device: torch.device | str,
    batch_size: int = 32,
) -> list[tuple[list[float], float, Tensor]]:
    """(token log-probs, their float32 sum, attention (ntokens, src_len)) for every (source ids,
    target ids) pair, in order. Source None or [] is a source of only EOS; targets exclude
    BOS/EOS. Pairs are sorted by target then source length into batches of `batch_size`."""
    if len(src_ids) != len(tgt_ids):
        raise MTError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
    if batch_size < 1:
        raise MTError(f"batch_size must be >= 1 (got {batch_size})")
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    order = sorted(range(len(src_ids)), key=lambda i: (len(tgt_ids[i]), len(src_ids[i] or ())))
    results: list = [None] * len(src_ids)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate(
                [{"src_ids": src_ids[i] or [], "tgt_ids": tgt_ids[i], "idx": i} for i in idx],
                tokenizer.pad_id,
                tokenizer.bos_id,
                tokenizer.eos_id,
            ).to(device)
            tgt_len = torch.tensor([len(tgt_ids[i]) + 1 for i in idx], device=batch.src.device)
            lps, total, attn = force_batch(model, batch.src, batch.src_len, batch.tgt_in, batch.tgt_out, tgt_len)
            lps, total, attn = lps.cpu(), total.tolist(), attn.cpu()
            for j, i in enumerate(idx):
                n, s = len(tgt_ids[i]) + 1, int(batch.src_len[j])
                results[i] = (lps[j, :n].tolist(), total[j], attn[j, :n, :s].clone())
    finally:
        if was_training:
            model.train(True)
    return results


def score_pairs(
    tr,
    sources: list,
    targets: list,
    length_penalty: LengthPenalty = None,
    batch_size: int = 32,
    max_src_len: int | None = None,
    first_line: int = 1,
) -> list[ScoredTranslation]:
    """`Translator.score` with the length penalty already resolved (see there). A source may
    also be a list of source piece ids (already encoded and truncated: used as it is)."""
    for name, x in (("sources", sources), ("targets", targets)):
        if isinstance(x, str):
            raise TypeError(f"score takes lists of lines; {name} is one string")
    if len(sources) != len(targets):
        raise MTError(f"{len(sources)} sources but {len(targets)} targets: one target per source line")
    tok = tr.tokenizer
    text_at = [k for k, x in enumerate(sources) if isinstance(x, str)]
    src: list = [None if isinstance(x, str) else [int(i) for i in x] for x in sources]
    for k, ids in zip(text_at, tr.encode([sources[k] for k in text_at], first_line, max_src_len)):
        src[k] = ids  # (warnings number the lines from first_line over the text sources, in order)
    tgt = _target_ids(tok, targets, first_line)
    results = []
    for k, (lps, total, attn) in enumerate(score_ids(tr.model, src, tgt, tok, tr.device, batch_size)):
        t = targets[k]
        results.append(
            ScoredTranslation(
                text=t if isinstance(t, str) else tok.decode_tgt([tgt[k]])[0],
                score=normalized_score(total, len(lps), length_penalty),
                tokens=tok.tgt_pieces(tgt[k]),
                attention=attn,
                src_tokens=tok.src_pieces(src[k] or []),
                log_prob=total,
                ids=tgt[k],
                token_log_probs=lps,
                ntokens=len(lps),
            )
        )
    return results


def _target_ids(tok, targets: list, first_line: int) -> list[list[int]]:
    """Piece ids of every target: text through the target SentencePiece model (blank: []),
    id lists checked (no BOS, EOS or padding; within the vocabulary)."""
    texts = [t for t in targets if isinstance(t, str)]
    encoded = iter(tok.encode_tgt([t if t.strip() else "" for t in texts]))
    specials = (tok.bos_id, tok.eos_id, tok.pad_id)
    tgt: list[list[int]] = []
    for k, t in enumerate(targets):
        if isinstance(t, str):
            ids = list(next(encoded))
            tgt.append(ids if t.strip() else [])
            continue
        ids = [int(i) for i in t]
        bad = [i for i in ids if not 0 <= i < tok.tgt_vocab_size or i in specials]
        if bad:
            raise MTError(f"target {first_line + k}: id {bad[0]} is not a target piece (BOS, EOS, padding or unknown)")
        tgt.append(ids)
    return tgt


# ----------------------------------------------------------------------------- n-best lists
@dataclass
class NBestEntry:
    """One line of an n-best list as `mt-translate --nbest` writes it: `i ||| text ||| score`
    (optionally `||| alignment`, which rescoring drops or recomputes)."""

    index: int
    text: str
    score: float
    lineno: int


def parse_nbest_line(line: str, lineno: int, where: str = "n-best list") -> NBestEntry:
    parts = line.split(" ||| ")
    if len(parts) < 3:
        raise MTError(f"{where} line {lineno}: not `i ||| translation ||| score`")
    try:
        index = int(parts[0].strip())
        score = float(parts[2].strip())
    except ValueError:
        raise MTError(f"{where} line {lineno}: not `i ||| translation ||| score` (index or score)") from None
    if index < 0:
        raise MTError(f"{where} line {lineno}: negative index {index}")
    return NBestEntry(index, parts[1], score, lineno)


def read_nbest(path: str) -> list[NBestEntry]:
    """All entries of an n-best file, checked: well-formed lines whose indices start at 0 and
    never go back, each index's lines together, no index skipped (as `--nbest` writes them).
    Problems are one-line MTErrors naming the file and line."""
    from .translate import decode_line

    entries: list[NBestEntry] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(raw.rstrip(b"\n"), lineno, where=path)
            if not line.strip():
                continue  # a stray blank line (e.g. at the end) holds no entry
            e = parse_nbest_line(line, lineno, path)
            last = entries[-1].index if entries else -1
            if e.index not in (last, last + 1):
                what = "goes back" if e.index < last else f"skips index {last + 1}"
                raise MTError(
                    f"{path} line {lineno}: index {e.index} after {last} {what}; "
                    "expected the list as mt-translate --nbest writes it (0, 1, 2, ... in order)"
                )
            entries.append(e)
    return entries


def rank(entries: list[NBestEntry], scored: list[ScoredTranslation]) -> list[tuple[NBestEntry, ScoredTranslation]]:
    """Entries with their new scores, best new score first within each index (stable on ties;
    indices kept in order)."""
    pairs = list(zip(entries, scored))
    return sorted(pairs, key=lambda p: (p[0].index, -_key(p[1].score)))


def _key(x: float) -> float:
    return x if not math.isnan(x) else -math.inf


# ----------------------------------------------------------------------------- the CLI part
def add_args(p: argparse.ArgumentParser) -> None:
    """mt-translate's scoring options."""
    g = p.add_argument_group("scoring given translations (instead of translating)")
    g.add_argument(
        "--score-targets",
        metavar="FILE",
        help="score the translations in FILE (one per source line) instead of translating: one output line each",
    )
    g.add_argument(
        "--rescore",
        metavar="NBEST",
        help="rescore an n-best list in the --nbest format (its sources from --input / stdin): same format, "
        "new scores, best first",
    )
    g.add_argument(
        "--score-format",
        choices=FORMATS,
        default="tsv",
        help="with --score-targets / --rescore: tsv (see docs/decoding.md) or json (one object per line)",
    )


def wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "score_targets", None) or getattr(args, "rescore", None))


def check_args(args: argparse.Namespace) -> list[NBestEntry] | None:
    """Refuse what scoring cannot do, before a model is loaded; reads and checks an n-best list
    (returned) and compares line counts where both sides are files."""
    from .corpus_files import count_lines

    if args.score_targets and args.rescore:
        raise MTError("--score-targets and --rescore: use one")
    flag = "--score-targets" if args.score_targets else "--rescore"
    for name, bad in (("--nbest", args.nbest is not None), ("--print-scores", args.print_scores)):
        if bad:
            raise MTError(f"{flag} writes its own scores; it does not go with {name}")
    if args.plot_attention:
        raise MTError(f"{flag} does not go with --plot-attention")
    path = args.score_targets or args.rescore
    if not (os.path.exists(path) and os.access(path, os.R_OK)):
        raise MTError(f"{flag} file not found or not readable: {path}")
    n_src = count_lines(args.input) if args.input and os.path.isfile(args.input) else None
    if args.score_targets:
        if n_src is not None and os.path.isfile(path) and (n_tgt := count_lines(path)) != n_src:
            raise MTError(f"--score-targets: {path} has {n_tgt} lines but {args.input} has {n_src}")
        return None
    entries = read_nbest(path)
    if n_src is not None:
        _check_nbest_covers(entries, n_src, path, args.input)
    return entries


def _check_nbest_covers(entries: list[NBestEntry], n_src: int, path: str, src_name: str) -> None:
    n = entries[-1].index + 1 if entries else 0
    if n != n_src:
        raise MTError(f"--rescore: {path} has entries for {n} source lines but {src_name} has {n_src}")


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def format_scored(s: ScoredTranslation, fmt: str, align: bool, extra: dict | None = None) -> str:
    """One output line for a scored translation (--score-targets)."""
    if fmt == "json":
        obj = dict(extra or {})
        obj.update(
            score=s.score,
            log_prob=s.log_prob,
            ntokens=s.ntokens,
            tokens=s.tokens,
            token_log_probs=s.token_log_probs,
        )
        if align:
            obj["alignment"] = _alignment(s)
        return json.dumps(obj, ensure_ascii=False)
    fields = [_fmt(s.score), _fmt(s.log_prob), str(s.ntokens), " ".join(_fmt(x) for x in s.token_log_probs)]
    if align:
        fields.append(_alignment(s))
    return "\t".join(fields)


def format_rescored(e: NBestEntry, s: ScoredTranslation, fmt: str, align: bool) -> str:
    """One output line for a rescored n-best entry (--rescore)."""
    if fmt == "json":
        return format_scored(s, fmt, align, {"index": e.index, "text": e.text, "nbest_score": e.score})
    line = f"{e.index} ||| {e.text} ||| {_fmt(s.score)}"
    return line + (f" ||| {_alignment(s)}" if align else "")


def _alignment(s: ScoredTranslation) -> str:
    return " ".join(f"{a}-{b}" for a, b in s.alignment())


def run_cli(tr, args: argparse.Namespace, lp: LengthPenalty, entries: list[NBestEntry] | None) -> None:
    """--score-targets / --rescore with a loaded translator (or ensemble) and length penalty."""
    from tqdm import tqdm

    from .corpus_files import count_lines
    from .translate import open_output, read_chunks

    total = count_lines(args.input) if args.input and os.path.isfile(args.input) else None
    stream = open(args.input, "rb") if args.input else sys.stdin.buffer
    out = open_output(args.output)
    try:
        with tqdm(total=total, unit="line", desc="score", disable=None, file=sys.stderr, dynamic_ncols=True) as bar:
            chunks = read_chunks(stream, args.chunk_size)
            if args.rescore:
                _rescore(tr, args, lp, entries or [], chunks, out, bar)
            else:
                _score_targets(tr, args, lp, chunks, out, bar)
    finally:
        if args.input:
            stream.close()
        if out is not sys.stdout:
            out.close()


def _score_targets(tr, args, lp, chunks, out: TextIO, bar) -> None:
    from .translate import decode_line

    path = args.score_targets
    n_src = 0
    with open(path, "rb") as tf:
        targets = (decode_line(raw.rstrip(b"\n"), k, where=path) for k, raw in enumerate(tf, start=1))
        for first, lines in chunks:
            tgt = [t for _, t in zip(lines, targets)]
            n_src += len(lines)
            if len(tgt) < len(lines):
                raise MTError(f"--score-targets: {path} has {first - 1 + len(tgt)} lines but the sources have more")
            scored = score_pairs(tr, lines, tgt, lp, args.batch_size, args.max_length, first)
            for s in scored:
                out.write(format_scored(s, args.score_format, args.align) + "\n")
            out.flush()
            bar.update(len(lines))
        if next(targets, None) is not None:
            raise MTError(f"--score-targets: {path} has more lines than the {n_src} source lines")


def _rescore(tr, args, lp, entries: list[NBestEntry], chunks, out: TextIO, bar) -> None:
    n_src, k = 0, 0  # source lines read, entries done
    need = entries[-1].index + 1 if entries else 0
    for first, lines in chunks:
        lo, hi = first - 1, first - 1 + len(lines)  # 0-based source indices of this chunk
        n_src = hi
        start = k
        while k < len(entries) and entries[k].index < hi:
            k += 1
        todo = entries[start:k]
        if todo:
            src = tr.encode(lines, first, args.max_length)  # once per source line: warnings name it
            srcs = [src[e.index - lo] or [] for e in todo]
            scored = score_pairs(tr, srcs, [e.text for e in todo], lp, args.batch_size)
            for e, s in rank(todo, scored):
                out.write(format_rescored(e, s, args.score_format, args.align) + "\n")
            out.flush()
        bar.update(len(lines))
        if hi > need:
            break
    if n_src != need:
        raise MTError(
            f"--rescore: {args.rescore} has entries for {need} source lines but the sources have "
            f"{'more' if n_src > need else n_src}"
        )


__all__ = [
    "ScoredTranslation",
    "NBestEntry",
    "force_batch",
    "score_ids",
    "score_pairs",
    "read_nbest",
    "parse_nbest_line",
]
