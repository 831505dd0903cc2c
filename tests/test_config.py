"""Configuration: the paper's presets (Table 3), parameter counts, validation, immutability."""

import dataclasses

import pytest
import torch

from aiayn.config import PRESETS, ModelConfig, preset
from aiayn.model import Transformer

VOCAB = 37000  # §5.1: a shared source-target vocabulary of about 37000 tokens


@pytest.mark.parametrize("name, layers, d_model, d_ff, heads, dropout", [
    ("base", 6, 512, 2048, 8, 0.1),
    ("big", 6, 1024, 4096, 16, 0.3),
])
def test_presets_match_table_3(name, layers, d_model, d_ff, heads, dropout):
    cfg = preset(name)
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == (layers, layers)
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.dropout) == (d_model, d_ff, heads, dropout)
    assert cfg.head_dim == 64  # d_k = d_v = 64 in both
    assert cfg.vocab_size == VOCAB and cfg.shared_vocab and cfg.tie_embeddings
    assert cfg.norm_first is False and cfg.activation == "relu" and cfg.positional == "sinusoidal"


def _analytic_count(cfg: ModelConfig) -> int:
    """Parameters of the paper's architecture, counted by hand."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    attention = 4 * D * D + 4 * D   # W_q, W_k, W_v, W_o with biases
    ffn = 2 * D * F + F + D         # W1, b1, W2, b2
    norm = 2 * D                    # gain and bias
    encoder_layer = attention + ffn + 2 * norm
    decoder_layer = 2 * attention + ffn + 3 * norm
    embeddings = V * D              # one matrix for source, target and the output projection
    return cfg.n_encoder_layers * encoder_layer + cfg.n_decoder_layers * decoder_layer + embeddings


def _model_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # count without allocating 200M parameters
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())  # tied parameters are yielded once


@pytest.mark.parametrize("name, paper, tolerance", [("base", 65e6, 0.03), ("big", 213e6, 0.02)])
def test_parameter_counts(name, paper, tolerance):
    cfg = preset(name, vocab_size=VOCAB)
    count = _model_count(cfg)
    assert count == _analytic_count(cfg)
    assert abs(count - paper) / paper < tolerance, f"{name}: {count:,} parameters vs the paper's {paper:,.0f}"


def test_analytic_count_values():
    """The numbers themselves, so a mistake shared by the model and _analytic_count is caught."""
    assert _analytic_count(preset("base")) == 63_082_496
    assert _analytic_count(preset("big")) == 214_245_376


def test_untied_embeddings_add_two_matrices():
    cfg = preset("tiny", tie_embeddings=False)
    tied = preset("tiny")
    assert _model_count(cfg) - _model_count(tied) == 2 * cfg.vocab_size * cfg.d_model


# ------------------------------------------------------------------------------- validation
def test_d_model_must_divide_into_heads():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="divisible"):
        preset("base", n_heads=7)


@pytest.mark.parametrize("changes", [
    {"activation": "tanh"},
    {"positional": "rotary"},
    {"tgt_vocab_size": 1000, "tie_embeddings": True},
])
def test_invalid_configs_are_rejected(changes):
    with pytest.raises(ValueError):
        preset("tiny", **changes)


@pytest.mark.parametrize("changes", [{"lr": -1.0}, {"lr": 0.0}, {"lr": float("nan")}, {"min_lr": -1e-5}])
def test_a_learning_rate_that_cannot_train_is_refused(changes):
    """Caught here, as one line for the user, not as the optimizer's traceback at the first step."""
    from aiayn.config import TrainConfig
    from aiayn.errors import InputError

    with pytest.raises(InputError, match="learning rate"):
        TrainConfig(max_steps=1, **changes)


def test_separate_vocabularies_allowed_without_tying():
    cfg = preset("tiny", tgt_vocab_size=100, tie_embeddings=False)
    assert not cfg.shared_vocab and cfg.target_vocab == 100
    # A decoder-only model has one vocabulary, so tying is fine whatever tgt_vocab_size says.
    assert preset("tiny", n_encoder_layers=0, tgt_vocab_size=100).target_vocab == 100


def test_config_is_frozen():
    cfg = preset("base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 256
    changed = cfg.replace(d_model=256, n_heads=4)
    assert changed.d_model == 256 and cfg.d_model == 512
    assert PRESETS["base"].d_model == 512  # a preset is never mutated by preset(..., **changes)
    assert preset("base", dropout=0.0).dropout == 0.0 and PRESETS["base"].dropout == 0.1


def test_dict_round_trip_and_unknown_fields():
    cfg = preset("small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_config_dicts_saved_before_the_import_options_load_as_the_paper():
    """Models saved before scale_embedding, output_bias and norm_eps existed load with the paper's
    choices (scaled embeddings, no output bias, LayerNorm eps 1e-5)."""
    from aiayn.config import ModelConfig

    old = ModelConfig(d_model=64, n_heads=4).to_dict()
    for field in ("scale_embedding", "output_bias", "norm_eps"):
        del old[field]
    cfg = ModelConfig.from_dict(old)
    assert cfg == ModelConfig(d_model=64, n_heads=4)
    assert (cfg.scale_embedding, cfg.output_bias, cfg.norm_eps) == (True, False, 1e-5)
