"""Corpus loading (schemas, file kinds, splits, directions, errors) and corpus preparation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mt.config import DataConfig, TokenizerConfig
from mt.data import default_cache_dir, load_splits, prepare_corpus
from mt.errors import DataError
from mt.tokenizer import train_tokenizer

TOK = TokenizerConfig(vocab_size=100, input_sentence_size=0)
QUIET = {"log": lambda m: None}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), "utf-8")


def _first_rows(path: Path, n: int = 3) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


# ------------------------------------------------------------------------- schemas & formats
def test_flat_jsonl_folder(tiny_corpus_dir):
    splits = load_splits(DataConfig(path=str(tiny_corpus_dir)))
    assert set(splits) == {"train", "validation", "test"}
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [2000, 100, 100]
    for ds in splits.values():
        assert ds.column_names == ["src", "tgt"]
    rows = _first_rows(tiny_corpus_dir / "train.jsonl")
    assert splits["train"][:3] == {"src": [r["de"] for r in rows], "tgt": [r["en"] for r in rows]}


def test_direction_is_chosen_by_src_and_tgt(tiny_corpus_dir):
    splits = load_splits(DataConfig(path=str(tiny_corpus_dir), src="en", tgt="de"))
    row = _first_rows(tiny_corpus_dir / "validation.jsonl", 1)[0]
    assert splits["validation"][0] == {"src": row["en"], "tgt": row["de"]}


def test_nested_translation_schema(tmp_path):
    pairs = [("ein hund", "a dog"), ("eine katze", "a cat"), ("ein haus", "a house")]
    _write_jsonl(tmp_path / "train.jsonl", [{"translation": {"de": d, "en": e}} for d, e in pairs])
    _write_jsonl(tmp_path / "test.jsonl", [{"translation": {"de": "baum", "en": "tree"}}])
    splits = load_splits(DataConfig(path=str(tmp_path), src="en", tgt="de"))
    assert set(splits) == {"train", "test"}
    assert splits["train"].column_names == ["src", "tgt"]
    assert splits["train"]["src"][:] == [e for _, e in pairs]
    assert splits["train"]["tgt"][:] == [d for d, _ in pairs]
    assert splits["test"][0] == {"src": "tree", "tgt": "baum"}


def test_multi30k_french(multi30k_dir):
    splits = load_splits(DataConfig(path=str(multi30k_dir), src="fr", tgt="en"))
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [29000, 1014, 1000]
    row = _first_rows(multi30k_dir / "test.jsonl", 1)[0]
    assert splits["test"][0] == {"src": row["fr"], "tgt": row["en"]}


def test_parallel_text_files_with_split_aliases(tmp_path):
    _write_lines(tmp_path / "train.de", ["ein hund", "eine katze", "  "])
    _write_lines(tmp_path / "train.en", ["a dog", "a cat", "x"])
    _write_lines(tmp_path / "valid.de", ["ein baum"])
    _write_lines(tmp_path / "valid.en", ["a tree"])
    _write_lines(tmp_path / "test.de", ["ein auto", "ein buch"])
    _write_lines(tmp_path / "test.en", ["a car", "a book"])
    (tmp_path / "README.txt").write_text("not data\n")
    splits = load_splits(DataConfig(path=str(tmp_path)))
    assert splits["train"][:] == {
        "src": ["ein hund", "eine katze", "  "],
        "tgt": ["a dog", "a cat", "x"],
    }
    assert splits["validation"][:] == {"src": ["ein baum"], "tgt": ["a tree"]}
    assert len(splits["test"]) == 2
    back = load_splits(DataConfig(path=str(tmp_path), src="en", tgt="de"))
    assert back["validation"][0] == {"src": "a tree", "tgt": "ein baum"}


def test_configured_split_name_is_tried_before_aliases(tmp_path):
    for stem, de, en in (
        ("train", "hund", "dog"),
        ("dev", "katze", "cat"),
        ("nt2014", "baum", "tree"),
    ):
        _write_lines(tmp_path / f"{stem}.de", [de])
        _write_lines(tmp_path / f"{stem}.en", [en])
    assert load_splits(DataConfig(path=str(tmp_path)))["validation"]["tgt"][:] == ["cat"]
    cfg = DataConfig(path=str(tmp_path), valid_split="nt2014")
    assert load_splits(cfg)["validation"]["tgt"][:] == ["tree"]


def test_jsonl_dev_file_is_the_validation_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"de": "hund", "en": "dog"}])
    _write_jsonl(tmp_path / "dev.jsonl", [{"de": "katze", "en": "cat"}])
    splits = load_splits(DataConfig(path=str(tmp_path)))
    assert splits["validation"][:] == {"src": ["katze"], "tgt": ["cat"]}


def test_tsv_without_header(tmp_path):
    _write_lines(tmp_path / "train.tsv", ["ein hund\ta dog", "eine katze\ta cat"])
    _write_lines(tmp_path / "dev.tsv", ["ein baum\ta tree"])
    splits = load_splits(DataConfig(path=str(tmp_path)))
    assert splits["train"][:] == {"src": ["ein hund", "eine katze"], "tgt": ["a dog", "a cat"]}
    assert splits["validation"][0] == {"src": "ein baum", "tgt": "a tree"}


def test_tsv_with_language_header(tmp_path):
    _write_lines(tmp_path / "train.tsv", ["en\tfr\tde", "a dog\tun chien\tein hund"])
    splits = load_splits(DataConfig(path=str(tmp_path), src="de", tgt="en"))
    assert splits["train"][:] == {"src": ["ein hund"], "tgt": ["a dog"]}
    with pytest.raises(DataError, match=r"'cs' not found.*en, fr, de"):
        load_splits(DataConfig(path=str(tmp_path), src="cs", tgt="en"))


def test_max_examples_truncate(tiny_corpus_dir):
    cfg = DataConfig(path=str(tiny_corpus_dir), max_train_examples=50, max_valid_examples=7)
    splits = load_splits(cfg)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (50, 7, 100)


# ------------------------------------------------------------------------------------ errors
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(path="../no/such/corpus"))


def test_hub_id_while_offline_says_so():
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(path="bentrevett/multi30k"))
    msg = str(err.value)
    assert "cannot reach the Hugging Face Hub for 'bentrevett/multi30k' (offline?)" in msg
    assert "data.path=/path/to/multi30k" in msg and "\n" not in msg


def test_missing_language_column_names_existing_columns(tiny_corpus_dir):
    with pytest.raises(DataError, match=r"language column 'fr' not found.*columns de, en"):
        load_splits(DataConfig(path=str(tiny_corpus_dir), src="fr", tgt="en"))


def test_missing_language_in_nested_schema(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"translation": {"de": "hund", "en": "dog"}}])
    with pytest.raises(DataError, match=r"language 'cs' not found.*de, en"):
        load_splits(DataConfig(path=str(tmp_path), src="cs", tgt="en"))


def test_missing_language_file(tmp_path):
    _write_lines(tmp_path / "train.de", ["hund"])
    _write_lines(tmp_path / "train.en", ["dog"])
    with pytest.raises(DataError, match=r"train\.fr.*de, en"):
        load_splits(DataConfig(path=str(tmp_path), src="fr", tgt="en"))


def test_line_count_mismatch(tmp_path):
    _write_lines(tmp_path / "train.de", ["a", "b", "c"])
    _write_lines(tmp_path / "train.en", ["a", "b"])
    with pytest.raises(DataError, match=r"train\.de has 3 lines but .*train\.en has 2"):
        load_splits(DataConfig(path=str(tmp_path)))


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "train.de").write_bytes("eins\nzwei\ndräi\n".encode("latin-1"))
    _write_lines(tmp_path / "train.en", ["one", "two", "three"])
    with pytest.raises(DataError, match=r"train\.de: line 3 is not valid UTF-8"):
        load_splits(DataConfig(path=str(tmp_path)))


def test_invalid_utf8_in_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"de": "eins", "en": "one"}).encode()
    bad = '{"de": "dr\xe4i", "en": "three"}'.encode("latin-1")
    (tmp_path / "train.jsonl").write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=r"train\.jsonl: line 3 is not valid UTF-8"):
        load_splits(DataConfig(path=str(tmp_path)))


def test_jsonl_row_without_a_language_key_names_file_and_line(tmp_path):
    """A JSON row that lacks a language key is a one-line error naming the file and line (flat and
    nested rows, any split); an explicit null still reads as an empty side, like an empty CSV cell."""
    rows = [{"de": "eins", "en": "one"}, {"de": "zwei", "en": "two"}]
    _write_jsonl(tmp_path / "flat" / "train.jsonl", [*rows, {"de": "drei"}, {"de": "vier", "en": "four"}])
    with pytest.raises(DataError, match=r"flat/train\.jsonl: line 3 has no 'en' key; every row needs both") as e:
        load_splits(DataConfig(path=str(tmp_path / "flat")))
    assert "\n" not in str(e.value)
    nested = [{"translation": r} for r in rows]
    _write_jsonl(tmp_path / "nested" / "train.jsonl", nested)
    _write_jsonl(tmp_path / "nested" / "validation.jsonl", [*nested, {"translation": {"en": "three"}}])
    with pytest.raises(DataError, match=r"nested/validation\.jsonl: line 3 has no 'de' key"):
        load_splits(DataConfig(path=str(tmp_path / "nested")))
    _write_jsonl(tmp_path / "one.jsonl", [{"en": "one", "de": "eins"}, {"en": "two"}])
    with pytest.raises(DataError, match=r"one\.jsonl: line 2 has no 'de' key"):
        load_splits(DataConfig(path=str(tmp_path / "one.jsonl")))
    _write_jsonl(tmp_path / "nulls" / "train.jsonl", [*rows, {"de": "drei", "en": None}])
    assert load_splits(DataConfig(path=str(tmp_path / "nulls")))["train"]["tgt"] == ["one", "two", ""]


def test_no_train_split(tmp_path):
    _write_lines(tmp_path / "valid.de", ["hund"])
    _write_lines(tmp_path / "valid.en", ["dog"])
    with pytest.raises(DataError, match="no training split"):
        load_splits(DataConfig(path=str(tmp_path)))
    other = tmp_path / "jsonl"
    _write_jsonl(other / "test.jsonl", [{"de": "hund", "en": "dog"}])
    with pytest.raises(DataError, match="no training split.*test"):
        load_splits(DataConfig(path=str(other)))


def test_folder_without_data_files(tmp_path):
    with pytest.raises(DataError, match="no data files found"):
        load_splits(DataConfig(path=str(tmp_path)))


# ------------------------------------------------------------------------------- preparation
def test_prepare_corpus_tokenizes_every_split(tiny_corpus_dir, tmp_path):
    corpus = prepare_corpus(DataConfig(path=str(tiny_corpus_dir)), TOK, tmp_path, **QUIET)
    tok = corpus.tokenizer
    assert corpus.train.column_names == ["src", "tgt", "src_ids", "tgt_ids"]
    assert str(corpus.train.features["src_ids"].feature) == "Value('int32')"
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (2000, 100, 100)
    row = corpus.valid[5]
    assert row["src_ids"] == tok.encode_src([row["src"]])[0]
    assert tok.decode_tgt([row["tgt_ids"]]) == [row["tgt"]]
    assert tok.eos_id not in row["tgt_ids"] and tok.bos_id not in row["tgt_ids"]
    assert corpus.stats["train"] == 2000 and corpus.stats["dropped_empty"] == 0
    assert corpus.stats["src_vocab_size"] == tok.src_vocab_size


def _length_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """Toy-vocabulary pairs whose token counts (1 piece per toy word) hit each filter."""
    src = ["hund katze"] * 20 + ["", "   ", "hund"]  # 20 good, 2 empty src
    tgt = ["dog cat"] * 20 + ["dog", "cat", " "]  # 1 empty tgt
    src += ["hund " * 9, "hund " * 12]  # 9 ok, 12 > max_src_len=10
    tgt += ["dog " * 9, "dog " * 9]
    src += ["katze " * 5, "katze " * 5]  # tgt 11 > max_tgt_len=10 (ratio also > 2: counted once)
    tgt += ["cat " * 11, "cat " * 10]
    src += ["baum", "baum " * 7, "baum " * 2]  # ratio 1:3 > 2, 7:2 > 2 -> dropped; 2:4 = 2 kept
    tgt += ["tree " * 3, "tree " * 2, "tree " * 4]
    _write_lines(folder / "train.de", [s.strip() if s.strip() else s for s in src])
    _write_lines(folder / "train.en", [t.strip() if t.strip() else t for t in tgt])
    _write_lines(folder / "valid.de", ["", "hund " * 30, "hund"])
    _write_lines(folder / "valid.en", ["", "dog", "dog " * 30])
    return src, tgt


def test_empty_rows_and_length_filters_are_counted(tiny_corpus_dir, tmp_path):
    folder = tmp_path / "corpus"
    _length_corpus(folder)
    rows = [json.loads(line) for line in open(tiny_corpus_dir / "train.jsonl", encoding="utf-8")]
    tok = train_tokenizer(TOK, [r["de"] for r in rows], [r["en"] for r in rows], tmp_path, **QUIET)
    logs: list[str] = []
    cfg = DataConfig(path=str(folder), max_src_len=10, max_tgt_len=10, max_len_ratio=2.0)
    corpus = prepare_corpus(cfg, TOK, tmp_path, log=logs.append, tokenizer=tok)
    s = corpus.stats
    assert s["train_raw"] == 30
    assert s["dropped_empty"] == 3
    assert (s["dropped_src_len"], s["dropped_tgt_len"], s["dropped_ratio"]) == (1, 1, 2)
    assert s["train"] == len(corpus.train) == 30 - 3 - 4
    kept = {(len(a), len(b)) for a, b in zip(corpus.train["src_ids"], corpus.train["tgt_ids"])}
    assert kept == {(2, 2), (9, 9), (5, 10), (2, 4)}
    # validation keeps every row, even empty and extreme ones
    assert len(corpus.valid) == 3 and corpus.test is None
    assert any("dropped 3 empty, 1 src > 10 tokens, 1 tgt > 10 tokens, 2 length ratio" in m for m in logs)


def test_prepare_corpus_in_parallel_and_cached(tiny_corpus_dir, tmp_path):
    cfg = DataConfig(path=str(tiny_corpus_dir), num_proc=2, max_len_ratio=1.5)
    a = prepare_corpus(cfg, TOK, tmp_path, **QUIET)
    logs: list[str] = []
    b = prepare_corpus(cfg, TOK, tmp_path, log=logs.append)
    assert any("loaded cached" in m for m in logs)
    assert a.train["src_ids"][:] == b.train["src_ids"][:]
    assert a.stats == b.stats
    # Arrow-backed splits: the tokenized table is cached by `datasets` and reused
    assert a.valid.cache_files and a.valid.cache_files == b.valid.cache_files


def test_max_valid_examples_applies_to_prepared_validation(tiny_corpus_dir, tmp_path):
    cfg = DataConfig(path=str(tiny_corpus_dir), max_valid_examples=10)
    corpus = prepare_corpus(cfg, TOK, tmp_path, **QUIET)
    assert len(corpus.valid) == 10 and len(corpus.test) == 100


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir(DataConfig(cache_dir=str(tmp_path))) == tmp_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(DataConfig()) == tmp_path / "xdg" / "mt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir(replace(DataConfig(), cache_dir=None)) == Path.home() / ".cache" / "mt"


def test_sentencepiece_learns_from_a_seeded_sample_of_large_corpora(tiny_corpus_dir, tmp_path, monkeypatch):
    """Above tokenizer.input_sentence_size sentences, SentencePiece gets a seeded sample of pairs
    (both sides for a joint model), so it is the same on every run; below it, every pair; and each
    stage of the preparation logs its time."""
    import mt.data as data_mod

    seen: list[tuple[list[str], list[str]]] = []
    real = data_mod.train_tokenizer

    def recording(cfg, src, tgt, *args, **kw):
        seen.append((list(src), list(tgt)))
        return real(cfg, src, tgt, *args, **kw)

    monkeypatch.setattr(data_mod, "train_tokenizer", recording)
    sampled = replace(TOK, input_sentence_size=1000)  # 2000 pairs = 4000 sentences: 500 pairs sampled
    logs: list[str] = []
    for _ in range(2):
        prepare_corpus(DataConfig(path=str(tiny_corpus_dir)), sampled, tmp_path / "c", log=logs.append)
    (src_a, tgt_a), (src_b, tgt_b) = seen
    rows = [json.loads(line) for line in open(tiny_corpus_dir / "train.jsonl", encoding="utf-8")]
    pairs = {(r["de"], r["en"]) for r in rows}
    assert len(src_a) == len(tgt_a) == 500 and set(zip(src_a, tgt_a)) <= pairs
    assert (src_a, tgt_a) == (src_b, tgt_b)
    prepare_corpus(DataConfig(path=str(tiny_corpus_dir)), TOK, tmp_path / "c", **QUIET)
    assert len(seen[-1][0]) == 2000  # TOK samples nothing: every pair
    for stage in ("read 2000 training pairs", "dropped 0 empty pairs", "tokenizer ready", "tokenized with 1 process"):
        assert any(m.startswith(f"data: {stage}") and m.endswith("s") for m in logs), stage
