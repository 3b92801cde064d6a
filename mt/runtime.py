"""Where and how the work runs: the device, the precision, CUDA graphs on or off, and the
autocast region every forward pass of mt runs in.

    device = resolve_device("auto")                       # cuda if there is one, else cpu
    amp_dtype = resolve_precision("auto", device)          # bf16 on CUDA, None (fp32) elsewhere
    use_graphs = resolve_cuda_graphs("auto", device)       # on for CUDA work (torchrun too)
    with autocast(device, amp_dtype):
        logits, _ = model(src, src_len, tgt_in)

Training (mt.trainer), decoding (mt.translator, mt.evaluate) and the CUDA-graph runners
(mt.graphs) all resolve their settings here, so a setting means the same everywhere.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from .errors import MTError


def resolve_device(name: str | None, local_rank: int | None = None, distributed: bool = False) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch.device; anything unusable is an MTError.

    For training, `local_rank` names this process's GPU: under torchrun "auto" and a bare "cuda"
    mean cuda:LOCAL_RANK (and "auto" means cuda:0 in a single process)."""
    name = (name or "auto").strip()
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise MTError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
        _check_available(device, name)
    if local_rank is not None and device.type == "cuda" and device.index is None and (distributed or name == "auto"):
        device = torch.device(f"cuda:{local_rank}")
        _check_available(device, str(device))
    return device


def _check_available(device: torch.device, name: str) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MTError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MTError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise MTError(f"device {name!r} asked for, but MPS is not available here")
    elif device.type != "cpu":
        raise MTError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """trainer.precision -> the autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "fp16":  # fp16 gradients underflow without a GradScaler, which mt does not use
        raise MTError("trainer.precision=fp16 needs loss scaling, which mt does not do; use bf16 or fp32")
    table = {"bf16": torch.bfloat16, "fp32": None}
    if name not in table:
        raise MTError(f"unknown trainer.precision={name!r}; use auto, bf16 or fp32")
    return table[name]


def set_tf32(value: Any) -> None:
    """trainer.tf32: how fp32 matrix products run on GPUs that have TF32 (Ampere and newer).

    auto   PyTorch's own defaults: cuDNN (and so the cuDNN LSTM, and our Triton cell, which follows
           the same flag: mt.kernels.triton_cell.fp32_precision) in TF32, other matmuls in IEEE fp32
    true   TF32 for every fp32 matmul as well (`torch.backends.cuda.matmul.allow_tf32`)
    false  IEEE fp32 everywhere: cuDNN, matmuls and our cell (for exact comparisons)

    bf16 training (the GPU default) is not affected. Sets the process-wide torch flags."""
    v = str(value).strip().lower()
    if v == "auto":
        return
    if v in ("true", "1", "yes", "on"):
        on = True
    elif v in ("false", "0", "no", "off"):
        on = False
    else:
        raise MTError(f"unknown trainer.tf32={value!r}; use auto, true or false")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def resolve_cuda_graphs(
    value: Any,
    device: torch.device,
    *,
    key: str = "trainer.cuda_graphs",
    task: str = "training",
) -> bool:
    """auto | true | false -> on/off: auto = on for CUDA work (under torchrun too: the ranks then
    average their gradients inside the captured step, over NCCL; mt.distributed.FlatGradients);
    true where it cannot work is an MTError. key/task name the setting and the work in the messages."""
    v = str(value).strip().lower()
    if v == "auto":
        return device.type == "cuda"
    if v in ("true", "1", "yes", "on"):
        if device.type != "cuda":
            raise MTError(f"{key}=true needs CUDA, but {task} runs on {device}; use {key}=auto or false")
        return True
    if v in ("false", "0", "no", "off", "none"):
        return False
    raise MTError(f"unknown {key}={value!r}; use auto, true or false")


def autocast(
    device: torch.device | str, amp_dtype: torch.dtype | None, cache_enabled: bool = True
) -> AbstractContextManager:
    """The autocast region for `amp_dtype` (None: fp32, autocast off). cache_enabled=False for
    code captured in a CUDA graph: the weight-cast cache would hand the graph tensors that die
    with the region."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(
        device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None, cache_enabled=cache_enabled
    )
