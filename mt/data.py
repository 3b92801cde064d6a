"""Corpus loading and preparation: any parallel corpus -> tokenized, filtered (src, tgt) tables.

`load_splits` accepts what `datasets.load_dataset` accepts (a hub id, a local folder of
train/validation/test jsonl/json/csv/parquet files), plus local folders of parallel text files
(``train.de`` + ``train.en``, one sentence per line) and tab-separated files (``train.tsv``).
Rows may be flat (``{"de": .., "en": ..}``) or nested (``{"translation": {"de": .., "en": ..}}``);
every split comes back with exactly two string columns, ``src`` and ``tgt``.

`prepare_corpus` drops empty training pairs, trains (or loads) the SentencePiece tokenizer on the
training split, tokenizes every split with `datasets.map` (cached by `datasets` when the corpus
lives in Arrow files) and drops over-long / badly length-matched training pairs. Validation and
test keep every row: they are scored.

Everything a user can get wrong raises `DataError` with a one-line message saying what to do.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mt.config import DataConfig, TokenizerConfig
from mt.errors import DataError, first_line
from mt.tokenizer import Tokenizer, train_tokenizer

__all__ = ["Corpus", "load_splits", "prepare_corpus", "default_cache_dir"]

SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "development"),
    "test": ("test", "testing"),
}
LOCAL_HINT = "data.path=../shared/data/multi30k"
# Extensions `datasets` reads itself; anything else after "train." is taken as a language code.
_DATA_EXTS = {
    "json", "jsonl", "ndjson", "csv", "tsv", "parquet", "arrow", "txt", "zip", "gz", "md",
    "py", "lock", "yaml", "yml", "xml", "model", "vocab",
}  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LANG_LIKE = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")


# ======================================================================== reading local files
def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, split on "\\n" only (so U+2028 etc. stay inside a line)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file as UTF-8"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


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
        src, tgt = _read_lines(src_file), _read_lines(tgt_file)
        if len(src) != len(tgt):
            raise DataError(
                f"parallel files differ in length: {src_file} has {len(src)} lines but "
                f"{tgt_file} has {len(tgt)}; they must be line-aligned (one sentence per line)"
            )
        out[role] = datasets.Dataset.from_dict({"src": src, "tgt": tgt})
    return out


def _tsv_files(folder: Path, cfg: DataConfig) -> dict[str, Path]:
    out = {}
    for role in ("train", "validation", "test"):
        for cand in _split_candidates(role, cfg):
            p = folder / f"{cand}.tsv"
            if p.is_file():
                out[role] = p
                break
    return out


def _read_tsv(path: Path, cfg: DataConfig) -> datasets.Dataset:
    """Two columns src<TAB>tgt, or a header row naming the languages (any number of columns)."""
    lines = _read_lines(path)
    if not lines:
        return datasets.Dataset.from_dict({"src": [], "tgt": []})
    head = lines[0].split("\t")
    lowered = [h.strip().lower() for h in head]
    si = ti = None
    if cfg.src in head and cfg.tgt in head:
        si, ti = head.index(cfg.src), head.index(cfg.tgt)
    elif cfg.src.lower() in lowered and cfg.tgt.lower() in lowered:
        si, ti = lowered.index(cfg.src.lower()), lowered.index(cfg.tgt.lower())
    elif {"src", "tgt"} <= set(lowered) or {"source", "target"} <= set(lowered):
        s_name = "src" if "src" in lowered else "source"
        t_name = "tgt" if "tgt" in lowered else "target"
        si, ti = lowered.index(s_name), lowered.index(t_name)
    elif len(head) > 1 and all(_LANG_LIKE.match(h.strip()) for h in head):
        missing = cfg.src if cfg.src not in head else cfg.tgt
        raise DataError(
            f"{path}: language column '{missing}' not found; the header names columns "
            f"{', '.join(head)}: set data.src/data.tgt to one of them"
        )
    if si is not None:
        ncol, rows, first = len(head), lines[1:], 2
    else:
        if len(head) != 2:
            raise DataError(
                f"{path}: line 1 has {len(head)} tab-separated fields; a TSV without a header "
                f"row must have exactly two (src<TAB>tgt), or add a header naming the languages"
            )
        ncol, rows, first, si, ti = 2, lines, 1, 0, 1
    src, tgt = [], []
    for lineno, line in enumerate(rows, start=first):
        if line == "":
            src.append("")
            tgt.append("")
            continue
        fields = line.split("\t")
        if len(fields) != ncol:
            raise DataError(f"{path}: line {lineno} has {len(fields)} tab-separated fields, expected {ncol}")
        src.append(fields[si])
        tgt.append(fields[ti])
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt})


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
            _read_lines(f)  # raises DataError("<file>: line N is not valid UTF-8 ...")
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
            for ds in raw.values():
                _check_utf8(ds, local)
    elif local.is_file():
        where = str(local)
        if local.suffix.lower() == ".tsv":
            raw, normalized = {"train": _read_tsv(local, cfg)}, True
        else:
            raw = _select_roles(_load_with_datasets(cfg, local), cfg, where, roles)
            for ds in raw.values():
                _check_utf8(ds, local)
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


def _drop_codes(ls: np.ndarray, lt: np.ndarray, max_src: int, max_tgt: int, ratio: float) -> np.ndarray:
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


def _keep_lengths(src_ids: list, tgt_ids: list, max_src: int, max_tgt: int, ratio: float) -> list[bool]:
    ls = np.fromiter((len(x) for x in src_ids), dtype=np.int64, count=len(src_ids))
    lt = np.fromiter((len(x) for x in tgt_ids), dtype=np.int64, count=len(tgt_ids))
    return (_drop_codes(ls, lt, max_src, max_tgt, ratio) == 0).tolist()


def _list_lengths(ds: datasets.Dataset, column: str) -> np.ndarray:
    arr = ds.with_format("arrow")[column]
    return np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False), dtype=np.int64)


def _texts(ds: datasets.Dataset, column: str) -> list[str]:
    return ds.with_format("arrow")[column].to_pylist()


def prepare_corpus(
    data_cfg: DataConfig,
    tok_cfg: TokenizerConfig,
    cache_dir: Path,
    log: Callable[[str], Any] = print,
    tokenizer: Tokenizer | None = None,
) -> Corpus:
    """Load, clean, tokenize and filter the corpus (see the module docstring)."""
    splits = load_splits(data_cfg)
    nproc = data_cfg.num_proc if data_cfg.num_proc and data_cfg.num_proc > 1 else None
    stats: dict[str, Any] = {}

    train = splits["train"]
    stats["train_raw"] = len(train)
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

    if tokenizer is None:
        tokenizer = train_tokenizer(tok_cfg, _texts(train, "src"), _texts(train, "tgt"), Path(cache_dir), log=log)
    else:
        log(f"tokenizer: using the given tokenizer ({tokenizer!r})")

    def tokenize(ds: datasets.Dataset, role: str) -> datasets.Dataset:
        features = ds.features.copy()
        features["src_ids"] = datasets.List(datasets.Value("int32"))
        features["tgt_ids"] = datasets.List(datasets.Value("int32"))
        return ds.map(
            _encode_batch,
            batched=True,
            num_proc=nproc,
            fn_kwargs={"tokenizer": tokenizer},
            features=features,
            desc=f"tokenizing {role}",
        )

    train = tokenize(train, "train")
    valid = tokenize(splits["validation"], "validation") if "validation" in splits else None
    test = tokenize(splits["test"], "test") if "test" in splits else None

    limits = (data_cfg.max_src_len, data_cfg.max_tgt_len, data_cfg.max_len_ratio)
    codes = _drop_codes(_list_lengths(train, "src_ids"), _list_lengths(train, "tgt_ids"), *limits)
    counts = np.bincount(codes, minlength=len(_REASONS) + 1)
    for k, reason in enumerate(_REASONS, start=1):
        stats[f"dropped_{reason}"] = int(counts[k])
    if counts[1:].sum():
        train = train.filter(
            _keep_lengths,
            batched=True,
            input_columns=["src_ids", "tgt_ids"],
            fn_kwargs=dict(zip(("max_src", "max_tgt", "ratio"), limits)),
            num_proc=nproc,
            desc="dropping long pairs",
        )
    if len(train) == 0:
        raise DataError(
            "every training pair was dropped by the length filters; raise data.max_src_len / "
            "data.max_tgt_len / data.max_len_ratio"
        )

    stats["train"] = len(train)
    stats["validation"] = len(valid) if valid is not None else 0
    stats["test"] = len(test) if test is not None else 0
    stats["src_vocab_size"] = tokenizer.src_vocab_size
    stats["tgt_vocab_size"] = tokenizer.tgt_vocab_size
    stats["train_src_tokens"] = int(_list_lengths(train, "src_ids").sum())
    stats["train_tgt_tokens"] = int(_list_lengths(train, "tgt_ids").sum())

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
