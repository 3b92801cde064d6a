"""Translate text with a trained checkpoint or model folder.

    from mt.translator import Translator
    tr = Translator.from_checkpoint("outputs/.../checkpoints/best.pt", device="cpu")
    tr = Translator.from_pretrained("my-model")   # a folder written by mt-export, or a Hub id USER/NAME
    tr = Translator.load(path_or_id)              # either: what the commands' --checkpoint takes
    tr = Translator.load([ckpt_a, ckpt_b])        # an ensemble (mt/ensemble.py): same tokenizer
    hyps = tr.translate(["ein hund läuft .", ""])                   # the recipe's beam and length penalty
    hyps = tr.translate(["ein hund läuft ."], beam=1, length_penalty=None)  # greedy
    hyps[0].text, hyps[0].score, hyps[0].tokens, hyps[0].attention  # (out x src) weights
    scored = tr.score(["ein hund läuft ."], ["a dog runs ."])   # forced scoring (mt/scoring.py)

The checkpoint alone is enough: it holds the model weights, the training config (model shape,
languages, max source length, the recipe's decoding settings) and the SentencePiece models; a
model folder holds the same as files (mt/pretrained.py).

Lines are sorted by length into batches and the results come back in input order. An empty
(or whitespace-only) line gives an empty hypothesis without running the model. A line with
more source pieces than `max_src_len` (default: the checkpoint's data.max_src_len) is truncated,
with a warning naming its line number.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import graphs, pretrained
from .checkpoint import load_checkpoint
from .config import TrainConfig, from_dict
from .ensemble import Ensemble, check_combine, check_compatible
from .errors import CheckpointError, MTError, first_line
from .model import CELLS, Seq2Seq
from .pretrained import is_hub_id
from .runtime import resolve_cuda_graphs, resolve_device
from .search import LengthPenalty, decode_dataset, parse_length_penalty
from .tokenizer import Tokenizer

log = logging.getLogger("mt.translator")


@dataclass
class Hypothesis:
    """One translation of one input line.

    tokens      output SentencePiece pieces (no BOS/EOS)
    src_tokens  source pieces the model saw (after truncation, no EOS)
    attention   (steps, len(src_tokens) + 1) float32: one row per output token, plus a last row
                for the EOS step when the hypothesis ended with EOS; the last column is the
                source EOS
    score       ranking score: log_prob / lp(len) (= log_prob without a length penalty)
    log_prob    sum of the token log-probabilities (EOS included)
    """

    text: str
    score: float
    tokens: list[str] = field(default_factory=list)
    attention: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    src_tokens: list[str] = field(default_factory=list)
    log_prob: float = 0.0
    ids: list[int] = field(default_factory=list)

    def alignment(self) -> list[tuple[int, int]]:
        """(source position, output position) pairs, 0-based over pieces: for each output piece
        the source piece with the highest attention weight (the source EOS column is ignored)."""
        n_out, n_src = len(self.tokens), len(self.src_tokens)
        if n_out == 0 or n_src == 0:
            return []
        best = self.attention[:n_out, :n_src].argmax(dim=-1).tolist()
        return [(s, t) for t, s in enumerate(best)]


def resolve_cell(requested: str | None, saved: str, device: torch.device) -> str:
    """The gate-cell backend to decode with: `requested` if given (checked), else the checkpoint's
    `saved` one where it can run on `device`, else auto."""
    from . import kernels

    if requested is not None:
        if requested not in CELLS:
            raise MTError(f"unknown cell {requested!r}; choose one of {', '.join(CELLS)}")
        if requested == "triton" and not kernels.triton_available():
            raise MTError("cell=triton needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
        return requested
    # The checkpoint's backend, unless it cannot run here: every backend holds the same parameters.
    if saved == "triton" and not (device.type == "cuda" and kernels.triton_available()):
        return "auto"
    return saved


CHECKPOINT = "checkpoint"  # length_penalty value meaning "the checkpoint's decoding.length_penalty"


def is_checkpoint_default(length_penalty) -> bool:
    """True for the "checkpoint" length penalty: use the checkpoint's decoding.length_penalty."""
    return isinstance(length_penalty, str) and length_penalty.strip().lower() == CHECKPOINT


def check_decoding(beam: int | None, length_penalty) -> None:
    """Refuse a bad beam or length penalty given by the user, before anything is loaded
    (None / "checkpoint" are resolved later, from the checkpoint)."""
    if beam is not None and beam < 1:
        raise MTError(f"beam must be >= 1 (got {beam})")
    if not is_checkpoint_default(length_penalty):
        parse_length_penalty(length_penalty)


def build_model(
    cfg: TrainConfig, tok: Tokenizer, weights: dict[str, Tensor], where: str, cell: str | None, device: torch.device
) -> Seq2Seq:
    """The Seq2Seq `cfg` describes, with `weights` loaded, on the gate cell `resolve_cell` picks
    for `device` (cfg.model.cell is updated). `where` names the source in one-line errors."""
    cfg.model.cell = resolve_cell(cell, cfg.model.cell, device)
    try:
        model = Seq2Seq(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id)
        model.load_state_dict(weights)
    except MTError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except Exception as e:  # size mismatch, missing keys...
        raise CheckpointError(f"{where} does not fit its own model config: {first_line(e)}") from None
    try:
        model.backend(device)
    except (RuntimeError, ValueError) as e:
        raise MTError(f"{first_line(e)}") from None
    return model


class Translator:
    """A model, its tokenizer and its training config, ready to translate lines of text."""

    def __init__(
        self,
        model: Seq2Seq,
        tokenizer: Tokenizer,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        max_src_len: int | None = None,
        cuda_graphs: str | bool = "auto",
        training: dict[str, Any] | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = config
        self.max_src_len = max_src_len if max_src_len is not None else config.data.max_src_len
        # what the training run left with the model: {"step": int, "metrics": validation scores}
        self.training = training or {}
        # search steps replayed from CUDA graphs (auto: on CUDA), kept across translate() calls
        on = resolve_cuda_graphs(cuda_graphs, self.device, key="cuda_graphs", task="decoding")
        self.graphs = graphs.GraphedDecoder(self.model) if on else None
        # an ensemble's members (`Translator.ensemble`): per model {"model": where it came from,
        # "step", "metrics", "parameters", "cell"}; None for a single model
        self.members: list[dict[str, Any]] | None = None

    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.model, Ensemble)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path_or_id: str | os.PathLike | list[str | os.PathLike] | tuple[str | os.PathLike, ...],
        revision: str | None = None,
        device: str = "auto",
        cell: str | None = None,
        max_src_len: int | None = None,
        cuda_graphs: str | bool = "auto",
        cache_dir: str | os.PathLike | None = None,
        combine: str = "logprob",
    ) -> Translator:
        """Whatever a command's --checkpoint names: an existing file is a checkpoint
        (`from_checkpoint`), an existing folder a model folder, anything else a Hugging Face
        model id USER/NAME (both `from_pretrained`). Not found: a one-line CheckpointError.
        A list of several: each loaded so, decoding as one ensemble (`ensemble`; `combine`:
        logprob or prob, mt/ensemble.py); a list of one is that one model."""
        check_combine(combine)
        if isinstance(path_or_id, (list, tuple)):
            sources = list(path_or_id)
            if not sources:
                raise MTError("no checkpoint given")
            if len(sources) > 1:
                dev = resolve_device(device)
                resolve_cuda_graphs(cuda_graphs, dev, key="cuda_graphs", task="decoding")  # fail before loading
                kw = dict(revision=revision, device=device, cell=cell, max_src_len=max_src_len, cache_dir=cache_dir)
                loaded = [cls.load(s, cuda_graphs=False, **kw) for s in sources]
                return cls.ensemble(loaded, [str(s) for s in sources], combine, max_src_len, cuda_graphs)
            path_or_id = sources[0]
        p = Path(path_or_id).expanduser()
        if p.is_file():
            if revision is not None:
                raise CheckpointError(f"revision={revision!r} is for Hugging Face model ids; {p} is a checkpoint file")
            return cls.from_checkpoint(p, device=device, cell=cell, max_src_len=max_src_len, cuda_graphs=cuda_graphs)
        if p.is_dir() or is_hub_id(str(path_or_id)):
            return cls.from_pretrained(
                path_or_id,
                revision=revision,
                device=device,
                cell=cell,
                max_src_len=max_src_len,
                cuda_graphs=cuda_graphs,
                cache_dir=cache_dir,
            )
        raise CheckpointError(f"checkpoint not found: {p}")  # as from_checkpoint says it

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        cell: str | None = None,
        max_src_len: int | None = None,
        cuda_graphs: str | bool = "auto",
    ) -> Translator:
        """Build the model described by the checkpoint's config and load its weights.
        A missing, corrupt or mismatched checkpoint is a one-line CheckpointError.
        cuda_graphs: auto (on with CUDA) | true | false: decode with mt.graphs.GraphedDecoder."""
        dev = resolve_device(device)
        resolve_cuda_graphs(cuda_graphs, dev, key="cuda_graphs", task="decoding")  # fail before loading
        path = Path(path)
        state = load_checkpoint(path, map_location="cpu")
        where = f"checkpoint {path}"
        try:
            cfg = from_dict(state["config"])
        except Exception as e:
            raise CheckpointError(f"{where} has an unusable config: {first_line(e)}") from None
        try:
            tok = Tokenizer.from_state_dict(state["tokenizer"])
        except Exception as e:
            raise CheckpointError(f"{where} has an unusable tokenizer: {first_line(e)}") from None
        model = build_model(cfg, tok, state["model"], where, cell, dev)
        training = {"step": state.get("step"), "metrics": dict(state.get("metrics") or {})}
        return cls(model, tok, cfg, dev, max_src_len, cuda_graphs, training)

    @classmethod
    def from_pretrained(
        cls,
        folder_or_hub_id: str | os.PathLike,
        revision: str | None = None,
        device: str = "auto",
        cell: str | None = None,
        max_src_len: int | None = None,
        cuda_graphs: str | bool = "auto",
        cache_dir: str | os.PathLike | None = None,
    ) -> Translator:
        """Load a model folder written by mt-export (mt/pretrained.py): a local folder, or a
        Hugging Face model id USER/NAME at `revision` (branch, tag or commit; default main),
        fetched with huggingface_hub.snapshot_download into its cache (`cache_dir`, default
        HF_HUB_CACHE; with HF_HUB_OFFLINE=1 only the cache is read). Problems: one-line
        CheckpointError."""
        dev = resolve_device(device)
        resolve_cuda_graphs(cuda_graphs, dev, key="cuda_graphs", task="decoding")  # fail before loading
        folder, where = pretrained.resolve(folder_or_hub_id, revision, cache_dir)
        cfg, tok, weights, meta = pretrained.load_folder(folder, where)
        model = build_model(cfg, tok, weights, where, cell, dev)
        saved = meta.get("training") or {}  # load_folder checked it is an object
        training = {"step": saved.get("step"), "metrics": dict(saved.get("validation") or {})}
        return cls(model, tok, cfg, dev, max_src_len, cuda_graphs, training)

    @classmethod
    def ensemble(
        cls,
        translators: list[Translator],
        names: list[str] | None = None,
        combine: str = "logprob",
        max_src_len: int | None = None,
        cuda_graphs: str | bool = "auto",
    ) -> Translator:
        """One Translator decoding with the models of `translators` together (mt/ensemble.py),
        on the first one's device. They must share the tokenizer and the language pair (else a
        one-line MTError naming the two, `names` or "model N"); their architectures may differ.
        The tokenizer, config (decoding defaults, max_src_len) and training record are the first
        model's; `members` lists each model's."""
        if not translators:
            raise MTError("an ensemble needs at least one model")
        names = names or [f"model {i}" for i in range(1, len(translators) + 1)]
        check_compatible([t.tokenizer for t in translators], [(t.src_lang, t.tgt_lang) for t in translators], names)
        first = translators[0]
        devices = {str(t.device) for t in translators}
        if len(devices) > 1:
            raise MTError(f"an ensemble's models must be on one device (got {', '.join(sorted(devices))})")
        model = Ensemble([t.model for t in translators], combine)
        max_src_len = max_src_len if max_src_len is not None else first.max_src_len
        tr = cls(model, first.tokenizer, first.config, first.device, max_src_len, cuda_graphs, first.training)
        tr.members = [
            {
                "model": name,
                "step": t.training.get("step"),
                "metrics": dict(t.training.get("metrics") or {}),
                "parameters": sum(p.numel() for p in t.model.parameters()),
                "cell": t.config.model.cell,
            }
            for name, t in zip(names, translators)
        ]
        return tr

    @property
    def src_lang(self) -> str:
        return self.config.data.src

    @property
    def tgt_lang(self) -> str:
        return self.config.data.tgt

    # ------------------------------------------------------------------ translating
    def encode(self, lines: list[str], first_line: int = 1, max_src_len: int | None = None) -> list[list[int] | None]:
        """Source piece ids per line (None for an empty line), truncated to max_src_len."""
        limit = self.max_src_len if max_src_len is None else max_src_len
        keep = [i for i, ln in enumerate(lines) if ln and ln.strip()]
        ids: list[list[int] | None] = [None] * len(lines)
        for i, seq in zip(keep, self.tokenizer.encode_src([lines[i] for i in keep])):
            if not seq:
                continue
            if limit and limit > 0 and len(seq) > limit:
                log.warning("line %d: %d source tokens, truncated to %d", first_line + i, len(seq), limit)
                seq = seq[:limit]
            ids[i] = list(seq)
        return ids

    def decoding(
        self, beam: int | None = None, length_penalty: LengthPenalty | str = CHECKPOINT
    ) -> tuple[int, LengthPenalty]:
        """(beam, length penalty): the given ones, or the checkpoint's `decoding` settings where
        beam is None / length_penalty is "checkpoint". A beam below 1 is a one-line MTError."""
        if beam is None:
            beam = self.config.decoding.beam
        if is_checkpoint_default(length_penalty):
            length_penalty = self.config.decoding.length_penalty
        if beam < 1:
            raise MTError(f"beam must be >= 1 (got {beam})")
        return beam, parse_length_penalty(length_penalty)

    @torch.no_grad()
    def translate(
        self,
        lines: list[str],
        beam: int | None = None,
        length_penalty: LengthPenalty | str = CHECKPOINT,
        nbest: int = 1,
        max_len_a: float = 1.5,
        max_len_b: int = 10,
        batch_size: int = 32,
        max_src_len: int | None = None,
        first_line: int = 1,
    ):
        """Translate `lines` (in order). Returns one Hypothesis per line, or with nbest > 1 one
        list of up to nbest Hypotheses (best first) per line. `first_line` numbers the lines
        in warnings (1-based). Beam and length penalty default to the checkpoint's `decoding`."""
        if isinstance(lines, str):
            raise TypeError("translate takes a list of lines, not one string")
        beam, lp = self.decoding(beam, length_penalty)
        if not 1 <= nbest <= beam:
            raise MTError(f"nbest must be between 1 and the beam size {beam} (got {nbest})")
        if batch_size < 1:
            raise MTError(f"batch_size must be >= 1 (got {batch_size})")
        tok = self.tokenizer
        ids = self.encode(lines, first_line, max_src_len)
        todo = [i for i, x in enumerate(ids) if x is not None]  # empty lines are not decoded
        decoded = decode_dataset(
            self.model,
            [ids[i] for i in todo],
            tok,
            self.device,
            batch_size=batch_size,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            beam=beam,
            length_penalty=lp,
            nbest=nbest,
            graphs=self.graphs,
        )
        results: list[list[Hypothesis]] = [[Hypothesis(text="", score=0.0)] for _ in lines]
        for k, i in enumerate(todo):
            src_pieces = tok.src_pieces(ids[i])
            results[i] = [
                Hypothesis(
                    text=_one_line(tok.decode_tgt([h.tokens])[0]),
                    score=h.score,
                    tokens=tok.tgt_pieces(h.tokens),
                    attention=h.attention,
                    src_tokens=src_pieces,
                    log_prob=h.log_prob,
                    ids=list(h.tokens),
                )
                for h in decoded.nbest[k]
            ]
        if nbest == 1:
            return [r[0] for r in results]
        return results

    @torch.no_grad()
    def score(
        self,
        sources: list[str],
        targets: list,
        length_penalty: LengthPenalty | str = CHECKPOINT,
        batch_size: int = 32,
        max_src_len: int | None = None,
        first_line: int = 1,
    ):
        """Force-score given translations: targets[i] (text, or a list of target piece ids such
        as `Hypothesis.ids`) as a translation of sources[i]. Returns one
        `mt.scoring.ScoredTranslation` per pair, in order: log_prob (EOS included),
        token_log_probs, ntokens, score = log_prob / lp(ntokens) (length penalty: the
        checkpoint's unless given) and the pieces. Different counts: a one-line MTError.
        Conventions (empty lines, truncation): mt/scoring.py."""
        from .scoring import score_pairs

        _, lp = self.decoding(None, length_penalty)
        return score_pairs(self, sources, targets, lp, batch_size, max_src_len, first_line)


def plot_attention(hyp: Hypothesis, path: str | os.PathLike) -> Path:
    """Write the attention heatmap (output pieces x source pieces, EOS included) as an image."""
    from .plotting import attention_figure

    src = hyp.src_tokens + ["</s>"]
    out = (hyp.tokens + ["</s>"])[: hyp.attention.shape[0]]
    fig = attention_figure(hyp.attention[: len(out), : len(src)], src, out)  # no pyplot: nothing to close
    path = Path(path)
    fig.savefig(path)
    return path


def _one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


__all__ = ["Translator", "Hypothesis", "build_model", "resolve_cell", "plot_attention"]
