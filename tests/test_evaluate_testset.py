"""mt-evaluate testset=NAME: a sacreBLEU test set read from sacreBLEU's own cache, offline.

The cache is built in tmp_path in the layout sacreBLEU 2.6.0 keeps for a downloaded wmt14
(newstest2014): $SACREBLEU/wmt14/raw/wmt14.test-filtered.tgz (the tarball; present and non-empty,
sacreBLEU does not download it again) and the files it extracts, raw/test/newstest2014-deen-*.sgm.
sacreBLEU itself turns those into its text files ($SACREBLEU/wmt14/wmt14.de-en.{src,ref,...}).
The toy sentences are the tiny model's fake German -> fake English (its direction is de->en).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, toy_translate

from mt.errors import MTError
from mt.evaluate import EvaluateConfig, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES = [
    "hund sieht katze",
    "mann liest buch",
    "frau hat rot auto",
    "kind sieht gross baum und klein haus",
    "katze hat nicht blau tisch",
    "hund und katze",
]
# The references: the toy translations, one of them changed so that the scores are not all 100.
REFERENCES = [toy_translate(s) for s in SOURCES]
REFERENCES[2] = "the woman has a red car"


def _sgm(setid: str, kind: str, lang: str, lines: list[str]) -> str:
    """A newstest file in WMT's pre-2021 "fake SGML" (one <seg> per line, as sacreBLEU reads it)."""
    head = (
        f'<{kind} setid="{setid}" srclang="any">'
        if kind == "srcset"
        else f'<{kind} trglang="{lang}" setid="{setid}" srclang="any">'
    )
    out = [head, '<doc sysid="ref" docid="toy-1" genre="news" origlang="de">', "<p>"]
    out += [f'<seg id="{i}">{line}</seg>' for i, line in enumerate(lines, start=1)]
    out += ["</p>", "</doc>", f"</{kind}>"]
    return "\n".join(out) + "\n"


def make_wmt14_cache(root: Path, sources=SOURCES, references=REFERENCES) -> Path:
    """sacreBLEU's cache folder holding a made-up wmt14 de-en (newstest2014) -> root."""
    raw = root / "wmt14" / "raw"
    test = raw / "test"
    test.mkdir(parents=True)
    (test / "newstest2014-deen-src.de.sgm").write_text(_sgm("newstest2014", "srcset", "de", sources), encoding="utf-8")
    (test / "newstest2014-deen-ref.en.sgm").write_text(
        _sgm("newstest2014", "refset", "en", references), encoding="utf-8"
    )
    # sacreBLEU downloads DATASETS["wmt14"].data[0] to raw/<name>.<basename> unless that file exists
    # and is not empty, and extracts it only right after a download: the tarball of the files above.
    with tarfile.open(raw / "wmt14.test-filtered.tgz", "w:gz") as tar:
        tar.add(test, arcname="test")
    return root


def point_sacrebleu_at(monkeypatch, folder: Path) -> None:
    """Make this process's sacreBLEU use `folder` as its cache: $SACREBLEU is read once, at import,
    into sacrebleu.utils.SACREBLEU_DIR and each test set's folders; subprocesses read the variable."""
    import sacrebleu.utils
    from sacrebleu.dataset import DATASETS

    monkeypatch.setenv("SACREBLEU", str(folder))
    monkeypatch.setattr(sacrebleu.utils, "SACREBLEU_DIR", str(folder))
    ds = DATASETS["wmt14"]
    monkeypatch.setattr(ds, "_outdir", os.path.join(folder, "wmt14"))
    monkeypatch.setattr(ds, "_rawdir", os.path.join(folder, "wmt14", "raw"))


@pytest.fixture
def offline(monkeypatch) -> list[str]:
    """No network: every download attempt fails at once (and is recorded)."""
    tried: list[str] = []

    def urlopen(url, *args, **kwargs):
        tried.append(str(url))
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


def compose_eval(overrides: list[str]) -> EvaluateConfig:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return OmegaConf.to_object(compose("evaluate", overrides=overrides))


def offline_env(cache: Path) -> dict[str, str]:
    """A subprocess environment: sacreBLEU's cache at `cache`, and any download refused at once."""
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    return {
        **os.environ,
        "SACREBLEU": str(cache),
        "https_proxy": dead,
        "http_proxy": dead,
        "HTTPS_PROXY": dead,
        "HTTP_PROXY": dead,
        "no_proxy": "",
        "NO_PROXY": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def test_scores_newstest2014_from_the_cache(tiny_run, tmp_path, monkeypatch, offline):
    from sacrebleu.metrics import BLEU, CHRF

    cache = make_wmt14_cache(tmp_path / "sacrebleu")
    point_sacrebleu_at(monkeypatch, cache)
    cfg = compose_eval([f"checkpoint={tiny_run['checkpoint']}", "testset=wmt14", "device=cpu", "batch_size=4"])
    assert cfg.split is None and cfg.langpair is None
    result = evaluate(cfg, tmp_path / "out")
    assert offline == []  # the cached set was used: no download tried
    assert (cache / "wmt14" / "wmt14.de-en.src").is_file()  # sacreBLEU read our SGML itself

    hyp_path = tmp_path / "out" / "hypotheses.wmt14.en"  # the checkpoint's direction: de-en
    hyps = hyp_path.read_text(encoding="utf-8").split("\n")
    assert hyps[-1] == "" and len(hyps) - 1 == len(SOURCES)
    hyps = hyps[:-1]
    scores = json.loads((tmp_path / "out" / "scores.wmt14.json").read_text(encoding="utf-8"))
    assert scores == {k: v for k, v in result.items() if k != "scores_path"}
    assert (scores["testset"], scores["langpair"], scores["src"], scores["tgt"]) == ("wmt14", "de-en", "de", "en")
    assert scores["split"] is None and scores["sentences"] == len(SOURCES)
    assert scores["source_file"] == str(cache / "wmt14" / "wmt14.de-en.src")
    assert scores["reference_files"] == [str(cache / "wmt14" / "wmt14.de-en.ref")]
    # the same numbers and signatures as sacreBLEU scoring the written file against our references
    for key, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("bleu_lc", BLEU(lowercase=True))):
        want = metric.corpus_score(hyps, [REFERENCES])
        assert scores[key] == pytest.approx(want.score, abs=1e-9), key
        assert scores[f"{key}_signature"] == str(metric.get_signature()), key
    assert "nrefs:1" in scores["bleu_signature"] and "case:lc" in scores["bleu_lc_signature"]
    assert hyps[0] == "dog sees cat" and 0 < scores["bleu"] < 100  # the toy task is learnt; one reference differs


def _base(tiny_run) -> list[str]:
    return [f"checkpoint={tiny_run['checkpoint']}", "device=cpu"]


def test_user_errors_are_one_line(tiny_run, tmp_path, monkeypatch, offline):
    point_sacrebleu_at(monkeypatch, tmp_path / "empty")
    for extra, match in (
        (["testset=wmt99"], r"sacreBLEU 2\.\S+ has no test set testset='wmt99'; it has: .*\bwmt14\b"),
        (
            ["testset=wmt14", "langpair=de-ja"],
            r"test set wmt14 has no language pair de-ja; it has: cs-en, en-cs, de-en",
        ),
        (["testset=wmt14", "langpair=deen"], "langpair='deen': write it as SRC-TGT"),
        (["testset=wmt14", "split=test"], "give split=test or testset=wmt14, not both"),
        (["testset=wmt14", "data.path=/some/corpus"], "data.path do not apply"),
        (["langpair=de-en"], "langpair=de-en goes with testset=NAME"),
        (["testset=wmt14"], "test set wmt14 .de-en. is not in sacreBLEU's cache"),
    ):
        with pytest.raises(MTError, match=match) as e:
            evaluate(compose_eval(_base(tiny_run) + extra), tmp_path / "out")
        assert "\n" not in str(e.value), extra
    msg = str(e.value)  # the last: nothing cached, no network
    assert str(tmp_path / "empty") in msg and "SACREBLEU" in msg and "network unreachable" in msg
    assert len(offline) == 1 and not (tmp_path / "out").exists()


def test_split_evaluation_is_unchanged_by_default(tiny_run, tmp_path):
    cfg = compose_eval([*_base(tiny_run), "beam=1"])
    assert (cfg.split, cfg.testset) == (None, None)  # null = test
    result = evaluate(cfg, tmp_path)
    assert result["split"] == "test" and "testset" not in result
    assert (tmp_path / "hypotheses.test.en").is_file() and (tmp_path / "scores.test.json").is_file()


def test_cli_offline_with_and_without_the_set(tiny_run, tmp_path):
    """The real command with $SACREBLEU: scores a cached set (sacreBLEU's own command agrees), and
    exits 2 with one error line naming the folder and the set when it is not cached."""
    cache = make_wmt14_cache(tmp_path / "cache")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mt.evaluate", f"checkpoint={tiny_run['checkpoint']}", "device=cpu"]
    r = subprocess.run(
        [*cmd, "testset=wmt14", "langpair=de-en", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=offline_env(cache),
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert ", wmt14, de->en," in r.stdout
    bleu = json.loads((out / "scores.wmt14.json").read_text())["bleu"]
    r = subprocess.run(
        [sys.executable, "-m", "sacrebleu", "-t", "wmt14", "-l", "de-en", "-i", str(out / "hypotheses.wmt14.en"), "-b"],
        capture_output=True,
        text=True,
        env=offline_env(cache),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == pytest.approx(bleu, abs=0.05)  # sacreBLEU prints it to one decimal

    empty = tmp_path / "empty"
    r = subprocess.run(
        [*cmd, "testset=wmt14", f"hydra.run.dir={tmp_path / 'run2'}"],
        capture_output=True,
        text=True,
        env=offline_env(empty),
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert f"test set wmt14 (de-en) is not in sacreBLEU's cache {empty} " in errors[0]


def test_scores_take_every_reference_stream():
    """A test set with several references is scored against all of them at once (nrefs:N)."""
    from sacrebleu.metrics import BLEU

    from mt.metrics import corpus_scores

    hyps = ["the dog sees the cat", "a man reads"]
    r1 = ["the dog sees a cat", "a man reads a book"]
    r2 = ["a dog sees the cat", "the man reads"]
    got = corpus_scores(hyps, r1, more_refs=[r2])
    assert got["bleu"] == BLEU().corpus_score(hyps, [r1, r2]).score and "nrefs:2" in got["bleu_signature"]
    assert got["bleu"] > corpus_scores(hyps, r1)["bleu"]
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_scores(hyps, r1, more_refs=[r2[:1]])
