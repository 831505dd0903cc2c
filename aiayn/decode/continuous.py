"""Greedy decoding with continuous batching (iteration-level scheduling, Yu et al. 2022, "Orca"):
sentences join a running batch at any step and leave it as soon as they end. A server's batch then
stays full, no sentence waits for the longest of its batch, and none waits for a batch to end
before it starts (with batches decoded whole, 32 clients made two alternating batches of 16, and
each batch's last steps ran for one or two long sentences).

Each row is a slot of preallocated buffers. A row's sentence began at its own step of the batch
(`joined`): it takes its own positions (§3.5: its BOS at position 0) and attends only to the cache
positions written since (`row_mask`), its source to its own tokens (the source mask). So each
sentence gets what `greedy` gives it alone. A finished row's slot is filled by the last row (a copy
of one row), and when the oldest row's start has moved far, the cache positions before it are
dropped (`_compact`), so a batch can run for ever in a cache of at most `max_len` positions (64 at
first: a cache of 64 rows x 512 positions of the shipped model would take 400 MB).

Shape legend: R slots, b rows in use, H heads, L cache positions, S longest source in use, Dh head size.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from aiayn import kernels
from aiayn.data.batching import pad
from aiayn.decode.greedy import row_argmax
from aiayn.errors import InputError

INITIAL_POSITIONS = 64  # the cache's first size; it grows (doubling, to max_len) when rows need more


class _RowCache:
    """What `decode_step` reads and writes (as a KVCache does), for b rows that began at different
    steps: self-attention buffers (R, H, L, Dh) per layer, the sources' keys and values (R, H, S', Dh)
    per layer, and the masks. `cross_k`, `cross_v`, `memory_mask` and `joined` are views of the rows in
    use, made again by `refresh` whenever b, S or a buffer changes."""

    def __init__(self, n_layers: int, rows: int, H: int, Dh: int, capacity: int, dtype, device):
        def zeros(length):
            return [torch.zeros(rows, H, length, Dh, dtype=dtype, device=device) for _ in range(n_layers)]

        self.self_k, self.self_v = zeros(capacity), zeros(capacity)
        self.self_mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=device)  # True: the row's own
        self.source_k, self.source_v = zeros(8), zeros(8)
        self.source_mask = torch.zeros(rows, 1, 1, 8, dtype=torch.bool, device=device)
        self.start = torch.zeros(rows, dtype=torch.long, device=device)  # the step each row began at
        self.b = self.S = self.length = 0
        self.refresh()

    @property
    def capacity(self) -> int:
        return self.self_k[0].size(2)

    def refresh(self) -> None:
        b, S = self.b, self.S
        self.cross_k = [k[:b, :, :S] for k in self.source_k]
        self.cross_v = [v[:b, :, :S] for v in self.source_v]
        self.memory_mask = self.source_mask[:b, :, :, :S]
        self.joined = self.start[:b]

    def row_mask(self, new: int) -> Tensor:
        """(b, 1, 1, length + new): the positions each row attends to."""
        return self.self_mask[:self.b, :, :, :self.length + new]

    def layer(self, i: int, new: int = 1) -> tuple[Tensor, Tensor, int]:
        return self.self_k[i][:self.b], self.self_v[i][:self.b], self.length

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions in the self-attention buffers (the positions kept)."""
        have = self.capacity
        for bufs in (self.self_k, self.self_v):
            for i, buf in enumerate(bufs):
                grown = buf.new_zeros(buf.size(0), buf.size(1), capacity, buf.size(3))
                grown[:, :, :have] = buf
                bufs[i] = grown
        mask = self.self_mask.new_ones(self.self_mask.size(0), 1, 1, capacity)  # later positions: the rows'
        mask[..., :have] = self.self_mask
        self.self_mask = mask

    def room_for_sources(self, S: int) -> None:
        """Grow the sources' buffers to hold S positions (at least doubling them, so growing is rare)."""
        have = self.source_k[0].size(2)
        if S <= have:
            return
        S_new = max(S, 2 * have)
        for bufs in (self.source_k, self.source_v):
            for i, buf in enumerate(bufs):
                grown = buf.new_zeros(buf.size(0), buf.size(1), S_new, buf.size(3))
                grown[:, :, :have] = buf
                bufs[i] = grown
        mask = self.source_mask.new_zeros(self.source_mask.size(0), 1, 1, S_new)
        mask[..., :have] = self.source_mask
        self.source_mask = mask


class ContinuousGreedy:
    """Greedy search over a stream of sentences on one model (an inference copy, say), at most
    `max_rows` at a time: `add` sources (token ids, no BOS/EOS; each gets a handle), then `step`
    until they are done; each `step` decodes one token of every row and returns the rows that
    ended, as (handle, token ids without BOS and EOS). `drop` forgets rows whose results nobody
    wants. Not thread-safe: one thread drives it.

    The outputs are `greedy`'s for each sentence alone: at most source length + `max_extra` tokens
    (capped at max_len - 1), never the pad id.
    """

    def __init__(self, model, bos_id: int, eos_id: int, max_rows: int = 64, max_extra: int = 50):
        if max_rows < 1 or max_extra < 0:
            raise InputError(f"max_rows must be >= 1 and max_extra >= 0, got {max_rows} and {max_extra}")
        self.model, self.bos_id, self.eos_id = model, bos_id, eos_id
        self.max_rows, self.max_extra = max_rows, max_extra
        cfg = model.cfg
        self.max_len = cfg.max_len
        self._cache: _RowCache | None = None  # made at the first `add`, in the dtype of the model's output
        R = max_rows
        self._tokens = torch.full((R, 1), bos_id, dtype=torch.long)   # each row's next input
        self._limits = torch.zeros(R, dtype=torch.long)                # the step at which a row must end
        self._record = torch.zeros(R, self.max_len, dtype=torch.long)  # outputs, at the batch's steps
        self._source_len = [0] * R
        self._handles: list[Hashable | None] = [None] * R
        self._banned = torch.tensor([cfg.pad_id])
        self._next_handle = 0

    def __len__(self) -> int:
        """Rows in the batch."""
        return self._cache.b if self._cache is not None else 0

    @property
    def free(self) -> int:
        return self.max_rows - len(self)

    # ------------------------------------------------------------------------------ rows in
    @torch.no_grad()
    def add(self, sources: Sequence[Sequence[int]]) -> list[int]:
        """Start decoding these sources (each at most max_len - 1 ids) -> their handles."""
        n = len(sources)
        if n > self.free:
            raise InputError(f"{n} sentences, and room for {self.free} more in the batch")
        if not n:
            return []
        if any(not 0 < len(s) < self.max_len for s in sources):
            raise InputError(f"each source needs 1 to {self.max_len - 1} tokens")
        cfg = self.model.cfg
        memory, memory_mask = self.model.encode(pad([list(s) for s in sources], cfg.pad_id))
        layers = self.model.decoder.layers
        kvs = [layer.cross_attn.project_kv(memory) for layer in layers]
        c = self._cache
        if c is None:
            c = self._cache = _RowCache(len(layers), self.max_rows, cfg.n_heads, cfg.head_dim,
                                        min(self.max_len, INITIAL_POSITIONS), memory.dtype, memory.device)
        if c.b == 0:
            c.length = 0  # an empty batch starts afresh
        lo, hi, S = c.b, c.b + n, memory.size(1)
        c.room_for_sources(S)
        for i, (k, v) in enumerate(kvs):
            c.source_k[i][lo:hi, :, :S] = k
            c.source_v[i][lo:hi, :, :S] = v
        c.source_mask[lo:hi] = False
        c.source_mask[lo:hi, :, :, :S] = memory_mask
        c.self_mask[lo:hi] = False
        c.self_mask[lo:hi, :, :, c.length:] = True
        c.start[lo:hi] = c.length
        lengths = torch.tensor([len(s) for s in sources])
        self._limits[lo:hi] = c.length + (lengths + self.max_extra).clamp(1, self.max_len - 1)
        self._tokens[lo:hi] = self.bos_id
        handles = list(range(self._next_handle, self._next_handle + n))
        self._next_handle += n
        self._handles[lo:hi] = handles
        self._source_len[lo:hi] = lengths.tolist()
        c.b, c.S = hi, max(c.S, S)
        c.refresh()
        return handles

    # ------------------------------------------------------------------------------ a step
    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, list[int]]]:
        """One token for every row -> the rows that ended at it: (handle, token ids)."""
        c = self._cache
        if c is None or c.b == 0:
            return []
        self._compact()
        b, t = c.b, c.length
        logits = self.model.decode_step(self._tokens[:b], c)  # (b, 1, V); c.length is now t + 1
        nxt = torch.empty(b, 1, dtype=torch.long)
        rows = torch.arange(b)
        limits = self._limits[:b]
        # aiayn.kernels: the next tokens, into the record at column t, and the rows done, in one call
        n_done = kernels.greedy_step(logits, self._banned, nxt, self._record, rows, t, self.eos_id, limits)
        if n_done is None:  # the same with PyTorch's ops
            nxt = row_argmax(logits[:, -1].index_fill_(-1, self._banned, float("-inf")))[:, None]
            self._record[:b, t] = nxt[:, 0]
            n_done = int(((nxt[:, 0] == self.eos_id) | (limits <= t + 1)).sum())
        self._tokens[:b] = nxt
        if not n_done:
            return []
        done = ((nxt[:, 0] == self.eos_id) | (limits <= t + 1)).nonzero().squeeze(1).tolist()
        finished = []
        starts = c.start[:b].tolist()
        for r in done:
            tokens = self._record[r, starts[r]:t + 1].tolist()
            if tokens[-1] == self.eos_id:
                tokens.pop()
            finished.append((self._handles[r], tokens))
        self._remove(done)
        return finished

    def drop(self, handles) -> None:
        """Forget the rows of these handles (their sentences' requests were given up)."""
        wanted = set(handles)
        self._remove([r for r in range(len(self)) if self._handles[r] in wanted])

    # ------------------------------------------------------------------------------ rows out
    def _remove(self, rows: list[int]) -> None:
        """Free these slots: the last rows in use move into them, one row copied per hole."""
        c = self._cache
        if not rows:
            return
        gone = set(rows)
        b = c.b - len(gone)
        movers = [r for r in range(b, c.b) if r not in gone]
        for dst, src in zip(sorted(r for r in gone if r < b), movers):
            self._move(src, dst)
        for r in range(b, c.b):
            self._handles[r] = None
        c.b = b
        c.S = max(self._source_len[:b], default=0)
        if b == 0:
            c.length = 0
        c.refresh()

    def _move(self, src: int, dst: int) -> None:
        c = self._cache
        t, S = c.length, self._source_len[src]
        for bufs in (c.self_k, c.self_v):
            for buf in bufs:
                buf[dst, :, :t] = buf[src, :, :t]
        for bufs in (c.source_k, c.source_v):
            for buf in bufs:
                buf[dst, :, :S] = buf[src, :, :S]
        for buf in (c.self_mask, c.source_mask, c.start, self._tokens, self._limits, self._record):
            buf[dst] = buf[src]
        self._source_len[dst], self._handles[dst] = self._source_len[src], self._handles[src]

    def _compact(self) -> None:
        """Make room for the next position: drop the cache positions before the oldest row's start
        when the cache is full and a quarter of it would be freed (else grow it, at most to max_len),
        or when they are at least half of it (every row's attention scans all positions up to now)."""
        c = self._cache
        shift = int(c.start[:c.b].min())
        full = c.length + 1 > c.capacity
        if full and 4 * shift < c.capacity and c.capacity < self.max_len:
            c.grow(min(2 * c.capacity, self.max_len))
            full = False
        if not shift or (not full and (shift < 16 or 2 * shift < c.length)):
            return
        b, keep = c.b, c.length - shift
        for bufs in (c.self_k, c.self_v):
            for buf in bufs:
                buf[:b, :, :keep] = buf[:b, :, shift:c.length].clone()
        c.self_mask[:b, :, :, :keep] = c.self_mask[:b, :, :, shift:c.length].clone()
        c.self_mask[:b, :, :, keep:] = True
        self._record[:b, :keep] = self._record[:b, shift:c.length].clone()
        c.start[:b] -= shift
        self._limits[:b] -= shift
        c.length = keep
