"""Attention heatmaps (matplotlib, Agg): for TensorBoard during training and for
`scripts/translate.py --plot-attention`.

The figure is a bare `matplotlib.figure.Figure` rendered by the Agg canvas, not a pyplot figure:
no global backend switch and no pyplot state, so mt.train can draw it on its background thread
(and a notebook's own pyplot figures and backend are left alone)."""

from __future__ import annotations

import torch


def attention_figure(attn: torch.Tensor, src_pieces: list[str], out_pieces: list[str]):
    """A figure of attention weights attn (len(out_pieces), len(src_pieces)): output rows, source columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4, 0.35 * len(src_pieces) + 2), max(3, 0.35 * len(out_pieces) + 2)))
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: savefig and TensorBoard render through Agg
    ax = fig.subplots()
    ax.imshow(attn.float().numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(src_pieces)), src_pieces, rotation=90, fontsize=7)
    ax.set_yticks(range(len(out_pieces)), out_pieces, fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    fig.tight_layout()
    return fig
