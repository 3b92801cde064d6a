"""Data-parallel training (mt/distributed.py): the flat gradient buffer that the CUDA-graph step
all-reduces, against PyTorch's DistributedDataParallel on the same batches.

    python -m pytest tests/test_distributed.py            # CPU: 2 processes over gloo, graphs emulated
    python -m pytest -m gpu tests/test_distributed.py     # GPU: the captured step over NCCL

  flat_gradients_are_views      every .grad a view of one buffer; the backward fills it in place
                                and leaves it a view, through in-place zeroing and several steps
  torchrun_world_of_one         under torchrun even a world of one is a process group
  graphed_ddp_matches_ddp       2 ranks (gloo, CPU, fp64), each its own batches of its own shapes:
                                GraphedTrainStep (emulated) with FlatGradients against TrainStep
                                on a DDP-wrapped model: the same losses and weights on every rank,
                                the same weights on both ranks, the update (all-reduce included)
                                run once a step on each, and (the control) without the all-reduce
                                the ranks' weights part
  captured_ddp_matches_ddp      gpu: the same on CUDA with the steps captured (the NCCL all-reduce
                                in the one update graph), a world of one (two where there are two
                                GPUs: ranks in different buckets, one in the eager fallback)
  torchrun_cuda_graphs          gpu: `torchrun --nproc_per_node=1 -m mt.train trainer.cuda_graphs=true`
                                trains with the captured step and the same losses as eager DDP
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_graphs import PAD, criterion, make_batch, tiny_model
from torch import nn

from mt import graphs
from mt.distributed import Distributed, FlatGradients

REPO = Path(__file__).resolve().parents[1]
STEPS = {"cpu": 6, "cuda": 10}  # on CUDA: each bucket warmed up twice, captured, then replayed


def test_flat_gradients_are_views(one_thread):
    model, twin = tiny_model(), tiny_model()  # the same weights (same seed)
    flat = FlatGradients(model.parameters(), Distributed())
    assert len(flat.buffers) == 1 and flat.buffers[0].numel() == sum(p.numel() for p in model.parameters())
    assert flat.views_intact()
    for k in range(3):
        b = make_batch(5, 7, 6, seed=k)
        for m in (model, twin):
            logits, _ = m(b.src, b.src_len, b.tgt_in)
            criterion()(logits.reshape(-1, logits.shape[-1]), b.tgt_out.reshape(-1)).backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        assert flat.views_intact()
        assert flat.buffers[0].abs().sum() > 0
        torch._foreach_zero_([p.grad for p in model.parameters()])  # as GraphedTrainStep zeroes them
        twin.zero_grad(set_to_none=True)
        assert flat.buffers[0].abs().sum() == 0
    model.zero_grad(set_to_none=True)  # what breaks the views (GraphedTrainStep never does it)
    assert not flat.views_intact()
    flat.average_()  # no process group: nothing to average, and no error


def test_torchrun_world_of_one(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not Distributed().enabled
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not Distributed().enabled  # a WORLD_SIZE alone is not torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert Distributed().enabled and Distributed().world == 1


# ----------------------------------------------------------------------------- several ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_batches(rank: int, steps: int) -> list:
    """Each rank its own batches, of other shapes than the other rank's (so under graphs the ranks
    run different slots, the eager fallback included, and must still pair their all-reduces)."""
    shapes = [(40, 9, 9)] if rank == 0 else [(8, 20, 18)]  # (40, ...) fits no bucket: eager
    shapes += [(16, 12, 11) if (k + rank) % 2 == 0 else (8, 20, 18) for k in range(steps - 1)]
    return [make_batch(*s, seed=100 * rank + k, vocab=60) for k, s in enumerate(shapes)]


def _worker(rank: int, world: int, port: int, device: str, out: str) -> None:
    """One rank: the same training three ways; losses and final weights saved to out/rank<k>.pt."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    ddp = Distributed()
    ddp.init(dev)  # gloo on CPU, NCCL on CUDA
    dtype = torch.float64 if device == "cpu" else torch.float32
    if device == "cuda":  # IEEE fp32: eager and graphed differ by rounding only
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results = {}
    modes = ["ddp_eager", "graphed"] + (["graphed_unsynced"] if world > 1 else [])
    for mode in modes:
        # rank-dependent initial weights: only the broadcast (DDP's, or broadcast_module_) aligns them
        model = tiny_model("cudnn", dtype, seed=rank, vocab=60).to(dev).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        kw = dict(pad_id=PAD, amp_dtype=None, clip_norm=1.0, device=dev)
        flat = None
        if mode == "ddp_eager":
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[dev] if device == "cuda" else None)
            step = graphs.TrainStep(model, opt, criterion(), train_model=wrapped, **kw)
        else:
            ddp.broadcast_module_(model)
            if mode == "graphed":
                flat = FlatGradients(model.parameters(), ddp)
            if device == "cuda":
                graphs.make_capturable(opt, dev)
            buckets = graphs.ShapeBuckets([(16, 12, 12), (8, 20, 20)])
            step = graphs.GraphedTrainStep(
                model, opt, criterion(), buckets=buckets, emulate=device != "cuda", grad_sync=flat, **kw
            )
        losses = []
        for b in _rank_batches(rank, STEPS[device]):
            loss_sum, _ = step.forward_backward(b)
            losses.append(loss_sum.item())
            step.update()
        results[mode] = {
            "losses": losses,
            "weights": [p.detach().cpu().clone() for p in model.parameters()],
            "views_intact": flat.views_intact() if flat is not None else None,
            "stats": dict(getattr(step, "stats", {})),
            "update_stats": dict(getattr(step, "update_stats", {})),
        }
        del step  # (its graphs hold captured NCCL work: gone before the process group)
    if device == "cuda":
        torch.cuda.synchronize()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    ddp.barrier()
    ddp.close()


def _run_ranks(world: int, device: str, tmp_path: Path, timeout_s: float = 300) -> list[dict]:
    """`_worker` on `world` processes; a rank that hangs (unpaired collectives) fails the test."""
    ctx = mp.spawn(_worker, args=(world, _free_port(), device, str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} ranks did not finish in {timeout_s:.0f} s (a hang in a collective?)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _check_against_ddp(ranks: list[dict], rtol: float, atol: float) -> None:
    for r, res in enumerate(ranks):
        ref, got = res["ddp_eager"], res["graphed"]
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=rtol, atol=atol, msg=f"rank {r}: losses differ")
        for a, b in zip(got["weights"], ref["weights"], strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        assert got["views_intact"], f"rank {r}: a gradient stopped being a view of the flat buffer"
    # the ranks took the same updates: their weights are the same, bit for bit
    for a, b in zip(ranks[0]["graphed"]["weights"], ranks[-1]["graphed"]["weights"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_graphed_ddp_matches_ddp(tmp_path):
    ranks = _run_ranks(2, "cpu", tmp_path)
    _check_against_ddp(ranks, rtol=1e-5, atol=1e-7)  # (the loss is summed in fp32)
    stats = [res["graphed"]["stats"] for res in ranks]
    assert [res["graphed"]["update_stats"] for res in ranks] == [{"emulated": STEPS["cpu"]}] * 2  # every step
    assert stats == [
        {"eager": 1, "emulated": STEPS["cpu"] - 1},
        {"emulated": STEPS["cpu"]},
    ]  # rank 0's first batch fits no bucket
    # the control: without the all-reduce each rank follows its own gradients
    a, b = ranks[0]["graphed_unsynced"]["weights"], ranks[1]["graphed_unsynced"]["weights"]
    assert any(not torch.allclose(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.gpu
def test_captured_ddp_matches_ddp(tmp_path):
    world = min(2, torch.cuda.device_count())
    ranks = _run_ranks(world, "cuda", tmp_path)
    _check_against_ddp(ranks, rtol=1e-3, atol=1e-5)  # padding and the Adam implementation: rounding only
    for res in ranks:
        stats = res["graphed"]["stats"]
        assert stats.get("captured") == 2 and stats.get("replayed", 0) >= 2, stats
        # the update graph (all-reduce inside): warmed up, captured and replayed at the same steps on every rank
        assert res["graphed"]["update_stats"] == {"warmup": 2, "captured": 1, "replayed": STEPS["cuda"] - 3}


@pytest.mark.gpu
@pytest.mark.slow
def test_torchrun_cuda_graphs(tiny_corpus_dir, tmp_path):
    """torchrun, a world of one, NCCL: cuda_graphs=true captures the step with the all-reduce, and
    trains as eager DDP does (fp32, TF32 off, dropout 0: the same losses up to rounding)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    losses = {}
    for graphed in ("true", "false"):
        out = tmp_path / graphed
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        cmd += ["-m", "mt.train", "debug=tiny", f"data.path={tiny_corpus_dir}", f"hydra.run.dir={out}"]
        cmd += [f"data.cache_dir={tmp_path / 'c'}", "trainer.max_steps=40", "trainer.eval_every=40"]
        cmd += [
            "trainer.log_every=10",
            "trainer.precision=fp32",
            "trainer.tf32=false",
            "trainer.precompile_workers=0",  # (a tiny model: its kernels compile at first launch)
            f"trainer.cuda_graphs={graphed}",
        ]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        log = (out / "train.log").read_text()
        assert "world=1" in log
        assert ("CUDA graphs on" in log) == (graphed == "true"), log[-3000:]
        losses[graphed] = [float(ln.split("| loss ")[1].split()[0]) for ln in log.splitlines() if "| loss " in ln]
    assert len(losses["true"]) >= 4 and len(losses["true"]) == len(losses["false"]), losses
    torch.testing.assert_close(losses["true"], losses["false"], rtol=2e-3, atol=1e-4)
