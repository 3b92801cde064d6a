"""Dynamic batching for the translation server: requests that arrive together are decoded together.

    batcher = Batcher(decode, max_batch_sentences=32, window_ms=5, queue_size=64)
    batcher.start()
    future = batcher.submit(["ein hund läuft ."], Settings(beam=5, length_penalty=1.0, nbest=1))
    hyps = future.result()          # decode()'s result for these lines, in their order
    batcher.close()                 # decodes what is queued, then stops the worker

(Not to be confused with mt/batching.py, which builds token-budget batches for training.)

One worker thread owns the model: it takes the oldest waiting request, waits until
`window_ms` after that request arrived for others to join it (or until `max_batch_sentences`
sentences are in), and decodes them in one `decode(lines, settings)` call per distinct
`Settings` (beam, length penalty, n-best), so 32 clients sending one sentence each share one
decode instead of queueing for 32. A request is never split: one with more sentences than the
cap is decoded alone (decode() batches it further). Requests that do not fit the cap wait for
the next round, in arrival order.

One thread, not a pool: a model decodes one batch at a time anyway (CPU threads or the GPU are
already shared out inside the batch), a bigger batch is cheaper than two concurrent ones, and
CUDA-graph replays (mt.graphs.GraphedDecoder) must not run from two threads at once.

At most `queue_size` requests wait (the one being collected or decoded is not counted);
`submit` raises QueueFull beyond that, so an overloaded server answers at once instead of
holding connections for minutes. `close()` refuses new requests, decodes the waiting ones
without waiting out their window, and joins the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import first_line
from .search import LengthPenalty

log = logging.getLogger("mt.batcher")


class QueueFull(Exception):
    """Too many requests are waiting; try again later."""


class Closed(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Settings:
    """What decoding a request needs, resolved (no "checkpoint" defaults left): requests with
    equal settings can share a decode call."""

    beam: int
    length_penalty: LengthPenalty
    nbest: int = 1


@dataclass
class _Job:
    lines: list[str]
    settings: Settings
    future: Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Collects submitted requests into batches and decodes them on one worker thread.

    decode(lines, settings) -> one result per line (in order); it runs on the worker thread only.
    `stats` counts the requests and sentences decoded, the decode calls ("batches"), the largest
    batch (sentences in one decode call), the failed decode calls and the requests refused for a
    full queue; `snapshot()` adds
    how many requests are waiting and being decoded now."""

    def __init__(
        self,
        decode: Callable[[list[str], Settings], Sequence[Any]],
        max_batch_sentences: int = 32,
        window_ms: float = 5.0,
        queue_size: int = 64,
        name: str = "mt-decode",
    ):
        if max_batch_sentences < 1 or queue_size < 1 or window_ms < 0:
            raise ValueError("max_batch_sentences and queue_size must be >= 1, window_ms >= 0")
        self.decode = decode
        self.max_batch_sentences = max_batch_sentences
        self.window = window_ms / 1000.0
        self.queue_size = queue_size
        self.name = name
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._in_flight = 0  # requests taken by the worker and not finished
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "sentences": 0, "batches": 0, "largest_batch": 0, "failures": 0, "rejected": 0}

    # ------------------------------------------------------------------ client side
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            # daemon: a process that exits without close() (a crash, a second Ctrl-C) must not hang on it
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def submit(self, lines: list[str], settings: Settings) -> Future:
        """Queue `lines` for decoding with `settings`; the Future gets decode()'s results for
        them, or decode()'s exception. Raises QueueFull or Closed at once."""
        job = _Job(list(lines), settings, Future())
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting (queue size {self.queue_size})")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests; decode the waiting ones; stop the worker (wait up to `timeout` s)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        else:  # never started: nobody will decode what is waiting
            with self._cond:
                while self._pending:
                    self._pending.popleft().future.set_exception(Closed("the server shut down"))

    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self) -> dict[str, int]:
        """`stats` plus, now, the requests waiting ("queued") and those the worker holds, in its
        collection window or its decode call ("in_flight")."""
        with self._cond:
            return {**self.stats, "queued": len(self._pending), "in_flight": self._in_flight}

    # ------------------------------------------------------------------ worker
    def _collect(self) -> list[_Job] | None:
        """The next batch of jobs (None once closed and drained)."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            batch: list[_Job] = []
            n = 0
            # The window runs from the first request's arrival, not from when the worker got to it:
            # after a long decode the requests that piled up meanwhile go at once.
            deadline = self._pending[0].arrived + self.window
            while True:
                if self._pending:
                    job = self._pending[0]
                    if batch and n + len(job.lines) > self.max_batch_sentences:
                        break  # it waits for the next round, still first in line
                    self._pending.popleft()
                    if not job.future.set_running_or_notify_cancel():
                        continue  # its client went away
                    batch.append(job)
                    n += len(job.lines)
                    self._in_flight = len(batch)
                    if n >= self.max_batch_sentences:
                        break
                    continue
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:  # shutting down: no point waiting for company
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        batch: list[_Job] | None = []
        try:
            while (batch := self._collect()) is not None:
                try:
                    groups: dict[Settings, list[_Job]] = {}
                    for job in batch:  # dicts keep insertion order: groups go in order of arrival
                        groups.setdefault(job.settings, []).append(job)
                    for settings, jobs in groups.items():
                        self._decode_group(settings, jobs)
                finally:
                    with self._cond:
                        self._in_flight = 0
        except BaseException as e:  # KeyboardInterrupt or SystemExit inside decode: this worker is done
            log.error("the decoding worker stopped: %s", type(e).__name__)
            self._fail_everything(batch or [], Closed(f"the decoding worker stopped ({type(e).__name__})"))

    def _fail_everything(self, batch: list[_Job], error: Exception) -> None:
        """No worker is left: refuse new requests and answer every waiting one with `error`, so no
        client waits for a decode that will never come."""
        with self._cond:
            self._closed = True
            jobs = list(batch) + list(self._pending)
            self._pending.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _decode_group(self, settings: Settings, jobs: list[_Job]) -> None:
        lines = [line for job in jobs for line in job.lines]
        with self._cond:
            self.stats["requests"] += len(jobs)
            self.stats["sentences"] += len(lines)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(lines))
        t0 = time.perf_counter()
        try:
            results = list(self.decode(lines, settings))
            if len(results) != len(lines):
                raise RuntimeError(f"decode returned {len(results)} results for {len(lines)} lines")
        except BaseException as e:  # every waiting client gets the error; the worker goes on
            with self._cond:
                self.stats["failures"] += 1
            log.error("decoding %d lines (%d requests) failed: %s", len(lines), len(jobs), first_line(e))
            log.debug("the decoding failure's traceback", exc_info=True)
            for job in jobs:
                job.future.set_exception(e)
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not ours to swallow
                raise
            return
        log.debug(
            "decoded %d sentences of %d requests (%s) in %.1f ms",
            len(lines),
            len(jobs),
            settings,
            1000 * (time.perf_counter() - t0),
        )
        start = 0
        for job in jobs:
            job.future.set_result(results[start : start + len(job.lines)])
            start += len(job.lines)


__all__ = ["Batcher", "Settings", "QueueFull", "Closed"]
