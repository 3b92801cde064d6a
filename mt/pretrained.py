"""Model folders: a trained model as files anyone can publish on the Hugging Face Hub as they are.

    mt-export RUN/checkpoints/best.pt my-model      # writes the folder (mt/export.py)
    hf upload USER/NAME my-model                    # publishes it
    Translator.from_pretrained("my-model")          # or "USER/NAME": loads it (Translator.load: either)

A folder holds, and needs, exactly:

    model.safetensors   the weights (no pickled code); a tensor shared by two names (tied output
                        layer, shared embeddings) is stored once, the other name in config.json
    config.json         format, version, the model / tokenizer / data / decoding config (enough to
                        rebuild Seq2Seq), the SentencePiece file names and special ids, the
                        training step and validation scores
    sentencepiece.model                       one joint SentencePiece model, or
    sentencepiece.source.model + .target.model  one per language
    README.md           the model card (mt/export.py writes it; loading does not read it)

A Hub id is fetched with `huggingface_hub.snapshot_download` (its cache, HF_HUB_OFFLINE and
HF_HUB_CACHE apply). Every problem is a one-line CheckpointError.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, from_dict, to_dict
from .errors import CheckpointError, first_line
from .tokenizer import Tokenizer

FORMAT = "mt-pretrained"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
SPM_JOINT = "sentencepiece.model"
SPM_SRC = "sentencepiece.source.model"
SPM_TGT = "sentencepiece.target.model"
# what a Hub download fetches: the files above, nothing else a repository may hold
HUB_PATTERNS = [CONFIG, WEIGHTS, "sentencepiece*.model", CARD]
# data config keys that describe one machine, not the model
_LOCAL_DATA_KEYS = ("cache_dir", "num_proc")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


# ----------------------------------------------------------------------------- weights
def split_tied(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors to save, {name: the saved name it shares memory with}). Each saved tensor is a
    contiguous CPU copy of its own (safetensors refuses shared or overlapping memory)."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.to("cpu", copy=True).contiguous()
    return tensors, tied


def join_tied(tensors: dict[str, torch.Tensor], tied: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    """The state dict `split_tied` split: each tied name pointing at its saved tensor again."""
    out = dict(tensors)
    for name, source in tied.items():
        if source not in tensors:
            raise CheckpointError(f"{where}: {name} is tied to {source}, which {WEIGHTS} lacks")
        out[name] = tensors[source]
    return out


# ----------------------------------------------------------------------------- config
def folder_config(
    cfg: TrainConfig, tok: Tokenizer, tied: dict[str, str], training: dict[str, Any] | None = None
) -> dict[str, Any]:
    """config.json's content: what rebuilds the model and its tokenizer, and how it was trained."""
    full = to_dict(cfg)
    data = {k: v for k, v in full["data"].items() if k not in _LOCAL_DATA_KEYS}
    spm = tok.state_dict()
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": "Seq2Seq",
        "src_lang": cfg.data.src,
        "tgt_lang": cfg.data.tgt,
        "model": full["model"],
        "tokenizer": full["tokenizer"],
        "data": data,
        "decoding": full["decoding"],
        "sentencepiece": {
            "joint": tok.joint,
            "files": [SPM_JOINT] if tok.joint else [SPM_SRC, SPM_TGT],
            "src_vocab_size": tok.src_vocab_size,
            "tgt_vocab_size": tok.tgt_vocab_size,
            **{k: spm[k] for k in ("pad_id", "unk_id", "bos_id", "eos_id")},
        },
        "tied_weights": dict(tied),
        "training": training or {},
    }


def tokenizer_files(tok: Tokenizer) -> dict[str, bytes]:
    """{file name: SentencePiece model bytes}: one joint model or one per side."""
    d = tok.state_dict()
    if tok.joint:
        return {SPM_JOINT: d["src_model"]}
    return {SPM_SRC: d["src_model"], SPM_TGT: d["tgt_model"]}


def write_folder(
    folder: str | os.PathLike,
    cfg: TrainConfig,
    tok: Tokenizer,
    state_dict: dict[str, torch.Tensor],
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write model.safetensors, config.json and the SentencePiece model(s) into an existing
    `folder` (the model card is mt/export.py's). Returns the config written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors, tied = split_tied(state_dict)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "mt_format": FORMAT})
    config = folder_config(cfg, tok, tied, training)
    (folder / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, blob in tokenizer_files(tok).items():
        (folder / name).write_bytes(blob)
    return config


# ----------------------------------------------------------------------------- reading
def load_folder(
    folder: str | os.PathLike, where: str | None = None
) -> tuple[TrainConfig, Tokenizer, dict[str, torch.Tensor], dict[str, Any]]:
    """-> (config, tokenizer, state dict, config.json) of a model folder. `where` names it in
    errors (default: the folder). Any missing, unreadable or inconsistent file: CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    where = where or f"model folder {folder}"
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{where} lacks {CONFIG}: not a folder written by mt-export")
    try:
        meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: unreadable {CONFIG}: {first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: {CONFIG} is not an mt model config (format {FORMAT!r} expected)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{where} has model folder version {meta.get('version')}, this mt reads {VERSION}")
    try:
        cfg = from_dict({k: meta[k] for k in ("model", "tokenizer", "data", "decoding") if k in meta})
    except Exception as e:
        raise CheckpointError(f"{where} has an unusable config: {first_line(e)}") from None

    for key in ("sentencepiece", "tied_weights", "training"):  # a Hub repository is untrusted input
        if not isinstance(meta.get(key) or {}, dict):
            raise CheckpointError(f"{where}: {CONFIG} field {key!r} must be an object")
    spm = meta.get("sentencepiece") or {}
    names = [SPM_JOINT] if spm.get("joint", True) else [SPM_SRC, SPM_TGT]
    missing = [n for n in (*names, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}")
    try:
        blobs = [(folder / n).read_bytes() for n in names]
        ids = {k: int(spm.get(k, getattr(cfg.tokenizer, k))) for k in ("pad_id", "unk_id", "bos_id", "eos_id")}
        tok = Tokenizer(blobs[0], blobs[1] if len(blobs) > 1 else None, **ids)
    except Exception as e:
        raise CheckpointError(f"{where} has an unusable tokenizer: {first_line(e)}") from None

    try:
        tensors = load_file(str(folder / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt or unreadable {WEIGHTS} in {where}: {first_line(e)}") from None
    tied = meta.get("tied_weights") or {}
    return cfg, tok, join_tied(tensors, tied, where), meta


# ----------------------------------------------------------------------------- hub ids
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(s: str) -> bool:
    """True for a string that can only mean a Hugging Face model id, USER/NAME: not a path
    (./x, /x, ~/x, a/b/c) and not a checkpoint file name (x/best.pt)."""
    s = str(s)
    if not _HUB_ID.fullmatch(s) or ".." in s or s.endswith(".") or s.lower().endswith(_CHECKPOINT_SUFFIXES):
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(s)
    except Exception:
        return False
    return True


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mt")
    except PackageNotFoundError:
        return None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def download(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Fetch (or find in the cache) a model folder from the Hub -> (its local path, its name
    for messages, `USER/NAME` or `USER/NAME@revision`). One-line CheckpointError when it is
    neither cached nor downloadable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=HUB_PATTERNS,
            local_files_only=_offline(),  # also when HF_HUB_OFFLINE was set after huggingface_hub's import
            library_name="mt",
            library_version=_version(),
        )
    except RevisionNotFoundError:
        raise CheckpointError(f"model {repo_id} on the Hugging Face Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"no model {repo_id} on the Hugging Face Hub (private or gated models need `hf auth login`), "
            "and no such local file or folder"
        ) from None
    except LocalEntryNotFoundError:
        if _offline():
            raise CheckpointError(
                f"{name}: no such local file or folder, and Hugging Face model {name} is not in the cache "
                "(offline: HF_HUB_OFFLINE is set; download it once online or pass a local model folder)"
            ) from None
        raise CheckpointError(
            f"{name}: no such local file or folder, the Hugging Face Hub cannot be reached "
            "and the model is not in the cache"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"could not download Hugging Face model {name}: {first_line(e)}") from None
    return Path(path), name


def resolve(
    folder_or_hub_id: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, str]:
    """A local model folder, or a Hub id fetched with `download` -> (folder, name for messages)."""
    p = Path(folder_or_hub_id).expanduser()
    if p.is_dir():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} is for Hugging Face model ids; {p} is a local folder")
        return p, f"model folder {p}"
    if p.exists():
        raise CheckpointError(f"{p} is a file, not a model folder (a checkpoint? use Translator.load)")
    s = str(folder_or_hub_id)
    if not is_hub_id(s):
        raise CheckpointError(f"model not found: {s} is no folder and no Hugging Face model id (USER/NAME)")
    folder, name = download(s, revision, cache_dir)
    return folder, f"Hugging Face model {name}"


__all__ = [
    "CARD",
    "CONFIG",
    "FORMAT",
    "WEIGHTS",
    "download",
    "folder_config",
    "is_hub_id",
    "load_folder",
    "resolve",
    "split_tied",
    "join_tied",
    "tokenizer_files",
    "write_folder",
]
