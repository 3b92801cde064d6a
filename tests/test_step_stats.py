"""mt.step_stats.StepStats: per-step numbers handed back a fixed number of steps late, in order."""

import pytest
import torch

from mt.step_stats import SUMMED, StepStats, pinned_if_possible, step_values


def test_rows_come_back_lag_steps_late_in_order():
    stats = StepStats("cpu", lag=1)
    seen = []
    for k in range(1, 5):
        stats.push(k, torch.tensor([float(k), 10.0 * k], dtype=torch.float64))
        seen.append([tag for tag, _ in stats.ready()])
    assert seen == [[], [1], [2], [3]]
    assert len(stats) == 1
    assert list(stats.drain()) == [(4, [4.0, 40.0])]
    assert len(stats) == 0 and list(stats.drain()) == []


def test_lag_zero_is_immediate_and_negative_lag_is_refused():
    stats = StepStats("cpu", lag=0)
    stats.push("a", torch.tensor([1.5]))
    assert list(stats.ready()) == [("a", [1.5])]
    with pytest.raises(ValueError, match="lag"):
        StepStats("cpu", lag=-1)


def test_a_row_is_a_copy_taken_at_push_time():
    """GraphedTrainStep's `out` is overwritten by the next step: the row must keep the old values,
    also when its host buffer is reused for a later row."""
    out = torch.zeros(3, dtype=torch.float64)
    stats = StepStats("cpu", lag=2)
    rows = []
    for k in range(6):
        out.fill_(k)
        stats.push(k, out[:2])  # a view, overwritten after the push
        rows += list(stats.ready())
    rows += list(stats.drain())
    assert rows == [(k, [float(k), float(k)]) for k in range(6)]
    assert len(stats._free) <= 3  # buffers are reused, not one per step


def test_rows_of_different_shapes_and_dtypes():
    stats = StepStats("cpu", lag=1)
    stats.push(0, torch.tensor([1, 2], dtype=torch.int64))
    stats.push(1, torch.tensor([0.5], dtype=torch.float32))
    stats.push(2, torch.tensor([3, 4], dtype=torch.int64))
    assert list(stats.drain()) == [(0, [1, 2]), (1, [0.5]), (2, [3, 4])]


def test_pinned_if_possible_falls_back_to_ordinary_memory():
    calls = []

    def make(pin):
        calls.append(pin)
        if pin:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return torch.zeros(2)

    assert pinned_if_possible(make, True).tolist() == [0.0, 0.0] and calls == [True, False]
    calls.clear()
    pinned_if_possible(make, False)
    assert calls == [False]


@pytest.mark.parametrize("lr", [2.5e-4, torch.tensor(2.5e-4, dtype=torch.float32)])
def test_step_values_layout(lr):
    """[loss sum, NLL sum, tokens, out of time, grad norm, lr]; the first SUMMED are the ones
    mt.train sums over ranks; a float or a tensor lr (CUDA graphs) gives the same row."""
    row = step_values(
        torch.tensor(12.5), torch.tensor(10.0, dtype=torch.float64), 40, True, torch.tensor(3.0), lr, "cpu"
    )
    assert row.dtype == torch.float64 and row.shape == (6,)
    assert row.tolist() == pytest.approx([12.5, 10.0, 40.0, 1.0, 3.0, 2.5e-4])
    assert row[:SUMMED].tolist() == pytest.approx([12.5, 10.0, 40.0, 1.0])  # what DDP sums: not the norm or lr
