"""Every YAML in conf/ composes against the typed schema; unknown keys are rejected."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mt.config import TrainConfig, from_dict, register_configs, to_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options():
    for group in GROUPS:
        for yaml in sorted((CONF / group).glob("*.yaml")):
            yield f"{group}={yaml.stem}"


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        yield


def test_every_group_has_options():
    assert {"data", "tokenizer", "model", "optim", "trainer", "experiment", "debug"} <= set(GROUPS)


@pytest.mark.parametrize("override", list(options()))
def test_each_option_composes_to_typed_config(override):
    cfg = OmegaConf.to_object(compose("train", overrides=[override]))
    assert isinstance(cfg, TrainConfig)
    assert from_dict(to_dict(cfg)) == cfg


def test_configs_saved_before_train_on_read_as_sentences():
    """Checkpoints from before tokenizer.train_on trained SentencePiece on sentences; their config says so."""
    d = to_dict(TrainConfig())
    assert from_dict(d).tokenizer.train_on == "words"
    del d["tokenizer"]["train_on"]
    assert from_dict(d).tokenizer.train_on == "sentences" and "train_on" not in d["tokenizer"]


def test_every_yaml_opens_with_its_command():
    for yaml in [CONF / "train.yaml", *CONF.glob("*/*.yaml")]:
        lines = [ln for ln in yaml.read_text().splitlines() if ln.strip() and not ln.startswith("# @package")]
        assert lines[0].startswith("# python -m mt.train"), yaml


def test_overrides_apply_and_unknown_keys_fail():
    cfg = OmegaConf.to_object(compose("train", overrides=["debug=tiny", "model.attention=dot", "trainer.max_steps=7"]))
    assert (cfg.model.hidden_dim, cfg.model.attention, cfg.trainer.max_steps) == (32, "dot", 7)
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=["model.hiden_dim=3"])
    with pytest.raises(ConfigCompositionException):
        compose("train", overrides=["trainer.max_steps=many"])


@pytest.mark.parametrize("name,src,tgt", [("multi30k_de_en", "de", "en"), ("multi30k_en_de", "en", "de")])
def test_multi30k_recipes_have_a_direction_and_a_cpu_variant_within_an_hour(name, src, tgt):
    full = OmegaConf.to_object(compose("train", overrides=[f"experiment={name}"]))
    cpu = OmegaConf.to_object(compose("train", overrides=[f"experiment={name}_cpu"]))
    for cfg in (full, cpu):
        assert (cfg.data.src, cfg.data.tgt, cfg.data.path) == (src, tgt, "bentrevett/multi30k")
        assert cfg.optim.scheduler == "cosine" and cfg.trainer.patience == 0  # the schedule ends the run
    assert full.trainer.device == "cuda" and full.model.cell == "auto"
    assert cpu.trainer.device == "cpu" and cpu.trainer.num_threads == 2 and 0 < cpu.trainer.max_minutes < 60


@pytest.mark.parametrize("name,src,tgt", [("tatoeba_de_en", "de", "en"), ("tatoeba_en_de", "en", "de")])
def test_tatoeba_recipes_have_a_direction_a_cpu_variant_and_need_a_path(name, src, tgt):
    """The corpus is a local folder: without data.path the placeholder path is what training
    refuses in one line (tests/test_data.py covers that error)."""
    full = OmegaConf.to_object(compose("train", overrides=[f"experiment={name}"]))
    cpu = OmegaConf.to_object(compose("train", overrides=[f"experiment={name}_cpu", "data.path=/data/t"]))
    assert full.data.path == "/path/to/tatoeba_de_en" and cpu.data.path == "/data/t"
    for cfg in (full, cpu):
        assert (cfg.data.src, cfg.data.tgt) == (src, tgt) and cfg.trainer.average_last == 3
        assert cfg.optim.scheduler == "cosine" and cfg.trainer.patience == 0
    assert full.trainer.device == "cuda" and cpu.trainer.device == "cpu" and 0 < cpu.trainer.max_minutes < 60
