#!/usr/bin/env python
"""Write a deterministic, WMT-shaped de/en parallel corpus (or a known-corrupt copy of one) for
benchmarks and tests of the data pipeline at scale.

Run from the repository root (no install needed; only numpy and the standard library):

    python benchmarks/make_corpus.py --pairs 100000 --format text /tmp/corpus_100k
    python benchmarks/make_corpus.py --pairs 5000000 --format jsonl --source /path/to/tatoeba/train.jsonl /tmp/corpus_5m
    python benchmarks/make_corpus.py --pairs 100000 --format tsv --corrupt utf8 /tmp/corpus_bad_utf8
    python benchmarks/make_corpus.py --pairs 3000 --eval-pairs 50 --seed 7 --format jsonl /tmp/corpus_small

mt reads the result with ``data.path=OUT_DIR data.src=de data.tgt=en``.

Source. The words are real: every line joins whole sentence pairs drawn at random (uniformly,
with replacement) from a Tatoeba-style de/en jsonl file (--source; one ``{"de": .., "en": ..}``
object per line, e.g. ~160k pairs of ~6.5 words). The de side and the en side of a line join the
SAME source pairs in the same order, so each line stays a translation of itself. --source takes
the file or a folder holding train.jsonl; without it $MT_CORPUS_SOURCE, then a default location
next to the repository, are tried. Nothing of the source is copied into the repository.

Shape (per line, both splits alike):
  * about 25 words on average (--pairs large): the number of joined sentences is 1 + a
    negative binomial draw whose mean is set from the source's own words per sentence;
  * a long tail: 1% of lines join 15-40 sentences (most of them over 100 words);
  * empty sides: 0.1% of lines have an empty de side, 0.1% an empty en side, 0.05% both.
Tabs, newlines, carriage returns and the other characters Python counts as line breaks are
replaced by a space in the source sentences, so every format stays line-aligned.

Output, in OUT_DIR (created if needed; same-named files are overwritten):
  --format jsonl  train.jsonl, validation.jsonl, test.jsonl: one {"de": .., "en": ..} per line
                  (exactly json.dumps(..., ensure_ascii=False))
  --format text   train.de + train.en, validation.de/.en, test.de/.en: one sentence per line
  --format tsv    train.tsv, validation.tsv, test.tsv: a header row "de<TAB>en", then one pair a row
train has --pairs lines, validation and test --eval-pairs each (default 2000), each split drawn
from its own random stream (so validation/test are not copies of training lines). The same
arguments (and numpy version) give byte-identical files; --seed changes every split. Lines are
built and written --chunk pairs at a time, so --pairs 5000000 needs well under 1 GB of memory.

--corrupt writes one known defect into the training split instead, and prints where it is as
one line ``corrupt: <kind> <file> line <L>`` (L counts file lines from 1, any header row included):
  utf8     an invalid UTF-8 byte (0xff) starts the de text of line L = N//2 + 1 of the train file
           that holds de (text: train.de; tsv: train.tsv; jsonl: train.jsonl)
  columns  tsv: line L of train.tsv is a single column (the de text, no tab);
           jsonl: line L of train.jsonl is an object without the "en" key    (not for text)
  counts   text: train.en lacks its last line (line L = N), one line fewer than train.de
                                                                            (only for text)
The corrupted pair always has both sides non-empty, so the defect is never masked as a blank
line. Every other line is the same as in the clean corpus of the same arguments.

Printed at the end: one summary line: pairs per split, the training split's mean words per line
(de and en), its share of pairs with a side over 100 words, its empty sides (de only / en only /
both), the bytes written and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / ".." / "shared" / "data" / "tatoeba_de_en" / "train.jsonl"
SOURCE_ENV = "MT_CORPUS_SOURCE"
LANGS = ("de", "en")
FORMATS = ("jsonl", "text", "tsv")
CORRUPTIONS = ("utf8", "columns", "counts")
# Which corruption makes sense for which layout (a text pair of files has no columns; a tsv or
# jsonl file cannot have its two sides differ in line count).
APPLIES = {"utf8": FORMATS, "columns": ("jsonl", "tsv"), "counts": ("text",)}

# Length shape (see the module docstring).
TARGET_MEAN_WORDS = 25.0
TAIL_SHARE = 0.01
TAIL_SENTENCES = (15, 40)  # inclusive
BODY_DISPERSION = 2  # negative binomial "n": smaller = more skewed; 2 gives a WMT-like right skew
EMPTY_DE, EMPTY_EN, EMPTY_BOTH = 0.001, 0.001, 0.0005
LONG_WORDS = 100

# Every character str.splitlines() breaks on: readers other than mt's may split on any of them.
_LINE_BREAKS = "\n\r\t\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_CLEAN = str.maketrans({c: " " for c in _LINE_BREAKS})


class UsageError(Exception):
    """Something the user can fix; main() prints it as one `error: ...` line and exits 2."""


# ------------------------------------------------------------------------------- source
@dataclass
class Source:
    de: np.ndarray  # object arrays of cleaned sentences (fancy indexing them is C-speed)
    en: np.ndarray
    de_words: np.ndarray  # int64 words per sentence
    en_words: np.ndarray
    path: Path


def resolve_source(arg: str | None) -> Path:
    """--source, else $MT_CORPUS_SOURCE, else the default location; a folder means its train.jsonl."""
    how = "--source" if arg else SOURCE_ENV if os.environ.get(SOURCE_ENV) else "the default location"
    raw = arg or os.environ.get(SOURCE_ENV) or str(DEFAULT_SOURCE)
    path = Path(raw).expanduser()
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.is_file():
        raise UsageError(
            f"no source corpus at {path.resolve()} (from {how}); pass --source FILE_OR_DIR: a Tatoeba-style "
            f'de/en jsonl file (one {{"de": .., "en": ..}} per line) or a folder holding train.jsonl '
            f"(or set {SOURCE_ENV})"
        )
    return path


def clean(sentence: str) -> str:
    return sentence.translate(_CLEAN).strip()


def load_source(path: Path) -> Source:
    """The usable pairs of the source: both sides strings, non-empty once cleaned."""
    de, en = [], []
    try:
        rows = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 ({e}); --source must be a de/en jsonl file") from None
    for lineno, line in enumerate(rows, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{path}: line {lineno} is not JSON ({e}); --source must be a de/en jsonl file") from None
        if not isinstance(row, dict):
            continue
        d, e_ = row.get("de"), row.get("en")
        if not isinstance(d, str) or not isinstance(e_, str):
            continue
        d, e_ = clean(d), clean(e_)
        if d and e_:
            de.append(d)
            en.append(e_)
    if not de:
        raise UsageError(f'{path}: no usable pairs (rows with non-empty "de" and "en" strings)')
    return Source(
        de=np.array(de, dtype=object),
        en=np.array(en, dtype=object),
        de_words=np.fromiter((len(s.split()) for s in de), dtype=np.int64, count=len(de)),
        en_words=np.fromiter((len(s.split()) for s in en), dtype=np.int64, count=len(en)),
        path=path,
    )


def json_escaped(sentences: np.ndarray) -> np.ndarray:
    """Each sentence as it appears between the quotes of json.dumps(..., ensure_ascii=False).

    Escaping the source once (not every generated line) keeps jsonl as fast as text: joining
    escaped pieces with a space is the escaped join, since a space needs no escaping."""
    return np.array([json.dumps(s, ensure_ascii=False)[1:-1] for s in sentences], dtype=object)


# ------------------------------------------------------------------------------- drawing
@dataclass
class Shape:
    """Sentences per line: 1 + NegBin(BODY_DISPERSION, p) for most lines, uniform over TAIL_SENTENCES
    for TAIL_SHARE of them. p is set so the mean words per line is TARGET_MEAN_WORDS."""

    p: float

    @classmethod
    def for_source(cls, src: Source) -> Shape:
        words_per_sentence = (src.de_words.mean() + src.en_words.mean()) / 2
        tail_mean = sum(TAIL_SENTENCES) / 2
        # mean words = E[sentences] * words per sentence (pieces are drawn independently)
        body_mean = (TARGET_MEAN_WORDS / words_per_sentence - TAIL_SHARE * tail_mean) / (1 - TAIL_SHARE)
        extra = max(body_mean - 1.0, 1e-6)  # the draw on top of the one sentence every line has
        return cls(p=BODY_DISPERSION / (BODY_DISPERSION + extra))


@dataclass
class Chunk:
    """`n` consecutive lines of one split: their text per side (escaped for jsonl) and word counts."""

    de: list[str]
    en: list[str]
    de_words: np.ndarray
    en_words: np.ndarray


def draw_chunk(
    rng: np.random.Generator, n: int, src: Source, shape: Shape, de_text: np.ndarray, en_text: np.ndarray, keep: int
) -> Chunk:
    """Draw n lines. `keep` (index in this chunk, or -1) is a line forced to have both sides
    non-empty (the one a corruption will land on); it changes no random draw."""
    # Always the same draws in the same order, whatever the format: the corpus depends only on
    # (seed, split, pairs, chunk size).
    u = rng.random(n)
    tail = rng.random(n) < TAIL_SHARE
    body = 1 + rng.negative_binomial(BODY_DISPERSION, shape.p, size=n)
    long = rng.integers(TAIL_SENTENCES[0], TAIL_SENTENCES[1] + 1, size=n)
    # u in [0, EMPTY_DE): de empty; then EMPTY_BOTH of both empty; then EMPTY_EN of en empty.
    empty_de = u < EMPTY_DE + EMPTY_BOTH
    empty_en = (u >= EMPTY_DE) & (u < EMPTY_DE + EMPTY_EN + EMPTY_BOTH)
    if keep >= 0:
        empty_de[keep] = empty_en[keep] = False
    k = np.where(tail, long, body).astype(np.int64)
    # A line with an empty side is one sentence pair with that side blanked: the other side is a
    # plausible short line, as in real scraped corpora.
    k[empty_de | empty_en] = 1
    idx = rng.integers(0, len(src.de), size=int(k.sum()))

    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(k[:-1], out=starts[1:])
    ends = starts + k
    # Pieces joined by " " inside a line and "\n" between lines, in ONE str.join per side, then
    # split back into lines: no Python-level loop over lines or pieces.
    seps = np.full(len(idx), " ", dtype=object)
    seps[ends - 1] = "\n"
    seps = seps.tolist()

    def side(text: np.ndarray, words: np.ndarray, empty: np.ndarray) -> tuple[list[str], np.ndarray]:
        pieces = text[idx]
        counts = words[idx]
        pieces[starts[empty]] = ""  # empty lines have exactly one piece
        counts[starts[empty]] = 0
        parts: list = [None] * (2 * len(idx))
        parts[0::2] = pieces.tolist()
        parts[1::2] = seps
        lines = "".join(parts).split("\n")
        lines.pop()  # after the final "\n"
        return lines, np.add.reduceat(counts, starts)

    de, de_words = side(de_text, src.de_words, empty_de)
    en, en_words = side(en_text, src.en_words, empty_en)
    return Chunk(de=de, en=en, de_words=de_words, en_words=en_words)


# ------------------------------------------------------------------------------- writing
def interleave(*columns: list[str] | str) -> str:
    """Row i = the i-th item of each list column (a str column repeats) concatenated; rows end in "\\n"."""
    n = next(len(c) for c in columns if isinstance(c, list))
    width = len(columns) + 1
    parts: list = [None] * (width * n)
    for j, col in enumerate(columns):
        parts[j::width] = col if isinstance(col, list) else [col] * n
    parts[len(columns) :: width] = ["\n"] * n
    return "".join(parts)


@dataclass
class Defect:
    """Where a corruption lands: file name, 0-based pair index, 1-based file line."""

    kind: str
    file: str
    pair: int
    line: int


def plan_defect(kind: str, fmt: str, pairs: int) -> Defect:
    header = 1 if fmt == "tsv" else 0
    if kind == "counts":  # train.en loses its last line
        return Defect(kind, "train.en", pairs - 1, pairs)
    line = max(pairs // 2 + 1, 1 + header)  # never the tsv header row
    file = {"jsonl": "train.jsonl", "text": "train.de", "tsv": "train.tsv"}[fmt]
    return Defect(kind, file, line - 1 - header, line)


class SplitWriter:
    """Opens the split's file(s) in binary mode and writes chunks of lines in the chosen layout."""

    def __init__(self, out: Path, split: str, fmt: str, defect: Defect | None):
        self.fmt, self.defect, self.written = fmt, defect, 0
        names = {"jsonl": [f"{split}.jsonl"], "text": [f"{split}.de", f"{split}.en"], "tsv": [f"{split}.tsv"]}[fmt]
        self.files = {name: open(out / name, "wb") for name in names}  # closed in close()
        if fmt == "tsv":
            self.files[names[0]].write("\t".join(LANGS).encode() + b"\n")

    def write(self, chunk: Chunk) -> None:
        n = len(chunk.de)
        if self.fmt == "jsonl":
            blocks = {next(iter(self.files)): interleave('{"de": "', chunk.de, '", "en": "', chunk.en, '"}')}
        elif self.fmt == "tsv":
            blocks = {next(iter(self.files)): interleave(chunk.de, "\t", chunk.en)}
        else:
            de_name, en_name = self.files
            blocks = {de_name: interleave(chunk.de), en_name: interleave(chunk.en)}
        d = self.defect
        hit = d is not None and self.written <= d.pair < self.written + n
        for name, text in blocks.items():
            if hit and name == d.file:
                self.files[name].write(self._corrupt(text, chunk, d.pair - self.written))
            else:
                self.files[name].write(text.encode("utf-8"))
        self.written += n

    def _corrupt(self, text: str, chunk: Chunk, i: int) -> bytes:
        """The block's bytes with line i (in this block) corrupted as the defect says."""
        lines = text.split("\n")  # lines[-1] == "" after the final newline
        before = "".join(s + "\n" for s in lines[:i]).encode("utf-8")
        after = "".join(s + "\n" for s in lines[i + 1 : -1]).encode("utf-8")
        kind = self.defect.kind
        if kind == "counts":  # the last line of train.en simply is not written
            return before + after
        if kind == "columns":
            bad = '{"de": "' + chunk.de[i] + '"}' if self.fmt == "jsonl" else chunk.de[i]
            return before + bad.encode("utf-8") + b"\n" + after
        # utf8: 0xff can never occur in UTF-8; put it first in the de text of the line
        prefix = len('{"de": "') if self.fmt == "jsonl" else 0
        line = lines[i].encode("utf-8")
        return before + line[:prefix] + b"\xff" + line[prefix:] + b"\n" + after

    def close(self) -> int:
        size = 0
        for f in self.files.values():
            size += f.tell()
            f.close()
        return size


@dataclass
class LineStats:
    """Running totals over the lines written (nothing per line is kept)."""

    lines: int = 0
    de_words: int = 0
    en_words: int = 0
    long: int = 0  # pairs with a side over LONG_WORDS words
    empty_de: int = 0  # de side empty, en not
    empty_en: int = 0
    empty_both: int = 0

    def add(self, chunk: Chunk) -> None:
        de, en = chunk.de_words, chunk.en_words
        self.lines += len(de)
        self.de_words += int(de.sum())
        self.en_words += int(en.sum())
        self.long += int((np.maximum(de, en) > LONG_WORDS).sum())
        self.empty_de += int(((de == 0) & (en > 0)).sum())
        self.empty_en += int(((en == 0) & (de > 0)).sum())
        self.empty_both += int(((de == 0) & (en == 0)).sum())

    def __str__(self) -> str:
        n = max(self.lines, 1)
        return (
            f"mean words de {self.de_words / n:.1f} en {self.en_words / n:.1f}, "
            f">{LONG_WORDS} words {100 * self.long / n:.2f}%, "
            f"empty de/en/both {self.empty_de}/{self.empty_en}/{self.empty_both}"
        )


# ------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write a deterministic WMT-shaped de/en parallel corpus (jsonl, text or tsv) for mt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the splits into (created if needed)")
    p.add_argument("--pairs", type=int, required=True, help="training pairs N (streams: up to millions)")
    p.add_argument("--format", choices=FORMATS, required=True, help="file layout (see the module docstring)")
    p.add_argument("--corrupt", choices=CORRUPTIONS, default=None, help="write this known defect into train")
    p.add_argument("--eval-pairs", type=int, default=2000, help="pairs in validation and in test")
    p.add_argument("--seed", type=int, default=1, help="same seed and arguments -> byte-identical files")
    p.add_argument(
        "--source",
        default=None,
        help=f"a Tatoeba-style de/en jsonl file, or a folder holding train.jsonl (default: ${SOURCE_ENV})",
    )
    p.add_argument("--chunk", type=int, default=100_000, help="lines built and written at a time")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.eval_pairs < 0 or args.chunk < 1:
        p.error("--pairs and --chunk must be >= 1 and --eval-pairs >= 0")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    return args


def generate(args: argparse.Namespace) -> str:
    """Write the corpus; returns the summary line."""
    t0 = time.perf_counter()
    if args.corrupt and args.format not in APPLIES[args.corrupt]:
        raise UsageError(
            f"--corrupt {args.corrupt} does not apply to --format {args.format}; "
            f"use it with --format {' or '.join(APPLIES[args.corrupt])}"
        )
    src = load_source(resolve_source(args.source))
    shape = Shape.for_source(src)
    if args.format == "jsonl":
        de_text, en_text = json_escaped(src.de), json_escaped(src.en)
    else:
        de_text, en_text = src.de, src.en
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    defect = plan_defect(args.corrupt, args.format, args.pairs) if args.corrupt else None
    # One independent stream per split (spawn keys 0, 1, 2): validation and test never replay
    # training lines, and changing --pairs leaves validation and test as they were.
    seeds = np.random.SeedSequence(args.seed).spawn(3)
    sizes = {"train": args.pairs, "validation": args.eval_pairs, "test": args.eval_pairs}
    total_bytes, train = 0, LineStats()
    for (split, n), seed in zip(sizes.items(), seeds):
        rng = np.random.default_rng(seed)
        split_defect = defect if split == "train" else None
        writer = SplitWriter(out, split, args.format, split_defect)
        try:
            for start in range(0, n, args.chunk):
                size = min(args.chunk, n - start)
                keep = split_defect.pair - start if split_defect and 0 <= split_defect.pair - start < size else -1
                chunk = draw_chunk(rng, size, src, shape, de_text, en_text, keep)
                writer.write(chunk)
                if split == "train":
                    train.add(chunk)
        finally:
            total_bytes += writer.close()
    if defect:
        print(f"corrupt: {defect.kind} {out / defect.file} line {defect.line}", flush=True)
    return (
        f"make_corpus: {args.format} train {args.pairs} / validation {args.eval_pairs} / test {args.eval_pairs} pairs"
        f"; train {train}; {total_bytes:,} bytes; {time.perf_counter() - t0:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(generate(args), flush=True)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
