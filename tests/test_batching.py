"""Token-bucket sampler, collate and the DataLoader built on them."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from mt.batching import Batch, PairDataset, TokenBucketSampler, collate, make_loader

PAD, BOS, EOS = 0, 2, 3


def _lens(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 40, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 0, None)
    return src, tgt


def _epoch(sampler: TokenBucketSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


# ------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_once_per_epoch(shuffle):
    src, tgt = _lens()
    sampler = TokenBucketSampler(src, tgt, max_tokens=300, max_sentences=64, shuffle=shuffle)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(src)))
        assert len(batches) == len(sampler)


def test_token_budget_and_sentence_cap_are_respected():
    src, tgt = _lens()
    src[7], tgt[7] = 500, 3  # longer than the budget on its own
    max_tokens, max_sentences = 256, 16
    batches = _epoch(TokenBucketSampler(src, tgt, max_tokens, max_sentences, seed=3))
    assert [7] in batches
    for b in batches:
        assert len(b) <= max_sentences
        cost = len(b) * max(max(src[i] + 1 for i in b), max(tgt[i] + 1 for i in b))
        assert cost <= max_tokens or len(b) == 1
    # packing is tight: bucketing by length should make the batches reasonably full
    assert len(batches) < 1.5 * (sum(max(s, t) + 1 for s, t in zip(src, tgt)) / max_tokens) + 10


def test_sentence_cap_binds_for_short_sentences():
    src = tgt = np.ones(100, dtype=int)
    batches = _epoch(TokenBucketSampler(src, tgt, max_tokens=10_000, max_sentences=8))
    assert sorted(len(b) for b in batches) == [4] + [8] * 12


def test_batches_group_similar_lengths():
    src, tgt = _lens()
    batches = _epoch(TokenBucketSampler(src, tgt, max_tokens=400, max_sentences=64))
    padded = sum(len(b) * max(tgt[i] + 1 for i in b) for b in batches)
    real = sum(tgt[i] + 1 for b in batches for i in b)
    assert padded / real < 1.1  # little target padding thanks to length bucketing


def test_deterministic_per_seed_and_epoch():
    src, tgt = _lens()

    def make(seed):
        return TokenBucketSampler(src, tgt, max_tokens=300, max_sentences=64, seed=seed)

    assert _epoch(make(1), 0) == _epoch(make(1), 0)
    assert _epoch(make(1), 5) == _epoch(make(1), 5)
    assert _epoch(make(1), 0) != _epoch(make(1), 1)
    assert _epoch(make(1), 0) != _epoch(make(2), 0)
    s = make(1)
    assert _epoch(s, 2) == _epoch(s, 2)  # re-iterating an epoch gives the same batches


def test_no_shuffle_is_sorted_by_length():
    src, tgt = _lens()
    batches = _epoch(TokenBucketSampler(src, tgt, 300, 64, shuffle=False), 0)
    flat = [i for b in batches for i in b]
    keys = [(tgt[i], src[i]) for i in flat]
    assert keys == sorted(keys)
    assert batches == _epoch(TokenBucketSampler(src, tgt, 300, 64, shuffle=False), 4)


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_are_disjoint_and_equal_length(replicas):
    src, tgt = _lens(997)
    samplers = [TokenBucketSampler(src, tgt, 300, 64, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        lengths = {len(b) for b in per_rank}
        assert lengths == {len(samplers[0])}
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen))  # disjoint
        full = _epoch(TokenBucketSampler(src, tgt, 300, 64, seed=5), epoch)
        assert len(full) - replicas < lengths.pop() * replicas <= len(full)


def test_drop_last_drops_the_leftover_batch():
    src, tgt = _lens()
    a = _epoch(TokenBucketSampler(src, tgt, 300, 64, shuffle=False))
    b = _epoch(TokenBucketSampler(src, tgt, 300, 64, shuffle=False, drop_last=True))
    assert b == a[:-1]


# ------------------------------------------------------------------------------------ collate
def test_collate_shapes_padding_bos_eos():
    examples = [
        {"src_ids": [10, 11, 12], "tgt_ids": [20, 21], "idx": 7},
        {"src_ids": [13], "tgt_ids": [22, 23, 24, 25], "idx": 2},
        {"src_ids": np.array([14, 15], dtype=np.int32), "tgt_ids": [], "idx": 0},
    ]
    b = collate(examples, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    assert isinstance(b, Batch) and b.batch_size == 3
    assert b.src.tolist() == [[10, 11, 12, EOS], [13, EOS, PAD, PAD], [14, 15, EOS, PAD]]
    assert b.src_len.tolist() == [4, 2, 3]
    assert b.tgt_in.tolist() == [
        [BOS, 20, 21, PAD, PAD],
        [BOS, 22, 23, 24, 25],
        [BOS, PAD, PAD, PAD, PAD],
    ]
    assert b.tgt_out.tolist() == [
        [20, 21, EOS, PAD, PAD],
        [22, 23, 24, 25, EOS],
        [EOS, PAD, PAD, PAD, PAD],
    ]
    assert b.ntokens == 3 + 5 + 1 == int((b.tgt_out != PAD).sum())
    assert b.indices.tolist() == [7, 2, 0]
    for t in (b.src, b.src_len, b.tgt_in, b.tgt_out, b.indices):
        assert t.dtype == torch.long
    moved = b.to("cpu")
    assert torch.equal(moved.tgt_out, b.tgt_out) and moved.ntokens == b.ntokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs an accelerator")
def test_batch_pin_memory():
    b = collate([{"src_ids": [5], "tgt_ids": [6], "idx": 0}], PAD, BOS, EOS).pin_memory()
    assert b.src.is_pinned() and b.tgt_out.is_pinned()


# ----------------------------------------------------------------------------- dataset/loader
class _Tok:
    pad_id, unk_id, bos_id, eos_id = PAD, 1, BOS, EOS


def _tokenized(n: int = 300) -> datasets.Dataset:
    rng = np.random.default_rng(1)
    src = [rng.integers(4, 50, rng.integers(1, 12)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, 50, rng.integers(0, 12)).tolist() for _ in range(n)]
    feats = datasets.Features(
        {
            "src_ids": datasets.List(datasets.Value("int32")),
            "tgt_ids": datasets.List(datasets.Value("int32")),
        }
    )
    return datasets.Dataset.from_dict({"src_ids": src, "tgt_ids": tgt}, features=feats)


def test_iter_columns_applies_every_kind_of_index_mapping_in_one_take_per_chunk(tmp_path, monkeypatch):
    """iter_columns gives the rows `datasets` gives, in its order, for splits filtered, selected
    (unsorted, repeated), shuffled, sharded and memory-mapped over several record batches, without
    `datasets`' gather of one row at a time."""
    from datasets.table import Table

    from mt.batching import _own_map, iter_columns

    base = datasets.concatenate_datasets([_tokenized(500), _tokenized(700)])
    base.save_to_disk(tmp_path / "split", max_shard_size="20KB")
    mapped = datasets.load_from_disk(str(tmp_path / "split"))
    rng = np.random.default_rng(0)
    cases = {
        "flat": base,
        "filtered": base.filter(lambda r: len(r["tgt_ids"]) % 3 != 0),
        "selected": base.select(rng.permutation(len(base))[:400]),
        "filtered then selected": base.filter(lambda r: len(r["src_ids"]) > 2).select([7, 1, 1, 300, 0]),
        "shuffled": base.shuffle(seed=1),
        "sharded": base.shard(3, 1),
        "memory-mapped, filtered": mapped.filter(lambda r: len(r["tgt_ids"]) % 2 == 0),
    }
    want = {name: ds.with_format("arrow")[:].select(["tgt_ids", "src_ids"]) for name, ds in cases.items()}
    # a split in several Arrow files is read through memory maps of the pass's own
    assert len(mapped.cache_files) > 1 and _own_map(cases["memory-mapped, filtered"], mapped.data.table) is not None
    assert _own_map(base, base.data.table) is None  # in memory: nothing to map

    def one_row_at_a_time(*args, **kw):
        raise AssertionError("datasets' row-by-row gather was used")

    monkeypatch.setattr(Table, "fast_gather", one_row_at_a_time)
    for name, ds in cases.items():
        chunks = list(iter_columns(ds, ["tgt_ids", "src_ids"], rows=97))
        assert all(t.num_rows <= 97 for t in chunks) and len(chunks) == -(-len(ds) // 97), name
        assert pa.concat_tables(chunks).equals(want[name]), name


def test_pair_dataset_matches_rows_after_filtering():
    ds = _tokenized().filter(lambda r: len(r["tgt_ids"]) % 2 == 0)  # indices mapping
    pd = PairDataset(ds)
    assert len(pd) == len(ds)
    for i in (0, 5, len(ds) - 1):
        item = pd[i]
        assert item["idx"] == i
        assert item["src_ids"].tolist() == ds[i]["src_ids"]
        assert item["tgt_ids"].tolist() == ds[i]["tgt_ids"]
    assert pd.src_lens.tolist() == [len(x) for x in ds["src_ids"]]


def test_pair_dataset_batch_is_collate_of_its_rows():
    """The loader's vectorized padding gives exactly what collate gives, empty sides included."""
    base = _tokenized(200)
    extra = datasets.Dataset.from_dict({"src_ids": [[], [7], []], "tgt_ids": [[8, 9], [], []]}, features=base.features)
    ds = datasets.concatenate_datasets([base, extra]).filter(lambda r: len(r["src_ids"]) != 3)
    pd = PairDataset(ds)
    rng = np.random.default_rng(0)
    for rows in ([0], [len(pd) - 1, len(pd) - 2, len(pd) - 3], list(rng.permutation(len(pd))[:40]), [-1, 3, 3]):
        got = pd.batch(rows, PAD, BOS, EOS)
        want = collate([pd[i] for i in rows], PAD, BOS, EOS)
        for name in ("src", "src_len", "tgt_in", "tgt_out"):
            assert getattr(got, name).dtype == torch.long, name
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.ntokens == want.ntokens
        assert got.indices.tolist() == [i % len(pd) for i in rows]
    with pytest.raises(ValueError, match="non-empty"):
        pd.batch([], PAD, BOS, EOS)
    for bad in ([len(pd)], [0, -len(pd) - 1]):
        with pytest.raises(IndexError, match="out of range"):
            pd.batch(bad, PAD, BOS, EOS)


def test_loader_covers_the_split_and_indices_point_back():
    ds = _tokenized()
    loader = make_loader(ds, _Tok(), max_tokens=120, max_sentences=32, shuffle=True, seed=0)
    seen = []
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        seen = []
        for b in loader:
            assert b.src.shape[0] * max(b.src.shape[1], b.tgt_in.shape[1]) <= 120 or b.batch_size == 1
            for row, i in enumerate(b.indices.tolist()):
                ids = ds[i]["tgt_ids"]
                assert b.tgt_out[row, : len(ids)].tolist() == ids
                assert b.tgt_out[row, len(ids)].item() == EOS
                assert b.src[row, : b.src_len[row] - 1].tolist() == ds[i]["src_ids"]
            seen += b.indices.tolist()
        assert sorted(seen) == list(range(len(ds)))
    assert len(loader) == len(loader.batch_sampler)


def test_set_epoch_start_skips_this_ranks_first_batches():
    lens = np.random.default_rng(0).integers(1, 30, size=300)
    full = TokenBucketSampler(lens, lens, max_tokens=200, max_sentences=16, seed=3, num_replicas=2, rank=1)
    full.set_epoch(4)
    resumed = TokenBucketSampler(lens, lens, max_tokens=200, max_sentences=16, seed=3, num_replicas=2, rank=1)
    resumed.set_epoch(4, start=5)
    assert list(resumed) == list(full)[5:] and len(list(full)) > 5


def test_pair_dataset_memory_maps_a_split_in_arrow_files(tmp_path, monkeypatch):
    """A split in Arrow cache files is read through flat token files written beside it (uint16 where
    the ids fit), memory-mapped, giving the rows and batches the in-memory path gives; a write that
    dies midway leaves nothing to reuse."""
    import mt.batching as batching

    base = _tokenized(300)
    base.save_to_disk(tmp_path / "split")
    on_disk = datasets.load_from_disk(str(tmp_path / "split")).filter(lambda r: len(r["tgt_ids"]) % 2 == 0)
    in_memory = base.filter(lambda r: len(r["tgt_ids"]) % 2 == 0, keep_in_memory=True)
    assert on_disk.cache_files and not in_memory.cache_files

    real = batching.iter_columns
    monkeypatch.setattr(batching, "iter_columns", lambda ds, cols, rows=100_000: real(ds, cols, rows=64))

    def dies(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(batching.np.lib.format, "open_memmap", dies)
    with pytest.raises(KeyboardInterrupt):
        PairDataset(on_disk, max_id=1000)
    assert not list(Path(on_disk.cache_files[0]["filename"]).parent.glob("mt-tokens-*"))
    monkeypatch.undo()
    monkeypatch.setattr(batching, "iter_columns", lambda ds, cols, rows=100_000: real(ds, cols, rows=64))

    mapped, held = PairDataset(on_disk, max_id=1000), PairDataset(in_memory, max_id=1000)
    (folder,) = Path(on_disk.cache_files[0]["filename"]).parent.glob("mt-tokens-*")
    assert folder.name.endswith("uint16") and isinstance(mapped._src, np.memmap) and mapped._src.dtype == np.uint16
    assert np.array_equal(mapped.src_lens, held.src_lens) and np.array_equal(mapped.tgt_lens, held.tgt_lens)
    rows = np.random.default_rng(1).permutation(len(held))[:50]
    got, want = mapped.batch(rows, PAD, BOS, EOS), held.batch(rows, PAD, BOS, EOS)
    for name in ("src", "src_len", "tgt_in", "tgt_out"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert PairDataset(on_disk, max_id=70_000)._src.dtype == np.int32  # ids past uint16
