"""Ensemble decoding: several models that share a tokenizer decode as one.

    from mt.ensemble import Ensemble
    ens = Ensemble([model_a, model_b])                 # combine="logprob" (default) or "prob"
    out = beam_search(ens, src, src_len, bos, eos)     # any mt.search function, graphs= too

An `Ensemble` looks to mt.search and mt.graphs like one `Seq2Seq`: `encode` runs every member's
encoder and returns an `EnsembleMemory` / `EnsembleState` holding each member's `Memory` /
`DecoderState` (their sizes may differ: hidden size, layers, attention and cell are the
member's own), and `decoder.step_logits` runs every member's decoder step and combines the
members' next-token distributions:

    combine="logprob"   mean_i log p_i(y)                     (OpenNMT-py's default)
    combine="prob"      log (1/n sum_i p_i(y))                 (OpenNMT-py's avg_raw_probs)

The search takes the log-softmax of what `step_logits` returns, as it does of a model's logits.
Of the "prob" average that changes nothing (it is a distribution already); the mean of
log-probabilities is renormalized by it: the ensemble's distribution is then the normalized
geometric mean p(y) = prod_i p_i(y)^(1/n) / Z, with Z = sum_v prod_i p_i(v)^(1/n) <= 1. So the
scores of ensemble hypotheses are, like a single model's, sums of the log-probabilities of a
distribution over the target vocabulary. (OpenNMT-py leaves the mean unnormalized: its scores are
lower by the sum of log Z over the steps, and its beam can rank hypotheses slightly differently.)
The attention the search records is the first member's. An ensemble of one model returns that
model's logits untouched: it decodes exactly as the model does.

`forward` (teacher forcing) returns the combined values for every position in the same way.

Members must share the tokenizer (the same pieces with the same ids on both sides) and the
language pair: `check_compatible` says in one line where two models differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import MTError
from .model import DecoderState, Memory, Seq2Seq

COMBINES = ("logprob", "prob")


def check_combine(combine: str) -> str:
    """`combine` if it names a way to combine the members (see the module docstring), else an MTError."""
    if combine not in COMBINES:
        raise MTError(f"unknown ensemble combine={combine!r}; choose logprob (mean log-probability) or prob")
    return combine


def combine_logits(logits: Sequence[Tensor], combine: str) -> Tensor:
    """The members' logits (..., V) -> values whose log-softmax is the ensemble's distribution:
    one member's logits as they are; else the mean of the members' log-softmax ("logprob") or
    the log of the mean of their probabilities ("prob"), in float32 at least."""
    if len(logits) == 1:
        return logits[0]
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    logp = torch.stack([torch.log_softmax(x.to(dtype), dim=-1) for x in logits])  # (n, ..., V)
    if combine == "prob":
        return torch.logsumexp(logp, dim=0) - math.log(len(logits))
    return logp.mean(dim=0)


@dataclass
class EnsembleMemory:
    """Each member's `Memory` of one source batch. `out` and `mask` (the first member's) give the
    search its shapes; `backend` is the members' common gate-cell backend ("mixed" when they
    differ): the search's fused Triton top-k and bookkeeping run when it is "triton"."""

    parts: list[Memory]
    backend: str

    @property
    def out(self) -> Tensor:
        return self.parts[0].out

    @property
    def mask(self) -> Tensor:
        return self.parts[0].mask

    def index_select(self, idx: Tensor) -> EnsembleMemory:
        return EnsembleMemory([m.index_select(idx) for m in self.parts], self.backend)

    def static_copy(self) -> EnsembleMemory:
        return EnsembleMemory([m.static_copy() for m in self.parts], self.backend)

    def copy_(self, other: EnsembleMemory) -> None:
        for dst, src in zip(self.parts, other.parts, strict=True):
            dst.copy_(src)


@dataclass
class EnsembleState:
    """Each member's `DecoderState` (h, c per layer and the input feed, of the member's sizes)."""

    parts: list[DecoderState]

    def index_select(self, idx: Tensor) -> EnsembleState:
        return EnsembleState([d.index_select(idx) for d in self.parts])

    def tensors(self) -> list[Tensor]:
        return [t for d in self.parts for t in d.tensors()]

    def with_tensors(self, tensors: Sequence[Tensor]) -> EnsembleState:
        out, k = [], 0
        for d in self.parts:
            n = len(d.tensors())
            out.append(d.with_tensors(tensors[k : k + n]))
            k += n
        return EnsembleState(out)


class _EnsembleDecoder:
    """The `decoder` the searches step: every member's decoder, combined (`combine_logits`)."""

    def __init__(self, ensemble: Ensemble):
        self._ensemble = ensemble

    def step_logits(
        self, tokens: Tensor, state: EnsembleState, memory: EnsembleMemory
    ) -> tuple[Tensor, EnsembleState, Tensor]:
        """Previous tokens (N,) -> combined values (N, V) (their log-softmax: the ensemble's
        log-probabilities), the members' new states, the first member's attention (N, S)."""
        ens = self._ensemble
        outs = [
            m.decoder.step_logits(tokens, d, mem)
            for m, d, mem in zip(ens.members, state.parts, memory.parts, strict=True)
        ]
        logits = combine_logits([o[0] for o in outs], ens.combine)
        return logits, EnsembleState([o[1] for o in outs]), outs[0][2]

    def step(
        self, tokens: Tensor, state: EnsembleState, memory: EnsembleMemory
    ) -> tuple[Tensor, EnsembleState, Tensor]:
        """`step_logits`, then the log-softmax: the ensemble's log-probabilities (N, V)."""
        logits, state, attn = self.step_logits(tokens, state, memory)
        return torch.log_softmax(logits.float(), dim=-1), state, attn

    def __call__(self, tgt_in: Tensor, state: EnsembleState, memory: EnsembleMemory) -> tuple[Tensor, Tensor]:
        """Teacher forcing: tgt_in (B, T) -> combined values (B, T, V), first member's attention."""
        ens = self._ensemble
        outs = [m.decoder(tgt_in, d, mem) for m, d, mem in zip(ens.members, state.parts, memory.parts, strict=True)]
        return combine_logits([o[0] for o in outs], ens.combine), outs[0][1]


class Ensemble(nn.Module):
    """Models decoding together (see the module docstring). They must share the target
    vocabulary and the padding id; `check_compatible` checks their tokenizers."""

    def __init__(self, models: Sequence[Seq2Seq], combine: str = "logprob"):
        super().__init__()
        if not models:
            raise MTError("an ensemble needs at least one model")
        self.combine = check_combine(combine)
        self.members = nn.ModuleList(models)
        first = models[0]
        for i, m in enumerate(models[1:], start=2):
            if m.pad_id != first.pad_id:
                raise MTError(f"ensemble member {i} pads with id {m.pad_id}, member 1 with {first.pad_id}")
            v, v1 = m.decoder.generator.out_features, first.decoder.generator.out_features
            if v != v1:
                raise MTError(f"ensemble member {i} has a target vocabulary of {v} pieces, member 1 of {v1}")
        self.pad_id = first.pad_id
        self.decoder = _EnsembleDecoder(self)

    @property
    def cfg(self):
        """The first member's model config (what a single-model caller reads: cell, sizes)."""
        return self.members[0].cfg

    @property
    def graph_safe(self) -> bool:
        return all(m.graph_safe for m in self.members)

    @graph_safe.setter
    def graph_safe(self, value: bool) -> None:
        for m in self.members:
            m.graph_safe = value

    def backend(self, device: torch.device) -> str:
        """The members' common gate-cell backend on `device`, "mixed" when they differ."""
        backends = {m.backend(device) for m in self.members}
        return backends.pop() if len(backends) == 1 else "mixed"

    def encode(self, src: Tensor, src_len: Tensor) -> tuple[EnsembleMemory, EnsembleState]:
        parts = [m.encode(src, src_len) for m in self.members]
        backends = {mem.backend for mem, _ in parts}
        backend = backends.pop() if len(backends) == 1 else "mixed"
        return EnsembleMemory([p[0] for p in parts], backend), EnsembleState([p[1] for p in parts])

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: combined values (B, T, V) (their log-softmax: the ensemble's
        log-probabilities) and the first member's attention (B, T, S)."""
        memory, state = self.encode(src, src_len)
        return self.decoder(tgt_in, state, memory)


def members(model: nn.Module) -> list[Seq2Seq]:
    """An ensemble's models, or [model]."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def memory_parts(memory) -> list[Memory]:
    """An ensemble memory's per-member memories, or [memory]."""
    return list(memory.parts) if isinstance(memory, EnsembleMemory) else [memory]


def check_compatible(tokenizers: Sequence, languages: Sequence[tuple[str, str]], names: Sequence[str]) -> None:
    """One-line MTError unless every tokenizer maps the same pieces to the same ids as the first
    (both sides, special ids included) and every language pair is the first's."""
    tok0, (src0, tgt0), name0 = tokenizers[0], languages[0], names[0]
    for tok, (src, tgt), name in zip(tokenizers[1:], languages[1:], names[1:]):
        if (src, tgt) != (src0, tgt0):
            raise MTError(
                f"cannot ensemble {name0} ({src0}->{tgt0}) with {name} ({src}->{tgt}): the language pairs differ"
            )
        why = tokenizer_mismatch(tok0, tok)
        if why:
            raise MTError(f"cannot ensemble {name0} with {name}: their tokenizers differ ({why})")


def tokenizer_mismatch(a, b) -> str | None:
    """Where two mt.tokenizer.Tokenizers differ, in a few words, or None when they encode and
    decode alike: identical SentencePiece models, or the same special ids and, on both sides, the
    same pieces with the same scores and types (a model trained again on the same text can differ
    in its recorded training options only)."""
    specials = ("pad_id", "unk_id", "bos_id", "eos_id")
    if tuple(getattr(a, k) for k in specials) != tuple(getattr(b, k) for k in specials):
        return "special ids"
    for side, pa, pb, sa, sb in (
        ("source", a._src_proto, b._src_proto, a._src, b._src),
        ("target", a._tgt_proto, b._tgt_proto, a._tgt, b._tgt),
    ):
        if pa == pb:
            continue
        na, nb = sa.get_piece_size(), sb.get_piece_size()
        if na != nb:
            return f"{side} vocabulary of {na} vs {nb} pieces"
        for i in range(na):
            if sa.id_to_piece(i) != sb.id_to_piece(i):
                return f"{side} piece {i} is {sa.id_to_piece(i)!r} vs {sb.id_to_piece(i)!r}"
            if sa.get_score(i) != sb.get_score(i) or sa.is_unknown(i) != sb.is_unknown(i):
                return f"{side} piece {i} ({sa.id_to_piece(i)!r}) scores differently"
    return None


__all__ = [
    "Ensemble",
    "EnsembleMemory",
    "EnsembleState",
    "COMBINES",
    "check_combine",
    "combine_logits",
    "check_compatible",
    "tokenizer_mismatch",
    "members",
    "memory_parts",
]
