"""Training end to end on a tiny generated corpus: it learns, resumes exactly, logs to
TensorBoard, stops on NaN, and refuses bad checkpoints; the real CLI in a subprocess; 2-process DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_STEPS
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mt.checkpoint import load_checkpoint
from mt.config import register_configs
from mt.errors import CheckpointError, TrainingDiverged
from mt.train import train

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def make_cfg(corpus: Path, cache: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "train",
            overrides=[
                "debug=tiny",
                f"data.path={corpus}",
                f"data.cache_dir={cache}",
                "trainer.device=cpu",
                "trainer.precision=fp32",
                *overrides,
            ],
        )
    return OmegaConf.to_object(cfg)


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tiny_run):
    """conftest's tiny model: debug=tiny, TINY_STEPS steps, validated twice."""
    return tiny_run["run"], tiny_run["summary"]


@pytest.mark.slow
def test_learns_the_toy_corpus(trained):
    out, summary = trained
    assert summary["step"] == TINY_STEPS
    losses = scalars(out)["train/loss"]
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.25 * first, (first, last)
    assert summary["best_bleu"] > 80, summary
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["step"] == TINY_STEPS and ck["tokenizer"]["src_model"] and ck["config"]["model"]["hidden_dim"] == 32


@pytest.mark.slow
def test_tensorboard_tags(trained):
    out, _ = trained
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    expected = {
        "train/loss",
        "train/ppl",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "valid/loss",
        "valid/ppl",
        "valid/bleu",
        "valid/chrf",
        "valid/bleu_lc",
    }
    assert expected <= set(tags["scalars"]), set(tags["scalars"])
    assert "valid/attention" in tags["images"]
    text_tags = set(tags["tensors"])
    assert {"valid/samples/text_summary", "valid/signature/text_summary"} <= text_tags, text_tags
    # hparams with the best BLEU live in the same run directory
    hp = [p for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    assert any(b"hparam/best_bleu" in p.read_bytes() for p in hp)
    assert all(math.isfinite(v) for v in scalars(out)["train/grad_norm"].values())


@pytest.mark.slow
def test_resume_gives_the_same_losses(tiny_corpus_dir, tmp_path):
    """60 steps straight == 30 steps, stop, resume to 60: identical per-step losses."""
    common = [
        "trainer.eval_every=30",
        "trainer.log_every=1",
        "model.dropout=0.3",
        "model.emb_dropout=0.2",
        "trainer.max_tokens=512",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=60", *common), straight)
    train(make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=30", *common), split)
    resumed = train(
        make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=60", "trainer.resume=true", *common), split
    )
    assert resumed["step"] == 60
    a, b = scalars(straight)["train/loss"], scalars(split)["train/loss"]
    assert sorted(b) == list(range(1, 61))
    assert [a[s] for s in range(31, 61)] == [b[s] for s in range(31, 61)]
    sa = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    sb = load_checkpoint(split / "checkpoints" / "last.pt")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_resume_refuses_bad_checkpoints(tiny_corpus_dir, tmp_path, trained):
    src, _ = trained
    cfg = make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.resume=true", "trainer.max_steps=310")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, tmp_path / "empty")
    bad = tmp_path / "corrupt" / "checkpoints" / "last.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, tmp_path / "corrupt")
    other = tmp_path / "other" / "checkpoints" / "last.pt"
    other.parent.mkdir(parents=True)
    other.write_bytes((src / "checkpoints" / "last.pt").read_bytes())
    wider = make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.resume=true", "model.hidden_dim=64", "model.emb_dim=64")
    with pytest.raises(CheckpointError, match="hidden_dim"):
        train(wider, tmp_path / "other")


def test_resume_keeps_how_the_checkpoints_tokenizer_was_trained(tiny_corpus_dir, tmp_path, trained):
    """A checkpoint saved before tokenizer.train_on existed (its SentencePiece read sentences)
    resumes under today's default, and the checkpoints after it still say "sentences": the
    tokenizer is the checkpoint's own."""
    from mt.checkpoint import save_checkpoint

    src, summary = trained
    state = load_checkpoint(src / "checkpoints" / "last.pt")
    del state["config"]["tokenizer"]["train_on"]
    save_checkpoint(state, tmp_path / "old" / "checkpoints" / "last.pt")
    cfg = make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.resume=true", f"trainer.max_steps={summary['step'] + 5}")
    assert cfg.tokenizer.train_on == "words"
    assert train(cfg, tmp_path / "old")["step"] == summary["step"] + 5
    after = load_checkpoint(tmp_path / "old" / "checkpoints" / "last.pt")
    assert after["config"]["tokenizer"]["train_on"] == "sentences"
    assert after["tokenizer"] == state["tokenizer"]


@pytest.mark.parametrize("first_nan,last_saved", [(16, 10), (20, 10), (10, None)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus_dir, tmp_path, monkeypatch, first_nan, last_saved):
    """The loss is read a step late; a NaN on the step that triggers a validation (20, 10) must
    still stop the run before that validation saves anything."""
    cfg = make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=40", "trainer.eval_every=10")
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss.forward

    def poisoned(self, logits, target):
        calls["n"] += 1
        loss = real(self, logits, target)
        return loss * float("nan") if calls["n"] >= first_nan else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=f"nan at step {first_nan};"):
        train(cfg, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    if last_saved is None:
        assert not (ckpts / "last.pt").exists() and not (ckpts / "best.pt").exists()
        return
    ck = load_checkpoint(ckpts / "last.pt")
    assert ck["step"] == last_saved
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_logged_losses_belong_to_their_steps(tiny_corpus_dir, tmp_path, monkeypatch):
    """With log_every=1, TensorBoard's train/loss at step k is step k's label-smoothed loss per
    target token, although the host reads it during step k+1; train/lr at step k is the lr after
    step k's scheduler step, and every step up to the last is logged once."""
    from mt.config import OptimConfig
    from mt.optim import make_scheduler

    cfg = make_cfg(
        tiny_corpus_dir,
        tmp_path / "c",
        "trainer.max_steps=12",
        "trainer.eval_every=5",
        "trainer.log_every=1",
        "optim.scheduler=cosine",
        "optim.warmup_steps=4",
        "optim.lr=1e-3",
        "optim.min_lr=1e-5",
    )
    per_step = []
    real = torch.nn.CrossEntropyLoss.forward

    def recording(self, logits, target):
        loss = real(self, logits, target)
        per_step.append(loss.item() / int((target != self.ignore_index).sum()))
        return loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", recording)
    train(cfg, tmp_path / "run")
    logged = scalars(tmp_path / "run")
    assert sorted(logged["train/loss"]) == list(range(1, 13))
    assert [logged["train/loss"][k] for k in range(1, 13)] == pytest.approx(per_step, rel=1e-5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, OptimConfig(lr=1e-3, scheduler="cosine", warmup_steps=4, min_lr=1e-5), 12)
    expected_lr = []
    for _ in range(12):
        opt.step()
        sched.step()
        expected_lr.append(opt.param_groups[0]["lr"])
    assert [logged["train/lr"][k] for k in range(1, 13)] == pytest.approx(expected_lr, rel=1e-6)


def run_cli(args, cwd=REPO, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mt.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw
    )


@pytest.mark.slow
def test_cli_writes_checkpoints_and_events(tiny_corpus_dir, tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        [
            "debug=tiny",
            f"data.path={tiny_corpus_dir}",
            "data.src=de",
            "data.tgt=en",
            "trainer.max_steps=20",
            "trainer.eval_every=20",
            f"data.cache_dir={tmp_path / 'c'}",
            f"hydra.run.dir={out}",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "checkpoints" / "best.pt").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert list(out.rglob("events.out.tfevents.*"))
    assert (out / ".hydra" / "config.yaml").is_file()
    # benchmarks/recipe_timing.py reads this log's validation lines, the background report's too
    timing = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "recipe_timing.py"),
            str(out / "train.log"),
            "--json",
            str(tmp_path / "timing.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert timing.returncode == 0, timing.stderr
    (valid,) = json.loads((tmp_path / "timing.json").read_text())["validations"]
    assert valid["step"] == 20 and valid["chrf"] is not None and valid["bleu_lc"] is not None


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli(["debug=tiny", f"data.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'o'}"])
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "does not exist" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = run_cli(["debug=tiny", "model.hiden_dim=3", f"hydra.run.dir={tmp_path / 'o2'}"])
    assert r.returncode != 0 and "hiden_dim" in r.stderr


@pytest.mark.slow
def test_ddp_two_processes(tiny_corpus_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): different batches per rank, rank 0 alone writes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "mt.train",
            "debug=tiny",
            f"data.path={tiny_corpus_dir}",
            "trainer.max_steps=20",
            "trainer.eval_every=20",
            f"data.cache_dir={tmp_path / 'c'}",
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "train.log").read_text()
    firsts = [ln.split("first batch rows ")[1] for ln in log.splitlines() if "first batch rows" in ln]
    assert len(firsts) == 2 and firsts[0] != firsts[1], log[-3000:]
    assert "world=2" in log
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["step"] == 20 and len(ck["rng"]) == 2
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) >= 1


@pytest.mark.slow
def test_multirun_sweep_jobs_get_their_own_directories(tiny_corpus_dir, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(
        [
            "-m",
            "debug=tiny",
            f"data.path={tiny_corpus_dir}",
            "trainer.max_steps=4",
            "trainer.eval_every=4",
            "model.attention=dot,bahdanau",
            f"data.cache_dir={tmp_path / 'c'}",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for job, attention in (("0", "dot"), ("1", "bahdanau")):
        ck = load_checkpoint(sweep / job / "checkpoints" / "last.pt")
        assert ck["config"]["model"]["attention"] == attention


def test_plateau_scheduler_state_in_checkpoint_has_seen_the_validation(tiny_corpus_dir, tmp_path):
    """The checkpoint is written after ReduceLROnPlateau has seen the validation BLEU, so a
    resumed run's learning-rate cuts come when an uninterrupted run's would."""
    cfg = make_cfg(tiny_corpus_dir, tmp_path / "c", "optim=plateau", "trainer.max_steps=20", "trainer.eval_every=10")
    train(cfg, tmp_path / "run")
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["scheduler"]["last_epoch"] == 2  # two validations observed
    assert ck["scheduler"]["best"] == pytest.approx(ck["best_bleu"])


def test_user_errors_in_trainer_settings(tiny_corpus_dir, tmp_path):
    from mt.errors import MTError

    for override, msg in (
        ("trainer.precision=fp16", "loss scaling"),
        ("trainer.device=tpu", "device"),
        ("trainer.device=cuda:3", "CUDA"),
        ("model.cell=bogus", "unknown model.cell"),
        ("optim.scheduler=linear", "unknown optim.scheduler"),
        ("decoding.beam=0", "decoding.beam"),
        ("decoding.length_penalty=long", "length_penalty"),
        ("trainer.precompile_workers=2", "precompile_workers=2 compiles Triton kernels for CUDA"),
        ("trainer.precompile_workers=-1", "precompile_workers must be null"),
    ):
        with pytest.raises(MTError, match=msg):
            train(make_cfg(tiny_corpus_dir, tmp_path / "c", override, "trainer.max_steps=1"), tmp_path / "o")


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    from mt.config import OptimConfig
    from mt.optim import make_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = make_scheduler(opt, OptimConfig(lr=1e-3, scheduler="cosine", warmup_steps=10, min_lr=1e-5), 110)
    lrs = []
    for _ in range(130):
        lrs.append(opt.param_groups[0]["lr"])  # the lr used by update number len(lrs)
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert all(a > b for a, b in zip(lrs[9:109], lrs[10:110]))  # strictly decreasing after it
    assert lrs[59] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way
    assert lrs[109] == pytest.approx(1e-5) and lrs[129] == pytest.approx(1e-5)  # floor, also past max_steps


@pytest.mark.parametrize("eval_every,validation_seconds,stop_step", [(1000, 0, 31), (5, 100, 5)])
def test_max_minutes_stops_at_a_validated_checkpoint(
    tiny_corpus_dir, tmp_path, monkeypatch, eval_every, validation_seconds, stop_step
):
    """trainer.max_minutes=0.5 on a fake clock that reads 1 s later at every look: the run stops
    once 30 s have passed, one step after the step that saw it (the flag travels with that step's
    loss, which the host reads a step late; mt/step_stats.py), then validates; or right after a
    validation that used up the time (no further step, no second validation). It writes its
    checkpoints."""
    import mt.trainer as mt_trainer

    clock = {"t": 1000.0}

    def now():
        clock["t"] += 1.0
        return clock["t"]

    real_validation_loss = mt_trainer.validation_loss

    def slow_validation_loss(*args, **kwargs):
        clock["t"] += validation_seconds
        return real_validation_loss(*args, **kwargs)

    monkeypatch.setattr(mt_trainer, "_now", now)
    monkeypatch.setattr(mt_trainer, "validation_loss", slow_validation_loss)
    cfg = make_cfg(
        tiny_corpus_dir,
        tmp_path / "c",
        "trainer.max_steps=1000",
        f"trainer.eval_every={eval_every}",
        "trainer.max_minutes=0.5",
        "trainer.log_every=1",
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == stop_step
    assert sorted(scalars(tmp_path / "run")["valid/bleu"]) == [stop_step]  # validated once, at the end
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == stop_step and (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_validation_report_runs_in_the_background_and_completes_the_checkpoint(tiny_corpus_dir, tmp_path, monkeypatch):
    """chrF and BLEU(lc) are scored on the checkpoint writer's thread, before the write: they are
    in every checkpoint's metrics, in TensorBoard at each validation (in the one events file, so
    before the writer was closed), and in train()'s summary."""
    import threading

    import mt.trainer as mt_trainer

    threads = []
    real = mt_trainer.report_validation

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(mt_trainer, "report_validation", recording)
    cfg = make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=10", "trainer.eval_every=5")
    summary = train(cfg, tmp_path / "run")
    assert threads == ["checkpoint-writer", "checkpoint-writer"]
    # the run's events file and add_hparams' own; a report written after writer.close() would
    # have made SummaryWriter open a third
    events = sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2 and any(b"hparam/best_bleu" in e.read_bytes() for e in events)
    logged = scalars(tmp_path / "run")
    assert sorted(logged["valid/chrf"]) == [5, 10] and sorted(logged["valid/bleu_lc"]) == [5, 10]
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 10
    for k in ("bleu", "chrf", "bleu_lc"):
        assert ck["metrics"][k] == pytest.approx(logged[f"valid/{k}"][10], abs=1e-4)
        assert summary["last"][k] == ck["metrics"][k]
    assert "case:lc" in ck["metrics"]["bleu_lc_signature"]


def test_a_failing_validation_report_is_a_warning(tiny_corpus_dir, tmp_path, monkeypatch, caplog):
    """The report decides nothing: its failure (here the attention figure) is a one-line warning
    per validation; training goes on, every checkpoint is written with what the report did get
    to (chrF, scored before the figure), and the training thread's BLEU is in TensorBoard."""
    import mt.validation as mt_validation

    def broken_figure(*args):
        raise RuntimeError("matplotlib has no fonts")

    monkeypatch.setattr(mt_validation, "attention_figure", broken_figure)
    cfg = make_cfg(
        tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=10", "trainer.eval_every=5", "trainer.attention_images=true"
    )
    with caplog.at_level("WARNING", logger="mt.train"):
        summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 10
    failed = [r.getMessage() for r in caplog.records if "report failed" in r.getMessage()]
    assert len(failed) == 2 and all("matplotlib has no fonts" in m and "\n" not in m for m in failed), failed
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["step"] == 10 and "chrf" in ck["metrics"]
    assert sorted(scalars(tmp_path / "run")["valid/bleu"]) == [5, 10]


@pytest.mark.parametrize("fails", [False, True])
def test_train_hands_its_shapes_to_the_precompile_and_stops_the_workers(
    tiny_corpus_dir, tmp_path, monkeypatch, caplog, fails
):
    """mt.train's precompile wiring, on CPU (the compiling itself: tests/test_precompile.py): the
    workers start before the data, get the run's shapes, and are stopped whatever happens; a
    failing dry run is a warning and training goes on."""
    import logging

    import mt.trainer as mtrain
    from mt.kernels.precompile import CompileWorkers

    started, calls = [], []

    class Workers:
        @staticmethod
        def start(n):
            started.append(CompileWorkers.start(n))
            return started[-1]

    def fake_precompile(workers, model, **kw):
        calls.append(kw)
        if fails:
            raise RuntimeError("dry run broke\nsecond line")
        workers.compile([], ("cuda", 90, 32))
        return [], workers.wait(60)

    monkeypatch.setattr(mtrain.precompile, "resolve_workers", lambda value, device, backend: 2)
    monkeypatch.setattr(mtrain, "CompileWorkers", Workers)
    monkeypatch.setattr(mtrain.precompile, "precompile", fake_precompile)
    caplog.set_level(logging.INFO, logger="mt.train")
    summary = train(
        make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=4", "trainer.eval_every=4"), tmp_path / "run"
    )
    assert summary["step"] == 4
    assert len(started) == 1 and len(started[0].procs) == 2 and len(calls) == 1
    kw = calls[0]
    assert kw["use_graphs"] is False and kw["buckets"] is None and kw["valid_batch_size"] == 128
    assert kw["train_batch_sizes"] and all(n > 0 for n in kw["train_batch_sizes"])
    assert kw["n_valid"] == sum(kw["valid_batch_sizes"]) > 0
    if fails:
        assert "precompile: skipped after" in caplog.text and "RuntimeError: dry run broke" in caplog.text
        assert "second line" not in caplog.text
    else:
        assert "precompile: 0 of 0 Triton kernel variants precompiled by 2 processes" in caplog.text
    assert all(p.returncode is not None for p in started[0].procs) and not started[0].tmp.exists()
