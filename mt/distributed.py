"""Data-parallel training under torchrun, and the random state a resumed run restores.

    torchrun --nproc_per_node=2 -m mt.train hydra.run.dir=OUT ...

`Distributed` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); outside torchrun
every collective is a no-op, so the training loop is written once for both cases. Under torchrun
the process group exists even for a world of one, so that the data-parallel code paths (DDP, or
the captured step's `FlatGradients`) can be run and checked on a single GPU.

Two ways to average the gradients over the ranks:
  - eager steps: PyTorch's DistributedDataParallel, whose backward hooks all-reduce gradient
    buckets while the backward still runs;
  - CUDA-graph steps (mt.graphs.GraphedTrainStep): `FlatGradients`. Every parameter's `.grad` is a
    view of one flat buffer, so after the backward ONE all-reduce of that buffer averages every
    gradient. It is plain tensor work with fixed addresses, so the NCCL all-reduce is captured
    (NCCL >= 2.9 collectives can be), in the step's update graph, which every rank replays once a
    step whatever its batch shape (mt/graphs.py), and torchrun users keep the graphed speed.
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
        # torchrun (torch.distributed.run) sets TORCHELASTIC_RUN_ID: a world of one is still a process group
        self.enabled = self.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ

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

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers, copied into every rank's `module` in place (what DDP
        does when it wraps a model; the captured step does without the wrapper)."""
        if self.enabled:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class FlatGradients:
    """The gradients of `params` as views of one flat buffer per dtype, averaged over the ranks by
    one all-reduce each: DistributedDataParallel's averaging without its hooks, as fixed-address
    tensor work that a CUDA graph captures (mt.graphs.GraphedTrainStep calls `average_` after the
    backward, in its update graph).

        flat = FlatGradients(model.parameters(), ddp)   # before the first backward
        loss.backward()                                  # accumulates into the views, in place
        flat.average_()                                  # every rank: the mean of the ranks' gradients

    The backward accumulates into an existing `.grad` in place, so the views stay views as long
    as the gradients are zeroed in place (never set to None). Like DDP, each rank's gradient is
    that of its own loss (sum / its own tokens) and the result is their mean.
    """

    def __init__(self, params, ddp: Distributed):
        self.ddp = ddp
        params = [p for p in params if p.requires_grad]
        self.buffers: list[torch.Tensor] = []
        for dtype in dict.fromkeys(p.dtype for p in params):  # first-seen order: the same on every rank
            group = [p for p in params if p.dtype == dtype]
            flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=group[0].device)
            offset = 0
            for p in group:
                p.grad = flat[offset : offset + p.numel()].view_as(p)  # (a view: shares flat's memory)
                offset += p.numel()
            self.buffers.append(flat)
        self.params = params

    def views_intact(self) -> bool:
        """Whether every parameter's gradient is still a view of the flat buffers."""
        spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in self.buffers]
        return all(p.grad is not None and any(lo <= p.grad.data_ptr() < hi for lo, hi in spans) for p in self.params)

    def average_(self) -> None:
        """Sum every buffer over the ranks and divide by the world size, in place, on the stream."""
        if not self.ddp.enabled:
            return
        for flat in self.buffers:
            dist.all_reduce(flat)
            flat.div_(self.ddp.world)


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
