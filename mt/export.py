"""mt-export: turn a checkpoint into a model folder to publish on the Hugging Face Hub as it is.

    mt-export RUN/checkpoints/best.pt my-model
    mt-export RUN/checkpoints/best.pt my-model --repo-id USER/NAME --dataset bentrevett/multi30k
    mt-export CKPT my-model --force                   # replace an existing, non-empty my-model
    hf upload USER/NAME my-model                      # publish it (huggingface_hub's CLI)

Writes model.safetensors, config.json, the SentencePiece model(s) (mt/pretrained.py) and README.md,
a model card: YAML front matter (languages, library, tags, metrics, the dataset when it is a Hub id),
the validation scores stored in the checkpoint with their sacreBLEU signatures, the parameter
count, the training step, the command that trained it, how to use the folder and how to upload it.

The folder is written into a temporary folder beside OUT_DIR, read back and checked, then renamed
to OUT_DIR: a failure leaves no half-written model. An existing OUT_DIR that is not empty is
refused unless --force (then it is replaced). Errors print one `error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError, MTError, first_line

# the keys of a checkpoint's validation metrics the card reports, with their names
CARD_METRICS = (("bleu", "BLEU", "bleu"), ("chrf", "chrF", "chrf"), ("bleu_lc", "BLEU (case:lc)", "bleu"))
PLACEHOLDER_REPO = "USER/NAME"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mt-export",
        description="Write a checkpoint as a model folder (safetensors, config.json, SentencePiece, model card) "
        "ready for `hf upload USER/NAME OUT_DIR`.",
    )
    p.add_argument("checkpoint", help="checkpoint file, e.g. RUN/checkpoints/best.pt")
    p.add_argument("out_dir", help="the model folder to write")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR when it exists and is not empty")
    p.add_argument(
        "--repo-id",
        default=None,
        help=f"the Hub repository it will be uploaded to, used in the card's examples (default: {PLACEHOLDER_REPO})",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="Hub id of the training corpus for the card (default: data.path when it is a Hub id)",
    )
    p.add_argument(
        "--name", default=None, help="model name in the card (default: the last part of --repo-id or OUT_DIR)"
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the training command
def _override_value(v: Any) -> str:
    """`v` in Hydra's override grammar."""
    import re

    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    s = str(v)
    plain = re.fullmatch(r"[A-Za-z_/~][\w./:@+~-]*", s) and s.lower() not in ("null", "true", "false", "nan", "inf")
    return s if plain else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _diff(base: dict, cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        b = base.get(k)
        if isinstance(v, dict) and isinstance(b, dict):
            out += _diff(b, v, f"{prefix}{k}.")
        elif _plain(v) != _plain(b):
            out.append(f"{prefix}{k}={_override_value(v)}")
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _compose(overrides: list[str]) -> dict | None:
    """The TrainConfig (as a dict) that `mt-train *overrides` would train with; None when it
    cannot be composed here (no conf/ beside the package, a bad override)."""
    from .config import CONF_DIR, register_configs, to_dict

    if not (CONF_DIR / "train.yaml").is_file():
        return None
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf

        if GlobalHydra.instance().is_initialized():
            return None
        register_configs()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return to_dict(OmegaConf.to_object(compose("train", overrides=list(overrides))))
    except Exception:
        return None


def training_command(config: dict, checkpoint: str | os.PathLike) -> list[str] | None:
    """The `mt-train k=v ...` words that give exactly the checkpoint's config (its `config` as
    `to_dict` wrote it): the run's own overrides (RUN/.hydra/overrides.yaml beside
    RUN/checkpoints/) when they still give it, else the differences from conf/train.yaml's
    defaults. Each candidate is checked by composing it; None when neither gives the config."""
    import yaml

    from .config import from_dict, to_dict

    want = _plain_tree(to_dict(from_dict(config)))
    candidates = []
    hydra_file = Path(checkpoint).resolve().parent.parent / ".hydra" / "overrides.yaml"
    try:
        run_overrides = yaml.safe_load(hydra_file.read_text(encoding="utf-8")) if hydra_file.is_file() else None
    except (OSError, yaml.YAMLError):
        run_overrides = None
    if isinstance(run_overrides, list) and all(isinstance(o, str) for o in run_overrides):
        candidates.append(run_overrides)
    base = _compose([])
    if base is not None:
        candidates.append(_diff(base, want))
    for overrides in candidates:
        got = _compose(overrides)
        if got is not None and _plain_tree(got) == want:
            return ["mt-train", *overrides]
    return None


def _plain_tree(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain_tree(v) for k, v in d.items()}
    return _plain(d)


# ----------------------------------------------------------------------------- the model card
def _hub_dataset(data_path: str | None) -> str | None:
    from .pretrained import is_hub_id

    if data_path and not Path(data_path).expanduser().exists() and is_hub_id(data_path):
        return data_path
    return None


def _describe(cfg) -> str:
    m, t = cfg.model, cfg.tokenizer
    enc = f"{m.enc_layers}-layer {'bidirectional ' if m.bidirectional else ''}LSTM encoder"
    dec = f"{m.dec_layers}-layer LSTM decoder{' with input feeding' if m.input_feeding else ''}"
    vocab = f"joint vocabulary of {t.vocab_size}" if t.joint else f"{t.vocab_size} pieces per language"
    return (
        f"{enc}, {dec}, {m.attention} attention; embeddings {m.emb_dim}, hidden size {m.hidden_dim}; "
        f"SentencePiece {t.model_type}, {vocab}"
    )


def model_card(
    *,
    cfg,
    metrics: dict[str, Any],
    step: int,
    parameters: int,
    command: list[str] | None,
    config: dict,
    files: list[str],
    name: str,
    repo_id: str,
    dataset: str | None,
    out_dir: str,
) -> str:
    """README.md of the model folder: YAML front matter, then what the model is, its validation
    scores with their signatures, how it was trained, how to use and upload it."""
    import yaml

    src, tgt = cfg.data.src, cfg.data.tgt
    scores = [(key, label, kind, metrics[key]) for key, label, kind in CARD_METRICS if key in metrics]
    front: dict[str, Any] = {
        "language": [src, tgt],
        "library_name": "mt",
        "pipeline_tag": "translation",
        "tags": ["translation", "lstm", "seq2seq", f"{src}-{tgt}"],
    }
    if dataset:
        front["datasets"] = [dataset]
    if scores:
        front["metrics"] = sorted({kind for _, _, kind, _ in scores})
    if dataset and scores:
        front["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "translation", "name": f"Translation {src}-{tgt}"},
                        "dataset": {"type": dataset, "name": dataset, "split": cfg.data.valid_split},
                        "metrics": [
                            {"type": kind, "value": round(float(v), 2), "name": f"{label} (validation, greedy)"}
                            for _, label, kind, v in scores
                        ],
                    }
                ],
            }
        ]
    corpus = dataset or cfg.data.path
    valid_what = f"the {cfg.data.valid_split} split of {corpus}"
    if cfg.data.max_valid_examples:
        valid_what = f"the first {cfg.data.max_valid_examples} pairs of {valid_what[4:]}"
    lp = cfg.decoding.length_penalty
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}: {src} → {tgt} translation",
        "",
        f"An LSTM encoder-decoder with attention trained with `mt`: {_describe(cfg)}.",
        "",
        "| | |",
        "|---|---|",
        f"| direction | {src} → {tgt} |",
        f"| parameters | {parameters:,} |",
        f"| training step | {step:,} |",
        f"| corpus | {corpus} |",
        f"| decoding | beam {cfg.decoding.beam}, length penalty {'none' if lp is None else lp} |",
        "",
        "## Validation scores",
        "",
    ]
    if scores:
        lines += [
            f"On {valid_what} at step {step:,}, greedy search (as training validates), detokenized, "
            "scored with sacreBLEU:",
            "",
        ]
        for key, label, _, v in scores:
            sig = metrics.get(f"{key}_signature")
            lines.append(f"- {label} **{float(v):.2f}**" + (f" — `{sig}`" if sig else ""))
    else:
        lines.append("The checkpoint holds no validation scores.")
    lines += ["", "## Use", "", "With `mt` installed (`pip install -e .` in its repository):", "", "```sh"]
    lines += [
        f"echo 'a sentence in {src}' | mt-translate --checkpoint {repo_id}",
        f"mt-translate --checkpoint path/to/this/folder < test.{src} > test.hyp.{tgt}",
        f"mt-evaluate checkpoint={repo_id} data.path=/path/to/corpus split=test",
        "```",
        "",
        "```python",
        "from mt.translator import Translator",
        "",
        f'tr = Translator.from_pretrained("{repo_id}")  # or a local folder; revision="<commit>" pins a version',
        'print(tr.translate(["a sentence"])[0].text)',
        "```",
        "",
        "## Training",
        "",
    ]
    if command:
        lines += ["```sh", " ".join(shlex.quote(w) for w in command), "```"]
    else:
        keep = {k: config[k] for k in ("data", "tokenizer", "model", "optim", "trainer", "decoding") if k in config}
        lines += [
            "The training config (`mt-train` with these settings):",
            "",
            "```yaml",
            yaml.safe_dump(keep, sort_keys=False, allow_unicode=True).rstrip(),
            "```",
        ]
    lines += [
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "",
        "## Upload",
        "",
        "```sh",
        "hf auth login",
        f"hf upload {repo_id} {shlex.quote(out_dir)}",
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export
def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def export(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    repo_id: str | None = None,
    dataset: str | None = None,
    name: str | None = None,
) -> Path:
    """Write the model folder of `checkpoint` to `out_dir` (see the module doc). Returns out_dir.
    A missing or unusable checkpoint or a non-empty out_dir without `force`: one-line MTError."""
    import torch

    from . import pretrained
    from .checkpoint import load_checkpoint
    from .config import from_dict, to_dict
    from .model import count_parameters
    from .tokenizer import Tokenizer
    from .translator import build_model

    out = Path(out_dir)
    if out.is_symlink():  # the rename below would replace the link, not the folder it points to
        raise MTError(f"{out} is a symbolic link; export to the folder itself ({out.resolve()})")
    if out.exists() and not out.is_dir():
        raise MTError(f"{out} exists and is not a folder")
    if out.is_dir() and not _is_empty_dir(out):
        if not force:
            raise MTError(f"{out} is not empty; use --force to replace it")
        _check_replaceable(out, Path(checkpoint))
    state = load_checkpoint(checkpoint, map_location="cpu")
    where = f"checkpoint {checkpoint}"
    try:
        cfg = from_dict(state["config"])
        tok = Tokenizer.from_state_dict(state["tokenizer"])
    except Exception as e:
        raise CheckpointError(f"{where} has an unusable config or tokenizer: {first_line(e)}") from None
    saved_cell = cfg.model.cell
    model = build_model(cfg, tok, state["model"], where, "torch", torch.device("cpu"))  # checks the weights fit
    cfg.model.cell = saved_cell  # the folder keeps the checkpoint's backend choice
    metrics = dict(state.get("metrics") or {})
    step = int(state["step"])
    training = {
        "step": step,
        "epoch": state.get("epoch"),
        "best_bleu": state.get("best_bleu"),
        "validation": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }
    repo_id = repo_id or PLACEHOLDER_REPO
    name = name or (repo_id.split("/")[-1] if repo_id != PLACEHOLDER_REPO else out.resolve().name)
    dataset = dataset or _hub_dataset(cfg.data.path)
    command = training_command(to_dict(cfg), checkpoint)

    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the published folder private
        pretrained.write_folder(tmp, cfg, tok, model.state_dict(), training)
        files = sorted(p.name for p in tmp.iterdir()) + [pretrained.CARD]
        card = model_card(
            cfg=cfg,
            metrics=metrics,
            step=step,
            parameters=count_parameters(model),
            command=command,
            config=to_dict(cfg),
            files=sorted(files),
            name=name,
            repo_id=repo_id,
            dataset=dataset,
            out_dir=str(out_dir),
        )
        (tmp / pretrained.CARD).write_text(card, encoding="utf-8")
        for f in tmp.iterdir():  # safetensors writes its file private too
            os.chmod(f, 0o666 & ~umask)
        # read it back: the folder must rebuild exactly these weights
        _, _, weights, _ = pretrained.load_folder(tmp, f"the exported folder {tmp}")
        want = model.state_dict()
        if set(weights) != set(want) or not all(torch.equal(weights[k], want[k]) for k in want):
            raise CheckpointError(f"the exported weights in {tmp} differ from {where}")
        _replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_replaceable(out: Path, checkpoint: Path) -> None:
    """--force replaces an earlier export, never a folder holding the checkpoint, the working
    directory or anything else (a training run, say)."""
    from . import pretrained

    target = out.resolve()
    for inside, what in ((checkpoint.resolve(), "the checkpoint"), (Path.cwd().resolve(), "the working directory")):
        if inside == target or target in inside.parents:
            raise MTError(f"{out} holds {what}; export to another folder")
    try:
        earlier = json.loads((out / pretrained.CONFIG).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != pretrained.FORMAT:
        raise MTError(f"{out} is not an earlier mt-export folder; --force only replaces one of those")


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and removed only after."""
    if not out.exists() or _is_empty_dir(out):
        os.replace(tmp, out)  # an empty folder is replaced by the rename itself
        return
    if not force:  # it was empty when the export began: someone is writing there
        raise MTError(f"{out} was filled during the export; nothing was replaced")
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export(
            args.checkpoint, args.out_dir, force=args.force, repo_id=args.repo_id, dataset=args.dataset, name=args.name
        )
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files}")
    print(f"upload with: hf upload {args.repo_id or PLACEHOLDER_REPO} {shlex.quote(str(args.out_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
