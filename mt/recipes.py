"""Device-aware defaults: the recipe a bare `mt-train` (or `make train`) runs.

conf/train.yaml's model (2x512 LSTMs, 20,000 steps) is what a GPU trains in minutes and a laptop
in a day. So when the user names no recipe (`experiment=`), no debug preset (`debug=`), no model
(`model=`) and leaves `trainer.auto_recipe` on, training composes the measured Multi30k recipe
for the device it resolves to, on top of which every explicit override still wins:

    device   direction         recipe
    cpu      de->en (others)   experiment=multi30k_de_en_cpu
    cpu      en->de            experiment=multi30k_en_de_cpu
    cuda     de->en (others)   experiment=multi30k_de_en
    cuda     en->de            experiment=multi30k_en_de

    overrides = HydraConfig.get().overrides.task
    name = choose_recipe(cfg, overrides)             # None: train exactly what was composed
    if name: cfg = compose("train", overrides=with_recipe(overrides, name))
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import TrainConfig
from .errors import MTError
from .runtime import resolve_device

RECIPES = {
    ("cpu", "en", "de"): "multi30k_en_de_cpu",
    ("cpu", None, None): "multi30k_de_en_cpu",
    ("cuda", "en", "de"): "multi30k_en_de",
    ("cuda", None, None): "multi30k_de_en",
}
# Choosing any of these groups is choosing a model (and a budget): the recipe stays out.
CHOICE_GROUPS = ("experiment", "debug", "model")


def override_key(override: str) -> str:
    """'+trainer.max_steps=5' -> 'trainer.max_steps'; '~debug' -> 'debug'."""
    return override.split("=", 1)[0].lstrip("+~").strip()


def choose_recipe(cfg: TrainConfig, overrides: Sequence[str]) -> str | None:
    """The experiment to compose for this run, or None (the user chose, or auto_recipe is off, or
    the device is neither a CPU nor CUDA)."""
    if not cfg.trainer.auto_recipe:
        return None
    if any(override_key(o) in CHOICE_GROUPS for o in overrides):
        return None
    try:
        device = resolve_device(cfg.trainer.device).type
    except MTError:
        return None  # an unusable device is reported by training itself, with its own message
    direction = (cfg.data.src, cfg.data.tgt)
    return RECIPES.get((device, *direction)) or RECIPES.get((device, None, None))


def with_recipe(overrides: Sequence[str], name: str) -> list[str]:
    """The overrides that compose `name` beneath the user's own (theirs still win)."""
    return [f"experiment={name}", *overrides]


def recipe_note(name: str, cfg: TrainConfig, overrides: Sequence[str]) -> str:
    """The one log line that says which recipe runs, what it is and how to get the full model."""
    m, t = cfg.model, cfg.trainer
    kept = [o for o in overrides if override_key(o).startswith(("model.", "trainer.max_", "optim."))]
    device = "the CPU" if t.device == "cpu" else "CUDA"
    return (
        f"training on {device} with no recipe or model chosen: using experiment={name} "
        f"({m.enc_layers}x{m.hidden_dim} LSTMs, cell={m.cell}, {t.max_steps} steps"
        + (f", {t.max_minutes:g} min at most" if t.max_minutes else "")
        + ")"
        + (f", your {' '.join(kept)} kept" if kept else "")
        + "; add trainer.auto_recipe=false for conf/train.yaml's full model"
    )


__all__ = ["RECIPES", "choose_recipe", "with_recipe", "recipe_note", "override_key"]
