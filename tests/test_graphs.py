"""CUDA-graph support on CPU: shape buckets, padding that changes no loss or gradient, the padded
cuDNN encoder, the static-shape training step and decoder step run eagerly (emulated), their
agreement with the eager code, the optimizer-state conversions, the trainer.cuda_graphs switch,
and that the GPU-side modules import without Hydra/datasets. The captured graphs themselves are
checked on a GPU by tests/test_graphs_gpu.py (`pytest -m gpu`).

Imports only torch, numpy and mt (the GPU machine has no hydra-core, omegaconf or datasets).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_benchmark
from torch import nn

from mt.averaging import EMA
from mt.batching import TokenBucketSampler, collate
from mt.config import ModelConfig
from mt.errors import MTError
from mt.graphs import (
    GraphedDecoder,
    GraphedTrainStep,
    ShapeBuckets,
    TrainStep,
    bucket_size,
    length_grid,
    make_capturable,
    pad_batch,
    portable_state,
)
from mt.model import Seq2Seq
from mt.runtime import resolve_cuda_graphs, set_tf32
from mt.search import beam_search, greedy_search, search

REPO = Path(__file__).resolve().parents[1]
PAD, UNK, BOS, EOS = 0, 1, 2, 3
V = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(cell="torch", dtype=torch.float64, seed=0, vocab=V, **kw) -> Seq2Seq:
    base = dict(
        cell=cell,
        emb_dim=16,
        hidden_dim=16,
        enc_layers=2,
        dec_layers=2,
        dropout=0.0,
        emb_dropout=0.0,
        attention="general",
    )
    base.update(kw)
    torch.manual_seed(seed)
    return Seq2Seq(ModelConfig(**base), vocab, vocab, PAD).to(dtype)


def make_batch(n: int, max_src: int, max_tgt: int, seed: int, vocab: int = V):
    """A collated batch of n pairs whose longest source is max_src - 1 pieces (+EOS) and longest
    target max_tgt - 1 pieces (+BOS/EOS)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ls = max_src - 1 if i == 0 else int(torch.randint(1, max_src, (1,), generator=g))
        lt = max_tgt - 1 if i == 0 else int(torch.randint(1, max_tgt, (1,), generator=g))
        rows.append(
            {
                "src_ids": torch.randint(4, vocab, (ls,), generator=g).tolist(),
                "tgt_ids": torch.randint(4, vocab, (lt,), generator=g).tolist(),
                "idx": i,
            }
        )
    return collate(rows, PAD, BOS, EOS)


def criterion(smoothing=0.1):
    return nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=smoothing, reduction="sum")


# ----------------------------------------------------------------------------- buckets
def test_length_grid_and_bucket_sizes():
    assert length_grid(101) == [8, 10, 12, 14, 16, 18, 20, 22, 26, 30, 34, 38, 42, 48, 54, 60, 66, 74, 82, 92, 102]
    assert length_grid(101, ratio=1.2, multiple=4) == [8, 12, 16, 20, 24, 32, 40, 48, 60, 72, 88, 108]
    assert length_grid(8) == [8]
    assert [bucket_size(n, 8) for n in (1, 8, 9, 64, 65, 128, 129, 640, 641)] == [8, 8, 16, 64, 80, 128, 160, 640, 768]
    assert [bucket_size(n, 4) for n in (3, 9, 21, 33, 101)] == [4, 12, 24, 40, 112]


@pytest.mark.parametrize("max_tokens, max_sentences", [(4096, 256), (1024, 64), (500, 1000), (64, 8)])
def test_derived_buckets_hold_every_sampler_batch(max_tokens, max_sentences):
    rng = np.random.default_rng(0)
    src_lens = rng.integers(1, 101, 3000)
    tgt_lens = np.clip(src_lens + rng.integers(-5, 6, 3000), 1, 100)
    buckets = ShapeBuckets.from_budget(max_tokens, max_sentences, max_len=101)
    assert all(b <= max_sentences for b, _, _ in buckets)
    sampler = TokenBucketSampler(src_lens, tgt_lens, max_tokens, max_sentences, shuffle=True, seed=1)
    padded = real = 0
    for idx in sampler:
        n, s, t = len(idx), int(src_lens[idx].max()) + 1, int(tgt_lens[idx].max()) + 1
        shape = buckets.find(n, s, t)
        assert shape is not None, (n, s, t, buckets)
        fitting = [x for x in buckets if n <= x[0] and s <= x[1] and t <= x[2]]
        assert shape == min(fitting, key=lambda x: x[0] * (x[1] + x[2]))  # the smallest that holds it
        padded += shape[0] * shape[2]
        real += int(tgt_lens[idx].sum()) + n
    assert padded < 1.6 * real  # the buckets do not drown the batches in padding


def test_explicit_buckets():
    b = ShapeBuckets.from_budget(4096, 256, 101, lengths=[16, 32, 64], batch_sizes=[256, 128, 64])
    assert b.shapes == [(64, 64, 64), (128, 32, 32), (256, 16, 16)]
    assert b.find(100, 20, 30) == (128, 32, 32)
    assert b.find(200, 20, 30) is None  # too many sentences for the 32 bucket: eager
    assert b.find(10, 65, 3) is None  # longer than every bucket: eager
    lens_only = ShapeBuckets.from_budget(1000, 64, 101, lengths=[20, 10, 30])
    assert lens_only.shapes == [(47, 30, 30), (64, 10, 10), (64, 20, 20)]  # 1000 // (20 + 1) = 47; others capped
    assert (48, 30, 30) in ShapeBuckets.from_budget(1000, 64, 101, lengths=[10, 20, 30], batch_multiple=8)
    with pytest.raises(MTError, match="graph_batch_sizes needs"):
        ShapeBuckets.from_budget(4096, 256, 101, batch_sizes=[8])
    with pytest.raises(MTError, match="one batch size per length"):
        ShapeBuckets.from_budget(4096, 256, 101, lengths=[8, 16], batch_sizes=[8])


def test_pad_batch_layout():
    batch = make_batch(3, 5, 4, seed=0)
    p = pad_batch(batch, (8, 7, 6), PAD)
    assert p.src.shape == (8, 7) and p.tgt_in.shape == (8, 6) and p.tgt_out.shape == (8, 6)
    assert torch.equal(p.src[:3, :5], batch.src) and (p.src[:, 5:] == PAD).all() and (p.src[3:] == PAD).all()
    assert torch.equal(p.src_len, torch.tensor(batch.src_len.tolist() + [1] * 5))
    assert (p.tgt_out[3:] == PAD).all() and (p.tgt_in[3:] == PAD).all()
    assert p.ntokens == batch.ntokens == int((p.tgt_out != PAD).sum())
    assert p.indices.tolist() == batch.indices.tolist() + [-1] * 5
    with pytest.raises(ValueError):
        pad_batch(batch, (2, 7, 6), PAD)


# ----------------------------------------------------------------------------- padding is free
@pytest.mark.parametrize("cell, graph_safe", [("torch", False), ("cudnn", True), ("cudnn", False)])
def test_padding_adds_no_loss_and_no_gradient(cell, graph_safe):
    """The padded batch's loss and gradients equal the unpadded batch's (fp64; dropout off)."""
    model = tiny_model(cell)
    model.graph_safe = graph_safe
    crit = criterion()
    batch = make_batch(4, 6, 5, seed=1)

    def loss_and_grads(b):
        model.zero_grad()
        logits, _ = model(b.src, b.src_len, b.tgt_in)
        loss = crit(logits.flatten(0, 1), b.tgt_out.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = loss_and_grads(batch)
    pad = loss_and_grads(pad_batch(batch, (7, 9, 8), PAD))
    torch.testing.assert_close(pad[0], ref[0], rtol=1e-12, atol=1e-12)
    for name in ref[1]:
        torch.testing.assert_close(pad[1][name], ref[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("bidirectional, layers", [(True, 2), (False, 1)])
def test_padded_cudnn_encoder_matches_packed(bidirectional, layers):
    """graph_safe model.cell=cudnn (cuDNN on the padded batch + closed-form final cell state)
    == the packed nn.LSTM path: outputs, final states and all gradients (fp64)."""
    model = tiny_model("cudnn", bidirectional=bidirectional, enc_layers=layers)
    batch = make_batch(4, 7, 5, seed=2)
    src, lengths, tgt = batch.src, batch.src_len, batch.tgt_in
    results = []
    for graph_safe in (False, True):
        model.zero_grad()
        model.graph_safe = graph_safe
        memory, state = model.encode(src, lengths)
        logits, _ = model.decoder(tgt, state, memory)
        loss = logits.square().sum() + 3 * sum(c.sum() for c in state.c) + memory.out.sum()
        loss.backward()
        results.append(
            (
                memory.out.detach(),
                [c.detach() for c in state.c],
                [h.detach() for h in state.h],
                {n: p.grad.clone() for n, p in model.named_parameters()},
            )
        )
    (out0, c0, h0, g0), (out1, c1, h1, g1) = results
    torch.testing.assert_close(out1, out0)
    for a, b in zip(c1 + h1, c0 + h0):
        torch.testing.assert_close(a, b)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


# ----------------------------------------------------------------------------- training step
@pytest.mark.parametrize("cell", ["torch", "cudnn"])
def test_emulated_graphed_steps_match_eager_training(cell):
    """8 steps through GraphedTrainStep (static padded shapes, run eagerly on CPU; one batch fits
    no bucket and runs as it is) == 8 eager TrainSteps on the unpadded batches: same losses,
    NLL, gradient norms and final weights (fp64 model, dropout off, label smoothing and clipping
    on). The loss is computed on fp32 logits (as in training), where padding changes the
    summation order: equal to fp32 rounding, not bitwise."""
    batches = [
        make_batch(n, s, t, seed=10 + i)
        for i, (n, s, t) in enumerate(
            [(3, 5, 6), (5, 7, 4), (2, 3, 3), (6, 9, 9), (4, 6, 8), (3, 5, 6), (1, 12, 4), (5, 8, 7)]
        )
    ]
    buckets = ShapeBuckets([(6, 8, 8), (4, 6, 6), (8, 10, 10)])
    runs = []
    for graphed in (False, True):
        model = tiny_model(cell)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2, betas=(0.9, 0.98), eps=1e-9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 3, 1.0))
        kw = dict(pad_id=PAD, amp_dtype=None, clip_norm=0.5, device="cpu")
        ema = EMA(model, decay=0.9)  # updated inside the (emulated) graph
        if graphed:
            step = GraphedTrainStep(model, opt, criterion(), buckets=buckets, emulate=True, ema=ema, **kw)
        else:
            step = TrainStep(model, opt, criterion(), ema=ema, **kw)
        log = []
        for b in batches:
            loss_sum, nll_sum = step.forward_backward(b)
            loss_v, nll_v = loss_sum.item(), nll_sum.item()
            log.append((loss_v, nll_v, float(step.update())))
            sched.step()
        runs.append((log, [p.detach().clone() for p in model.parameters()], step, ema))
    (eager_log, eager_w, _, eager_ema), (graph_log, graph_w, gstep, graph_ema) = runs
    assert gstep.stats == {"emulated": 7, "eager": 1}
    np.testing.assert_allclose(graph_log, eager_log, rtol=2e-6, atol=1e-9)
    for a, b in zip(graph_w, eager_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert graph_ema.updates.item() == eager_ema.updates.item() == len(batches)
    for a, b, w in zip(graph_ema.shadow, eager_ema.shadow, graph_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert not torch.equal(a, w)  # an average, not the weights


def test_graphed_train_step_needs_cuda_or_emulation():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(MTError, match="CUDA graphs need a CUDA device"):
        GraphedTrainStep(model, opt, criterion(), pad_id=PAD, amp_dtype=None, clip_norm=1.0, buckets=None, device="cpu")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_capturable_optimizer_and_portable_checkpoint_state():
    """make_capturable: lr becomes a device tensor the scheduler updates IN PLACE (the graph keeps
    reading the same tensor); portable_state turns it back into floats for checkpoints, which
    load into a plain optimizer and back into a capturable one."""
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 10)
    make_capturable(opt, "cpu")
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and opt.param_groups[0]["capturable"]
    for k in range(3):
        sched.step()
        assert opt.param_groups[0]["lr"] is lr  # same tensor, new value
        assert math.isclose(lr.item(), 1e-3 * (k + 2) / 10, rel_tol=1e-6)
    opt_sd, sched_sd = portable_state(opt.state_dict()), portable_state(sched.state_dict())
    assert isinstance(opt_sd["param_groups"][0]["lr"], float) and opt_sd["param_groups"][0]["capturable"] is False
    assert all(isinstance(v, float) for v in sched_sd["_last_lr"])
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the live optimizer is untouched
    opt2 = torch.optim.Adam(model.parameters(), lr=5.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: (s + 1) / 10)
    opt2.load_state_dict(opt_sd)
    sched2.load_state_dict(sched_sd)
    assert math.isclose(opt2.param_groups[0]["lr"], 4e-4, rel_tol=1e-6) and not opt2.param_groups[0]["capturable"]
    make_capturable(opt2, "cpu")
    sched2.step()
    assert math.isclose(opt2.param_groups[0]["lr"].item(), 5e-4, rel_tol=1e-6)


def test_resolve_cuda_graphs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_cuda_graphs("auto", cpu) is False
    assert resolve_cuda_graphs("auto", cuda) is True
    assert resolve_cuda_graphs("True", cuda) is True  # OmegaConf hands `true` to a str field as "True"
    assert resolve_cuda_graphs("false", cuda) is False
    with pytest.raises(MTError, match="needs CUDA"):
        resolve_cuda_graphs("true", cpu)
    with pytest.raises(MTError, match="unknown trainer.cuda_graphs"):
        resolve_cuda_graphs("sometimes", cuda)


def test_set_tf32(monkeypatch):
    """trainer.tf32: auto leaves PyTorch's flags (and so our cell's fp32 dots) as they are; true and
    false set matmuls and cuDNN together; the cell follows cuDNN's flag."""
    from mt.kernels import triton_cell  # (pure dispatch: no kernel runs)

    monkeypatch.delenv("MT_TRITON_FP32_PRECISION", raising=False)

    def flags():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    saved = flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch's defaults
        set_tf32("auto")
        assert flags() == (False, True) and triton_cell.fp32_precision() == "tf32"
        set_tf32("False")  # (OmegaConf's spelling)
        assert flags() == (False, False) and triton_cell.fp32_precision() == "ieee"
        set_tf32("true")
        assert flags() == (True, True)
        with pytest.raises(MTError, match="unknown trainer.tf32='often'"):
            set_tf32("often")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_train_with_cuda_graphs_true_on_cpu_is_a_clear_error(tiny_corpus_dir, tmp_path):
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mt.config import register_configs
    from mt.train import train

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = OmegaConf.to_object(
            compose(
                "train",
                overrides=[
                    "debug=tiny",
                    f"data.path={tiny_corpus_dir}",
                    f"data.cache_dir={tmp_path / 'cache'}",
                    "trainer.device=cpu",
                    "trainer.cuda_graphs=true",
                    "trainer.graph_lengths=[16,32]",
                ],
            )
        )
    assert cfg.trainer.graph_lengths == [16, 32]
    with pytest.raises(MTError, match="cuda_graphs=true needs CUDA"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- decoding
def _decode_all(model, src, src_len, graphs):
    return [
        greedy_search(model, src, src_len, BOS, EOS, max_len_b=6, graphs=graphs),
        beam_search(model, src, src_len, BOS, EOS, beam=3, nbest=2, max_len_b=6, graphs=graphs),
        search(model, src, src_len, BOS, EOS, beam=1, length_penalty="avg", max_len_b=4, graphs=graphs),
    ]


def _assert_same(outs, refs, exact: bool):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-9, atol=1e-9)
    for out, ref in zip(outs, refs):
        assert out.tokens == ref.tokens
        np.testing.assert_allclose(out.scores, ref.scores, **tol)
        for a, b in zip(out.attention, ref.attention):
            torch.testing.assert_close(a, b, **tol)
        for hyps_o, hyps_r in zip(out.nbest, ref.nbest):
            assert [h.tokens for h in hyps_o] == [h.tokens for h in hyps_r]


def test_graphed_decoder_is_eager_on_cpu():
    model = tiny_model(dtype=torch.float32).eval()
    batch = make_batch(3, 7, 2, seed=3)
    refs = _decode_all(model, batch.src, batch.src_len, None)
    graphs = GraphedDecoder(model)
    outs = _decode_all(model, batch.src, batch.src_len, graphs)
    _assert_same(outs, refs, exact=True)
    assert set(graphs.stats) == {"eager"} and graphs.stats["eager"] > 10


@pytest.mark.parametrize(
    "cell, attention, sync_every", [("torch", "general", 4), ("cudnn", "dot", 1), ("torch", "bahdanau", 3)]
)
def test_emulated_graphed_decoder_matches_eager(cell, attention, sync_every):
    """The static-shape search step (sentences and source length padded to buckets, memory and
    state copied into static buffers, the search's bookkeeping on the device, done sentences
    frozen instead of dropped, a host check every `sync_every` steps), run eagerly, gives the
    eager greedy/beam results (fp64)."""
    model = tiny_model(cell, attention=attention).eval()
    batch = make_batch(5, 9, 2, seed=4)  # 5 sentences -> 8, source 9 -> 12
    refs = _decode_all(model, batch.src, batch.src_len, None)
    graphs = GraphedDecoder(model, emulate=True, sync_every=sync_every)
    outs = _decode_all(model, batch.src, batch.src_len, graphs)
    _assert_same(outs, refs, exact=False)
    assert graphs.stats["emulated"] > 10 and "eager" not in graphs.stats
    # one slot per search, padded: greedy 8 rows, beam 3 x 8 rows, beam 1 ("avg") 8 rows; source 12
    shapes = sorted((key[0], tuple(slot.memory.out.shape[:2])) for key, slot in graphs._slots.items())
    assert shapes == [("beam", (8, 12)), ("beam", (24, 12)), ("greedy", (8, 12))]
    again = _decode_all(model, batch.src, batch.src_len, graphs)  # the same slots, reset and reused
    _assert_same(again, refs, exact=False)
    assert len(graphs._slots) == 3  # greedy, beam 3 nbest 2, the "avg" beam-1 search


def test_emulated_search_reuses_a_slot_for_a_smaller_batch():
    """A batch smaller than the last one in the same bucket: stale rows of the previous batch
    sit in the padding and must not leak into the results."""
    model = tiny_model("torch").eval()
    big, small = make_batch(7, 9, 2, seed=5), make_batch(3, 9, 2, seed=6)
    graphs = GraphedDecoder(model, emulate=True)
    for batch in (big, small):
        refs = _decode_all(model, batch.src, batch.src_len, None)
        _assert_same(_decode_all(model, batch.src, batch.src_len, graphs), refs, exact=False)
    assert len(graphs._slots) == 3


def test_decoding_with_weights_cast_once_per_batch_matches_autocast(monkeypatch):
    """Under bf16 autocast the graphed search multiplies with weights cast once per batch
    (Decoder.step_casts, refreshed with the encoder) instead of casting them at every step:
    the very same bf16 values, so the very same results. Training in between is seen."""
    model = tiny_model("torch", dtype=torch.float32).eval()
    batch = make_batch(5, 9, 2, seed=7)

    def run(graphs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _decode_all(model, batch.src, batch.src_len, graphs)

    cast = GraphedDecoder(model, emulate=True)
    outs = run(cast)
    assert all(
        slot.memory.casts is not None and slot.memory.casts["gen_w"].dtype == torch.bfloat16
        for slot in cast._slots.values()
    )
    monkeypatch.setattr(GraphedDecoder, "_static_casts", lambda self, *args: None)
    _assert_same(outs, run(GraphedDecoder(model, emulate=True)), exact=True)
    monkeypatch.undo()
    with torch.no_grad():  # "training": the next batch must see the new weights
        model.decoder.generator.weight.mul_(1.5)
        model.decoder.combine.weight.add_(0.05)
    outs = run(cast)  # the same slots, their casts refreshed
    monkeypatch.setattr(GraphedDecoder, "_static_casts", lambda self, *args: None)
    _assert_same(outs, run(GraphedDecoder(model, emulate=True)), exact=True)


# ----------------------------------------------------------------------------- GPU machine readiness
def test_gpu_side_modules_import_without_hydra_omegaconf_or_datasets():
    """The GPU machine has torch, triton, sentencepiece, sacrebleu, tensorboard, numpy, pyarrow
    but no hydra-core/omegaconf/datasets: the modules the GPU scripts use must import there."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('hydra', 'omegaconf', 'datasets'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mt.model, mt.kernels, mt.graphs, mt.search, mt.batching, mt.config\n"
        "from mt.kernels import triton_cell\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_bench_train_script_runs_on_cpu(tmp_path):
    res, stdout = run_benchmark(tmp_path, "bench_train.py", "--quick", "--device", "cpu")
    assert res["environment"]["device"] == "cpu"
    for task in ("train", "greedy", "beam"):
        cols = res["results"][task]
        assert set(cols) == {"cudnn_eager", "ours_eager"}, cols  # no CUDA: no graph columns
        for col in cols.values():
            assert not col.get("error"), col
            assert col["per_s"] > 0 and col["warmup_s"] > 0
    assert "x cudnn eager" in stdout


def test_bench_train_bucketed_wmt_mode_on_cpu(tmp_path):
    """--preset wmt's bucketed mode at --quick sizes, graph columns emulated: token-budget batches
    from the sampler, every one of them inside a derived bucket (no eager fallback), each bucket
    warmed up and "captured" (3 emulated steps) before the timed steps."""
    args = ["--quick", "--device", "cpu", "--preset", "wmt", "--emulate-graphs", "--tasks", "train", "beam"]
    res, stdout = run_benchmark(tmp_path, "bench_train.py", *args)
    cfg = res["config"]
    assert cfg["bucketed"] and (cfg["enc_layers"], cfg["dec_layers"], cfg["max_tokens"], cfg["max_len"]) == (
        4,
        4,
        256,
        16,
    )
    n_buckets = len(ShapeBuckets.from_budget(256, 256, 16))
    train = res["results"]["train"]
    assert set(train) == {"cudnn_eager", "cudnn_graphs", "ours_eager", "ours_graphs"}
    for name in ("cudnn_graphs", "ours_graphs"):
        col = train[name]
        assert col["buckets"] == n_buckets and col["capture_s"] > 0, col
        steps = 3 * n_buckets + cfg["warmup"] + cfg["iters"]
        assert col["stats"] == {"emulated": steps}, col["stats"]  # no batch fell outside the buckets
    assert all(0 < c["tokens_per_step"] <= 256 for c in train.values())
    assert all(c["per_s"] > 0 for c in res["results"]["beam"].values())
    assert f"{n_buckets} buckets warmed up and captured" in stdout


def test_profile_train_script_runs_on_cpu(tmp_path):
    """benchmarks/profile_train.py's CPU smoke run: both cells' emulated graphed steps timed (the
    kernel table needs CUDA); its kernel groups on kernel names as GPU profiles show them."""
    res, _ = run_benchmark(tmp_path, "profile_train.py", "--quick")
    assert [r["name"] for r in res["results"]] == [
        "ours",
        "ours-torch-attention",
        "ours-per-step-weight-grads",
        "ours-fused-loss",
        "cudnn",
    ]
    for r in res["results"]:
        assert "error" not in r and r["step_ms"] > 0 and r["stats"] == {"emulated": 4 + 2}, r
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import profile_train
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [
        dict(kernel="_lstm_step_backward_kernel", per_step=40.0, us_per_step=400.0),
        dict(kernel="_cell_forward_kernel", per_step=40.0, us_per_step=100.0),
        dict(kernel="RNN_blockPersist_bp_LSTM<bf16>", per_step=4.0, us_per_step=900.0),
        dict(kernel="nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", per_step=60.0, us_per_step=800.0),
        dict(
            kernel="void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            per_step=2.0,
            us_per_step=30.0,
        ),
        dict(kernel="void (anonymous namespace)::CatArrayBatchedCopy<>", per_step=80.0, us_per_step=160.0),
        dict(
            kernel="void at::native::vectorized_elementwise_kernel<4, tanh_kernel_cuda>",
            per_step=20.0,
            us_per_step=40.0,
        ),
        dict(kernel="mystery", per_step=1.0, us_per_step=1.0),
    ]
    groups = {g["group"]: (g["per_step"], g["us_per_step"]) for g in profile_train.by_group(rows)}
    assert groups == {
        "gate cell (ours)": (80.0, 500.0),
        "cuDNN RNN": (4.0, 900.0),
        "matmul": (60.0, 800.0),
        "optimizer": (2.0, 30.0),
        "copy, cat": (80.0, 160.0),
        "elementwise": (20.0, 40.0),
        "other": (1.0, 1.0),
    }
    assert [g["group"] for g in profile_train.by_group(rows)][0] == "cuDNN RNN"  # largest first


def test_train_loop_with_emulated_graphs_matches_eager(tiny_corpus_dir, tmp_path, monkeypatch):
    """mt.train's trainer.cuda_graphs branch end to end on CPU: bucket shapes from the config,
    GraphedTrainStep in the loop, GraphedDecoder in validation, checkpoints. Only the capture is
    replaced (emulate=True: the padded static-shape steps run eagerly) and make_capturable is a
    no-op (a CPU Adam cannot be capturable). Losses and BLEU equal the eager run's."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mt import graphs, trainer
    from mt.checkpoint import load_checkpoint
    from mt.config import register_configs
    from mt.train import train

    register_configs()

    def run(name: str, *extra: str):
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = OmegaConf.to_object(
                compose(
                    "train",
                    overrides=[
                        "debug=tiny",
                        f"data.path={tiny_corpus_dir}",
                        f"data.cache_dir={tmp_path / 'cache'}",
                        "trainer.device=cpu",
                        "trainer.precision=fp32",
                        "trainer.max_steps=24",
                        "trainer.eval_every=12",
                        "trainer.log_every=1",
                        "trainer.progress=false",
                        "trainer.max_tokens=512",
                        "model.cell=torch",
                        *extra,
                    ],
                )
            )
        summary = train(cfg, tmp_path / name)
        acc = EventAccumulator(str(tmp_path / name / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        return summary, [e.value for e in acc.Scalars("train/loss")]

    eager, eager_losses = run("eager", "trainer.cuda_graphs=false")
    made = {}

    def train_step(*a, **k):
        made["train"] = graphs.GraphedTrainStep.__wrapped__(*a, emulate=True, **k)
        return made["train"]

    def decoder(model):
        made["decode"] = graphs.GraphedDecoder.__wrapped__(model, emulate=True)
        return made["decode"]

    train_step.__wrapped__ = graphs.GraphedTrainStep
    decoder.__wrapped__ = graphs.GraphedDecoder
    monkeypatch.setattr(trainer, "resolve_cuda_graphs", lambda value, device, distributed=False: True)
    monkeypatch.setattr(graphs, "make_capturable", lambda optimizer, device: None)
    monkeypatch.setattr(graphs, "GraphedTrainStep", train_step)
    monkeypatch.setattr(graphs, "GraphedDecoder", decoder)
    graphed, graphed_losses = run("graphs", "trainer.cuda_graphs=true", "trainer.graph_lengths=[6,8]")

    assert made["train"].stats["emulated"] > 0 and made["train"].stats["eager"] > 0  # 9-token batches fit no shape
    assert made["decode"].stats["emulated"] > 0
    assert len(graphed_losses) == len(eager_losses) == 24
    np.testing.assert_allclose(graphed_losses, eager_losses, rtol=1e-4)
    assert graphed["best_bleu"] == pytest.approx(eager["best_bleu"], abs=0.5)
    assert graphed["last"]["loss"] == pytest.approx(eager["last"]["loss"], rel=1e-4)
    ck = load_checkpoint(graphed["last_path"])
    assert ck["step"] == 24 and isinstance(ck["optimizer"]["param_groups"][0]["lr"], float)


class HostReads:
    """While `on`, every Tensor -> Python conversion (bool/int/float/index/item/tolist) and every
    copy to the host (cpu/numpy) raises: what a CUDA graph cannot capture (it would fail, or bake
    in the value). A read inside an ATen kernel's C++ code is not seen."""

    def __init__(self, monkeypatch):
        self.on = False
        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, self._guard(name, getattr(torch.Tensor, name)))

    def _guard(self, name, orig):
        def check(tensor, *a, **k):
            if self.on:
                raise AssertionError(f"Tensor.{name} inside a captured step")
            return orig(tensor, *a, **k)

        return check

    def wrap(self, fn, on: bool):
        """fn, run with the guard on (or off)."""

        def run(*a, **k):
            before, self.on = self.on, on
            try:
                return fn(*a, **k)
            finally:
                self.on = before

        return run


def test_static_search_step_reads_nothing_back_to_the_host(monkeypatch):
    """Every search step GraphedDecoder would capture (here emulated) runs without a host read."""
    model = tiny_model("torch").eval()
    batch = make_batch(5, 9, 2, seed=8)
    refs = _decode_all(model, batch.src, batch.src_len, None)
    graphs = GraphedDecoder(model, emulate=True, sync_every=2)
    guard, calls = HostReads(monkeypatch), Counter()
    replay = guard.wrap(graphs.replay, on=True)
    monkeypatch.setattr(graphs, "replay", lambda *a: (calls.update(["step"]), replay(*a)))
    outs = _decode_all(model, batch.src, batch.src_len, graphs)
    _assert_same(outs, refs, exact=False)
    assert calls["step"] > 10


@pytest.mark.parametrize("cell", ["torch", "cudnn"])
def test_graphed_train_step_reads_nothing_back_to_the_host(monkeypatch, cell):
    """The training step GraphedTrainStep captures (forward under graph_safe, loss, backward,
    clipping; here emulated) runs without a host read. The optimizer step is left out: a CPU
    Adam cannot be capturable (its non-capturable step reads the step count); on CUDA the
    capturable one keeps it on the device."""
    model = tiny_model(cell, dropout=0.2, emb_dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = GraphedTrainStep(
        model,
        opt,
        criterion(),
        buckets=ShapeBuckets([(6, 8, 8)]),
        emulate=True,
        pad_id=PAD,
        amp_dtype=None,
        clip_norm=0.5,
        device="cpu",
    )
    guard = HostReads(monkeypatch)
    monkeypatch.setattr(step, "_run", guard.wrap(step._run, on=True))
    monkeypatch.setattr(opt, "step", guard.wrap(opt.step, on=False))
    for i in range(3):
        loss_sum, _ = step.forward_backward(make_batch(4, 7, 6, seed=20 + i))
        assert math.isfinite(loss_sum.item())
    assert step.stats == {"emulated": 3}


def test_results_survive_the_next_batch_in_the_same_slot():
    """Outputs are copies: the next batch in the same slot (CPU: emulated) overwrites the slot's
    history buffers, not earlier results."""
    model = tiny_model("torch").eval()
    graphs = GraphedDecoder(model, emulate=True)
    first, second = make_batch(5, 9, 2, seed=9), make_batch(6, 9, 2, seed=10)
    outs = _decode_all(model, first.src, first.src_len, graphs)
    kept = [[a.clone() for a in out.attention] for out in outs]
    _decode_all(model, second.src, second.src_len, graphs)
    for out, ref in zip(outs, kept):
        for a, b in zip(out.attention, ref):
            assert torch.equal(a, b)


def test_graphed_search_with_a_limit_that_shrinks_with_the_source():
    """max_len_a < 0: the shortest source has the longest limit; the slot's history must hold it."""
    model = tiny_model("torch").eval()
    batch = make_batch(4, 9, 2, seed=11)
    kw = dict(max_len_a=-1.0, max_len_b=14)
    refs = [
        greedy_search(model, batch.src, batch.src_len, BOS, EOS, **kw),
        beam_search(model, batch.src, batch.src_len, BOS, EOS, beam=2, **kw),
    ]
    graphs = GraphedDecoder(model, emulate=True)
    outs = [
        greedy_search(model, batch.src, batch.src_len, BOS, EOS, graphs=graphs, **kw),
        beam_search(model, batch.src, batch.src_len, BOS, EOS, beam=2, graphs=graphs, **kw),
    ]
    _assert_same(outs, refs, exact=False)
