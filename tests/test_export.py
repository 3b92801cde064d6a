"""mt-export and model folders (mt/export.py, mt/pretrained.py): the folder's files, the model card,
Translator.from_pretrained / Translator.load from a folder and from an offline Hugging Face cache,
and the commands that take a checkpoint given a folder instead."""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_STEPS

from mt import pretrained
from mt.errors import CheckpointError
from mt.export import main as export_main
from mt.translator import Translator

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = [
    "hund sieht katze",
    "rot auto und blau haus",
    "",
    "klein kind hat gross tisch schnell",
    "frau liest buch nicht",
]
FILES = {"README.md", "config.json", "model.safetensors", "sentencepiece.model"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "toy-de-en"
    assert export_main([str(ckpt), str(out), "--repo-id", "someone/toy-de-en"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(ckpt) -> Translator:
    return Translator.from_checkpoint(ckpt, device="cpu")


def same_translations(a: Translator, b: Translator) -> None:
    for beam, lp, nbest in ((1, None, 1), (5, 1.0, 1), (4, "avg", 3)):
        x = a.translate(LINES, beam=beam, length_penalty=lp, nbest=nbest)
        y = b.translate(LINES, beam=beam, length_penalty=lp, nbest=nbest)
        flat = (lambda r: [h for hs in r for h in hs]) if nbest > 1 else list
        assert [(h.text, h.score, h.tokens) for h in flat(x)] == [(h.text, h.score, h.tokens) for h in flat(y)]
        for hx, hy in zip(flat(x), flat(y)):
            assert torch.equal(hx.attention, hy.attention)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ----------------------------------------------------------------------------- the folder
def test_the_folder_has_exactly_its_files_in_open_formats(exported, ckpt):
    from safetensors.torch import load_file

    assert {p.name for p in exported.iterdir()} == FILES
    config = json.loads((exported / "config.json").read_text(encoding="utf-8"))
    state = torch.load(ckpt, weights_only=True)
    assert config["format"] == "mt-pretrained" and (config["src_lang"], config["tgt_lang"]) == ("de", "en")
    assert config["model"] == state["config"]["model"] and config["decoding"] == state["config"]["decoding"]
    assert config["sentencepiece"]["files"] == ["sentencepiece.model"]
    assert config["training"]["step"] == state["step"]
    weights = load_file(exported / "model.safetensors")
    # the tied output layer is stored once, under the embedding's name
    assert config["tied_weights"] == {"decoder.generator.weight": "decoder.embedding.weight"}
    assert set(weights) == set(state["model"]) - {"decoder.generator.weight"}
    for k, v in weights.items():
        assert torch.equal(v, state["model"][k]), k
    assert (exported / "sentencepiece.model").read_bytes() == state["tokenizer"]["src_model"]
    assert not list(exported.parent.glob(".toy-de-en.*"))  # no temporary folder left beside it


def test_the_model_card(exported, ckpt):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mt.config import to_dict
    from mt.model import count_parameters

    card = (exported / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["language"] == ["de", "en"] and meta["library_name"] == "mt"
    assert "translation" in meta["tags"] and set(meta["metrics"]) == {"bleu", "chrf"}
    assert "datasets" not in meta and "model-index" not in meta  # a local corpus has no Hub id
    state = torch.load(ckpt, weights_only=True)
    m = state["metrics"]
    for key in ("bleu", "chrf", "bleu_lc"):
        assert f"**{m[key]:.2f}** — `{m[key + '_signature']}`" in card
    n = count_parameters(Translator.from_checkpoint(ckpt, device="cpu").model)
    assert f"| parameters | {n:,} |" in card and f"| training step | {state['step']:,} |" in card
    assert "hf upload someone/toy-de-en " in card and 'Translator.from_pretrained("someone/toy-de-en")' in card
    assert "mt-translate --checkpoint someone/toy-de-en" in card
    # the training command: mt-train + overrides that compose to the checkpoint's exact config
    block = card.split("## Training\n\n```sh\n")[1].split("\n```")[0]
    words = shlex.split(block)
    assert words[0] == "mt-train" and all("=" in w for w in words[1:])
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = to_dict(OmegaConf.to_object(compose("train", overrides=words[1:])))
    assert json.loads(json.dumps(cfg)) == json.loads(json.dumps(state["config"]))


def test_the_card_names_a_hub_dataset_with_its_scores(ckpt, tmp_path):
    out = tmp_path / "m"
    assert export_main([str(ckpt), str(out), "--dataset", "bentrevett/multi30k", "--name", "toy"]) == 0
    meta = front_matter((out / "README.md").read_text(encoding="utf-8"))
    assert meta["datasets"] == ["bentrevett/multi30k"]
    (result,) = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "toy" and result["dataset"]["type"] == "bentrevett/multi30k"
    bleu = torch.load(ckpt, weights_only=True)["metrics"]["bleu"]
    assert {r["type"]: r["value"] for r in result["metrics"]}["bleu"] == round(bleu, 2)
    assert "hf upload USER/NAME " in (out / "README.md").read_text(encoding="utf-8")


def test_the_card_without_a_command_or_scores_shows_the_config(ckpt, tmp_path, monkeypatch):
    """Where no mt-train command composes to the checkpoint's config (here: no conf/ to compose
    from, as in an installed wheel), the card gives the config itself; a checkpoint without
    validation scores claims none."""
    import mt.export

    state = torch.load(ckpt, weights_only=True)
    state["metrics"] = {}
    torch.save(state, tmp_path / "no-scores.pt")
    monkeypatch.setattr(mt.export, "_compose", lambda overrides: None)
    assert export_main([str(tmp_path / "no-scores.pt"), str(tmp_path / "m")]) == 0
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert "metrics" not in front_matter(card) and "The checkpoint holds no validation scores." in card
    config = yaml.safe_load(card.split("## Training\n")[1].split("```yaml\n")[1].split("```")[0])
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(state["config"]))


def test_training_command_prefers_the_runs_own_overrides(ckpt, tmp_path):
    """RUN/.hydra/overrides.yaml beside RUN/checkpoints/ is used when it gives the checkpoint's
    config; overrides that do not (the run was resumed with others) fall back to the differences."""
    from mt.export import training_command

    config = torch.load(ckpt, weights_only=True)["config"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    shutil.copy(ckpt, run / "checkpoints" / "best.pt")
    overrides = [
        "debug=tiny",
        f"data.path={config['data']['path']}",
        f"data.cache_dir={config['data']['cache_dir']}",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        f"trainer.max_steps={TINY_STEPS}",
        f"trainer.eval_every={TINY_STEPS // 2}",
        "trainer.progress=false",
        "model.cell=torch",
    ]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    assert training_command(config, run / "checkpoints" / "best.pt") == ["mt-train", *overrides]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides[:-1]), encoding="utf-8")
    words = training_command(config, run / "checkpoints" / "best.pt")
    assert words[0] == "mt-train" and "debug=tiny" not in words and "model.cell=torch" in words


# ----------------------------------------------------------------------------- loading
def test_from_pretrained_translates_exactly_as_the_checkpoint(exported, reference):
    tr = Translator.from_pretrained(exported, device="cpu")
    assert tr.config.decoding == reference.config.decoding and tr.config.model == reference.config.model
    assert tr.max_src_len == reference.max_src_len
    same_translations(reference, tr)
    assert tr.model.decoder.generator.weight is tr.model.decoder.embedding.weight  # still tied


def test_load_dispatches_file_folder_and_hub_id(exported, ckpt, tmp_path):
    for model in (ckpt, str(exported)):
        assert Translator.load(model, device="cpu").translate(["hund sieht katze"])[0].text == "dog sees cat"
    with pytest.raises(CheckpointError, match=r"^checkpoint not found: .*none\.pt$"):
        Translator.load(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="revision"):
        Translator.load(exported, revision="main")
    with pytest.raises(CheckpointError, match="revision"):
        Translator.load(ckpt, revision="main")
    with pytest.raises(CheckpointError, match="not a model folder"):
        Translator.from_pretrained(ckpt)


def test_hub_ids():
    for s in ("user/name", "Helsinki-NLP/opus-mt-de-en", "a.b/c_d-1"):
        assert pretrained.is_hub_id(s), s
    for s in ("name", "runs/x/best.pt", "run/best.pt", "./run", "/abs/run", "~/run", "../x/y", "a/b/c", "a//b", "a/b."):
        assert not pretrained.is_hub_id(s), s


def hub_cache(root, folder, repo="user/name", commit=COMMIT):
    """A Hugging Face cache holding `folder` as model `repo` at `commit`, branch main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def offline_hub(exported, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at a cache with user/name in it."""
    import huggingface_hub.constants as hf_constants

    cache = hub_cache(tmp_path / "hub", exported)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read both when it was imported: point its constants at them too
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_loads_from_the_cache_offline(offline_hub, reference):
    by_id = Translator.from_pretrained("user/name", device="cpu")
    same_translations(reference, by_id)
    pinned = Translator.load("user/name", revision=COMMIT, device="cpu")
    assert pinned.translate(["rot auto und blau haus"], beam=2)[0].text == "red car and blue house"


def test_a_hub_id_not_in_the_cache_is_one_line(offline_hub):
    for call in (
        lambda: Translator.load("user/other", device="cpu"),
        lambda: Translator.from_pretrained("user/name", revision="v2", device="cpu"),
    ):
        with pytest.raises(CheckpointError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "not in the cache" in msg and "offline" in msg, msg
    with pytest.raises(CheckpointError, match="model not found"):
        Translator.from_pretrained("no-such-folder", device="cpu")


def test_the_cache_dir_argument(exported, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = hub_cache(tmp_path / "elsewhere", exported, repo="team/model")
    tr = Translator.from_pretrained("team/model", cache_dir=cache, device="cpu")
    assert tr.translate(["katze sieht hund"], beam=1, length_penalty=None)[0].text == "cat sees dog"


def test_broken_folders_are_one_line_errors(exported, tmp_path):
    def broken(name, fix):
        d = tmp_path / name
        shutil.copytree(exported, d)
        fix(d)
        with pytest.raises(CheckpointError) as e:
            Translator.from_pretrained(d, device="cpu")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "lacks sentencepiece.model" in broken("no-spm", lambda d: (d / "sentencepiece.model").unlink())
    assert "lacks model.safetensors" in broken("no-weights", lambda d: (d / "model.safetensors").unlink())
    assert "lacks config.json" in broken("no-config", lambda d: (d / "config.json").unlink())
    msg = broken("corrupt", lambda d: (d / "model.safetensors").write_bytes(b"\x07" * 100))
    assert "corrupt or unreadable model.safetensors" in msg

    def truncate(d):
        blob = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])

    assert "corrupt or unreadable" in broken("truncated", truncate)
    assert "config.json" in broken("bad-json", lambda d: (d / "config.json").write_text("{not json"))

    def wrong_shape(d):
        c = json.loads((d / "config.json").read_text())
        c["model"]["enc_layers"] += 1
        (d / "config.json").write_text(json.dumps(c))

    assert "does not fit its own model config" in broken("mismatch", wrong_shape)

    for key, value in (("sentencepiece", "joint"), ("tied_weights", ["a", "b"]), ("training", [1])):

        def wrong_type(d, key=key, value=value):
            c = json.loads((d / "config.json").read_text())
            c[key] = value
            (d / "config.json").write_text(json.dumps(c))

        assert f"field {key!r} must be an object" in broken(f"type-{key}", wrong_type)


def test_separate_vocabularies_and_shared_embeddings_round_trip(ckpt, tmp_path):
    """Two SentencePiece files for separate vocabularies; three names on one tensor (shared
    source/target embeddings, tied output layer) stored once and tied again on loading."""
    from safetensors.torch import load_file

    from mt.config import from_dict
    from mt.model import Seq2Seq
    from mt.tokenizer import Tokenizer

    state = torch.load(ckpt, weights_only=True)
    cfg = from_dict(state["config"])
    tok = Tokenizer.from_state_dict(state["tokenizer"])
    sep = Tokenizer(tok.state_dict()["src_model"], tok.state_dict()["src_model"])  # two files, same content
    cfg.model.share_embeddings = True
    torch.manual_seed(0)
    model = Seq2Seq(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id)
    pretrained.write_folder(tmp_path, cfg, sep, model.state_dict())
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "model.safetensors",
        "sentencepiece.source.model",
        "sentencepiece.target.model",
    }
    saved = load_file(tmp_path / "model.safetensors")
    assert "encoder.embedding.weight" in saved
    assert not {"decoder.embedding.weight", "decoder.generator.weight"} & set(saved)
    cfg2, tok2, weights, meta = pretrained.load_folder(tmp_path)
    assert not tok2.joint and cfg2.model.share_embeddings
    want = model.state_dict()
    assert set(weights) == set(want) and all(torch.equal(weights[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- mt-export
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_refuses_a_non_empty_folder_unless_forced(ckpt, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(ckpt), str(out)]) == 2
    line = _one_error_line(capsys)
    assert "not empty" in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # --force replaces only an earlier export, not a folder of the user's
    assert export_main([str(ckpt), str(out), "--force"]) == 2
    assert "not an earlier mt-export folder" in _one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main([str(ckpt), str(empty)]) == 0  # an empty folder is simply filled
    assert {p.name for p in empty.iterdir()} == FILES
    (empty / "stale.txt").write_text("from an older export")
    assert export_main([str(ckpt), str(empty), "--force"]) == 0
    assert {p.name for p in empty.iterdir()} == FILES
    assert "hf upload USER/NAME" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]  # no temporary or old folder left


def test_export_never_replaces_the_folder_that_holds_the_checkpoint(ckpt, tmp_path, capsys, monkeypatch):
    """mt-export RUN/checkpoints/best.pt RUN --force must not delete the run; nor the working
    directory; and a symbolic link is refused rather than replaced by a folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(Path(ckpt).read_bytes())
    (run / "pretrained").mkdir()
    export_main([str(best), str(run / "pretrained")])  # an export inside the run is fine
    (run / "config.json").write_text('{"format": "mt-pretrained"}')  # even if it looks like an export
    for target in (run, run / "checkpoints"):
        assert export_main([str(best), str(target), "--force"]) == 2
        assert "holds the checkpoint" in _one_error_line(capsys)
    assert best.read_bytes() == Path(ckpt).read_bytes()
    monkeypatch.chdir(run / "pretrained")
    assert export_main([str(best), str(run / "pretrained"), "--force"]) == 2
    assert "holds the working directory" in _one_error_line(capsys)
    link = tmp_path / "link"
    link.symlink_to(run / "pretrained", target_is_directory=True)
    assert export_main([str(best), str(link), "--force"]) == 2
    assert "symbolic link" in _one_error_line(capsys)
    assert link.is_symlink() and (run / "pretrained" / "model.safetensors").is_file()


def test_export_errors_are_one_line_and_leave_nothing(ckpt, tmp_path, capsys):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"garbage" * 100)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for args, words in (
        ([str(tmp_path / "none.pt"), str(tmp_path / "out")], "not found"),
        ([str(bad), str(tmp_path / "out")], "corrupt"),
        ([str(ckpt), str(a_file)], "not a folder"),
    ):
        assert export_main(args) == 2
        assert words in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "corrupt.pt"]


# ----------------------------------------------------------------------------- the commands
def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_translate_script_takes_a_folder(exported, ckpt, tmp_path):
    script = _load(REPO / "scripts" / "translate.py")
    src = tmp_path / "in.de"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    outs = {}
    for name, model in (("ckpt", ckpt), ("folder", exported)):
        outs[name] = tmp_path / f"{name}.en"
        args = ["--checkpoint", str(model), "--input", str(src), "--output", str(outs[name]), "--print-scores", "-q"]
        assert script.main([*args, "--device", "cpu"]) == 0
    assert outs["folder"].read_text(encoding="utf-8") == outs["ckpt"].read_text(encoding="utf-8")
    assert outs["folder"].read_text(encoding="utf-8").splitlines()[0].split("\t")[1] == "dog sees cat"


def test_translate_with_a_hub_id(offline_hub, tmp_path, capsys):
    from mt.translate import main

    src = tmp_path / "in.de"
    src.write_text("hund sieht katze\n", encoding="utf-8")
    assert main(["-c", "user/name", "--revision", COMMIT, "--input", str(src), "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().out == "dog sees cat\n"
    assert main(["-c", "user/missing", "--input", str(src), "--device", "cpu", "-q"]) == 2
    assert "not in the cache" in _one_error_line(capsys)


def test_evaluate_and_tune_take_a_folder(exported, ckpt, tiny_run, tmp_path):
    from mt.evaluate import EvalDataConfig, EvaluateConfig, evaluate

    results = {}
    for name, model in (("ckpt", ckpt), ("folder", exported)):
        cfg = EvaluateConfig(
            checkpoint=str(model), data=EvalDataConfig(path=str(tiny_run["corpus"])), split="test", device="cpu"
        )
        results[name] = evaluate(cfg, tmp_path / name)
    for key in ("bleu", "chrf", "bleu_lc", "beam", "length_penalty", "sentences"):
        assert results["folder"][key] == results["ckpt"][key], key
    hyps = [(tmp_path / n / "hypotheses.test.en").read_text(encoding="utf-8") for n in ("ckpt", "folder")]
    assert hyps[0] == hyps[1]

    tuner = _load(REPO / "scripts" / "tune_decoding.py")
    args = tuner.parse_args([str(exported), "--data", str(tiny_run["corpus"]), "--beams", "1", "--device", "cpu"])
    assert tuner.tune(args)["best"]["bleu"] > 90


def test_bench_decode_takes_a_folder(exported, tiny_run, tmp_path):
    bench = _load(REPO / "benchmarks" / "bench_decode.py")
    data = tiny_run["corpus"] / "test.jsonl"
    out = tmp_path / "bench.json"
    argv = ["--checkpoint", str(exported), "--data", str(data), "--limit", "4", "--beam", "2", "--json", str(out)]
    assert bench.main([*argv, "--device", "cpu"]) == 0
    assert [r["sentences"] for r in json.loads(out.read_text())] == [4, 4]
