"""Corpus loading and preparation: any parallel corpus -> tokenized, filtered (src, tgt) tables.

`load_splits` accepts what `datasets.load_dataset` accepts (a hub id, a local folder of
train/validation/test jsonl/json/csv/parquet files), plus local folders of parallel text files
(``train.de`` + ``train.en``, one sentence per line) and tab-separated files (``train.tsv``),
read a chunk at a time into memory-mapped Arrow files (`mt/corpus_files.py`).
Rows may be flat (``{"de": .., "en": ..}``) or nested (``{"translation": {"de": .., "en": ..}}``);
every split comes back with exactly two string columns, ``src`` and ``tgt``.

`prepare_corpus` drops empty training pairs, trains (or loads) the SentencePiece tokenizer on the
training split, tokenizes every split with `datasets.map` (cached by `datasets` when the corpus
lives in Arrow files) and drops over-long / badly length-matched training pairs. Validation and
test keep every row: they are scored.

Everything a user can get wrong raises `DataError` with a one-line message saying what to do.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mt import corpus_files
from mt.batching import iter_columns
from mt.config import DataConfig, TokenizerConfig
from mt.errors import DataError, first_line
from mt.tokenizer import TextChunks, Tokenizer, sample_rows, train_tokenizer

__all__ = ["Corpus", "load_splits", "prepare_corpus", "default_cache_dir"]

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "development"),
    "test": ("test", "testing"),
}
LOCAL_HINT = "data.path=/path/to/multi30k"  # a folder of train/validation/test jsonl files
# Extensions `datasets` reads itself; anything else after "train." is taken as a language code.
_DATA_EXTS = {
    "json", "jsonl", "ndjson", "csv", "tsv", "parquet", "arrow", "txt", "zip", "gz", "md",
    "py", "lock", "yaml", "yml", "xml", "model", "vocab",
}  # fmt: skip
_TEXT_CHUNK = 65_536  # sentences read from Arrow at a time for the tokenizer
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ======================================================================== reading local files
def _split_candidates(role: str, cfg: DataConfig) -> list[str]:
    first = {"train": cfg.train_split, "validation": cfg.valid_split, "test": cfg.test_split}[role]
    out = [first] if first else []
    out += [a for a in SPLIT_ALIASES[role] if a not in out]
    return out


def _text_languages(folder: Path) -> dict[str, set[str]]:
    """{split stem: {language suffixes}} for files named <stem>.<lang> (not data extensions)."""
    found: dict[str, set[str]] = {}
    for p in folder.iterdir():
        if not p.is_file() or p.name.startswith("."):
            continue
        stem, dot, suffix = p.name.rpartition(".")
        if not dot or not stem or suffix.lower() in _DATA_EXTS:
            continue
        found.setdefault(stem, set()).add(suffix)
    return found


def _load_parallel_text(folder: Path, cfg: DataConfig) -> dict[str, datasets.Dataset]:
    langs = _text_languages(folder)
    out: dict[str, datasets.Dataset] = {}
    for role in ("train", "validation", "test"):
        stem = next((c for c in _split_candidates(role, cfg) if c in langs), None)
        if stem is None:
            continue
        have = langs[stem]
        for lang in (cfg.src, cfg.tgt):
            if lang not in have:
                raise DataError(
                    f"no file {folder / f'{stem}.{lang}'} for language '{lang}'; "
                    f"found {stem}.{{{','.join(sorted(have))}}}: set data.src/data.tgt to one of "
                    f"{', '.join(sorted(have))}"
                )
        src_file, tgt_file = folder / f"{stem}.{cfg.src}", folder / f"{stem}.{cfg.tgt}"
        out[role] = corpus_files.read_parallel_text(src_file, tgt_file, default_cache_dir(cfg))
    return out


def _read_tsv(path: Path, cfg: DataConfig) -> datasets.Dataset:
    return corpus_files.read_tsv(path, cfg.src, cfg.tgt, default_cache_dir(cfg))


def _tsv_files(folder: Path, cfg: DataConfig) -> dict[str, Path]:
    out = {}
    for role in ("train", "validation", "test"):
        for cand in _split_candidates(role, cfg):
            p = folder / f"{cand}.tsv"
            if p.is_file():
                out[role] = p
                break
    return out


# ============================================================================= normalizing
def _pick(available: Sequence[str], role: str, cfg: DataConfig) -> str | None:
    return next((c for c in _split_candidates(role, cfg) if c in available), None)


def _null_to_empty(batch: dict[str, list]) -> dict[str, list]:
    return {k: ["" if v is None else v for v in vals] for k, vals in batch.items()}


def _extract_translation(batch: dict[str, list], src: str, tgt: str) -> dict[str, list]:
    pairs = batch["translation"]
    return {
        "src": [(p or {}).get(src) or "" for p in pairs],
        "tgt": [(p or {}).get(tgt) or "" for p in pairs],
    }


def _normalize(ds: datasets.Dataset, cfg: DataConfig, where: str) -> datasets.Dataset:
    """Reduce one split to exactly two string columns, src and tgt."""
    cols = ds.column_names
    if cfg.src in cols and cfg.tgt in cols:
        ds = ds.select_columns([cfg.src, cfg.tgt])
        for name in (cfg.src, cfg.tgt):
            if ds.features[name] != datasets.Value("string"):
                ds = ds.cast_column(name, datasets.Value("string"))
        mapping = {cfg.src: "src", cfg.tgt: "tgt"}
        if any(k != v for k, v in mapping.items()):
            ds = ds.rename_columns({k: v for k, v in mapping.items() if k != v})
        if any(ds.data.column(c).null_count for c in ("src", "tgt")):
            ds = ds.map(_null_to_empty, batched=True, desc="replacing missing text")
        return ds
    if "translation" in cols:
        feat = ds.features["translation"]
        langs = list(getattr(feat, "languages", None) or (feat.keys() if isinstance(feat, dict) else []))
        for lang in (cfg.src, cfg.tgt):
            if langs and lang not in langs:
                raise DataError(
                    f"language '{lang}' not found in {where}: its 'translation' column has "
                    f"languages {', '.join(langs)}; set data.src/data.tgt to one of them"
                )
        return ds.map(
            _extract_translation,
            batched=True,
            remove_columns=cols,
            fn_kwargs={"src": cfg.src, "tgt": cfg.tgt},
            features=datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")}),
            desc="flattening translation pairs",
        )
    missing = cfg.src if cfg.src not in cols else cfg.tgt
    raise DataError(
        f"language column '{missing}' not found in {where}; it has columns "
        f"{', '.join(cols)}: set data.src/data.tgt to one of them"
    )


# ================================================================================= loading
def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and ".." not in path and not path.startswith(("~", "."))


_TEXT_EXTS = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".txt")


def _bad_utf8_error(local: Path, detail: str) -> DataError:
    """Name the text file and line holding invalid UTF-8 (rescans the files), else the detail."""
    files = [local] if local.is_file() else sorted(local.rglob("*"))
    for f in files:
        if f.is_file() and f.suffix.lower() in _TEXT_EXTS:
            corpus_files.find_bad_utf8(f)  # raises DataError("<file>: line N is not valid UTF-8 ...")
    return DataError(f"{local}: invalid UTF-8 in the data ({detail}); re-encode it as UTF-8")


def _wrap_local_error(local: Path, e: Exception) -> DataError:
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            return _bad_utf8_error(local, first_line(cause))
        cause = cause.__cause__ or cause.__context__
    return DataError(f"cannot load the data files in {local}: {type(e).__name__}: {first_line(e)}")


def _check_utf8(ds: datasets.Dataset, local: Path) -> None:
    """Arrow's JSON reader lets invalid UTF-8 through; catch it here, not deep in training."""
    try:
        ds.data.validate(full=True)
    except pa.ArrowInvalid as e:
        raise _bad_utf8_error(local, first_line(e)) from None


_JSON_EXTS = (".jsonl", ".json", ".ndjson")


def _null_count(ds: datasets.Dataset, lang: str) -> int:
    """Rows whose `lang` text is null: a flat column `lang` or the field of a 'translation' struct."""
    table = ds.data.table
    if lang in table.column_names:
        return table.column(lang).null_count
    if "translation" in table.column_names and pa.types.is_struct(table.schema.field("translation").type):
        column = table.column("translation")
        if column.type.get_field_index(lang) < 0:
            return 0  # _normalize names the missing language
        return pc.struct_field(column, lang).null_count  # a null struct counts too
    return 0


def _check_json_keys(ds: datasets.Dataset, local: Path, role: str, langs: Sequence[str]) -> None:
    """A JSON row without one of the languages is an error naming its file and line.

    Arrow reads a missing key as null, like an explicit ``null``: only when the split has nulls are
    its JSON files read again, line by line, for the first row that lacks the key (an explicit
    ``null`` still reads as an empty side, as an empty CSV cell does)."""
    missing = [lang for lang in langs if _null_count(ds, lang)]
    if not missing:
        return
    if local.is_file():
        files = [local] if local.suffix.lower() in _JSON_EXTS else []
    else:
        found = [f for f in sorted(local.rglob("*")) if f.is_file() and f.suffix.lower() in _JSON_EXTS]
        aliases = SPLIT_ALIASES[role]
        files = sorted(found, key=lambda f: not f.name.lower().startswith(aliases))  # this split's first
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as lines:
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # a .json file that is one document, not a row a line: not ours to report
                if not isinstance(row, dict):
                    break
                pair = row["translation"] if isinstance(row.get("translation"), dict) else row
                absent = [lang for lang in missing if lang not in pair]
                if absent:
                    raise DataError(
                        f"{f}: line {lineno} has no '{absent[0]}' key; every row needs both "
                        f"'{langs[0]}' and '{langs[1]}' (an empty string for an empty side)"
                    )


def _load_with_datasets(cfg: DataConfig, local: Path | None) -> datasets.DatasetDict:
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    path = cfg.path
    try:
        if local is not None:
            if local.is_file():
                ext = local.suffix.lstrip(".").lower()
                builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
                if builder is None:
                    raise DataError(
                        f"cannot read {local}: unsupported file type; use .jsonl/.json/.csv/"
                        f".parquet/.tsv or a folder of parallel text files (train.de + train.en)"
                    )
                return datasets.load_dataset(builder, data_files={"train": str(local)})
            return datasets.load_dataset(str(local), name=cfg.name, revision=cfg.revision)
        return datasets.load_dataset(path, name=cfg.name, revision=cfg.revision)
    except DataError:
        raise
    except ConnectionError:
        raise DataError(
            f"cannot reach the Hugging Face Hub for '{path}' (offline?); point data.path at a "
            f"local copy, e.g. {LOCAL_HINT}"
        ) from None
    except (DataFilesNotFoundError, EmptyDatasetError) as e:
        if local is not None:
            raise DataError(
                f"no data files found in {local}: expected train/validation/test .jsonl/.json/"
                f".csv/.parquet/.tsv files or parallel text files (train.{cfg.src} + "
                f"train.{cfg.tgt})"
            ) from None
        raise DataError(f"dataset '{path}' has no data files: {first_line(e)}") from None
    except DatasetNotFoundError:
        raise DataError(
            f"dataset '{path}' not found on the Hugging Face Hub and no local folder "
            f"'{path}' exists; check data.path (e.g. {LOCAL_HINT})"
        ) from None
    except Exception as e:
        if local is not None:
            raise _wrap_local_error(local, e) from e
        if isinstance(e, ValueError):  # e.g. a wrong or missing configuration name (data.name)
            raise DataError(f"cannot load '{path}' (data.name={cfg.name!r}): {first_line(e)}") from None
        raise


def load_splits(cfg: DataConfig, roles: Sequence[str] = ("train", "validation", "test")) -> dict[str, datasets.Dataset]:
    """The corpus as {"train", "validation"?, "test"?} -> Dataset with string columns src, tgt.

    Only `roles` are normalized and returned; "train" is required when it is asked for
    (evaluation asks for one split and needs no training data)."""
    if cfg.src == cfg.tgt:
        raise DataError(f"data.src and data.tgt are both '{cfg.src}'; choose two languages")
    path = str(cfg.path)
    local = Path(path).expanduser()
    raw: dict[str, datasets.Dataset]
    normalized = False  # text and TSV readers already produce (src, tgt)
    if local.is_dir():
        where = str(local)
        stems = list(_text_languages(local))
        if any(_pick(stems, role, cfg) for role in SPLIT_ALIASES):
            raw, normalized = _load_parallel_text(local, cfg), True
        elif tsv := _tsv_files(local, cfg):
            raw, normalized = {role: _read_tsv(p, cfg) for role, p in tsv.items()}, True
        else:
            raw = _select_roles(_load_with_datasets(cfg, local), cfg, where, roles)
            for role, ds in raw.items():
                _check_utf8(ds, local)
                _check_json_keys(ds, local, role, (cfg.src, cfg.tgt))
    elif local.is_file():
        where = str(local)
        if local.suffix.lower() == ".tsv":
            raw, normalized = {"train": _read_tsv(local, cfg)}, True
        else:
            raw = _select_roles(_load_with_datasets(cfg, local), cfg, where, roles)
            for role, ds in raw.items():
                _check_utf8(ds, local)
                _check_json_keys(ds, local, role, (cfg.src, cfg.tgt))
    elif _looks_like_hub_id(path):
        where = f"'{path}'"
        raw = _select_roles(_load_with_datasets(cfg, None), cfg, where, roles)
    else:
        raise DataError(
            f"data.path '{path}' does not exist (resolved to {local.resolve()}) and is not a "
            f"Hugging Face Hub id; point it at a local folder or a hub dataset, e.g. {LOCAL_HINT}"
        )
    if "train" in roles and "train" not in raw:
        raise DataError(
            f"no training split in {where}: expected a split named "
            f"{' or '.join(repr(c) for c in _split_candidates('train', cfg))}"
            f" (set data.train_split)"
        )
    out: dict[str, datasets.Dataset] = {}
    for role in ("train", "validation", "test"):
        if role in raw and role in roles:
            ds = raw[role]
            out[role] = ds if normalized else _normalize(ds, cfg, f"{where} (split '{role}')")
    limits = {"train": cfg.max_train_examples, "validation": cfg.max_valid_examples}
    for role, limit in limits.items():
        if role in out and limit is not None and 0 <= limit < len(out[role]):
            out[role] = out[role].select(range(limit))
    return out


def _select_roles(dd: Any, cfg: DataConfig, where: str, roles: Sequence[str]) -> dict[str, datasets.Dataset]:
    if isinstance(dd, datasets.Dataset):
        dd = datasets.DatasetDict({"train": dd})
    names = list(dd.keys())
    out: dict[str, datasets.Dataset] = {}
    for role in ("train", "validation", "test"):
        name = _pick(names, role, cfg)
        if name is not None:
            out[role] = dd[name]
    if "train" in roles and "train" not in out:
        raise DataError(
            f"no training split in {where}: it has splits {', '.join(names)} (set data.train_split to one of them)"
        )
    return out


# =============================================================================== preparing
@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: datasets.Dataset
    valid: datasets.Dataset | None
    test: datasets.Dataset | None
    stats: dict = field(default_factory=dict)


def default_cache_dir(data_cfg: DataConfig) -> Path:
    """data.cache_dir, else $XDG_CACHE_HOME/mt, else ~/.cache/mt."""
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mt"


def _nonempty(src: list[str], tgt: list[str]) -> list[bool]:
    return [bool(s and s.strip()) and bool(t and t.strip()) for s, t in zip(src, tgt)]


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    return {
        "src_ids": tokenizer.encode_src(batch["src"]),
        "tgt_ids": tokenizer.encode_tgt(batch["tgt"]),
    }


# Drop reasons, checked in this order (a pair is counted under the first that applies).
_REASONS = ("src_len", "tgt_len", "ratio")


def length_filter_codes(ls: np.ndarray, lt: np.ndarray, max_src: int, max_tgt: int, ratio: float) -> np.ndarray:
    """0 = keep, k = dropped for _REASONS[k-1]. Lengths are subword tokens without eos."""
    ls, lt = np.asarray(ls, dtype=np.int64), np.asarray(lt, dtype=np.int64)
    code = np.zeros(len(ls), dtype=np.int8)
    if ratio and ratio > 0:
        r = np.maximum(ls, lt) / np.maximum(1, np.minimum(ls, lt))
        code[r > ratio] = 3
    if max_tgt and max_tgt > 0:
        code[lt > max_tgt] = 2
    if max_src and max_src > 0:
        code[ls > max_src] = 1
    return code


def _list_lengths(ds: datasets.Dataset, column: str) -> np.ndarray:
    """(N,) lengths of a list column, read a chunk of rows at a time."""
    parts = [pc.list_value_length(t[column]).to_numpy(zero_copy_only=False) for t in iter_columns(ds, [column])]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _texts(ds: datasets.Dataset, column: str) -> TextChunks:
    """A string column as `TextChunks` of Arrow arrays, read a chunk at a time whenever they are read."""

    def chunks() -> Iterator[pa.Array]:
        for t in iter_columns(ds, [column], rows=_TEXT_CHUNK):
            yield t.column(0).combine_chunks()

    return TextChunks(len(ds), chunks)


def _tokenizer_sample(train: datasets.Dataset, tok_cfg: TokenizerConfig) -> datasets.Dataset:
    """The training pairs SentencePiece learns from: all of them, or a seeded random sample when
    their sentences exceed tokenizer.input_sentence_size. SentencePiece would sample as many
    itself, but only after every sentence had been copied into Python and into its own memory."""
    size, per_pair = tok_cfg.input_sentence_size, 2 if tok_cfg.joint else 1
    rows = sample_rows(len(train), size // per_pair, tok_cfg.seed)
    return train if rows is None else train.select(rows)


def _num_proc(data_cfg: DataConfig, n_pairs: int) -> int | None:
    """data.num_proc, or by default one process per CPU (up to 8) for corpora of 200k pairs and
    more: below that, starting the processes costs more than it saves."""
    n = data_cfg.num_proc
    if n is None:
        n = min(8, os.cpu_count() or 1) if n_pairs >= 200_000 else 1
    return n if n > 1 else None


class _Stages:
    """One log line per preparation stage, with its time; tqdm bars only where asked (default: a TTY)."""

    def __init__(self, log: Callable[[str], Any], progress: bool | None) -> None:
        self.log, self.start = log, time.perf_counter()
        self.progress = sys.stderr.isatty() if progress is None else progress

    def __enter__(self) -> _Stages:
        self.bars_were_on = datasets.is_progress_bar_enabled()
        (datasets.enable_progress_bars if self.progress else datasets.disable_progress_bars)()
        return self

    def __exit__(self, *exc: Any) -> None:
        (datasets.enable_progress_bars if self.bars_were_on else datasets.disable_progress_bars)()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        self.log(f"data: {what} in {now - self.start:.1f}s")
        self.start = now


def prepare_corpus(
    data_cfg: DataConfig,
    tok_cfg: TokenizerConfig,
    cache_dir: Path,
    log: Callable[[str], Any] = print,
    tokenizer: Tokenizer | None = None,
    progress: bool | None = None,
) -> Corpus:
    """Load, clean, tokenize and filter the corpus (see the module docstring)."""
    with _Stages(log, progress) as stages:
        return _prepare(data_cfg, tok_cfg, cache_dir, log, tokenizer, stages)


def _prepare(
    data_cfg: DataConfig,
    tok_cfg: TokenizerConfig,
    cache_dir: Path,
    log: Callable[[str], Any],
    tokenizer: Tokenizer | None,
    stages: _Stages,
) -> Corpus:
    splits = load_splits(data_cfg)
    stats: dict[str, Any] = {}
    train = splits["train"]
    stats["train_raw"] = len(train)
    nproc = _num_proc(data_cfg, len(train))
    stages.done(f"read {len(train)} training pairs")
    train = train.filter(
        _nonempty,
        batched=True,
        input_columns=["src", "tgt"],
        num_proc=nproc,
        desc="dropping empty pairs",
    )
    stats["dropped_empty"] = stats["train_raw"] - len(train)
    if len(train) == 0:
        raise DataError(f"the training split of {data_cfg.path} has no non-empty sentence pairs")
    stages.done(f"dropped {stats['dropped_empty']} empty pairs")

    if tokenizer is None:
        sample = _tokenizer_sample(train, tok_cfg)
        tokenizer = train_tokenizer(tok_cfg, _texts(sample, "src"), _texts(sample, "tgt"), Path(cache_dir), log=log)
        del sample
        stages.done("tokenizer ready")
    else:
        log(f"tokenizer: using the given tokenizer ({tokenizer!r})")

    def tokenize(ds: datasets.Dataset, role: str) -> datasets.Dataset:
        features = ds.features.copy()
        features["src_ids"] = datasets.List(datasets.Value("int32"))
        features["tgt_ids"] = datasets.List(datasets.Value("int32"))
        return ds.map(
            _encode_batch,
            batched=True,
            num_proc=nproc if role == "train" else None,
            fn_kwargs={"tokenizer": tokenizer},
            features=features,
            desc=f"tokenizing {role}",
        )

    train = tokenize(train, "train")
    valid = tokenize(splits["validation"], "validation") if "validation" in splits else None
    test = tokenize(splits["test"], "test") if "test" in splits else None
    stages.done(f"tokenized with {nproc or 1} process(es)")

    limits = (data_cfg.max_src_len, data_cfg.max_tgt_len, data_cfg.max_len_ratio)
    src_lens, tgt_lens = _list_lengths(train, "src_ids"), _list_lengths(train, "tgt_ids")
    codes = length_filter_codes(src_lens, tgt_lens, *limits)
    counts = np.bincount(codes, minlength=len(_REASONS) + 1)
    for k, reason in enumerate(_REASONS, start=1):
        stats[f"dropped_{reason}"] = int(counts[k])
    if counts[1:].sum():  # the rows length_filter_codes keeps, selected from the lengths already read
        train = train.select(np.flatnonzero(codes == 0))
    if len(train) == 0:
        raise DataError(
            "every training pair was dropped by the length filters; raise data.max_src_len / "
            "data.max_tgt_len / data.max_len_ratio"
        )

    stages.done("length filters applied")
    stats["train"] = len(train)
    stats["validation"] = len(valid) if valid is not None else 0
    stats["test"] = len(test) if test is not None else 0
    stats["src_vocab_size"] = tokenizer.src_vocab_size
    stats["tgt_vocab_size"] = tokenizer.tgt_vocab_size
    kept = codes == 0  # exactly the rows the length filter keeps: no second pass over the split
    stats["train_src_tokens"] = int(src_lens[kept].sum())
    stats["train_tgt_tokens"] = int(tgt_lens[kept].sum())

    log(
        f"data: {data_cfg.src}->{data_cfg.tgt} from {data_cfg.path}: train {stats['train']} pairs "
        f"(of {stats['train_raw']}; dropped {stats['dropped_empty']} empty, "
        f"{stats['dropped_src_len']} src > {data_cfg.max_src_len} tokens, "
        f"{stats['dropped_tgt_len']} tgt > {data_cfg.max_tgt_len} tokens, "
        f"{stats['dropped_ratio']} length ratio > {data_cfg.max_len_ratio}), "
        f"validation {stats['validation']}, test {stats['test']}"
    )
    log(
        f"data: {stats['train_src_tokens']} source / {stats['train_tgt_tokens']} target training "
        f"tokens; vocab {stats['src_vocab_size']} / {stats['tgt_vocab_size']}"
    )
    return Corpus(tokenizer=tokenizer, train=train, valid=valid, test=test, stats=stats)
