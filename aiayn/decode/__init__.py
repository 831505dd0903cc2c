"""Decoding as functions over a model's `encode` / `init_cache` / `decode_step` (kept out of the model):
greedy and beam search for the encoder-decoder, sampling for the language model."""

from aiayn.decode.beam import beam_search, beam_step, length_penalty
from aiayn.decode.greedy import greedy, max_output_lengths
from aiayn.decode.sampling import apply_temperature, generate, sample_next, top_k_filter, top_p_filter

__all__ = ["beam_search", "beam_step", "length_penalty", "greedy", "max_output_lengths",
           "apply_temperature", "generate", "sample_next", "top_k_filter", "top_p_filter"]
