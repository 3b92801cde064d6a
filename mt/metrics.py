"""Corpus-level scores with sacreBLEU on detokenized text (never subword pieces, never averaged
sentence scores): BLEU (cased, 13a), chrF, and BLEU with lowercase=True ("case:lc") for comparison
with the lowercased numbers usually published for Multi30k."""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

# name -> the sacreBLEU metric object that computes it
METRICS = {"bleu": BLEU, "chrf": CHRF, "bleu_lc": lambda: BLEU(lowercase=True)}


def corpus_scores(
    hyps: list[str],
    refs: list[str],
    names: tuple[str, ...] = ("bleu", "chrf", "bleu_lc"),
    *,
    more_refs: Sequence[Sequence[str]] = (),
) -> dict:
    """-> {name: score, name + "_signature": sacreBLEU's signature} for each of `names`
    (default: all three), and "bleu_detail" (sacreBLEU's BLEU line) when BLEU is among them.
    `more_refs`: further reference streams (a test set with several references), one line per
    hypothesis each. mt.train scores BLEU at once (it decides the best checkpoint) and the others
    in the background."""
    streams = [refs, *more_refs]
    for stream in streams:
        if len(hyps) != len(stream):
            raise ValueError(f"{len(hyps)} hypotheses for {len(stream)} references")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    out: dict = {}
    for name in names:
        metric = METRICS[name]()
        result = metric.corpus_score(hyps, streams)
        out[name] = result.score
        out[f"{name}_signature"] = str(metric.get_signature())
        if name == "bleu":
            out["bleu_detail"] = str(result)
    return out
