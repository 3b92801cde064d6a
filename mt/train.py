"""Train a translation model.

    python -m mt.train data.path=/path/to/multi30k data.src=de data.tgt=en
    python -m mt.train debug=tiny data.path=DIR trainer.max_steps=200 hydra.run.dir=OUT
    torchrun --nproc_per_node=2 -m mt.train hydra.run.dir=OUT ...   # data parallel

Writes, under the Hydra run directory OUT:
    OUT/checkpoints/best.pt, OUT/checkpoints/last.pt    (model, optimizer, scheduler, RNG, config, SentencePiece)
    OUT/tensorboard/                                     (tensorboard --logdir OUT)
    OUT/.hydra/                                          (the composed config)

A thin Hydra entry point: `main` hands the typed config to `train(cfg, out_dir)`, a plain function
tests call directly; the loop itself is `mt.trainer.Trainer`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import CONF_DIR, TrainConfig, register_configs
from .errors import MTError
from .recipes import choose_recipe, recipe_note, with_recipe
from .trainer import train

log = logging.getLogger("mt.train")

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(dcfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    cfg: TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        cfg = apply_auto_recipe(cfg)
        summary = train(cfg, out_dir)
    except MTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info(
            "done: step %d, best validation BLEU %.2f, checkpoints in %s",
            summary["step"],
            summary["best_bleu"],
            Path(out_dir) / "checkpoints",
        )
    return summary["best_bleu"]  # the value a Hydra sweeper would optimise


def apply_auto_recipe(cfg: TrainConfig) -> TrainConfig:
    """The device's recipe under the user's overrides when they chose none (mt/recipes.py), else
    `cfg` as composed. The run's .hydra/config.yaml and overrides.yaml are rewritten to what it
    trains, so the run (and `mt-export`'s training command) can be reproduced on any device."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    name = choose_recipe(cfg, overrides)
    if name is None:
        return cfg
    overrides = with_recipe(overrides, name)
    dcfg = compose(config_name="train", overrides=overrides)
    cfg = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    if int(os.environ.get("RANK", "0")) == 0:
        log.info(recipe_note(name, cfg, hc.overrides.task))
        if hc.output_subdir is not None:
            saved = Path(hc.runtime.output_dir) / hc.output_subdir
            OmegaConf.save(dcfg, saved / "config.yaml")
            OmegaConf.save(OmegaConf.create(overrides), saved / "overrides.yaml")
    return cfg


__all__ = ["main", "train", "apply_auto_recipe"]

if __name__ == "__main__":
    main()
