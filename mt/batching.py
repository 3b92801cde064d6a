"""Token-budget batching: a bucketed batch sampler, padded batches, and the DataLoader around them.

`TokenBucketSampler` sorts examples by length and packs neighbours into batches whose padded size
(sentences x longest side, counting the eos/bos each side gets) stays within ``max_tokens``, so
every batch costs about the same and wastes little on padding. The ORDER of the batches is
shuffled every epoch (deterministically from (seed, epoch)); under DDP every rank builds the same
list and takes every ``num_replicas``-th batch, truncated so all ranks step the same number of
times.

`collate` turns examples into a `Batch` (the loader gets the same from `PairDataset.batch`, which
pads a whole batch with a few numpy operations instead of a loop over sentences, so building
batches stays off the training step's critical path; docs/benchmarks.md, "Host-side costs")::

    src     (B, S)  source pieces + [eos], right-padded with pad_id
    src_len (B,)    true source lengths (eos included)
    tgt_in  (B, T)  [bos] + target pieces (decoder input, teacher forcing)
    tgt_out (B, T)  target pieces + [eos] (what the decoder must predict), pad_id elsewhere
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "TokenBucketSampler",
    "ResegmentingSampler",
    "Batch",
    "collate",
    "PairDataset",
    "make_loader",
    "iter_columns",
]


class TokenBucketSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose padded batch fits a token budget.

    A batch of n examples costs ``n * max(longest src + 1, longest tgt + 1)`` tokens; it must
    stay <= ``max_tokens`` and n <= ``max_sentences`` (an example longer than max_tokens on its
    own becomes a batch of one). ``drop_last`` drops the batch left over at the end of packing
    (the longest sentences, usually under-filled) when there is more than one batch.
    """

    def __init__(
        self,
        src_lens: Sequence[int] | np.ndarray,
        tgt_lens: Sequence[int] | np.ndarray,
        max_tokens: int,
        max_sentences: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.src_lens = np.asarray(src_lens, dtype=np.int64) + 1  # + eos
        self.tgt_lens = np.asarray(tgt_lens, dtype=np.int64) + 1  # + bos / eos
        if self.src_lens.shape != self.tgt_lens.shape or self.src_lens.ndim != 1:
            raise ValueError("src_lens and tgt_lens must be 1-D and of the same length")
        if max_tokens < 1 or max_sentences < 1:
            raise ValueError("max_tokens and max_sentences must be positive")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.max_tokens = int(max_tokens)
        self.max_sentences = int(max_sentences)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self._cache: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's shuffle; `start` skips this rank's first batches (resuming mid-epoch)."""
        self.epoch = int(epoch)
        self.start = int(start)

    def set_lengths(self, src_lens: Sequence[int] | np.ndarray, tgt_lens: Sequence[int] | np.ndarray) -> None:
        """New example lengths (the same examples, segmented anew): batches are packed again."""
        src, tgt = np.asarray(src_lens, dtype=np.int64) + 1, np.asarray(tgt_lens, dtype=np.int64) + 1
        if src.shape != self.src_lens.shape or tgt.shape != self.tgt_lens.shape:
            raise ValueError(f"set_lengths needs {len(self.src_lens)} lengths a side")
        self.src_lens, self.tgt_lens = src, tgt
        self._cache = None

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _pack(self, order: np.ndarray) -> np.ndarray:
        """Batch boundaries over `order`: batch j is order[bounds[j] : bounds[j + 1]]. Bounds,
        not lists of indices, so a corpus of millions of pairs costs one array per epoch."""
        sizes = np.maximum(self.src_lens, self.tgt_lens)[order].tolist()  # small ints: no allocation each
        bounds = [0]
        n = longest = 0
        for k, size in enumerate(sizes):
            new_longest = max(longest, size)
            if n and ((n + 1) * new_longest > self.max_tokens or n >= self.max_sentences):
                bounds.append(k)
                n, new_longest = 0, size
            n += 1
            longest = new_longest
        if sizes:
            bounds.append(len(sizes))
        return np.asarray(bounds, dtype=np.int64)

    def _all_batches(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's batches (all ranks), in the order they will be consumed, as (order, starts,
        ends): batch j is order[starts[j] : ends[j]]."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.src_lens)
        rng = self._rng()
        tiebreak = rng.permutation(n) if self.shuffle else np.arange(n)
        order = np.lexsort((tiebreak, self.src_lens, self.tgt_lens))  # by tgt, then src
        bounds = self._pack(order)
        starts, ends = bounds[:-1], bounds[1:]
        if self.drop_last and len(starts) > 1:
            starts, ends = starts[:-1], ends[:-1]
        if self.shuffle:
            perm = rng.permutation(len(starts))
            starts, ends = starts[perm], ends[perm]
        if self.num_replicas > 1:
            usable = len(starts) // self.num_replicas * self.num_replicas
            starts, ends = starts[:usable], ends[:usable]
        self._cache = (self.epoch, (order, starts, ends))
        return order, starts, ends

    def __iter__(self) -> Iterator[list[int]]:
        order, starts, ends = self._all_batches()
        mine = slice(self.rank, None, self.num_replicas)
        for s, e in list(zip(starts[mine].tolist(), ends[mine].tolist()))[self.start :]:
            yield order[s:e].tolist()

    def __len__(self) -> int:
        return len(self._all_batches()[1]) // self.num_replicas


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) long, pieces + eos, right-padded
    src_len: torch.Tensor  # (B,) long, eos included
    tgt_in: torch.Tensor  # (B, T) long, bos + pieces
    tgt_out: torch.Tensor  # (B, T) long, pieces + eos
    ntokens: int  # non-pad target tokens (= (tgt_out != pad).sum())
    indices: torch.Tensor  # (B,) long, dataset row of each example

    @property
    def batch_size(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            mv(self.src), mv(self.src_len), mv(self.tgt_in), mv(self.tgt_out),
            self.ntokens, mv(self.indices),
        )  # fmt: skip

    def pin_memory(self) -> Batch:
        return Batch(
            self.src.pin_memory(), self.src_len.pin_memory(), self.tgt_in.pin_memory(),
            self.tgt_out.pin_memory(), self.ntokens, self.indices.pin_memory(),
        )  # fmt: skip


def _long(ids: Any) -> torch.Tensor:
    if isinstance(ids, np.ndarray):
        return torch.from_numpy(ids.astype(np.int64))  # copy: also fine for read-only arrays
    return torch.as_tensor(ids, dtype=torch.long)


def collate(examples: list[dict[str, Any]], pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """Pad a list of {"src_ids", "tgt_ids", "idx"} examples into a `Batch` (right padding)."""
    b = len(examples)
    src_lens = [len(e["src_ids"]) + 1 for e in examples]
    tgt_lens = [len(e["tgt_ids"]) + 1 for e in examples]
    s, t = max(src_lens), max(tgt_lens)
    src = torch.full((b, s), pad_id, dtype=torch.long)  # (B, S)
    tgt_in = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T)
    tgt_out = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T)
    for k, e in enumerate(examples):
        ls, lt = src_lens[k] - 1, tgt_lens[k] - 1
        if ls:
            src[k, :ls] = _long(e["src_ids"])
        src[k, ls] = eos_id
        tgt_in[k, 0] = bos_id
        if lt:
            ids = _long(e["tgt_ids"])
            tgt_in[k, 1 : lt + 1] = ids
            tgt_out[k, :lt] = ids
        tgt_out[k, lt] = eos_id
    return Batch(
        src=src,
        src_len=torch.tensor(src_lens, dtype=torch.long),  # (B,)
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        ntokens=int(sum(tgt_lens)),
        indices=torch.tensor([int(e["idx"]) for e in examples], dtype=torch.long),  # (B,)
    )


def _flat_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int> column: row i is values[offsets[i]:offsets[i + 1]]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.list_(pa.int32()))
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    # a writable copy (Arrow buffers are read-only; torch warns about wrapping those)
    values = np.array(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values, offsets


def _padded(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """(len(rows), width) int64, pad_id everywhere but row k's ids (values[offsets[rows[k]] :
    offsets[rows[k] + 1]]) at its start: one gather and one scatter for the batch."""
    start, lens = offsets[rows], offsets[rows + 1] - offsets[rows]  # (B,), (B,)
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    r = np.repeat(np.arange(len(rows)), lens)  # (N,) row of each id, N = lens.sum()
    c = np.arange(len(r)) - np.repeat(np.cumsum(lens) - lens, lens)  # (N,) its position in the row
    out[r, c] = values[np.repeat(start, lens) + c]
    return out


def _own_map(ds: Any, table: pa.Table) -> pa.Table | None:
    """The split's table read from its Arrow cache files through memory maps of this pass's own
    (None where they do not add up to `table`): the pages a pass reads leave the process's
    resident memory when the pass ends, not when the split is dropped."""
    try:
        from datasets.table import list_table_cache_files

        files = list_table_cache_files(ds.data)  # the rows' files, not an index mapping's
        parts = [pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in files]
    except (ImportError, AttributeError, OSError, pa.ArrowInvalid, TypeError):
        return None
    if not parts or sum(t.num_rows for t in parts) != table.num_rows or any(t.schema != table.schema for t in parts):
        return None
    return pa.concat_tables(parts)


def iter_columns(ds: Any, columns: Sequence[str], rows: int = 100_000) -> Iterator[pa.Table]:
    """The split's `columns` as Arrow tables of `rows` rows at a time, in the split's order.

    An index mapping (what `filter` and `select` leave) is applied here, one chunk at a time, with
    one Arrow `take` over the span of rows the chunk's indices cover: `datasets` would gather such
    rows one by one (a one-row record batch each), minutes and gigabytes for millions of rows.
    A split in Arrow files is read through memory maps opened for the pass (`_own_map`)."""
    columns = list(columns)
    indices, data = getattr(ds, "_indices", None), getattr(ds, "data", None)
    table = getattr(data, "table", None)
    if not isinstance(table, pa.Table) or not (indices is None or hasattr(indices, "column")):
        for start in range(0, len(ds), rows):  # not a datasets.Dataset as expected: its own slicing
            yield ds.with_format("arrow")[start : start + rows].select(columns)
        return
    own = _own_map(ds, table)
    table = (table if own is None else own).select(columns)
    if indices is None:
        for start in range(0, table.num_rows, rows):
            yield table.slice(start, rows)
        return
    mapping = indices.column(0)
    for start in range(0, len(mapping), rows):
        idx = mapping.slice(start, rows).to_numpy().astype(np.int64)  # (n,) rows of `table`
        lo, hi = int(idx.min()), int(idx.max()) + 1
        yield table.slice(lo, hi - lo).take(idx - lo)


def _token_dtype(max_id: int | None) -> np.dtype:
    return np.dtype(np.uint16) if max_id is not None and max_id < 2**16 else np.dtype(np.int32)


def _write_token_files(ds: Any, folder: Path, dtype: np.dtype) -> None:
    """folder/{src,tgt}.npy (every row's ids, concatenated) and {src,tgt}_off.npy (row i is
    values[off[i] : off[i + 1]]), written chunk by chunk into a temporary folder, then renamed."""
    lens = {c: [] for c in ("src", "tgt")}
    for t in iter_columns(ds, ["src_ids", "tgt_ids"]):
        for c in lens:
            lens[c].append(pc.fill_null(pc.list_value_length(t[f"{c}_ids"]), 0).to_numpy(zero_copy_only=False))
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        values = {}
        for c, parts in lens.items():
            off = np.zeros(len(ds) + 1, dtype=np.int64)
            np.cumsum(np.concatenate(parts) if parts else [], out=off[1:])
            np.save(tmp / f"{c}_off.npy", off)
            values[c] = np.lib.format.open_memmap(tmp / f"{c}.npy", mode="w+", dtype=dtype, shape=(int(off[-1]),))
        at = dict.fromkeys(values, 0)
        for t in iter_columns(ds, ["src_ids", "tgt_ids"]):
            for c, out in values.items():
                flat = pc.list_flatten(t[f"{c}_ids"]).to_numpy(zero_copy_only=False)
                out[at[c] : at[c] + len(flat)] = flat
                at[c] += len(flat)
        for out in values.values():
            out.flush()
        del values
        try:
            os.rename(tmp, folder)  # complete or absent; another process may have won the race
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _token_files(ds: Any, max_id: int | None) -> dict[str, np.ndarray] | None:
    """Memory-mapped flat token arrays of a split that lives in Arrow cache files (written once,
    beside those files, keyed by the split's fingerprint); None for a split held in memory."""
    files = getattr(ds, "cache_files", None)
    fingerprint = getattr(ds, "_fingerprint", None)
    if not files or not fingerprint:
        return None
    dtype = _token_dtype(max_id)
    folder = Path(files[0]["filename"]).parent / f"mt-tokens-{fingerprint}-{dtype.name}"
    if not folder.is_dir():
        _write_token_files(ds, folder, dtype)
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("src", "src_off", "tgt", "tgt_off")}


class PairDataset(Dataset):
    """Fast random access to a tokenized split (columns src_ids, tgt_ids).

    The split's ids as flat arrays and row offsets: memory-mapped files beside the split's Arrow
    cache (uint16 when `max_id` fits, so a WMT-size corpus costs the page cache, not the process's
    own memory), or, for a split held in memory, arrays read from it once. Item i is
    ``{"src_ids": ids, "tgt_ids": ids, "idx": i}``, and `batch(rows, ...)` is `collate` of those
    items done with a few numpy operations for the whole batch.
    """

    def __init__(self, ds: Any, max_id: int | None = None) -> None:
        flat = _token_files(ds, max_id)
        if flat is not None:
            self._src, self._src_off, self._tgt, self._tgt_off = (
                flat["src"], flat["src_off"], flat["tgt"], flat["tgt_off"]
            )  # fmt: skip
        else:
            self._src, self._src_off = _flat_lists(ds.with_format("arrow")["src_ids"])
            self._tgt, self._tgt_off = _flat_lists(ds.with_format("arrow")["tgt_ids"])
        self.src_lens = np.diff(self._src_off)  # (N,)
        self.tgt_lens = np.diff(self._tgt_off)  # (N,)

    def tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(src, src_off, tgt, tgt_off): the flat ids and offsets held now (`set_tokens` replaces
        them, it does not write into them)."""
        return self._src, self._src_off, self._tgt, self._tgt_off

    def set_tokens(self, src: np.ndarray, src_off: np.ndarray, tgt: np.ndarray, tgt_off: np.ndarray) -> None:
        """Hold another segmentation of the same pairs (mt/subword_sampling.py): flat ids and
        offsets as this class keeps them."""
        if len(src_off) != len(self._src_off) or len(tgt_off) != len(self._tgt_off):
            raise ValueError(f"set_tokens needs offsets for {len(self)} pairs a side")
        self._src, self._src_off, self._tgt, self._tgt_off = src, src_off, tgt, tgt_off
        self.src_lens = np.diff(src_off)  # (N,)
        self.tgt_lens = np.diff(tgt_off)  # (N,)

    def __len__(self) -> int:
        return len(self.src_lens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        return {
            "src_ids": self._src[self._src_off[i] : self._src_off[i + 1]],
            "tgt_ids": self._tgt[self._tgt_off[i] : self._tgt_off[i + 1]],
            "idx": i,
        }

    def batch(self, rows: Sequence[int], pad_id: int, bos_id: int, eos_id: int) -> Batch:
        """The same `Batch` as ``collate([self[i] for i in rows], ...)``, without a Python loop
        over sentences (the loader builds every training batch on the host, between steps)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(rows) == 0:
            raise ValueError("a batch needs a non-empty list of row indices")
        if rows.min() < -len(self) or rows.max() >= len(self):
            raise IndexError(f"row index out of range for a split of {len(self)} pairs")
        rows = np.where(rows < 0, rows + len(self), rows)
        ls, lt = self.src_lens[rows], self.tgt_lens[rows]  # (B,) without eos / bos
        every = np.arange(len(rows))
        src = _padded(self._src, self._src_off, rows, int(ls.max()) + 1, pad_id)  # (B, S)
        src[every, ls] = eos_id
        tgt_out = _padded(self._tgt, self._tgt_off, rows, int(lt.max()) + 1, pad_id)  # (B, T)
        tgt_in = np.empty_like(tgt_out)  # (B, T): the same pieces one step later, after BOS
        tgt_in[:, 0] = bos_id
        tgt_in[:, 1:] = tgt_out[:, :-1]
        tgt_out[every, lt] = eos_id
        return Batch(
            src=torch.from_numpy(src),
            src_len=torch.from_numpy(ls + 1),
            tgt_in=torch.from_numpy(tgt_in),
            tgt_out=torch.from_numpy(tgt_out),
            ntokens=int(lt.sum()) + len(rows),
            indices=torch.from_numpy(rows),
        )


class ResegmentingSampler(TokenBucketSampler):
    """A TokenBucketSampler over a PairDataset that is segmented anew every epoch (subword
    regularization, mt/subword_sampling.py): `set_epoch(e)` first puts ``segment(e)`` (a
    `Segmentation`: flat ids and offsets) into the dataset and packs batches by its lengths.
    `last` is the segmentation in use."""

    def __init__(self, data: PairDataset, segment: Callable[[int], Any], **kwargs: Any) -> None:
        super().__init__(data.src_lens, data.tgt_lens, **kwargs)
        self.data, self.segment = data, segment
        self.last: Any = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if self.last is None or self.last.epoch != int(epoch):
            seg = self.segment(int(epoch))
            self.data.set_tokens(seg.src, seg.src_off, seg.tgt, seg.tgt_off)
            self.set_lengths(self.data.src_lens, self.data.tgt_lens)
            self.last = seg
        super().set_epoch(epoch, start)


class _LoaderView(Dataset):
    """What make_loader's DataLoader reads: with a batch sampler, DataLoader hands
    `__getitems__` a whole batch of indices at once, and PairDataset.batch pads it in one go."""

    def __init__(self, data: PairDataset, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.data, self.ids = data, (pad_id, bos_id, eos_id)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.data[i]

    def __getitems__(self, rows: list[int]) -> Batch:
        return self.data.batch(rows, *self.ids)


def _already_collated(batch: Batch) -> Batch:
    return batch


def make_loader(
    ds: Any,
    tokenizer: Any,
    max_tokens: int,
    max_sentences: int,
    shuffle: bool,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    segment: Callable[[PairDataset], Callable[[int], Any]] | None = None,
) -> DataLoader:
    """A DataLoader of `Batch`es over a tokenized split; ``loader.batch_sampler.set_epoch(e)``
    reshuffles (call it every epoch). `segment`, given the split's PairDataset, returns what
    segments it anew for each epoch (`ResegmentingSampler`; mt.subword_sampling)."""
    vocab = [getattr(tokenizer, f"{side}_vocab_size", None) for side in ("src", "tgt")]
    data = PairDataset(ds, None if None in vocab else max(vocab) - 1)
    packing = dict(
        max_tokens=max_tokens,
        max_sentences=max_sentences,
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )
    if segment is None:
        sampler: TokenBucketSampler = TokenBucketSampler(data.src_lens, data.tgt_lens, **packing)
    else:
        sampler = ResegmentingSampler(data, segment(data), **packing)
    return DataLoader(
        _LoaderView(data, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id),
        batch_sampler=sampler,
        collate_fn=_already_collated,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # workers made anew each epoch when the epoch brings new tokens: they copy the dataset then
        persistent_workers=num_workers > 0 and segment is None,
        # Its own generator: otherwise every new iterator draws a seed from the global RNG,
        # which would shift dropout masks after a resume mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
