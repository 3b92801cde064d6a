"""LSTM layers built on the shared gate cell (`mt.kernels`).

Parameters live in `torch.nn.LSTM` / `torch.nn.LSTMCell` modules, so they have exactly cuDNN's
layout and names (weight_ih_l0 (4H, K), weight_hh_l0 (4H, H), bias_ih_l0, bias_hh_l0, gate order
i, f, g, o). The "cudnn" backend simply calls those modules; the "torch" and "triton" backends
run the same parameters through our gate cell. Same weights, same outputs: `tests/test_model.py`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import kernels


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in here: autocast's when it is on, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


class EncoderLSTM(nn.Module):
    """Multi-layer, optionally bidirectional LSTM over padded batches (right padding).

    x: (B, T, I), lengths: (B,) -> out (B, T, D*H), h_n (L, B, D*H), c_n (L, B, D*H)
    where D = 2 when bidirectional; the final states of both directions are concatenated per layer.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, dropout: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_dirs = 2 if bidirectional else 1
        self.dropout = dropout
        # Holds the parameters (cuDNN layout); applies dropout between layers like we do.
        self.rnn = nn.LSTM(
            input_size,
            hidden_size,
            num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def _layer_params(self, layer: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        sfx = [f"_l{layer}", f"_l{layer}_reverse"][: self.num_dirs]
        r = self.rnn
        return [
            (
                getattr(r, "weight_ih" + s),
                getattr(r, "weight_hh" + s),
                getattr(r, "bias_ih" + s),
                getattr(r, "bias_hh" + s),
            )
            for s in sfx
        ]

    def forward(
        self, x: Tensor, lengths: Tensor, backend: str, graph_safe: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """graph_safe: with backend "cudnn", run cuDNN on the padded batch (`_cudnn_padded`)
        instead of packing it, which needs the lengths on the host (a sync a CUDA graph cannot
        hold). The other backends never sync."""
        B, T, _ = x.shape
        if backend == "cudnn" and graph_safe:
            out, h, c = self._cudnn_padded(x, lengths)
        elif backend == "cudnn":
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, (h, c) = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, D*H)
            h = h.view(self.num_layers, self.num_dirs, B, -1)
            c = c.view(self.num_layers, self.num_dirs, B, -1)
        else:
            dtype = compute_dtype(x.device, x.dtype)
            hs, cs = [], []
            inp = x  # (B, T, I)
            for layer in range(self.num_layers):
                if layer > 0:
                    inp = F.dropout(inp, self.dropout, self.training)
                params = self._layer_params(layer)
                w_ih = torch.stack([p[0] for p in params]).to(dtype)  # (D, 4H, I)
                bias = torch.stack([p[2] + p[3] for p in params]).to(dtype)  # (D, 4H)
                # The input part of every gate, for all steps and both directions: one matmul.
                xproj = torch.einsum("bti,dgi->dbtg", inp.to(dtype), w_ih) + bias[:, None, None, :]  # (D, B, T, 4H)
                w_hh = torch.stack([p[1].t() for p in params]).to(dtype)  # (D, H, 4H)
                out, h_n, c_n = kernels.lstm_sequence(xproj, w_hh, lengths, backend=backend)  # (D, B, T, H)
                inp = torch.cat(out.unbind(0), dim=-1)  # (B, T, D*H)
                hs.append(h_n)
                cs.append(c_n)
            out = inp
            h = torch.stack(hs)  # (L, D, B, H)
            c = torch.stack(cs).to(h.dtype)
        # (L, D, B, H) -> (L, B, D*H): both directions side by side, like the outputs
        h = h.permute(0, 2, 1, 3).reshape(self.num_layers, B, -1)
        c = c.permute(0, 2, 1, 3).reshape(self.num_layers, B, -1)
        return out, h, c

    def _cudnn_padded(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The cuDNN LSTM without packing: no host sync, so a CUDA graph can capture it. Same
        results as the packed path (padded steps leave the state alone, padded outputs are 0):

        - per layer and direction one cuDNN call (`_VF.lstm`, what nn.LSTM calls) over the whole
          padded batch. Forward direction: right padding only follows the real tokens, so the
          outputs at real positions are exact. Reverse direction: each row is reversed within its
          own length first (a gather), run forwards, and the outputs are un-reversed (the same
          gather); padded positions never precede a real one.
        - final states at each row's last real step: h from the outputs (a gather); cuDNN does not
          return the cell state of an intermediate step, so c comes from the gates, recomputed
          from the inputs and the cuDNN outputs h_{t-1} in one matmul, and the linear recurrence
          c_t = f_t * c_{t-1} + i_t * g_t in closed form:
              c_last = sum_{t <= last} exp(L_last - L_t) * i_t * g_t,   L_t = sum_{j <= t} log f_j
          (exponents <= 0: no overflow). Exact maths, so the gradients are exact too; under
          autocast the recomputed gates are in the autocast dtype, so c_last matches cuDNN's
          internal cell state to that precision (in fp32/fp64 to rounding).

        Returns out (B, T, D*H), h (L, D, B, H), c (L, D, B, H) like the packed branch.
        """
        B, T, _ = x.shape
        H = self.hidden_size
        lengths = lengths.to(x.device)
        steps = torch.arange(T, device=x.device)
        valid = steps[None, :] < lengths[:, None]  # (B, T)
        rev = torch.where(valid, lengths[:, None] - 1 - steps[None, :], steps[None, :])  # (B, T)
        last = (lengths - 1).clamp(min=0)  # (B,)
        upto = (steps[None, :] <= last[:, None])[..., None]  # (B, T, 1) steps that reach c_last
        nonempty = (lengths > 0)[:, None]  # (B, 1)
        inp = x
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer > 0:
                inp = F.dropout(inp, self.dropout, self.training)
            outs, h_l, c_l = [], [], []
            for d, params in enumerate(self._layer_params(layer)):
                seq = inp if d == 0 else _gather_steps(inp, rev)  # (B, T, I)
                zeros = torch.zeros(1, B, H, dtype=seq.dtype, device=seq.device)
                with warnings.catch_warnings():  # a single direction's weights are not one flat buffer
                    warnings.filterwarnings("ignore", message="RNN module weights are not part")
                    out = _VF.lstm(seq, (zeros, zeros), list(params), True, 1, 0.0, self.training, False, True)[0]
                h_n = out.gather(1, last[:, None, None].expand(B, 1, out.shape[-1])).squeeze(1)  # (B, H)
                c_n = _final_cell(seq, out, params, last, upto)
                h_l.append(torch.where(nonempty, h_n, torch.zeros_like(h_n)))
                c_l.append(torch.where(nonempty, c_n, torch.zeros_like(c_n)).to(h_n.dtype))
                outs.append(out if d == 0 else _gather_steps(out, rev))
            inp = torch.cat(outs, dim=-1) * valid[..., None].to(outs[0].dtype)  # (B, T, D*H), padding 0
            hs.append(torch.stack(h_l))
            cs.append(torch.stack(c_l))
        return inp, torch.stack(hs), torch.stack(cs)  # (B, T, D*H), (L, D, B, H) x2


def _gather_steps(x: Tensor, index: Tensor) -> Tensor:
    """x (B, T, F), index (B, T) -> y[b, t] = x[b, index[b, t]]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _final_cell(seq: Tensor, out: Tensor, params, last: Tensor, upto: Tensor) -> Tensor:
    """The cell state after step `last` (B,) of an LSTM that read seq (B, T, I) and output out
    (B, T, H) from a zero initial state; see `EncoderLSTM._cudnn_padded`. Returns (B, H)."""
    w_ih, w_hh, b_ih, b_hh = params
    B, T, H = out.shape
    h_prev = torch.cat([out.new_zeros(B, 1, H), out[:, :-1]], dim=1)  # (B, T, H): h_{t-1}
    g3 = 3 * H  # gate order i, f, g, o: o is not needed
    z = F.linear(seq, w_ih[:g3], (b_ih + b_hh)[:g3]) + F.linear(h_prev.to(seq.dtype), w_hh[:g3])  # (B, T, 3H)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    z_i, z_f, z_g = z.chunk(3, dim=-1)
    log_f = F.logsigmoid(z_f).cumsum(dim=1)  # (B, T, H): L_t
    log_last = log_f.gather(1, last[:, None, None].expand(B, 1, H))  # (B, 1, H)
    weight = torch.exp((log_last - log_f).masked_fill(~upto, float("-inf")))  # (B, T, H), 0 after last
    return (weight * torch.sigmoid(z_i) * torch.tanh(z_g)).sum(dim=1)  # (B, H)


class DecoderLSTM(nn.Module):
    """A stack of LSTM cells stepped one time step at a time (the decoder's recurrence).

    Layer 0 reads [x_t ; extra_t] where x_t is the embedding (E) and extra_t the input-feeding
    vector (F, 0 without input feeding); upper layers read the layer below (H).

    For the gate cell, layer 0 splits its input weight: the embedding part for all steps is one
    matmul before the loop (`precompute`), and the step multiplies [extra ; h] (K = F + H) by the
    stacked remainder. Upper layers multiply [h_below ; h] (K = 2H).
    """

    def __init__(self, emb_size: int, extra_size: int, hidden_size: int, num_layers: int, dropout: float):
        super().__init__()
        self.emb_size = emb_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout
        sizes = [emb_size + extra_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(k, hidden_size) for k in sizes)

    def step_weights(self, dtype: torch.dtype, defer_grads: bool = False) -> list[tuple]:
        """Per layer, (W (K, 4H), bias (4H,)) for the gate cell; built once per forward pass.
        defer_grads (training with the Triton cell): (W, bias, bank) with W and bias attached to
        a `DeferredWeightGrad` bank, so the T steps' weight gradients are one matmul after the
        loop (layer 0's bias is not attached: `precompute` carries it, not the steps)."""
        if defer_grads:  # (imports Triton: only when training on it)
            from ..kernels.triton_cell import DeferredWeightGrad
        ws = []
        for layer, cell in enumerate(self.cells):
            w_in = cell.weight_ih[:, self.emb_size :] if layer == 0 else cell.weight_ih
            w = torch.cat([w_in, cell.weight_hh], dim=1).t().to(dtype)  # (K, 4H)
            b = (cell.bias_ih + cell.bias_hh).to(dtype)
            if defer_grads:
                bank = DeferredWeightGrad()
                w, attached = bank.attach(w, b if layer > 0 else None)
                ws.append((w, attached if layer > 0 else b, bank))
            else:
                ws.append((w, b))
        return ws

    def input_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Layer 0's embedding weights (4H, E) and its gate bias (4H,), in `dtype`."""
        cell = self.cells[0]
        return cell.weight_ih[:, : self.emb_size].to(dtype), (cell.bias_ih + cell.bias_hh).to(dtype)

    def precompute(self, emb: Tensor, dtype: torch.dtype, weights: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Embedding part of layer 0's gates (bias included): emb (..., E) -> (..., 4H).
        weights: `input_weights(dtype)` made already (decoding under CUDA graphs), or None."""
        w, b = self.input_weights(dtype) if weights is None else weights
        return F.linear(emb.to(w.dtype), w, b)

    def step(
        self,
        x_t: Tensor,
        extra: Tensor | None,
        h: list[Tensor],
        c: list[Tensor],
        backend: str,
        weights: list[tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One time step through all layers.

        cudnn: x_t is the embedding (B, E); gate cell: x_t is `precompute(emb)` (B, 4H) and
        `weights` comes from `step_weights`. extra: (B, F) or None. Returns new h, c lists.
        """
        h_new, c_new = [], []
        below = None
        for layer, cell in enumerate(self.cells):
            if layer > 0:
                below = F.dropout(h_new[-1], self.dropout, self.training)  # (B, H)
            if backend == "cudnn":
                inp = (x_t if extra is None else torch.cat([x_t, extra], -1)) if layer == 0 else below
                hl, cl = cell(inp, (h[layer], c[layer]))
            else:
                w, b, *bank = weights[layer]  # (bank: step_weights(defer_grads=True))
                bank = bank[0] if bank else None
                parts = ([] if extra is None else [extra]) if layer == 0 else [below]
                inp = torch.cat([*parts, h[layer]], dim=-1).to(w.dtype)  # (B, K)
                if layer == 0:
                    hl, cl = kernels.cell_step(inp, c[layer], w, pre=x_t, backend=backend, bank=bank)
                else:
                    hl, cl = kernels.cell_step(inp, c[layer], w, bias=b, backend=backend, bank=bank)
            h_new.append(hl)
            c_new.append(cl)
        return h_new, c_new
