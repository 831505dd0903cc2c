"""The Transformer: attention, layers, and the encoder-decoder and decoder-only models."""

from aiayn.model.attention import KVCache, MultiHeadAttention, attend, causal_mask, padding_mask
from aiayn.model.layers import Embedding, FeedForward, Stack, TransformerLayer, sinusoidal_encoding
from aiayn.model.transformer import LanguageModel, Transformer, build_model

__all__ = ["KVCache", "MultiHeadAttention", "attend", "causal_mask", "padding_mask", "Embedding",
           "FeedForward", "Stack", "TransformerLayer", "sinusoidal_encoding", "LanguageModel",
           "Transformer", "build_model"]
