"""Parallel text and TSV corpora into Arrow, a chunk of lines at a time.

    train.de + train.en   one sentence per line, line-aligned          -> Dataset(src, tgt)
    train.tsv             src<TAB>tgt, or a header row naming the languages

    ds = read_parallel_text(Path("c/train.de"), Path("c/train.en"), cache)   # memory-mapped
    ds = read_tsv(Path("c/train.tsv"), "de", "en", cache)

A WMT-size file never sits whole in memory: lines are read CHUNK_LINES at a time, decoded and
checked (invalid UTF-8 is reported with its file and line; mismatched line counts and missing
columns are one-line errors) and appended to an Arrow stream file in the cache. The Dataset is
that file, memory-mapped, so `datasets` caches everything computed from it beside it. The file's
name is a key of its inputs (paths, sizes, modification times, languages, FORMAT), and it appears
only complete (written aside, then renamed): an interrupted read is redone, never reused.

Lines split on "\\n" only (U+2028 and friends stay inside a line); a trailing "\\r" and a UTF-8 BOM
are dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from .errors import DataError

if TYPE_CHECKING:  # imported where used: mt-translate counts lines here without loading datasets
    import datasets

CHUNK_LINES = 100_000  # lines decoded and written per Arrow record batch
FORMAT = 1  # bump when the files written here change
SCHEMA = pa.schema([("src", pa.string()), ("tgt", pa.string())])
_LANG_LIKE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")


# =================================================================================== lines
def iter_lines(path: Path, chunk: int = CHUNK_LINES) -> Iterator[tuple[int, list[str]]]:
    """(number of the chunk's first line, its lines) for the whole file, `chunk` lines at a time."""
    first = 1
    with open(path, "rb") as f:
        while block := list(islice(f, chunk)):
            raw = b"".join(block)
            if first == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = first + raw.count(b"\n", 0, e.start)
                raise DataError(
                    f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8"
                ) from None
            lines = text.split("\n")
            if text.endswith("\n"):
                lines.pop()
            yield first, [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
            first += len(lines)


def count_lines(path: Path) -> int:
    """Lines in the file as iter_lines counts them (a last line without "\\n" counts), streaming."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def find_bad_utf8(path: Path) -> None:
    """Raise iter_lines' DataError (file and line) if the file holds invalid UTF-8."""
    for _ in iter_lines(path):
        pass


# ============================================================================ the readers
def _parallel_batches(src_file: Path, tgt_file: Path) -> Iterator[pa.RecordBatch]:
    src_chunks, tgt_chunks = iter_lines(src_file), iter_lines(tgt_file)
    while True:
        src, tgt = next(src_chunks, None), next(tgt_chunks, None)
        if src is None and tgt is None:
            return
        if src is None or tgt is None or len(src[1]) != len(tgt[1]):  # only at the end of the shorter file
            break
        yield pa.record_batch([pa.array(src[1], pa.string()), pa.array(tgt[1], pa.string())], schema=SCHEMA)
    n_src, n_tgt = count_lines(src_file), count_lines(tgt_file)
    raise DataError(
        f"parallel files differ in length: {src_file} has {n_src} lines but {tgt_file} has {n_tgt}; "
        f"they must be line-aligned (one sentence per line)"
    )


def _tsv_columns(path: Path, head: list[str], src: str, tgt: str) -> tuple[int, int, bool]:
    """(src column, tgt column, whether line 1 is a header) from the first line's fields."""
    lowered = [h.strip().lower() for h in head]
    if src in head and tgt in head:
        return head.index(src), head.index(tgt), True
    if src.lower() in lowered and tgt.lower() in lowered:
        return lowered.index(src.lower()), lowered.index(tgt.lower()), True
    if {"src", "tgt"} <= set(lowered) or {"source", "target"} <= set(lowered):
        s_name = "src" if "src" in lowered else "source"
        t_name = "tgt" if "tgt" in lowered else "target"
        return lowered.index(s_name), lowered.index(t_name), True
    if len(head) > 1 and all(_LANG_LIKE.match(h.strip()) for h in head):
        missing = src if src not in head else tgt
        raise DataError(
            f"{path}: language column '{missing}' not found; the header names columns "
            f"{', '.join(head)}: set data.src/data.tgt to one of them"
        )
    if len(head) != 2:
        raise DataError(
            f"{path}: line 1 has {len(head)} tab-separated fields; a TSV without a header "
            f"row must have exactly two (src<TAB>tgt), or add a header naming the languages"
        )
    return 0, 1, False


def _tsv_batches(path: Path, src_lang: str, tgt_lang: str) -> Iterator[pa.RecordBatch]:
    si = ti = ncol = 0
    for first, lines in iter_lines(path):
        if first == 1:
            head = lines[0].split("\t")
            si, ti, has_header = _tsv_columns(path, head, src_lang, tgt_lang)
            ncol = len(head)
            if has_header:
                lines, first = lines[1:], 2
        src, tgt = [], []
        for lineno, line in enumerate(lines, start=first):
            if line == "":  # a blank line is an empty pair (dropped before training)
                src.append("")
                tgt.append("")
                continue
            fields = line.split("\t")
            if len(fields) != ncol:
                raise DataError(f"{path}: line {lineno} has {len(fields)} tab-separated fields, expected {ncol}")
            src.append(fields[si])
            tgt.append(fields[ti])
        yield pa.record_batch([pa.array(src, pa.string()), pa.array(tgt, pa.string())], schema=SCHEMA)


def read_parallel_text(src_file: Path, tgt_file: Path, cache_dir: Path) -> datasets.Dataset:
    """Line-aligned src_file and tgt_file as a memory-mapped Dataset(src, tgt)."""
    return _cached(cache_dir, ["text", src_file, tgt_file], lambda: _parallel_batches(src_file, tgt_file))


def read_tsv(path: Path, src_lang: str, tgt_lang: str, cache_dir: Path) -> datasets.Dataset:
    """A TSV of pairs as a memory-mapped Dataset(src, tgt)."""
    return _cached(cache_dir, ["tsv", path, src_lang, tgt_lang], lambda: _tsv_batches(path, src_lang, tgt_lang))


# ================================================================================ the cache
def _key(parts: list) -> str:
    h = hashlib.sha256(f"mt-corpus-files {FORMAT}".encode())
    for p in parts:
        if isinstance(p, Path):
            st = p.stat()
            p = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        h.update(f"\0{p}".encode())
    return h.hexdigest()[:24]


def _cached(cache_dir: Path, parts: list, batches: Callable[[], Iterator[pa.RecordBatch]]) -> datasets.Dataset:
    name = Path(parts[1]).name
    path = Path(cache_dir) / "corpora" / f"{name}.{_key(parts)}.arrow"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
                for batch in batches():
                    writer.write_batch(batch)
            os.replace(tmp, path)  # complete or absent: a crash mid-read leaves only the .tmp
        finally:
            tmp.unlink(missing_ok=True)
    import datasets

    return datasets.Dataset.from_file(str(path))


__all__ = ["iter_lines", "count_lines", "find_bad_utf8", "read_parallel_text", "read_tsv", "CHUNK_LINES"]
