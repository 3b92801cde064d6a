"""The model: shapes, masking, attention variants, and equal outputs on every cell backend."""

import pytest
import torch
from kernel_utils import interpreted

from mt.config import ModelConfig
from mt.errors import MTError
from mt.model import Seq2Seq


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(cell="torch", emb_dim=16, hidden_dim=16, enc_layers=2, dec_layers=2, dropout=0.0, emb_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def toy_batch(V=30, B=3, S=7, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    lengths = torch.tensor([S, 4, 2][:B])
    for b, n in enumerate(lengths.tolist()):
        src[b, n:] = 0
    tgt = torch.randint(4, V, (B, T), generator=g)
    return src, lengths, tgt


def loss_and_grads(model, src, lengths, tgt):
    model.zero_grad()
    logits, attn = model(src, lengths, tgt)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    loss.backward()
    return logits.detach(), attn.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["dot", "general", "concat", "bahdanau"])
@pytest.mark.parametrize("layers", [(1, 1), (2, 3)])
def test_cudnn_and_gate_cell_agree(attention, layers):
    """Same parameters through nn.LSTM/nn.LSTMCell and through our reference gate cell."""
    torch.manual_seed(0)
    model = Seq2Seq(tiny_cfg(attention=attention, enc_layers=layers[0], dec_layers=layers[1]), 30, 30, 0).double()
    batch = toy_batch()
    model.cfg.cell = "torch"
    ours = loss_and_grads(model, *batch)
    model.cfg.cell = "cudnn"
    base = loss_and_grads(model, *batch)
    torch.testing.assert_close(ours[0], base[0])
    torch.testing.assert_close(ours[1], base[1])
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], base[2][name], msg=name)


def test_shapes_and_source_padding_masked():
    torch.manual_seed(0)
    model = Seq2Seq(tiny_cfg(), 30, 40, 0)
    src, lengths, tgt = toy_batch()
    logits, attn = model(src, lengths, tgt)
    assert logits.shape == (3, 5, 40)
    assert attn.shape == (3, 5, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 5))
    assert attn[1, :, 4:].abs().max() == 0 and attn[2, :, 2:].abs().max() == 0
    # changing padded source positions changes nothing
    src2 = src.clone()
    src2[2, 2:] = 7
    logits2, _ = model(src2, lengths, tgt)
    torch.testing.assert_close(logits[2], logits2[2])


def test_incremental_step_matches_teacher_forcing():
    """decoder.step, fed the reference prefix, reproduces the teacher-forced log-probs."""
    torch.manual_seed(0)
    model = Seq2Seq(tiny_cfg(), 30, 30, 0).eval()
    src, lengths, tgt = toy_batch()
    logits, attn = model(src, lengths, tgt)
    memory, state = model.encode(src, lengths)
    for t in range(tgt.shape[1]):
        logp, state, a = model.decoder.step(tgt[:, t], state, memory)
        torch.testing.assert_close(logp, torch.log_softmax(logits[:, t], -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, attn[:, t])


def test_tying_and_sharing():
    model = Seq2Seq(tiny_cfg(share_embeddings=True, tie_output=True), 30, 30, 0)
    assert model.decoder.generator.weight is model.decoder.embedding.weight
    assert model.encoder.embedding is model.decoder.embedding
    untied = Seq2Seq(tiny_cfg(tie_output=False), 30, 30, 0)
    assert untied.decoder.generator.weight is not untied.decoder.embedding.weight


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(attention="cosine"), "unknown model.attention"),
        (dict(cell="fast"), "unknown model.cell"),
        (dict(tie_output=True, emb_dim=8), "tie_output needs"),
        (dict(bridge="magic"), "unknown model.bridge"),
        (dict(hidden_dim=15, tie_output=False), "must be even"),
    ],
)
def test_bad_model_config_is_a_clear_error(kw, msg):
    with pytest.raises(MTError, match=msg):
        Seq2Seq(tiny_cfg(**kw), 30, 30, 0)


def test_share_embeddings_needs_joint_vocab():
    with pytest.raises(MTError, match="joint vocabulary"):
        Seq2Seq(tiny_cfg(share_embeddings=True), 30, 31, 0)


def test_zero_bridge_and_no_input_feeding_run():
    torch.manual_seed(0)
    for kw in (dict(bridge="zero"), dict(input_feeding=False), dict(bidirectional=False)):
        model = Seq2Seq(tiny_cfg(**kw), 30, 30, 0).double()
        batch = toy_batch()
        ours = loss_and_grads(model, *batch)
        model.cfg.cell = "cudnn"
        base = loss_and_grads(model, *batch)
        torch.testing.assert_close(ours[0], base[0])


@interpreted
@pytest.mark.parametrize("attention", ["general", "bahdanau"])
def test_triton_cell_gives_the_same_loss_and_gradients(attention, monkeypatch):
    """model.cell=triton (interpreted on CPU) against model.cell=torch, same weights, fp32. The
    Triton path's decoder weight gradients go through its banks (triton_cell.DeferredWeightGrad):
    every step of both decoder layers leaves its pair there."""
    pytest.importorskip("triton")
    from mt.kernels import triton_cell

    torch.manual_seed(0)
    cfg = tiny_cfg(emb_dim=32, hidden_dim=32, attention=attention, dec_layers=2)
    model = Seq2Seq(cfg, 30, 30, 0)
    batch = toy_batch()
    model.cfg.cell = "torch"
    ref = loss_and_grads(model, *batch)
    model.cfg.cell = "triton"
    added = []
    real_add = triton_cell.DeferredWeightGrad.add
    monkeypatch.setattr(triton_cell.DeferredWeightGrad, "add", lambda self, *a: (added.append(a), real_add(self, *a)))
    tri = loss_and_grads(model, *batch)
    assert len(added) == 2 * batch[2].shape[1]  # (2 layers x T steps)
    torch.testing.assert_close(tri[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(tri[1], ref[1], atol=2e-5, rtol=2e-5)
    for name in ref[2]:
        torch.testing.assert_close(tri[2][name], ref[2][name], atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("cell", ["torch", "cudnn"])
def test_teacher_forcing_graph_does_not_grow_a_select_per_step(cell):
    """The decoder's loop takes its T step inputs by one unbind: its backward is one stack. With
    x[:, t] every step added a SelectBackward, whose backward fills a zero (B, T, .) tensor,
    copies a slice into it, and adds it to the others (T times: O(T^2) memory traffic)."""
    model = Seq2Seq(tiny_cfg(cell=cell), 30, 30, 0)

    def node_names(T: int) -> list[str]:
        src, lengths, tgt = toy_batch(T=T)
        logits, _ = model(src, lengths, tgt)
        names, todo, seen = [], [logits.grad_fn], set()
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            names.append(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
        return names

    short, long = node_names(3), node_names(9)
    assert long.count("SelectBackward0") == short.count("SelectBackward0")  # none per step
    assert long.count("UnbindBackward0") == short.count("UnbindBackward0") >= 1
