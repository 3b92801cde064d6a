"""SentencePiece wrapper: training, special ids, round trips, serialisation, caching."""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import replace

import pyarrow as pa
import pytest
import torch

from mt.config import TokenizerConfig
from mt.errors import DataError
from mt.tokenizer import Tokenizer, train_tokenizer

CFG = TokenizerConfig(vocab_size=100, input_sentence_size=0)


@pytest.fixture(scope="module")
def toy_texts(tiny_corpus_dir):
    rows = [json.loads(line) for line in open(tiny_corpus_dir / "train.jsonl", encoding="utf-8")]
    return [r["de"] for r in rows], [r["en"] for r in rows]


@pytest.fixture(scope="module")
def joint_tok(toy_texts, tmp_path_factory):
    return train_tokenizer(CFG, *toy_texts, tmp_path_factory.mktemp("spm"), log=lambda m: None)


def _vocab(tok: Tokenizer, side: str) -> set[str]:
    if side == "src":
        return set(tok.src_pieces(range(tok.src_vocab_size)))
    return set(tok.tgt_pieces(range(tok.tgt_vocab_size)))


def test_joint_model_shares_one_vocabulary(joint_tok):
    assert joint_tok.joint
    assert joint_tok.src_vocab_size == joint_tok.tgt_vocab_size <= CFG.vocab_size
    assert "▁dog" in _vocab(joint_tok, "src") and "▁hund" in _vocab(joint_tok, "tgt")
    assert joint_tok.encode_src(["hund dog"]) == joint_tok.encode_tgt(["hund dog"])


def test_separate_models_have_their_own_vocabularies(toy_texts, tmp_path):
    tok = train_tokenizer(replace(CFG, joint=False), *toy_texts, tmp_path, log=lambda m: None)
    assert not tok.joint
    src_vocab, tgt_vocab = _vocab(tok, "src"), _vocab(tok, "tgt")
    assert "▁hund" in src_vocab and "▁hund" not in tgt_vocab
    assert "▁dog" in tgt_vocab and "▁dog" not in src_vocab
    # the toy corpus is small: both models stay below the (soft) limit
    assert tok.src_vocab_size <= CFG.vocab_size and tok.tgt_vocab_size <= CFG.vocab_size
    assert len(list((tmp_path / "spm").glob("*.model"))) == 2


def test_special_ids_and_pieces(joint_tok, toy_texts):
    tok = joint_tok
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.tgt_pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tok.encode_tgt(toy_texts[1][:200]) + tok.encode_src(toy_texts[0][:200])
    # encode gives piece ids only: no pad/bos/eos
    assert all(i not in (0, 2, 3) for seq in ids for i in seq)
    assert tok.encode_src(["hund ✈"])[0][-1] == tok.unk_id or tok.unk_id in tok.encode_src(["✈"])[0]


def test_custom_special_ids_are_honoured(toy_texts, tmp_path):
    cfg = replace(CFG, pad_id=3, unk_id=0, bos_id=1, eos_id=2)
    tok = train_tokenizer(cfg, *toy_texts, tmp_path, log=lambda m: None)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (3, 0, 1, 2)
    assert tok.src_pieces([3, 0, 1, 2]) == ["<pad>", "<unk>", "<s>", "</s>"]


def test_encode_decode_round_trip(joint_tok, toy_texts):
    src, tgt = toy_texts
    assert joint_tok.decode_tgt(joint_tok.encode_tgt(tgt)) == tgt
    assert joint_tok.decode_src(joint_tok.encode_src(src)) == src
    # each toy word is a single piece
    assert [len(x) for x in joint_tok.encode_src(src[:50])] == [len(s.split()) for s in src[:50]]


def test_decode_stops_at_eos_and_skips_specials(joint_tok):
    tok = joint_tok
    ids = tok.encode_tgt(["big red dog"])[0]
    garbage = tok.encode_tgt(["cat"])[0]
    seq = [tok.bos_id, *ids, tok.eos_id, *garbage, tok.pad_id, tok.pad_id]
    assert tok.decode_tgt([seq]) == ["big red dog"]
    assert tok.decode_tgt([torch.tensor([tok.bos_id, *ids, tok.pad_id])]) == ["big red dog"]
    assert tok.decode_src([[tok.eos_id, *ids]]) == [""]


def test_state_dict_round_trip_through_weights_only_checkpoint(joint_tok, toy_texts, tmp_path):
    sep = train_tokenizer(replace(CFG, joint=False), *toy_texts, tmp_path, log=lambda m: None)
    for tok in (joint_tok, sep):
        buf = io.BytesIO()
        torch.save({"tokenizer": tok.state_dict()}, buf)
        buf.seek(0)
        back = Tokenizer.from_state_dict(torch.load(buf, weights_only=True)["tokenizer"])
        assert back.joint == tok.joint
        assert (back.src_vocab_size, back.tgt_vocab_size) == (
            tok.src_vocab_size,
            tok.tgt_vocab_size,
        )
        assert back.encode_src(toy_texts[0][:100]) == tok.encode_src(toy_texts[0][:100])
        assert back.encode_tgt(toy_texts[1][:100]) == tok.encode_tgt(toy_texts[1][:100])
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode_tgt(toy_texts[1][:100]) == tok.encode_tgt(toy_texts[1][:100])


def test_second_call_loads_from_cache(toy_texts, tmp_path):
    logs: list[str] = []
    tok1 = train_tokenizer(CFG, *toy_texts, tmp_path, log=logs.append)
    (model,) = (tmp_path / "spm").glob("*.model")
    mtime = model.stat().st_mtime_ns
    assert any("training" in m for m in logs)

    logs.clear()
    tok2 = train_tokenizer(CFG, *toy_texts, tmp_path, log=logs.append)
    assert any("loaded cached" in m for m in logs) and not any("training" in m for m in logs)
    assert model.stat().st_mtime_ns == mtime
    assert tok2.state_dict() == tok1.state_dict()
    assert not list((tmp_path / "spm").glob("*.tmp"))  # atomic write left nothing behind

    # other options or other text -> another cache entry
    train_tokenizer(replace(CFG, vocab_size=90), *toy_texts, tmp_path, log=lambda m: None)
    train_tokenizer(CFG, toy_texts[0][:-1], toy_texts[1][:-1], tmp_path, log=lambda m: None)
    assert len(list((tmp_path / "spm").glob("*.model"))) == 3


def test_input_sentence_size_samples_training_text(toy_texts, tmp_path):
    cfg = replace(CFG, input_sentence_size=200, model_type="bpe")
    tok = train_tokenizer(cfg, *toy_texts, tmp_path, log=lambda m: None)
    assert tok.decode_tgt(tok.encode_tgt(toy_texts[1][:20])) == toy_texts[1][:20]
    with pytest.raises(DataError, match="input_sentence_size"):
        train_tokenizer(replace(cfg, input_sentence_size=50), *toy_texts, tmp_path, log=print)


def test_training_failure_is_a_data_error(toy_texts, tmp_path):
    with pytest.raises(DataError, match="SentencePiece training failed.*vocab_size"):
        train_tokenizer(replace(CFG, vocab_size=10), *toy_texts, tmp_path, log=lambda m: None)


def test_model_with_other_special_ids_is_rejected(joint_tok):
    proto = joint_tok.state_dict()["src_model"]
    with pytest.raises(DataError, match="special ids"):
        Tokenizer(proto, None, pad_id=1, unk_id=0, bos_id=2, eos_id=3)


@pytest.mark.parametrize("train_on", ["words", "sentences"])
def test_large_samples_train_in_a_child_process_with_the_same_result(monkeypatch, train_on):
    """Above CHILD_PROCESS_SENTENCES SentencePiece runs in a spawned child (its memory then goes
    back to the system): the model is byte-identical, and its errors are still one-line DataErrors."""
    import random

    import mt.tokenizer as tokenizer_mod
    from mt.config import TokenizerConfig
    from mt.errors import DataError

    rng = random.Random(0)
    words = ["hund", "katze", "baum", "haus", "auto", "rot", "blau", "gross", "klein", "und"]
    texts = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(3000)]
    cfg = TokenizerConfig(vocab_size=40, input_sentence_size=0, train_on=train_on)
    here = tokenizer_mod._spm_train(cfg, texts)
    children = []
    real = tokenizer_mod._train_in_a_child
    monkeypatch.setattr(tokenizer_mod, "_train_in_a_child", lambda *a: children.append(1) or real(*a))
    monkeypatch.setattr(tokenizer_mod, "CHILD_PROCESS_SENTENCES", 100)
    assert tokenizer_mod._spm_train(cfg, texts) == here and children == [1]
    with pytest.raises(DataError, match="SentencePiece training failed .*Vocabulary size is smaller") as e:
        tokenizer_mod._spm_train(replace(cfg, vocab_size=5), texts)
    assert "\n" not in str(e.value) and children == [1, 1]


def test_text_chunks_give_the_digest_and_model_a_list_gives(monkeypatch, tmp_path):
    """Sentences handed over in chunks of any size (as data.py reads them from Arrow) hash like the
    same sentences in one list, with the digest cached models were stored under, and train the same
    model; above CHILD_PROCESS_SENTENCES the child gets a file, the parent keeps no list."""
    import hashlib
    import random

    import mt.tokenizer as tokenizer_mod
    from mt.config import TokenizerConfig
    from mt.tokenizer import TextChunks

    rng = random.Random(1)
    words = ["hund", "katze", "baum", "haus", "auto", "rot", "blau", "gross", "klein", "und", "größer"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 7))) for _ in range(150_000)]
    texts[5] = "zwei\nzeilen"

    def chunked(sizes):
        def chunks():
            at, k = 0, 0
            while at < len(texts):
                yield texts[at : at + sizes[k % len(sizes)]]
                at, k = at + sizes[k % len(sizes)], k + 1

        return TextChunks(len(texts), chunks)

    want = hashlib.sha256(str(len(texts)).encode())  # the digest as it has always been computed
    for start in range(0, len(texts), 65536):
        want.update(b"\0" + "\0".join(texts[start : start + 65536]).encode("utf-8", "surrogatepass"))
    for sizes in ([65536], [1000], [70000, 3], [150_000]):
        assert tokenizer_mod._text_digest(chunked(sizes)) == want.hexdigest(), sizes
    assert tokenizer_mod._text_digest(TextChunks.of(texts)) == want.hexdigest()
    for kind in (pa.string(), pa.large_string()):  # Arrow arrays, hashed from their buffers
        column = pa.chunked_array([pa.array(texts[:70_001], kind), pa.array(texts[70_001:], kind)])
        arrow = TextChunks(
            len(texts), lambda c=column: (c.slice(i, 999).combine_chunks() for i in range(0, len(texts), 999))
        )
        assert tokenizer_mod._text_digest(arrow) == want.hexdigest(), kind
        assert list(arrow) == texts
    half = len(texts) // 2
    assert tokenizer_mod._text_digest(TextChunks.of(texts[:half]) + TextChunks.of(texts[half:])) == want.hexdigest()
    with pytest.raises(ValueError, match="hold 150000 strings, not 150001"):
        tokenizer_mod._text_digest(TextChunks(len(texts) + 1, chunked([1000])._chunks))

    cfg = TokenizerConfig(vocab_size=40, input_sentence_size=0)
    here = tokenizer_mod._spm_train(cfg, texts[:3000])
    files = []
    real = tokenizer_mod._train_in_a_child
    monkeypatch.setattr(
        tokenizer_mod,
        "_train_in_a_child",
        lambda opts, seed, path, *a: files.append(path) or real(opts, seed, path, *a),
    )
    monkeypatch.setattr(tokenizer_mod, "CHILD_PROCESS_SENTENCES", 100)
    small = TextChunks(3000, lambda: (texts[i : min(i + 7, 3000)] for i in range(0, 3000, 7)))
    assert tokenizer_mod._spm_train(cfg, small) == here and len(files) == 1 and isinstance(files[0], str)

    class Died:
        returncode, stderr = -9, ""

    monkeypatch.setattr(tokenizer_mod.subprocess, "run", lambda *a, **kw: Died())
    with pytest.raises(
        DataError, match=r"child process failed \(exit status -9, killed: out of memory\?\); lower"
    ) as e:
        tokenizer_mod._spm_train(cfg, small)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------- learning from word counts
def test_seed_pieces_are_the_texts_substrings_counted_within_words(monkeypatch):
    """_seed_pieces from word counts equals the definition worked out on the written-out text:
    every substring of 2..16 characters inside a normalized word, as often as the text holds it,
    kept from 2 occurrences on; with a limit, the highest count x length."""
    import collections

    import sentencepiece as spm

    import mt.tokenizer as tokenizer_mod
    from mt.tokenizer import _seed_pieces, _word_counts

    # "ﬁ": NFKC makes it "fi"; a zero-width space stays inside a word and normalizes to a space
    sentences = ["abab  ab", "abab x\tx", "ﬁne x abcdefghijklmnopqrs", "x x cd\u200bab", "cdab"]
    words = _word_counts(sentences)
    assert words == {"abab": 2, "ab": 1, "x": 5, "ﬁne": 1, "abcdefghijklmnopqrs": 1, "cd\u200bab": 1, "cdab": 1}
    text = spm.SentencePieceNormalizer(rule_name="nmt_nfkc").normalize(" ".join(sentences))
    want: collections.Counter[str] = collections.Counter()
    for word in text.split("\u2581")[1:]:
        w = "\u2581" + word
        want.update(w[i:j] for i in range(len(w)) for j in range(i + 2, min(len(w), i + 16) + 1))
    want = {p: n for p, n in want.items() if n >= 2}
    ranked = sorted(want.items(), key=lambda pn: (pn[1] * len(pn[0]), pn[0]), reverse=True)  # ties: by piece
    assert _seed_pieces(words) == ranked  # best first: SentencePiece reads the file's first N
    got = dict(ranked)
    assert got["ab"] == 8 and got["\u2581x"] == 5 and got["\u2581cd"] == 2 and "\u2581fine" not in got
    assert "d\u2581a" not in got and not any(len(p) > 16 for p in got)
    assert _seed_pieces(words, limit=3) == ranked[:3]
    monkeypatch.setattr(tokenizer_mod, "_WORDS_PER_PASS", 2)  # four passes over the character pairs
    assert _seed_pieces(words) == ranked


def test_words_mode_learns_from_word_counts_alone(tmp_path):
    """train_on=words: the same words in other sentences give the same model byte for byte (only
    their counts count); train_on=sentences trains SentencePiece on the sentences and is cached
    apart."""
    import random

    from mt.tokenizer import _spm_train

    rng = random.Random(3)
    vocab = ["hund", "hunde", "katze", "katzen", "haus", "häuser", "baum", "bäume", "und", "oder", "rot", "rote"]
    words = [rng.choice(vocab) for _ in range(6000)]
    as_sentences = [" ".join(words[i : i + 6]) for i in range(0, len(words), 6)]
    regrouped = [" ".join(words[i : i + 4]) for i in range(0, len(words), 4)][::-1]
    cfg = TokenizerConfig(vocab_size=60, input_sentence_size=0)
    model = _spm_train(cfg, as_sentences)
    assert _spm_train(cfg, regrouped) == model
    assert _spm_train(replace(cfg, train_on="sentences"), as_sentences) != model
    train_tokenizer(cfg, as_sentences, as_sentences, tmp_path, log=lambda m: None)
    tok = train_tokenizer(replace(cfg, train_on="sentences"), as_sentences, as_sentences, tmp_path, log=lambda m: None)
    assert len(list((tmp_path / "spm").glob("*.model"))) == 2
    assert tok.decode_src(tok.encode_src(as_sentences[:5])) == as_sentences[:5]


def test_words_mode_samples_input_sentence_size_sentences(toy_texts, monkeypatch):
    """With more sentences than input_sentence_size, the word counts come from a seeded sample of
    that many: the model is the one trained on exactly those sentences, whether they come as one
    list or in chunks, in this process or (through its file) in a child."""
    import mt.tokenizer as tokenizer_mod
    from mt.tokenizer import TextChunks, _spm_train, sample_rows

    texts = toy_texts[0] + toy_texts[1]
    cfg = replace(CFG, input_sentence_size=300)
    rows = sample_rows(len(texts), 300, cfg.seed)
    assert len(set(rows.tolist())) == 300 and (rows == sample_rows(len(texts), 300, cfg.seed)).all()
    assert list(rows) == sorted(rows)
    sample = [texts[i] for i in rows]
    model = _spm_train(replace(cfg, input_sentence_size=0), sample)
    assert _spm_train(cfg, texts) == model
    chunked = TextChunks(len(texts), lambda: (texts[i : i + 7] for i in range(0, len(texts), 7)))
    assert _spm_train(cfg, chunked) == model
    monkeypatch.setattr(tokenizer_mod, "CHILD_PROCESS_SENTENCES", 100)
    assert _spm_train(cfg, chunked) == model
    assert sample_rows(len(texts), 0, 1) is None and sample_rows(len(texts), len(texts), 1) is None


def test_words_mode_trains_from_the_counted_seeds(toy_texts, monkeypatch):
    """The unigram model grows from _seed_pieces (without them it is another model), and the
    seed file's temporary path is not left in the model's recorded options."""
    import mt.tokenizer as tokenizer_mod
    from mt.tokenizer import _spm_train

    texts = toy_texts[0] + toy_texts[1]
    model = _spm_train(CFG, texts)
    assert b"seeds.tsv" not in model and b"mt-spm-" not in model
    monkeypatch.setattr(tokenizer_mod, "_seed_pieces", lambda words: [])
    assert _spm_train(CFG, texts) != model


def test_unknown_train_on_is_a_one_line_error(toy_texts, tmp_path):
    with pytest.raises(DataError, match=r"^tokenizer.train_on='chars': use words or sentences$"):
        train_tokenizer(replace(CFG, train_on="chars"), *toy_texts, tmp_path, log=lambda m: None)
