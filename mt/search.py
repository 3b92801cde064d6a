"""Decoding: batched greedy and beam search on the incremental LSTM decoder.

Both searches encode the source once and then call ``model.decoder.step_logits`` once per output
position for the whole batch; the decoder state (h, c, input feed) is carried forward and, in
beam search, reordered with ``DecoderState.index_select`` — the prefix is never recomputed.
With our Triton gate cell, a step's log-softmax, beam-score add and top-k are fused kernels
(`kernels.log_softmax_topk`: each beam's min(2K, V) best), and the search's bookkeeping after it
one more (`kernels/search_greedy.py`, `kernels/search_beam.py`); with cuDNN or the PyTorch
reference, PyTorch's log_softmax and topk over all K * V candidates, and the kernels' references
(`kernels/reference.py`: `greedy_update`, `beam_update`), which the searches' `advance` call.

Every decision of a step is made on the device, on tensors of fixed shape (`SearchState`):
beam search keeps each sentence's finished hypotheses as K (score, log-prob, step, beam, token)
slots and records per step only the token and back-pointer of every beam (and its attention),
so a step costs the same at every position and the outputs are rebuilt once at the end by
following the back-pointers (with our Triton cell on the device, `kernels/search_beam.py`'s
`backtrack`; else on the host, `reference.backtrack`). Nothing in a step reads a value back to
the host; that is what lets `mt.graphs.GraphedDecoder` capture the whole step (decoder and
bookkeeping) as one CUDA graph. Eagerly, the host looks at the ``done`` flags after every step
and beam search drops finished sentences from the batch.

Scores are sums of token log-probabilities, EOS included; BOS and padding are never generated. A hypothesis that reaches the length
limit ``max_len_a * src_len + max_len_b`` (src_len counts the source EOS) without producing EOS is
closed there, without EOS.

Length penalty (beam search ranks hypotheses by ``score / lp(len)``, len = number of scored
output tokens, EOS included):

    None / 0     lp = 1                       (raw log-probability: favours short outputs)
    alpha > 0    lp = ((5 + len) / 6) ** alpha (GNMT, Wu et al. 2016; alpha = 1.0 is common)
    "avg"        lp = len                      (mean log-probability per token)

With ``graphs=`` a `mt.graphs.GraphedDecoder`, every search step is replayed from a CUDA graph
(padded to a fixed shape; eager on CPU); results equal the eager ones up to float rounding.

Beam search keeps ``beam`` open hypotheses per sentence. A candidate ending in EOS (among the
best ``beam`` candidates of a step) is moved to the sentence's finished list. A sentence stops
when it has ``beam`` finished hypotheses and no open one can still beat the ``nbest``-th best
of them (log-probabilities only fall, so the best an open hypothesis with score s can reach is
s / lp at the most favourable remaining length), or at its length limit, where the open
hypotheses are closed as they are. With ``beam=1`` and no length penalty beam search returns
exactly what greedy search returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import kernels
from .errors import MTError
from .kernels import reference
from .model import DecoderState, Memory, Seq2Seq

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
    try:
        alpha = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise MTError(f"length_penalty={value!r} is not a finite number") from None
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


def _banned(model, bos_id: int) -> list[int]:
    """Ids never generated: BOS and padding (the model's pad_id)."""
    pad = getattr(model, "pad_id", None)
    return [bos_id] + ([pad] if pad is not None and pad != bos_id else [])


def max_lengths(src_len: Tensor, a: float, b: int) -> Tensor:
    """Output length limit a * src_len + b per sentence (src_len counts EOS)."""
    return (a * src_len.float() + b).long().clamp(min=1)


def fused(memory: Memory, logits: Tensor, k: int) -> bool:
    """Whether a step's log-softmax and top-k run as our fused Triton kernel: with our Triton
    gate cell (model.cell=triton, or auto on CUDA), where the kernel takes the shape. Otherwise
    (cuDNN, the PyTorch reference) they are PyTorch's own log_softmax and topk."""
    if memory.backend != "triton":
        return False
    from .kernels import search_topk  # imports Triton: only when the gate cell already runs on it

    return search_topk.supported(logits, k)


# ----------------------------------------------------------------------------- search state
@dataclass
class SearchState:
    """What one search step reads and replaces: device tensors of fixed shape, N = n x K rows
    (n sentences, K beams; greedy: K = 1). A step returns a SearchState; under CUDA graphs it is
    copied into the captured one (`copy_`), except the tensors the step updated in place: the
    `advance_fused` of both searches rewrite the state's tokens, scores, done flags and step
    (beam search: and finished lists) in place, eagerly too, so the returned state shares them
    with the one passed in (nothing keeps the old values)."""

    last: Tensor  # (N,) each row's previous output token
    dec: DecoderState  # (N, H) per layer, and the input feed
    scores: Tensor  # greedy (N,), beam (n, K): raw log-prob of the open hypotheses
    done: Tensor  # greedy (N,), beam (n,) bool: finished, never changes again
    t: Tensor  # () int64: steps taken
    fin: tuple[Tensor, ...] = ()  # beam: finished hypotheses, best first (see _BeamSearch)

    def tensors(self) -> list[Tensor]:
        return [self.last, *self.dec.tensors(), self.scores, self.done, self.t, *self.fin]

    def copy_(self, new: SearchState) -> None:
        for dst, src in zip(self.tensors(), new.tensors(), strict=True):
            if dst is not src:  # a step that updated a buffer in place (`advance_fused`) leaves it as it is
                dst.copy_(src)


class _GreedySearch:
    """Greedy search over N rows: the most probable token at every step (BOS/padding banned);
    a row is done after EOS or at its length limit, and then only emits EOS at no cost."""

    def __init__(self, memory: Memory, dec: DecoderState, limit: Tensor, T: int, bos: int, eos: int, banned: list[int]):
        N, S, device = memory.out.shape[0], memory.out.shape[1], limit.device
        self.memory, self.limit, self.bos, self.eos = memory, limit, bos, eos  # limit (N,)
        self.banned = torch.tensor(banned, device=device)
        self.in_place = False  # the state lives in static buffers (CUDA graphs): `advance_fused` writes into them
        self.identity = torch.arange(N, device=device)  # (N,) rows: the decoder state's copy, as a gather
        self.tok_hist = torch.zeros(T, N, dtype=torch.long, device=device)  # (T, N) output tokens
        self.attn_hist = torch.zeros(T, N, S, device=device)  # (T, N, S) fp32 attention
        self.state = SearchState(
            torch.full((N,), bos, dtype=torch.long, device=device),
            dec,
            torch.zeros(N, device=device),
            torch.zeros(N, dtype=torch.bool, device=device),
            torch.zeros((), dtype=torch.long, device=device),
        )

    def reset(self, n: int) -> None:
        """Start again with rows [0, n) real (in place: CUDA-graph buffers); padded rows are done."""
        s = self.state
        s.last.fill_(self.bos), s.scores.zero_(), s.t.zero_()
        s.done.fill_(True)
        s.done[:n] = False

    def step(self, step_fn, s: SearchState) -> SearchState:
        logits, dec, attn = step_fn(s.last, s.dec, self.memory)  # (N, V), (N, S)
        if fused(self.memory, logits, 1):  # our Triton kernels: one launch for log-softmax and top-1...
            best, tok = (
                x.squeeze(1) for x in kernels.log_softmax_topk(logits, 1, banned=self.banned, backend="triton")
            )
            from .kernels import search_greedy

            if search_greedy.supported(attn):  # ...and one for `advance`
                return self.advance_fused(s, best, tok, dec, attn)
        else:
            logp = torch.log_softmax(logits.float(), dim=-1)
            logp.index_fill_(1, self.banned, float("-inf"))
            best, tok = logp.max(dim=-1)  # (N,)
        return self.advance(s, best, tok, dec, attn)

    def advance(self, s: SearchState, best: Tensor, tok: Tensor, dec: DecoderState, attn: Tensor) -> SearchState:
        """The step's decisions from each row's best log-prob and token, best and tok (N,); dec and
        attn (N, S) what the decoder step gave: `reference.greedy_update` (`advance_fused` is the
        same in one Triton kernel)."""
        tok, scores, done = reference.greedy_update(
            best, tok, attn, self.limit, s.t, s.done, s.scores, self.tok_hist, self.attn_hist, self.eos
        )
        return SearchState(tok, dec, scores, done, s.t + 1)

    def advance_fused(self, s: SearchState, best: Tensor, tok: Tensor, dec: DecoderState, attn: Tensor) -> SearchState:
        """`advance` in one launch (kernels/search_greedy.py): s's tokens, scores and done flags are
        rewritten in place, and with `in_place` (static CUDA-graph buffers) the decoder state is
        copied into s's by one more (`search_beam.gather_rows` over the identity)."""
        from .kernels import search_greedy

        search_greedy.greedy_update(
            best, tok, attn, self.limit, s.t, s.done, s.scores, s.last, self.tok_hist, self.attn_hist, self.eos
        )
        if self.in_place:
            dec = _gather_state(dec, self.identity, into=s.dec)
        s.t.add_(1)
        return SearchState(s.last, dec, s.scores, s.done, s.t)

    def output(self, steps: int, n: int, src_lens: list[int], limits: list[int]) -> SearchOutput:
        toks = self.tok_hist[:steps, :n].t().tolist()  # (n, steps)
        # a copy even on CPU: the history is a CUDA-graph slot's buffer, which the next batch overwrites
        attn = self.attn_hist[:steps, :n].transpose(0, 1).to("cpu", copy=True).numpy()  # (n, steps, S)
        score_list = self.state.scores[:n].tolist()
        out = SearchOutput([], [], [], [])
        for i in range(n):
            seq = toks[i]
            m = seq.index(self.eos) if self.eos in seq else len(seq)
            # one attention row per scored step: the tokens, plus EOS unless the length limit closed it
            a = torch.from_numpy(attn[i, : min(m + 1, len(seq), limits[i]), : src_lens[i]])  # a view: cheaper
            out.tokens.append(seq[:m]), out.scores.append(score_list[i]), out.attention.append(a)
            out.nbest.append([Hyp(seq[:m], score_list[i], score_list[i], a)])
        return out


class _BeamSearch:
    """Beam search over n sentences x K beams, every decision on the device (see the module
    docstring for the rules). Finished hypotheses live in `state.fin`, per sentence the K best
    so far, best first: ranking score (float64, -inf = empty), raw log-prob (float32), and
    (step, beam, last token), from which `output` rebuilds the tokens through the back-pointers."""

    def __init__(
        self,
        memory: Memory,
        dec: DecoderState,
        limit: Tensor,
        T: int,
        K: int,
        nbest: int,
        length_penalty: LengthPenalty,
        bos: int,
        eos: int,
        banned: list[int],
    ):
        n, S, device = limit.shape[0], memory.out.shape[1], limit.device
        self.memory, self.limit, self.K, self.nbest = memory, limit, K, nbest
        self.bos, self.eos = bos, eos
        self.banned = torch.tensor(banned, device=device)
        self.sent = torch.arange(n, device=device)  # (n,) original index of each working sentence
        # lp(length) for every length a hypothesis can have here (float64; indexed on the device)
        self.lp_table = torch.tensor(
            [length_penalty_factor(i, length_penalty) for i in range(T + 2)], dtype=torch.float64, device=device
        )
        self.skip_idle_merge = False  # eager on CPU: skip the merge when nothing closes (costs a host sync)
        self.in_place = False  # the state lives in static buffers (CUDA graphs): `advance_fused` writes into them
        # `advance_fused`'s rows (the beam row each open beam continues), rewritten by every step;
        # zeros, not empty: a precompile dry run skips the kernel that writes them
        self.rows = torch.zeros(n * K, dtype=torch.long, device=device)
        # history, by original sentence: the token each beam took at step t, the beam (before
        # step t's reorder) it continues, and the attention of every beam row at step t
        self.tok_hist = torch.zeros(T, n, K, dtype=torch.long, device=device)
        self.bp_hist = torch.zeros(T, n, K, dtype=torch.long, device=device)
        self.attn_hist = torch.zeros(T, n, K, S, device=device)
        fin = (
            torch.full((n, K), float("-inf"), dtype=torch.float64, device=device),
            torch.full((n, K), float("-inf"), device=device),
            torch.zeros(n, K, 3, dtype=torch.long, device=device),
        )
        self.result = tuple(f.clone() for f in fin)  # the finished lists of sentences that left
        self.state = SearchState(
            torch.full((n * K,), bos, dtype=torch.long, device=device),
            dec,
            torch.zeros(n, K, device=device),
            torch.zeros(n, dtype=torch.bool, device=device),
            torch.zeros((), dtype=torch.long, device=device),
            fin,
        )
        self.reset(n)

    def reset(self, n: int) -> None:
        """Start again with sentences [0, n) real (in place: CUDA-graph buffers)."""
        s = self.state
        s.last.fill_(self.bos), s.t.zero_()
        s.scores.fill_(float("-inf"))
        s.scores[:, 0] = 0.0  # the first step expands beam 0 only (no duplicate hypotheses)
        s.done.fill_(True)
        s.done[:n] = False
        s.fin[0].fill_(float("-inf")), s.fin[1].fill_(float("-inf")), s.fin[2].zero_()

    def step(self, step_fn, s: SearchState) -> SearchState:
        n, K = s.scores.shape
        logits, dec, attn = step_fn(s.last, s.dec, self.memory)  # (n*K, V), (n*K, S)
        V = logits.shape[-1]
        k2 = min(2 * K, K * V)
        kr = min(k2, V)  # a sentence's k2 best candidates are among its beams' kr best each
        if fused(self.memory, logits, kr):  # our Triton kernels: log-softmax, + score, top-k per beam, one launch
            val, col = kernels.log_softmax_topk(
                logits, kr, row_bias=s.scores.view(-1), banned=self.banned, backend="triton"
            )  # (n*K, kr)
            from .kernels import search_beam

            if search_beam.supported(val, K, V, attn.shape[1]):  # ...and `advance` as one more
                return self.advance_fused(s, val, col, dec, attn)
            top_s, top_beam, top_tok = reference.best_candidates(val.view(n, K, kr), col.view(n, K, kr), k2)
        else:
            logp = torch.log_softmax(logits.float(), dim=-1)
            logp.index_fill_(1, self.banned, float("-inf"))
            cand = s.scores.unsqueeze(-1) + logp.view(n, K, V)  # (n, K, V)
            top_s, top_i = cand.view(n, K * V).topk(k2, dim=-1)  # (n, k2), best first
            top_beam, top_tok = top_i // V, top_i % V  # (n, k2)
        return self.advance(s, top_s, top_beam, top_tok, dec, attn)

    def advance(
        self, s: SearchState, top_s: Tensor, top_beam: Tensor, top_tok: Tensor, dec: DecoderState, attn: Tensor
    ) -> SearchState:
        """The step's decisions from each sentence's k2 best candidates, best first: top_s (n, k2)
        their scores, top_beam and top_tok (n, k2) the beam each extends and its token; dec and
        attn (n*K, S) what the decoder step gave every beam row: `reference.beam_update`
        (`advance_fused` is the same in one Triton kernel)."""
        tok, rows, score, done, fin = reference.beam_update(
            top_s,
            top_beam,
            top_tok,
            attn,
            self.limit,
            self.sent,
            s.t,
            self.lp_table,
            s.done,
            s.fin,
            self.tok_hist,
            self.bp_hist,
            self.attn_hist,
            self.eos,
            self.nbest,
            skip_idle_merge=self.skip_idle_merge,
        )
        return SearchState(tok, dec.index_select(rows), score, done, s.t + 1, fin)

    def advance_fused(self, s: SearchState, val: Tensor, col: Tensor, dec: DecoderState, attn: Tensor) -> SearchState:
        """`advance` from each beam's 2K best candidates, val and col (n*K, 2K) of the fused
        top-k, in one launch (kernels/search_beam.py): s's scores, tokens, finished lists and
        done flags are rewritten in place, and with `in_place` (static CUDA-graph buffers) the
        decoder state is gathered straight into s's as well."""
        from .kernels import search_beam

        n, K = s.scores.shape
        rows = self.rows[: n * K]  # (n*K,) the row each open beam continues, written by the kernel
        search_beam.beam_update(
            val,
            col,
            attn,
            self.limit,
            self.sent,
            s.t,
            self.lp_table,
            s.done,
            s.fin,
            s.scores,
            s.last,
            rows,
            self.tok_hist,
            self.bp_hist,
            self.attn_hist,
            self.eos,
            self.nbest,
        )
        dec = _gather_state(dec, rows, into=s.dec if self.in_place else None)  # the state follows its beams
        s.t.add_(1)
        return SearchState(s.last, dec, s.scores, s.done, s.t, s.fin)

    def retire(self, s: SearchState, gone: list[int], keep: list[int]) -> SearchState:
        """Eager only: file the finished lists of sentences `gone` and drop them from the batch
        (the history stays, indexed by original sentence)."""
        dev, K = s.scores.device, self.K
        gone_t, keep_t = torch.tensor(gone, device=dev), torch.tensor(keep, device=dev)
        for res, f in zip(self.result, s.fin):
            res.index_copy_(0, self.sent.index_select(0, gone_t), f.index_select(0, gone_t))
        rows = (keep_t.unsqueeze(-1) * K + torch.arange(K, device=dev)).view(-1)  # (n'*K,)
        self.memory, self.limit = self.memory.index_select(rows), self.limit.index_select(0, keep_t)
        self.sent = self.sent.index_select(0, keep_t)
        return SearchState(
            s.last.index_select(0, rows),
            s.dec.index_select(rows),
            s.scores.index_select(0, keep_t),
            s.done.index_select(0, keep_t),
            s.t,
            tuple(f.index_select(0, keep_t) for f in s.fin),
        )

    def finish(self) -> None:
        """File the finished lists of the sentences still in the batch."""
        for res, f in zip(self.result, self.state.fin):
            res.index_copy_(0, self.sent, f)

    def output(self, steps: int, n: int, src_lens: list[int]) -> SearchOutput:
        """Sentences [0, n): their finished hypotheses, rebuilt by following the back-pointers,
        all hypotheses at once: with our Triton gate cell on the device (`kernels/search_beam.py`,
        `backtrack`: one launch, then only the hypotheses' rows come back), else on the host
        (`reference.backtrack`, numpy)."""
        m = self.nbest
        score, logp = self.result[0][:n, :m].tolist(), self.result[1][:n, :m].tolist()  # (n, m)
        info = self.result[2][:n, :m].cpu().numpy()  # (n, m, 3): step it closed, beam, last token
        if self.memory.backend == "triton" and steps and _backtrack_kernel_takes(self.attn_hist):
            from .kernels import search_beam

            tok, attn = search_beam.backtrack(self.result[2], self.tok_hist, self.bp_hist, self.attn_hist, n, m, steps)
            tokens, a_np = tok.cpu().numpy(), attn.cpu().numpy()  # (n, m, L), (n, m, L, S)
        else:
            tokens, a_np = reference.backtrack(
                self.tok_hist[:steps, :n].cpu().numpy(),
                self.bp_hist[:steps, :n].cpu().numpy(),
                self.attn_hist[:steps, :n].cpu(),
                info,
            )
        tok_lists, end_list, last_list = tokens.tolist(), info[..., 0].tolist(), info[..., 2].tolist()
        out = SearchOutput([], [], [], [])
        for i in range(n):
            hyps = []
            for k in range(m):
                if not math.isfinite(score[i][k]):
                    break
                e, z = end_list[i][k], last_list[i][k]
                toks = tok_lists[i][k][:e] + ([] if z == self.eos else [z])
                # a view of the batch's (n, m, L, S) rows: what the n-best hold anyway, up to padding
                a = torch.from_numpy(a_np[i, k, : e + 1, : src_lens[i]])
                hyps.append(Hyp(toks, score[i][k], logp[i][k], a))
            if not hyps:  # cannot happen with a finite model; keep the output well-formed anyway
                hyps = [Hyp([], float("-inf"), float("-inf"), torch.zeros(0, src_lens[i]))]
            out.nbest.append(hyps)
            out.tokens.append(hyps[0].tokens), out.scores.append(hyps[0].score)
            out.attention.append(hyps[0].attention)
        return out


def _gather_state(dec: DecoderState, rows: Tensor, into: DecoderState | None = None) -> DecoderState:
    """dec.index_select(rows), written into `into`'s tensors (static CUDA-graph buffers, cast to
    their dtypes) or new ones: with our Triton kernels one launch for h and c of every layer and
    the feed (`search_beam.gather_rows`), else `reference.gather_rows`, one index_select each.
    An ensemble's state (mt.ensemble.EnsembleState): each member's so, its sizes its own."""
    from .kernels import search_beam

    parts = getattr(dec, "parts", None)
    if parts is not None:
        into_parts = into.parts if into is not None else [None] * len(parts)
        gathered = [_gather_state(d, rows, i) for d, i in zip(parts, into_parts, strict=True)]
        return into if into is not None else type(dec)(gathered)
    srcs = dec.tensors()
    dsts = into.tensors() if into is not None else [x.new_empty(len(rows), x.shape[1]) for x in srcs]
    if search_beam.gather_rows_supported(rows, srcs, dsts):
        search_beam.gather_rows(rows, srcs, dsts)
    else:
        reference.gather_rows(rows, srcs, dsts)
    return into if into is not None else dec.with_tensors(dsts)


def _backtrack_kernel_takes(attn_hist: Tensor) -> bool:
    from .kernels import search_beam  # imports Triton: only when the gate cell already runs on it

    return search_beam.backtrack_supported(attn_hist)


# ----------------------------------------------------------------------------- the loop
def _run(make, model: Seq2Seq, graphs, key: tuple, src: Tensor, src_len: Tensor, K: int, limit: Tensor, steps_max: int):
    """Encode src (n, S) with K rows per sentence (beam search: each sentence repeated K times),
    build the search with `make(memory, dec, limit, T)` and step it until every sentence is done
    (at most `steps_max` steps) -> (search, steps taken).

    Eager (no GraphedDecoder, CPU, gradients on): a host check after every step; beam search
    drops finished sentences from the batch then. With a GraphedDecoder on CUDA (or emulating):
    the encoder and the search live on static buffers padded to a bucket (n sentences ->
    graphs.rows_bucket(n), padded ones done from the start; source length ->
    graphs.length_bucket), the encoder is replayed once per batch and one captured step per
    position; the host checks every `graphs.sync_every` steps (extra steps change nothing: done
    sentences are frozen)."""
    n = src.shape[0]
    if graphs is None or not graphs.active(src.device):
        memory, dec = model.encode(src, src_len)
        if K > 1:
            rows = torch.arange(n, device=src.device).repeat_interleave(K)  # (n*K,) sentence of each beam row
            memory, dec = memory.index_select(rows), dec.index_select(rows)
        search = make(memory, dec, limit, steps_max)
        beam = isinstance(search, _BeamSearch)
        if beam:  # a host sync costs nothing on CPU; on a GPU it would be a second stall per step
            search.skip_idle_merge = memory.out.device.type == "cpu"
        steps = 0
        while steps < steps_max:
            search.state = search.step(model.decoder.step_logits, search.state)
            steps += 1
            done = search.state.done.tolist()
            if all(done):
                break
            if beam and any(done):
                search.state = search.retire(
                    search.state, [b for b, d in enumerate(done) if d], [b for b, d in enumerate(done) if not d]
                )
        if graphs is not None:
            graphs.stats["eager"] += steps
        return search, steps
    slot = graphs.slot(key, src, src_len, K, limit)
    if slot.search is None:
        # the longest limit any source of this bucket can have (a negative max_len_a: the shortest one's)
        T = int(max_lengths(torch.arange(1, slot.S + 1), *key[-2:]).max())
        slot.search = make(slot.memory, slot.dec, slot.limit, T)
        slot.search.in_place = True
    search = slot.search
    search.reset(n)
    steps = 0
    while steps < steps_max:
        graphs.replay(slot, lambda: search.state.copy_(search.step(model.decoder.step_logits, search.state)))
        steps += 1
        if steps % graphs.sync_every == 0 and bool(search.state.done.all()):
            break
    return search, steps


# ----------------------------------------------------------------------------- greedy
@torch.no_grad()
def greedy_search(
    model: Seq2Seq,
    src: Tensor,
    src_len: Tensor,
    bos_id: int,
    eos_id: int,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    graphs=None,
) -> SearchOutput:
    """Pick the most probable token at every step. src (B, S), src_len (B,)."""
    B = src.shape[0]
    limit = max_lengths(src_len, max_len_a, max_len_b)  # (B,)
    limits, banned = limit.tolist(), _banned(model, bos_id)

    def make(memory, dec, limit, T):
        return _GreedySearch(memory, dec, limit, T, bos_id, eos_id, banned)

    key = ("greedy", bos_id, eos_id, tuple(banned), max_len_a, max_len_b)
    search, steps = _run(make, model, graphs, key, src, src_len, 1, limit, max(limits))
    return search.output(steps, B, src_len.tolist(), limits)


# ----------------------------------------------------------------------------- beam
@torch.no_grad()
def beam_search(
    model: Seq2Seq,
    src: Tensor,
    src_len: Tensor,
    bos_id: int,
    eos_id: int,
    beam: int = 5,
    length_penalty: LengthPenalty = 1.0,
    nbest: int = 1,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    graphs=None,
) -> SearchOutput:
    """Batched beam search. src (B, S), src_len (B,) -> per sentence the `nbest` best finished
    hypotheses (ranked by log_prob / lp(len), see the module docstring), best first."""
    if beam < 1:
        raise MTError(f"beam must be >= 1 (got {beam})")
    if not 1 <= nbest <= beam:
        raise MTError(f"nbest must be between 1 and beam={beam} (got {nbest})")
    lp = parse_length_penalty(length_penalty)
    B, K = src.shape[0], beam
    limit = max_lengths(src_len, max_len_a, max_len_b)  # (B,)
    banned = _banned(model, bos_id)

    def make(memory, dec, limit, T):
        return _BeamSearch(memory, dec, limit, T, K, nbest, lp, bos_id, eos_id, banned)

    key = ("beam", K, nbest, lp, bos_id, eos_id, tuple(banned), max_len_a, max_len_b)
    search, steps = _run(make, model, graphs, key, src, src_len, K, limit, int(limit.max()))
    search.finish()
    return search.output(steps, B, src_len.tolist())


def search(
    model: Seq2Seq,
    src: Tensor,
    src_len: Tensor,
    bos_id: int,
    eos_id: int,
    beam: int = 1,
    length_penalty: LengthPenalty = None,
    nbest: int = 1,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    graphs=None,
) -> SearchOutput:
    """Greedy search when beam == 1 and there is no length penalty, beam search otherwise."""
    if beam == 1 and nbest == 1 and parse_length_penalty(length_penalty) is None:
        return greedy_search(model, src, src_len, bos_id, eos_id, max_len_a, max_len_b, graphs=graphs)
    return beam_search(
        model, src, src_len, bos_id, eos_id, beam, length_penalty, nbest, max_len_a, max_len_b, graphs=graphs
    )


# ----------------------------------------------------------------------------- whole splits
@torch.no_grad()
def decode_dataset(
    model: Seq2Seq,
    ds,
    tokenizer,
    device: torch.device,
    batch_size: int = 64,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    beam: int = 1,
    length_penalty: LengthPenalty = None,
    nbest: int = 1,
    graphs=None,
) -> SearchOutput:
    """Decode every row of a tokenized split (column `src_ids`; a dataset or a list of id lists)
    in batches of similar source length: greedy by default, beam search with `beam` > 1 or a
    length penalty. Results come back in the split's order. graphs: a GraphedDecoder, or None."""
    from .batching import collate

    was_training = model.training
    model.eval()
    # one conversion: indexing a datasets Column row by row reads Arrow each time, many times
    # slower over a validation split than converting it once
    src_ids = list(ds["src_ids"]) if not isinstance(ds, list) else ds
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    tokens: list = [None] * len(order)
    scores: list = [None] * len(order)
    attention: list = [None] * len(order)
    hyps: list = [None] * len(order)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate(
                [{"src_ids": src_ids[i], "tgt_ids": [], "idx": i} for i in idx],
                tokenizer.pad_id,
                tokenizer.bos_id,
                tokenizer.eos_id,
            ).to(device)
            out = search(
                model,
                batch.src,
                batch.src_len,
                tokenizer.bos_id,
                tokenizer.eos_id,
                beam,
                length_penalty,
                nbest,
                max_len_a,
                max_len_b,
                graphs=graphs,
            )
            for j, i in enumerate(idx):
                tokens[i], scores[i], attention[i] = out.tokens[j], out.scores[j], out.attention[j]
                hyps[i] = out.nbest[j]
    finally:
        model.train(was_training)
    return SearchOutput(tokens, scores, attention, hyps)


__all__ = [
    "Hyp",
    "SearchOutput",
    "greedy_search",
    "beam_search",
    "search",
    "decode_dataset",
    "parse_length_penalty",
    "length_penalty_factor",
    "normalized_score",
    "max_lengths",
]
