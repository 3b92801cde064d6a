"""Shared test fixtures: offline Hugging Face settings and a tiny generated parallel corpus.

`make_toy_corpus` is a plain function (``from conftest import make_toy_corpus``) so end-to-end
tests can generate their own corpus; `tiny_corpus_dir` is a session-wide copy of the default one.

The toy task: the source is 3-8 words drawn from a 20-word fake-German vocabulary, the target is
the word-by-word translation into a fake-English vocabulary (optionally in reversed order).
A tiny LSTM learns it in a few hundred CPU steps.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

# Must happen before `datasets` is imported anywhere: it reads these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# No GPU in CI: the Triton kernels run under the interpreter (must precede the first `import triton`).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
_HF_TMP = tempfile.mkdtemp(prefix="mt-tests-hf-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_TMP, "datasets")
os.environ.setdefault("HF_HOME", os.path.join(_HF_TMP, "home"))
# mt's own cache (SentencePiece models, corpora read into Arrow) too: tests never fill ~/.cache.
os.environ["XDG_CACHE_HOME"] = os.path.join(_HF_TMP, "xdg")
_OWNER_PID = os.getpid()


@atexit.register
def _remove_hf_tmp() -> None:  # atexit, not a fixture: also runs when collection fails
    if os.getpid() == _OWNER_PID:
        shutil.rmtree(_HF_TMP, ignore_errors=True)


REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run only where CUDA is available: `pytest -m gpu` on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu): run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def ieee_fp32_on_gpu(request):
    """Tests marked `gpu` compare fp32 results at IEEE tolerances: TF32 off for them (cuDNN, matmuls
    and our cell, which follows cuDNN's flag), restored afterwards. A test marked `tf32` keeps
    PyTorch's defaults."""
    if request.node.get_closest_marker("gpu") is None or request.node.get_closest_marker("tf32") is not None:
        yield
        return
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# fake-German -> fake-English, one word each (20 pairs).
TOY_LEXICON: dict[str, str] = {
    "hund": "dog",
    "katze": "cat",
    "haus": "house",
    "baum": "tree",
    "auto": "car",
    "mann": "man",
    "frau": "woman",
    "kind": "child",
    "buch": "book",
    "tisch": "table",
    "rot": "red",
    "blau": "blue",
    "gross": "big",
    "klein": "small",
    "sieht": "sees",
    "hat": "has",
    "liest": "reads",
    "und": "and",
    "nicht": "not",
    "schnell": "fast",
}


def toy_translate(src: str, reverse: bool = False) -> str:
    """The reference translation of a toy source sentence."""
    words = [TOY_LEXICON[w] for w in src.split()]
    return " ".join(reversed(words) if reverse else words)


def _toy_pairs(n: int, rng: random.Random, reverse: bool) -> list[dict[str, str]]:
    vocab = sorted(TOY_LEXICON)
    rows = []
    for _ in range(n):
        src = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 8)))
        rows.append({"de": src, "en": toy_translate(src, reverse)})
    return rows


def make_toy_corpus(
    dirpath: str | os.PathLike,
    n_train: int = 2000,
    n_valid: int = 100,
    n_test: int = 100,
    seed: int = 0,
    reverse: bool = False,
) -> Path:
    """Write train.jsonl / validation.jsonl / test.jsonl (flat "de", "en" rows) into dirpath."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("validation", n_valid), ("test", n_test)):
        with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in _toy_pairs(n, rng, reverse):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return d


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy corpus folder (2000 / 100 / 100 pairs, seed 0), shared by the whole session."""
    return make_toy_corpus(tmp_path_factory.mktemp("toy_corpus"))


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The local Multi30k copy (en/de/fr/cs jsonl) at <repo>/../shared/data/multi30k."""
    d = (REPO / ".." / "shared" / "data" / "multi30k").resolve()
    if not (d / "train.jsonl").is_file():
        pytest.skip(f"Multi30k not found at {d}")
    return d


def run_benchmark(tmp_path: Path, script: str, *args: str, timeout: int = 300):
    """benchmarks/<script> with `args` and `--json` into tmp_path, in a fresh Python from the
    repository root: it must exit 0. -> (its JSON, its stdout)."""
    import subprocess
    import sys

    out = tmp_path / f"{Path(script).stem}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def train_toy(corpus: Path, cache: Path, run: Path, *overrides: str) -> dict:
    """mt.train's debug=tiny model on a toy corpus, on the CPU in fp32, with `overrides` on top;
    train()'s summary. torch's thread count is restored afterwards (training sets it)."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mt.config import register_configs
    from mt.train import train

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = OmegaConf.to_object(
            compose(
                "train",
                overrides=[
                    "debug=tiny",
                    f"data.path={corpus}",
                    f"data.cache_dir={cache}",
                    "trainer.device=cpu",
                    "trainer.precision=fp32",
                    "trainer.progress=false",
                    *overrides,
                ],
            )
        )
    threads = torch.get_num_threads()
    try:
        return train(cfg, run)
    finally:
        torch.set_num_threads(threads)


# Steps of the shared tiny run: at 300 the toy task was learnt or not depending on the initial
# weights (valid BLEU 85-99 over seeds); from 400 it is learnt whatever the seed.
TINY_STEPS = 400


@pytest.fixture(scope="session")
def tiny_run(tiny_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The debug=tiny model trained for TINY_STEPS steps on the toy corpus, once per test session:
    {"checkpoint": best.pt, "corpus": the corpus folder, "run": the run folder, "summary": train()'s}.
    Shared by the training, decoding, translation and evaluation tests."""
    root = tmp_path_factory.mktemp("tiny_run")
    summary = train_toy(
        tiny_corpus_dir,
        root / "cache",
        root / "run",
        f"trainer.max_steps={TINY_STEPS}",
        f"trainer.eval_every={TINY_STEPS // 2}",
        "model.cell=torch",
    )
    return {
        "checkpoint": Path(summary["best_path"]),
        "corpus": tiny_corpus_dir,
        "run": root / "run",
        "summary": summary,
    }


@pytest.fixture(scope="module")
def ckpt(tiny_run: dict) -> Path:
    """The shared tiny run's best.pt."""
    return tiny_run["checkpoint"]


@pytest.fixture(scope="module")
def tr(ckpt: Path):
    """A Translator of `ckpt` on the CPU, one per test module (tests may change its settings)."""
    from mt.translator import Translator

    return Translator.from_checkpoint(ckpt, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other test processes).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- beam histories
def random_beam_history(seed: int, T: int, n0: int, K: int, S: int):
    """A beam search's history as `mt.search._BeamSearch` keeps it, random but well formed:
    tok_hist, bp_hist (T, n0, K) int64 (back-pointers in [0, K)), attn_hist (T, n0, K, S) fp32,
    and the finished slots `info` (n0, K, 3): (step it closed in [0, T), beam, last token)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(4, 1000, (T, n0, K), generator=g)
    bp = torch.randint(0, K, (T, n0, K), generator=g)
    attn = torch.rand(T, n0, K, S, generator=g)
    info = torch.stack(
        [
            torch.randint(0, T, (n0, K), generator=g),
            torch.randint(0, K, (n0, K), generator=g),
            torch.randint(3, 1000, (n0, K), generator=g),
        ],
        dim=-1,
    )
    info[0, 0, 0] = 0  # closed at the first step: no tokens before it
    info[-1, -1, 0] = T - 1  # at the last
    return tok, bp, attn, info


def walk_back(tok, bp, attn, info, i: int, k: int):
    """The oracle, one hypothesis at a time in plain Python: hypothesis k of sentence i ->
    (its tokens before the closing step, its attention rows (end + 1, S))."""
    import torch

    end, b = int(info[i, k, 0]), int(info[i, k, 1])
    tokens, rows = [], [attn[end, i, b]]
    for t in range(end - 1, -1, -1):
        tokens.append(int(tok[t, i, b]))  # the token the hypothesis' beam took at step t
        b = int(bp[t, i, b])  # the row that computed step t
        rows.append(attn[t, i, b])
    return tokens[::-1], torch.stack(rows[::-1])


def assert_walked_back(history, tokens, attention, n: int, m: int) -> None:
    """tokens (n, m, L) and attention (n, m, L, S), numpy or torch, as a rebuild of `history`'s
    first n sentences' m hypotheses (`random_beam_history`'s tuple): every token and attention
    row they define equals `walk_back`'s."""
    import torch

    tokens, attention = torch.as_tensor(tokens), torch.as_tensor(attention)
    info = history[-1]
    for i in range(n):
        for k in range(m):
            want_tok, want_attn = walk_back(*history, i, k)
            e = int(info[i, k, 0])
            assert tokens[i, k, :e].tolist() == want_tok, (i, k)
            assert torch.equal(attention[i, k, : e + 1], want_attn), (i, k)
