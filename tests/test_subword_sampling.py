"""Subword regularization (mt/subword_sampling.py): sampled segmentations spell the same text,
are reproducible from (seed, epoch), respect the length limits, reach the batches through the
loader every epoch, and a resumed run trains on exactly what an unbroken one did."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import datasets
import numpy as np
import pytest
from conftest import train_toy

from mt.batching import PairDataset, ResegmentingSampler, make_loader
from mt.config import TokenizerConfig
from mt.errors import MTError
from mt.subword_sampling import EpochSegmentations, check_settings
from mt.tokenizer import train_tokenizer

CFG = TokenizerConfig(vocab_size=150, input_sentence_size=0)
NO_LIMITS = (0, 0, 0.0)


@pytest.fixture(scope="module")
def texts(tiny_corpus_dir):
    rows = [json.loads(line) for line in open(tiny_corpus_dir / "train.jsonl", encoding="utf-8")][:400]
    return [r["de"] for r in rows], [r["en"] for r in rows]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tok(request, texts, tmp_path_factory):
    cfg = replace(CFG, model_type=request.param)
    return train_tokenizer(cfg, *texts, tmp_path_factory.mktemp(request.param), log=lambda m: None)


def split_of(tok, src, tgt):
    """A tokenized split as mt.data makes it (text and best ids) and its PairDataset."""
    ds = datasets.Dataset.from_dict(
        {"src": src, "tgt": tgt, "src_ids": tok.encode_src(src), "tgt_ids": tok.encode_tgt(tgt)}
    )
    return ds, PairDataset(ds)


def rows_of(seg, side):
    values, off = getattr(seg, side), getattr(seg, f"{side}_off")
    return [values[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]


def test_a_sample_spells_the_sentence_and_follows_its_seed(tok, texts):
    src = texts[0][:200]
    alpha = 0.1  # unigram: a flat distribution over all segmentations; BPE: a tenth of the merges dropped
    a = tok.sample("src", src, alpha, -1, seed=7)
    assert a == tok.sample("src", src, alpha, -1, seed=7)
    assert a != tok.sample("src", src, alpha, -1, seed=8)
    assert a != tok.encode_src(src)
    assert tok.decode_src(a) == tok.decode_src(tok.encode_src(src))  # other pieces, the same text
    # sampled pieces are finer on average: the best segmentation is the most probable (or most merged)
    assert sum(map(len, a)) > sum(map(len, tok.encode_src(src)))
    with pytest.raises(TypeError):
        tok.sample("tgt", "one string", alpha, -1, seed=1)
    # one sentence, after other draws in the same thread: the seed still decides
    one = tok.sample("src", src[:1], alpha, -1, seed=7)
    tok.sample("src", src, alpha, -1, seed=9)
    assert tok.sample("src", src[:1], alpha, -1, seed=7) == one == a[:1]


def test_epochs_differ_and_a_fresh_sampler_repeats_them(tok, texts):
    ds, best = split_of(tok, *texts)
    segs = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=3, limits=NO_LIMITS, chunk_rows=150)
    e0, e1 = segs(0), segs(1)
    assert e0.epoch == 0 and e1.epoch == 1 and e0.kept_best == 0
    assert rows_of(e0, "src") != rows_of(e1, "src") and rows_of(e0, "tgt") != rows_of(e1, "tgt")
    assert 2 in segs._futures  # the epoch after the one asked for is under way
    # a resumed run (a fresh sampler, epoch 1 first) and another seed
    again = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=3, limits=NO_LIMITS, chunk_rows=150)
    other = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=4, limits=NO_LIMITS, chunk_rows=150)
    try:
        r1 = again(1)
        for side in ("src", "src_off", "tgt", "tgt_off"):
            np.testing.assert_array_equal(getattr(r1, side), getattr(e1, side))
        assert rows_of(other(1), "src") != rows_of(e1, "src")
    finally:
        for s in (segs, again, other):
            s.close()
    assert tok.decode_src(rows_of(e1, "src")) == tok.decode_src([best[i]["src_ids"] for i in range(len(best))])
    assert tok.decode_tgt(rows_of(e1, "tgt")) == tok.decode_tgt([best[i]["tgt_ids"] for i in range(len(best))])


def test_chunks_draw_from_their_own_seeds(tok):
    """The same sentence in every row: chunk k's rows must not repeat chunk 0's draws."""
    line = "ein kleiner hund läuft über eine große grüne wiese"
    ds, best = split_of(tok, [line] * 40, [line] * 40)
    seg = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=0, limits=NO_LIMITS, chunk_rows=10).sample(0)
    rows = rows_of(seg, "src")
    assert [rows[i] for i in range(10)] != [rows[i] for i in range(10, 20)]
    assert rows_of(seg, "src") != rows_of(seg, "tgt")  # the two sides draw apart too


@pytest.mark.parametrize("limit", ["length", "ratio"])
def test_a_sample_past_a_length_limit_keeps_the_best_segmentation(tok, texts, limit):
    src, tgt = texts[0][:300], texts[1][:300]
    ds, best = split_of(tok, src, tgt)
    longest = int(max(best.src_lens.max(), best.tgt_lens.max()))  # every best segmentation fits
    ratio = float(
        np.max(np.maximum(best.src_lens, best.tgt_lens) / np.maximum(1, np.minimum(best.src_lens, best.tgt_lens)))
    )
    limits = (longest, longest, 0.0) if limit == "length" else (0, 0, ratio)
    best_rows = {side: [best[i][f"{side}_ids"].tolist() for i in range(len(best))] for side in ("src", "tgt")}
    # several chunks, so a pair's place in its chunk and in the split differ
    segs = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=1, limits=limits, chunk_rows=64)
    free = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=1, limits=NO_LIMITS, chunk_rows=64).sample(1)
    # the loader puts each epoch's sample into the dataset: the fallback must not read it from there
    e0 = segs.sample(0)
    best.set_tokens(e0.src, e0.src_off, e0.tgt, e0.tgt_off)
    seg = segs.sample(1)
    pairs = list(zip(rows_of(free, "src"), rows_of(free, "tgt")))
    if limit == "length":
        too_long = [i for i, (s, t) in enumerate(pairs) if max(len(s), len(t)) > longest]
    else:
        too_long = [i for i, (s, t) in enumerate(pairs) if max(len(s), len(t)) / max(1, min(len(s), len(t))) > ratio]
    assert too_long and seg.kept_best == len(too_long) and max(too_long) >= 64
    got_src, got_tgt = rows_of(seg, "src"), rows_of(seg, "tgt")
    for i in range(len(src)):
        if i in too_long:
            assert got_src[i] == best_rows["src"][i] and got_tgt[i] == best_rows["tgt"][i]
        else:
            assert got_src[i] == rows_of(free, "src")[i]
        if limit == "length":
            assert len(got_src[i]) <= longest and len(got_tgt[i]) <= longest


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_batches_each_epochs_segmentation(tok, texts, workers):
    """Two ranks, each with its own sampler as under DDP; loader workers (made anew each epoch)
    must batch that epoch's sample, not the one they started with."""
    ds, _ = split_of(tok, *texts)
    made = []

    def segment(data):
        made.append(EpochSegmentations(tok, ds, data, alpha=0.1, nbest=-1, seed=5, limits=NO_LIMITS))
        return made[-1]

    loaders = [
        make_loader(
            ds, tok, 300, 64, shuffle=True, seed=5, num_replicas=2, rank=r, num_workers=workers, segment=segment
        )
        for r in (0, 1)
    ]
    assert len(made) == 2
    assert isinstance(loaders[0].batch_sampler, ResegmentingSampler)
    pad, eos = tok.pad_id, tok.eos_id
    seen = {}
    for epoch in (0, 1):
        rows = []
        for loader in loaders:
            loader.batch_sampler.set_epoch(epoch)
            seg = loader.batch_sampler.last
            assert seg.epoch == epoch
            want = rows_of(seg, "src")
            for batch in loader:
                assert batch.src.shape[0] * batch.src.shape[1] <= 300 or batch.src.shape[0] == 1
                for b, i in enumerate(batch.indices.tolist()):
                    ids = [t for t in batch.src[b].tolist() if t not in (pad, eos)]
                    assert ids == want[i]
                    rows.append(i)
        assert len(rows) == len(set(rows))  # the ranks' batches are disjoint
        assert len(rows) > 0.8 * len(ds)
        seen[epoch] = rows_of(loaders[0].batch_sampler.last, "src")
        assert seen[epoch] == rows_of(loaders[1].batch_sampler.last, "src")  # both ranks drew the same
    assert seen[0] != seen[1]
    for s in made:
        s.close()


@pytest.mark.parametrize("alpha, nbest", [(-0.1, -1), (0.1, 0), (0.1, 1), (float("nan"), -1), (float("inf"), -1)])
def test_bad_settings_get_one_line_errors(alpha, nbest):
    with pytest.raises(MTError, match="trainer.subword_"):
        check_settings(alpha, nbest)


@pytest.mark.parametrize("model_type", ["char", "word"])
def test_a_model_that_cannot_sample_is_refused(texts, tmp_path, model_type):
    other = train_tokenizer(replace(CFG, model_type=model_type, vocab_size=300), *texts, tmp_path, log=lambda m: None)
    assert other.model_type("src") == model_type
    with pytest.raises(MTError, match=f"needs a unigram or BPE tokenizer; the src model is {model_type}"):
        check_settings(0.1, -1, other)


def test_bpe_dropout_must_be_a_probability(tok):
    kind = tok.model_type("tgt")
    check_settings(0.5, -1, tok)
    if kind == "bpe":
        with pytest.raises(MTError, match="BPE-dropout's probability"):
            check_settings(1.0, -1, tok)
    else:
        check_settings(2.0, -1, tok)  # a unigram model: alpha > 1 sharpens the draw


def test_close_stops_sampling_and_nothing_is_queued_past_the_last_epoch(tok, texts):
    ds, best = split_of(tok, *texts)
    segs = EpochSegmentations(tok, ds, best, alpha=0.1, nbest=-1, seed=0, limits=NO_LIMITS, chunk_rows=50, epochs=2)
    segs(0)
    assert set(segs._futures) == {0, 1}
    segs(1)
    assert set(segs._futures) == {1}  # epoch 0 let go, epoch 2 never trained
    segs.close()
    with pytest.raises(Exception, match="closed while sampling epoch 3"):
        segs.sample(3)  # what a sampling under way meets at its next chunk


def test_off_needs_no_nbest():
    check_settings(0.0, 0)  # alpha 0: nbest is not read


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_same_samples(tiny_corpus_dir, tmp_path, caplog):
    """100 steps straight == 50, stop, resume to 100 (mid-epoch 1): the same per-step losses and
    weights; and the samples are what it trained on (its losses differ from the best segmentation's)."""
    import torch
    from test_train import scalars

    from mt.checkpoint import load_checkpoint

    common = ["trainer.eval_every=50", "trainer.log_every=1", "trainer.subword_alpha=0.2"]
    straight, split, plain = tmp_path / "straight", tmp_path / "split", tmp_path / "plain"
    with caplog.at_level(logging.INFO, logger="mt.train"):
        summary = train_toy(tiny_corpus_dir, tmp_path / "c", straight, "trainer.max_steps=100", *common)
    sampled = [r.getMessage() for r in caplog.records if "sampled segmentation" in r.getMessage()]
    assert summary["epoch"] >= 2  # (about 35 batches an epoch)
    assert [m.split(":")[0] for m in sampled] == [f"epoch {e}" for e in range(summary["epoch"] + 1)], sampled
    train_toy(tiny_corpus_dir, tmp_path / "c", split, "trainer.max_steps=50", *common)
    resumed = train_toy(tiny_corpus_dir, tmp_path / "c", split, "trainer.max_steps=100", "trainer.resume=true", *common)
    assert resumed["step"] == 100 and resumed["epoch"] >= 1
    a, b = scalars(straight)["train/loss"], scalars(split)["train/loss"]
    assert [a[s] for s in range(51, 101)] == [b[s] for s in range(51, 101)]
    sa = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(split / "checkpoints" / "last.pt")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    train_toy(tiny_corpus_dir, tmp_path / "c", plain, "trainer.max_steps=5", *common[:2])
    c = scalars(plain)["train/loss"]
    assert [a[s] for s in range(1, 6)] != [c[s] for s in range(1, 6)]
