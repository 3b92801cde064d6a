"""Data-parallel training under torchrun, and the random state a resumed run restores.

    torchrun --nproc_per_node=2 -m mt.train hydra.run.dir=OUT ...

`Distributed` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); with one process
every collective is a no-op, so the training loop is written once for both cases.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.distributed as dist


class Distributed:
    """torchrun environment: rank, world size; gloo on CPU, NCCL on CUDA."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum_(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small device tensor over ranks, in place (queued on the stream: no host sync)."""
        if self.enabled:
            dist.all_reduce(values)
        return values

    def broadcast(self, values: list[float], device: torch.device) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.broadcast(t, 0)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random generators, as a checkpoint stores them (one entry per rank)."""
    state = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
