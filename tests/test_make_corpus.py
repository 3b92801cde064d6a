"""benchmarks/make_corpus.py: the three layouts, determinism, the words and length shape of the lines,
each corrupt variant exactly where it says, the one-line errors, and mt reading the clean outputs.

Everything runs the script as a subprocess on a made-up source of 300 pairs written here (the real
Tatoeba file is never needed), with a few thousand pairs at most: a few seconds in all.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TOY_LEXICON

SCRIPT = REPO / "benchmarks" / "make_corpus.py"
N, K = 3000, 50  # training and eval pairs of the shared runs
FILES = {
    "jsonl": ["train.jsonl", "validation.jsonl", "test.jsonl"],
    "text": ["train.de", "train.en", "validation.de", "validation.en", "test.de", "test.en"],
    "tsv": ["train.tsv", "validation.tsv", "test.tsv"],
}
DROPPED = "verworfen"  # the de word of a source row with an empty en side: never used
SUMMARY = re.compile(
    r"mean words de (?P<de>[\d.]+) en (?P<en>[\d.]+), >100 words (?P<long>[\d.]+)%, "
    r"empty de/en/both (?P<e_de>\d+)/(?P<e_en>\d+)/(?P<e_both>\d+); [\d,]+ bytes"
)


# ------------------------------------------------------------------------------- helpers
def write_source(path: Path, n: int = 300, seed: int = 0) -> Path:
    """n made-up pairs: 3-9 toy words translated word by word, plus the pair's id "#i" on both
    sides (so a line's de and en can be checked to join the same pairs). A few rows carry what
    the script must clean: a tab, a newline, a U+2028, JSON-escaped quotes and backslashes."""
    rng = random.Random(seed)
    lexicon = {**TOY_LEXICON, "grüße": "greetings", 'zitat"x': 'quote"x', "pfad\\x": "path\\x"}
    vocab = sorted(lexicon)
    rows = []
    for i in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 9))]
        rows.append({"de": " ".join(words) + f" #{i}", "en": " ".join(lexicon[w] for w in words) + f" #{i}"})
    rows[1]["de"] = rows[1]["de"].replace(" ", "\t", 1)
    rows[2]["en"] = rows[2]["en"].replace(" ", "\n", 1)
    rows[3]["de"] = rows[3]["de"].replace(" ", "\u2028", 1) + "\r"
    rows.append({"de": f"{DROPPED} hund", "en": "  "})  # empty once stripped: not a usable pair
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def run(source: Path | None, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args, str(out)]
    if source is not None:
        cmd += ["--source", str(source)]
    base = {k: v for k, v in os.environ.items() if k != "MT_CORPUS_SOURCE"}
    return subprocess.run(cmd, capture_output=True, text=True, env={**base, **(env or {})}, timeout=120)


def generate(source: Path, out: Path, fmt: str, *args: str, pairs: int = N, eval_pairs: int = K) -> str:
    r = run(source, out, "--pairs", str(pairs), "--eval-pairs", str(eval_pairs), "--format", fmt, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.decode("utf-8")[:-1].split("\n")


def read_pairs(out: Path, fmt: str, split: str) -> list[tuple[str, str]]:
    """A clean split as (de, en) pairs, checking the layout on the way."""
    if fmt == "text":
        de, en = read_lines(out / f"{split}.de"), read_lines(out / f"{split}.en")
        assert len(de) == len(en)
        return list(zip(de, en))
    if fmt == "tsv":
        lines = read_lines(out / f"{split}.tsv")
        assert lines[0] == "de\ten"
        rows = [line.split("\t") for line in lines[1:]]
        assert all(len(r) == 2 for r in rows)
        return [(r[0], r[1]) for r in rows]
    pairs = []
    for line in read_lines(out / f"{split}.jsonl"):
        row = json.loads(line)
        assert line == json.dumps(row, ensure_ascii=False) and list(row) == ["de", "en"]
        pairs.append((row["de"], row["en"]))
    return pairs


def ids(text: str) -> list[str]:
    return [w for w in text.split() if w.startswith("#")]


def summary_numbers(stdout: str) -> dict[str, float]:
    m = SUMMARY.search(stdout.strip().splitlines()[-1])
    assert m, stdout
    return {k: float(v) for k, v in m.groupdict().items()}


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("src") / "train.jsonl")


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{format: (folder, stdout)}: N / K / K pairs, seed 1, each layout."""
    root = tmp_path_factory.mktemp("clean")
    return {fmt: (root / fmt, generate(source, root / fmt, fmt)) for fmt in FILES}


# ------------------------------------------------------------------------------- clean corpora
@pytest.mark.parametrize("fmt", list(FILES))
def test_layout_and_line_counts(clean, fmt):
    out, stdout = clean[fmt]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES[fmt])
    header = 1 if fmt == "tsv" else 0
    for name in FILES[fmt]:
        want = (N if name.startswith("train") else K) + header
        assert len(read_lines(out / name)) == want, name
    assert f"{fmt} train {N} / validation {K} / test {K} pairs" in stdout.splitlines()[-1]


def test_formats_hold_the_same_pairs(clean):
    """The draws do not depend on the layout: one corpus, three spellings."""
    for split in ("train", "validation", "test"):
        text = read_pairs(clean["text"][0], "text", split)
        assert read_pairs(clean["tsv"][0], "tsv", split) == text
        assert read_pairs(clean["jsonl"][0], "jsonl", split) == text


def test_lines_join_whole_source_pairs(clean, source):
    rows = [json.loads(line) for line in read_lines(source)]  # not splitlines(): row 3 holds a raw U+2028
    de_words = {w for r in rows for w in r["de"].split()} - {DROPPED}
    en_words = {w for r in rows for w in r["en"].split()}
    pairs = read_pairs(clean["jsonl"][0], "jsonl", "train")
    for de, en in pairs:
        assert set(de.split()) <= de_words and set(en.split()) <= en_words, (de, en)
        assert de == de.strip() and "  " not in de and "\u2028" not in de and "\r" not in de
        if de and en:  # the same source pairs, in the same order, on both sides
            assert ids(de) == ids(en), (de, en)
    # the cleaned rows are used (their tab / newline / U+2028 became a space)
    used = {i for de, _ in pairs for i in ids(de)}
    assert {"#1", "#2", "#3"} <= used and len(used) > 250


def test_same_seed_same_bytes_other_seed_differs(clean, source, tmp_path):
    ref = clean["jsonl"][0]
    generate(source, tmp_path / "again", "jsonl")
    for name in FILES["jsonl"]:
        assert (tmp_path / "again" / name).read_bytes() == (ref / name).read_bytes(), name
    generate(source, tmp_path / "seed2", "jsonl", "--seed", "2")
    for name in FILES["jsonl"]:
        assert (tmp_path / "seed2" / name).read_bytes() != (ref / name).read_bytes(), name
    # each split has its own stream: validation and test are not the first lines of train
    train = read_pairs(ref, "jsonl", "train")
    valid, test = read_pairs(ref, "jsonl", "validation"), read_pairs(ref, "jsonl", "test")
    assert valid != train[:K] and test != train[:K] and valid != test


def test_length_shape(source, tmp_path):
    """20,000 pairs: about 25 words a line, ~1% over 100 words, ~0.1% / 0.1% / 0.05% empty sides
    (bounds several standard deviations wide), and the printed summary says the same."""
    n = 20_000
    stdout = generate(source, tmp_path, "text", pairs=n, eval_pairs=10)
    de = [len(s.split()) for s in read_lines(tmp_path / "train.de")]
    en = [len(s.split()) for s in read_lines(tmp_path / "train.en")]
    mean_de, mean_en = sum(de) / n, sum(en) / n
    assert 22 < mean_de < 28 and 22 < mean_en < 28
    long = sum(max(a, b) > 100 for a, b in zip(de, en)) / n
    assert 0.005 < long < 0.02
    assert max(de) > 150  # the tail reaches far past 100
    empty_de = sum(a == 0 and b > 0 for a, b in zip(de, en))
    empty_en = sum(b == 0 and a > 0 for a, b in zip(de, en))
    empty_both = sum(a == 0 and b == 0 for a, b in zip(de, en))
    assert 5 <= empty_de <= 40 and 5 <= empty_en <= 40 and 1 <= empty_both <= 25
    got = summary_numbers(stdout)
    assert got["de"] == pytest.approx(mean_de, abs=0.051) and got["en"] == pytest.approx(mean_en, abs=0.051)
    assert got["long"] == pytest.approx(100 * long, abs=0.0051)
    assert (got["e_de"], got["e_en"], got["e_both"]) == (empty_de, empty_en, empty_both)


# ------------------------------------------------------------------------------- corrupt variants
CORRUPT = [
    ("utf8", "text"),
    ("utf8", "tsv"),
    ("utf8", "jsonl"),
    ("columns", "tsv"),
    ("columns", "jsonl"),
    ("counts", "text"),
]


@pytest.mark.parametrize("kind,fmt", CORRUPT)
def test_corrupt_variant_is_where_it_says(clean, source, tmp_path, kind, fmt):
    stdout = generate(source, tmp_path, fmt, "--corrupt", kind)
    m = re.fullmatch(r"corrupt: (\S+) (.+) line (\d+)", stdout.splitlines()[0])
    assert m and m[1] == kind, stdout
    path, line = Path(m[2]), int(m[3])
    want_name = {"text": "train.de", "tsv": "train.tsv", "jsonl": "train.jsonl"}[fmt]
    assert path == tmp_path / ("train.en" if kind == "counts" else want_name)
    assert line == (N if kind == "counts" else N // 2 + 1)

    ref = clean[fmt][0]
    for name in FILES[fmt]:  # everything else is the clean corpus
        if name != path.name:
            assert (tmp_path / name).read_bytes() == (ref / name).read_bytes(), name
    bad = path.read_bytes().split(b"\n")[:-1]
    good = (ref / path.name).read_bytes().split(b"\n")[:-1]
    if kind == "counts":
        assert bad == good[:-1] and len(read_lines(tmp_path / "train.de")) == line
        return
    assert len(bad) == len(good)
    i = line - 1
    # the other lines are the clean ones (the corrupted pair is never an empty one)
    assert bad[:i] == good[:i] and bad[i + 1 :] == good[i + 1 :]
    if kind == "utf8":
        assert path.read_bytes().count(b"\xff") == 1
        prefix = b'{"de": "' if fmt == "jsonl" else b""
        assert bad[i].startswith(prefix + b"\xff")
        with pytest.raises(UnicodeDecodeError):
            bad[i].decode("utf-8")
        de = bad[i].replace(b"\xff", b"").decode("utf-8")
        de = json.loads(de)["de"] if fmt == "jsonl" else de.split("\t")[0]
        assert de.strip()
    elif fmt == "tsv":
        row = bad[i].decode("utf-8")
        assert "\t" not in row and row.strip() and good[i].decode("utf-8").startswith(row + "\t")
    else:
        row = json.loads(bad[i])
        assert list(row) == ["de"] and row["de"].strip()
        assert json.loads(good[i])["de"] == row["de"]


@pytest.mark.parametrize("kind,fmt", [("columns", "text"), ("counts", "tsv"), ("counts", "jsonl")])
def test_inapplicable_corruption_is_a_one_line_error(source, tmp_path, kind, fmt):
    r = run(source, tmp_path / "out", "--pairs", "10", "--format", fmt, "--corrupt", kind)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--corrupt {kind}" in r.stderr and not (tmp_path / "out").exists()


def test_missing_source_is_a_one_line_error(tmp_path):
    r = run(tmp_path / "nowhere.jsonl", tmp_path / "out", "--pairs", "10", "--format", "text")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--source" in r.stderr and not (tmp_path / "out").exists()


def test_source_from_environment_folder(clean, source, tmp_path):
    """$MT_CORPUS_SOURCE naming the folder of train.jsonl gives the same corpus as --source FILE."""
    env = {"MT_CORPUS_SOURCE": str(source.parent)}
    r = run(None, tmp_path, "--pairs", str(N), "--eval-pairs", str(K), "--format", "tsv", env=env)
    assert r.returncode == 0, r.stderr
    for name in FILES["tsv"]:
        assert (tmp_path / name).read_bytes() == (clean["tsv"][0] / name).read_bytes()


# ------------------------------------------------------------------------------- mt reads it
@pytest.mark.parametrize("fmt", list(FILES))
def test_mt_loads_the_clean_corpus(source, tmp_path, fmt):
    from mt.config import DataConfig
    from mt.data import load_splits

    generate(source, tmp_path, fmt, pairs=300, eval_pairs=20)
    splits = load_splits(DataConfig(path=str(tmp_path), src="de", tgt="en"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "validation": 20, "test": 20}
    for split, ds in splits.items():
        assert list(zip(ds["src"], ds["tgt"])) == read_pairs(tmp_path, fmt, split), split


@pytest.mark.parametrize(
    "kind,fmt,message",
    [
        ("utf8", "text", r"train\.de: line {line} is not valid UTF-8 \(byte 0xff\)"),
        ("utf8", "tsv", r"train\.tsv: line {line} is not valid UTF-8 \(byte 0xff\)"),
        ("utf8", "jsonl", r"train\.jsonl: line {line} is not valid UTF-8 \(byte 0xff\)"),
        ("columns", "tsv", r"train\.tsv: line {line} has 1 tab-separated fields, expected 2"),
        ("counts", "text", r"train\.de has {line} lines but .*train\.en has {short}"),
    ],
)
def test_mt_names_the_corrupt_line_and_caches_nothing(source, tmp_path, kind, fmt, message):
    """Each corrupt variant is one DataError line naming the file and line make_corpus printed;
    no Arrow file of the bad split is left in mt's cache to be reused."""
    from mt.config import DataConfig
    from mt.data import load_splits
    from mt.errors import DataError

    out, cache = tmp_path / "corpus", tmp_path / "cache"
    stdout = generate(source, out, fmt, "--corrupt", kind, pairs=400, eval_pairs=20)
    line = int(re.fullmatch(r"corrupt: \S+ .+ line (\d+)", stdout.splitlines()[0])[1])
    with pytest.raises(DataError, match=message.format(line=line, short=line - 1)) as e:
        load_splits(DataConfig(path=str(out), src="de", tgt="en", cache_dir=str(cache)))
    assert "\n" not in str(e.value)
    left = list((cache / "corpora").glob("train.*")) if (cache / "corpora").is_dir() else []
    assert left == []
