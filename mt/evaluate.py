"""Score a checkpoint on a corpus split with sacreBLEU (`mt-evaluate`, or `python -m mt.evaluate`).

    mt-evaluate checkpoint=PATH data.path=DIR split=test
    mt-evaluate checkpoint=PATH data.path=/path/to/multi30k split=test beam=5 length_penalty=1.0
    mt-evaluate checkpoint=PATH split=validation beam=1 length_penalty=null output_dir=OUT
    mt-evaluate checkpoint=USER/NAME revision=COMMIT data.path=DIR   # a model folder or Hub id

`checkpoint` is a checkpoint file, a model folder written by mt-export or a Hugging Face model id
(`Translator.load`). The checkpoint supplies the model, the SentencePiece models, the data config it was trained
with (`data.path`, `data.name`, `data.src`, `data.tgt` override it) and the recipe's decoding
settings `decoding.beam` / `decoding.length_penalty`, used unless `beam=` / `length_penalty=` say
otherwise. The split is decoded
(beam search, or greedy with beam=1 length_penalty=null) without any truncation, detokenized and
scored against the references: BLEU (cased, 13a), chrF and BLEU with lowercase=True, each with its
sacreBLEU signature. Writes, under the Hydra run directory (or `output_dir`):

    hypotheses.<split>.<tgt>   one detokenized translation per row of the split
    scores.<split>.json        scores, signatures and decoding settings

`main` is a thin Hydra wrapper; `evaluate(config, out_dir)` is a plain function tests call.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .config import CONF_DIR
from .errors import DataError, MTError
from .metrics import corpus_scores

log = logging.getLogger("mt.evaluate")


@dataclass
class EvalDataConfig:
    """Overrides of the checkpoint's data config (null = keep the checkpoint's)."""

    path: str | None = None
    name: str | None = None
    revision: str | None = None
    src: str | None = None
    tgt: str | None = None


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING  # checkpoint file, model folder (mt-export) or Hugging Face model id USER/NAME
    revision: str | None = None  # with a Hugging Face model id: branch, tag or commit (null = main)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    split: str = "test"  # test | validation | train (or an alias: valid, val, dev, ...)
    beam: int | None = None  # null = the checkpoint's decoding.beam
    # GNMT alpha, "avg" (mean log-prob), null / 0 (none), or "checkpoint": the checkpoint's decoding.length_penalty
    length_penalty: Any = "checkpoint"
    max_len_a: float = 1.5  # output length limit: a * src_len + b (src_len counts EOS)
    max_len_b: int = 10
    batch_size: int = 64  # sentences per decoding batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cell: str | None = None  # gate-cell backend (auto | torch | triton | cudnn); null = the checkpoint's
    cuda_graphs: str = "auto"  # auto (on with CUDA) | true | false: search steps replayed from CUDA graphs
    output_dir: str | None = None  # default: the Hydra run directory


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


register_configs()

_ROLES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "development"),
    "test": ("test", "testing"),
}


def _split_role(split: str, data_cfg) -> tuple[str, Any]:
    """(role, data config) that makes `mt.data.load_splits` return `split` under that role.
    Only the role names and their aliases are accepted: load_splits falls back from a requested
    name to the aliases, so an arbitrary name could silently evaluate another split."""
    for role, aliases in _ROLES.items():
        if split in aliases:
            key = {"train": "train_split", "validation": "valid_split", "test": "test_split"}[role]
            return role, replace(data_cfg, **{key: split})
    names = ", ".join(a for aliases in _ROLES.values() for a in aliases)
    raise MTError(f"split={split!r}: use one of {names}")


def load_split(tr, data: EvalDataConfig, split: str):
    """(data config, sources, references) of `split`, the checkpoint's data config overridden by
    the non-null fields of `data`. One-line DataError / MTError on a missing or empty split."""
    from .data import load_splits

    overrides = {k: v for k, v in vars(data).items() if v is not None}
    data_cfg = replace(tr.config.data, **overrides, max_train_examples=None, max_valid_examples=None)
    if (data_cfg.src, data_cfg.tgt) != (tr.config.data.src, tr.config.data.tgt):
        log.warning(
            "the checkpoint was trained on %s->%s, evaluating on %s->%s",
            tr.config.data.src,
            tr.config.data.tgt,
            data_cfg.src,
            data_cfg.tgt,
        )
    role, data_cfg = _split_role(split, data_cfg)
    splits = load_splits(data_cfg, roles=(role,))
    if role not in splits:
        raise DataError(f"no split {split!r} in {data_cfg.path}")
    ds = splits[role]
    srcs, refs = list(ds["src"]), list(ds["tgt"])
    if not srcs:
        raise DataError(f"split {split!r} of {data_cfg.path} is empty")
    return data_cfg, srcs, refs


def decode_and_score(
    tr,
    src_ids: list[list[int]],
    refs: list[str],
    *,
    beam: int,
    length_penalty,
    batch_size: int,
    max_len_a: float,
    max_len_b: int,
) -> tuple[list[str], dict, float]:
    """Decode pre-encoded sources, detokenize, score -> (hypotheses, corpus_scores, decode seconds)."""
    import torch

    from .search import decode_dataset

    t0 = time.perf_counter()
    decoded = decode_dataset(
        tr.model,
        src_ids,
        tr.tokenizer,
        tr.device,
        batch_size=batch_size,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        beam=beam,
        length_penalty=length_penalty,
        graphs=tr.graphs,
    )
    if tr.device.type == "cuda":
        torch.cuda.synchronize(tr.device)
    seconds = time.perf_counter() - t0
    hyps = [h.replace("\r", " ").replace("\n", " ") for h in tr.tokenizer.decode_tgt(decoded.tokens)]
    return hyps, corpus_scores(hyps, refs), seconds


def evaluate(cfg: EvaluateConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Decode `cfg.split` with the checkpoint, score it, write hypotheses and scores to
    `cfg.output_dir` or `out_dir`. Returns the scores dict (also written as JSON)."""
    from .translator import Translator, check_decoding

    out = Path(cfg.output_dir or out_dir)
    check_decoding(cfg.beam, cfg.length_penalty)  # a bad value fails before the checkpoint loads
    if cfg.batch_size < 1:
        raise MTError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    tr = Translator.load(
        cfg.checkpoint, revision=cfg.revision, device=cfg.device, cell=cfg.cell, cuda_graphs=cfg.cuda_graphs
    )
    beam, lp = tr.decoding(cfg.beam, cfg.length_penalty)
    data_cfg, srcs, refs = load_split(tr, cfg.data, cfg.split)
    src_ids = tr.tokenizer.encode_src(srcs)
    log.info(
        "evaluating %s on %s split %r: %d sentences, %s->%s, beam %d, length penalty %s, device %s",
        cfg.checkpoint,
        data_cfg.path,
        cfg.split,
        len(srcs),
        data_cfg.src,
        data_cfg.tgt,
        beam,
        lp,
        tr.device,
    )
    hyps, scores, seconds = decode_and_score(
        tr,
        src_ids,
        refs,
        beam=beam,
        length_penalty=lp,
        batch_size=cfg.batch_size,
        max_len_a=cfg.max_len_a,
        max_len_b=cfg.max_len_b,
    )

    out.mkdir(parents=True, exist_ok=True)
    hyp_path = out / f"hypotheses.{cfg.split}.{data_cfg.tgt}"
    hyp_path.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    result: dict[str, Any] = {
        **scores,
        "checkpoint": str(cfg.checkpoint),
        "data_path": data_cfg.path,
        "split": cfg.split,
        "src": data_cfg.src,
        "tgt": data_cfg.tgt,
        "sentences": len(hyps),
        "beam": beam,
        "length_penalty": lp,
        "max_len_a": cfg.max_len_a,
        "max_len_b": cfg.max_len_b,
        "device": str(tr.device),
        "decode_seconds": round(seconds, 3),
        "hypotheses": str(hyp_path),
    }
    score_path = out / f"scores.{cfg.split}.json"
    score_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    result["scores_path"] = str(score_path)
    return result


def format_scores(r: dict[str, Any]) -> str:
    return (
        f"BLEU = {r['bleu']:.2f}  chrF = {r['chrf']:.2f}  BLEU(lc) = {r['bleu_lc']:.2f}  "
        f"({r['sentences']} sentences, {r['split']}, {r['src']}->{r['tgt']}, beam {r['beam']})\n"
        f"  {r['bleu_detail']}\n"
        f"  BLEU signature:     {r['bleu_signature']}\n"
        f"  chrF signature:     {r['chrf_signature']}\n"
        f"  BLEU(lc) signature: {r['bleu_lc_signature']}"
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(dcfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg: EvaluateConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        result = evaluate(cfg, HydraConfig.get().runtime.output_dir)
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key}=... is required (mt-evaluate checkpoint=PATH ...)", file=sys.stderr)
        sys.exit(2)
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_scores(result))
    log.info("wrote %s and %s", result["hypotheses"], result["scores_path"])
    return result["bleu"]


if __name__ == "__main__":
    main()
