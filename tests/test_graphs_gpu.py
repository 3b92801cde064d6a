"""CUDA graphs on a GPU: the captured training step and decoder step (mt.graphs) against the same
code run eagerly on the padded static shapes (emulate=True) and against the plain eager code.

    python -m pytest -m gpu tests/test_graphs_gpu.py

The `cuda` cases are marked `gpu` (skipped where CUDA is absent). The `cpu` cases run the same
test bodies at small sizes with the graphs emulated: they check the tests' own logic, nothing
about graphs.

  train_graph_vs_emulated   20 steps of a small model (bf16 autocast, dropout 0.3, label smoothing,
                            clipping, a LambdaLR warm-up read through the lr tensor) over batches of
                            3 shapes, one of which fits no bucket: graphs captured and replayed
                            against emulate=True (same capturable Adam, same RNG). The same kernels
                            on the same data: losses, NLL sums and gradient norms agree to 1e-5
                            (expected: exactly). The graphed run reads them a step late, as mt.train
                            does (mt.step_stats), so its host runs a step ahead of the GPU.
  train_graph_updates_the_ema  the EMA of the weights (mt.averaging) updated inside the captured
                            step: its weights after the run against the emulated run's.
  train_graph_vs_eager      20 steps, fp32 with TF32 off, dropout 0: GraphedTrainStep against
                            TrainStep on the unpadded batches (trainer.cuda_graphs=false: plain
                            Adam, cuDNN packed). Padding and the optimizer implementation change
                            rounding only: losses within 1e-3 relative.
  train_capture_large_batch a (64, 80, 80) batch shape: over 4096 embedding ids, where the
                            embedding backward sorts (another kernel path, which must not sync
                            either); graph against emulated.
  decode_graph_vs_emulated  greedy and beam 5 with GraphedDecoder (the encoder and the search step
                            each its own graph) against emulate=True: identical tokens, scores
                            within 1e-4; the encoder's graph captured once and replayed.
  decode_ensemble_graph_vs_emulated
                            greedy and beam 5 with an mt.ensemble.Ensemble of two models of
                            different shapes: the same agreement as one model's.
  decode_graph_vs_eager     fp32: the graphed decoder against plain eager decoding (no padding):
                            >= 95% of the sentences identical (padding changes float rounding; an
                            untrained model has near-ties), scores of identical outputs within 1e-3.

Imports only torch, numpy and mt (no hydra-core, omegaconf or datasets).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_graphs import BOS, EOS, PAD, criterion, make_batch, tiny_model

from mt import graphs
from mt.averaging import EMA
from mt.search import search
from mt.step_stats import StepStats, step_values

VOCAB = 500
HIDDEN = {"cuda": 128, "cpu": 16}
STEPS = {"cuda": 20, "cpu": 8}  # the batch that fits no bucket comes at step 7


def cases(*dtypes):
    """Parameters (device, cell[, dtype]): each cell with each dtype on CUDA, marked gpu; on CPU
    (the tests' logic only) the cuDNN cell (nn.LSTM there) with the first dtype."""
    cuda = [
        pytest.param("cuda", cell, *d, marks=pytest.mark.gpu) for cell in ("triton", "cudnn") for d in (dtypes or [()])
    ]
    return cuda + [pytest.param("cpu", "cudnn", *d) for d in (dtypes[:1] or [()])]


@pytest.fixture(autouse=True)
def cpu_settings(request):
    """On CPU: one thread and no oneDNN (its fp32 LSTM is slow at these sizes)."""
    if request.node.callspec.params["device"] != "cpu":
        yield
        return
    request.getfixturevalue("one_thread")
    mkldnn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = mkldnn


def small_model(device: str, cell: str, dropout: float):
    hidden = HIDDEN[device]
    return tiny_model(
        cell, torch.float32, vocab=VOCAB, emb_dim=hidden, hidden_dim=hidden, dropout=dropout, emb_dropout=dropout
    ).to(device)


def max_rel(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=0.0)


# ----------------------------------------------------------------------------- training
def training_batches(n_steps: int) -> list:
    """Two shapes that fit the buckets (several times each: warm-up, capture, replay), and at
    step 7 one with too many sentences for any bucket (runs eagerly)."""
    shapes = [(40, 9, 9) if k == 7 else ((16, 12, 11) if k % 2 == 0 else (8, 20, 18)) for k in range(n_steps)]
    return [make_batch(*shape, seed=100 + k, vocab=VOCAB) for k, shape in enumerate(shapes)]


def run_training(
    device: str, cell: str, mode: str, batches: list, amp_dtype, dropout: float, lagged: bool = False, ema=None
) -> tuple[list, dict]:
    """mode: graph | emulate | eager. Returns per step [loss_sum, nll_sum, grad_norm] and the
    step's stats. lagged: read them a step late as mt.train does, else right after each step.
    ema: a decay: an EMA of the weights is updated by the step, and its weights are returned
    as stats["ema"]."""
    model = small_model(device, cell, dropout).train()
    average = EMA(model, ema) if ema else None
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.98), eps=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 5, 1.0))
    kw = dict(pad_id=PAD, amp_dtype=amp_dtype, clip_norm=1.0, device=device)
    if mode == "eager":
        step = graphs.TrainStep(model, opt, criterion(), ema=average, **kw)
    else:
        if device == "cuda":  # (a CPU Adam cannot be capturable)
            graphs.make_capturable(opt, device)
        step = graphs.GraphedTrainStep(
            model,
            opt,
            criterion(),
            buckets=graphs.ShapeBuckets([(16, 12, 12), (8, 20, 20)]),
            emulate=mode == "emulate" or device != "cuda",
            ema=average,
            **kw,
        )
    torch.manual_seed(1234)  # the same dropout masks for every mode
    log = []
    pending = StepStats(device, lag=1)
    for b in batches:
        loss_sum, nll_sum = step.forward_backward(b)
        if not lagged:
            log.append([loss_sum.item(), nll_sum.item()])
        grad_norm = step.update()
        if not lagged:
            log[-1].append(float(grad_norm))
        sched.step()
        if lagged:
            pending.push(
                None, step_values(loss_sum, nll_sum, b.ntokens, False, grad_norm, opt.param_groups[0]["lr"], device)
            )
            log += [[row[0], row[1], row[4]] for _, row in pending.ready()]
    log += [[row[0], row[1], row[4]] for _, row in pending.drain()]
    stats = dict(getattr(step, "stats", {}))
    if average is not None:
        stats["ema"] = [s.detach().float().cpu() for s in average.shadow]
    return log, stats


@pytest.mark.parametrize("device, cell", cases())
def test_train_graph_vs_emulated(device, cell):
    steps = STEPS[device]
    batches = training_batches(steps)
    g, gstats = run_training(device, cell, "graph", batches, torch.bfloat16, 0.3, lagged=True)
    e, _ = run_training(device, cell, "emulate", batches, torch.bfloat16, 0.3)
    flat_g, flat_e = [v for row in g for v in row], [v for row in e for v in row]
    assert all(math.isfinite(v) for v in flat_g), flat_g
    assert max_rel(flat_g, flat_e) <= 1e-5, ([r[0] for r in g], [r[0] for r in e])
    assert gstats.get("eager", 0) == int(steps > 7), gstats  # the batch that fits no bucket
    if device == "cuda":
        assert gstats.get("captured") == 2 and gstats.get("replayed", 0) >= steps - 10, gstats


@pytest.mark.parametrize("device, cell", cases())
def test_train_graph_updates_the_ema(device, cell):
    """The EMA update is part of the captured step: its weights after the replays equal the
    emulated run's (same steps, same dropout masks)."""
    batches = training_batches(STEPS[device])
    _, g = run_training(device, cell, "graph", batches, torch.bfloat16, 0.3, ema=0.9)
    _, e = run_training(device, cell, "emulate", batches, torch.bfloat16, 0.3, ema=0.9)
    if device == "cuda":
        assert g.get("captured") == 2, g
    for a, b in zip(g["ema"], e["ema"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device, cell", cases())
def test_train_graph_vs_eager(device, cell):  # (gpu cases in IEEE fp32: conftest's ieee_fp32_on_gpu)
    batches = training_batches(STEPS[device])
    g, _ = run_training(device, cell, "graph", batches, None, 0.0)
    e, _ = run_training(device, cell, "eager", batches, None, 0.0)
    losses_g, losses_e = [r[0] for r in g], [r[0] for r in e]
    assert max_rel(losses_g, losses_e) <= 1e-3, (losses_g, losses_e)


@pytest.mark.parametrize("device, cell", cases())
def test_train_capture_large_batch(device, cell):
    """Batches with more than 4096 token ids take another embedding-backward kernel (sort and
    segment) than small ones: capture that one too (4 steps: 2 warm-up, capture, replay)."""
    shape = (64, 80, 80)  # 5120 source and 5120 target ids
    batches = [make_batch(*shape, seed=300 + k, vocab=VOCAB) for k in range(4)]
    logs = []
    for emulate in (False, True):
        model = small_model(device, cell, 0.1).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if device == "cuda":
            graphs.make_capturable(opt, device)
        step = graphs.GraphedTrainStep(
            model,
            opt,
            criterion(),
            pad_id=PAD,
            amp_dtype=torch.bfloat16 if device == "cuda" else None,
            clip_norm=1.0,
            buckets=graphs.ShapeBuckets([shape]),
            device=device,
            emulate=emulate or device != "cuda",
        )
        torch.manual_seed(99)
        logs.append([step.forward_backward(b)[0].item() for b in batches])
    assert max_rel(*logs) <= 1e-5, logs


# ----------------------------------------------------------------------------- decoding
def decode(device: str, model, batch, decoder, beam: int, amp_dtype):
    with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return search(
            model,
            batch.src.to(device),
            batch.src_len.to(device),
            BOS,
            EOS,
            beam=beam,
            length_penalty=1.0 if beam > 1 else None,
            max_len_b=8,
            graphs=decoder,
        )


def graphed_decodes(device: str, cell: str, beam: int, amp_dtype):
    """(model, batch, GraphedDecoder, its 3 decodes: warm-up, capture, replay) for 37 sentences."""
    model = small_model(device, cell, 0.0).eval()
    batch = make_batch(37, 19, 2, seed=7, vocab=VOCAB)
    decoder = graphs.GraphedDecoder(model)
    return model, batch, decoder, [decode(device, model, batch, decoder, beam, amp_dtype) for _ in range(3)]


@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("device, cell, dtype", cases(("fp32",), ("bf16",)))
def test_decode_graph_vs_emulated(device, cell, dtype, beam):
    amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]
    model, batch, decoder, outs = graphed_decodes(device, cell, beam, amp)
    ref = decode(device, model, batch, graphs.GraphedDecoder(model, emulate=True), beam, amp)
    assert all(o.tokens == ref.tokens for o in outs)
    assert max(max_rel(o.scores, ref.scores) for o in outs) <= 1e-4
    if device == "cuda":  # the third search replays both graphs: the encoder's (captured by the second) and the step's
        enc = dict(decoder.encoder_stats)
        assert enc.get("captured") == 1 and enc.get("replayed") == 1, (enc, dict(decoder.stats))


@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("device, cell", cases())
def test_decode_graph_vs_eager(device, cell, beam):
    model, batch, _, outs = graphed_decodes(device, cell, beam, None)
    eager = decode(device, model, batch, None, beam, None)
    agree = [a == b for a, b in zip(outs[-1].tokens, eager.tokens)]
    assert sum(agree) / len(agree) >= 0.95, agree
    assert (
        max_rel([s for s, ok in zip(outs[-1].scores, agree) if ok], [s for s, ok in zip(eager.scores, agree) if ok])
        <= 1e-3
    )


@pytest.mark.parametrize("beam", [1, 5])
@pytest.mark.parametrize("device, cell, dtype", cases(("fp32",), ("bf16",)))
def test_decode_ensemble_graph_vs_emulated(device, cell, dtype, beam):
    from mt.ensemble import Ensemble

    amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]

    other = HIDDEN[device] // 2
    second = tiny_model(
        cell, torch.float32, seed=1, vocab=VOCAB, emb_dim=other, hidden_dim=other, dec_layers=1, attention="dot"
    )
    ens = Ensemble([small_model(device, cell, 0.0), second.to(device)]).eval()
    batch = make_batch(37, 19, 2, seed=7, vocab=VOCAB)
    decoder = graphs.GraphedDecoder(ens)
    outs = [decode(device, ens, batch, decoder, beam, amp) for _ in range(3)]
    ref = decode(device, ens, batch, graphs.GraphedDecoder(ens, emulate=True), beam, amp)
    assert all(o.tokens == ref.tokens for o in outs)
    assert max(max_rel(o.scores, ref.scores) for o in outs) <= 1e-4
    if device == "cuda":
        assert decoder.encoder_stats.get("captured") == 1 and decoder.stats.get("replayed", 0) > 0
