"""Training on several processes with PyTorch's own engine: torch.distributed (gloo on CPUs, NCCL on
GPUs), DistributedDataParallel or FSDP2 (`fully_shard`), launched by torchrun:

    torchrun --nproc-per-node 2 -m aiayn train translation ... [--distributed ddp|fsdp]

The Trainer (aiayn/train/loop.py) runs the same loop on every rank and calls this module at a few
points; with one process none of it runs. What makes N ranks train exactly as one process does:

- One global batch. Every rank computes the same epoch of batches (a pure function of seed and
  epoch, as in one process) and takes its own shard of each: every world-th example. The effective
  batch is the one process's, whatever the number of ranks, so a run saved by N ranks resumes on M
  ranks (or in one process) with the same batches.
- Loss normalisation. One process minimises the mean loss over a batch's target tokens. Rank r
  holds n_r of the batch's N tokens; DDP averages the ranks' gradients, so rank r's mean loss is
  weighted by world * n_r / N (N all-reduced with the loss): the average is the one process's
  gradient. A rank whose shard is empty (a batch of fewer examples than ranks) runs a copy of the
  first example with weight 0, so that every rank joins every all-reduce.
- Gradient accumulation (`--update-freq`): gradients are synchronised on the last micro-batch only
  (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`).
- Dropout: at every update each rank seeds its generator from (seed, step, rank), as fairseq does,
  so that a run killed and resumed draws the very same masks on every rank.
- Rank 0 alone shows progress, logs, validates and writes checkpoints (with aiayn.checkpoint, as
  one process does); every rank resumes from the same checkpoint. FSDP gathers the full weights
  and optimizer state to rank 0 first, so its checkpoints load in one process (translate, generate).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from aiayn.errors import InputError

STRATEGIES = ("ddp", "fsdp")
TIMEOUT = datetime.timedelta(hours=2)  # rank 0 validates (BLEU of a large model) while the others wait


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block before the others (e.g. it repairs a run directory they then read)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def from_main(make):
    """make() on rank 0, its result sent to every rank (e.g. a tokenizer learned once, not per rank:
    sentencepiece on several threads need not give the same vocabulary twice)."""
    if not (dist.is_available() and dist.is_initialized()):
        return make()
    box: list[Any] = [None]
    error = None
    if is_main():
        try:
            box[0] = make()
        except InputError as e:  # the user's: every rank says it and stops
            error = e
    box = [(box[0], str(error) if error else None)]
    dist.broadcast_object_list(box, src=0)
    value, message = box[0]
    if message is not None:
        raise InputError(message)
    return value


def init(strategy: str | None, device: str) -> tuple["Parallel | None", str]:
    """-> (the Parallel of this rank, or None for one process; the device this rank trains on).

    Under torchrun with more than one process the process group starts here: NCCL on CUDA, each
    rank on its local GPU (cuda:LOCAL_RANK); gloo on CPUs. One process (with or without torchrun)
    trains as it always did, whatever `strategy` says.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise InputError(f"unknown --distributed {strategy!r}: use {' or '.join(STRATEGIES)}")
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return None, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Parallel(strategy or "ddp", device), device


def close(finished: bool = True) -> None:
    """The process group's end. After a run that finished on this rank, first a barrier: a rank that
    tore its group down while another was still finishing (rank 0 writing the last checkpoint) could
    abort in gloo's threads ("terminate called without an active exception", 1 FSDP resume in ~20).
    After an error, no barrier: the other ranks may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class _TaskLoss(nn.Module):
    """The task's loss as a module's forward, so that DDP's and FSDP's hooks run around it (the
    tasks call model.encode/decode/logits, which are not `forward`)."""

    def __init__(self, task, model: nn.Module, cfg):
        super().__init__()
        self.model = model
        self._task, self._cfg = task, cfg  # not modules

    def forward(self, batch):
        return self._task.loss(self.model, batch, self._cfg)


class _FullOptimizer:
    """An optimizer's full (unsharded) state dict, in the shape aiayn.checkpoint saves and loads
    (integer parameter ids, as one process's optimizer has)."""

    def __init__(self, state: dict, param_groups: list[dict]):
        self.state, self.param_groups = state, param_groups

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class Parallel:
    """This rank's part of a distributed run: the rank, the world, the wrapped model."""

    def __init__(self, strategy: str, device: str):
        self.strategy, self.device = strategy, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.runner: nn.Module | None = None

    # ------------------------------------------------------------------------------ the model
    def wrap(self, task, model: nn.Module, cfg) -> nn.Module:
        """Wrap the model for this strategy; -> the model whose parameters the optimizer updates
        (FSDP: the same module, its parameters now this rank's shards)."""
        runner = _TaskLoss(task, model, cfg)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            from aiayn.model.layers import TransformerLayer

            # one group per layer: a layer's weights are gathered only while it computes. The decoder
            # stack projects the encoder output to each layer's cross-attention keys and values
            # before the layer runs (kv_projection, not forward): cross-attention is a group of its
            # own, gathered for that method too.
            for module in model.modules():
                if isinstance(module, TransformerLayer):
                    if getattr(module, "cross_attn", None) is not None:
                        fully_shard(module.cross_attn)
                        register_fsdp_forward_method(module.cross_attn, "kv_projection")
                    fully_shard(module)
            fully_shard(runner)  # the rest (embeddings, generator, final norm) in the root group
            # FSDP2 warns that a group returning a view would lose its backward hook to an in-place
            # op on that view; the model makes none (tests/train/test_distributed.py checks FSDP's
            # gradients against one process's)
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            self.runner = runner
        else:
            ids = None if torch.device(self.device).type == "cpu" else [torch.device(self.device)]
            # buffers (the sinusoidal positions) are the same constants on every rank: not broadcast
            self.runner = nn.parallel.DistributedDataParallel(runner, device_ids=ids, broadcast_buffers=False)
        return model

    def sync(self, last: bool):
        """Gradients are all-reduced on the last micro-batch of an update only."""
        if last:
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            return _fsdp_no_sync(self.runner)
        return self.runner.no_sync()

    def seed(self, seed: int, step: int) -> None:
        """Dropout masks as a function of (seed, step, rank): resume draws the same ones."""
        torch.manual_seed((seed * 1_000_003 + step) * 1_009 + self.rank)

    # ---------------------------------------------------------------------------- the batch
    def shard(self, batch):
        """-> (this rank's share of a global batch, whether it holds any example)."""
        mine = batch[self.rank::self.world]
        if len(mine) == 0:
            return batch[:1], False
        return mine, True

    def loss(self, batch) -> tuple[Tensor, int, float]:
        """Forward this rank's shard -> (the loss to back-propagate, the global batch's tokens,
        the global batch's mean loss)."""
        mine, real = self.shard(batch)
        loss, n = self.runner(mine)
        n = n if real else 0
        device = loss.device
        totals = torch.tensor([float(n), float(n) * loss.detach().float().item()], dtype=torch.float64,
                              device=device)
        dist.all_reduce(totals)
        n_all, loss_sum = int(totals[0].item()), float(totals[1].item())
        weight = self.world * n / n_all if n_all else 0.0
        mean = loss_sum / n_all if n_all else float("nan")
        return loss * weight, n_all, mean

    def agree(self, value: float) -> float:
        """Rank 0's value on every rank (the elapsed time that --max-minutes checks)."""
        box = torch.tensor([value], dtype=torch.float64)
        if torch.device(self.device).type == "cuda":
            box = box.to(self.device)
        dist.broadcast(box, src=0)
        return float(box.item())

    # ------------------------------------------------------------------- checkpoints (FSDP)
    def full_state(self, model: nn.Module, optimizer) -> tuple[nn.Module, Any]:
        """-> (a model and an optimizer that aiayn.checkpoint can save, and validation can run).

        DDP: the model and optimizer themselves (every rank holds them whole). FSDP: a collective:
        the full weights and optimizer state are gathered on rank 0, into a plain CPU copy of the
        model (other ranks get None).
        """
        if self.strategy != "fsdp":
            return model, optimizer
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.main:
            return None, None
        plain = _plain_copy(model, weights, self.device)
        full = _by_index(optim, _names(model, optimizer))
        return plain, _FullOptimizer(full, full["param_groups"])

    def load(self, directory: Path, model: nn.Module, optimizer, scaler) -> dict:
        """Every rank resumes from `directory`; -> the trainer state saved there."""
        from aiayn.checkpoint import load_checkpoint

        if self.strategy != "fsdp":
            return load_checkpoint(directory, model, optimizer, scaler)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        plain = _plain_copy(model, None, "cpu")
        names = _names(model, optimizer)
        full = _FullOptimizer({}, optimizer.param_groups)
        state = load_checkpoint(directory, plain, full, scaler)
        _copy_into_shards(model, plain)
        options = StateDictOptions(full_state_dict=True)
        saved = full.state
        by_name = {"state": {names[i]: s for i, s in saved["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)
        return state


@contextlib.contextmanager
def _fsdp_no_sync(runner):
    runner.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        runner.set_requires_gradient_sync(True)


def _plain_copy(model: nn.Module, weights: dict | None, device: str) -> nn.Module:
    """A plain (unsharded) model of the same config, with `weights` if given (and the fast paths
    that the Trainer's model has, for validation)."""
    from aiayn.fast import accelerate
    from aiayn.model import build_model

    plain = accelerate(build_model(model.cfg))
    if weights is not None:
        plain.load_state_dict(weights)
    return plain.to(device if weights is not None else "cpu")


@torch.no_grad()
def _copy_into_shards(model: nn.Module, plain: nn.Module) -> None:
    """The full weights of `plain` into the sharded `model`, each rank keeping its shards.
    (set_model_state_dict would copy a tied matrix once per name, the second time into a DTensor.)"""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(full[name].to(p.device_mesh.device_type), p.device_mesh, p.placements))
        else:
            p.copy_(full[name])


def _names(model: nn.Module, optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order: one process's optimizer numbers its
    parameters in this order, FSDP's full state dicts name them."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _by_index(optim: dict, names: list[str]) -> dict:
    """A full optimizer state keyed by parameter name -> keyed by index, as one process saves it."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in optim["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]}
