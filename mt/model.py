"""The translation model: bidirectional LSTM encoder, attention, input-feeding LSTM decoder.

    src (B, S) -> Encoder -> memory (B, S, H), final states -> bridge -> decoder state
    tgt_in (B, T) -> Decoder: per step t
        h_t    = LSTM stack([emb(y_{t-1}) ; feed_{t-1}], state)            # (B, H)
        ctx_t  = attention(h_t, memory)                                      # (B, H)
        feed_t = tanh(W_c [ctx_t ; h_t])   (Luong's attentional vector)      # (B, H)
        logits = W_out dropout(feed_t)                                       # (B, V)

Every LSTM runs through the shared gate cell (`mt.kernels`, backends "triton" / "torch") or,
with `cell="cudnn"`, through nn.LSTM / nn.LSTMCell holding the very same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import ModelConfig
from .errors import MTError
from .modules.attention import Attention
from .modules.lstm import DecoderLSTM, EncoderLSTM, compute_dtype

CELLS = ("auto", "triton", "torch", "cudnn")


@dataclass
class Memory:
    """What the decoder attends to, computed once per source batch."""

    out: Tensor  # (B, S, M) encoder outputs
    keys: Tensor  # (B, S, Q) memory side of the attention scores
    mask: Tensor  # (B, S) True at real source tokens
    backend: str
    weights: list[tuple[Tensor, Tensor]] | None = None  # gate-cell step weights (decoding)
    casts: dict[str, Tensor] | None = None  # decoding under CUDA graphs: `Decoder.step_casts`

    def index_select(self, idx: Tensor) -> Memory:
        out = self.out.index_select(0, idx)
        keys = out if self.keys is self.out else self.keys.index_select(0, idx)  # dot: keys are out
        return Memory(out, keys, self.mask.index_select(0, idx), self.backend, self.weights, self.casts)

    def static_copy(self) -> Memory:
        """Copies of the tensors (mt.graphs' static buffers; `copy_` refills them), without the
        step weights and casts, which the caller sets."""
        out = self.out.clone()
        keys = out if self.keys is self.out else self.keys.clone()
        return Memory(out, keys, self.mask.clone(), self.backend)

    def copy_(self, other: Memory) -> None:
        """`other`'s tensors (same shapes) into this memory's."""
        self.out.copy_(other.out)
        if self.keys is not self.out:
            self.keys.copy_(other.keys)
        self.mask.copy_(other.mask)


@dataclass
class DecoderState:
    h: list[Tensor]  # per layer (B, H)
    c: list[Tensor]  # per layer (B, H)
    feed: Tensor  # (B, H) previous attentional vector (input feeding)

    def index_select(self, idx: Tensor) -> DecoderState:
        """Reorder / repeat the batch (beam search)."""
        return DecoderState(
            [h.index_select(0, idx) for h in self.h],
            [c.index_select(0, idx) for c in self.c],
            self.feed.index_select(0, idx),
        )

    def tensors(self) -> list[Tensor]:
        """h of every layer, c of every layer, the feed: what a search step carries forward."""
        return [*self.h, *self.c, self.feed]

    def with_tensors(self, tensors: list[Tensor]) -> DecoderState:
        """A state of this one's structure holding `tensors` (in `tensors()`'s order)."""
        L = len(self.h)
        return DecoderState(list(tensors[:L]), list(tensors[L : 2 * L]), tensors[2 * L])


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        dirs = 2 if cfg.bidirectional else 1
        if cfg.hidden_dim % dirs:
            raise MTError(f"model.hidden_dim={cfg.hidden_dim} must be even for a bidirectional encoder")
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.rnn = EncoderLSTM(cfg.emb_dim, cfg.hidden_dim // dirs, cfg.enc_layers, cfg.bidirectional, cfg.dropout)

    def forward(
        self, src: Tensor, src_len: Tensor, backend: str, graph_safe: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """src (B, S), src_len (B,) -> out (B, S, H), h_n (L, B, H), c_n (L, B, H)."""
        emb = self.emb_dropout(self.embedding(src))  # (B, S, E)
        return self.rnn(emb, src_len, backend, graph_safe)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding, vocab_size: int):
        super().__init__()
        H = cfg.hidden_dim
        self.cfg = cfg
        self.embedding = embedding
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.rnn = DecoderLSTM(cfg.emb_dim, H if cfg.input_feeding else 0, H, cfg.dec_layers, cfg.dropout)
        self.attention = Attention(cfg.attention, H, H)
        self.combine = nn.Linear(2 * H, H, bias=False)  # W_c [ctx ; h]
        self.out_dropout = nn.Dropout(cfg.dropout)
        self.generator = nn.Linear(H, vocab_size)
        if cfg.tie_output:
            if cfg.emb_dim != H:
                raise MTError(f"model.tie_output needs model.emb_dim == model.hidden_dim (got {cfg.emb_dim} and {H})")
            self.generator.weight = embedding.weight
        if cfg.bridge == "dense":
            self.bridge_h = nn.Linear(H, H)
            self.bridge_c = nn.Linear(H, H)
        elif cfg.bridge != "zero":
            raise MTError(f"unknown model.bridge={cfg.bridge!r}; choose dense or zero")

    def init_state(self, h_enc: Tensor, c_enc: Tensor) -> DecoderState:
        """Bridge: encoder final states (L_enc, B, H) -> decoder state. With equal depths layer l
        starts from encoder layer l, otherwise every layer from the top encoder layer."""
        L, (B, H) = self.cfg.dec_layers, h_enc.shape[1:]
        acc = torch.promote_types(
            c_enc.dtype, torch.float32
        )  # the gate cell carries c in fp32 (cudnn: autocast casts it)
        src_layer = [k if h_enc.shape[0] == L else -1 for k in range(L)]
        if self.cfg.bridge == "dense":
            h = [torch.tanh(self.bridge_h(h_enc[k])) for k in src_layer]
            c = [self.bridge_c(c_enc[k]).to(acc) for k in src_layer]
        else:
            h = [h_enc.new_zeros(B, H) for _ in range(L)]
            c = [h_enc.new_zeros(B, H, dtype=acc) for _ in range(L)]
        return DecoderState(h, c, h_enc.new_zeros(B, H))

    def _step(self, x_t: Tensor, state: DecoderState, memory: Memory, weights) -> tuple[Tensor, DecoderState, Tensor]:
        feed = state.feed if self.cfg.input_feeding else None
        h, c = self.rnn.step(x_t, feed, state.h, state.c, memory.backend, weights)
        top = h[-1]  # (B, H)
        ctx, attn = self.attention(top, memory.keys, memory.out, memory.mask, memory.backend)  # (B, H), (B, S)
        both = torch.cat([ctx.to(top.dtype), top], dim=-1)  # (B, 2H)
        out = torch.tanh(
            self.combine(both) if memory.casts is None else F.linear(both, memory.casts["combine"])
        )  # (B, H)
        return out, DecoderState(h, c, out), attn

    def _inputs(self, tokens: Tensor, backend: str) -> tuple[Tensor, list | None]:
        emb = self.emb_dropout(self.embedding(tokens))  # (..., E)
        if backend == "cudnn":
            return emb, None
        dtype = compute_dtype(emb.device, emb.dtype)
        # training with the Triton cell: the T steps' weight gradients as one matmul after the loop
        # (triton_cell.DeferredWeightGrad), not a matmul and an add per step and layer
        defer = backend == "triton" and torch.is_grad_enabled()
        return self.rnn.precompute(emb, dtype), self.rnn.step_weights(dtype, defer_grads=defer)

    def forward(self, tgt_in: Tensor, state: DecoderState, memory: Memory) -> tuple[Tensor, Tensor]:
        """Teacher forcing: tgt_in (B, T) -> logits (B, T, V), attention (B, T, S)."""
        x, weights = self._inputs(tgt_in, memory.backend)  # (B, T, E) or (B, T, 4H)
        outs, attns = [], []
        # unbind, not x[:, t]: its backward is one stack of the T step gradients, where T
        # selects' backwards would each fill a zero (B, T, .) tensor, copy a slice, and add it up
        for x_t in x.unbind(1):  # (B, E) or (B, 4H)
            out, state, attn = self._step(x_t, state, memory, weights)
            outs.append(out)
            attns.append(attn)
        hidden = torch.stack(outs, dim=1)  # (B, T, H)
        return self.generator(self.out_dropout(hidden)), torch.stack(attns, dim=1)

    def step(self, tokens: Tensor, state: DecoderState, memory: Memory) -> tuple[Tensor, DecoderState, Tensor]:
        """Incremental decoding: previous tokens (B,) -> log-probs (B, V), new state, attention (B, S)."""
        logits, state, attn = self.step_logits(tokens, state, memory)
        return torch.log_softmax(logits.float(), dim=-1), state, attn

    def step_logits(self, tokens: Tensor, state: DecoderState, memory: Memory) -> tuple[Tensor, DecoderState, Tensor]:
        """`step` before the log-softmax: logits (B, V) in the compute dtype (mt.search fuses
        the normalisation with its top-k: kernels.log_softmax_topk)."""
        emb = self.embedding(tokens)  # (B, E)
        casts = memory.casts
        if memory.backend == "cudnn":
            x = emb
        else:
            if memory.weights is None:
                memory.weights = self.rnn.step_weights(compute_dtype(emb.device, emb.dtype))
            x = self.rnn.precompute(
                emb, memory.weights[0][0].dtype, None if casts is None else (casts["emb_w"], casts["emb_b"])
            )  # (B, 4H)
        out, state, attn = self._step(x, state, memory, memory.weights)
        logits = self.generator(out) if casts is None else F.linear(out, casts["gen_w"], casts["gen_b"])
        return logits, state, attn

    def step_casts(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The weights `step_logits` multiplies with, cast to `dtype` once (mt.graphs refreshes
        them once per batch): inside a CUDA graph autocast has no weight cache, so otherwise
        every replayed step would cast the output layer (V x H) and the others again."""
        emb_w, emb_b = self.rnn.input_weights(dtype)
        return {
            "emb_w": emb_w,
            "emb_b": emb_b,
            "combine": self.combine.weight.to(dtype),
            "gen_w": self.generator.weight.to(dtype),
            "gen_b": self.generator.bias.to(dtype),
        }


def cell_backend(cell: str, device: torch.device | str) -> str:
    """What model.cell runs as on `device`: "cudnn", "triton" or "torch" (an MTError if unusable).

    auto is the fastest for the device: the Triton cell on CUDA; elsewhere ATen's LSTM on the same
    parameters ("cudnn": nn.LSTM / nn.LSTMCell), faster on CPU than the reference cell's separate
    matmul and elementwise ops (measured in docs/experiments.md, "CPU throughput of the cell
    backends"). "torch" still picks the reference cell anywhere."""
    if cell not in CELLS:
        raise MTError(f"unknown model.cell={cell!r}; choose one of {', '.join(CELLS)}")
    if cell == "auto":
        return "triton" if torch.device(device).type == "cuda" and kernels.triton_available() else "cudnn"
    return "cudnn" if cell == "cudnn" else kernels.resolve_backend(cell, device)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__()
        if cfg.cell not in CELLS:
            raise MTError(f"unknown model.cell={cfg.cell!r}; choose one of {', '.join(CELLS)}")
        self.cfg = cfg
        self.pad_id = pad_id
        src_emb = nn.Embedding(src_vocab_size, cfg.emb_dim, padding_idx=pad_id)
        if cfg.share_embeddings:
            if src_vocab_size != tgt_vocab_size:
                raise MTError("model.share_embeddings needs one joint vocabulary (tokenizer.joint=true)")
            tgt_emb = src_emb
        else:
            tgt_emb = nn.Embedding(tgt_vocab_size, cfg.emb_dim, padding_idx=pad_id)
        for emb in {id(src_emb): src_emb, id(tgt_emb): tgt_emb}.values():
            nn.init.normal_(emb.weight, std=cfg.emb_dim**-0.5)
            with torch.no_grad():
                emb.weight[pad_id].zero_()
        self.encoder = Encoder(cfg, src_emb)
        self.decoder = Decoder(cfg, tgt_emb, tgt_vocab_size)
        # True: no host synchronisation anywhere in forward/backward, so a CUDA graph can capture
        # them (only model.cell=cudnn changes: its encoder runs cuDNN on the padded batch instead
        # of packing it; same results). Set by mt.graphs.GraphedTrainStep.
        self.graph_safe = False

    def backend(self, device: torch.device) -> str:
        return cell_backend(self.cfg.cell, device)

    def encode(self, src: Tensor, src_len: Tensor) -> tuple[Memory, DecoderState]:
        """src (B, S), src_len (B,) -> attention memory and the decoder's initial state."""
        backend = self.backend(src.device)
        out, h, c = self.encoder(src, src_len, backend, self.graph_safe)  # (B, S, H), (L, B, H) x2
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_len[:, None]  # (B, S)
        memory = Memory(out, self.decoder.attention.keys(out), mask, backend)
        return memory, self.decoder.init_state(h, c)

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits (B, T, V) and attention weights (B, T, S)."""
        memory, state = self.encode(src, src_len)
        return self.decoder(tgt_in, state, memory)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["Seq2Seq", "Memory", "DecoderState", "cell_backend", "count_parameters"]
