"""Translator.from_checkpoint(...).translate(...) and the scripts/translate.py filter, on a tiny
model trained on the toy word-mapping task (conftest's `tiny_run`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, toy_translate

from mt.errors import CheckpointError, MTError
from mt.translator import Hypothesis, Translator

SCRIPT = REPO / "scripts" / "translate.py"
GOLDEN = ["hund sieht katze", "rot auto und blau haus", "frau liest buch nicht", "klein kind hat gross tisch schnell"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_script(*args, stdin: bytes = b"", timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def load_script_module():
    spec = importlib.util.spec_from_file_location("translate_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- Translator
def test_golden_outputs(tr):
    for beam, lp in ((5, 1.0), (1, None)):
        hyps = tr.translate(GOLDEN, beam=beam, length_penalty=lp)
        assert [h.text for h in hyps] == [toy_translate(s) for s in GOLDEN]


def test_hypothesis_fields_and_alignment(tr):
    h = tr.translate(["hund sieht katze"], beam=3)[0]
    assert isinstance(h, Hypothesis)
    assert "".join(h.tokens).replace("\u2581", " ").strip() == "dog sees cat"
    assert "".join(h.src_tokens).replace("\u2581", " ").strip() == "hund sieht katze"
    assert h.attention.shape == (len(h.tokens) + 1, len(h.src_tokens) + 1)
    assert h.score <= 0 and h.log_prob <= 0
    # word-for-word task, one piece per word: the attention follows the diagonal
    assert h.alignment() == [(i, i) for i in range(len(h.tokens))]


def test_order_restored_empty_lines_and_nbest(tr):
    lines = [
        "hund katze haus baum auto mann frau",
        "",
        "rot blau gross",
        "   ",
        "buch tisch und nicht schnell kind",
        "hat liest sieht",
    ]
    hyps = tr.translate(lines, beam=4, batch_size=2)
    for line, h in zip(lines, hyps):
        assert h.text == (toy_translate(line) if line.strip() else "")
    assert hyps[1].tokens == [] and hyps[1].score == 0.0
    nb = tr.translate(lines, beam=4, nbest=3, batch_size=2)
    assert [len(x) for x in nb] == [3, 1, 3, 1, 3, 3]
    for x in nb:
        assert [h.score for h in x] == sorted((h.score for h in x), reverse=True)
    assert [x[0].text for x in nb] == [h.text for h in hyps]


def flat(results) -> list[Hypothesis]:
    return [h for r in results for h in (r if isinstance(r, list) else [r])]


def test_translator_decodes_through_graphed_search_steps(ckpt, tr, monkeypatch):
    """cuda_graphs: auto is off on CPU, true on CPU is a one-line error before loading; with a
    GraphedDecoder (here emulating the captured steps) translate() gives the eager results and
    keeps its slots across calls."""
    from mt import graphs, translator

    assert tr.graphs is None  # auto, on CPU
    with pytest.raises(MTError, match="cuda_graphs=true needs CUDA"):
        Translator.from_checkpoint(ckpt, device="cpu", cuda_graphs="true")
    with pytest.raises(MTError, match="unknown cuda_graphs"):
        Translator.from_checkpoint(ckpt, device="cpu", cuda_graphs="sometimes")
    real = graphs.GraphedDecoder
    monkeypatch.setattr(translator, "resolve_cuda_graphs", lambda *a, **k: True)
    monkeypatch.setattr(graphs, "GraphedDecoder", lambda model: real(model, emulate=True))
    gtr = Translator.from_checkpoint(ckpt, device="cpu")
    lines = GOLDEN + ["", "hund katze haus baum auto mann frau"]
    for beam, lp, nbest in ((1, None, 1), (4, 1.0, 3)):
        ref = tr.translate(lines, beam=beam, length_penalty=lp, nbest=nbest, batch_size=3)
        out = gtr.translate(lines, beam=beam, length_penalty=lp, nbest=nbest, batch_size=3)
        assert [h.text for h in flat(out)] == [h.text for h in flat(ref)]
        for a, b in zip(flat(out), flat(ref)):
            # The slots pad a batch to their own size, so the GEMMs run at other shapes and
            # the CPU BLAS may block them differently: scores drift by ~1e-5 over a long
            # sentence (seen on AMD EPYC); the tokens stay exact.
            assert a.score == pytest.approx(b.score, abs=1e-4)
            torch.testing.assert_close(a.attention, b.attention, rtol=1e-5, atol=1e-5)
    slots = len(gtr.graphs._slots)
    assert gtr.graphs.stats["emulated"] > 10 and slots >= 2
    gtr.translate(lines, beam=4, length_penalty=1.0, nbest=3, batch_size=3)
    assert len(gtr.graphs._slots) == slots  # the same shapes again: no new slot


def test_long_lines_truncated_with_a_warning(tr, caplog):
    long = " ".join(["hund", "katze"] * 6)
    with caplog.at_level(logging.WARNING, logger="mt.translator"):
        hyps = tr.translate(["rot blau", long], beam=2, max_src_len=4, first_line=10)
    assert len(hyps[1].src_tokens) == 4
    assert any("line 11" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_load_errors_are_one_line(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Translator.from_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError) as e:
        Translator.from_checkpoint(bad)
    assert "\n" not in str(e.value)
    state = torch.load(ckpt, weights_only=True)
    state["model"]["decoder.generator.bias"] = torch.zeros(3)  # incompatible weights
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError) as e:
        Translator.from_checkpoint(tmp_path / "mismatch.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(MTError, match="unknown device"):
        Translator.from_checkpoint(ckpt, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MTError, match="CUDA is not available"):
            Translator.from_checkpoint(ckpt, device="cuda")


# ----------------------------------------------------------------------------- the script
FILTER_IN = [
    b"hund katze haus baum auto",
    b"",
    b"rot blau gross",
    b"klein \xff\xfe hund",
    b"",
    b"buch tisch und nicht schnell kind mann",
    b"hat",
    b"frau liest",
]


def _interactive(ckpt) -> tuple[int, bytes, bytes]:
    """Run the script on a pseudo-terminal: type two lines, then Ctrl-D."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--checkpoint", str(ckpt), "--beam", "2", "-q"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    os.close(slave)
    try:
        os.write(master, b"hund sieht katze\n")
        os.write(master, b"rot blau\n")
        os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
        out, err = p.communicate(timeout=120)
    finally:
        os.close(master)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def script_runs(ckpt, tmp_path_factory):
    """Start every subprocess run of the script at once (interpreter start-up dominates)."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("script")
    bad = tmp / "corrupt.pt"
    bad.write_bytes(b"garbage" * 100)
    pool = ThreadPoolExecutor(max_workers=4)
    runs = {
        # stdin -> stdout, no final newline; chunks of 3 lines, batches of 2 sentences
        "filter": pool.submit(
            run_script,
            "--checkpoint",
            ckpt,
            "--batch-size",
            2,
            "--chunk-size",
            3,
            "--beam",
            3,
            "--plot-attention",
            tmp / "attn.png",
            stdin=b"\n".join(FILTER_IN),
        ),
        "nbest": pool.submit(
            run_script,
            "--checkpoint",
            ckpt,
            "--nbest",
            3,
            "--beam",
            3,
            "--align",
            "-q",
            stdin=b"hund sieht katze\n\nrot blau\n",
        ),
        "corrupt": pool.submit(run_script, "--checkpoint", bad, stdin=b"hund\n"),
    }
    if sys.platform != "win32":
        runs["interactive"] = pool.submit(_interactive, ckpt)
    yield {"runs": runs, "png": tmp / "attn.png"}
    pool.shutdown(wait=True)


def test_script_filter_preserves_lines_order_and_warns_on_bad_utf8(script_runs, tr):
    r = script_runs["runs"]["filter"].result()
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode("utf-8").split("\n")
    assert out[-1] == "" and len(out) - 1 == len(FILTER_IN)
    texts = [ln.decode("utf-8", errors="replace") for ln in FILTER_IN]
    assert out[:-1] == [h.text for h in tr.translate(texts, beam=3)]
    assert out[1] == "" and out[4] == ""
    assert out[0] == "dog cat house tree car" and out[2] == "red blue big"
    err = r.stderr.decode()
    assert re.search(r"line 4: invalid UTF-8", err), err
    assert script_runs["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --plot-attention


def test_script_nbest_format(script_runs):
    r = script_runs["runs"]["nbest"].result()
    assert r.returncode == 0, r.stderr.decode()
    rows = [ln.split(" ||| ") for ln in r.stdout.decode().splitlines()]
    assert [int(x[0]) for x in rows] == [0, 0, 0, 1, 2, 2, 2]
    assert rows[0][1] == "dog sees cat" and rows[0][3] == "0-0 1-1 2-2"  # --align: src-tgt pairs
    assert rows[3] == ["1", "", "0.0000"]
    for i in (0, 4):
        scores = [float(x[2]) for x in rows[i : i + 3]]
        assert scores == sorted(scores, reverse=True) and len({x[1] for x in rows[i : i + 3]}) == 3


def test_script_scores_and_align_columns(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in.de", tmp_path / "out.en"
    src.write_text("hund sieht katze\n\nrot blau\n", encoding="utf-8")
    script = load_script_module()  # in-process: same code path, no interpreter start-up
    assert (
        script.main(
            [
                "--checkpoint",
                str(ckpt),
                "--input",
                str(src),
                "--output",
                str(out),
                "--print-scores",
                "--align",
                "--beam",
                "1",
                "--length-penalty",
                "none",
                "-q",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[1] == "" and lines[3] == "" and len(lines) == 4
    score, text, align = lines[0].split("\t")
    assert float(score) < 0 and text == "dog sees cat" and align == "0-0 1-1 2-2"
    assert lines[2].split("\t")[1:] == ["red blue", "0-0 1-1"]


def test_script_errors_are_one_line(script_runs, ckpt, tmp_path, capsys):
    r = script_runs["runs"]["corrupt"].result()
    assert r.returncode == 2 and r.stdout == b""
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    script = load_script_module()  # the other error paths in-process
    for args in (
        ["--checkpoint", str(tmp_path / "none.pt")],
        ["--checkpoint", str(ckpt), "--device", "tpu"],
        ["--checkpoint", str(ckpt), "--nbest", "6", "--beam", "5"],
        ["--checkpoint", str(ckpt), "--length-penalty", "long"],
        ["--checkpoint", str(ckpt), "--device", "cpu", "--cuda-graphs", "true"],
        ["--checkpoint", str(ckpt), "--input", str(tmp_path / "none.txt")],
        ["--checkpoint", str(ckpt), "--plot-attention", str(tmp_path / "no" / "dir" / "a.png")],
        ["--checkpoint", str(ckpt), "--plot-attention", str(tmp_path / "a.nosuchformat")],
    ):
        assert script.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error:") and not any("Traceback" in e for e in err), (args, err)


def test_script_interactive_on_a_terminal(script_runs):
    if "interactive" not in script_runs["runs"]:
        pytest.skip("no pseudo-terminals here")
    code, out, err = script_runs["runs"]["interactive"].result()
    assert code == 0, err.decode()
    assert out.decode().splitlines() == ["dog sees cat", "red blue"]
    assert b"> " in err


def test_bench_decode_smoke(ckpt, tmp_path, tiny_run, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = tiny_run["corpus"] / "test.jsonl"
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--limit",
                "8",
                "--batch-size",
                "4",
                "--beam",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert [r["setting"] for r in results] == ["greedy", "beam 3"]
    for r in results:
        assert r["sentences"] == 8 and r["sentences_per_s"] > 0 and r["tokens_per_s"] > 0 and r["batch_size"] == 4
    printed = capsys.readouterr()
    assert "sent/s" in printed.out and "batch size: 4" in printed.err


def test_script_reads_a_pipe_as_input(ckpt, tmp_path, capsys, monkeypatch):
    """--input accepts a FIFO (e.g. <(zcat ...)); it is read once, never pre-counted."""
    import os
    import threading

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("hund sieht katze\n\nrot auto\n", encoding="utf-8"))
    writer.start()
    script = load_script_module()
    out = tmp_path / "out.txt"
    assert (
        script.main(
            ["--checkpoint", str(ckpt), "--input", str(fifo), "--output", str(out), "--beam", "2", "--device", "cpu"]
        )
        == 0
    )
    writer.join()
    assert out.read_text(encoding="utf-8").splitlines() == ["dog sees cat", "", "red car"]
