"""Checkpoints: written atomically, read with `torch.load(weights_only=True)` (no pickled code).

A checkpoint is a plain dict of tensors and Python primitives:
    format, version, model, optimizer, scheduler, step, epoch, batch_in_epoch, best_bleu,
    bad_evals, rng, config (TrainConfig as a dict), tokenizer (SentencePiece model bytes), metrics
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, first_line
from .step_stats import pinned_if_possible

log = logging.getLogger(__name__)

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


class CheckpointWriter:
    """Writes checkpoints on a background thread, so training does not wait for the disk.

        writer.save(state, best_path, also=last_path)   # snapshot now, write in the background
        ...
        writer.wait()                                    # the write is on disk (or its error raised)

    `before_write(snapshot)`, if given, runs on the thread first and may complete the snapshot
    (mt.train finishes a validation's report there: the slower metrics, TensorBoard, the log).
    Its error does not stop the write; it is raised by the next `save` or `wait`, as it is,
    unless the write failed too: then the write's CheckpointError is raised and the other logged.

    `also` may name several paths (each a hard link to `path`: best.pt -> last.pt, step_<k>.pt);
    `derived` are (path, make) pairs: `make(snapshot)` is written as a checkpoint of its own
    (ema.pt); `after_write` runs last (pruning old step_<k>.pt).

    `save` copies the state's tensors to the CPU (the parameters keep changing) and returns; the
    thread then does `save_checkpoint` (temp file, fsync, rename: atomic as ever) and, with
    `also`, `copy_checkpoint(path, also)`. One write at a time: `save` first waits for the
    previous one. A failed write raises a CheckpointError at the next `save` or `wait`. The thread is
    not a daemon: an interrupted process still finishes the write in flight.

    The snapshot reuses its CPU buffers from one save to the next (pinned for CUDA tensors), so
    only the first save pays for fresh memory: copying the de->en recipe's 231 MB of tensors
    took 0.3 s into new buffers and 0.05 s into reused ones on a 2-core VM. Tensors that share
    memory (a tied embedding) stay shared.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: list[torch.Tensor] = []  # the k-th tensor of the last snapshot

    def _snapshot(self, obj: Any, seen: dict, count: list[int]) -> Any:
        """`obj` with every tensor copied into a CPU buffer and every dict, list and tuple
        rebuilt (other leaves, numbers, strings and bytes, are immutable)."""
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            key = (
                src.untyped_storage().data_ptr(),
                src.storage_offset(),
                tuple(src.shape),
                tuple(src.stride()),
                src.dtype,
                src.device,
            )
            if key in seen:
                return seen[key]
            k = count[0]
            count[0] += 1
            buf = self._buffers[k] if k < len(self._buffers) else None
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = pinned_if_possible(
                    lambda pin: torch.empty(src.shape, dtype=src.dtype, pin_memory=pin), src.is_cuda
                )
                self._buffers[k : k + 1] = [buf]
            seen[key] = buf.copy_(src)
            return buf
        if isinstance(obj, dict):
            out = type(obj)((k, self._snapshot(v, seen, count)) for k, v in obj.items())
            if hasattr(obj, "_metadata"):  # a state_dict's per-module versions, for load_state_dict
                out._metadata = copy.deepcopy(obj._metadata)
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._snapshot(v, seen, count) for v in obj)
        return obj

    def save(
        self,
        state: dict[str, Any],
        path: str | os.PathLike,
        also: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        before_write: Callable[[dict[str, Any]], None] | None = None,
        derived: Sequence[tuple[str | os.PathLike, Callable[[dict[str, Any]], dict[str, Any]]]] = (),
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self.wait()  # also frees the buffers the previous write was reading
        snap = self._snapshot(state, {}, [0])
        links = [] if also is None else [also] if isinstance(also, (str, os.PathLike)) else list(also)

        def write() -> None:
            hook_error: BaseException | None = None
            if before_write is not None:
                try:
                    before_write(snap)
                except BaseException as e:  # the checkpoint is still written
                    hook_error = e
            try:
                save_checkpoint(snap, path)
                for link in links:
                    copy_checkpoint(path, link)
                for other, make in derived:  # e.g. ema.pt: a checkpoint of its own, from the same snapshot
                    save_checkpoint(make(snap), other)
                if after_write is not None:
                    after_write()
            except BaseException as e:  # handed to the training thread by wait(): a one-line error
                self._error = (
                    CheckpointError(f"could not write checkpoint {path}: {first_line(e)}")
                    if isinstance(e, Exception)
                    else e
                )
                if hook_error is not None:  # a missing checkpoint matters more: say this one here
                    log.warning("before the write of %s: %s", path, first_line(hook_error))
                return
            self._error = hook_error

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is done; raise its error (if `raise_error`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if raise_error:
                raise error
            log.warning("%s", first_line(error))  # the caller is failing already: say it, keep its error


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
