"""`lstm_sequence` of `mt.kernels.triton_cell` captured as CUDA graphs and replayed, forward
and backward: the `graph` column of the encoder workload in bench_cell.py. A benchmark's helper,
not part of `mt` (training captures whole steps instead: `mt.graphs`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mt.kernels.triton_cell import lstm_sequence


def _sequence_fn(has_lengths: bool, has_h0: bool, has_c0: bool):
    """lstm_sequence as a function of tensors only (make_graphed_callables takes no None)."""

    def fn(xproj, w_hh, *rest):
        it = iter(rest)
        lengths = next(it) if has_lengths else None
        h0 = next(it) if has_h0 else None
        c0 = next(it) if has_c0 else None
        return lstm_sequence(xproj, w_hh, lengths=lengths, h0=h0, c0=c0)

    return fn


class GraphedLSTMSequence:
    """`lstm_sequence` captured as CUDA graphs once per (shapes, strides, dtypes, device,
    requires_grad, optional-argument) key, then replayed: T launches become one graph launch.

    - Training (grad enabled and some input requires grad): `torch.cuda.make_graphed_callables`
      captures forward AND backward (the T backward launches + the d W_hh matmul) as two graphs
      inside one autograd node.
    - Inference (no grad): one hand-captured `torch.cuda.CUDAGraph` of the forward.
    - CPU tensors, float64 or capture-incompatible settings (autocast caching): plain eager
      `lstm_sequence`.

    Rules that come with graphs (read before use):
    - Inputs are copied into static buffers on every call (one device copy each); `lengths` is
      moved to the device and cast to int32 eagerly before the replay, so a CPU `lengths` works.
    - Outputs (and, in training, the returned gradients) are the graph's static buffers: the next
      replay of the same key overwrites them, and the saved activations too. So use ONE instance
      per call site (e.g. per encoder layer) and do not call an instance twice for the same key
      before the backward of the first call has run. Clone outputs you want to keep.
    - The first call per key runs 3 warm-up iterations (Triton compiles there, never during
      capture) and captures: slow once.
    - The captured graph reads `w_hh` from the static copy, so weights updated in place between
      calls are seen (the copy happens at every call).
    """

    def __init__(self, num_warmup_iters: int = 3):
        self.num_warmup_iters = num_warmup_iters
        self._cache: dict = {}

    def __call__(
        self,
        xproj: Tensor,
        w_hh: Tensor,
        lengths: Tensor | None = None,
        h0: Tensor | None = None,
        c0: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        eager = (
            xproj.device.type != "cuda"
            or xproj.dtype == torch.float64
            or (torch.is_autocast_enabled() and torch.is_autocast_cache_enabled())
        )
        if eager:
            return lstm_sequence(xproj, w_hh, lengths=lengths, h0=h0, c0=c0)
        if lengths is not None:
            lengths = lengths.to(device=xproj.device, dtype=torch.int32)
        flags = (lengths is not None, h0 is not None, c0 is not None)
        args = tuple(a for a in (xproj, w_hh, lengths, h0, c0) if a is not None)
        train = torch.is_grad_enabled() and any(a.requires_grad for a in args)
        key = (
            flags,
            train,
            xproj.device,
            tuple((tuple(a.shape), a.stride(), a.dtype, a.requires_grad) for a in args),
        )
        runner = self._cache.get(key)
        if runner is None:
            runner = self._capture(_sequence_fn(*flags), args, train)
            self._cache[key] = runner
        return runner(*args)

    def _capture(self, fn, args: tuple[Tensor, ...], train: bool):
        # static inputs with the same strides as the real ones (the key includes strides)
        static = tuple(
            torch.empty_strided(a.shape, a.stride(), device=a.device, dtype=a.dtype)
            .copy_(a)
            .requires_grad_(a.requires_grad and train)
            for a in args
        )
        if train:
            return torch.cuda.make_graphed_callables(fn, static, num_warmup_iters=self.num_warmup_iters)
        static = tuple(a.detach() for a in static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(self.num_warmup_iters):  # compile and warm up outside the capture
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = fn(*static)

        def replay(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            for dst, src in zip(static, inputs):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            graph.replay()
            return static_out

        return replay
