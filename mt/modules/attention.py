"""Attention over the encoder's outputs (source padding masked).

    dot       score(q, m) = q · m                       (Luong; needs query and memory of equal size)
    general   score(q, m) = q · (W_a m)                 (Luong)
    concat    score(q, m) = v · tanh(W_a [q ; m])       (Luong; one matrix over the concatenation)
    bahdanau  score(q, m) = v · tanh(W_q q + U_m m + b) (Bahdanau's MLP, with bias)

concat and bahdanau are both additive (an MLP); they differ in parametrisation (bias, and the
Luong form's single matrix). The memory-side part of every score (W_a m, U_m m) is computed once
per source sentence by `keys()`, not at every decoder step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from ..errors import MTError
from ..kernels import reference

KINDS = ("dot", "general", "concat", "bahdanau")


class Attention(nn.Module):
    def __init__(self, kind: str, query_dim: int, memory_dim: int):
        super().__init__()
        if kind not in KINDS:
            raise MTError(f"unknown model.attention={kind!r}; choose one of {', '.join(KINDS)}")
        if kind == "dot" and query_dim != memory_dim:
            raise MTError(f"dot attention needs equal query ({query_dim}) and memory ({memory_dim}) sizes")
        self.kind = kind
        if kind == "general":
            self.w_m = nn.Linear(memory_dim, query_dim, bias=False)
        elif kind in ("concat", "bahdanau"):
            self.w_q = nn.Linear(query_dim, query_dim, bias=kind == "bahdanau")
            self.w_m = nn.Linear(memory_dim, query_dim, bias=False)
            self.v = nn.Linear(query_dim, 1, bias=False)

    def keys(self, memory: Tensor) -> Tensor:
        """The memory side of the score, once per sentence: (B, S, M) -> (B, S, Q) (dot: memory)."""
        return memory if self.kind == "dot" else self.w_m(memory)

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor, backend: str = "torch"
    ) -> tuple[Tensor, Tensor]:
        """query (B, Q), keys (B, S, Q), memory (B, S, M), mask (B, S) True at real tokens
        -> context (B, M), weights (B, S) fp32. backend "triton" (the model's gate cell): dot
        and general attention as one fused Triton kernel (`kernels/decode_attention.py`: a
        step's scores, softmax and context), and one more for its backward in training."""
        if self.kind in ("dot", "general"):
            if backend == "triton":
                return kernels.attention_step(query, keys, memory, mask, backend="triton")
            return reference.attention_step(query, keys, memory, mask)
        hidden = torch.tanh(keys + self.w_q(query).unsqueeze(1))  # (B, S, Q)
        scores = self.v(hidden).squeeze(2)  # (B, S)
        return reference.attention_context(scores, memory, mask)
