"""Greedy and beam search: beam 1 == greedy, n-best lists, length penalties, length limits,
batching, and decoding with a tiny model trained on the toy word-mapping task.

The trained model is conftest's session fixture `tiny_run` (trained once, shared with the
training, translation and evaluation tests).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import toy_translate

from mt.config import ModelConfig
from mt.errors import MTError
from mt.kernels.reference import best_candidates
from mt.model import DecoderState, Memory, Seq2Seq
from mt.search import (
    beam_search,
    decode_dataset,
    greedy_search,
    length_penalty_factor,
    max_lengths,
    normalized_score,
    parse_length_penalty,
    search,
)

PAD, UNK, BOS, EOS = 0, 1, 2, 3


# ----------------------------------------------------------------------------- shared fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_model() -> Seq2Seq:
    torch.manual_seed(0)
    cfg = ModelConfig(
        cell="torch",
        emb_dim=16,
        hidden_dim=16,
        enc_layers=2,
        dec_layers=2,
        attention="general",
        dropout=0.0,
        emb_dropout=0.0,
    )
    return Seq2Seq(cfg, 30, 30, PAD).eval()


def random_batch(lengths: list[int], vocab: int = 30, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """src (B, S) right-padded, each row pieces + EOS; src_len counts EOS."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=g)
        src[i, n - 1] = EOS
    return src, torch.tensor(lengths)


# ----------------------------------------------------------------------------- a scripted model
class ChainModel:
    """A first-order Markov chain posing as a Seq2Seq: p(next | previous token) from a table.
    Lets the tests compute every hypothesis' exact score by hand."""

    def __init__(self, probs: dict[int, dict[int, float]], vocab: int = 6, floor: float = 1e-4):
        table = torch.full((vocab, vocab), floor)
        for prev, row in probs.items():
            for tok, p in row.items():
                table[prev, tok] = p
        self.logp = (table / table.sum(-1, keepdim=True)).log()
        self.decoder = self
        self.training = False

    def encode(self, src, src_len):
        B, S = src.shape
        mask = torch.arange(S)[None, :] < src_len[:, None]
        memory = Memory(torch.zeros(B, S, 1), torch.zeros(B, S, 1), mask, "torch")
        return memory, DecoderState([torch.zeros(B, 1)], [torch.zeros(B, 1)], torch.zeros(B, 1))

    def step_logits(self, tokens, state, memory):  # log-probs are logits the search's log-softmax keeps
        attn = memory.mask.float() / memory.mask.sum(-1, keepdim=True)
        return self.logp[tokens], state, attn

    def path_logp(self, tokens: list[int], eos: bool = True) -> float:
        seq = [BOS, *tokens] + ([EOS] if eos else [])
        return float(sum(self.logp[a, b] for a, b in zip(seq, seq[1:])))


A, B_ = 4, 5
# BOS -> EOS (0.5) | a (0.5);  a -> b (0.9);  b -> EOS (0.9)
#   ""    : log .5                    = -0.69 per 1 token   (best raw score)
#   "a b" : log .5 + 2 log .9         = -0.90 over 3 tokens (best per token)
SHORT_VS_LONG = {BOS: {EOS: 0.5, A: 0.5}, A: {B_: 0.9}, B_: {EOS: 0.9}}


# ----------------------------------------------------------------------------- unit tests
def test_length_penalty_definitions():
    assert parse_length_penalty(None) is None and parse_length_penalty(0) is None
    assert parse_length_penalty("none") is None and parse_length_penalty("0.0") is None
    assert parse_length_penalty("avg") == "avg" and parse_length_penalty("0.6") == 0.6
    with pytest.raises(MTError):
        parse_length_penalty("long")
    assert length_penalty_factor(7, None) == 1.0
    assert length_penalty_factor(7, "avg") == 7.0
    assert length_penalty_factor(7, 1.0) == pytest.approx(12 / 6)
    assert length_penalty_factor(7, 0.6) == pytest.approx((12 / 6) ** 0.6)
    assert normalized_score(-4.0, 7, "avg") == pytest.approx(-4 / 7)
    assert max_lengths(torch.tensor([4, 10]), 1.5, 2).tolist() == [8, 17]


@pytest.mark.parametrize("lp, expected", [(None, []), ("avg", [A, B_]), (1.0, [A, B_])])
def test_length_penalty_changes_ranking_as_defined(lp, expected):
    model = ChainModel(SHORT_VS_LONG)
    src, src_len = torch.tensor([[7, EOS]]), torch.tensor([2])
    out = beam_search(model, src, src_len, BOS, EOS, beam=3, length_penalty=lp, nbest=2)
    best = out.nbest[0][0]
    assert best.tokens == expected
    for h in out.nbest[0]:  # score = log_prob / lp(len), len counting EOS
        assert h.log_prob == pytest.approx(model.path_logp(h.tokens), abs=1e-5)
        assert h.score == pytest.approx(normalized_score(h.log_prob, len(h.tokens) + 1, parse_length_penalty(lp)))
    assert {tuple(h.tokens) for h in out.nbest[0]} == {(), (A, B_)}
    assert out.nbest[0][0].score >= out.nbest[0][1].score


def test_best_candidates_break_ties_as_the_beam_kernel_does():
    """Equal values: the lower beam, then the better rank within the beam (the order
    `_beam_update_kernel` picks in), whatever order `topk` would give them."""
    g = torch.Generator().manual_seed(0)
    n, K, r, k = 6, 5, 10, 10
    val = (-torch.randint(0, 3, (n, K, r), generator=g).float()).sort(dim=-1, descending=True).values  # many ties
    val[0, 2:] = float("-inf")  # beams not yet open tie too
    col = torch.randint(0, 1000, (n, K, r), generator=g)
    top_s, beam, tok = best_candidates(val, col, k)
    for i in range(n):
        want = sorted((-val[i, b, j].item(), b, j) for b in range(K) for j in range(r))[:k]
        assert top_s[i].tolist() == [-v for v, _, _ in want]
        assert beam[i].tolist() == [b for _, b, _ in want]
        assert tok[i].tolist() == [col[i, b, j].item() for _, b, j in want]


def test_max_length_respected_without_eos():
    model = ChainModel({BOS: {A: 1.0}, A: {A: 0.6, B_: 0.4}, B_: {A: 0.5, B_: 0.5}}, floor=1e-6)
    src, src_len = random_batch([3, 6, 2])
    for a, b in [(1.0, 0), (0.5, 2), (0.0, 1)]:
        limits = max_lengths(src_len, a, b).tolist()
        for out in (
            greedy_search(model, src, src_len, BOS, EOS, a, b),
            beam_search(model, src, src_len, BOS, EOS, beam=4, length_penalty="avg", nbest=4, max_len_a=a, max_len_b=b),
        ):
            for hyps, limit in zip(out.nbest, limits):
                for h in hyps:
                    assert len(h.tokens) == limit and EOS not in h.tokens
                    assert h.attention.shape[0] == limit  # one row per scored token, no EOS step


def test_beam1_equals_greedy(random_model):
    src, src_len = random_batch([5, 9, 2, 7, 3, 9])
    g = greedy_search(random_model, src, src_len, BOS, EOS)
    b = beam_search(random_model, src, src_len, BOS, EOS, beam=1, length_penalty=None)
    assert b.tokens == g.tokens
    assert b.scores == g.scores  # the same float32 sums, bit for bit
    # Beam search drops finished sentences from the batch and greedy search does not, so their
    # late steps multiply batches of different sizes; some CPU BLAS kernels round a row
    # differently with the batch size (seen: 1 ulp of an attention weight on an AMD EPYC).
    for x, y in zip(b.attention, g.attention):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert search(random_model, src, src_len, BOS, EOS, beam=1).tokens == g.tokens


def test_beam_finds_at_least_the_greedy_score(random_model):
    src, src_len = random_batch([5, 9, 2, 7, 3, 9], seed=3)
    g = greedy_search(random_model, src, src_len, BOS, EOS)
    b = beam_search(random_model, src, src_len, BOS, EOS, beam=5, length_penalty=None)
    for gs, hyps in zip(g.scores, b.nbest):
        assert hyps[0].log_prob >= gs - 1e-5


def test_nbest_sorted_distinct_and_well_formed(random_model):
    lengths = [5, 9, 2, 7]
    src, src_len = random_batch(lengths, seed=5)
    for lp in (None, 1.0, "avg"):
        out = beam_search(random_model, src, src_len, BOS, EOS, beam=5, length_penalty=lp, nbest=5)
        limits = max_lengths(src_len, 1.5, 10).tolist()
        for hyps, n, limit in zip(out.nbest, lengths, limits):
            assert len(hyps) == 5
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == 5
            for h in hyps:
                assert not {EOS, BOS, PAD} & set(h.tokens) and len(h.tokens) <= limit
                assert h.attention.shape[1] == n and h.attention.shape[0] in (len(h.tokens), len(h.tokens) + 1)
                assert torch.allclose(h.attention.sum(-1), torch.ones(h.attention.shape[0]), atol=1e-4)
                assert math.isfinite(h.score) and h.log_prob <= 0
        assert out.tokens == [h[0].tokens for h in out.nbest]


def test_batched_beam_search_matches_one_sentence_at_a_time(random_model):
    lengths = [4, 9, 2, 6]
    src, src_len = random_batch(lengths, seed=7)
    batched = beam_search(random_model, src, src_len, BOS, EOS, beam=4, length_penalty=1.0, nbest=2)
    for i, n in enumerate(lengths):
        alone = beam_search(
            random_model, src[i : i + 1, :n], src_len[i : i + 1], BOS, EOS, beam=4, length_penalty=1.0, nbest=2
        )
        assert [h.tokens for h in alone.nbest[0]] == [h.tokens for h in batched.nbest[i]]
        assert alone.scores[0] == pytest.approx(batched.scores[i], abs=1e-4)


def test_search_arguments_are_checked(random_model):
    src, src_len = random_batch([3])
    with pytest.raises(MTError):
        beam_search(random_model, src, src_len, BOS, EOS, beam=0)
    with pytest.raises(MTError):
        beam_search(random_model, src, src_len, BOS, EOS, beam=2, nbest=3)


# ----------------------------------------------------------------------------- trained model
@pytest.fixture(scope="module")
def trained(tiny_run):
    from mt.translator import Translator

    info = tiny_run
    return info, Translator.from_checkpoint(info["checkpoint"], device="cpu")


def test_trained_model_beam_and_greedy_decode_the_toy_task(trained):
    info, tr = trained
    import json

    rows = [json.loads(ln) for ln in (info["corpus"] / "test.jsonl").read_text().splitlines()][:20]
    ids = tr.tokenizer.encode_src([r["de"] for r in rows])
    greedy = decode_dataset(tr.model, ids, tr.tokenizer, tr.device, batch_size=8)
    beam1 = decode_dataset(tr.model, ids, tr.tokenizer, tr.device, batch_size=8, beam=1, length_penalty=None, nbest=1)
    beam1_forced = [
        beam_search(
            tr.model, *_collated(tr, [s]), tr.tokenizer.bos_id, tr.tokenizer.eos_id, beam=1, length_penalty=None
        ).tokens[0]
        for s in ids[:5]
    ]
    assert beam1.tokens == greedy.tokens and beam1_forced == greedy.tokens[:5]
    beam = decode_dataset(tr.model, ids, tr.tokenizer, tr.device, batch_size=8, beam=5, length_penalty=1.0, nbest=3)
    hyps = tr.tokenizer.decode_tgt(beam.tokens)
    correct = sum(h == toy_translate(r["de"]) for h, r in zip(hyps, rows))
    assert correct >= 18, list(zip(hyps, [r["en"] for r in rows]))
    for g, nb in zip(greedy.scores, beam.nbest):  # raw log-prob of the beam's best >= greedy's
        assert len(nb) == 3 and max(h.log_prob for h in nb) >= g - 1e-4


def _collated(tr, ids):
    from mt.batching import collate

    b = collate(
        [{"src_ids": ids[0], "tgt_ids": [], "idx": 0}], tr.tokenizer.pad_id, tr.tokenizer.bos_id, tr.tokenizer.eos_id
    )
    return b.src, b.src_len


# ----------------------------------------------------------------------------- rebuilding hypotheses
@pytest.mark.parametrize("T, n0, n, K, m, S", [(9, 6, 6, 3, 2, 5), (12, 7, 4, 5, 5, 3), (1, 2, 2, 2, 1, 4)])
def test_backtrack_host_follows_the_back_pointers(T, n0, n, K, m, S):
    """`reference.backtrack` (beam search's output on the host, all hypotheses at once) against a
    plain per-hypothesis walk, on random histories: every token and attention row it defines."""
    from conftest import assert_walked_back, random_beam_history

    from mt.kernels.reference import backtrack

    tok, bp, attn, info = history = random_beam_history(T * 10 + n, T, n0, K, S)
    steps = T - 1 if T > 1 else T  # fewer steps than the history holds (T = 1: all of it)
    info[..., 0].clamp_(max=steps - 1)
    tokens, a = backtrack(tok[:steps, :n].numpy(), bp[:steps, :n].numpy(), attn[:steps, :n], info[:n, :m].numpy())
    assert tokens.shape == (n, m, steps) and a.shape == (n, m, steps, S)
    assert_walked_back(history, tokens, a, n, m)
