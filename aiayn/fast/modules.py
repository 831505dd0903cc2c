"""The model's modules with their fast paths: subclasses of aiayn/model's reference modules.

Each class below overrides one or two small methods of its parent (aiayn/model) to try aiayn's C
kernels (aiayn/kernels) first and falls back to the parent's plain PyTorch when a kernel does not
take the inputs, is not built, or is not faster on this machine (aiayn.kernels.tuning). Parameters,
buffers and state dicts are the parent's: `accelerate` (aiayn/fast/__init__.py) turns a model's
modules into these in place, by class.

Dropout is here too: on a CPU, drawing the random mask dominates nn.Dropout's cost (one generator
call per element: ~8 ms for 1M bf16 elements, more than a 4096x256x1024 matmul). Here the mask is
cut from 64-bit random words, four 16-bit lanes each, which is 4x faster; the keep probability is
exact to 2^-16. The mask is made in x's dtype with the 1 / (1 - p) scale in it, so that applying it
is one product (and, for a residual x + dropout(y), one `addcmul`); on a (4000, 256) bf16 tensor,
fwd+bwd, 1 thread: 3.6 -> 2.6 ms. On CUDA, PyTorch's own fused kernel is used.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiayn import kernels
from aiayn.model.attention import KVCache, MultiHeadAttention, split_kv
from aiayn.model.layers import Embedding, FeedForward, TransformerLayer
from aiayn.model.transformer import Transformer


# ------------------------------------------------------------------------------------- dropout
def _scaled_mask(x: Tensor, p: float) -> Tensor:
    """1 / (1 - p) where an element is kept, 0 where dropped, in x's dtype and shape."""
    mask = kernels.dropout_mask(x, p)  # the same, in one multithreaded pass (aiayn/kernels/train_step.c)
    if mask is not None:
        return mask
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    lanes = words.view(torch.int16)[:n].view(x.shape)       # uniform over [-2^15, 2^15)
    keep = lanes >= round(p * 65536) - 32768                  # P(keep) = 1 - p
    return keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return x
    if x.is_cuda or p >= 1.0:
        return F.dropout(x, p, training=True)
    # one product with a scaled mask: one pass forward and one backward (x * keep * scale took two each)
    return x * _scaled_mask(x, p)


def add_dropout(x: Tensor, y: Tensor, p: float, training: bool = True) -> Tensor:
    """x + dropout(y): the residual connection of §5.4, one fused `addcmul` on a CPU (fwd+bwd of a
    (4000, 256) bf16 residual, 1 thread: 4.0 -> 2.9 ms)."""
    if not training or p == 0.0 or y.is_cuda or p >= 1.0:
        return x + dropout(y, p, training)
    return torch.addcmul(x, y, _scaled_mask(y, p))


class FastDropout(nn.Dropout):
    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


# ------------------------------------------------------------------------------------- modules
class FastEmbedding(Embedding):
    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        if not (self.training and self.dropout.p):  # a decoding step: one kernel call
            x = kernels.embed(tokens, self.tokens.weight, self.scale, self.positions(start, tokens.size(1)))
            if x is not None:
                return x
        return super().forward(tokens, start)


class FastMultiHeadAttention(MultiHeadAttention):
    """Teacher-forced training: the heads' attention forward and backward in one kernel call each
    (train_step.c); a decoding step: the cache write and the attention in one call (decode_step.c)."""

    def _kernels_may(self, need_weights: bool) -> bool:
        """The decoding kernels: no dropout on the weights (the training kernel has its own)."""
        return not need_weights and not (self.training and self.dropout.p)

    def _trains(self, need_weights: bool) -> bool:
        return not need_weights and self.training

    def self_attention(self, qkv, mask, cache, need_weights):
        out = None
        if self._trains(need_weights) and cache is None:
            out = kernels.training_attention(qkv, qkv, mask, self.n_heads, self.d_model, k_col=self.d_model,
                                             dropout=self.dropout.p)
        elif self._kernels_may(need_weights) and cache is not None and mask is None:  # one new token, every position
            out = kernels.self_attention_step(qkv, *cache, self.n_heads)
        if out is not None:
            return out, None
        return super().self_attention(qkv, mask, cache, need_weights)

    def cross_attention(self, q, kv, mask, need_weights):
        if self._trains(need_weights) and isinstance(kv, Tensor):
            out = kernels.training_attention(q, kv, mask, self.n_heads, self.d_model, k_col=0, dropout=self.dropout.p)
            if out is not None:
                return out, None
        step = self._kernels_may(need_weights)
        if isinstance(kv, Tensor):
            kv = split_kv(kv, self.n_heads)
        if step:
            out = kernels.cross_attention_step(q, *kv, mask)
            if out is not None:
                return out, None
        return super().cross_attention(q, kv, mask, need_weights)

    def attend(self, q, k, v, mask, need_weights):
        """A few queries a row (a short sentence's encoder, a decoding step with a mask): decode_step.c,
        2-3x faster than PyTorch's fused kernel there."""
        if (self._kernels_may(need_weights) and q.size(2) <= kernels.MAX_QUERIES
                and kernels.supports(q, k, v, mask)):
            return kernels.decode_attention(q, k, v, mask), None
        return super().attend(q, k, v, mask, need_weights)


class FastFeedForward(FeedForward):
    """Training with GELU: the first linear layer's bias and the activation in one kernel call each
    way (train_step.c; the bias's gradient summed in the backward one), its product made without the
    bias."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.act is F.gelu and kernels.bias_gelu_takes(x, self.w1.bias):
            h = _product(self.w1, x)
            if h is not None:
                return self.w2(kernels.bias_gelu(h, self.w1.bias))
        return super().forward(x)


def _product(linear: nn.Linear, x: Tensor) -> Tensor | None:
    """x Wᵀ, the linear layer's product without its bias (on oneDNN where its products are:
    aiayn.fast.onednn); None for a layer of another kind (a LoRA adapter's)."""
    if type(linear) is nn.Linear:
        return F.linear(x, linear.weight)
    own = getattr(linear, "product", None)
    return own(x) if own is not None else None


class FastTransformerLayer(TransformerLayer):
    """The residual connections as one addcmul, and the post-norm ones as one kernel call
    (forward and backward in training, into the sublayer's output in decoding). A decoding step of a
    few rows through a post-norm decoder layer of an inference copy (its linear layers in the few-rows
    kernel's tiles): the whole layer in one kernel call."""

    def forward(self, x, mask, *, memory_kv=None, memory_mask=None, cache=None, need_weights=False):
        if cache is not None and mask is None and isinstance(memory_kv, tuple) and not (need_weights or self.training):
            out = self._decoder_step(x, memory_kv, memory_mask, cache)
            if out is not None:
                return out, {"self": None, "cross": None}
        return super().forward(x, mask, memory_kv=memory_kv, memory_mask=memory_mask, cache=cache,
                               need_weights=need_weights)

    def _decoder_step(self, x, memory_kv, memory_mask, cache) -> Tensor | None:
        plan = self.step_plan()
        return None if plan is None else kernels.decoder_layer(x, plan, *cache, *memory_kv, memory_mask)

    def step_plan(self) -> tuple | None:
        """The layer's weights as the one-call decoder layer takes them (kernels.decoder_layer_plan),
        or None where it does not (not an inference copy with the kernel's tiles, or not the paper's
        post-norm ReLU decoder layer)."""
        known = _PLANS.get(self)  # (its linear layers, their tiles, the plan)
        if known is None or any(getattr(m, "tiles", None) is not t for m, t in zip(known[0], known[1])):
            attn, cross, ff = self.self_attn, self.cross_attn, self.ff  # checked once, again if the tiles change
            if cross is None:
                return None
            linears = (attn.in_proj, attn.out_proj, getattr(cross, "q_proj", None), cross.out_proj, ff.w1, ff.w2)
            known = linears, [getattr(m, "tiles", None) for m in linears], self._plan(linears)
            _PLANS[self] = known
        return known[2]

    def _plan(self, linears) -> tuple | None:
        ff, norms = self.ff, (self.self_norm, self.cross_norm, self.ff_norm)
        relu = getattr(ff.w1, "post_op", None) == "relu" or getattr(ff.w1, "relu", None) is True  # (OneDNN/Int8Linear)
        if (self.norm_first or not relu or not isinstance(ff.act, nn.Identity) or any(n.eps != norms[0].eps for n in norms)
                or any(getattr(m, "tiles", None) is None for m in linears)):
            return None  # not an inference copy with the kernel's tiles (or not the paper's layer)
        weights = []
        for i, m in enumerate(linears):
            weights += [m.tiles, m.bias]
            if i % 2:
                weights += [norms[i // 2].weight, norms[i // 2].bias]
        return kernels.decoder_layer_plan(weights, self.self_attn.n_heads, ff.w1.out_features, norms[0].eps)

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        return add_dropout(x, y, self.dropout.p, self.training)

    def add_norm(self, x: Tensor, y: Tensor, norm: nn.LayerNorm) -> Tensor:
        if self.training:
            out = kernels.residual_layer_norm(x, y, norm, self.dropout.p)
        else:  # y is the sublayer's own new tensor
            out = kernels.add_layer_norm(x, y, norm, out=y)
        return out if out is not None else norm(self.add(x, y))


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder layer -> (linears, their tiles, plan)


class FastTransformer(Transformer):
    """A decoding step of one new token a row through an inference copy whose decoder layers take the
    one-call decoder layer (FastTransformerLayer.step_plan): the embedding, every layer and, up to
    kernels.generator_rows rows, the generator in one kernel call (kernels.decoder_step; more rows:
    the generator's own module after it), the same results as the modules' path, without its
    Python between them, and beam search's reorders of the caches done in place."""

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        if tokens.size(1) == 1 and not self.training:
            logits = self._whole_step(tokens, cache)
            if logits is not None:
                return logits
        return super().decode_step(tokens, cache)

    def _whole_step(self, tokens: Tensor, cache: KVCache) -> Tensor | None:
        layers, start = self.decoder.layers, cache.length
        if start >= cache.capacity or len(cache.cross_k) != len(layers):
            return None
        known = _STEPS.get(cache)  # (the buffers it was made for, kept alive with it; the plan)
        order = cache.pending_order()  # beam search's reorder: applied in the call
        if order is None:
            # a pending reorder applied here: into full-length buffers where this cache took the one-call
            # step (the next reorders are then applied in place), else as the layers' path reads them best
            room = cache.capacity - start if known is not None and known[1] is not None else 1
            for i in range(len(layers)):
                cache.layer(i, room)
        buffers = (*cache.self_k, *cache.self_v, *cache.cross_k, *cache.cross_v, cache.memory_mask)
        if known is None or len(known[0]) != len(buffers) or any(a is not b for a, b in zip(known[0], buffers)):
            n, plan = 2 * len(layers), None  # (the self-attention buffers come first)
            if known is not None and known[1] is not None and all(a is b for a, b in zip(known[0][n:], buffers[n:])):
                plan = kernels.decoder_step_recache(known[1], list(zip(cache.self_k, cache.self_v)), start)
            if plan is None:  # (a new cache, its sources or its number of rows changed)
                plan = self._step_plan(cache)
            known = buffers, plan
            _STEPS[cache] = known
        if known[1] is None:
            return None
        out = kernels.decoder_step(tokens, self.tgt_embed.positions(start, 1), start, known[1], order)
        if out is None:
            return None
        cache.length += 1
        if order is not None:
            cache.order_applied()
        return out if kernels.step_makes_logits(known[1]) else self.generator(out)

    def search_one(self, memory: Tensor, memory_mask: Tensor, max_len: int, beam_size: int, alpha: float,
                   forbid: tuple[int, ...], min_len: int, bos_id: int, eos_id: int) -> list | None:
        """Beam search of one sentence, its encoded source `memory` (1, S, D), in one kernel call
        (kernels.search: the same hypotheses as aiayn.decode.beam.search, without its Python between
        the steps) -> the finished (tokens, score) pairs in the order they finished; None where the
        kernels do not take it here (the caller then runs the reference)."""
        from aiayn.decode.beam import length_penalty

        if memory.size(0) != 1 or self.training or max_len + 1 > self.tgt_embed.max_len or not memory.is_cpu:
            return None
        cache = self.init_cache(memory, memory_mask, max_len + 1)
        cache.rows_per_source = beam_size
        cache.reorder(torch.zeros(beam_size, dtype=torch.long))  # k rows of the one source
        for i in range(len(self.decoder.layers)):
            cache.layer(i, cache.capacity)
        plan = self._step_plan(cache)
        if plan is None:
            return None
        penalties = torch.tensor([length_penalty(t + 1, alpha) for t in range(max_len + 1)], dtype=torch.float32)
        return kernels.search(plan, self.tgt_embed.positions(0, max_len + 1), penalties,
                              torch.tensor(forbid, dtype=torch.long), bos_id, eos_id, max_len, min_len)

    def greedy_one(self, memory: Tensor, memory_mask: Tensor, max_len: int, forbid: tuple[int, ...], min_len: int,
                   bos_id: int, eos_id: int) -> list[int] | None:
        """Greedy decoding of one sentence, its encoded source `memory` (1, S, D), in one kernel call
        (kernels.greedy: the same tokens as aiayn.decode.greedy, without its Python between the steps)
        -> its tokens; None where the kernels do not take it here (the caller then runs the reference)."""
        if memory.size(0) != 1 or self.training or not 0 < max_len <= self.tgt_embed.max_len or not memory.is_cpu:
            return None
        cache = self.init_cache(memory, memory_mask, max_len)
        plan = self._step_plan(cache)
        if plan is None:
            return None
        return kernels.greedy(plan, self.tgt_embed.positions(0, max_len), torch.tensor(forbid, dtype=torch.long),
                              bos_id, eos_id, max_len, min_len)

    def _step_plan(self, cache: KVCache) -> tuple | None:
        """The whole step's plan for this cache's buffers: with the generator up to
        `kernels.generator_rows` rows, else without it (the generator's module then runs after)."""
        generator, embed, n = self.generator, self.tgt_embed, len(self.decoder.layers)
        tiles = getattr(generator, "tiles", None)
        plans = [layer.step_plan() for layer in self.decoder.layers]
        if tiles is None or not isinstance(self.decoder.norm, nn.Identity) or any(p is None for p in plans):
            return None
        caches = [(cache.self_k[i], cache.self_v[i]) for i in range(n)]
        if cache.batch_size > kernels.generator_rows(tiles.dtype):
            tiles = None  # (oneDNN's or fbgemm's GEMM is faster there)
        return kernels.decoder_step_plan(embed.tokens.weight, embed.scale, plans, caches, cache.length,
                                         list(zip(cache.cross_k, cache.cross_v)), cache.memory_mask, tiles,
                                         generator.bias, generator.out_features)


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> (its buffers, the whole step's plan)


FAST = {nn.Dropout: FastDropout, Embedding: FastEmbedding, MultiHeadAttention: FastMultiHeadAttention,
        FeedForward: FastFeedForward, TransformerLayer: FastTransformerLayer, Transformer: FastTransformer}
