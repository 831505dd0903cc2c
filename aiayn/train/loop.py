"""The one training loop, for every task (translation, language modelling, vision).

A task supplies its batches, its loss and its validation; the loop supplies the rest: the
optimizer and learning-rate schedule, mixed precision, gradient accumulation and clipping,
non-finite-loss guards, periodic validation, atomic checkpoints, exact resume, a progress bar,
metrics in `metrics.jsonl` and a PNG of the curves.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from aiayn.capability import choose_precision
from aiayn.checkpoint import (CKPT_PREFIX, CheckpointError, atomic_write_text, checkpoints, load_checkpoint,
                              recover, remove_tree, save_checkpoint)
from aiayn.config import TrainConfig
from aiayn.errors import InputError
from aiayn.fast import for_training
from aiayn.train.schedule import budget_fraction, learning_rate



class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. repeated non-finite losses): the message says why."""


class Task(Protocol):
    name: str
    best_metric: tuple[str, str]  # ("val_bleu", "max") or ("val_loss", "min")

    def epoch_batches(self, epoch: int, seed: int) -> list[Any]: ...

    def loss(self, model, batch, cfg: TrainConfig) -> tuple[torch.Tensor, int]:
        """-> (mean loss to minimize, number of target tokens in the batch)."""

    def validate(self, model, cfg: TrainConfig) -> dict[str, float]: ...


def autocast(cfg: TrainConfig):
    """bf16 autocast on CPU and CUDA (fp32 master weights), fp16 on CUDA. ("bf16-model" trains a bf16
    copy of the model without autocast, see Bf16Twin; its validation runs the fp32 model under bf16
    autocast, as "bf16" does.)"""
    precision = cfg.precision
    if precision == "auto":  # what the Trainer runs (its own cfg is already resolved)
        precision = choose_precision(precision, cfg.device, "train")[0]
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(cfg.device).type
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    if dtype == torch.float16 and device_type != "cuda":
        raise InputError("fp16 needs --device cuda; use bf16 on a CPU")
    return torch.autocast(device_type, dtype=dtype)


class Bf16Twin:
    """The "bf16-model" precision: a bf16 copy of an fp32 model runs the forward and backward passes.

    Under autocast every linear layer casts its fp32 weight to bf16 at every call, and the residual
    stream, layer norms and dropout stay in fp32. Here weights, activations and gradients are bf16
    throughout; the fp32 model keeps the master weights, which the optimizer updates, checkpoints
    save, averaging averages and validation runs. Per update: the bf16 gradients are added into fp32
    ones after each micro-batch (so accumulation is in fp32), the optimizer steps on the masters,
    and one `_foreach_copy_` rounds them back into the copy. Buffers (the sinusoidal positions) stay
    fp32 and are cast where they are used.
    """

    def __init__(self, master: torch.nn.Module):
        self.model = copy.deepcopy(master)  # deepcopy keeps tied parameters tied
        for p in self.model.parameters():
            p.data = p.data.to(torch.bfloat16)
        self._master = list(master.parameters())
        self._bf16 = list(self.model.parameters())
        self._buffers: dict[torch.Tensor, torch.Tensor] = {}  # master -> the storage of its fp32 gradient

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Add the copy's gradients into the masters' (fp32) and clear the copy's. Where a master has
        none yet (the optimizer's zero_grad sets them to None), its gradient is converted into an
        fp32 buffer kept from update to update, all of them in one foreach operator."""
        fresh, buffers, grads = [], [], []
        for m, b in zip(self._master, self._bf16):
            if b.grad is None:
                continue
            if m.grad is None:
                buffer = self._buffers.get(m)
                if buffer is None:
                    buffer = self._buffers[m] = torch.empty_like(m)
                fresh.append(m), buffers.append(buffer), grads.append(b.grad)
            else:
                m.grad.add_(b.grad)
            b.grad = None
        if fresh:
            torch._foreach_copy_(buffers, grads)
            for m, buffer in zip(fresh, buffers):
                m.grad = buffer

    @torch.no_grad()
    def sync(self) -> None:
        """Round the master weights into the bf16 copy (after every update and after loading)."""
        torch._foreach_copy_(self._bf16, self._master)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]  # fine-tuning may freeze some (aiayn.finetune)
    if cfg.optimizer == "adamw":  # no weight decay on biases, norms and embeddings' 1-d params
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    return torch.optim.Adam(trainable, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=True)


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The 2-norm of all gradients together (inf or nan if any gradient is)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: a few fused kernels
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class Trainer:
    def __init__(self, task: Task, model: torch.nn.Module, tokenizer, cfg: TrainConfig, run_dir: Path,
                 extra_meta: dict | None = None, parallel=None):
        # "auto" becomes what this machine runs natively; a precision it lacks is a PrecisionError
        cfg = cfg.replace(precision=choose_precision(cfg.precision, cfg.device, "train")[0])
        model = for_training(model.to(cfg.device), cfg.precision, cfg.device)  # aiayn.fast, in place
        # self.model holds the fp32 weights the optimizer updates; the passes run on self.twin's
        # bf16 copy with precision "bf16-model", on self.model itself otherwise
        self.task, self.model, self.tokenizer, self.cfg = task, model, tokenizer, cfg
        self.twin = Bf16Twin(model) if cfg.precision == "bf16-model" else None
        self.run_dir = Path(run_dir)
        self.extra_meta = extra_meta or {}
        # several processes (torchrun): an aiayn.train.distributed.Parallel; None: this process alone
        self.parallel = parallel
        if parallel is not None:
            if self.twin is not None:
                raise InputError("precision bf16-model trains in one process; with several, use bf16")
            model = self.model = parallel.wrap(task, model, cfg)  # FSDP: sharded before the optimizer sees it
        self.main = parallel is None or parallel.main  # the process that prints and writes files
        self.optimizer = make_optimizer(model, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.state = {"step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "best": None, "tokens": 0,
                      "nonfinite": 0}
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._epoch: list | None = None  # the current epoch's batches

    # ---------------------------------------------------------------------------- run directory
    def prepare(self, resume: bool) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            recover(self.run_dir)
        if self.parallel is not None:  # every rank sees the repaired directory, and stops alike
            from aiayn.train.distributed import barrier
            barrier()
        found = checkpoints(self.run_dir)
        if resume:
            if not found:
                raise CheckpointError(f"{self.run_dir}: no checkpoint to resume from")
            load = load_checkpoint if self.parallel is None else self.parallel.load
            self.state = {**self.state, **load(found[-1], self.model, self.optimizer, self.scaler)}
            if self.twin is not None:
                self.twin.sync()
            if self.main:
                self._truncate_metrics(self.state["step"])
        elif found:
            raise CheckpointError(f"{self.run_dir} already holds a run; use --resume to continue it "
                                  "or choose another --out")
        elif self.main:  # a run killed before its first checkpoint left nothing worth keeping
            self.metrics_path.unlink(missing_ok=True)
        if not self.main:
            return
        atomic_write_text(self.run_dir / "run.json", json.dumps(
            {"task": self.task.name, "model": self.model.cfg.to_dict(), "train": self.cfg.to_dict(),
             **self.extra_meta}, indent=2))

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (they will be logged again), and
        a last line that a kill cut short."""
        if self.metrics_path.is_file():
            rows = []
            for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        rows.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            atomic_write_text(self.metrics_path, "".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self, model=None, optimizer=None) -> Path:
        """Write a checkpoint of `model` and `optimizer` (default: the Trainer's own; FSDP: their
        gathered full copies)."""
        step = self.state["step"]
        path = self.run_dir / f"{CKPT_PREFIX}{step:08d}"
        save_checkpoint(path, self.model if model is None else model, self.tokenizer, self.task.name,
                        self.optimizer if optimizer is None else optimizer, self.state, extra=self.extra_meta,
                        scaler=self.scaler)
        self.prune(newest=path)
        return path

    def prune(self, newest: Path) -> None:
        """Keep the last cfg.keep_last checkpoints; never delete the newest or the best one."""
        found = checkpoints(self.run_dir)
        keep = {p.name for p in found[-max(self.cfg.keep_last, 1):]} | {newest.name}
        if self.state["best"] is not None:
            keep.add(self.state["best"]["checkpoint"])
        for old in found:
            if old.name not in keep:
                remove_tree(old)

    # -------------------------------------------------------------------------------- the loop
    def _next_batch(self):
        s = self.state
        if self._epoch is None:
            self._epoch = self.task.epoch_batches(s["epoch"], self.cfg.seed)
            if not self._epoch:
                raise TrainingError(f"{self.task.name}: no training batches (is every example empty or "
                                    "longer than the model's maximum length?)")
        if s["batch"] >= len(self._epoch):  # a checkpoint of an older version, saved at an epoch's end
            s["epoch"], s["batch"], self._epoch = s["epoch"] + 1, 0, None
            return self._next_batch()
        batch = self._epoch[s["batch"]]
        s["batch"] += 1
        if s["batch"] == len(self._epoch):  # the epoch is over as soon as its last batch is taken
            s["epoch"], s["batch"], self._epoch = s["epoch"] + 1, 0, None
        return batch

    def _done(self) -> bool:
        cfg, s = self.cfg, self.state
        return ((cfg.max_steps is not None and s["step"] >= cfg.max_steps)
                or (cfg.max_epochs is not None and s["epoch"] >= cfg.max_epochs)
                or (cfg.max_minutes is not None and s["elapsed"] >= 60 * cfg.max_minutes)
                or (cfg.max_cpu_minutes is not None and s.get("cpu_s", 0.0) >= 60 * cfg.max_cpu_minutes))

    def train_step(self) -> tuple[float, int]:
        """One optimizer update over cfg.update_freq micro-batches -> (mean loss, target tokens)."""
        cfg, model, twin, parallel = self.cfg, self.model, self.twin, self.parallel
        self.optimizer.zero_grad(set_to_none=True)
        values, total_tokens = [], 0
        if parallel is not None:
            parallel.seed(cfg.seed, self.state["step"])
        for i in range(cfg.update_freq):
            batch = self._next_batch()
            # several processes: this rank's shard, weighted so that the ranks' mean gradient is one
            # process's; gradients all-reduced on the last micro-batch only
            sync = contextlib.nullcontext() if parallel is None else parallel.sync(last=i == cfg.update_freq - 1)
            with sync:
                with autocast(cfg) if twin is None else contextlib.nullcontext():
                    if parallel is None:
                        loss, n_tokens = self.task.loss(model if twin is None else twin.model, batch, cfg)
                        value = loss.detach()  # read after the backward pass: on a GPU, .item() here
                        # would idle it while the backward pass's kernels are launched
                    else:
                        loss, n_tokens, value = parallel.loss(batch)
                self.scaler.scale(loss / cfg.update_freq).backward()
            if twin is not None:
                twin.collect_grads()
            values.append(value)
            total_tokens += n_tokens
        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16
        if cfg.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        else:  # a finite loss can still overflow in the backward pass
            norm = _grad_norm(model)
        total_loss = sum(float(v) / cfg.update_freq for v in values)  # (where a GPU's step is waited for)
        if not (math.isfinite(total_loss) and torch.isfinite(norm)):
            return self._skip_update(total_loss)
        self.state["nonfinite"] = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if twin is not None:
            twin.sync()
        return total_loss, total_tokens

    def _skip_update(self, loss: float) -> tuple[float, int]:
        """A non-finite loss or gradient: no update. Too many in a row stop the run."""
        s, what = self.state, "loss" if not math.isfinite(loss) else "gradient"
        s["nonfinite"] = s.get("nonfinite", 0) + 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # fp16: a smaller loss scale for the next step
        if s["nonfinite"] >= self.cfg.max_nonfinite:
            raise TrainingError(f"{s['nonfinite']} non-finite losses or gradients in a row (last at step "
                                f"{s['step'] + 1}); stopping, the last checkpoint is intact: lower --lr, "
                                "set --clip-norm or use fp32")
        warnings.warn(f"non-finite {what} at step {s['step'] + 1}: update skipped", RuntimeWarning, stacklevel=3)
        return math.nan, 0

    def validate(self, model=None) -> dict:
        """Validate `model` (default: the Trainer's own; FSDP: its gathered full copy)."""
        model = self.model if model is None else model
        device, cuda = torch.device(self.cfg.device), []
        if device.type == "cuda":
            cuda = [device.index if device.index is not None else torch.cuda.current_device()]
        model.eval()
        try:  # validation never draws from training's random stream: when it runs cannot change the run
            with torch.no_grad(), autocast(self.cfg), torch.random.fork_rng(devices=cuda):
                result = self.task.validate(model, self.cfg)
        finally:
            model.train()
        name, mode = self.task.best_metric
        best = self.state["best"]
        value = result[name]
        if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
            self.state["best"] = {"step": self.state["step"], "value": value,
                                  "checkpoint": f"{CKPT_PREFIX}{self.state['step']:08d}"}
        return result

    def run(self, resume: bool = False, progress: bool = True) -> dict:
        self.prepare(resume)
        cfg, s = self.cfg, self.state
        total = cfg.max_steps
        self._epoch = None
        self.model.train()
        if self.twin is not None:
            self.twin.model.train()
        bar = tqdm(total=total, initial=s["step"], disable=not (progress and self.main), unit="step", dynamic_ncols=True,
                   desc=f"train {self.task.name}")
        window_loss, window_tokens, window_steps, window_skipped = 0.0, 0, 0, 0
        t_window = time.perf_counter()
        result: dict = {}
        t_last, cpu_last = time.perf_counter(), time.process_time()
        while not self._done():
            lr = learning_rate(cfg, s["step"] + 1, total, budget_fraction(cfg, s))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, n_tokens = self.train_step()
            s["step"] += 1
            s["tokens"] += n_tokens
            now = time.perf_counter()
            s["elapsed"] += now - t_last  # wall time of the run, validation and saving included
            t_last = now
            if self.parallel is not None and cfg.max_minutes is not None:  # all ranks stop together
                s["elapsed"] = self.parallel.agree(s["elapsed"])
            cpu_now = time.process_time()  # CPU time of this process (all its threads), the same way
            s["cpu_s"] = s.get("cpu_s", 0.0) + cpu_now - cpu_last
            cpu_last = cpu_now
            if self.parallel is not None and cfg.max_cpu_minutes is not None:
                s["cpu_s"] = self.parallel.agree(s["cpu_s"])
            if math.isfinite(loss):
                window_loss, window_steps = window_loss + loss, window_steps + 1
            window_tokens += n_tokens
            window_skipped += not math.isfinite(loss)
            bar.update(1)
            evaluate = s["step"] % cfg.eval_every == 0 or self._done()
            save = evaluate or (cfg.save_every and s["step"] % cfg.save_every == 0)
            # the window is also closed at every checkpoint, so a resumed run logs exactly the same rows
            if (s["step"] % cfg.log_every == 0 or save) and self.main:
                dt = time.perf_counter() - t_window
                row = {"step": s["step"], "epoch": s["epoch"],
                       "loss": window_loss / window_steps if window_steps else None,
                       "lr": lr, "tok_s": window_tokens / dt, "elapsed_s": round(s["elapsed"], 1)}
                if window_skipped:
                    row["skipped"] = window_skipped
                row.update(getattr(self.task, "log_extra", lambda: {})())
                self.log(row)
                shown = math.nan if row["loss"] is None else row["loss"]
                bar.set_postfix(loss=f"{shown:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tok_s']:.0f}", ep=s["epoch"])
                window_loss, window_tokens, window_steps, window_skipped = 0.0, 0, 0, 0
                t_window = time.perf_counter()
            if save:
                t_pause = time.perf_counter()
                model, optimizer = self.model, self.optimizer
                if self.parallel is not None:  # FSDP: the full weights, gathered on rank 0
                    model, optimizer = self.parallel.full_state(self.model, self.optimizer)
                if not self.main:
                    continue
                if evaluate:
                    result = self.validate(model)
                    self.log({"step": s["step"], "epoch": s["epoch"], **result,
                              "eval_s": round(time.perf_counter() - t_pause, 1)})
                    bar.write(f"step {s['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
                self.save(model, optimizer)  # every evaluation is saved, so the best checkpoint always exists
                self.plot()
                t_window += time.perf_counter() - t_pause  # tokens/s measures training alone
        bar.close()
        return {"step": s["step"], "epoch": s["epoch"], "elapsed_s": s["elapsed"], "best": s["best"], **result}

    def plot(self) -> None:
        from aiayn.plots import plot_metrics

        plot_metrics(self.metrics_path, self.run_dir / "curves.png")
