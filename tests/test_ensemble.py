"""mt.ensemble: several models decoding as one.

On tiny random models: an ensemble of one decodes exactly as its model; a step's combined
log-probabilities are the members' averaged by hand (log-probabilities, or probabilities); greedy
search equals a hand-rolled greedy loop over the members; beam search's scores are the
teacher-forced ensemble log-probabilities of its hypotheses; the static-shape (emulated CUDA
graph) search equals the eager one. On two tiny trained checkpoints of different shapes (the
second trained here, on conftest's toy corpus with the first one's tokenizer): Translator.load
of a list, mt-translate -c a -c b, mt-evaluate checkpoint=[a,b], mt-serve with two --model, and
the one-line errors for models that cannot form an ensemble.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_STEPS, toy_translate, train_toy

from mt import kernels
from mt.config import ModelConfig
from mt.ensemble import Ensemble, combine_logits, tokenizer_mismatch
from mt.errors import MTError
from mt.graphs import GraphedDecoder
from mt.model import Seq2Seq
from mt.search import beam_search, greedy_search, search

PAD, UNK, BOS, EOS = 0, 1, 2, 3
V = 40
GOLDEN = ["hund sieht katze", "rot auto und blau haus", "frau liest buch nicht", "klein kind hat gross tisch schnell"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, dtype=torch.float64, **kw) -> Seq2Seq:
    base = dict(cell="torch", emb_dim=16, hidden_dim=16, enc_layers=2, dec_layers=2, dropout=0.0, emb_dropout=0.0)
    base.update(kw)
    torch.manual_seed(seed)
    model = Seq2Seq(ModelConfig(**base), V, V, PAD).to(dtype).eval()
    with torch.no_grad():  # sharper distributions than the initialisation's: searches that differ show it
        model.decoder.generator.bias.normal_(0, 2.0)
    return model


def other_model(seed=1, **kw) -> Seq2Seq:
    """A second architecture: wider, one decoder layer, another attention, no tied output."""
    shape = dict(
        emb_dim=8, hidden_dim=24, enc_layers=1, dec_layers=1, attention="bahdanau", tie_output=False, bridge="zero"
    )
    return tiny_model(seed, **{**shape, **kw})


def batch(n=5, max_src=9, seed=4):
    from mt.batching import collate

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ls = max_src - 1 if i == 0 else int(torch.randint(1, max_src, (1,), generator=g))
        rows.append({"src_ids": torch.randint(4, V, (ls,), generator=g).tolist(), "tgt_ids": [], "idx": i})
    b = collate(rows, PAD, BOS, EOS)
    return b.src, b.src_len


def decode_all(model, src, src_len, graphs=None):
    return [
        greedy_search(model, src, src_len, BOS, EOS, max_len_b=6, graphs=graphs),
        beam_search(model, src, src_len, BOS, EOS, beam=3, nbest=3, max_len_b=6, graphs=graphs),
        search(model, src, src_len, BOS, EOS, beam=2, length_penalty="avg", max_len_b=4, graphs=graphs),
    ]


def assert_same(outs, refs, exact: bool):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-9, atol=1e-9)
    for out, ref in zip(outs, refs, strict=True):
        assert out.tokens == ref.tokens
        torch.testing.assert_close(torch.tensor(out.scores), torch.tensor(ref.scores), **tol)
        for a, b in zip(out.attention, ref.attention, strict=True):
            torch.testing.assert_close(a, b, **tol)
        for hyps_o, hyps_r in zip(out.nbest, ref.nbest, strict=True):
            assert [h.tokens for h in hyps_o] == [h.tokens for h in hyps_r]
            for h, r in zip(hyps_o, hyps_r):
                torch.testing.assert_close(
                    torch.tensor([h.score, h.log_prob]), torch.tensor([r.score, r.log_prob]), **tol
                )
                torch.testing.assert_close(h.attention, r.attention, **tol)


# ----------------------------------------------------------------------------- one model
@pytest.mark.parametrize("graphs", [False, True])
def test_an_ensemble_of_one_decodes_exactly_as_its_model(graphs):
    model = tiny_model()
    src, src_len = batch()
    make = (lambda m: GraphedDecoder(m, emulate=True)) if graphs else (lambda m: None)
    refs = decode_all(model, src, src_len, make(model))
    for combine in ("logprob", "prob"):
        ens = Ensemble([model], combine)
        assert_same(decode_all(ens, src, src_len, make(ens)), refs, exact=True)


# ----------------------------------------------------------------------------- the combination
@pytest.mark.parametrize("combine", ["logprob", "prob"])
def test_a_step_averages_the_members_by_hand(combine):
    a, b, c = tiny_model(), other_model(), tiny_model(seed=2, attention="dot", hidden_dim=8, emb_dim=8)
    ens = Ensemble([a, b, c], combine)
    src, src_len = batch(3)
    memory, state = ens.encode(src, src_len)
    tokens = torch.tensor([BOS, 5, 7])
    logits, new_state, attn = ens.decoder.step_logits(tokens, state, memory)
    logp, _, _ = ens.decoder.step(tokens, state, memory)
    members = []
    for m in (a, b, c):
        mem, dec = m.encode(src, src_len)
        logits_m, _, att = m.decoder.step_logits(tokens, dec, mem)
        members.append(torch.log_softmax(logits_m, -1))  # float64, as the models
        if m is a:
            torch.testing.assert_close(attn, att, rtol=0, atol=0)  # the first model's attention
    p = torch.stack(members).exp()
    if combine == "logprob":  # the normalized geometric mean
        want = torch.stack(members).mean(0)
        torch.testing.assert_close(logits, want)
        want = want - torch.logsumexp(want, -1, keepdim=True)
        assert (torch.logsumexp(torch.stack(members).mean(0), -1) < 0).all()  # sum_v prod p_i^(1/n) < 1
    else:  # the mean of the probabilities
        want = p.mean(0).log()
        torch.testing.assert_close(logits, want)
    torch.testing.assert_close(logp, want.float())  # the search's log-softmax, in float32 as for one model
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3))
    assert [len(d.h) for d in new_state.parts] == [2, 1, 2]
    assert [d.feed.shape[1] for d in new_state.parts] == [16, 24, 8]


def test_combine_logits_of_one_member_is_the_identity():
    x = torch.randn(4, 9)
    assert combine_logits([x], "logprob") is x and combine_logits([x], "prob") is x
    with pytest.raises(MTError, match="unknown ensemble combine='max'"):
        Ensemble([tiny_model()], "max")


@torch.no_grad()
def hand_greedy(models, combine, src, src_len, limit):
    """Greedy search, one sentence at a time, every member stepped by hand."""
    out = []
    for i in range(src.shape[0]):
        s, n = src[i : i + 1, : int(src_len[i])], src_len[i : i + 1]
        states = [m.encode(s, n) for m in models]
        tok, toks, score = torch.tensor([BOS]), [], 0.0
        for _ in range(int(limit[i])):
            steps = [m.decoder.step(tok, dec, mem) for m, (mem, dec) in zip(models, states)]
            lps = torch.stack([lp[0] for lp, _, _ in steps])  # (n, V)
            if combine == "prob":
                lp = torch.log(lps.exp().mean(0))
            else:
                lp = torch.log_softmax(lps.mean(0), -1)
            lp[[BOS, PAD]] = -math.inf
            best = int(lp.argmax())
            score += float(lp[best])
            states = [(mem, dec) for (mem, _), (_, dec, _) in zip(states, steps)]
            if best == EOS:
                break
            toks.append(best)
            tok = torch.tensor([best])
        out.append((toks, score))
    return out


@pytest.mark.parametrize("combine", ["logprob", "prob"])
def test_greedy_search_equals_a_hand_rolled_greedy_over_the_members(combine):
    models = [tiny_model(), other_model()]
    ens = Ensemble(models, combine)
    src, src_len = batch(6, seed=7)
    kw = dict(max_len_a=1.0, max_len_b=3)
    out = greedy_search(ens, src, src_len, BOS, EOS, **kw)
    want = hand_greedy(models, combine, src, src_len, (src_len.double() + 3).long())
    assert out.tokens == [t for t, _ in want]
    assert out.scores == pytest.approx([s for _, s in want], rel=1e-6)  # the search sums float32 log-probs
    singles = [greedy_search(m, src, src_len, BOS, EOS, **kw).tokens for m in models]
    assert out.tokens != singles[0] or out.tokens != singles[1]  # the ensemble is not just one member


def forced_log_prob(ens, src, src_len, i, tokens, eos: bool) -> float:
    """The ensemble's teacher-forced log-probability of `tokens` (+ EOS) for sentence i."""
    s, n = src[i : i + 1, : int(src_len[i])], src_len[i : i + 1]
    tgt_in = torch.tensor([[BOS, *tokens]])
    tgt_out = torch.tensor([[*tokens, EOS]])
    with torch.no_grad():
        values, _ = ens(s, n, tgt_in)
    logp = torch.log_softmax(values.double(), -1).gather(-1, tgt_out.unsqueeze(-1)).squeeze(-1)[0]
    return float(logp.sum() if eos else logp[:-1].sum())


@pytest.mark.parametrize("combine", ["logprob", "prob"])
def test_beam_scores_are_the_teacher_forced_ensemble_log_probabilities(combine):
    ens = Ensemble([tiny_model(), other_model(), tiny_model(seed=5, attention="concat")], combine)
    src, src_len = batch(4, seed=9)
    out = beam_search(ens, src, src_len, BOS, EOS, beam=4, nbest=4, length_penalty=1.0, max_len_b=5)
    limits = (1.5 * src_len.double() + 5).long().tolist()
    for i, hyps in enumerate(out.nbest):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            eos = len(h.tokens) < limits[i]  # closed by EOS, not by the length limit
            assert h.log_prob == pytest.approx(forced_log_prob(ens, src, src_len, i, h.tokens, eos), rel=1e-6)
    # beam 1 without a length penalty is greedy search, for an ensemble too
    b1 = beam_search(ens, src, src_len, BOS, EOS, beam=1, length_penalty=None, max_len_b=5)
    g = greedy_search(ens, src, src_len, BOS, EOS, max_len_b=5)
    assert b1.tokens == g.tokens and b1.scores == pytest.approx(g.scores, abs=1e-9)


# ----------------------------------------------------------------------------- CUDA graphs (emulated)
@pytest.mark.parametrize("combine", ["logprob", "prob"])
def test_emulated_graphed_ensemble_search_matches_eager(combine):
    """The static-shape search over an ensemble (every member's memory, state, step weights and
    casts in the slot's buffers) gives the eager results; members of different shapes and cells."""
    ens = Ensemble([tiny_model(), other_model(cell="cudnn"), tiny_model(seed=3, attention="dot")], combine)
    src, src_len = batch(5, seed=11)
    refs = decode_all(ens, src, src_len)
    graphs = GraphedDecoder(ens, emulate=True, sync_every=3)
    assert_same(decode_all(ens, src, src_len, graphs), refs, exact=False)
    assert graphs.stats["emulated"] > 10 and "eager" not in graphs.stats
    slot = next(iter(graphs._slots.values()))
    assert [p.weights is None for p in slot.memory.parts] == [False, True, False]  # cuDNN steps without
    small_src, small_len = batch(3, seed=12)  # the same slots again, a smaller batch
    assert_same(decode_all(ens, small_src, small_len, graphs), decode_all(ens, small_src, small_len), exact=False)


def test_emulated_graphed_ensemble_under_autocast_casts_every_member():
    ens = Ensemble([tiny_model(dtype=torch.float32), other_model(dtype=torch.float32)])
    src, src_len = batch(4, seed=13)
    graphs = GraphedDecoder(ens, emulate=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = decode_all(ens, src, src_len, graphs)
    for slot in graphs._slots.values():
        assert [p.casts["gen_w"].shape for p in slot.memory.parts] == [(V, 16), (V, 24)]
    assert all(o.tokens for o in outs)


# ----------------------------------------------------------------------------- trained checkpoints
@pytest.fixture(scope="module")
def other_ckpt(tiny_run, tmp_path_factory):
    """A second toy model of another shape (wider, two decoder layers, dot attention, cuDNN
    cell), trained briefly with the tokenizer of `tiny_run` (its SentencePiece cache)."""
    root = tmp_path_factory.mktemp("other_run")
    summary = train_toy(
        tiny_run["corpus"],
        tiny_run["run"].parent / "cache",
        root / "run",
        "trainer.max_steps=200",
        "trainer.eval_every=200",
        "model.cell=cudnn",
        "model.hidden_dim=48",
        "model.emb_dim=24",
        "model.tie_output=false",
        "model.dec_layers=2",
        "model.attention=dot",
        "decoding.beam=3",
    )
    return summary["best_path"]


@pytest.fixture(scope="module")
def pair(ckpt, other_ckpt):
    from mt.translator import Translator

    return Translator.load([ckpt, other_ckpt], device="cpu")


def test_translator_loads_a_list_as_an_ensemble(pair, ckpt, other_ckpt):
    from mt.translator import Translator

    assert pair.is_ensemble and isinstance(pair.model, Ensemble) and len(pair.model.members) == 2
    assert [m.cfg.hidden_dim for m in pair.model.members] == [32, 48]
    assert [m["model"] for m in pair.members] == [str(ckpt), str(other_ckpt)]
    assert pair.decoding() == (5, 1.0)  # the first model's decoding defaults, not the second's beam 3
    texts = [h.text for h in pair.translate(GOLDEN)]
    assert texts == [toy_translate(s) for s in GOLDEN]
    single = Translator.load([ckpt], device="cpu")  # a list of one is that model
    assert not single.is_ensemble and single.members is None
    for hyps in pair.translate(GOLDEN[:2], beam=4, nbest=3):
        assert len(hyps) == 3 and hyps[0].score >= hyps[1].score >= hyps[2].score
        h = hyps[0]
        assert h.attention.shape == (len(h.tokens) + 1, len(h.src_tokens) + 1)
    one = Translator.ensemble([Translator.load(ckpt, device="cpu")], combine="prob")
    assert [h.text for h in one.translate(GOLDEN)] == [h.text for h in single.translate(GOLDEN)]
    prob = Translator.load([ckpt, other_ckpt], device="cpu", combine="prob")
    assert prob.model.combine == "prob" and [h.text for h in prob.translate(GOLDEN)] == texts


def test_attention_is_the_first_models(pair, ckpt):
    from mt.search import decode_dataset
    from mt.translator import Translator

    alone = Translator.load(ckpt, device="cpu")
    ids = pair.tokenizer.encode_src(GOLDEN[:2])
    both = decode_dataset(pair.model, ids, pair.tokenizer, pair.device, beam=1)
    # the first model teacher-forced on the ensemble's output gives the attention shown
    for i, toks in enumerate(both.tokens):
        src = torch.tensor([ids[i] + [pair.tokenizer.eos_id]])
        _, attn = alone.model(src, torch.tensor([src.shape[1]]), torch.tensor([[pair.tokenizer.bos_id, *toks]]))
        torch.testing.assert_close(both.attention[i], attn[0], rtol=1e-5, atol=1e-6)


def retokenized(ckpt, tmp_path, name, change):
    """A copy of checkpoint `ckpt` with change(state) applied."""
    state = torch.load(ckpt, weights_only=True)
    change(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_models_that_cannot_form_an_ensemble_are_one_line_errors(ckpt, tiny_run, tmp_path):
    from mt.tokenizer import Tokenizer
    from mt.translator import Translator

    def other_vocab(state):  # a BPE model of the same size on the same text: other pieces
        from mt.config import TokenizerConfig
        from mt.tokenizer import train_tokenizer

        size = Tokenizer.from_state_dict(state["tokenizer"]).src_vocab_size
        rows = [json.loads(line) for line in (tiny_run["corpus"] / "train.jsonl").read_text().splitlines()]
        cfg = TokenizerConfig(vocab_size=size, model_type="bpe", input_sentence_size=0)
        tok = train_tokenizer(cfg, [r["de"] for r in rows], [r["en"] for r in rows], tmp_path, log=lambda *_: None)
        assert tok.src_vocab_size == size
        state["tokenizer"] = tok.state_dict()

    def other_pair(state):
        state["config"]["data"]["src"], state["config"]["data"]["tgt"] = "fr", "en"

    bad_vocab = retokenized(ckpt, tmp_path, "vocab.pt", other_vocab)
    bad_pair = retokenized(ckpt, tmp_path, "pair.pt", other_pair)
    a = Tokenizer.from_state_dict(torch.load(ckpt, weights_only=True)["tokenizer"])
    b = Tokenizer.from_state_dict(torch.load(bad_vocab, weights_only=True)["tokenizer"])
    assert tokenizer_mismatch(a, a) is None and tokenizer_mismatch(a, b).startswith("source piece")
    with pytest.raises(MTError, match=r"^cannot ensemble .* with .*vocab.pt: their tokenizers differ \(source piece"):
        Translator.load([ckpt, bad_vocab], device="cpu")
    with pytest.raises(MTError, match=r"\(de->en\) with .*pair.pt \(fr->en\): the language pairs differ$"):
        Translator.load([ckpt, bad_pair], device="cpu")
    with pytest.raises(MTError, match="unknown ensemble combine"):
        Translator.load([ckpt, ckpt], device="cpu", combine="geometric")
    with pytest.raises(MTError, match="no checkpoint given"):
        Translator.load([], device="cpu")


def test_mt_translate_takes_several_checkpoints(ckpt, other_ckpt, tmp_path):
    from mt.translate import main

    src = tmp_path / "in.de"
    src.write_text("\n".join(GOLDEN) + "\n", encoding="utf-8")
    out = tmp_path / "out.en"
    argv = ["-c", str(ckpt), "-c", str(other_ckpt), "-i", str(src), "-o", str(out), "--device", "cpu", "-q"]
    assert main([*argv, "--print-scores", "--beam", "3"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[1] for line in lines] == [toy_translate(s) for s in GOLDEN]
    assert all(float(line.split("\t")[0]) <= 0 for line in lines)
    assert main([*argv, "--ensemble-combine", "prob", "--nbest", "2"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2 * len(GOLDEN)


def test_mt_translate_refuses_an_ensemble_with_another_language_pair(ckpt, tmp_path):
    def other_pair(state):
        state["config"]["data"]["src"] = "cs"

    bad = retokenized(ckpt, tmp_path, "cs.pt", other_pair)
    r = subprocess.run(
        [sys.executable, "-m", "mt.translate", "-c", str(ckpt), "-c", str(bad), "--device", "cpu"],
        input=b"hund\n",
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        f"error: cannot ensemble {ckpt} (de->en) with {bad} (cs->en): the language pairs differ"
    ]


def test_mt_evaluate_takes_a_list_of_checkpoints(ckpt, other_ckpt, tiny_run, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mt.evaluate import evaluate

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = OmegaConf.to_object(
            compose(
                "evaluate",
                overrides=[
                    f"checkpoint=[{ckpt},{other_ckpt}]",
                    "ensemble_combine=prob",
                    f"data.path={tiny_run['corpus']}",
                    "device=cpu",
                    "beam=2",
                ],
            )
        )
    result = evaluate(cfg, tmp_path)
    assert result["checkpoint"] == [str(ckpt), str(other_ckpt)] and result["ensemble_combine"] == "prob"
    assert result["bleu"] > 90
    scores = json.loads((tmp_path / "scores.test.json").read_text())
    assert scores["checkpoint"] == [str(ckpt), str(other_ckpt)]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        one = OmegaConf.to_object(compose("evaluate", overrides=[f"checkpoint={ckpt}", "device=cpu", "beam=1"]))
    assert one.checkpoint == str(ckpt)  # a single string still works


def test_mt_serve_with_two_models(ckpt, other_ckpt):
    from fastapi.testclient import TestClient

    from mt.serve import create_app, load_model, parse_args

    args = parse_args(["--model", str(ckpt), "--model", str(other_ckpt), "--ensemble-combine", "prob"])
    assert args.model == [str(ckpt), str(other_ckpt)] and args.ensemble_combine == "prob"
    tr, meta = load_model(args.model, device="cpu", combine=args.ensemble_combine)
    with TestClient(create_app(tr, model_name=" + ".join(args.model), metadata=meta, static_dir=None)) as client:
        info = client.get("/info").json()
        assert info["ensemble"]["combine"] == "prob"
        assert [m["model"] for m in info["ensemble"]["models"]] == [str(ckpt), str(other_ckpt)]
        assert [m["cell"] for m in info["ensemble"]["models"]] == ["torch", "cudnn"]
        assert info["parameters"] == sum(m["parameters"] for m in info["ensemble"]["models"])
        assert (
            info["ensemble"]["models"][0]["step"] == TINY_STEPS
            and "bleu" in info["ensemble"]["models"][1]["validation"]
        )
        r = client.post("/translate", json={"text": GOLDEN, "beam": 2, "nbest": 2, "align": True})
        assert r.status_code == 200
        assert [t["text"] for t in r.json()["translations"]] == [toy_translate(s) for s in GOLDEN]
    single, _ = load_model(str(ckpt), device="cpu")
    with TestClient(create_app(single, static_dir=None)) as client:
        assert client.get("/info").json()["ensemble"] is None


def test_bench_decode_times_ensembles_against_one_model(ckpt, tiny_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["-c", str(ckpt), "--data", str(tiny_run["corpus"] / "test.jsonl"), "--limit", "6", "--batch-size", "3"]
    assert bench.main([*argv, "--beam", "2", "--ensemble", "2", "3", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["setting"], r["ensemble"]) for r in results] == [
        ("greedy", 2),
        ("greedy", 3),
        ("beam 2", 2),
        ("beam 2", 3),
    ]
    assert all(r["sentences"] == 6 and r["vs_one_model"] > 0 for r in results)
    printed = capsys.readouterr().out
    assert "greedy x3" in printed and "x one model's speed" in printed


@pytest.mark.skipif(not kernels.triton_available(), reason="needs Triton")
def test_triton_members_take_the_fused_search_kernels_on_the_combined_log_probs(monkeypatch):
    """Every member on the Triton cell (here the interpreter): the ensemble's backend is "triton",
    so the fused log-softmax/top-k, the bookkeeping kernels and the per-member state gather run
    on the combined values, under the static-shape search; the results are those of the same
    models on the PyTorch cell."""
    import copy

    from mt.kernels import search_beam

    models = [tiny_model(dtype=torch.float32), other_model(dtype=torch.float32)]
    twins = [copy.deepcopy(m) for m in models]
    for m in twins:
        m.cfg.cell = "triton"
    ens = Ensemble(twins)
    assert ens.backend(torch.device("cpu")) == "triton"
    gathered = []
    real = search_beam.gather_rows
    monkeypatch.setattr(
        search_beam, "gather_rows", lambda rows, srcs, dsts: (gathered.append(len(srcs)), real(rows, srcs, dsts))
    )
    src, src_len = batch(2, max_src=5, seed=2)
    graphs = GraphedDecoder(ens, emulate=True)
    for beam in (1, 3):
        kw = dict(beam=beam, length_penalty=1.0 if beam > 1 else None, max_len_b=2)
        out = search(ens, src, src_len, BOS, EOS, graphs=graphs, **kw)
        ref = search(Ensemble(models), src, src_len, BOS, EOS, **kw)
        assert out.tokens == ref.tokens
        assert out.scores == pytest.approx(ref.scores, rel=1e-5)
    assert set(gathered) == {2 * 2 + 1, 2 * 1 + 1}  # each member's h, c and feed: one launch per member


def test_an_ensemble_scores_what_its_search_reported(pair, ckpt, other_ckpt, tmp_path):
    """Forced scoring (mt/scoring.py) through an ensemble: its greedy outputs and every beam
    n-best entry score what the ensemble's search reported; the CLI takes -c twice with
    --score-targets."""
    hyps = pair.translate(GOLDEN, beam=1, length_penalty=None)
    scored = pair.score(GOLDEN, [h.ids for h in hyps], length_penalty=None)
    for h, s in zip(hyps, scored, strict=True):
        assert s.ids == h.ids and s.log_prob == pytest.approx(h.log_prob, abs=1e-5)
    nbest = pair.translate(GOLDEN[:3], beam=4, nbest=4, length_penalty=1.0)
    entries = [(line, h) for line, hs in zip(GOLDEN[:3], nbest) for h in hs if h.ids and len(h.attention) > len(h.ids)]
    assert entries
    forced = pair.score([e[0] for e in entries], [e[1].ids for e in entries], length_penalty=1.0)
    for (_, h), s in zip(entries, forced, strict=True):
        assert s.score == pytest.approx(h.score, abs=1e-5)
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("\n".join(GOLDEN[:3]) + "\n", encoding="utf-8")
    tgt.write_text("\n".join(h.text for h in hyps[:3]) + "\n", encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "mt.translate", "-c", str(ckpt), "-c", str(other_ckpt), "--device", "cpu", "-q"]
        + ["--input", str(src), "--score-targets", str(tgt), "--length-penalty", "none"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert len(rows) == 3
    for row, s in zip(rows, scored[:3], strict=True):
        assert float(row[1]) == pytest.approx(s.log_prob, abs=1e-3) and int(row[2]) == s.ntokens
