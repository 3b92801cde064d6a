"""The pace and ETA lines of training (mt/pace.py), and where the Trainer logs them."""

from __future__ import annotations

import logging
import re

import pytest

from mt.pace import Pace, duration


def test_duration_reads_like_a_person_would_say_it():
    assert duration(42.4) == "42 s"
    assert duration(200) == "3 min 20 s"
    assert duration(3725) == "1 h 2 min"
    assert duration(-3) == "0 s"


def test_rates_count_from_the_first_step_and_estimate_the_rest():
    pace = Pace(max_steps=1000, eval_every=100)
    assert pace.summary(0, 0.0) is None
    pace.add(step=1, tokens=5000, now=50.0)  # the first step starts the clock: warm-up is not a rate
    assert pace.summary(1, 50.0) is None
    for step in range(2, 12):
        pace.add(step, 400, now=50.0 + (step - 1) * 0.5)  # 2 steps/s, 400 tokens a step
    line = pace.summary(11, 55.0)
    assert line == (
        "2.00 steps/s, 800 target tok/s; step 11 of 1000: 8 min 14 s to go, 44 s to the validation at step 100"
    )
    assert pace.summary(1000, 550.0).endswith("step 1000 of 1000")  # done: no estimate
    # the last validation is max_steps itself: only the time to go
    assert "validation" not in Pace(max_steps=150, eval_every=100, t0=0.0, step0=0).summary(120, 60.0)


def test_training_tells_its_pace_early_and_what_to_run_next(tiny_corpus_dir, tmp_path, monkeypatch, caplog):
    """A pace line FIRST_PACE_S after the first step although log_every is far off, one with each
    training log line, and at the end the evaluate / translate / TensorBoard commands of the run."""
    from test_train import make_cfg

    import mt.trainer as mt_trainer
    from mt.trainer import FIRST_PACE_S

    clock = {"t": 0.0}

    def tick():  # the trainer looks once per step: 1 step/s
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(mt_trainer, "_pace_clock", tick)
    cfg = make_cfg(
        tiny_corpus_dir,
        tmp_path / "c",
        "trainer.max_steps=30",
        "trainer.eval_every=20",
        "trainer.log_every=25",
    )
    with caplog.at_level(logging.INFO, logger="mt.train"):
        mt_trainer.train(cfg, tmp_path / "run")
    messages = [r.getMessage() for r in caplog.records]
    paces = [(i, m) for i, m in enumerate(messages) if m.startswith("pace: ")]
    first_log = next(i for i, m in enumerate(messages) if m.startswith("step 25 |"))
    assert paces and paces[0][0] < first_log  # the first estimate before the first log line
    m = re.match(
        r"pace: ([\d.]+) steps/s, \d+ target tok/s; step (\d+) of 30: (.+) to go, (.+) to the validation at step 20$",
        paces[0][1],
    )
    assert m, paces[0][1]
    assert float(m.group(1)) == pytest.approx(1.0) and int(m.group(2)) == 1 + FIRST_PACE_S
    assert m.group(3) == duration(30 - int(m.group(2))) and m.group(4) == duration(20 - int(m.group(2)))
    assert any(i == first_log + 1 for i, _ in paces)  # and one with the training log line
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    nxt = next(m for m in messages if m.startswith("next:"))
    assert f"mt-evaluate checkpoint={best} split=test" in nxt
    assert f"mt-translate --checkpoint {best} < input.de > output.en" in nxt
    assert f"tensorboard --logdir {tmp_path / 'run' / 'tensorboard'}" in nxt
