"""Score a checkpoint on a corpus split, or on a sacreBLEU test set, with sacreBLEU (`mt-evaluate`,
or `python -m mt.evaluate`).

    mt-evaluate checkpoint=PATH data.path=DIR split=test
    mt-evaluate checkpoint=PATH data.path=/path/to/multi30k split=test beam=5 length_penalty=1.0
    mt-evaluate checkpoint=PATH split=validation beam=1 length_penalty=null output_dir=OUT
    mt-evaluate checkpoint=USER/NAME revision=COMMIT data.path=DIR   # a model folder or Hub id
    mt-evaluate checkpoint=PATH testset=wmt14                   # newstest2014, the checkpoint's direction
    mt-evaluate checkpoint=PATH testset=wmt14 langpair=en-de
    mt-evaluate 'checkpoint=[CKPT_A,CKPT_B]' data.path=DIR       # an ensemble (mt/ensemble.py)

`checkpoint` is a checkpoint file, a model folder written by mt-export or a Hugging Face model id
(`Translator.load`); a list of them decodes as one ensemble (same tokenizer; `ensemble_combine=prob`
averages probabilities instead of log-probabilities; the first model supplies the settings below).
The checkpoint supplies the model, the SentencePiece models, the data config it was trained
with (`data.path`, `data.name`, `data.src`, `data.tgt` override it) and the recipe's decoding
settings `decoding.beam` / `decoding.length_penalty`, used unless `beam=` / `length_penalty=` say
otherwise. The split is decoded
(beam search, or greedy with beam=1 length_penalty=null) without any truncation, detokenized and
scored against the references: BLEU (cased, 13a), chrF and BLEU with lowercase=True, each with its
sacreBLEU signature. Writes, under the Hydra run directory (or `output_dir`):

    hypotheses.<split>.<tgt>   one detokenized translation per row of the split
    scores.<split>.json        scores, signatures and decoding settings

`testset=NAME` (instead of `split`) takes the sources and references from sacreBLEU's own copy of
a test set (`sacrebleu -t NAME`; wmt14 is newstest2014), in the direction `langpair=SRC-TGT`
(default: the checkpoint's data.src-data.tgt). sacreBLEU keeps test sets under $SACREBLEU
(default ~/.sacrebleu) and downloads a missing one there; offline, that folder must already hold
it. The outputs are named after the test set: hypotheses.<testset>.<tgt>, scores.<testset>.json.

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
from .errors import DataError, MTError, first_line
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
    # checkpoint file, model folder (mt-export) or Hugging Face model id USER/NAME; a list: an ensemble
    checkpoint: Any = MISSING
    ensemble_combine: str = "logprob"  # with a list: average the log-probabilities (logprob) or probabilities (prob)
    revision: str | None = None  # with a Hugging Face model id: branch, tag or commit (null = main)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    split: str | None = None  # test | validation | train (or an alias: valid, val, dev, ...); null = test
    # A sacreBLEU test set (wmt14 = newstest2014, ...) decoded and scored instead of a split of data.path
    testset: str | None = None
    langpair: str | None = None  # with testset: SRC-TGT; null = the checkpoint's data.src-data.tgt
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


@dataclass
class SacreBLEUTestSet:
    """A sacreBLEU test set in one direction: its files and their lines."""

    name: str  # sacreBLEU's name, e.g. "wmt14"
    langpair: str  # "en-de"
    source_file: str
    reference_files: list[str]
    sources: list[str]
    references: list[list[str]]  # one stream per reference file

    @property
    def src(self) -> str:
        return self.langpair.split("-", 1)[0]

    @property
    def tgt(self) -> str:
        return self.langpair.split("-", 1)[1]


def sacrebleu_langpairs(name: str) -> list[str]:
    """The language pairs sacreBLEU has for test set `name`; a one-line MTError listing the test
    sets it knows when it has no such set."""
    from sacrebleu.dataset import DATASETS
    from sacrebleu.version import __version__

    if name not in DATASETS:
        raise MTError(
            f"sacreBLEU {__version__} has no test set testset={name!r}; it has: {', '.join(sorted(DATASETS))}"
        )
    return list(DATASETS[name].langpairs)


def check_langpair(name: str, langpair: str) -> None:
    """One-line MTError unless `langpair` is SRC-TGT and test set `name` has it."""
    src, _, tgt = langpair.partition("-")
    if not src or not tgt:
        raise MTError(f"langpair={langpair!r}: write it as SRC-TGT, e.g. en-de")
    pairs = sacrebleu_langpairs(name)
    if langpair not in pairs:
        raise MTError(f"test set {name} has no language pair {langpair}; it has: {', '.join(pairs)}")


def load_testset(name: str, langpair: str) -> SacreBLEUTestSet:
    """Sources and references of sacreBLEU's test set `name` in direction `langpair`, read from the
    files sacreBLEU keeps in its cache folder ($SACREBLEU, default ~/.sacrebleu), as `sacrebleu -t`
    reads them (it downloads the set there first when missing). One-line MTError when the set is
    not in the cache and cannot be downloaded, or is unknown."""
    import sacrebleu.utils
    from sacrebleu.utils import get_reference_files, get_source_file, smart_open

    check_langpair(name, langpair)
    try:  # sacreBLEU downloads a missing set: offline that fails (an OSError, or sys.exit on some errors)
        source_file = get_source_file(name, langpair)
        reference_files = get_reference_files(name, langpair)
    except (Exception, SystemExit) as e:
        cache = sacrebleu.utils.SACREBLEU_DIR
        raise MTError(
            f"test set {name} ({langpair}) is not in sacreBLEU's cache {cache} (SACREBLEU_DIR: $SACREBLEU, "
            f"default ~/.sacrebleu) and could not be downloaded ({first_line(e)}); fetch it where the network "
            f"is reachable (sacrebleu -t {name} -l {langpair} --echo src > /dev/null), then copy that "
            f"machine's ~/.sacrebleu/{name} into {cache} or point SACREBLEU at a copy"
        ) from e
    with smart_open(source_file) as f:
        sources = [line.strip() for line in f]  # as sacreBLEU's Dataset.source()
    references = []
    for path in reference_files:
        with smart_open(path) as f:
            references.append([line.rstrip() for line in f])  # as the sacrebleu command reads them
    if not sources:
        raise DataError(f"test set {name} ({langpair}) is empty: {source_file}")
    for path, refs in zip(reference_files, references):
        if len(refs) != len(sources):
            raise DataError(
                f"test set {name} ({langpair}): {len(sources)} source lines in {source_file} but "
                f"{len(refs)} reference lines in {path}"
            )
    return SacreBLEUTestSet(name, langpair, source_file, list(reference_files), sources, references)


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
    more_refs: list[list[str]] | None = None,
) -> tuple[list[str], dict, float]:
    """Decode pre-encoded sources, detokenize, score against `refs` (and the further reference
    streams `more_refs`) -> (hypotheses, corpus_scores, decode seconds)."""
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
    return hyps, corpus_scores(hyps, refs, more_refs=more_refs or ()), seconds


def _check_testset_args(cfg: EvaluateConfig) -> None:
    """testset= replaces split= and data.path: one-line MTError when they are given together, or
    when the test set (or an explicit langpair) does not exist. Runs before the checkpoint loads."""
    if cfg.testset is None:
        if cfg.langpair is not None:
            raise MTError(f"langpair={cfg.langpair} goes with testset=NAME (a sacreBLEU test set)")
        return
    if cfg.split is not None:
        raise MTError(f"give split={cfg.split} or testset={cfg.testset}, not both")
    given = [f"data.{k}" for k in ("path", "name", "revision") if getattr(cfg.data, k) is not None]
    if given:
        raise MTError(f"testset={cfg.testset} reads sacreBLEU's files: {', '.join(given)} do not apply")
    sacrebleu_langpairs(cfg.testset)
    if cfg.langpair is not None:
        check_langpair(cfg.testset, cfg.langpair)


def _checkpoints(value: Any) -> list[str]:
    """checkpoint=PATH or checkpoint=[A,B,...] -> the list of sources (one-line MTError otherwise)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    # Hydra types an override's value: a path that reads as a number is one (checkpoint: Any)
    ok = (str, os.PathLike, int, float)
    if not items or not all(isinstance(x, ok) and not isinstance(x, bool) and str(x).strip() for x in items):
        raise MTError(f"checkpoint={value!r}: give a checkpoint, model folder or Hub id, or a list of them [A,B]")
    return [str(x) for x in items]


def evaluate(cfg: EvaluateConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Decode `cfg.split` (or the sacreBLEU test set `cfg.testset`) with the checkpoint, score it,
    write hypotheses and scores to `cfg.output_dir` or `out_dir`. Returns the scores dict (also
    written as JSON)."""
    from .translator import Translator, check_decoding

    out = Path(cfg.output_dir or out_dir)
    check_decoding(cfg.beam, cfg.length_penalty)  # a bad value fails before the checkpoint loads
    if cfg.batch_size < 1:
        raise MTError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    _check_testset_args(cfg)
    checkpoints = _checkpoints(cfg.checkpoint)
    tr = Translator.load(
        checkpoints,
        revision=cfg.revision,
        device=cfg.device,
        cell=cfg.cell,
        cuda_graphs=cfg.cuda_graphs,
        combine=cfg.ensemble_combine,
    )
    beam, lp = tr.decoding(cfg.beam, cfg.length_penalty)
    more_refs: list[list[str]] = []
    if cfg.testset is None:
        split = cfg.split or "test"
        data_cfg, srcs, refs = load_split(tr, cfg.data, split)
        name, src, tgt = split, data_cfg.src, data_cfg.tgt
        where: dict[str, Any] = {"data_path": data_cfg.path, "split": split}
        what = f"{data_cfg.path} split {split!r}"
    else:
        trained = tr.config.data
        langpair = cfg.langpair or f"{cfg.data.src or trained.src}-{cfg.data.tgt or trained.tgt}"
        ts = load_testset(cfg.testset, langpair)
        if (ts.src, ts.tgt) != (trained.src, trained.tgt):
            log.warning(
                "the checkpoint was trained on %s->%s, evaluating on %s->%s", trained.src, trained.tgt, ts.src, ts.tgt
            )
        srcs, refs, more_refs = ts.sources, ts.references[0], ts.references[1:]
        name, src, tgt = cfg.testset.replace("/", "_"), ts.src, ts.tgt
        where = {
            "data_path": None,
            "split": None,
            "testset": ts.name,
            "langpair": ts.langpair,
            "source_file": ts.source_file,
            "reference_files": ts.reference_files,
        }
        what = f"sacreBLEU test set {ts.name} ({len(ts.references)} reference(s))"
    src_ids = tr.tokenizer.encode_src(srcs)
    log.info(
        "evaluating %s on %s: %d sentences, %s->%s, beam %d, length penalty %s, device %s",
        checkpoints[0] if len(checkpoints) == 1 else f"an ensemble of {checkpoints} ({cfg.ensemble_combine})",
        what,
        len(srcs),
        src,
        tgt,
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
        more_refs=more_refs,
    )

    out.mkdir(parents=True, exist_ok=True)
    hyp_path = out / f"hypotheses.{name}.{tgt}"
    hyp_path.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    result: dict[str, Any] = {
        **scores,
        "checkpoint": checkpoints[0] if len(checkpoints) == 1 else checkpoints,
        **({"ensemble_combine": cfg.ensemble_combine} if len(checkpoints) > 1 else {}),
        **where,
        "src": src,
        "tgt": tgt,
        "sentences": len(hyps),
        "beam": beam,
        "length_penalty": lp,
        "max_len_a": cfg.max_len_a,
        "max_len_b": cfg.max_len_b,
        "device": str(tr.device),
        "decode_seconds": round(seconds, 3),
        "hypotheses": str(hyp_path),
    }
    score_path = out / f"scores.{name}.json"
    score_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    result["scores_path"] = str(score_path)
    return result


def format_scores(r: dict[str, Any]) -> str:
    return (
        f"BLEU = {r['bleu']:.2f}  chrF = {r['chrf']:.2f}  BLEU(lc) = {r['bleu_lc']:.2f}  "
        f"({r['sentences']} sentences, {r.get('testset') or r['split']}, {r['src']}->{r['tgt']}, beam {r['beam']})\n"
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
