"""Device-aware defaults (mt/recipes.py): a bare mt-train runs the device's Multi30k recipe, the
user's own keys win over it, and choosing a recipe, preset or model keeps it out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mt.config import register_configs
from mt.model import cell_backend
from mt.recipes import choose_recipe, override_key, recipe_note, with_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        yield


def composed(overrides):
    return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def test_override_keys():
    assert override_key("+trainer.max_steps=5") == "trainer.max_steps"
    assert override_key("~debug") == "debug"
    assert override_key("model=bahdanau") == "model"


@pytest.mark.parametrize(
    "overrides,recipe",
    [
        ([], "multi30k_de_en_cpu"),
        (["data.path=/x"], "multi30k_de_en_cpu"),
        (["data.src=en", "data.tgt=de"], "multi30k_en_de_cpu"),
        (["data.src=fr", "data.tgt=en"], "multi30k_de_en_cpu"),
        (["model.hidden_dim=384", "trainer.max_steps=7"], "multi30k_de_en_cpu"),  # keys, not a choice
        (["experiment=multi30k_small"], None),
        (["debug=tiny"], None),
        (["model=bahdanau"], None),
        (["trainer.auto_recipe=false"], None),
    ],
)
def test_cpu_chooses_the_cpu_recipe_unless_the_user_chose(overrides, recipe):
    overrides = [*overrides, "trainer.device=cpu"]
    assert choose_recipe(composed(overrides), overrides) == recipe


def test_cuda_chooses_the_gpu_recipe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_recipe(composed([]), []) == "multi30k_de_en"
    en_de = ["data.src=en", "data.tgt=de"]
    assert choose_recipe(composed(en_de), en_de) == "multi30k_en_de"


def test_the_recipe_sits_under_the_users_keys():
    mine = ["model.hidden_dim=384", "trainer.max_steps=7", "trainer.device=cpu"]
    cfg = composed(with_recipe(mine, choose_recipe(composed(mine), mine)))
    cpu = composed(["experiment=multi30k_de_en_cpu"])
    assert (cfg.model.hidden_dim, cfg.trainer.max_steps) == (384, 7)  # explicit keys kept
    assert (cfg.model.enc_layers, cfg.model.emb_dim, cfg.trainer.max_minutes) == (1, 256, cpu.trainer.max_minutes)
    assert cfg.decoding == cpu.decoding and cfg.optim == cpu.optim
    note = recipe_note("multi30k_de_en_cpu", cfg, mine)
    assert "experiment=multi30k_de_en_cpu" in note and "trainer.auto_recipe=false" in note
    assert "model.hidden_dim=384 trainer.max_steps=7 kept" in note and "\n" not in note


def test_cell_auto_is_atens_lstm_on_cpu():
    assert cell_backend("auto", "cpu") == "cudnn"
    assert cell_backend("torch", "cpu") == "torch"  # the reference cell stays one word away


@pytest.mark.slow
def test_bare_cli_trains_the_cpu_recipe_and_records_it(tiny_corpus_dir, tmp_path):
    """mt-train with no recipe on a CPU: the recipe's architecture and schedule, the user's keys,
    one log line saying so, and the run's .hydra files naming the recipe."""
    out = tmp_path / "run"
    mine = ["model.hidden_dim=32", "model.emb_dim=32", "trainer.max_steps=4"]
    args = [
        f"data.path={tiny_corpus_dir}",
        f"data.cache_dir={tmp_path / 'c'}",
        "tokenizer.vocab_size=200",
        "tokenizer.input_sentence_size=0",
        "trainer.eval_every=4",
        "trainer.device=cpu",
        "data.max_valid_examples=16",
        *mine,
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "mt.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "train.log").read_text()
    (line,) = [ln for ln in log.splitlines() if "using experiment=" in ln]
    assert "experiment=multi30k_de_en_cpu" in line and "trainer.auto_recipe=false" in line
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    m, t = ck["config"]["model"], ck["config"]["trainer"]
    assert (m["hidden_dim"], m["emb_dim"], t["max_steps"]) == (32, 32, 4)  # the user's keys
    assert (m["enc_layers"], m["cell"], t["log_every"], ck["config"]["optim"]["scheduler"]) == (
        1,
        "cudnn",
        100,
        "cosine",
    )
    recorded = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert recorded[0] == "experiment=multi30k_de_en_cpu" and set(args[:-1]) <= set(recorded)
    saved = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["enc_layers"] == 1 and saved["model"]["hidden_dim"] == 32


def test_the_bf16_cpu_recipe_is_the_fp32_one_in_bf16_with_more_steps():
    from dataclasses import asdict

    fp32, bf16 = (
        asdict(composed([f"experiment={name}"])) for name in ("multi30k_de_en_cpu", "multi30k_de_en_cpu_bf16")
    )
    changed = {
        (group, key): (fp32[group][key], bf16[group][key])
        for group in fp32
        if isinstance(fp32[group], dict)
        for key in fp32[group]
        if fp32[group][key] != bf16[group][key]
    }
    assert changed == {("trainer", "precision"): ("auto", "bf16"), ("trainer", "max_steps"): (3000, 3600)}
    assert {k: v for k, v in fp32.items() if not isinstance(v, dict)} == {
        k: v for k, v in bf16.items() if not isinstance(v, dict)
    }
