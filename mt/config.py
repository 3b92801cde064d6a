"""Typed configuration for `mt`.

Hydra composes YAML from ``conf/`` on top of these dataclass schemas (registered in Hydra's
ConfigStore), so an unknown key or a wrongly typed value is rejected before anything runs.
Everything below the entry points takes these plain dataclasses, never a DictConfig:

    cfg = OmegaConf.to_object(dict_config)   # -> TrainConfig
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # OmegaConf is only needed by the entry points; the model and the scripts run without it
    from omegaconf import MISSING  # noqa: F401  (re-exported for schema users)
except ImportError:  # pragma: no cover - machines with torch but no hydra-core/omegaconf
    MISSING = "???"

# conf/ of the checkout (an editable install runs from it). The Hydra entry points name it by its
# absolute path: a relative config_path would be resolved as a Python package ("pkg://conf") when
# they run as installed console scripts (mt-train, mt-evaluate) rather than with python -m.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class DataConfig:
    # Anything `datasets.load_dataset` accepts: a hub id ("bentrevett/multi30k", "wmt/wmt14"),
    # a local folder with train/validation/test files (jsonl, json, csv, parquet, tsv), or a
    # folder of parallel text files (train.de + train.en, ...).
    path: str = "bentrevett/multi30k"
    name: str | None = None  # dataset configuration, e.g. "de-en" for wmt/wmt14
    revision: str | None = None  # hub revision (branch, tag or commit)
    src: str = "de"
    tgt: str = "en"
    train_split: str = "train"
    valid_split: str = "validation"  # aliases valid/val/dev are tried when missing
    test_split: str = "test"
    max_src_len: int = 100  # in subword tokens, EOS excluded
    max_tgt_len: int = 100
    max_len_ratio: float = 3.0  # drop pairs whose token length ratio exceeds this (either way)
    max_train_examples: int | None = None  # keep only the first N training pairs (debugging)
    max_valid_examples: int | None = None  # validate on the first N pairs only
    num_proc: int | None = None  # processes for datasets.map/filter
    cache_dir: str | None = None  # SentencePiece model cache; default $XDG_CACHE_HOME/mt or ~/.cache/mt


@dataclass
class TokenizerConfig:
    joint: bool = True  # one SentencePiece model for both languages
    model_type: str = "unigram"  # unigram | bpe | char | word
    vocab_size: int = 8000  # per model (joint: the shared vocabulary)
    character_coverage: float = 1.0
    input_sentence_size: int = 2_000_000  # sample this many sentences for training (0 = all)
    # words: SentencePiece learns from the sample's word counts, its memory grows with the distinct
    # words; sentences: from the sentences themselves (its suffix array over every character)
    train_on: str = "words"
    seed: int = 1
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3


@dataclass
class ModelConfig:
    cell: str = "auto"  # auto | triton | torch | cudnn
    emb_dim: int = 512
    hidden_dim: int = 512  # decoder hidden size; each encoder direction gets hidden_dim // 2
    enc_layers: int = 2
    dec_layers: int = 2
    bidirectional: bool = True
    attention: str = "general"  # dot | general | concat | bahdanau
    bridge: str = "dense"  # dense | zero
    input_feeding: bool = True
    share_embeddings: bool = False  # source/target embeddings (needs tokenizer.joint=true)
    tie_output: bool = True  # decoder input embedding = output projection (needs emb_dim == hidden_dim)
    dropout: float = 0.3  # between layers and before the output layer
    emb_dropout: float = 0.3


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    scheduler: str = "inverse_sqrt"  # inverse_sqrt | cosine | plateau | constant
    warmup_steps: int = 1000  # inverse_sqrt, cosine and constant: linear warm-up from 0
    # cosine: after warm-up, lr follows half a cosine from optim.lr down to min_lr at trainer.max_steps
    # (resuming with a larger max_steps stretches the curve: the lr rises again to where it would be)
    plateau_factor: float = 0.5  # plateau: multiply lr by this ...
    plateau_patience: int = 2  # ... after this many validations without BLEU improvement
    min_lr: float = 1e-6
    clip_grad_norm: float = 5.0  # 0 disables clipping (the norm is logged either way)
    label_smoothing: float = 0.1


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    max_epochs: int = 100
    # A bare mt-train (no experiment=, debug= or model= chosen) runs the measured Multi30k recipe
    # for the device it trains on (mt/recipes.py); false trains conf/train.yaml's model as is.
    auto_recipe: bool = True
    # Wall-clock limit in minutes (0 = none), counted from the start of mt.train in this process
    # (a resumed run starts a fresh count). Checked at every step and after every validation: once
    # it has passed, the run stops (validating first if it has not just validated) and writes its
    # checkpoints, as at max_steps. A step's check reaches the host with its loss, a step late
    # (mt/step_stats.py), so one more step runs. Every rank stops at the same step.
    max_minutes: float = 0.0
    max_tokens: int = 4096  # target tokens per batch (per process)
    max_sentences: int = 256  # cap on sentences per batch
    eval_every: int = 1000  # validate every N steps (and at the end)
    patience: int = 10  # early stopping: validations without BLEU improvement (0 = never stop)
    # Weights to combine (mt/averaging.py, docs/training.md "Checkpoint averaging and EMA"):
    keep_last: int = 0  # keep the checkpoints of the last N validations as step_<k>.pt (0 = none)
    # At the end: average the last N step_<k>.pt (kept whatever keep_last says), validate the mean
    # and write it as averaged.pt (0 = off)
    average_last: int = 0
    # > 0: keep an exponential moving average of the weights (updated after every step, inside the
    # CUDA graph too), validated at every validation and written as ema.pt (0 = off)
    ema_decay: float = 0.0
    log_every: int = 50
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32 (fp16 refused: no loss scaling)
    # fp32 matrix products on GPUs with TF32 (mt.runtime.set_tf32): auto = PyTorch's defaults (cuDNN
    # and our Triton cell in TF32, other matmuls IEEE) | true = TF32 for every matmul too | false = IEEE fp32 everywhere
    tf32: str = "auto"
    resume: bool = False  # continue from <run dir>/checkpoints/last.pt
    num_workers: int = 0
    valid_batch_size: int = 64  # sentences per greedy-decoding batch during validation
    valid_max_len_a: float = 1.5  # greedy decode length limit: a * src_len + b
    valid_max_len_b: int = 10
    num_samples: int = 3  # sample translations written to TensorBoard per validation
    attention_images: bool = True
    progress: bool | None = None  # tqdm: None = only when stderr is a TTY
    num_threads: int = 0  # torch CPU threads (0 = torch default)
    # CUDA graphs: capture the whole training step (forward, backward, clipping, optimizer) once
    # per batch shape and replay it, and the greedy search step during validation decoding.
    # auto = on when training on CUDA (under torchrun too: the gradients' all-reduce is captured
    # with the step, mt.distributed.FlatGradients), off elsewhere; true on CPU is an error.
    cuda_graphs: str = "auto"  # auto | true | false
    # The training loss (label-smoothed cross-entropy) and its gradient in two Triton kernels on the
    # logits in the compute dtype (mt/kernels/cross_entropy.py, docs/gpu.md "Fused loss") instead
    # of PyTorch's ops on an fp32 copy; where Triton cannot run, the same loss in PyTorch.
    fused_loss: bool = False
    # Subword regularization (mt/subword_sampling.py, docs/training.md): > 0 trains every epoch on a
    # segmentation of the training pairs sampled by SentencePiece (unigram: from the subword_nbest
    # best, -1 = all, with probabilities ~ P^alpha; BPE: each merge dropped with probability
    # alpha); validation, test and translation keep the best segmentation. 0 = off.
    subword_alpha: float = 0.0
    subword_nbest: int = -1
    # The fixed shapes batches are padded to (mt/graphs.py, README "GPU speed"): a batch whose
    # longest side (source or target, EOS/BOS included) is m goes to the smallest length L >= m
    # and is padded to (batch size for L, L, L). None = derived: lengths 8, 10, 12, ..., 22, 26,
    # 30, ... (x1.1, even) up to the data's max length + 1; batch size for L = the most sentences
    # the token budget lets in (max_tokens // (previous L + 1), capped at max_sentences).
    graph_lengths: list[int] | None = None
    graph_batch_sizes: list[int] | None = None  # one per graph_lengths entry (needs graph_lengths)
    # Processes that compile the run's Triton kernel variants in parallel before its first step
    # (mt/precompile.py, README "GPU speed"), instead of one after another on the training
    # thread at first launch. None = auto: min(8, CPUs - 1) with the Triton cell on CUDA (none
    # below 2), else 0; 0 = off. Each process takes up to about 0.35 GB of host memory while it
    # runs.
    precompile_workers: int | None = None


@dataclass
class DecodingConfig:
    """How the trained model translates unless told otherwise: the recipe's beam size and length
    penalty, chosen on validation (scripts/tune_decoding.py). Stored in the checkpoint; the
    defaults of python -m mt.evaluate, scripts/translate.py and Translator.translate. (Validation
    during training decodes greedily, for speed.)"""

    beam: int = 5
    length_penalty: Any = 1.0  # GNMT alpha, "avg" (mean log-prob), or null (none)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)


def register_configs() -> None:
    """Register the schemas so `conf/*.yaml` can extend them (`defaults: [schema, ...]`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="tokenizer", name="schema", node=TokenizerConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="optim", name="schema", node=OptimConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)


def to_dict(cfg: Any) -> dict:
    """A plain, torch-save-able dict of a config dataclass (stored in checkpoints)."""
    from dataclasses import asdict

    return asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict` output, validating keys through OmegaConf."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(TrainConfig)
    tok = d.get("tokenizer")
    if isinstance(tok, dict) and "train_on" not in tok:  # saved before the option: SentencePiece read sentences
        d = {**d, "tokenizer": {**tok, "train_on": "sentences"}}
    return OmegaConf.to_object(OmegaConf.merge(base, d))  # type: ignore[return-value]
