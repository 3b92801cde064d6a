"""mt/corpus_files.py: parallel text and TSV read a chunk at a time into cached Arrow files, with
every error naming its file and line, and nothing half-written left to reuse."""

from pathlib import Path

import pytest

from mt import corpus_files
from mt.corpus_files import count_lines, iter_lines, read_parallel_text, read_tsv
from mt.errors import DataError


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 3 lines, so every test crosses chunk boundaries."""
    real = corpus_files.iter_lines
    monkeypatch.setattr(corpus_files, "iter_lines", lambda path, chunk=3: real(path, chunk))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def arrow_files(cache: Path) -> list[Path]:
    return sorted((cache / "corpora").glob("*"))


def test_lines_split_on_newline_only_across_chunks(tmp_path):
    f = write(tmp_path / "a", "\ufeffone\r\ntwo\u2028still two\nthree\n\nfive\nsix\nseven".encode())
    chunks = list(iter_lines(f, chunk=3))
    assert [first for first, _ in chunks] == [1, 4, 7]
    assert [ln for _, lines in chunks for ln in lines] == [
        "one", "two\u2028still two", "three", "", "five", "six", "seven",
    ]  # fmt: skip
    assert count_lines(f) == 7 and count_lines(write(tmp_path / "b", b"x\n")) == 1
    assert count_lines(write(tmp_path / "c", b"")) == 0


def test_parallel_text_round_trip_and_cache(tmp_path):
    src = write(tmp_path / "train.de", "".join(f"satz {i} ä\n" for i in range(10)).encode())
    tgt = write(tmp_path / "train.en", "".join(f"sentence {i}\n" for i in range(10)).encode())
    ds = read_parallel_text(src, tgt, tmp_path / "cache")
    assert ds["src"] == [f"satz {i} ä" for i in range(10)] and ds["tgt"] == [f"sentence {i}" for i in range(10)]
    (arrow,) = arrow_files(tmp_path / "cache")
    stamp = arrow.stat().st_mtime_ns
    assert read_parallel_text(src, tgt, tmp_path / "cache")["src"] == ds["src"]
    assert arrow.stat().st_mtime_ns == stamp  # the second read is the cached file
    write(tgt, "".join(f"phrase {i}\n" for i in range(10)).encode())
    assert read_parallel_text(src, tgt, tmp_path / "cache")["tgt"][9] == "phrase 9"  # a changed file is re-read


@pytest.mark.parametrize("n_src,n_tgt", [(7, 6), (6, 7), (6, 9), (3, 0)])
def test_line_counts_that_differ_are_one_line_errors(tmp_path, n_src, n_tgt):
    src = write(tmp_path / "t.de", b"a\n" * n_src)
    tgt = write(tmp_path / "t.en", b"b\n" * n_tgt)
    with pytest.raises(DataError, match=rf"t.de has {n_src} lines but .*t.en has {n_tgt}") as e:
        read_parallel_text(src, tgt, tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert arrow_files(tmp_path / "cache") == []  # nothing left behind, not even a temporary file


def test_invalid_utf8_in_a_later_chunk_names_its_line(tmp_path):
    src = write(tmp_path / "t.de", b"a\nb\nc\nd\ne\xff\nf\n")
    tgt = write(tmp_path / "t.en", b"a\n" * 6)
    with pytest.raises(DataError, match=r"t.de: line 5 is not valid UTF-8 \(byte 0xff\)"):
        read_parallel_text(src, tgt, tmp_path / "cache")
    assert arrow_files(tmp_path / "cache") == []


def test_interrupted_read_is_redone(tmp_path, monkeypatch):
    src = write(tmp_path / "t.de", b"a\n" * 8)
    tgt = write(tmp_path / "t.en", b"b\n" * 8)
    real = corpus_files._parallel_batches

    def dies_after_one_batch(*args):
        it = real(*args)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_files, "_parallel_batches", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        read_parallel_text(src, tgt, tmp_path / "cache")
    assert arrow_files(tmp_path / "cache") == []
    monkeypatch.setattr(corpus_files, "_parallel_batches", real)
    assert len(read_parallel_text(src, tgt, tmp_path / "cache")) == 8


def test_tsv_header_blank_lines_and_bad_rows(tmp_path):
    f = write(tmp_path / "t.tsv", b"en\tde\none\teins\n\nthree\tdrei\nfour\tvier\nfive\tf\xc3\xbcnf\n")
    ds = read_tsv(f, "de", "en", tmp_path / "cache")
    assert ds["src"] == ["eins", "", "drei", "vier", "fünf"] and ds["tgt"] == ["one", "", "three", "four", "five"]
    bad = write(tmp_path / "bad.tsv", b"de\ten\na\tb\nc\td\ne\tf\ng\th\nonly one column\n")
    with pytest.raises(DataError, match=r"bad.tsv: line 6 has 1 tab-separated fields, expected 2"):
        read_tsv(bad, "de", "en", tmp_path / "cache")
    no_header = write(tmp_path / "plain.tsv", b"a\tb\nc\td\n")
    assert read_tsv(no_header, "de", "en", tmp_path / "cache")["tgt"] == ["b", "d"]
    with pytest.raises(DataError, match="language column 'de' not found"):
        read_tsv(write(tmp_path / "fr.tsv", b"fr\ten\na\tb\n"), "de", "en", tmp_path / "cache")
