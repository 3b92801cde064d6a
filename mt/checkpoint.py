"""Checkpoints: written atomically, read with `torch.load(weights_only=True)` (no pickled code).

A checkpoint is a plain dict of tensors and Python primitives:
    format, version, model, optimizer, scheduler, step, epoch, batch_in_epoch, best_bleu,
    bad_evals, rng, config (TrainConfig as a dict), tokenizer (SentencePiece model bytes), metrics
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line

FORMAT = "mt-checkpoint"
VERSION = 1
REQUIRED = ("model", "config", "tokenizer", "step")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make `dst` the checkpoint `src` is now, atomically, without serializing it again: a hard
    link renamed over `dst` (a copy, fsynced, where the filesystem has no hard links).

    mt.train writes best.pt and then links last.pt to it: one 200 MB write per improving
    validation instead of two. Best first: a crash in between leaves last.pt at the previous
    validation, which a resume repeats, never a best.pt older than the best BLEU in last.pt.
    The link stays right because `save_checkpoint` never writes into an existing file: the next
    last.pt is a new file renamed over the name, and best.pt keeps the old one."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            if not src.is_file():
                raise
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:  # left only by a failure, or by a rename onto the same file (which does nothing)
        tmp.unlink(missing_ok=True)
    return dst


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint; any problem is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code...
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mt checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this mt reads {VERSION}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    return state
