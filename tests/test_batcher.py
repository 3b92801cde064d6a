"""mt/batcher.py alone, with a fake decode() that records its calls: what shares a decode call,
in what order, what a failure reaches, the queue bound, shutdown. Jobs are queued before the
worker starts, so what shares a batch does not depend on timing."""

from __future__ import annotations

import pytest

from mt.batcher import Batcher, Closed, QueueFull, Settings


class FakeDecode:
    """decode() that records its calls and answers each line with (line, settings)."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[str], Settings]] = []
        self.fail_on = fail_on

    def __call__(self, lines, settings):
        self.calls.append((list(lines), settings))
        if self.fail_on in lines:
            raise ValueError(f"cannot decode {self.fail_on!r}")
        return [(line, settings) for line in lines]


A, B = Settings(beam=5, length_penalty=1.0), Settings(beam=1, length_penalty=None)


def test_batcher_groups_by_settings_caps_batches_and_keeps_order():
    fake = FakeDecode()
    b = Batcher(fake, max_batch_sentences=5, window_ms=0, queue_size=10)
    # queued before the worker starts, so what shares a batch does not depend on timing
    a1 = b.submit(["a1.0", "a1.1"], A)
    b1 = b.submit(["b1.0"], B)
    a2 = b.submit(["a2.0"], A)
    a3 = b.submit(["a3.0", "a3.1", "a3.2"], A)  # 4 + 3 > 5 sentences: the next batch
    big = b.submit([f"big.{i}" for i in range(7)], B)  # over the cap alone: decoded alone, not split
    b.start()
    assert a1.result(10) == [("a1.0", A), ("a1.1", A)]
    assert b1.result(10) == [("b1.0", B)] and a2.result(10) == [("a2.0", A)]
    assert a3.result(10) == [(f"a3.{i}", A) for i in range(3)]
    assert [r[0] for r in big.result(10)] == [f"big.{i}" for i in range(7)]
    b.close(10)
    assert fake.calls == [
        (["a1.0", "a1.1", "a2.0"], A),
        (["b1.0"], B),
        (["a3.0", "a3.1", "a3.2"], A),
        ([f"big.{i}" for i in range(7)], B),
    ]
    assert b.snapshot() == {
        "requests": 5,
        "sentences": 14,
        "batches": 4,
        "largest_batch": 7,
        "failures": 0,
        "rejected": 0,
        "queued": 0,
        "in_flight": 0,
    }


def test_batcher_failure_reaches_its_group_only_and_the_worker_goes_on():
    fake = FakeDecode(fail_on="bad")
    b = Batcher(fake, max_batch_sentences=10, window_ms=0)
    bad = b.submit(["ok", "bad"], A)
    same_group = b.submit(["fine"], A)
    other = b.submit(["x"], B)
    b.start()
    for f in (bad, same_group):
        with pytest.raises(ValueError, match="cannot decode 'bad'"):
            f.result(10)
    assert other.result(10) == [("x", B)]
    assert b.submit(["later"], A).result(10) == [("later", A)]
    b.close(10)
    assert b.stats["failures"] == 1


def test_batcher_worker_stopped_by_an_interrupt_answers_everyone_and_refuses_more():
    """A KeyboardInterrupt inside decode ends the worker; every request of its batch, and every
    one still queued, gets an error instead of waiting forever, and new ones are refused."""

    class Interrupting(FakeDecode):
        def __call__(self, lines, settings):
            if settings == A:
                raise KeyboardInterrupt
            return super().__call__(lines, settings)

    b = Batcher(Interrupting(), max_batch_sentences=2, window_ms=0, queue_size=10)
    a1, b1 = b.submit(["a"], A), b.submit(["b"], B)  # one batch: A's group first
    later = b.submit(["c", "d"], B)  # the next batch, still queued when the worker stops
    b.start()
    for f in (a1, b1, later):
        with pytest.raises((KeyboardInterrupt, Closed)):
            f.result(10)
    with pytest.raises(Closed):
        b.submit(["e"], B)
    b.close(10)


def test_batcher_refuses_beyond_its_queue_and_after_close():
    b = Batcher(FakeDecode(), queue_size=2, window_ms=60_000)
    waiting = [b.submit([f"{i}"], A) for i in range(2)]
    with pytest.raises(QueueFull, match="queue size 2"):
        b.submit(["too many"], A)
    assert b.stats["rejected"] == 1
    b.start()
    # close() decodes what waits without sitting out the minute-long window, then stops
    b.close(timeout=30)
    assert not b._thread.is_alive()
    assert [f.result(0) for f in waiting] == [[("0", A)], [("1", A)]]
    with pytest.raises(Closed):
        b.submit(["after"], A)


def test_batcher_skips_requests_whose_client_left():
    fake = FakeDecode()
    b = Batcher(fake, window_ms=0)
    gone = b.submit(["gone"], A)
    kept = b.submit(["kept"], A)
    assert gone.cancel()
    b.start()
    assert kept.result(10) == [("kept", A)]
    b.close(10)
    assert fake.calls == [(["kept"], A)]


def test_batcher_window_gathers_requests_that_arrive_while_it_waits():
    """A running worker holds the first request open for the window: requests arriving meanwhile
    join its decode call, which goes as soon as the cap is reached (not at the window's end)."""
    fake = FakeDecode()
    b = Batcher(fake, max_batch_sentences=4, window_ms=60_000)
    b.start()
    futures = [b.submit([f"{i}"], A) for i in range(3)]
    last = b.submit(["3a", "3b"], A)  # would pass the cap: the next batch, closed by close()
    assert [f.result(30) for f in futures] == [[(f"{i}", A)] for i in range(3)]
    b.close(30)
    assert last.result(0) == [("3a", A), ("3b", A)]
    assert fake.calls == [(["0", "1", "2"], A), (["3a", "3b"], A)]
