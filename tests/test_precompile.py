"""Triton precompiling (mt/kernels/precompile.py, mt/precompile.py) on a machine without a GPU.

The round trip runs the real Triton JIT, not the interpreter: in a subprocess, a stand-in driver
reports an sm_90 target and turns launches into no-ops, so the model's training step,
validation loss and greedy search go through the JIT's own binder and cache lookups on CPU
tensors. The dry run records the variants, worker processes compile them for sm_90 (ptxas
included), and then a pass over batches of every size must find each variant it launches in
Triton's on-disk cache: none missed, none compiled again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from mt import precompile
from mt.config import ModelConfig
from mt.errors import MTError
from mt.kernels import precompile as kp
from mt.model import Seq2Seq, cell_backend

REPO = Path(__file__).resolve().parents[1]


def _ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


_ROUND_TRIP = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return 0, 0, 0, 0, 1024
        def get_device_properties(self, device):
            return {"max_shared_mem": 1 << 20}

    class StandInDriver:  # an sm_90 target; launches do nothing
        utils = Utils()
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 0
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def launcher_cls(self, src, metadata):
            return lambda *args, **kwargs: None

    driver.set_active(StandInDriver())
    import mt.kernels
    from mt.kernels import triton_cell
    mt.kernels.triton_available = lambda: True      # CPU tensors through the real JIT
    triton_cell._check_triton_device = lambda t: None
    # ...with the constexprs a GPU run uses (its tiles, bf16 dots without the interpreter's upcast)
    _pick = triton_cell._pick_blocks
    triton_cell._pick_blocks = lambda B, H, K, device: _pick(B, H, K, torch.device("cuda"))
    triton_cell._upcast = lambda device: False
    from mt.kernels import common
    common.runs_here = lambda t: True                 # the decoding kernels too

    from mt import graphs, precompile
    from mt.batching import collate
    from mt.config import ModelConfig
    from mt.kernels import precompile as kp
    from mt.model import Seq2Seq
    from mt.search import decode_dataset
    from mt.validation import validation_loss

    use_graphs = sys.argv[1] == "graphs"
    PAD, UNK, BOS, EOS, V = 0, 1, 2, 3, 40

    class Tok:
        pad_id, unk_id, bos_id, eos_id = PAD, UNK, BOS, EOS

    def batch(n, s, t, seed):
        g = torch.Generator().manual_seed(seed)
        rows = [{"src_ids": torch.randint(4, V, (s - 1 if i == 0 else int(torch.randint(1, s, (1,), generator=g)),),
                                          generator=g).tolist(),
                 "tgt_ids": torch.randint(4, V, (t - 1,), generator=g).tolist(), "idx": i} for i in range(n)]
        return collate(rows, PAD, BOS, EOS)

    torch.manual_seed(0)
    cfg = ModelConfig(cell="triton", emb_dim=32, hidden_dim=32, enc_layers=2, dec_layers=2, dropout=0.1,
                      emb_dropout=0.0, attention="general")
    model = Seq2Seq(cfg, V, V, PAD)
    crit = nn.CrossEntropyLoss(ignore_index=PAD, label_smoothing=0.1, reduction="sum")
    amp, dev = torch.bfloat16, torch.device("cpu")
    # the run's batches: sizes in all three batch tiles (16, 32, 64 rows), many lengths
    train_batches = [batch(n, s, t, i) for i, (n, s, t) in enumerate(
        [(70, 9, 7), (3, 14, 12), (20, 6, 11), (64, 5, 5), (17, 21, 9), (33, 4, 13), (8, 8, 8)])]
    valid_batches = [batch(n, s, t, 100 + i) for i, (n, s, t) in enumerate([(40, 7, 9), (9, 12, 10), (25, 5, 6)])]
    sources = [torch.randint(4, V, (int(torch.randint(1, 9, (1,))),)).tolist() for _ in range(50)]
    buckets = graphs.ShapeBuckets([(80, 10, 10), (40, 16, 16), (24, 24, 24)]) if use_graphs else None
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if use_graphs:
        step = graphs.GraphedTrainStep(model, opt, crit, pad_id=PAD, amp_dtype=amp, clip_norm=1.0, buckets=buckets,
                                       device=dev, emulate=True)
    else:
        step = graphs.TrainStep(model, opt, crit, pad_id=PAD, amp_dtype=amp, clip_norm=1.0, device=dev)
    params = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    workers = kp.CompileWorkers.start(2)
    variants, report = precompile.precompile(
        workers, model, tok=Tok, device=dev, amp_dtype=amp, criterion=crit, clip_norm=1.0, use_graphs=use_graphs,
        buckets=buckets, train_batch_sizes=[b.src.shape[0] for b in train_batches],
        valid_batch_sizes=[b.src.shape[0] for b in valid_batches], n_valid=len(sources), valid_batch_size=16,
        max_len_a=1.5, max_len_b=2)
    untouched = all(torch.equal(a, b) for a, b in zip(params, model.parameters())) and torch.equal(
        rng, torch.get_rng_state())
    cache = os.environ["TRITON_CACHE_DIR"]
    before = sorted(os.listdir(cache))

    # the run itself: every batch, the validation loss, every sentence decoded
    watch = kp.CompileWatch(variants)
    for b in train_batches:
        step.forward_backward(b)
        step.update()
    with torch.autocast("cpu", dtype=amp):
        validation_loss(model, valid_batches, dev, amp, PAD)
        decode_dataset(model, sources, Tok, dev, batch_size=16, max_len_a=1.5, max_len_b=2,
                       graphs=graphs.GraphedDecoder(model, emulate=True) if use_graphs else None)
    watch.close()
    print(json.dumps(dict(variants=len(variants), names=sorted({v.name.rsplit(".", 1)[1] for v in variants}),
                          compiled=report.compiled, errors=report.errors, untouched=untouched,
                          launched=watch.first_launches, missed=watch.missed, new_in_cache=sorted(
                              set(os.listdir(cache)) - set(before)), summary=report.summary())))
    """
)


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("triton_cache")


@pytest.mark.skipif(not _ptxas(), reason="this triton build ships no ptxas")
@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_precompiled_variants_are_every_variant_the_run_launches(mode, triton_cache):
    proc = subprocess.run(
        [sys.executable, "-c", _ROUND_TRIP, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(TRITON_CACHE_DIR=str(triton_cache)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["errors"] == [] and r["compiled"] == r["variants"], r
    graphed = ["_gather_rows_kernel"] if mode == "graphs" else []  # greedy's state into the graph's buffers
    assert r["names"] == sorted(
        [
            "_attention_step_backward_kernel",
            "_attention_step_kernel",
            "_cell_backward_kernel",
            "_cell_forward_kernel",
            "_greedy_update_kernel",
            "_log_softmax_topk_kernel",
            "_lstm_step_backward_kernel",
            "_lstm_step_forward_kernel",
            *graphed,
        ]
    ), r
    assert r["untouched"], "the dry run changed the model or the random state"
    assert r["launched"] > 0 and r["missed"] == 0, r  # every variant the run met was precompiled...
    assert r["new_in_cache"] == [], r  # ...and loaded from the cache, not compiled again


# ----------------------------------------------------------------------------- workers
def _spec(name: str) -> kp.Variant:
    return kp.Variant(name=name, key="k", data=json.dumps({"name": name}))


def test_worker_reports_a_failing_variant_in_one_line():
    workers = kp.CompileWorkers.start(1)
    workers.compile([_spec("mt.kernels.triton_cell.no_such_kernel")], ("cuda", 90, 32))
    report = workers.wait(timeout=120)
    assert report.variants == 1 and report.compiled == 0
    assert len(report.errors) == 1 and "no_such_kernel" in report.errors[0] and "\n" not in report.errors[0]
    assert "0 of 1" in report.summary() and "1 failed" in report.summary()
    assert not workers.tmp.exists()


def test_a_worker_that_dies_is_a_report_line_not_a_hang():
    workers = kp.CompileWorkers.start(2, modules=["mt_no_such_module_anywhere"])
    workers.compile([_spec("a.b"), _spec("c.d"), _spec("e.f")], ("cuda", 90, 32))
    report = workers.wait(timeout=120)
    assert report.compiled == 0 and len(report.errors) == 2, report.errors
    assert all("exited with status" in e and "mt_no_such_module_anywhere" in e for e in report.errors)


def test_a_worker_past_the_timeout_is_stopped_and_reported_once():
    workers = kp.CompileWorkers.start(1)
    workers.compile([_spec("mt.kernels.triton_cell._cell_forward_kernel")], ("cuda", 90, 32))
    report = workers.wait(timeout=0.0)  # still importing torch: stopped at once
    assert report.compiled == 0 and len(report.errors) == 1, report.errors
    assert "still compiling after 0 s and was stopped" in report.errors[0]
    assert all(p.returncode is not None for p in workers.procs) and not workers.tmp.exists()


def test_no_variants_means_no_work():
    workers = kp.CompileWorkers.start(2)
    workers.compile([], ("cuda", 90, 32))
    report = workers.wait(timeout=60)
    assert (report.variants, report.compiled, report.errors) == (0, 0, [])
    assert all(p.returncode is not None for p in workers.procs)


def test_close_before_any_job_stops_the_workers():
    workers = kp.CompileWorkers.start(2)
    workers.close()
    assert all(p.returncode is not None for p in workers.procs)
    assert not workers.tmp.exists()


def test_record_variants_restores_the_hook():
    import triton

    runtime = triton.knobs.runtime
    before = runtime.jit_cache_hook
    with pytest.raises(RuntimeError, match="boom"):
        kp.record_variants(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert runtime.jit_cache_hook is before
    assert kp.record_variants(lambda: None) == []


def test_compile_watch_counts_first_launches_and_misses():
    import triton

    runtime = triton.knobs.runtime
    hooks = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
    watch = kp.CompileWatch([kp.Variant("m.k", "key1", "{}")])
    info = type("Info", (), {"module": "m", "name": "k"})
    for key in ("key1", "key2"):  # as Triton calls them around a compile
        assert (
            runtime.jit_cache_hook(
                key=key, fn=info, compile={}, repr="", is_manual_warmup=False, already_compiled=False
            )
            is None
        )
        runtime.jit_post_compile_hook(
            key=key, fn=info, compile={}, repr="", is_manual_warmup=False, already_compiled=False
        )
    assert (watch.first_launches, watch.missed) == (2, 1)
    watch.expect([kp.Variant("m.k", "key3", "{}")])
    assert ("m.k", "key3") in watch.precompiled
    assert "2 Triton kernel variants" in watch.summary() and "1 of them were not precompiled" in watch.summary()
    watch.close()
    assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == hooks


# ----------------------------------------------------------------------------- settings
def test_resolve_workers(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precompile.resolve_workers(None, cpu, "torch") == 0
    assert precompile.resolve_workers(None, cuda, "cudnn") == 0
    monkeypatch.setattr(precompile, "_cpus", lambda: 16)
    assert precompile.resolve_workers(None, cuda, "triton") == 8
    monkeypatch.setattr(precompile, "_cpus", lambda: 4)
    assert precompile.resolve_workers(None, cuda, "triton") == 3
    monkeypatch.setattr(precompile, "_cpus", lambda: 2)
    assert precompile.resolve_workers(None, cuda, "triton") == 0  # one spare CPU: no gain
    assert precompile.resolve_workers(0, cuda, "triton") == 0
    assert precompile.resolve_workers(12, cuda, "triton") == 12
    with pytest.raises(MTError, match="precompile_workers=2 compiles Triton kernels for CUDA.*torch cell on cpu"):
        precompile.resolve_workers(2, cpu, "torch")
    with pytest.raises(MTError, match="cudnn cell"):
        precompile.resolve_workers(2, cuda, "cudnn")
    for bad in (-1, True, "4"):
        with pytest.raises(MTError, match="must be null"):
            precompile.resolve_workers(bad, cuda, "triton")


def test_one_per_tile():
    assert precompile.one_per_tile([]) == []
    assert precompile.one_per_tile([70, 64, 3, 16, 17, 40, 33, 32]) == [3, 17, 33]
    assert precompile.one_per_tile([128, 100]) == [100]


def test_cell_backend_fails_before_the_data():
    assert cell_backend("torch", "cpu") == "torch" and cell_backend("cudnn", "cpu") == "cudnn"
    with pytest.raises(MTError, match="unknown model.cell='lstm9'"):
        cell_backend("lstm9", "cpu")


@pytest.mark.parametrize("use_graphs", [False, True])
def test_dry_run_leaves_model_and_random_state_alone(use_graphs):
    """The dry run's code paths (torch cell here: nothing to record) on the run's own objects."""
    from mt.graphs import ShapeBuckets

    torch.manual_seed(0)
    model = Seq2Seq(
        ModelConfig(
            cell="torch",
            emb_dim=16,
            hidden_dim=16,
            enc_layers=2,
            dec_layers=2,
            dropout=0.3,
            emb_dropout=0.1,
            attention="general",
        ),
        30,
        30,
        0,
    )
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    tok = type("Tok", (), {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3})
    crit = nn.CrossEntropyLoss(ignore_index=0, label_smoothing=0.1, reduction="sum")
    precompile.dry_run(
        model,
        tok=tok,
        device=torch.device("cpu"),
        amp_dtype=None,
        criterion=crit,
        clip_norm=1.0,
        train_shapes=[(5, 8, 8), (40, 10, 10)],
        valid_batch_sizes=[3, 20],
        decode_sizes=[4, 7],
        valid_batch_size=7,
        max_len_a=1.0,
        max_len_b=2,
        use_graphs=use_graphs,
        buckets=ShapeBuckets([(5, 8, 8), (40, 10, 10)]) if use_graphs else None,
    )
    assert not model.training and not model.graph_safe
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
