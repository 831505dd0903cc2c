"""Data: tokenizers, corpora and token-budget batching."""
