"""How fast a training run goes and when it will be done, in words a user can plan around.

    pace = Pace(max_steps=20000, eval_every=500)
    pace.add(step, target_tokens, now)      # once per step whose numbers reached the host
    log.info("pace: %s", pace.summary(step, now))
    # -> "2.31 steps/s, 5120 target tok/s; step 23 of 20000: 2 h 24 min to go, 3 min 26 s to the
    #     validation at step 500"

The rates count from the first step accounted for, so the compile warm-up and the first step's
own start-up do not inflate the estimate; mt.trainer logs a first summary a few seconds into
training and then one with every training log line.
"""

from __future__ import annotations

from dataclasses import dataclass


def duration(seconds: float) -> str:
    """3725 -> "1 h 2 min"; 200 -> "3 min 20 s"; 42.4 -> "42 s"."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


@dataclass
class Pace:
    max_steps: int
    eval_every: int
    t0: float | None = None  # the clock when the first step was accounted for
    step0: int = 0
    tokens: float = 0.0  # target tokens since then

    def add(self, step: int, tokens: float, now: float) -> None:
        if self.t0 is None:  # the first step starts the clock; its own time is not a rate
            self.t0, self.step0 = now, step
            return
        self.tokens += tokens

    def elapsed(self, now: float) -> float:
        return 0.0 if self.t0 is None else now - self.t0

    def steps_per_s(self, step: int, now: float) -> float:
        dt = self.elapsed(now)
        return (step - self.step0) / dt if dt > 0 else 0.0

    def summary(self, step: int, now: float) -> str | None:
        """Rates and the time to max_steps and to the next validation; None before any rate."""
        rate = self.steps_per_s(step, now)
        if rate <= 0:
            return None
        tok_rate = self.tokens / self.elapsed(now)
        line = f"{rate:.2f} steps/s, {tok_rate:.0f} target tok/s; step {step} of {self.max_steps}"
        if step >= self.max_steps:
            return line
        line += f": {duration((self.max_steps - step) / rate)} to go"
        next_eval = min(self.max_steps, (step // self.eval_every + 1) * self.eval_every)
        if next_eval < self.max_steps:
            line += f", {duration((next_eval - step) / rate)} to the validation at step {next_eval}"
        return line
