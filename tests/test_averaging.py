"""Weights combined over training (mt/averaging.py, mt/average.py): the EMA's arithmetic and its
swap, trainer.keep_last / average_last / ema_decay end to end (files, pruning, validation, the
checkpoint the run names, an exact resume), and mt-average (inputs, what it refuses, its output
loaded by the other commands)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_train import make_cfg

from mt.average import main as average_main
from mt.averaging import EMA, average_checkpoints, choose_for_average
from mt.checkpoint import load_checkpoint, save_checkpoint
from mt.errors import CheckpointError
from mt.train import train
from mt.translator import Translator


# ----------------------------------------------------------------------------- the EMA itself
def test_ema_follows_its_formula():
    """shadow_t = d_t shadow_{t-1} + (1 - d_t) w_t with d_t = min(decay, (1 + t) / (10 + t))."""
    lin = torch.nn.Linear(3, 2)
    ema = EMA(lin, decay=0.5)
    expect = [p.detach().clone().double() for p in lin.parameters()]
    g = torch.Generator().manual_seed(0)
    for t in range(1, 8):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))
        expect = [d * e + (1 - d) * p.detach().double() for e, p in zip(expect, lin.parameters())]
    assert ema.updates.item() == 7
    for s, e in zip(ema.shadow, expect):
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)


def test_ema_swap_restores_the_weights_and_state_round_trips():
    lin = torch.nn.Linear(4, 4)
    ema = EMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with ema.swapped_in():
        torch.testing.assert_close(lin.weight.detach(), ema.shadow[0])
        assert not torch.equal(lin.weight.detach(), before["weight"])
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k]), k
    other = EMA(lin, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates.item() == 1
    for a, b in zip(other.shadow, ema.shadow):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- in training
COMMON = ("trainer.eval_every=30", "trainer.progress=false", "trainer.max_tokens=512")


@pytest.fixture(scope="module")
def combined_run(tiny_corpus_dir, tmp_path_factory):
    """120 steps validated every 30, with an EMA, the last 2 checkpoints kept and the last 3 averaged."""
    root = tmp_path_factory.mktemp("combined")
    cfg = make_cfg(
        tiny_corpus_dir,
        root / "cache",
        "trainer.max_steps=120",
        "trainer.ema_decay=0.95",
        "trainer.keep_last=2",
        "trainer.average_last=3",
        *COMMON,
    )
    return root / "run", train(cfg, root / "run")


def test_training_keeps_averages_and_names_the_best_checkpoint(combined_run):
    run, summary = combined_run
    ckpts = run / "checkpoints"
    # average_last=3 keeps 3 step files although keep_last=2; older ones are pruned
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_120.pt", "step_60.pt", "step_90.pt"]
    steps = [load_checkpoint(ckpts / f"step_{k}.pt") for k in (60, 90, 120)]
    assert [s["step"] for s in steps] == [60, 90, 120]
    averaged = load_checkpoint(ckpts / "averaged.pt")
    assert averaged["averaged"]["steps"] == [60, 90, 120] and averaged["step"] == 120
    for k, v in averaged["model"].items():
        mean = sum(s["model"][k].double() for s in steps) / 3
        torch.testing.assert_close(v.double(), mean, rtol=1e-6, atol=1e-7)
    assert averaged["metrics"]["bleu"] == pytest.approx(summary["averaged_bleu"])
    ema = load_checkpoint(ckpts / "ema.pt")
    assert ema["step"] == 120 and ema["averaged"] == {"kind": "ema", "decay": 0.95, "step": 120}
    assert ema["metrics"]["bleu"] == pytest.approx(summary["ema_bleu"])
    last = load_checkpoint(ckpts / "last.pt")  # the EMA resumes from last.pt
    for k, v in ema["model"].items():
        assert torch.equal(v, last["ema"]["model"][k]), k
        assert not torch.equal(v, last["model"][k]) or v.dtype != torch.float32, k
    # the run names its checkpoint with the best validation BLEU
    candidates = {
        str(run / "checkpoints" / "best.pt"): summary["best_bleu"],
        str(ckpts / "ema.pt"): summary["ema_bleu"],
        str(ckpts / "averaged.pt"): summary["averaged_bleu"],
    }
    assert candidates[summary["chosen_path"]] == max(candidates.values())


def test_averaged_and_ema_checkpoints_translate(combined_run, tiny_corpus_dir):
    run, _ = combined_run
    for name in ("ema.pt", "averaged.pt"):
        tr = Translator.from_checkpoint(run / "checkpoints" / name, device="cpu")
        (hyp,) = tr.translate(["a b c"], beam=2)
        assert isinstance(hyp.text, str) and hyp.tokens


@pytest.mark.slow
def test_resume_continues_the_ema_exactly(tiny_corpus_dir, tmp_path):
    """60 steps straight == 30 steps, stop, resume to 60: the same EMA weights, bit for bit."""
    opts = ("trainer.ema_decay=0.9", *COMMON)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=60", *opts), straight)
    train(make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=30", *opts), split)
    train(make_cfg(tiny_corpus_dir, tmp_path / "c", "trainer.max_steps=60", "trainer.resume=true", *opts), split)
    a = load_checkpoint(straight / "checkpoints" / "ema.pt")["model"]
    b = load_checkpoint(split / "checkpoints" / "ema.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- mt-average
def test_mt_average_files_last_and_best(combined_run, tmp_path, capsys):
    run, _ = combined_run
    ckpts = run / "checkpoints"
    files = [ckpts / "step_90.pt", ckpts / "step_120.pt"]
    assert average_main([*map(str, files), "-o", str(tmp_path / "two.pt")]) == 0
    two = load_checkpoint(tmp_path / "two.pt")
    assert two["averaged"]["checkpoints"] == [str(f) for f in files] and "optimizer" not in two
    assert average_main(["--last", "2", str(run), "-o", str(tmp_path / "last2.pt")]) == 0
    last2 = load_checkpoint(tmp_path / "last2.pt")
    for k, v in two["model"].items():
        assert torch.equal(v, last2["model"][k]), k
    bleus = {k: load_checkpoint(ckpts / f"step_{k}.pt")["metrics"]["bleu"] for k in (60, 90, 120)}
    best2 = sorted(sorted(bleus, key=lambda k: (bleus[k], k))[-2:])
    assert [p.name for p in choose_for_average(ckpts, 2, by="best")] == [f"step_{k}.pt" for k in best2]
    assert average_main(["--best", "2", str(ckpts), "-o", str(tmp_path / "best2.pt")]) == 0
    assert load_checkpoint(tmp_path / "best2.pt")["averaged"]["steps"] == best2
    # one checkpoint averaged is itself
    assert average_main([str(files[0]), "-o", str(tmp_path / "one.pt")]) == 0
    one, src = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(files[0])
    assert all(torch.equal(v, src["model"][k]) for k, v in one["model"].items())


def _variant(src: Path, dst: Path, edit) -> Path:
    state = load_checkpoint(src)
    edit(state)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, dst)
    return dst


def test_mt_average_refuses_what_does_not_fit(combined_run, tmp_path, capsys):
    run, _ = combined_run
    a = run / "checkpoints" / "step_120.pt"

    def wider(s):
        s["config"]["model"]["hidden_dim"] = 64

    def other_tokenizer(s):
        s["tokenizer"] = {**s["tokenizer"], "src_model": s["tokenizer"]["src_model"] + b"x"}

    def reshaped(s):
        k = next(k for k, v in s["model"].items() if v.dim() == 2)
        s["model"][k] = torch.zeros(3, 3)

    def other_pair(s):
        s["config"]["data"]["tgt"] = "fr"

    cases = [
        (wider, "model configs differ (hidden_dim)"),
        (other_tokenizer, "tokenizers differ"),
        (reshaped, "is (3, 3), not"),
        (other_pair, "de->fr"),
    ]
    for edit, message in cases:
        b = _variant(a, tmp_path / f"{edit.__name__}.pt", edit)
        out = tmp_path / "out.pt"
        assert average_main([str(a), str(b), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: cannot average") and message in err and "\n" not in err, err
        assert not out.exists()
    assert average_main(["--last", "9", str(run), "-o", str(tmp_path / "x.pt")]) == 2
    assert "fewer than 9" in capsys.readouterr().err
    assert average_main([str(a), "-o", str(a)]) == 2
    assert "one of the checkpoints" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no checkpoints"):
        average_checkpoints([])


@pytest.mark.slow
def test_averaged_checkpoint_through_the_commands(combined_run, tiny_corpus_dir, tmp_path):
    """An averaged checkpoint goes through mt-translate, mt-evaluate and mt-export (subprocesses)."""
    run, _ = combined_run
    avg = tmp_path / "avg.pt"
    env_py = [sys.executable, "-m"]
    subprocess.run([*env_py, "mt.average", "--last", "3", str(run), "-o", str(avg)], check=True, cwd=REPO)
    out = subprocess.run(
        [*env_py, "mt.translate", "--checkpoint", str(avg), "--device", "cpu", "-q"],
        input=b"a b c\n\nb c\n",
        capture_output=True,
        check=True,
        cwd=REPO,
    )
    assert len(out.stdout.decode().splitlines()) == 3
    ev = subprocess.run(
        [
            *env_py,
            "mt.evaluate",
            f"checkpoint={avg}",
            f"data.path={tiny_corpus_dir}",
            "split=test",
            "beam=1",
            f"hydra.run.dir={tmp_path / 'ev'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ev.returncode == 0 and "BLEU" in ev.stdout + ev.stderr, ev.stderr[-2000:]
    subprocess.run([*env_py, "mt.export", str(avg), str(tmp_path / "folder")], check=True, cwd=REPO)
    assert (tmp_path / "folder" / "model.safetensors").is_file()
