"""mt-translate: translate text with a trained model, a Unix filter (one output line per input line).

Installed as the `mt-translate` command; also `python -m mt.translate` and `python scripts/translate.py`.

    mt-translate --checkpoint outputs/DATE/TIME/checkpoints/best.pt < test.de > test.hyp.en
    mt-translate --checkpoint CKPT --input test.de --output test.hyp.en --beam 5 --length-penalty 1.0
    mt-translate --checkpoint CKPT --beam 1 --length-penalty none < in.de   # greedy search
    mt-translate --checkpoint CKPT --nbest 5 < in.de            # i ||| hypothesis ||| score
    mt-translate --checkpoint CKPT --print-scores < in.de       # score<TAB>hypothesis
    mt-translate --checkpoint CKPT --align < in.de              # hypothesis<TAB>0-0 1-2 ...
    mt-translate --checkpoint CKPT --plot-attention attn.png --input in.de
    mt-translate --checkpoint CKPT                              # on a terminal: interactive
    mt-translate -c CKPT_A -c CKPT_B < in.de                    # an ensemble (mt/ensemble.py)
    mt-translate --checkpoint CKPT --input in.de --score-targets hyp.en   # score given translations
    mt-translate --checkpoint CKPT --input in.de --rescore in.nbest       # rescore an n-best list

Output (stdout or --output; logs, warnings and the progress bar go to stderr):
  plain        the detokenized translation; an empty input line gives an empty output line
  --print-scores   `score<TAB>translation` (score: log-prob / length penalty, higher is better)
  --align      `translation<TAB>alignment`, the alignment being space-separated `s-t` pairs, 0-based
               SentencePiece positions: for output piece t, s is the source piece with the highest
               attention weight (source EOS excluded). Combined with --print-scores:
               `score<TAB>translation<TAB>alignment`.
  --nbest N    Moses style, N lines per input line, best first: `i ||| translation ||| score`
               (i = 0-based input line index), with --align `i ||| translation ||| score ||| alignment`;
               an empty input line gives the single line `i |||  ||| 0.0000`.
  --score-targets FILE   no translating: one line per input line scoring FILE's line,
               `score<TAB>log_prob<TAB>ntokens<TAB>token log-probs` (--score-format json: JSON lines)
  --rescore NBEST  no translating: the n-best list (--nbest format) with this model's scores, best
               first per input line (mt/scoring.py; docs/decoding.md, "Scoring given translations")

Input is read as bytes and decoded as UTF-8; invalid bytes become U+FFFD with a warning naming
the line. Lines are processed in chunks of --chunk-size lines: each chunk is sorted by length into
batches of --batch-size sentences, translated, written back in input order and flushed, so a
failure part-way keeps everything written before it. Lines with more than --max-length source
pieces (default: the checkpoint's data.max_src_len) are truncated with a warning.
--checkpoint takes a checkpoint file, a model folder written by mt-export or a Hugging Face model
id (`Translator.load`); given more than once, the models decode as one ensemble, averaging
their log-probabilities (or, with --ensemble-combine prob, their probabilities) at every step;
they must share the tokenizer. A missing or corrupt checkpoint or model, models that cannot form
an ensemble, or an unknown device, prints one `error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import BinaryIO, TextIO

log = logging.getLogger("mt.translate")


def add_device_args(p: argparse.ArgumentParser, cell: bool = True) -> None:
    """--device, --cell and --cuda-graphs: where and how a loaded model decodes. Every command that
    loads a model for decoding takes them (mt-translate, mt-serve, tune_decoding, bench_decode)."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    if cell:
        p.add_argument(
            "--cell", default=None, help="gate-cell backend: auto, torch, triton, cudnn (default: the checkpoint's)"
        )
    p.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=["auto", "true", "false"],
        help="replay search steps from CUDA graphs (auto: on with CUDA)",
    )


def add_combine_arg(p: argparse.ArgumentParser) -> None:
    """--ensemble-combine: how an ensemble (a model option given several times) averages its models."""
    p.add_argument(
        "--ensemble-combine",
        default="logprob",
        choices=["logprob", "prob"],
        help="with several models: average their log-probabilities (logprob) or probabilities (prob) at each step",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Translate text with a trained mt checkpoint (stdin -> stdout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        action="append",
        help="checkpoint file (e.g. RUN/checkpoints/best.pt), model folder (mt-export) or Hugging Face model id "
        "USER/NAME; give it again for an ensemble of the models (same tokenizer)",
    )
    add_combine_arg(p)
    p.add_argument(
        "--revision", default=None, help="with a Hugging Face model id: branch, tag or commit (default main)"
    )
    p.add_argument("--input", "-i", help="input file, one sentence per line (default: stdin)")
    p.add_argument("--output", "-o", help="output file (default: stdout)")
    p.add_argument(
        "--beam",
        "-b",
        type=int,
        default=None,
        help="beam size (1 with --length-penalty none = greedy); default: the checkpoint's decoding.beam",
    )
    p.add_argument(
        "--length-penalty",
        "--lp",
        default="checkpoint",
        help="GNMT alpha: score / ((5+len)/6)^alpha; 'avg': score / len; 'none' or 0: raw log-prob; "
        "'checkpoint': the checkpoint's decoding.length_penalty",
    )
    p.add_argument(
        "--nbest",
        type=int,
        default=None,
        help="print the N best hypotheses per line, Moses style: i ||| hypothesis ||| score",
    )
    p.add_argument("--print-scores", action="store_true", help="prefix each translation with its score and a TAB")
    p.add_argument(
        "--align", action="store_true", help="append a TAB and src-tgt piece alignments (highest attention weight)"
    )
    p.add_argument(
        "--plot-attention",
        metavar="FILE.png",
        help="write the attention heatmap of the first (non-empty) sentence to this image",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max source pieces per line, longer lines are truncated (default: the checkpoint's data.max_src_len)",
    )
    p.add_argument("--max-len-a", type=float, default=1.5, help="output length limit a * source length + b: a")
    p.add_argument("--max-len-b", type=int, default=10, help="output length limit a * source length + b: b")
    add_device_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="sentences per decoding batch")
    p.add_argument("--chunk-size", type=int, default=1000, help="lines read, translated and flushed at a time")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
    from mt import scoring

    scoring.add_args(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------- reading
def decode_line(raw: bytes, lineno: int, where: str | None = None) -> str:
    """Bytes of one line (newline removed) -> text; invalid UTF-8 is replaced, with a warning
    (naming the file `where` too, when given)."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning(
            "%sline %d: invalid UTF-8 (byte 0x%02x at column %d); undecodable bytes replaced by U+FFFD",
            f"{where} " if where else "",
            lineno,
            raw[e.start],
            e.start + 1,
        )
        return raw.decode("utf-8", errors="replace")


def read_chunks(stream: BinaryIO, size: int):
    """Yield (first line number, [lines]) chunks of at most `size` decoded lines."""
    chunk: list[str] = []
    first = 1
    for lineno, raw in enumerate(stream, start=1):
        chunk.append(decode_line(raw.rstrip(b"\n"), lineno))
        if len(chunk) >= size:
            yield first, chunk
            first, chunk = lineno + 1, []
    if chunk:
        yield first, chunk


# ------------------------------------------------------------------------------- writing
def alignment_str(hyp) -> str:
    return " ".join(f"{s}-{t}" for s, t in hyp.alignment())


def format_lines(index: int, is_empty: bool, hyps: list, args: argparse.Namespace) -> list[str]:
    """Output lines for input line `index` (0-based) given its hypotheses (best first)."""
    if args.nbest is not None:
        if is_empty:
            return [f"{index} |||  ||| {0.0:.4f}"]
        out = []
        for h in hyps:
            line = f"{index} ||| {h.text} ||| {h.score:.4f}"
            if args.align:
                line += f" ||| {alignment_str(h)}"
            out.append(line)
        return out
    if is_empty:
        return [""]
    h = hyps[0]
    fields = ([f"{h.score:.4f}"] if args.print_scores else []) + [h.text]
    if args.align:
        fields.append(alignment_str(h))
    return ["\t".join(fields)]


def translate_chunk(tr, lines: list[str], first: int, args: argparse.Namespace, lp) -> list[list]:
    nbest = args.nbest or 1
    out = tr.translate(
        lines,
        beam=args.beam,
        length_penalty=lp,
        nbest=nbest,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        batch_size=args.batch_size,
        max_src_len=args.max_length,
        first_line=first,
    )
    return out if nbest > 1 else [[h] for h in out]


class Plotter:
    """Writes the attention plot of the first non-empty sentence, once."""

    def __init__(self, path: str | None):
        self.path = path
        self.done = path is None

    def offer(self, first: int, lines: list[str], hyps: list[list]) -> None:
        if self.done:
            return
        from mt.translator import plot_attention

        for k, (line, hs) in enumerate(zip(lines, hyps)):
            if line.strip() and hs and hs[0].attention.numel():
                self.done = True
                try:  # a plot is a side product: it must not stop the translation
                    plot_attention(hs[0], self.path)
                except (OSError, ValueError) as e:
                    log.warning("could not write the attention plot to %s: %s", self.path, e)
                    return
                log.info("attention plot of line %d written to %s", first + k, self.path)
                return


def _check_plot_path(path: str) -> None:
    """Refuse an unwritable --plot-attention path before translating anything."""
    from mt.errors import MTError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MTError(f"--plot-attention: folder {folder} does not exist")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    if ext not in supported:
        raise MTError(f"--plot-attention: unsupported image type {ext!r}; use one of {', '.join(sorted(supported))}")


# ------------------------------------------------------------------------------- main
def describe_models(sources: list[str], combine: str) -> str:
    """The model(s) for a log line: the one source, or "an ensemble of N (combine): a, b"."""
    if len(sources) == 1:
        return str(sources[0])
    return f"an ensemble of {len(sources)} ({combine}): {', '.join(map(str, sources))}"


def open_output(path: str | None) -> TextIO:
    if path:
        return open(path, "w", encoding="utf-8", newline="\n")
    sys.stdout.reconfigure(encoding="utf-8", errors="replace", newline="\n")  # type: ignore[union-attr]
    return sys.stdout


def interactive(tr, args: argparse.Namespace, lp, out: TextIO, plotter: Plotter) -> None:
    print(f"translating {tr.src_lang} -> {tr.tgt_lang}; type a sentence, Ctrl-D to quit", file=sys.stderr)
    lineno = 0
    stdin = sys.stdin.buffer
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        raw = stdin.readline()
        if not raw:
            print(file=sys.stderr)
            return
        lineno += 1
        line = decode_line(raw.rstrip(b"\n"), lineno)
        hyps = translate_chunk(tr, [line], lineno, args, lp)
        for text in format_lines(lineno - 1, not line.strip(), hyps[0], args):
            out.write(text + "\n")
        out.flush()
        plotter.offer(lineno, [line], hyps)


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from mt import scoring
    from mt.errors import MTError
    from mt.search import parse_length_penalty
    from mt.translator import Translator, is_checkpoint_default

    if args.beam is not None and args.beam < 1:
        raise MTError(f"--beam must be >= 1 (got {args.beam})")
    if args.nbest is not None and args.beam is not None and not 1 <= args.nbest <= args.beam:
        raise MTError(f"--nbest must be between 1 and --beam ({args.beam}); got {args.nbest}")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise MTError("--batch-size and --chunk-size must be >= 1")
    if args.max_length is not None and args.max_length < 1:
        raise MTError(f"--max-length must be >= 1 (got {args.max_length})")
    if not is_checkpoint_default(args.length_penalty):
        parse_length_penalty(args.length_penalty)  # a bad value fails before the checkpoint loads
    if args.input and not (os.path.exists(args.input) and os.access(args.input, os.R_OK)):
        raise MTError(f"input file not found or not readable: {args.input}")  # pipes and /dev/stdin are fine
    nbest_entries = None
    if scoring.wanted(args):
        nbest_entries = scoring.check_args(args)  # before the model loads
    elif args.plot_attention:
        _check_plot_path(args.plot_attention)

    tr = Translator.load(
        args.checkpoint,
        revision=args.revision,
        device=args.device,
        cell=args.cell,
        cuda_graphs=args.cuda_graphs,
        combine=args.ensemble_combine,
    )
    args.beam, lp = tr.decoding(args.beam, args.length_penalty)  # the checkpoint's unless given
    if args.nbest is not None and not 1 <= args.nbest <= args.beam:
        raise MTError(f"--nbest must be between 1 and the beam size {args.beam}; got {args.nbest}")
    log.info(
        "loaded %s: %s -> %s on %s (beam %d, length penalty %s)",
        describe_models(args.checkpoint, args.ensemble_combine),
        tr.src_lang,
        tr.tgt_lang,
        tr.device,
        args.beam,
        lp,
    )
    if scoring.wanted(args):
        scoring.run_cli(tr, args, lp, nbest_entries)
        return
    plotter = Plotter(args.plot_attention)
    out = open_output(args.output)
    try:
        if not args.input and sys.stdin.isatty():
            interactive(tr, args, lp, out, plotter)
            return
        from .corpus_files import count_lines

        total = count_lines(args.input) if args.input and os.path.isfile(args.input) else None  # never eat a pipe
        stream = open(args.input, "rb") if args.input else sys.stdin.buffer
        try:
            with tqdm(
                total=total, unit="line", desc="translate", disable=None, file=sys.stderr, dynamic_ncols=True
            ) as bar:
                for first, lines in read_chunks(stream, args.chunk_size):
                    hyps = translate_chunk(tr, lines, first, args, lp)
                    for k, (line, hs) in enumerate(zip(lines, hyps)):
                        for text in format_lines(first - 1 + k, not line.strip(), hs, args):
                            out.write(text + "\n")
                    out.flush()
                    bar.update(len(lines))
                    plotter.offer(first, lines, hyps)
        finally:
            if args.input:
                stream.close()
    finally:
        if out is not sys.stdout:
            out.close()
    if not plotter.done:
        log.warning("--plot-attention: no non-empty input line, nothing plotted")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr, format="%(levelname)s: %(message)s"
    )
    from mt.errors import MTError

    try:
        run(args)
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # unreadable input, unwritable output...
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
