"""Decoding: batched greedy and beam search on the incremental LSTM decoder.

Both searches encode the source once and then call ``model.decoder.step`` once per output
position for the whole batch; the decoder state (h, c, input feed) is carried forward and, in
beam search, reordered with ``DecoderState.index_select`` — the prefix is never recomputed.

Scores are sums of token log-probabilities, EOS included; BOS and padding are never generated. A hypothesis that reaches the length
limit ``max_len_a * src_len + max_len_b`` (src_len counts the source EOS) without producing EOS is
closed there, without EOS.

Length penalty (beam search ranks hypotheses by ``score / lp(len)``, len = number of scored
output tokens, EOS included):

    None / 0     lp = 1                       (raw log-probability: favours short outputs)
    alpha > 0    lp = ((5 + len) / 6) ** alpha (GNMT, Wu et al. 2016; alpha = 1.0 is common)
    "avg"        lp = len                      (mean log-probability per token)

With ``graphs=`` a `mt.graphs.GraphedDecoder`, every decoder step is replayed from a CUDA graph
(padded to a fixed shape; eager on CPU); results equal the eager ones up to float rounding.

Beam search keeps ``beam`` open hypotheses per sentence. A candidate ending in EOS (among the
best ``beam`` candidates of a step) is moved to the sentence's finished list. A sentence stops
when it has ``beam`` finished hypotheses and no open one can still beat the ``nbest``-th best
of them (log-probabilities only fall, so the best an open hypothesis with score s can reach is
s / lp at the most favourable remaining length), or at its length limit, where the open
hypotheses are closed as they are. Finished sentences leave the batch. With ``beam=1`` and no
length penalty beam search returns exactly what greedy search returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import MTError
from .model import Seq2Seq

LengthPenalty = float | str | None


@dataclass
class Hyp:
    """One finished hypothesis."""

    tokens: list[int]  # output ids without BOS/EOS
    score: float  # ranking score: log_prob / lp(length)
    log_prob: float  # sum of token log-probabilities (EOS included when produced)
    attention: Tensor  # (steps, S_i): one row per scored output token (EOS included), float32 CPU


@dataclass
class SearchOutput:
    tokens: list[list[int]]  # per sentence, best output ids without BOS/EOS
    scores: list[float]  # best hypothesis' ranking score (greedy: sum of log-probs, EOS included)
    attention: list[Tensor]  # per sentence (len(tokens) + 1, S_i) weights, EOS step included
    nbest: list[list[Hyp]] = field(default_factory=list)  # per sentence, best first


# ----------------------------------------------------------------------------- length penalty
def parse_length_penalty(value: LengthPenalty) -> LengthPenalty:
    """None / 0 / "none" -> None; "avg" -> "avg"; a number (or numeric string) -> float alpha."""
    if value is None or isinstance(value, bool):
        if value is True:
            raise MTError("length_penalty must be a number (GNMT alpha), 'avg' or none")
        return None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "none", "null", "off"):
            return None
        if v in ("avg", "average", "mean"):
            return "avg"
        try:
            value = float(v)
        except ValueError:
            raise MTError(f"length_penalty={value!r}: use a number (GNMT alpha), 'avg' or none") from None
    alpha = float(value)
    if not math.isfinite(alpha):
        raise MTError(f"length_penalty={value!r} is not a finite number")
    return None if alpha == 0.0 else alpha


def length_penalty_factor(length: int, length_penalty: LengthPenalty) -> float:
    """lp(length): 1 (none), ((5 + length) / 6) ** alpha (GNMT) or length ("avg")."""
    if length_penalty is None:
        return 1.0
    if length_penalty == "avg":
        return float(max(1, length))
    return ((5.0 + length) / 6.0) ** float(length_penalty)


def normalized_score(log_prob: float, length: int, length_penalty: LengthPenalty) -> float:
    return log_prob / length_penalty_factor(length, length_penalty)


def _best_reachable(log_prob: float, lo: int, hi: int, length_penalty: LengthPenalty) -> float:
    """Upper bound on the ranking score of an open hypothesis with `log_prob` (<= 0) that will
    finish with a length in [lo, hi]: lp is monotonic in the length, so an end is the best."""
    if length_penalty is None:
        return log_prob
    hi = max(lo, hi)
    return max(normalized_score(log_prob, lo, length_penalty), normalized_score(log_prob, hi, length_penalty))


def _banned(model, bos_id: int) -> list[int]:
    """Ids never generated: BOS and padding (the model's pad_id)."""
    pad = getattr(model, "pad_id", None)
    return [bos_id] + ([pad] if pad is not None and pad != bos_id else [])


def max_lengths(src_len: Tensor, a: float, b: int) -> Tensor:
    """Output length limit a * src_len + b per sentence (src_len counts EOS)."""
    return (a * src_len.float() + b).long().clamp(min=1)


# ----------------------------------------------------------------------------- greedy
def _step_fn(model, graphs):
    """The decoder step to call: the graphed one when given (its outputs are overwritten by the
    next call: keep only copies), else the model's own."""
    return graphs.step if graphs is not None else model.decoder.step


@torch.no_grad()
def greedy_search(model: Seq2Seq, src: Tensor, src_len: Tensor, bos_id: int, eos_id: int,
                  max_len_a: float = 1.5, max_len_b: int = 10, graphs=None) -> SearchOutput:
    """Pick the most probable token at every step. src (B, S), src_len (B,)."""
    step = _step_fn(model, graphs)
    B = src.shape[0]
    memory, state = model.encode(src, src_len)
    limit = max_lengths(src_len, max_len_a, max_len_b)  # (B,)
    tokens = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    scores = torch.zeros(B, device=src.device)
    out_tokens, out_attn = [], []
    banned = _banned(model, bos_id)
    for t in range(int(limit.max())):
        logp, state, attn = step(tokens, state, memory)  # (B, V), (B, S)
        logp[:, banned] = float("-inf")
        best, tokens = logp.max(dim=-1)  # (B,)
        tokens = torch.where(finished, torch.full_like(tokens, eos_id), tokens)
        scores += torch.where(finished, torch.zeros_like(best), best)
        out_tokens.append(tokens)
        out_attn.append(attn if graphs is None else attn.clone())
        finished |= (tokens == eos_id) | (t + 1 >= limit)
        if bool(finished.all()):
            break
    toks = torch.stack(out_tokens, 1).tolist()  # (B, T)
    attn = torch.stack(out_attn, 1).float().cpu()  # (B, T, S)
    src_lens, limits = src_len.tolist(), limit.tolist()
    score_list = scores.tolist()
    res_tokens, res_attn, nbest = [], [], []
    for i in range(B):
        seq = toks[i]
        n = seq.index(eos_id) if eos_id in seq else len(seq)
        res_tokens.append(seq[:n])
        # one row per scored step: the tokens, plus EOS unless the length limit closed it
        res_attn.append(attn[i, : min(n + 1, len(seq), limits[i]), : src_lens[i]])
        nbest.append([Hyp(res_tokens[-1], score_list[i], score_list[i], res_attn[-1])])
    return SearchOutput(res_tokens, score_list, res_attn, nbest)


# ----------------------------------------------------------------------------- beam
@torch.no_grad()
def beam_search(model: Seq2Seq, src: Tensor, src_len: Tensor, bos_id: int, eos_id: int,
                beam: int = 5, length_penalty: LengthPenalty = 1.0, nbest: int = 1,
                max_len_a: float = 1.5, max_len_b: int = 10, graphs=None) -> SearchOutput:
    """Batched beam search. src (B, S), src_len (B,) -> per sentence the `nbest` best finished
    hypotheses (ranked by log_prob / lp(len), see the module docstring), best first."""
    step = _step_fn(model, graphs)
    if beam < 1:
        raise MTError(f"beam must be >= 1 (got {beam})")
    if not 1 <= nbest <= beam:
        raise MTError(f"nbest must be between 1 and beam={beam} (got {nbest})")
    lp = parse_length_penalty(length_penalty)
    B, device, K = src.shape[0], src.device, beam
    memory, state = model.encode(src, src_len)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) sentence of each beam row
    memory, state = memory.index_select(rows), state.index_select(rows)
    limit_all = max_lengths(src_len, max_len_a, max_len_b).tolist()
    src_lens = src_len.tolist()

    # ---- state of the active sentences (n of them, K beam rows each)
    active = list(range(B))  # original index of each active sentence
    limit = torch.tensor(limit_all, device=device)  # (n,)
    scores = torch.full((B, K), float("-inf"), device=device)  # (n, K) raw log-probs
    scores[:, 0] = 0.0  # the first step expands beam 0 only (no duplicate hypotheses)
    last = torch.full((B * K,), bos_id, dtype=torch.long, device=device)  # (n*K,)
    seqs = torch.empty((B * K, 0), dtype=torch.long, device=device)  # (n*K, t)
    hist = torch.empty((B * K, 0, src.shape[1]), dtype=torch.float32, device=device)  # (n*K, t, S)
    finished: list[list[Hyp]] = [[] for _ in range(B)]
    beam_offsets = torch.arange(K, device=device)
    banned = _banned(model, bos_id)

    t = 0
    while active:
        n = len(active)
        logp, state, attn = step(last, state, memory)  # (n*K, V), (n*K, S)
        logp[:, banned] = float("-inf")
        V = logp.shape[-1]
        cand = scores.unsqueeze(-1) + logp.view(n, K, V)  # (n, K, V)
        k2 = min(2 * K, K * V)
        top_s, top_i = cand.view(n, K * V).topk(k2, dim=-1)  # (n, k2), best first
        top_beam, top_tok = top_i // V, top_i % V  # (n, k2)
        is_eos = top_tok == eos_id
        at_limit = (t + 1) >= limit  # (n,)
        # Candidates among the best K that close a hypothesis: EOS, or anything at the limit.
        closing = (is_eos[:, :K] | at_limit.unsqueeze(-1)) & torch.isfinite(top_s[:, :K])  # (n, K)
        # The K best candidates that do not end in EOS continue (a stable order keeps best first).
        order = is_eos.long() * k2 + torch.arange(k2, device=device)
        pos = order.topk(K, dim=-1, largest=False).indices.sort(dim=-1).values  # (n, K)
        new_beam, new_tok, new_score = top_beam.gather(1, pos), top_tok.gather(1, pos), top_s.gather(1, pos)
        step_attn = attn.float()  # (n*K, S)

        # ---- bookkeeping on the host
        # best open score, at-limit flag and number of closing candidates per sentence: one sync
        info = torch.stack([new_score[:, 0], at_limit.float(), closing.sum(-1).float()], dim=1).tolist()
        if any(row[2] for row in info):
            sel = closing.nonzero().tolist()
            sel_t = torch.tensor(sel, device=device)  # (m, 2)
            src_rows = sel_t[:, 0] * K + top_beam[sel_t[:, 0], sel_t[:, 1]]  # (m,)
            m_seqs = seqs.index_select(0, src_rows).tolist()
            m_attn = torch.cat([hist.index_select(0, src_rows), step_attn.index_select(0, src_rows).unsqueeze(1)],
                               dim=1).cpu()  # (m, t+1, S)
            m_tok = top_tok[sel_t[:, 0], sel_t[:, 1]].tolist()
            m_score = top_s[sel_t[:, 0], sel_t[:, 1]].tolist()
            for k, (b, _j) in enumerate(sel):
                orig = active[b]
                toks = m_seqs[k] + ([] if m_tok[k] == eos_id else [m_tok[k]])
                length = t + 1
                hyp = Hyp(toks, normalized_score(m_score[k], length, lp), m_score[k],
                          m_attn[k, :, : src_lens[orig]].clone())
                finished[orig].append(hyp)
            for b in {b for b, _ in sel}:
                fin = finished[active[b]]
                fin.sort(key=lambda h: -h.score)
                del fin[K:]  # only the K best can ever be returned (nbest <= K)

        # ---- which sentences are done
        best_open = [row[0] for row in info]
        at_limit_cpu = [row[1] > 0 for row in info]
        done = []
        for b in range(n):
            orig = active[b]
            fin = finished[orig]
            if at_limit_cpu[b] or not math.isfinite(best_open[b]):
                done.append(True)
            elif len(fin) >= K:
                bound = _best_reachable(best_open[b], t + 2, limit_all[orig], lp)
                done.append(bound <= fin[nbest - 1].score)
            else:
                done.append(False)

        # ---- advance the open beams
        idx = (torch.arange(n, device=device).unsqueeze(-1) * K + new_beam).view(-1)  # (n*K,)
        state = state.index_select(idx)
        seqs = torch.cat([seqs.index_select(0, idx), new_tok.view(-1, 1)], dim=1)
        hist = torch.cat([hist.index_select(0, idx), step_attn.index_select(0, idx).unsqueeze(1)], dim=1)
        scores, last = new_score, new_tok.view(-1)
        t += 1

        # ---- drop finished sentences from the batch
        if any(done):
            keep = [b for b in range(n) if not done[b]]
            active = [active[b] for b in keep]
            if not active:
                break
            keep_t = torch.tensor(keep, device=device)
            krows = (keep_t.unsqueeze(-1) * K + beam_offsets).view(-1)
            state, memory = state.index_select(krows), memory.index_select(krows)
            seqs, hist, last = seqs.index_select(0, krows), hist.index_select(0, krows), last.index_select(0, krows)
            scores, limit = scores.index_select(0, keep_t), limit.index_select(0, keep_t)

    out = SearchOutput([], [], [], [])
    for i in range(B):
        hyps = sorted(finished[i], key=lambda h: -h.score)[:nbest]
        if not hyps:  # cannot happen with a finite model; keep the output well-formed anyway
            hyps = [Hyp([], float("-inf"), float("-inf"), torch.zeros(0, src_lens[i]))]
        out.nbest.append(hyps)
        out.tokens.append(hyps[0].tokens)
        out.scores.append(hyps[0].score)
        out.attention.append(hyps[0].attention)
    return out


def search(model: Seq2Seq, src: Tensor, src_len: Tensor, bos_id: int, eos_id: int, beam: int = 1,
           length_penalty: LengthPenalty = None, nbest: int = 1, max_len_a: float = 1.5,
           max_len_b: int = 10, graphs=None) -> SearchOutput:
    """Greedy search when beam == 1 and there is no length penalty, beam search otherwise."""
    if beam == 1 and nbest == 1 and parse_length_penalty(length_penalty) is None:
        return greedy_search(model, src, src_len, bos_id, eos_id, max_len_a, max_len_b, graphs=graphs)
    return beam_search(model, src, src_len, bos_id, eos_id, beam, length_penalty, nbest, max_len_a, max_len_b,
                       graphs=graphs)


# ----------------------------------------------------------------------------- whole splits
@torch.no_grad()
def decode_dataset(model: Seq2Seq, ds, tokenizer, device: torch.device, batch_size: int = 64,
                   max_len_a: float = 1.5, max_len_b: int = 10, beam: int = 1,
                   length_penalty: LengthPenalty = None, nbest: int = 1, graphs=None) -> SearchOutput:
    """Decode every row of a tokenized split (column `src_ids`; a dataset or a list of id lists)
    in batches of similar source length: greedy by default, beam search with `beam` > 1 or a
    length penalty. Results come back in the split's order. graphs: a GraphedDecoder, or None."""
    from .batching import collate

    was_training = model.training
    model.eval()
    src_ids = ds["src_ids"] if not isinstance(ds, list) else ds
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    tokens: list = [None] * len(order)
    scores: list = [None] * len(order)
    attention: list = [None] * len(order)
    hyps: list = [None] * len(order)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([{"src_ids": src_ids[i], "tgt_ids": [], "idx": i} for i in idx],
                            tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id).to(device)
            out = search(model, batch.src, batch.src_len, tokenizer.bos_id, tokenizer.eos_id, beam,
                         length_penalty, nbest, max_len_a, max_len_b, graphs=graphs)
            for j, i in enumerate(idx):
                tokens[i], scores[i], attention[i] = out.tokens[j], out.scores[j], out.attention[j]
                hyps[i] = out.nbest[j]
    finally:
        model.train(was_training)
    return SearchOutput(tokens, scores, attention, hyps)


__all__ = ["Hyp", "SearchOutput", "greedy_search", "beam_search", "search", "decode_dataset",
           "parse_length_penalty", "length_penalty_factor", "normalized_score", "max_lengths"]
