"""Forced scoring (mt/scoring.py): Translator.score, mt-translate --score-targets and --rescore,
on the tiny model trained on the toy word-mapping task (conftest's `tiny_run`)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import toy_translate

from mt import scoring
from mt.errors import MTError
from mt.translate import main

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = [
    "hund sieht katze",
    "rot auto und blau haus",
    "frau liest buch nicht",
    "klein kind hat gross tisch schnell",
    "hund katze haus baum auto mann frau",
    "rot blau",
]


def ended_with_eos(h) -> bool:
    """The search scored an EOS for it (not closed at its length limit): one attention row more."""
    return h.attention.shape[0] == len(h.ids) + 1


# ----------------------------------------------------------------------------- Translator.score
def test_greedy_output_scores_what_greedy_reported(tr):
    hyps = tr.translate(LINES, beam=1, length_penalty=None, batch_size=4)
    assert all(ended_with_eos(h) for h in hyps)
    for targets in ([h.ids for h in hyps], [h.text for h in hyps]):  # the search's pieces, and its text
        scored = tr.score(LINES, targets, length_penalty=None, batch_size=4)
        for h, s in zip(hyps, scored):
            assert s.ids == h.ids and s.tokens == h.tokens and s.text == h.text
            assert s.ntokens == len(h.ids) + 1 == len(s.token_log_probs)
            assert s.log_prob == pytest.approx(h.log_prob, abs=1e-5)
            assert s.score == s.log_prob  # no length penalty
            assert sum(s.token_log_probs) == pytest.approx(s.log_prob, abs=1e-5)
            assert all(x <= 0 for x in s.token_log_probs)
            assert s.src_tokens == h.src_tokens
            torch.testing.assert_close(s.attention, h.attention, rtol=1e-5, atol=1e-5)
            assert s.alignment() == h.alignment()


def test_beam_nbest_scores_with_a_length_penalty(tr):
    """Every finished hypothesis of a beam search (not only the best): the forced log-prob and
    the normalized score equal what beam search reported, for GNMT alpha and 'avg'."""
    for lp in (1.0, "avg"):
        nb = tr.translate(LINES, beam=4, length_penalty=lp, nbest=4, batch_size=3)
        pairs = [(line, h) for line, hs in zip(LINES, nb) for h in hs if ended_with_eos(h)]
        assert len(pairs) > len(LINES) * 2
        scored = tr.score([p[0] for p in pairs], [p[1].ids for p in pairs], length_penalty=lp, batch_size=5)
        for (_, h), s in zip(pairs, scored):  # fp32 sums over other batch shapes: a few 1e-6 relative
            assert s.log_prob == pytest.approx(h.log_prob, rel=1e-5, abs=1e-5)
            assert s.score == pytest.approx(h.score, rel=1e-5, abs=1e-5)
    # the checkpoint's length penalty by default
    _, lp = tr.decoding()
    s = tr.score(LINES[:1], [toy_translate(LINES[0])])[0]
    assert s.score == pytest.approx(scoring.normalized_score(s.log_prob, s.ntokens, lp))


def test_scores_do_not_depend_on_batching_or_order(tr):
    targets = [toy_translate(x) for x in LINES]
    targets[1] = "red car and blue house big big dog"  # a wrong, longer one
    alone = [tr.score([s], [t], length_penalty=None)[0] for s, t in zip(LINES, targets)]
    batched = tr.score(LINES, targets, length_penalty=None, batch_size=32)
    rev = tr.score(LINES[::-1], targets[::-1], length_penalty=None, batch_size=2)[::-1]
    for a, b, c in zip(alone, batched, rev):
        assert a.ids == b.ids == c.ids
        for x in (b, c):
            assert x.log_prob == pytest.approx(a.log_prob, abs=1e-5)
            assert x.token_log_probs == pytest.approx(a.token_log_probs, abs=1e-5)
    assert batched[1].log_prob < batched[0].log_prob - 1  # the wrong translation scores much worse


def test_empty_lines_counts_and_bad_ids(tr):
    s_empty_tgt, s_blank_tgt, s_empty_src = tr.score(
        ["hund sieht katze", "hund sieht katze", ""], ["", "   ", "dog"], length_penalty=None
    )
    for s in (s_empty_tgt, s_blank_tgt):  # the empty sentence: only EOS is scored
        assert s.tokens == [] and s.ntokens == 1 and len(s.token_log_probs) == 1
        assert s.log_prob == s.token_log_probs[0] < 0
    assert s_blank_tgt.log_prob == s_empty_tgt.log_prob
    # an empty source: scored with a source of only EOS, as given as ids []
    assert s_empty_src.src_tokens == [] and s_empty_src.ntokens == 2
    assert tr.score([[]], ["dog"], length_penalty=None)[0].log_prob == pytest.approx(s_empty_src.log_prob, abs=1e-6)
    with pytest.raises(MTError, match="2 sources but 1 targets"):
        tr.score(["a", "b"], ["x"])
    with pytest.raises(TypeError):
        tr.score("hund", "dog")
    with pytest.raises(MTError, match="not a target piece"):
        tr.score(["hund"], [[tr.tokenizer.eos_id]])


def test_long_sources_truncated_targets_not(tr, caplog):
    long = " ".join(["hund", "katze"] * 6)
    with caplog.at_level(logging.WARNING, logger="mt.translator"):
        s = tr.score(["rot", long], ["red", "dog cat " * 20], max_src_len=4, first_line=7, length_penalty=None)
    assert len(s[1].src_tokens) == 4 and s[1].ntokens > 40
    assert any("line 8" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


class _Wrapped:
    """Only what scoring may use: `encode` and `decoder.step_logits` (as an ensemble offers them);
    here two copies of one model whose probabilities are averaged, which changes nothing."""

    def __init__(self, model):
        self.models = [model, model]
        self.decoder = self

    def encode(self, src, src_len):
        pairs = [m.encode(src, src_len) for m in self.models]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def step_logits(self, tokens, states, memories):
        outs = [m.decoder.step_logits(tokens, s, mem) for m, s, mem in zip(self.models, states, memories)]
        logp = torch.stack([torch.log_softmax(o[0].float(), -1) for o in outs])
        mean = torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(len(outs))))
        return mean, [o[1] for o in outs], outs[0][2]


def test_anything_with_encode_and_step_logits_is_scored_alike(tr):
    targets = [toy_translate(x) for x in LINES]
    ref = tr.score(LINES, targets, length_penalty=None)
    src = tr.encode(LINES)
    tgt = [s.ids for s in ref]
    got = scoring.score_ids(_Wrapped(tr.model), src, tgt, tr.tokenizer, tr.device, batch_size=4)
    for r, (lps, total, attn) in zip(ref, got):
        assert total == pytest.approx(r.log_prob, abs=1e-5) and lps == pytest.approx(r.token_log_probs, abs=1e-5)
        assert attn.shape == r.attention.shape


# ----------------------------------------------------------------------------- the CLI
def cli(ckpt, *args) -> int:
    return main(["--checkpoint", str(ckpt), "--device", "cpu", "-q", *map(str, args)])


def test_cli_score_targets(ckpt, tr, tmp_path, capsys, caplog):
    src, tgt, out = tmp_path / "in.de", tmp_path / "hyp.en", tmp_path / "out.tsv"
    srcs = [LINES[0], "", LINES[1], LINES[2]]
    tgts = [toy_translate(LINES[0]), "dog", "", "woman reads book not"]
    src.write_text("\n".join(srcs) + "\n", encoding="utf-8")
    # invalid UTF-8 in a target: the translate filter's warning (naming the file), U+FFFD
    tgt.write_bytes(("\n".join(tgts[:3]) + "\n").encode() + b"woman reads book not\xff\n")
    with caplog.at_level(logging.WARNING, logger="mt.translate"):
        assert (
            cli(ckpt, "--input", src, "--score-targets", tgt, "--output", out, "--lp", "none", "--batch-size", 2) == 0
        )
    assert any(f"{tgt} line 4: invalid UTF-8" in r.getMessage() for r in caplog.records)
    rows = [r.split("\t") for r in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert len(rows) == 4
    want = tr.score(srcs, tgts[:3] + ["woman reads book not\ufffd"], length_penalty=None)
    for row, s in zip(rows, want):
        assert len(row) == 4
        score, log_prob, ntok, lps = float(row[0]), float(row[1]), int(row[2]), row[3].split(" ")
        assert score == pytest.approx(s.score, abs=1e-4) and log_prob == pytest.approx(s.log_prob, abs=1e-4)
        assert ntok == s.ntokens == len(lps)
        assert [float(x) for x in lps] == pytest.approx(s.token_log_probs, abs=1e-4)
    assert rows[2][2] == "1"  # the empty target: only EOS
    # JSON lines, with --align, stdin as the source, chunks of 3 lines
    tgt.write_text("\n".join(tgts) + "\n", encoding="utf-8")
    with open(src, "rb") as f, pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", type("S", (), {"buffer": f, "isatty": lambda self: False})())
        assert cli(ckpt, "--score-targets", tgt, "--score-format", "json", "--align", "--chunk-size", 3) == 0
    objs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(objs) == 4
    assert objs[0]["tokens"] == want[0].tokens and objs[0]["alignment"] == "0-0 1-1 2-2"
    assert objs[0]["log_prob"] == pytest.approx(want[0].log_prob, abs=1e-6)
    assert objs[0]["score"] == pytest.approx(tr.score(srcs[:1], tgts[:1])[0].score, abs=1e-6)  # the checkpoint's lp
    assert len(objs[0]["token_log_probs"]) == objs[0]["ntokens"] == len(objs[0]["tokens"]) + 1


def test_cli_score_errors_are_one_line(ckpt, tmp_path, capsys):
    src, tgt, out = tmp_path / "in.de", tmp_path / "hyp.en", tmp_path / "out.tsv"
    src.write_text("hund\nkatze\nhaus\n", encoding="utf-8")
    tgt.write_text("dog\ncat\n", encoding="utf-8")
    cases = [
        (["--input", src, "--score-targets", tgt, "--output", out], "has 2 lines but"),
        (["--input", src, "--score-targets", tmp_path / "none.en"], "not found"),
        (["--input", src, "--score-targets", tgt, "--nbest", 2], "does not go with --nbest"),
        (["--input", src, "--score-targets", tgt, "--rescore", tgt], "use one"),
        (["--input", src, "--rescore", tgt], "not `i ||| translation ||| score`"),
    ]
    for args, msg in cases:
        assert cli(ckpt, *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and msg in err[-1], (args, err)
        assert not any("Traceback" in e for e in err)
    assert not out.exists()  # refused before anything was written
    # sources from a pipe: the mismatch shows when the targets run out (or outlast the sources)
    for text, msg in ((b"hund\nkatze\nhaus\n", "but the sources have more"), (b"hund\n", "more lines than the 1")):
        r, w = os.pipe()
        os.write(w, text)
        os.close(w)
        with open(r, "rb") as f, pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdin", type("S", (), {"buffer": f, "isatty": lambda self: False})())
            assert cli(ckpt, "--score-targets", tgt, "--output", out) == 2
        assert msg in capsys.readouterr().err


def test_cli_rescores_an_nbest_list_it_wrote(ckpt, tr, tmp_path, capsys):
    src, nbest, out = tmp_path / "in.de", tmp_path / "in.nbest", tmp_path / "out.nbest"
    srcs = [LINES[0], "", LINES[1], LINES[4]]
    src.write_text("\n".join(srcs) + "\n", encoding="utf-8")
    args = ["--input", src, "--beam", 3, "--lp", 1.0]
    assert cli(ckpt, *args, "--nbest", 3, "--output", nbest) == 0
    entries = scoring.read_nbest(str(nbest))
    assert [e.index for e in entries][:4] == [0, 0, 0, 1]
    # the same model and length penalty: the same list, the same scores (4 decimals), same order
    assert cli(ckpt, *args, "--rescore", nbest, "--output", out, "--chunk-size", 2) == 0
    got = [scoring.parse_nbest_line(x, k) for k, x in enumerate(out.read_text(encoding="utf-8").splitlines(), 1)]
    assert [(e.index, e.text) for e in got] == [(e.index, e.text) for e in entries]
    for a, b in zip(got, entries):
        if b.text:  # the empty input line's `i |||  ||| 0.0000`: rescoring scores its EOS
            assert a.score == pytest.approx(b.score, abs=2e-4)
    assert got[3].text == "" and got[3].score < 0
    # another ranking (log-prob per token): scores and order change, best first within each line
    assert cli(ckpt, *args, "--rescore", nbest, "--lp", "avg", "--align", "--output", out) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    got = [scoring.parse_nbest_line(x, k) for k, x in enumerate(lines, 1)]
    assert sorted((e.index, e.text) for e in got) == sorted((e.index, e.text) for e in entries)
    for i in range(len(srcs)):
        scores = [e.score for e in got if e.index == i]
        assert scores == sorted(scores, reverse=True)
    want = tr.score([srcs[e.index] for e in got], [e.text for e in got], length_penalty="avg")
    assert [e.score for e in got] == pytest.approx([s.score for s in want], abs=1e-4)
    assert lines[0].split(" ||| ")[3] == "0-0 1-1 2-2"
    # JSON lines keep the list's own score
    assert cli(ckpt, *args, "--rescore", nbest, "--score-format", "json") == 0
    objs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(objs) == len(entries) and {"index", "text", "nbest_score", "score", "log_prob"} <= set(objs[0])
    # the list and the sources must match
    src.write_text("\n".join(srcs[:3]) + "\n", encoding="utf-8")
    assert cli(ckpt, "--input", src, "--rescore", nbest, "--output", tmp_path / "x") == 2
    assert "entries for 4 source lines but" in capsys.readouterr().err
    bad = tmp_path / "bad.nbest"
    bad.write_text("0 ||| a ||| -1.0\n2 ||| b ||| -1.0\n", encoding="utf-8")
    assert cli(ckpt, "--input", src, "--rescore", bad) == 2
    assert "skips index 1" in capsys.readouterr().err
