"""Subword regularization: every epoch trains on a freshly sampled segmentation of the training pairs.

SentencePiece can return a sampled segmentation instead of the best one: a unigram model draws
from its `nbest` best segmentations (-1: all of them) with probabilities proportional to P^alpha
(Kudo, 2018), a BPE model drops each merge with probability alpha (BPE-dropout, Provilkov et al.,
2020). Trained on many segmentations of the same sentences, a model sees how words are built from
pieces and gets more robust to the best segmentation's mistakes; it still reads and writes the
best segmentation at validation, test and translation time. ``trainer.subword_alpha > 0`` turns
it on for the training split (docs/training.md, "Subword regularization").

- Epoch e's segmentation depends on (trainer.seed, e) and the split only, so a resumed run and
  every DDP rank see the same pairs split the same way.
- A sampled pair outside the data's length limits (data.max_src_len, max_tgt_len, max_len_ratio)
  keeps its best segmentation, the one the length filter let in, so batches stay within the
  CUDA-graph shapes and nothing is dropped.
- The next epoch is sampled in a background thread while this one trains: SentencePiece releases
  the GIL while it encodes, so the training loop only waits when an epoch is shorter than its
  sampling.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mt.batching import PairDataset, iter_columns
from mt.data import length_filter_codes
from mt.errors import MTError

__all__ = ["Segmentation", "EpochSegmentations", "check_settings"]


def check_settings(alpha: float, nbest: int, tokenizer: Any = None) -> None:
    """One-line errors for trainer.subword_alpha / subword_nbest (alpha 0 turns sampling off),
    and, given the tokenizer, for models that cannot sample."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise MTError(f"trainer.subword_alpha must be a number >= 0 (0 = off; got {alpha})")
    if alpha == 0:
        return
    if not (nbest == -1 or nbest > 1):
        raise MTError(f"trainer.subword_nbest must be -1 (all segmentations) or > 1 (got {nbest})")
    for side in ("src", "tgt") if tokenizer is not None else ():
        kind = tokenizer.model_type(side)
        if kind not in ("unigram", "bpe"):
            raise MTError(f"trainer.subword_alpha needs a unigram or BPE tokenizer; the {side} model is {kind}")
        if kind == "bpe" and alpha >= 1:
            raise MTError(
                f"trainer.subword_alpha is BPE-dropout's probability with a BPE tokenizer: it must be < 1 (got {alpha})"
            )


class _Stopped(Exception):
    """close() was called while an epoch was being sampled."""


@dataclass(frozen=True)
class Segmentation:
    """One epoch's token ids, laid out as PairDataset holds them: row i's source pieces are
    src[src_off[i] : src_off[i + 1]], likewise the target."""

    epoch: int
    src: np.ndarray  # (sum of source lengths,)
    src_off: np.ndarray  # (N + 1,)
    tgt: np.ndarray
    tgt_off: np.ndarray
    kept_best: int  # pairs whose sample broke a length limit and kept the best segmentation
    seconds: float  # time spent sampling (in the background unless it was the first epoch)

    def pieces(self) -> tuple[int, int]:
        return int(self.src_off[-1]), int(self.tgt_off[-1])


class EpochSegmentations:
    """``segs(epoch)`` -> that epoch's `Segmentation` of the training split `train` (a tokenized
    split with its text columns src and tgt; `best` is its PairDataset), and the next epoch's
    sampling starts in the background."""

    def __init__(
        self,
        tokenizer: Any,
        train: Any,
        best: PairDataset,
        alpha: float,
        nbest: int,
        seed: int,
        limits: tuple[int, int, float],
        chunk_rows: int = 20_000,
        epochs: int | None = None,
    ) -> None:
        check_settings(alpha, nbest, tokenizer)
        if alpha == 0:
            raise MTError("subword sampling needs trainer.subword_alpha > 0")
        if len(train) != len(best):
            raise ValueError(f"the split has {len(train)} rows, its token arrays {len(best)}")
        self.tokenizer, self.train = tokenizer, train
        # the best segmentation's arrays, kept: the loader puts each epoch's sample into `best`
        self.best = dict(zip(("src", "src_off", "tgt", "tgt_off"), best.tokens()))
        self.rows = len(best)
        self.alpha, self.nbest, self.seed, self.limits = float(alpha), int(nbest), int(seed), limits
        self.chunk_rows = int(chunk_rows)
        self.epochs = epochs  # epochs 0 .. epochs - 1 are trained: none past them is sampled ahead
        self._stop = threading.Event()
        # One worker: SentencePiece's generator is process-wide, so draws are reproducible only
        # if one thread samples at a time.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="subword-sampling")
        self._futures: dict[int, Future[Segmentation]] = {}

    def __call__(self, epoch: int) -> Segmentation:
        epoch = int(epoch)
        for e in [e for e in self._futures if e not in (epoch, epoch + 1)]:
            self._futures.pop(e).cancel()
        if epoch not in self._futures:
            self._futures[epoch] = self._pool.submit(self.sample, epoch)
        seg = self._futures[epoch].result()
        if epoch + 1 not in self._futures and (self.epochs is None or epoch + 1 < self.epochs):
            self._futures[epoch + 1] = self._pool.submit(self.sample, epoch + 1)
        return seg

    def close(self) -> None:
        """Stop sampling: queued epochs are dropped, one under way stops after its current chunk
        (the process would otherwise wait for it at exit)."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._futures.clear()

    def _chunk_seed(self, epoch: int, chunk: int, side: int) -> int:
        state = np.random.SeedSequence([self.seed, epoch, chunk, side]).generate_state(1)[0]
        return int(state % (2**31 - 2)) + 1  # SentencePiece treats some values specially; stay in [1, 2^31)

    def sample(self, epoch: int) -> Segmentation:
        """Epoch `epoch`'s segmentation, computed now (call it from one thread at a time)."""
        t0 = time.perf_counter()
        parts: dict[str, list[np.ndarray]] = {"src": [], "tgt": [], "src_len": [], "tgt_len": []}
        kept_best = row = 0
        for chunk, table in enumerate(iter_columns(self.train, ["src", "tgt"], rows=self.chunk_rows)):
            if self._stop.is_set():
                raise _Stopped(f"closed while sampling epoch {epoch}")
            ids = {
                side: self.tokenizer.sample(
                    side, table[side].to_pylist(), self.alpha, self.nbest, self._chunk_seed(epoch, chunk, k)
                )
                for k, side in enumerate(("src", "tgt"))
            }
            # (n,) pieces a pair, a side: read by the length filter, then by the flattening
            lens = {
                side: np.fromiter(map(len, rows), dtype=np.int64, count=table.num_rows) for side, rows in ids.items()
            }
            for i in np.flatnonzero(length_filter_codes(lens["src"], lens["tgt"], *self.limits)).tolist():
                for side in ("src", "tgt"):
                    values, off = self.best[side], self.best[f"{side}_off"]
                    ids[side][i] = values[off[row + i] : off[row + i + 1]].tolist()
                    lens[side][i] = len(ids[side][i])
                kept_best += 1
            for side in ("src", "tgt"):
                flat = itertools.chain.from_iterable(ids[side])
                parts[side].append(np.fromiter(flat, dtype=self.best[side].dtype, count=int(lens[side].sum())))
                parts[f"{side}_len"].append(lens[side])
            row += table.num_rows
        if row != self.rows:
            raise RuntimeError(f"sampled {row} rows of a split of {self.rows}")
        offsets = {}
        for side in ("src", "tgt"):
            lens = np.concatenate(parts[f"{side}_len"]) if row else np.zeros(0, dtype=np.int64)
            offsets[side] = np.zeros(row + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[side][1:])
        return Segmentation(
            epoch=epoch,
            src=np.concatenate(parts["src"]) if row else np.zeros(0, self.best["src"].dtype),
            src_off=offsets["src"],
            tgt=np.concatenate(parts["tgt"]) if row else np.zeros(0, self.best["tgt"].dtype),
            tgt_off=offsets["tgt"],
            kept_best=kept_best,
            seconds=time.perf_counter() - t0,
        )
