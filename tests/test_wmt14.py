"""experiment=wmt14_en_de: the recipe composes to the model size its header and docs state, and its
data path trains on a corpus in the hub's schema (wmt/wmt14 rows are {"translation": {"de", "en"}})
with the recipe's own data and tokenizer settings, the model shrunk to seconds on a CPU."""

from __future__ import annotations

import json
import logging
import random

import torch
from conftest import REPO, TOY_LEXICON, toy_translate
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mt.config import TrainConfig, register_configs

PARAMS = 133_793_024  # Seq2Seq of the recipe's model config with a 32,000-piece vocabulary


def compose_train(overrides: list[str]) -> TrainConfig:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def test_recipe_composes_to_the_stated_model():
    from mt.graphs import ShapeBuckets
    from mt.model import Seq2Seq
    from mt.recipes import choose_recipe

    cfg = compose_train(["experiment=wmt14_en_de"])
    d, t, m, tr = cfg.data, cfg.tokenizer, cfg.model, cfg.trainer
    assert (d.path, d.name, d.src, d.tgt, d.max_src_len, d.max_tgt_len) == ("wmt/wmt14", "de-en", "en", "de", 128, 128)
    assert (t.joint, t.model_type, t.vocab_size, t.input_sentence_size) == (True, "unigram", 32000, 2_000_000)
    assert (m.emb_dim, m.hidden_dim, m.enc_layers, m.dec_layers) == (1024, 1024, 4, 4)
    assert m.bidirectional and m.input_feeding and m.attention == "general" and 0.2 <= m.dropout <= 0.3
    assert (tr.device, tr.precision, tr.cuda_graphs, tr.max_tokens) == ("cuda", "bf16", "auto", 16384)
    assert tr.max_steps == 100_000 and 0 < tr.eval_every < tr.max_steps and tr.patience == 0
    assert cfg.optim.scheduler == "cosine" and 0 < cfg.optim.warmup_steps < tr.max_steps
    assert cfg.decoding.beam == 5
    assert choose_recipe(cfg, ["experiment=wmt14_en_de"]) is None  # a chosen recipe is trained as composed

    # CUDA-graph buckets: the longest reaches exactly the longest training batch (128 + EOS/BOS),
    # and every bucket keeps to the token budget and the sentence cap
    longest = max(d.max_src_len, d.max_tgt_len) + 1
    assert tr.graph_lengths == sorted(tr.graph_lengths) and tr.graph_lengths[-1] == longest
    buckets = ShapeBuckets.from_budget(tr.max_tokens, tr.max_sentences, longest, lengths=tr.graph_lengths)
    prev = 0
    for b, L, L2 in sorted(buckets.shapes, key=lambda s: s[1]):
        assert L == L2 and b <= tr.max_sentences and b * (prev + 1) <= tr.max_tokens
        prev = L

    with torch.device("meta"):  # the parameter count, without allocating 0.5 GB
        model = Seq2Seq(m, t.vocab_size, t.vocab_size, t.pad_id)
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    stated = f"{PARAMS:,}"  # the count the recipe's header and the docs give
    assert stated in (REPO / "conf" / "experiment" / "wmt14_en_de.yaml").read_text()
    assert stated in (REPO / "docs" / "training.md").read_text()


def _nested_corpus(folder, n_train: int, n_valid: int, seed: int = 0) -> int:
    """train/validation/test jsonl in wmt/wmt14's schema: {"translation": {"de": .., "en": ..}}.
    Besides the short toy pairs, training has one pair of 110 words a side (kept: the recipe allows
    128 tokens, Multi30k's data config 100) and one of 200 (dropped). -> the number of training rows"""
    rng = random.Random(seed)
    words = sorted(TOY_LEXICON)

    def row(n_words: int) -> dict:
        de = " ".join(rng.choice(words) for _ in range(n_words))
        return {"translation": {"de": de, "en": toy_translate(de)}}

    folder.mkdir()
    splits = {
        "train": [row(rng.randint(3, 8)) for _ in range(n_train)] + [row(110), row(200)],
        "validation": [row(rng.randint(3, 8)) for _ in range(n_valid)],
        "test": [row(rng.randint(3, 8)) for _ in range(n_valid)],
    }
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return len(splits["train"])


def test_recipe_trains_on_the_hub_schema(tmp_path, caplog):
    from mt.train import train
    from mt.translator import Translator

    n_train = _nested_corpus(tmp_path / "wmt14", n_train=300, n_valid=16)
    cfg = compose_train(
        [
            "experiment=wmt14_en_de",
            f"data.path={tmp_path / 'wmt14'}",
            "data.name=null",
            "data.num_proc=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            "tokenizer.vocab_size=150",
            "model.emb_dim=32",
            "model.hidden_dim=32",
            "model.enc_layers=1",
            "model.dec_layers=1",
            "optim.warmup_steps=5",
            "trainer.device=cpu",
            "trainer.precision=fp32",
            "trainer.cuda_graphs=false",
            "trainer.num_threads=1",
            "trainer.max_steps=20",
            "trainer.eval_every=20",
            "trainer.max_tokens=1024",
            "trainer.max_sentences=64",
            "trainer.valid_batch_size=16",
            "trainer.progress=false",
            "trainer.attention_images=false",
        ]
    )
    # the recipe's data and tokenizer settings, untouched by the overrides
    assert (cfg.data.src, cfg.data.tgt, cfg.data.max_src_len, cfg.data.max_len_ratio) == ("en", "de", 128, 2.0)
    assert cfg.tokenizer.joint and cfg.tokenizer.input_sentence_size == 2_000_000
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="mt.train"):
            summary = train(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    assert summary["step"] == 20 and summary["last"]["bleu"] >= 0

    data_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: en->de from ")]
    assert data_lines, "no data summary logged"
    # the nested rows were read as en->de pairs; only the 200-word pair exceeded 128 tokens
    assert f"train {n_train - 1} pairs (of {n_train}; dropped 0 empty, 1 src > 128 tokens," in data_lines[0]

    tr = Translator.load(summary["best_path"], device="cpu")
    assert (tr.config.data.src, tr.config.data.tgt, tr.config.data.max_tgt_len) == ("en", "de", 128)
    assert tr.tokenizer.joint and tr.tokenizer.src_vocab_size == tr.tokenizer.tgt_vocab_size <= 150
    assert (tr.config.model.enc_layers, tr.config.model.bidirectional, tr.config.decoding.beam) == (1, True, 5)


def test_the_hub_schema_is_read_en_to_de(tmp_path):
    from mt.data import load_splits

    _nested_corpus(tmp_path / "wmt14", n_train=3, n_valid=2)
    cfg = compose_train(
        ["experiment=wmt14_en_de", f"data.path={tmp_path / 'wmt14'}", "data.name=null", "data.num_proc=null"]
    )
    splits = load_splits(cfg.data)
    for split in ("train", "validation", "test"):
        lines = (tmp_path / "wmt14" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(ln)["translation"] for ln in lines]
        assert [(r["src"], r["tgt"]) for r in splits[split]] == [(r["en"], r["de"]) for r in rows], split
