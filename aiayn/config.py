"""Frozen, typed configuration for models, training and decoding, with the paper's named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from aiayn.errors import InputError


ACTIVATIONS = ("relu", "gelu", "gelu-tanh", "swish")  # swish = SiLU; gelu-tanh = GPT-2's approximation


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Transformer. Defaults are the paper's base model (Table 3)."""

    vocab_size: int = 37000          # source vocabulary (and target when shared)
    tgt_vocab_size: int | None = None  # None = shared with the source
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6        # 0 = decoder-only language model
    n_decoder_layers: int = 6
    dropout: float = 0.1             # §5.4: residual and embedding dropout
    attn_dropout: float = 0.0        # dropout on attention weights (not in the paper)
    max_len: int = 512
    norm_first: bool = False         # False = the paper's post-norm
    activation: Literal["relu", "gelu", "gelu-tanh", "swish"] = "relu"
    # sinusoidal: §3.5, sin and cos interleaved; sinusoidal-split: the same values, all sines first
    # then all cosines (Marian's layout); learned: one trained vector per position (GPT-2)
    positional: Literal["sinusoidal", "sinusoidal-split", "learned"] = "sinusoidal"
    tie_embeddings: bool = True      # §3.4: share source, target and output embeddings
    pad_id: int = 0
    # departures from the paper that imported models need (aiayn.interop); defaults = the paper
    scale_embedding: bool = True     # §3.4: multiply embeddings by sqrt(d_model)
    output_bias: bool = False        # a bias on the output projection (Marian's final_logits_bias)
    norm_eps: float = 1e-5           # LayerNorm's epsilon

    def __post_init__(self):
        if self.n_heads < 1 or self.d_model < 1 or self.d_ff < 1:
            raise InputError("d_model, n_heads and d_ff must be positive")
        if self.vocab_size < 1 or self.max_len < 1:
            raise InputError(f"vocab_size and max_len must be positive, got {self.vocab_size} and {self.max_len}")
        if self.n_encoder_layers < 0 or self.n_decoder_layers < 0 or self.n_encoder_layers + self.n_decoder_layers < 1:
            raise InputError(f"a model needs at least one layer (got {self.n_encoder_layers} encoder and "
                             f"{self.n_decoder_layers} decoder layers)")
        for name in ("dropout", "attn_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} is a probability from 0 to below 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise InputError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.tie_embeddings and self.n_encoder_layers and not self.shared_vocab:
            raise InputError("tie_embeddings needs a shared source/target vocabulary")
        if self.activation not in ACTIVATIONS:
            raise InputError(f"unknown activation {self.activation!r}")
        if self.positional not in ("sinusoidal", "sinusoidal-split", "learned"):
            raise InputError(f"unknown positional encoding {self.positional!r}")

    @property
    def shared_vocab(self) -> bool:
        return self.tgt_vocab_size is None or self.tgt_vocab_size == self.vocab_size

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)


# Table 3 of the paper.
PRESETS: dict[str, ModelConfig] = {
    "base": ModelConfig(),
    "big": ModelConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    # What fits a laptop: the small Multi30k model (same shape as the HF Marian peer).
    "small": ModelConfig(vocab_size=8000, d_model=256, n_heads=4, d_ff=1024,
                         n_encoder_layers=3, n_decoder_layers=3, dropout=0.3, attn_dropout=0.1),
    # The "Transformer-Tiny" of Wu et al. (ACL 2021), the best published small text-only model on
    # Multi30k (41.02 BLEU): narrow and deep, heavily regularized. Trained with lr 5e-3, warm-up 2000.
    "multi30k": ModelConfig(vocab_size=8000, d_model=128, n_heads=4, d_ff=256,
                            n_encoder_layers=4, n_decoder_layers=4, dropout=0.3, attn_dropout=0.0),
    "tiny": ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64,
                        n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, max_len=128),
}


def preset(name: str, **changes) -> ModelConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes)


SEEDS = range(2**63)  # the seeds torch.manual_seed takes (from 0): training's and the CLI's --seed


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the recipe of §5 by default (Adam 0.9/0.98/1e-9, warm-up + inverse sqrt)."""

    max_steps: int | None = None       # optimizer updates; None = until max_epochs / max_minutes
    max_epochs: int | None = None
    max_minutes: float | None = None   # wall-clock budget
    max_cpu_minutes: float | None = None  # CPU-time budget of the training process (equal-compute comparisons)
    lr: float = 1e-3                   # peak learning rate (end of warm-up)
    min_lr: float = 0.0                # floor of the cosine schedule
    warmup: int = 4000                 # §5.3: warmup_steps
    schedule: Literal["inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    optimizer: Literal["adam", "adamw"] = "adam"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1       # §5.4
    rdrop: float = 0.0                 # translation: R-Drop's alpha (each batch runs twice); 0 = off
    clip_norm: float | None = None
    update_freq: int = 1               # gradient accumulation: micro-batches per update
    precision: Literal["auto", "fp32", "bf16", "bf16-model", "fp16"] = "fp32"  # auto: aiayn.capability
    max_tokens: int = 4096             # translation: padded positions per batch
    batch_size: int = 12               # language models: sequences per batch
    context: int = 64                  # language models: tokens per sequence
    eval_every: int = 1000
    save_every: int | None = None      # None = at every evaluation
    keep_last: int = 5                 # checkpoints kept (besides the best)
    log_every: int = 50
    eval_bleu: bool = True             # translation: greedy BLEU on the validation set
    max_nonfinite: int = 10            # consecutive non-finite losses before the run stops
    seed: int = 1
    device: str = "cpu"

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16", "bf16-model", "fp16"):
            raise InputError(f"unknown precision {self.precision!r}")
        if not self.lr > 0:
            raise InputError(f"the learning rate must be > 0, got {self.lr:g}")
        if not self.min_lr >= 0:
            raise InputError(f"the learning rate's floor (min_lr) must be >= 0, got {self.min_lr:g}")
        if not self.rdrop >= 0:
            raise InputError("rdrop must be >= 0")
        if self.update_freq < 1:
            raise InputError("update_freq must be >= 1")
        for name in ("max_steps", "max_epochs", "eval_every", "log_every", "max_tokens", "batch_size", "context",
                     "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1, got {value}")
        for name in ("max_minutes", "max_cpu_minutes", "clip_norm", "eps"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise InputError(f"{name} must be a number > 0, got {value}")
        if self.warmup < 0 or self.keep_last < 0:
            raise InputError(f"warmup and keep_last must be >= 0, got {self.warmup} and {self.keep_last}")
        if not 0 <= self.weight_decay < math.inf:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label_smoothing must be from 0 to below 1, got {self.label_smoothing}")
        if self.seed not in SEEDS:
            raise InputError(f"seed must be from 0 to 2^63 - 1, got {self.seed}")
        if self.max_steps is None and self.max_epochs is None and self.max_minutes is None and self.max_cpu_minutes is None:
            raise InputError("give at least one of max_steps, max_epochs, max_minutes, max_cpu_minutes")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer (Dosovitskiy et al. 2021): an image cut into patch tokens for the same
    encoder layers (pre-norm, as in the ViT paper). Defaults: the small MNIST model shipped with aiayn."""

    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    n_classes: int = 10
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 4
    dropout: float = 0.0
    attn_dropout: float = 0.0
    activation: Literal["relu", "gelu"] = "gelu"
    positional: Literal["sincos2d", "learned"] = "sincos2d"
    pool: Literal["cls", "mean"] = "cls"

    def __post_init__(self):
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise InputError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.n_classes < 2:
            raise InputError("a classifier needs at least 2 classes")
        if self.positional not in ("sincos2d", "learned"):
            raise InputError(f"unknown positional encoding {self.positional!r}: use sincos2d or learned")
        if self.positional == "sincos2d" and self.d_model % 4:
            raise InputError(f"2-D sinusoidal positions need d_model divisible by 4, got {self.d_model}")
        if self.pool not in ("cls", "mean"):
            raise InputError(f"unknown pooling {self.pool!r}: use cls or mean")
        self.encoder()  # checks d_model, n_heads, d_ff, activation

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 2

    def encoder(self) -> ModelConfig:
        """The shape of the encoder layers, as the shared layer stack takes it (pre-norm)."""
        return ModelConfig(vocab_size=1, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff,
                           n_encoder_layers=self.n_layers, n_decoder_layers=0, dropout=self.dropout,
                           attn_dropout=self.attn_dropout, max_len=self.n_patches + 1, norm_first=True,
                           activation=self.activation, tie_embeddings=False)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"kind": "vit", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        d = {k: v for k, v in d.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown ViT config fields: {sorted(unknown)}")
        return cls(**d)
