"""Weights combined over training: an exponential moving average kept while training (EMA), and
the mean of saved checkpoints (what `mt-average` and `trainer.average_last` write).

    ema = EMA(model, decay=0.999)      # mt.train with trainer.ema_decay > 0
    ema.update()                       # after every optimizer step (also inside a CUDA graph)
    with ema.swapped_in():             # the model holds the EMA weights here (validation)
        ...
    state = average_checkpoints([load_checkpoint(p) for p in paths], paths)   # a loadable checkpoint

EMA: after update t (counted from 1), shadow = d_t * shadow + (1 - d_t) * weights with
d_t = min(decay, (1 + t) / (10 + t)), the warm-up timm and fairseq use: early updates follow the
weights closely, so the random initial weights leave no trace in the average. Every number of the
update lives on the weights' device (the count included), so the update has no host sync and a
CUDA graph captures it with the rest of the step (mt/graphs.py).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_checkpoint_name(step: int) -> str:
    """The file name `trainer.keep_last` gives the checkpoint of a validation at `step`."""
    return f"step_{step}.pt"


def step_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """The run's step_<k>.pt files as (step, path), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    found = []
    for p in ckpt_dir.glob("step_*.pt") if ckpt_dir.is_dir() else ():
        m = STEP_FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_step_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step_<k>.pt files; returns what was deleted."""
    found = step_checkpoints(ckpt_dir)
    gone = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


class EMA:
    """An exponential moving average of a model's parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be between 0 and 1 (got {decay})")
        self.model, self.decay = model, float(decay)
        self.params = [p for p in model.parameters()]  # tied parameters appear once
        self.shadow = [p.detach().clone() for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.float64, device=device)  # () updates so far

    @torch.no_grad()
    def update(self) -> None:
        """shadow -= (1 - d_t) * (shadow - weights): a few foreach kernels, no host sync."""
        self.updates.add_(1)
        d = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)  # () d_t
        diff = torch._foreach_sub(self.shadow, self.params)
        torch._foreach_mul_(diff, (1 - d).float())
        torch._foreach_sub_(self.shadow, diff)

    def _names(self) -> dict[int, Tensor]:
        return {id(p): s for p, s in zip(self.params, self.shadow, strict=True)}

    def model_state(self) -> dict[str, Tensor]:
        """The model's state_dict with the EMA weights in place of the parameters (buffers as they are)."""
        shadow = self._names()
        live = self.model.state_dict(keep_vars=True)
        return {k: (shadow[id(v)] if id(v) in shadow else v).detach() for k, v in live.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the average exactly."""
        return {"decay": self.decay, "updates": self.updates, "model": self.model_state()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        live = self.model.state_dict(keep_vars=True)
        saved = state["model"]
        by_id = {id(v): k for k, v in live.items()}
        for p, s in zip(self.params, self.shadow, strict=True):
            key = by_id[id(p)]
            if key not in saved or saved[key].shape != s.shape:
                raise CheckpointError(f"the checkpoint's EMA weights do not fit this model ({key})")
            s.copy_(saved[key])
        self.updates.copy_(torch.as_tensor(state["updates"], dtype=torch.float64))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the EMA weights inside the block, its own ones again after it. The
        weights are copied in place, so CUDA graphs captured on the model read the EMA ones too."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)


# ----------------------------------------------------------------------------- checkpoint averages
def _identity(state: dict[str, Any]) -> tuple:
    cfg = state["config"]
    tok = state["tokenizer"]
    model_cfg = {k: v for k, v in cfg["model"].items() if k != "cell"}  # every backend holds the same parameters
    return model_cfg, cfg["tokenizer"], (cfg["data"]["src"], cfg["data"]["tgt"]), tok


def average_checkpoints(paths: Sequence[str | Path], load=None) -> dict[str, Any]:
    """The mean of the checkpoints' model parameters, as a checkpoint every command loads: the
    first one's config and tokenizer, the newest step, and `averaged` saying what went in. The
    checkpoints must agree on model config, tokenizer and parameter shapes (CheckpointError).
    One checkpoint is in memory at a time (plus a float64 running sum)."""
    if load is None:
        from .checkpoint import load_checkpoint as load
    if not paths:
        raise CheckpointError("nothing to average: no checkpoints given")
    paths = [Path(p) for p in paths]
    first_path, totals, steps = paths[0], {}, []
    ref = last = None
    for path in paths:
        state = load(path)
        model_cfg, tok_cfg, pair, tok = _identity(state)
        weights = state["model"]
        if ref is None:
            ref = (model_cfg, tok_cfg, pair, tok, {k: v.shape for k, v in weights.items()})
            head = {k: state[k] for k in ("config", "tokenizer")}
        else:
            _check_same(ref, (model_cfg, tok_cfg, pair, tok), weights, path, first_path)
        for k, v in weights.items():
            if torch.is_floating_point(v):
                totals[k] = totals[k].add_(v.to(torch.float64)) if k in totals else v.to(torch.float64).clone()
        steps.append(int(state["step"]))
        last = weights
    dtypes = {k: v.dtype for k, v in last.items()}
    averaged = {
        k: (totals[k] / len(paths)).to(dtypes[k]) if k in totals else last[k].clone()  # counters: the newest
        for k in last
    }
    return {
        "model": averaged,
        **head,
        "step": max(steps),
        "metrics": {},
        "averaged": {"kind": "mean", "checkpoints": [str(p) for p in paths], "steps": steps},
    }


def _check_same(ref: tuple, got: tuple, weights: dict[str, Tensor], path: Path, first_path: Path) -> None:
    """One-line errors for checkpoints that cannot be averaged with the first one."""
    (ref_model, ref_tokcfg, ref_pair, ref_tok, ref_shapes), (model_cfg, tok_cfg, pair, tok) = ref, got
    what = f"cannot average {path} with {first_path}"
    if model_cfg != ref_model:
        diff = [k for k in ref_model if ref_model[k] != model_cfg.get(k)]
        raise CheckpointError(f"{what}: their model configs differ ({', '.join(diff)})")
    if tok_cfg != ref_tokcfg or tok != ref_tok:
        raise CheckpointError(f"{what}: their tokenizers differ")
    if pair != ref_pair:
        raise CheckpointError(f"{what}: it translates {pair[0]}->{pair[1]}, not {ref_pair[0]}->{ref_pair[1]}")
    if set(weights) != set(ref_shapes):
        raise CheckpointError(f"{what}: their parameter names differ")
    for k, v in weights.items():
        if v.shape != ref_shapes[k]:
            raise CheckpointError(f"{what}: {k} is {tuple(v.shape)}, not {tuple(ref_shapes[k])}")


def choose_for_average(ckpt_dir: str | Path, n: int, by: str = "last") -> list[Path]:
    """The step_<k>.pt files to average: the newest `n` (by="last") or the `n` with the best
    validation BLEU (by="best"; the BLEU each checkpoint recorded), oldest first."""
    if n < 1:
        raise CheckpointError(f"the number of checkpoints to average must be >= 1 (got {n})")
    found = step_checkpoints(ckpt_dir)
    if len(found) < n:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(found)} step_<k>.pt checkpoint(s), fewer than {n} "
            "(train with trainer.keep_last >= N to keep them)"
        )
    if by == "last":
        return [p for _, p in found[-n:]]
    if by != "best":
        raise ValueError(f"by must be 'last' or 'best', not {by!r}")
    from .checkpoint import load_checkpoint

    def bleu(path: Path) -> float:
        value = (load_checkpoint(path).get("metrics") or {}).get("bleu")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf

    scored = sorted(found, key=lambda sp: (bleu(sp[1]), sp[0]), reverse=True)[:n]
    return [p for _, p in sorted(scored)]
