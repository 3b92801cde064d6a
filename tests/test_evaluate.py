"""mt.evaluate: evaluate(config, out_dir) on the toy corpus, and the `python -m mt.evaluate` CLI."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from mt.errors import MTError
from mt.evaluate import EvaluateConfig, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run


def compose_eval(overrides: list[str]) -> EvaluateConfig:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return OmegaConf.to_object(compose("evaluate", overrides=overrides))


def test_evaluate_writes_scores_and_hypotheses(tiny, tmp_path):
    cfg = compose_eval(
        [f"checkpoint={tiny['checkpoint']}", f"data.path={tiny['corpus']}", "split=test", "device=cpu", "batch_size=16"]
    )
    assert isinstance(cfg, EvaluateConfig) and cfg.beam is None and cfg.length_penalty == "checkpoint"
    assert cfg.cuda_graphs == "auto"  # off on CPU
    result = evaluate(cfg, tmp_path)
    assert (result["beam"], result["length_penalty"]) == (5, 1.0)  # the checkpoint's decoding defaults
    scores = json.loads((tmp_path / "scores.test.json").read_text())
    for key in ("bleu", "chrf", "bleu_lc", "bleu_signature", "chrf_signature", "bleu_lc_signature"):
        assert key in scores and scores[key] == result[key]
    assert "case:mixed" in scores["bleu_signature"] and "case:mixed" in scores["chrf_signature"]
    assert "case:lc" in scores["bleu_lc_signature"] and "tok:13a" in scores["bleu_signature"]
    assert scores["bleu"] > 90 and scores["chrf"] > 90  # the toy task is learnt
    n_rows = len((tiny["corpus"] / "test.jsonl").read_text().splitlines())
    hyps = (tmp_path / "hypotheses.test.en").read_text(encoding="utf-8").split("\n")
    assert hyps[-1] == "" and len(hyps) - 1 == n_rows == scores["sentences"]


def test_evaluate_greedy_on_validation_into_output_dir(tiny, tmp_path):
    out = tmp_path / "elsewhere"
    cfg = compose_eval(
        [
            f"checkpoint={tiny['checkpoint']}",
            "split=validation",
            "beam=1",
            "length_penalty=null",
            f"output_dir={out}",
            "device=cpu",
        ]
    )  # data.path: the checkpoint's own
    result = evaluate(cfg, tmp_path / "unused")
    assert (out / "hypotheses.validation.en").is_file() and (out / "scores.validation.json").is_file()
    n_valid = len((tiny["corpus"] / "validation.jsonl").read_text().splitlines())
    assert result["beam"] == 1 and result["length_penalty"] is None and result["sentences"] == n_valid
    assert not (tmp_path / "unused").exists()


def test_evaluate_a_folder_with_only_a_test_split(tiny, tmp_path):
    """Evaluation needs no training data: a folder holding test.jsonl alone is enough."""
    only = tmp_path / "only_test"
    only.mkdir()
    (only / "test.jsonl").write_bytes((tiny["corpus"] / "test.jsonl").read_bytes())
    cfg = compose_eval([f"checkpoint={tiny['checkpoint']}", f"data.path={only}", "split=test", "beam=1", "device=cpu"])
    result = evaluate(cfg, tmp_path / "out")
    assert result["sentences"] == len((only / "test.jsonl").read_text().splitlines()) and result["bleu"] > 90


def test_evaluate_user_errors(tiny, tmp_path):
    base = [f"checkpoint={tiny['checkpoint']}", f"data.path={tiny['corpus']}", "device=cpu"]
    for extra, match in (
        (["split=nosuch"], "split"),
        (["length_penalty=long"], "length_penalty"),
        (["device=tpu"], "unknown device"),
        (["data.path=/no/such/dir"], "does not exist"),
        (["cuda_graphs=true"], "cuda_graphs=true needs CUDA"),
    ):
        with pytest.raises(MTError, match=match):
            evaluate(compose_eval(base + extra), tmp_path)


def test_cli_missing_checkpoint_is_one_error_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mt.evaluate",
            f"checkpoint={tmp_path / 'none.pt'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [f"error: checkpoint not found: {tmp_path / 'none.pt'}"], r.stderr


def load_tuner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_decoding", REPO / "scripts" / "tune_decoding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tune_decoding_grid_and_choice(tiny, tmp_path, capsys):
    """scripts/tune_decoding.py: greedy once, every larger beam with every length penalty, scores
    equal to mt.evaluate's for the same setting, the best row chosen, the test command printed."""
    tuner = load_tuner()
    out = tmp_path / "tune.json"
    rc = tuner.main(
        [
            str(tiny["checkpoint"]),
            "--data",
            str(tiny["corpus"]),
            "--beams",
            "1",
            "3",
            "--lps",
            "none",
            "1.0",
            "0",
            "--device",
            "cpu",
            "--max-len-b",
            "12",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert [(r["beam"], r["length_penalty"]) for r in result["rows"]] == [(1, None), (3, None), (3, 1.0)]
    assert result["split"] == "validation" and result["sentences"] > 0
    best = result["best"]
    assert best["bleu"] == max(r["bleu"] for r in result["rows"])
    lp = "null" if best["length_penalty"] is None else best["length_penalty"]
    command = result["test_command"].split()
    assert command[:3] == ["python", "-m", "mt.evaluate"] and command[3:] == [
        f"checkpoint={tiny['checkpoint']}",
        f"data.path={tiny['corpus']}",
        "split=test",
        f"beam={best['beam']}",
        f"length_penalty={lp}",
        "max_len_b=12",
        "device=cpu",
    ]  # every setting that changes the output
    ev = evaluate(
        compose_eval(
            [
                f"checkpoint={tiny['checkpoint']}",
                f"data.path={tiny['corpus']}",
                "split=validation",
                "beam=3",
                "length_penalty=1.0",
                "device=cpu",
                "max_len_b=12",
            ]
        ),
        tmp_path / "ev",
    )
    assert ev["bleu"] == pytest.approx(result["rows"][2]["bleu"]) and ev["chrf"] == pytest.approx(
        result["rows"][2]["chrf"]
    )
    printed = capsys.readouterr().out
    assert "test once with: python -m mt.evaluate" in printed
    assert f"decoding:\n  beam: {best['beam']}\n  length_penalty: {lp}\n" in printed


def test_tune_decoding_an_ensemble(tiny, tmp_path):
    """Several checkpoints are tuned as one ensemble: its rows score as mt.evaluate scores that
    ensemble, and the printed command names the same ensemble (and its combination)."""
    tuner = load_tuner()
    out = tmp_path / "tune.json"
    ck = str(tiny["checkpoint"])
    argv = [ck, ck, "--combine", "prob", "--data", str(tiny["corpus"]), "--beams", "3", "--lps", "1.0"]
    assert tuner.main([*argv, "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"] == [ck, ck] and result["combine"] == "prob"
    command = shlex.split(result["test_command"])  # (the brackets come quoted for the shell)
    assert command[3:6] == [f"checkpoint=[{ck},{ck}]", "ensemble_combine=prob", f"data.path={tiny['corpus']}"]
    overrides = [f"checkpoint=[{ck},{ck}]", "ensemble_combine=prob", f"data.path={tiny['corpus']}"]
    overrides += ["split=validation", "beam=3", "length_penalty=1.0", "device=cpu"]
    ev = evaluate(compose_eval(overrides), tmp_path / "ev")
    assert ev["bleu"] == pytest.approx(result["rows"][0]["bleu"])


def test_tune_decoding_ties_go_to_the_smaller_beam():
    rows = [{"beam": 1, "bleu": 30.0}, {"beam": 5, "bleu": 31.0}, {"beam": 3, "bleu": 31.0}, {"beam": 3, "bleu": 31.0}]
    assert load_tuner().best_row(rows) is rows[2]


def test_tune_decoding_refuses_test_and_bad_input(tiny, tmp_path, capsys):
    tuner = load_tuner()
    for argv, match in (
        ([str(tiny["checkpoint"]), "--split", "test"], "refusing to tune on split 'test'"),
        ([str(tmp_path / "none.pt")], "checkpoint not found"),
        ([str(tiny["checkpoint"]), "--beams", "0"], "beam sizes must be >= 1"),
        ([str(tiny["checkpoint"]), "--lps", "long"], "length_penalty"),
    ):
        assert tuner.main([*argv, "--device", "cpu"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and match in err[0], err


def test_the_checkpoint_decoding_settings_are_the_default(tiny, tmp_path):
    """decoding.beam / decoding.length_penalty saved with the model: mt.evaluate and Translator use
    them unless told otherwise."""
    from mt.checkpoint import load_checkpoint, save_checkpoint
    from mt.translator import Translator

    state = load_checkpoint(tiny["checkpoint"])
    state["config"]["decoding"] = {"beam": 1, "length_penalty": None}  # a greedy recipe
    greedy_ckpt = tmp_path / "greedy.pt"
    save_checkpoint(state, greedy_ckpt)
    base = [f"data.path={tiny['corpus']}", "split=test", "device=cpu"]
    r = evaluate(compose_eval([f"checkpoint={greedy_ckpt}", *base]), tmp_path / "a")
    assert (r["beam"], r["length_penalty"]) == (1, None)
    r_explicit = evaluate(
        compose_eval([f"checkpoint={tiny['checkpoint']}", *base, "beam=1", "length_penalty=null"]), tmp_path / "b"
    )
    assert r["bleu"] == r_explicit["bleu"]
    assert (tmp_path / "a" / "hypotheses.test.en").read_text() == (tmp_path / "b" / "hypotheses.test.en").read_text()
    r_override = evaluate(
        compose_eval([f"checkpoint={greedy_ckpt}", *base, "beam=3", "length_penalty=avg"]), tmp_path / "c"
    )
    assert (r_override["beam"], r_override["length_penalty"]) == (3, "avg")

    tr = Translator.from_checkpoint(greedy_ckpt, device="cpu")
    assert tr.decoding() == (1, None) and tr.decoding(4, "0.6") == (4, 0.6)
    lines = ["a b c", "d e"]
    default = [h.text for h in tr.translate(lines)]
    assert default == [h.text for h in tr.translate(lines, beam=1, length_penalty=None)]
    with pytest.raises(MTError, match="nbest"):
        tr.translate(lines, nbest=2)  # beam 1 from the checkpoint: 2-best is impossible
