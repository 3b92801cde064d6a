"""Corpus-level scores with sacreBLEU on detokenized text (never subword pieces, never averaged
sentence scores): BLEU (cased, 13a), chrF, and BLEU with lowercase=True ("case:lc") for comparison
with the lowercased numbers usually published for Multi30k."""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF


def corpus_scores(hyps: list[str], refs: list[str]) -> dict:
    """-> {"bleu", "chrf", "bleu_lc"} scores and their sacreBLEU signatures."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    bleu, chrf, bleu_lc = BLEU(), CHRF(), BLEU(lowercase=True)
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    lc = bleu_lc.corpus_score(hyps, [refs])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_lc": lc.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_lc_signature": str(bleu_lc.get_signature()),
        "bleu_detail": str(b),
    }
