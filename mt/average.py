"""mt-average: the mean of several checkpoints' weights, as one checkpoint every command loads.

    mt-average RUN/checkpoints/step_3000.pt RUN/checkpoints/step_3300.pt -o RUN/checkpoints/avg.pt
    mt-average --last 4 RUN -o RUN/checkpoints/avg.pt    # the newest 4 step_<k>.pt of a run
    mt-average --best 4 RUN -o RUN/checkpoints/avg.pt    # the 4 with the best validation BLEU
    python -m mt.average ...                             # the same

A run keeps step_<k>.pt files with `trainer.keep_last=N` (`trainer.average_last=N` averages them
at the end of training itself and validates the result). The checkpoints must share the model
config, tokenizer, language pair and parameter shapes; otherwise a one-line error (exit 2). The
output holds the first checkpoint's config and tokenizer, the newest step, and `averaged`: the
files and steps that went in. It has no optimizer state: training resumes from last.pt, not
from an average. mt-evaluate, mt-translate, mt-serve and mt-export load it like any checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .averaging import average_checkpoints, choose_for_average
from .checkpoint import save_checkpoint
from .errors import MTError

log = logging.getLogger("mt.average")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mt-average",
        description="Average the weights of checkpoints (given, or the last/best N of a run) into one checkpoint.",
    )
    p.add_argument("checkpoints", nargs="*", help="checkpoint files; with --last/--best: one run folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--last", type=int, metavar="N", help="the newest N step_<k>.pt of the run folder")
    group.add_argument("--best", type=int, metavar="N", help="the N step_<k>.pt with the best validation BLEU")
    p.add_argument("--output", "-o", required=True, help="the checkpoint to write (written atomically)")
    return p.parse_args(argv)


def checkpoint_dir(run: str) -> Path:
    """A run folder (with checkpoints/ inside) or its checkpoints folder."""
    path = Path(run)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise MTError(f"not a run folder: {run}")


def inputs(args: argparse.Namespace) -> list[Path]:
    """The checkpoints to average, oldest first where a run folder is given."""
    n = args.last if args.last is not None else args.best
    if n is None:
        if not args.checkpoints:
            raise MTError("give checkpoint files, or --last N / --best N and a run folder")
        return [Path(p) for p in args.checkpoints]
    if len(args.checkpoints) != 1:
        raise MTError("--last/--best take exactly one run folder")
    return choose_for_average(checkpoint_dir(args.checkpoints[0]), n, by="last" if args.last is not None else "best")


def run(args: argparse.Namespace) -> Path:
    paths = inputs(args)
    out = Path(args.output)
    if any(out.resolve() == p.resolve() for p in paths if p.exists()):
        raise MTError(f"--output {out} is one of the checkpoints being averaged; write it elsewhere")
    state = average_checkpoints(paths)
    save_checkpoint(state, out)
    log.info(
        "averaged %d checkpoints (steps %s) -> %s", len(paths), ", ".join(map(str, state["averaged"]["steps"])), out
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s: %(message)s")
    try:
        run(args)
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable output folder...
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
