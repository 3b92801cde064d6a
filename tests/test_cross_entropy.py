"""The fused training loss, mt/kernels/cross_entropy.py (under the CPU interpreter), against
`reference.cross_entropy_sums` (nn.CrossEntropyLoss on the logits in fp32): both sums and the
gradient, ignored rows, several tiles a row, the variants it compiles, the dispatch, and a
training run with `trainer.fused_loss=true` against one without.

Where there is no GPU the kernels run on CPU tensors through the Triton interpreter; on a GPU
machine the cases marked gpu run the compiled kernel on CUDA (tests/kernel_utils.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_utils import cpu, cuda, interpreted, kernel_module, record_variants

from mt import kernels
from mt.kernels import reference

pytest.importorskip("triton")

PAD = 0


def logits_and_target(N: int, V: int, dtype, device, seed: int, pad: int = PAD):
    """Logits (N, V) and targets (N,), every fourth one `pad`; the others in [1, V) (V = 1: 0)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)  # (N, V)
    target = torch.randint(1, V, (N,), generator=g) if V > 1 else torch.zeros(N, dtype=torch.long)
    target[1::4] = pad  # padding rows: no loss, no gradient
    return logits, target.to(device)


def sums_and_grad(fn, logits, target, eps, upstream: float, pad: int = PAD):
    """(loss_sum, nll_sum, d(upstream * loss_sum)/d logits) of `fn`."""
    x = logits.detach().clone().requires_grad_(True)
    loss_sum, nll_sum = fn(x, target, eps, pad)
    assert loss_sum.dtype == nll_sum.dtype == torch.float32 and loss_sum.dim() == nll_sum.dim() == 0
    assert not nll_sum.requires_grad  # the perplexity's numerator carries no gradient
    (loss_sum * upstream).backward()
    return loss_sum.detach(), nll_sum, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "device, N, V, eps, pad",
    [
        cpu(9, 50, 0.1, PAD),
        cpu(6, 5000, 0.1, PAD),  # three tiles, the last one partial
        cpu(5, 4096, 0.0, 2),  # two full tiles, no smoothing, another padding id
        cpu(7, 1, 0.1, -100),  # one class (PyTorch's default ignore_index, negative): loss 0
        cuda(2560, 8000, 0.1, PAD),  # the Multi30k step's logits (B = 128, T = 20)
        cuda(1024, 32000, 0.1, PAD),  # a WMT-size vocabulary
        cuda(300, 1001, 0.1, -100),  # a vocabulary not divisible by 16: the other compiled variant
    ],
)
def test_cross_entropy_kernel_matches_reference(dtype, device, N, V, eps, pad):
    """Both sums equal the reference's (the same fp32 maths on the same logits: 1e-5); so does the
    gradient, scaled by an upstream 1/N as in training (fp32: 1e-5; bf16: elementwise a bf16
    rounding apart, and summed within 1e-3, which a scale rounded to bf16 would miss); padding
    rows get exactly zero."""
    ce = kernel_module("cross_entropy")
    logits, target = logits_and_target(N, V, dtype, device, seed=N + V, pad=pad)
    upstream = 1.0 / N
    got = sums_and_grad(ce.cross_entropy_sums, logits, target, eps, upstream, pad)
    ref = sums_and_grad(reference.cross_entropy_sums, logits, target, eps, upstream, pad)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert got[2].dtype == dtype and got[2].shape == (N, V)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5 * upstream)
    torch.testing.assert_close(got[2], ref[2], **tol)
    # the gradient's total: 1e-3 in bf16 catches a scale rounded to bf16 (up to 0.4 %); the
    # interpreter rounds fp32 to bf16 toward zero (compiled kernels: to nearest), 0.2 % low on average
    mass = [g.double().abs().sum().item() for g in (got[2], ref[2])]
    truncates = dtype == torch.bfloat16 and device == "cpu"
    assert mass[0] == pytest.approx(mass[1], rel=5e-3 if truncates else 1e-3 if dtype == torch.bfloat16 else 1e-5)
    assert torch.all(got[2][target == pad] == 0)
    if V > 1:  # not a vacuous comparison: real losses, and gradients that sum to zero per row
        assert got[0].item() > 0.5 * N and got[2].abs().max().item() > 0.01 * upstream
        assert got[2].float().sum(dim=1).abs().max().item() < 1e-2 * upstream
    else:
        assert got[0].item() == 0 and torch.all(got[2] == 0)


@interpreted
def test_cross_entropy_without_autograd_and_bad_input():
    """Under no_grad the kernel writes no gradient and returns the same sums; targets that do not
    match the rows, and a smoothing outside [0, 1], are one-line ValueErrors."""
    ce = kernel_module("cross_entropy")
    logits, target = logits_and_target(7, 300, torch.float32, "cpu", seed=3)
    with torch.no_grad():
        got = ce.cross_entropy_sums(logits, target, 0.2, PAD)
    ref = reference.cross_entropy_sums(logits, target, 0.2, PAD)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="6 targets|\\(6,\\) targets"):
        ce.cross_entropy_sums(logits, target[:6], 0.1, PAD)
    with pytest.raises(ValueError, match="label_smoothing"):
        ce.cross_entropy_sums(logits, target, 1.5, PAD)


@interpreted
def test_cross_entropy_compiles_one_variant_per_dtype(monkeypatch):
    """Row counts, the padding id and the smoothing are not specialized, and vocabulary sizes only
    on their divisibility by 16: batches of any shape compile the forward (with or without
    autograd) and the backward once per logits dtype."""
    ce = kernel_module("cross_entropy")
    keys = record_variants(monkeypatch, [(ce, "_cross_entropy_forward_kernel"), (ce, "_cross_entropy_backward_kernel")])
    for N, V in [(3, 48), (16, 16), (5, 3008), (2, 8000)]:
        logits, target = logits_and_target(N, V, torch.float32, "cpu", seed=N)
        ce.cross_entropy_sums(logits.requires_grad_(True), target, 0.1, PAD)[0].backward()
        with torch.no_grad():
            ce.cross_entropy_sums(logits, target, 0.0, 1)
    assert len(keys) == 2, keys


@interpreted
def test_dispatch_and_fused_criterion(monkeypatch):
    """kernels.cross_entropy_sums runs the kernel for backend triton (the interpreter here) and
    the reference for torch and for auto on CPU; FusedCrossEntropyLoss is a drop-in
    nn.CrossEntropyLoss(reduction="sum") whose sums come from the kernel."""
    ce = kernel_module("cross_entropy")
    from mt.loss import FusedCrossEntropyLoss

    launches = []
    forward = ce._forward
    monkeypatch.setattr(ce, "_forward", lambda *a: launches.append(a[0].shape) or forward(*a))
    logits, target = logits_and_target(6, 40, torch.float32, "cpu", seed=5)
    for backend, n_launches in (("torch", 0), ("auto", 0), ("triton", 1)):
        got = kernels.cross_entropy_sums(logits, target, 0.1, PAD, backend=backend)
        assert len(launches) == n_launches, backend
        torch.testing.assert_close(got, reference.cross_entropy_sums(logits, target, 0.1, PAD), rtol=1e-5, atol=1e-5)
    fused = FusedCrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1)
    plain = torch.nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(fused(logits, target), plain(logits, target), rtol=1e-5, atol=1e-5)
    assert len(launches) == 2


@interpreted
def test_training_with_fused_loss_matches_pytorch_loss(tiny_corpus_dir, tmp_path, monkeypatch):
    """mt.train with trainer.fused_loss=true launches the kernel at every step and ends where the
    same run with PyTorch's loss does: validation loss and weights after 6 steps with label
    smoothing 0.1, fp32 on the CPU."""
    from conftest import train_toy

    ce = kernel_module("cross_entropy")
    backwards = []
    backward = ce._backward
    monkeypatch.setattr(ce, "_backward", lambda *a: backwards.append(a[0].shape) or backward(*a))
    runs = {}
    for fused in (False, True):
        summary = train_toy(
            tiny_corpus_dir,
            tmp_path / "cache",
            tmp_path / f"run_{fused}",
            "trainer.max_steps=6",
            "trainer.eval_every=6",
            "trainer.max_tokens=256",
            "optim.label_smoothing=0.1",
            f"trainer.fused_loss={str(fused).lower()}",
        )
        state = torch.load(summary["last_path"], map_location="cpu", weights_only=True)["model"]
        runs[fused] = (summary["last"]["loss"], state)
    assert len(backwards) == 6  # the kernel's backward at every training step, none without the switch
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, w in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], w, rtol=1e-4, atol=1e-6, msg=name)


@interpreted
def test_bench_loss_script_runs_on_cpu(tmp_path):
    """benchmarks/bench_loss.py's CPU smoke run (the interpreter): both columns timed on both
    sizes, the fused sums within 1e-5 of PyTorch's; the graph and memory rows need CUDA."""
    from conftest import run_benchmark

    res, _ = run_benchmark(tmp_path, "bench_loss.py", "--quick")
    assert res["environment"]["interpreter"] is True
    assert [(r["size"], r["V"]) for r in res["results"]] == [("tiny", 300), ("two-tiles", 3000)]
    for r in res["results"]:
        assert r["torch"]["eager_ms"] > 0 and r["fused"]["eager_ms"] > 0
        assert r["torch"]["loss_sum"] > r["torch"]["nll_sum"] > 0  # smoothing adds to the loss
        assert r["fused"]["max_rel_diff"] <= 1e-5, r


@pytest.mark.parametrize(
    "device, mode, amp_dtype, tol",
    [
        cpu("emulate", None, 1e-5, id="cpu-emulated-fp32"),
        cuda("graph", torch.bfloat16, 2e-3, id="cuda-graph-bf16"),
    ],
)
def test_graphed_step_with_fused_loss(monkeypatch, device, mode, amp_dtype, tol):
    """The fused loss inside mt.graphs.GraphedTrainStep (captured on CUDA: the kernel and its
    backward replayed from the graphs of two bucket shapes, and the batch that fits no bucket
    eager) against the same steps with PyTorch's loss: the losses, NLLs and gradient norms of
    every step agree (fp32: 1e-5; bf16: the gradient's extra rounding, 2e-3)."""
    ce = kernel_module("cross_entropy")
    backwards = []
    backward = ce._backward
    monkeypatch.setattr(ce, "_backward", lambda *a: backwards.append(a[0].shape) or backward(*a))
    import test_graphs_gpu
    from test_graphs import criterion as plain
    from test_graphs_gpu import max_rel, run_training, training_batches

    from mt.loss import FusedCrossEntropyLoss

    cell = "triton" if device == "cuda" else "cudnn"
    batches = training_batches(test_graphs_gpu.STEPS[device])
    ref, _ = run_training(device, cell, mode, batches, amp_dtype, 0.0)
    assert not backwards
    fused = plain()
    monkeypatch.setattr(
        test_graphs_gpu,
        "criterion",
        lambda: FusedCrossEntropyLoss(ignore_index=fused.ignore_index, label_smoothing=fused.label_smoothing),
    )
    got, stats = run_training(device, cell, mode, batches, amp_dtype, 0.0)
    assert backwards  # the kernels ran (on CUDA: in the warm-ups, the captures and the eager batch)
    flat_got, flat_ref = [v for row in got for v in row], [v for row in ref for v in row]
    assert max_rel(flat_got, flat_ref) <= tol, ([r[0] for r in got], [r[0] for r in ref])
    assert fused.label_smoothing > 0 and got[0][0] > got[0][1]  # the smoothed loss, not the NLL twice
    if device == "cuda":
        assert stats.get("captured") == 2 and stats.get("eager") == 1, stats
