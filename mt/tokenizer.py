"""SentencePiece tokenization: train (or load from cache) and a small wrapper for both sides.

One `Tokenizer` holds the source and the target SentencePiece models (the same model when
``joint``). It is built from serialized model protos, so it fits into a checkpoint as plain bytes
(`state_dict` / `from_state_dict`, loadable with ``torch.load(weights_only=True)``) and pickles
cheaply into DataLoader / `datasets.map` worker processes.

Special ids are set explicitly at training time (pad 0, unk 1, bos 2, eos 3 by default) and
checked again when a model is loaded, so the model's embedding rows and the batches agree.
`encode_*` returns piece ids only; bos/eos are added by `mt.batching.collate`.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import io
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm

from mt.config import TokenizerConfig
from mt.errors import DataError

_FORMAT = 1
# Options that change the trained model; everything here goes into the cache key.
_SPM_OPTIONS = (
    "model_type",
    "vocab_size",
    "character_coverage",
    "input_sentence_size",
    "train_on",
    "seed",
    "pad_id",
    "unk_id",
    "bos_id",
    "eos_id",
)
_HASH_CHUNK = 65536


def _load_proto(proto: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp


_SAMPLING = threading.Lock()  # Tokenizer.sample: SentencePiece's random seed is one per process


class Tokenizer:
    """Source and target SentencePiece models with fixed special ids.

    ``Tokenizer(src_model, tgt_model=None, pad_id=0, unk_id=1, bos_id=2, eos_id=3)``:
    ``tgt_model=None`` means one joint model (one vocabulary) for both languages.
    """

    def __init__(
        self,
        src_model: bytes,
        tgt_model: bytes | None = None,
        pad_id: int = 0,
        unk_id: int = 1,
        bos_id: int = 2,
        eos_id: int = 3,
    ) -> None:
        self.joint: bool = tgt_model is None
        self._src_proto = bytes(src_model)
        self._tgt_proto = self._src_proto if tgt_model is None else bytes(tgt_model)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = pad_id, unk_id, bos_id, eos_id
        self._src = _load_proto(self._src_proto)
        self._tgt = self._src if self.joint else _load_proto(self._tgt_proto)
        for side, sp in (("source", self._src), ("target", self._tgt)):
            got = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
            want = (pad_id, unk_id, bos_id, eos_id)
            if got != want:
                raise DataError(
                    f"the {side} SentencePiece model has special ids (pad, unk, bos, eos) = {got}, "
                    f"expected {want}; retrain the tokenizer or set tokenizer.*_id to match"
                )
        self.src_vocab_size: int = self._src.get_piece_size()
        self.tgt_vocab_size: int = self._tgt.get_piece_size()
        self._specials = frozenset((pad_id, bos_id, eos_id))

    # ----------------------------------------------------------------------------- encoding
    @staticmethod
    def _encode(sp: spm.SentencePieceProcessor, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_src/encode_tgt take a list of strings, not one string")
        return sp.encode(list(texts), out_type=int)

    def encode_src(self, texts: Sequence[str]) -> list[list[int]]:
        """Piece ids of each source sentence (no bos/eos)."""
        return self._encode(self._src, texts)

    def encode_tgt(self, texts: Sequence[str]) -> list[list[int]]:
        """Piece ids of each target sentence (no bos/eos)."""
        return self._encode(self._tgt, texts)

    def model_type(self, side: str) -> str:
        """ "unigram", "bpe", "word" or "char": how `side`'s SentencePiece model segments."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self._src_proto if side == "src" else self._tgt_proto)
        kind = proto.trainer_spec.model_type
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(kind).lower()

    def sample(self, side: str, texts: Sequence[str], alpha: float, nbest: int, seed: int) -> list[list[int]]:
        """Piece ids of a SAMPLED segmentation of each sentence of `side` ("src" or "tgt"), for
        subword regularization (mt/subword_sampling.py): a unigram model draws from its `nbest`
        best segmentations (-1: all of them) with probabilities ~ P^alpha; a BPE model drops each
        merge with probability `alpha`. The same (texts, alpha, nbest, seed) give the same ids."""
        if isinstance(texts, str):
            raise TypeError("sample takes a list of strings, not one string")
        sp = {"src": self._src, "tgt": self._tgt}[side]
        # SentencePiece's seed is process-wide: seeding and drawing happen under one lock, or
        # another thread's sampling could reseed in between. One encoding thread, because several
        # take sentences in whatever order they get to them, and the draws follow that order.
        with _SAMPLING:
            spm.set_random_generator_seed(int(seed))
            return sp.encode(
                list(texts), out_type=int, enable_sampling=True, alpha=alpha, nbest_size=nbest, num_threads=1
            )

    # ----------------------------------------------------------------------------- decoding
    def _clean(self, ids: Iterable[Any]) -> list[int]:
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in self._specials:
                out.append(i)
        return out

    def decode_src(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence: stops at the first eos, skips pad/bos/eos."""
        return [self._src.decode(self._clean(seq)) for seq in ids]

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence: stops at the first eos, skips pad/bos/eos."""
        return [self._tgt.decode(self._clean(seq)) for seq in ids]

    def src_pieces(self, ids: Iterable[Any]) -> list[str]:
        """Piece strings of ONE source id sequence (labels for attention plots)."""
        return [self._src.id_to_piece(int(i)) for i in ids]

    def tgt_pieces(self, ids: Iterable[Any]) -> list[str]:
        """Piece strings of ONE target id sequence (labels for attention plots)."""
        return [self._tgt.id_to_piece(int(i)) for i in ids]

    # ------------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict:
        """Plain python types + bytes: safe for ``torch.load(weights_only=True)``."""
        return {
            "format": _FORMAT,
            "joint": self.joint,
            "src_model": self._src_proto,
            "tgt_model": None if self.joint else self._tgt_proto,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> Tokenizer:
        if not isinstance(d, dict) or "src_model" not in d:
            raise DataError("not a tokenizer state (missing 'src_model'); is this an mt checkpoint?")
        return cls(
            d["src_model"],
            None if d.get("joint", False) else d.get("tgt_model"),
            pad_id=int(d["pad_id"]),
            unk_id=int(d["unk_id"]),
            bos_id=int(d["bos_id"]),
            eos_id=int(d["eos_id"]),
        )

    def __getstate__(self) -> dict:
        return self.state_dict()

    def __setstate__(self, d: dict) -> None:
        self.__init__(  # type: ignore[misc]
            d["src_model"],
            None if d["joint"] else d["tgt_model"],
            d["pad_id"],
            d["unk_id"],
            d["bos_id"],
            d["eos_id"],
        )

    def fingerprint(self) -> str:
        """A short digest of the models and ids (e.g. for naming cached tokenized data)."""
        h = hashlib.sha256()
        h.update(self._src_proto)
        h.update(self._tgt_proto)
        h.update(repr((self.pad_id, self.unk_id, self.bos_id, self.eos_id)).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        if self.joint:
            return f"Tokenizer(joint, vocab={self.src_vocab_size})"
        return f"Tokenizer(src_vocab={self.src_vocab_size}, tgt_vocab={self.tgt_vocab_size})"


# ---------------------------------------------------------------------------------- training
class TextChunks:
    """Sentences as their count and a stream of chunks that can be read again: a sample of
    millions of sentences is hashed and written out a chunk at a time, never held as one list of
    Python strings.

    ``TextChunks(n, chunks)``: `chunks` is a callable returning an iterable of chunks, n strings in
    all; a chunk is a sequence of str or a pyarrow string array without nulls (hashed straight
    from its buffers). ``TextChunks.of(list_of_str)`` wraps a list; ``a + b`` is a then b.
    """

    def __init__(self, n: int, chunks: Callable[[], Iterable[Any]]) -> None:
        self.n, self._chunks = int(n), chunks

    @classmethod
    def of(cls, texts: Sequence[str] | TextChunks) -> TextChunks:
        if isinstance(texts, TextChunks):
            return texts
        if isinstance(texts, str):
            raise TypeError("train_tokenizer takes lists of sentences, not one string")
        texts = texts if isinstance(texts, Sequence) else list(texts)
        return cls(len(texts), lambda: (texts[i : i + _HASH_CHUNK] for i in range(0, len(texts), _HASH_CHUNK)))

    def chunks(self) -> Iterator[Any]:
        """The chunks as given (lists or Arrow arrays), checked to add up to len(self) strings."""
        seen = 0
        for chunk in self._chunks():
            seen += len(chunk)
            yield chunk
        if seen != self.n:
            raise ValueError(f"TextChunks: the chunks hold {seen} strings, not {self.n}")

    def lists(self) -> Iterator[Sequence[str]]:
        """The chunks as sequences of str."""
        for chunk in self.chunks():
            yield _strings(chunk)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[str]:
        for chunk in self.lists():
            yield from chunk

    def __add__(self, other: TextChunks) -> TextChunks:
        return TextChunks(self.n + other.n, lambda: itertools.chain(self.chunks(), other.chunks()))


def _strings(chunk: Any) -> Sequence[str]:
    return chunk.to_pylist() if hasattr(chunk, "to_pylist") else chunk


def _nul_joined(chunk: Any) -> Any:
    """The chunk's strings as NUL-separated UTF-8 (bytes, or a uint8 array read from an Arrow
    string array's own buffers: no Python string per sentence)."""
    if hasattr(chunk, "buffers") and not chunk.null_count and str(chunk.type) in ("string", "large_string"):
        import numpy as np

        width = np.int32 if str(chunk.type) == "string" else np.int64
        offsets = np.frombuffer(chunk.buffers()[1], dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        utf8 = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        utf8 = utf8[offsets[0] : offsets[-1]]
        return np.insert(utf8, (offsets[1:-1] - offsets[0]).astype(np.int64), 0)  # a NUL before each but the first
    return "\0".join(_strings(chunk)).encode("utf-8", "surrogatepass")


def _text_digest(texts: TextChunks) -> str:
    """sha256 over the sentences: their count, then each run of _HASH_CHUNK of them (counted from
    the first) as NUL + NUL-separated UTF-8, so the digest of a list and of the same sentences in
    other chunks, lists or Arrow arrays, agree (and cached models trained on either are found)."""
    h = hashlib.sha256(str(len(texts)).encode())
    run: list[Any] = []  # pieces of the current run of _HASH_CHUNK sentences
    in_run = 0

    def flush() -> None:
        h.update(b"\0")
        for k, piece in enumerate(run):
            if k:
                h.update(b"\0")
            h.update(_nul_joined(piece))
        run.clear()

    for chunk in texts.chunks():
        at = 0
        while at < len(chunk):
            take = min(_HASH_CHUNK - in_run, len(chunk) - at)
            run.append(chunk[at : at + take] if (at or take < len(chunk)) else chunk)
            at, in_run = at + take, in_run + take
            if in_run == _HASH_CHUNK:
                flush()
                in_run = 0
    if run:
        flush()
    return h.hexdigest()


def _cache_key(cfg: TokenizerConfig, role: str, text_digests: Sequence[str]) -> str:
    h = hashlib.sha256()
    opts = {k: getattr(cfg, k) for k in _SPM_OPTIONS}
    h.update(repr(sorted(opts.items())).encode())
    h.update(f"role={role};spm={spm.__version__};fmt={_FORMAT}".encode())
    for d in text_digests:
        h.update(d.encode())
    return h.hexdigest()[:24]


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Above this many sentences SentencePiece trains in a child process, reading them from a file the
# parent writes a chunk at a time: what SentencePiece allocates (several GB for a 2M-sentence
# sample) goes back to the system when the child exits, and the parent holds no copy meanwhile.
CHILD_PROCESS_SENTENCES = 200_000
_CHILD_ERROR = 3  # the child's exit status when SentencePiece itself refused (its message on stderr)


def _spm_options(cfg: TokenizerConfig) -> dict[str, Any]:
    return dict(
        model_type=cfg.model_type,
        vocab_size=int(cfg.vocab_size),
        character_coverage=float(cfg.character_coverage),
        input_sentence_size=int(cfg.input_sentence_size),
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        pad_id=cfg.pad_id,
        unk_id=cfg.unk_id,
        bos_id=cfg.bos_id,
        eos_id=cfg.eos_id,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=max(1, min(8, os.cpu_count() or 1)),
        minloglevel=2,
    )


def _nonempty(chunk: Sequence[str]) -> list[str]:
    return [t for t in chunk if t and not t.isspace()]


def _kept_chunks(texts: TextChunks, keep: Any = None) -> Iterator[list[str]]:
    """Each chunk's non-empty sentences, of those the boolean mask `keep` marks (all if None)."""
    at = 0
    for chunk in texts.lists():
        marks, at = (None if keep is None else keep[at : at + len(chunk)]), at + len(chunk)
        yield _nonempty(chunk if marks is None else [t for t, k in zip(chunk, marks) if k])


def sample_rows(n: int, size: int, seed: int) -> Any:
    """The sorted row numbers of a seeded random sample of `size` of n rows; None when size <= 0
    or n <= size (all of them). The tokenizer's training text is sampled with it (mt.data)."""
    if size <= 0 or n <= size:
        return None
    import numpy as np

    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _train_in_this_process(options: dict[str, Any], seed: int, sentences: Iterable[str]) -> bytes:
    writer = io.BytesIO()
    with _SAMPLING:  # the seed is process-wide: not while a Tokenizer.sample runs in another thread
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **options)
    return writer.getvalue()


# ---- learning from word counts (tokenizer.train_on=words)
# SentencePiece never lets a piece cross a space (split_by_whitespace, on by default), so its EM
# over sentences splits into independent sums over their words: the same objective comes from each
# distinct word once, weighted by its count (SentencePiece's "tsv" input). What it would not take
# from counts is the unigram seed vocabulary: it rebuilds the text, every word as often as it
# occurs, and finds frequent substrings with a suffix array over every character. The seeds are
# counted here instead, in tables that grow with the distinct words, not with the text.
# (A change to what _word_counts or _seed_pieces compute must bump _FORMAT: cached models.)
_SEED_PIECES = 1_000_000  # SentencePiece's seed_sentencepiece_size
_MAX_PIECE = 16  # and max_sentencepiece_length (characters), both left at their defaults
_WORDS_PER_PASS = 250_000  # distinct words whose substrings one counting pass holds at a time
_TSV_UNSAFE = ("\t", "\n", "\r")


def _words(sentence: str) -> list[str]:
    """The sentence's words, split at spaces, tabs and line breaks only: other characters that
    SentencePiece's normalizer turns into a space (or drops) stay inside a word and are normalized
    with it, as they would be in the sentence (tabs and line breaks cannot: the input is TSV)."""
    if any(c in sentence for c in _TSV_UNSAFE):
        sentence = sentence.replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return sentence.split(" ")


def _word_counts(sentences: Iterable[str]) -> collections.Counter[str]:
    """How often each word occurs in the sentences."""
    counts = collections.Counter(w for s in sentences for w in _words(s))
    counts.pop("", None)
    return counts


def _seed_pieces(words: dict[str, int], limit: int = _SEED_PIECES) -> list[tuple[str, int]]:
    """The unigram seed vocabulary from word counts, ranked as SentencePiece ranks its own, best
    first: every substring of 2.._MAX_PIECE characters of a normalized word (with its leading
    "\u2581"), counted as often as it occurs in the text (the word's count times its occurrences
    in the word); those seen at least twice, the `limit` with the highest count x length (ties: by
    the piece). SentencePiece adds the single characters itself and drops pieces it does not allow
    (e.g. across scripts). The substrings are counted in passes, each over those starting with
    one share of the character pairs, so that one pass's table stays small at any corpus size."""
    normalize = spm.SentencePieceNormalizer(rule_name="nmt_nfkc").normalize
    units = [("\u2581" + part, n) for word, n in words.items() for part in normalize(word).split("\u2581") if part]
    passes = max(1, -(-len(units) // _WORDS_PER_PASS))
    best: list[tuple[int, str, int]] = []  # a min-heap of (count x length, piece, count), at most `limit`
    for k in range(passes):
        counts: dict[str, int] = {}
        get = counts.get
        for w, n in units:
            for i in range(len(w) - 1):
                if passes > 1 and (ord(w[i]) * 131 + ord(w[i + 1])) % passes != k:
                    continue
                for j in range(i + 2, min(len(w), i + _MAX_PIECE) + 1):
                    piece = w[i:j]
                    counts[piece] = get(piece, 0) + n
        for piece, n in counts.items():
            if n < 2:
                continue
            entry = (n * len(piece), piece, n)
            if len(best) < limit:
                heapq.heappush(best, entry)
            elif entry > best[0]:
                heapq.heapreplace(best, entry)
        del counts
    return [(piece, n) for _, piece, n in sorted(best, reverse=True)]


def _train_on_words(options: dict[str, Any], seed: int, sentences: Iterable[str], workdir: str) -> bytes:
    """SentencePiece on the sentences' word counts, with the seed pieces counted by _seed_pieces
    (written best first: SentencePiece reads at most seed_sentencepiece_size of them)."""
    words = _word_counts(sentences)
    options = dict(options, input_format="tsv", input_sentence_size=0)
    unigram = str(options["model_type"]).lower() == "unigram"
    if unigram:
        options["seed_sentencepieces_file"] = seeds = os.path.join(workdir, "seeds.tsv")
        with open(seeds, "w", encoding="utf-8") as f:
            for piece, n in _seed_pieces(words):
                f.write(f"{piece}\t{n}\n")
    proto = _train_in_this_process(options, seed, (f"{w}\t{n}" for w, n in words.items()))
    return _without_trainer_option(proto, _SEED_FILE_FIELD) if unigram else proto


# The model records its training options (ModelProto field 2, TrainerSpec); the seed file's path
# among them (TrainerSpec field 54) is a temporary one. Dropped from the wire format directly:
# sentencepiece's generated protobuf module demands the protobuf version it was built with.
_TRAINER_SPEC_FIELD, _SEED_FILE_FIELD = 2, 54


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_fields(buf: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(field number, its key and length bytes, its value bytes) of each field of a message."""
    at = 0
    while at < len(buf):
        start = at
        key, at = _varint(buf, at)
        wire = key & 7
        if wire == 0:
            _, end = _varint(buf, at)
        elif wire == 1:
            end = at + 8
        elif wire == 5:
            end = at + 4
        elif wire == 2:
            size, at = _varint(buf, at)
            end = at + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield key >> 3, buf[start:at], buf[at:end]
        at = end


def _without_trainer_option(proto: bytes, field: int) -> bytes:
    """The serialized ModelProto without TrainerSpec field `field`; everything else byte for byte."""
    out = bytearray()
    for number, head, value in _proto_fields(proto):
        if number == _TRAINER_SPEC_FIELD:
            spec = b"".join(h + v for n, h, v in _proto_fields(value) if n != field)
            out += _encode_varint(number << 3 | 2) + _encode_varint(len(spec)) + spec
        else:
            out += head + value
    return bytes(out)


def _train(options: dict[str, Any], seed: int, sentences: Iterable[str], train_on: str, workdir: str) -> bytes:
    if train_on == "words":
        return _train_on_words(options, seed, sentences, workdir)
    return _train_in_this_process(options, seed, sentences)


def _train_from_file(options: dict[str, Any], seed: int, path: str, train_on: str) -> bytes:
    """The child process's work: the sentences of `path`, one a line."""
    with open(path, encoding="utf-8") as f:
        return _train(options, seed, (line.rstrip("\n") for line in f), train_on, os.path.dirname(path))


def _child_main(argv: Sequence[str]) -> None:
    """``python -c 'import mt.tokenizer as t; t._child_main(sys.argv[1:])' OPTIONS SEED SENTENCES MODEL TRAIN_ON``:
    train on the SENTENCES file, write the model to MODEL; SentencePiece's own refusal exits with
    _CHILD_ERROR and its message as the last line on stderr."""
    options, seed, path, out, train_on = json.loads(argv[0]), int(argv[1]), argv[2], argv[3], argv[4]
    try:
        proto = _train_from_file(options, seed, path, train_on)
    except (RuntimeError, ValueError) as e:
        print(" ".join(f"{type(e).__name__}: {e}".split()), file=sys.stderr, flush=True)
        raise SystemExit(_CHILD_ERROR) from None
    pathlib.Path(out).write_bytes(proto)


def _write_sentences(texts: TextChunks, path: str, keep: Any = None) -> int:
    """The non-empty sentences of `texts` (those `keep` marks, if given), one a line (a newline
    inside one becomes a space), written a chunk at a time; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for kept in _kept_chunks(texts, keep):
            if kept:
                f.write("\n".join(s.replace("\n", " ") for s in kept))
                f.write("\n")
                n += len(kept)
    return n


def _train_in_a_child(options: dict[str, Any], seed: int, path: str, train_on: str) -> bytes:
    """Train on the sentences of `path` in a fresh interpreter that imports only this module (not
    the training script and torch, as multiprocessing's spawn would)."""
    out = path + ".model"
    code = "import sys, mt.tokenizer as t; t._child_main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in sys.path if p])}  # mt importable as here
    cmd = [sys.executable, "-c", code, json.dumps(options), str(seed), path, out, train_on]
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    last = (r.stderr.strip().splitlines() or [""])[-1]
    if r.returncode == _CHILD_ERROR:
        raise RuntimeError(last.split(": ", 1)[-1])
    if r.returncode != 0:
        raise DataError(
            f"SentencePiece training in a child process failed (exit status {r.returncode}"
            f"{', killed: out of memory?' if r.returncode < 0 else ''}){': ' + last if last else ''}; "
            f"lower tokenizer.input_sentence_size to train on fewer sentences"
        )
    return pathlib.Path(out).read_bytes()


def _spm_train(cfg: TokenizerConfig, texts: Sequence[str] | TextChunks) -> bytes:
    """Train one SentencePiece model on `texts` (empty ones skipped) and return its serialized proto."""
    texts = TextChunks.of(texts)
    if cfg.train_on not in ("words", "sentences"):
        raise DataError(f"tokenizer.train_on={cfg.train_on!r}: use words or sentences")
    if 0 < cfg.input_sentence_size <= 100:  # SentencePiece refuses these
        raise DataError(
            f"tokenizer.input_sentence_size={cfg.input_sentence_size} is too small: use 0 "
            f"(all sentences) or a value above 100"
        )
    options = _spm_options(cfg)
    # Word counts are made from a sample drawn here; SentencePiece samples sentences itself.
    rows = sample_rows(len(texts), cfg.input_sentence_size, cfg.seed) if cfg.train_on == "words" else None
    keep = None
    if rows is not None:
        import numpy as np

        keep = np.zeros(len(texts), dtype=bool)
        keep[rows] = True
    with tempfile.TemporaryDirectory(prefix="mt-spm-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        in_memory: list[str] = []
        if len(texts) > CHILD_PROCESS_SENTENCES:
            n = _write_sentences(texts, path, keep)
        else:
            for kept in _kept_chunks(texts, keep):
                in_memory += kept
            n = len(in_memory)
        if not n:
            raise DataError("cannot train a tokenizer: the training text is empty")
        try:
            if not in_memory:
                return _train_in_a_child(options, int(cfg.seed), path, cfg.train_on)
            return _train(options, int(cfg.seed), in_memory, cfg.train_on, tmp)
        except (RuntimeError, ValueError) as e:
            msg = " ".join(str(e).split())
            raise DataError(
                f"SentencePiece training failed ({msg}); check tokenizer.vocab_size / "
                f"tokenizer.model_type / tokenizer.character_coverage"
            ) from None


def _train_or_load(
    cfg: TokenizerConfig,
    role: str,
    texts: TextChunks,
    cache_dir: pathlib.Path,
    log: Callable[[str], Any],
) -> bytes:
    key = _cache_key(cfg, role, [_text_digest(texts)])
    path = pathlib.Path(cache_dir) / "spm" / f"{key}.model"
    if path.is_file():
        proto = path.read_bytes()
        try:
            _load_proto(proto)
        except Exception:  # corrupt cache entry: retrain and overwrite it
            log(f"tokenizer: cached {role} model {path} is unreadable; retraining")
        else:
            log(f"tokenizer: loaded cached {role} model {path}")
            return proto
    log(f"tokenizer: training {role} {cfg.model_type} model (vocab_size={cfg.vocab_size}) on {len(texts)} sentences")
    proto = _spm_train(cfg, texts)
    _atomic_write(path, proto)
    log(f"tokenizer: saved {role} model to {path}")
    return proto


def train_tokenizer(
    cfg: TokenizerConfig,
    src_texts: Sequence[str] | TextChunks,
    tgt_texts: Sequence[str] | TextChunks,
    cache_dir: pathlib.Path,
    log: Callable[[str], Any] = print,
) -> Tokenizer:
    """Train SentencePiece on the training text, or load the cached model trained on the same
    text with the same options (``cache_dir/spm/<hash>.model``).

    joint: one model on src + tgt sentences; otherwise one model per side. The texts are lists of
    sentences or `TextChunks` (the same sentences give the same model and cache entry either way).
    """
    src, tgt = TextChunks.of(src_texts), TextChunks.of(tgt_texts)
    if cfg.joint:
        proto = _train_or_load(cfg, "joint", src + tgt, cache_dir, log)
        tok = Tokenizer(proto, None, cfg.pad_id, cfg.unk_id, cfg.bos_id, cfg.eos_id)
    else:
        src_proto = _train_or_load(cfg, "source", src, cache_dir, log)
        tgt_proto = _train_or_load(cfg, "target", tgt, cache_dir, log)
        tok = Tokenizer(src_proto, tgt_proto, cfg.pad_id, cfg.unk_id, cfg.bos_id, cfg.eos_id)
    return tok
