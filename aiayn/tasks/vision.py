"""Image classification with a Vision Transformer: images -> augmented batches -> cross-entropy;
validation accuracy on a held-out part of the training images.

Shape legend: B images per batch, H x W image, K classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aiayn.config import TrainConfig, ViTConfig
from aiayn.data.corpus import DataError
from aiayn.data.images import ImageSet
from aiayn.decode.greedy import evaluating
from aiayn.model.vit import images_to_input
from aiayn.train.loss import label_smoothed_cross_entropy

VAL_FRACTION = 1 / 16   # held out of the training images to choose checkpoints (500 of mnist10k's 8,006)
EVAL_BATCH = 256


# ---------------------------------------------------------------------------------------- recipe
def vit_train(**changes) -> TrainConfig:
    """DeiT's recipe, scaled to a small set and one CPU core: AdamW (0.9, 0.999), weight decay 0.05,
    linear warm-up then cosine decay, label smoothing 0.1, gradients clipped at 1."""
    return TrainConfig(**{"lr": 2e-3, "min_lr": 1e-5, "warmup": 200, "schedule": "cosine", "optimizer": "adamw",
                          "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "label_smoothing": 0.1,
                          "clip_norm": 1.0, "precision": "auto", "batch_size": 128, "eval_bleu": False,
                          "eval_every": 500, "log_every": 50, **changes})


# ---------------------------------------------------------------------------------- augmentation
@torch.no_grad()
def augment(x: Tensor, max_shift: float = 0.1, max_rotate: float = 12.0, max_scale: float = 0.1,
            max_shear: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """Random affine transforms that keep a digit a digit: shifts of up to max_shift of the image
    side, rotations of up to max_rotate degrees, zoom in or out by up to max_scale, a small shear.
    No flips (a mirrored 2 is not a 2). x (B, C, H, W) in [0, 1]; zeros come in at the borders."""
    B = x.size(0)

    def uniform(limit: float) -> Tensor:
        return (torch.rand(B, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(max_rotate))
    scale = 1 + uniform(max_scale)
    shear = uniform(max_shear)
    tx, ty = uniform(2 * max_shift), uniform(2 * max_shift)  # affine_grid's coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1),
                         torch.stack([sin, cos, ty], 1)], 1).to(x)  # (B, 2, 3): output -> input coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------------------ task
def split_train_val(data: ImageSet, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A fixed random part of the training images for validation (the same for every run and seed)."""
    n_val = max(1, int(len(data) * val_fraction))
    if len(data) - n_val < 1:
        raise DataError(f"{len(data)} images: too few to hold out a validation part")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_val:]), data.subset(order[:n_val])


@torch.no_grad()
def predict(model, images: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """uint8 images (N, H, W) -> class probabilities (N, K) on the CPU, computed in eval mode on the
    model's device."""
    device = next(model.parameters()).device
    with evaluating(model):
        return torch.cat([model(images_to_input(chunk).to(device)).float().softmax(-1).cpu()
                          for chunk in images.split(batch_size)])


def accuracy(model, data: ImageSet) -> float:
    return (predict(model, data.images).argmax(-1) == data.labels).float().mean().item()


class ViTTask:
    """Shuffled batches of `batch_size` training images, augmented afresh at every draw.

    A batch is the (B,) tensor of its images' indices; an epoch's order is a pure function of
    (seed, epoch) and the augmentation draws from torch's global generator, which checkpoints save,
    so a resumed run is exact.
    """

    name = "vit"
    best_metric = ("val_acc", "max")

    def __init__(self, train: ImageSet, val: ImageSet, cfg: ViTConfig, batch_size: int, device: str = "cpu",
                 augmentation: bool = True):
        for part, data in (("training", train), ("validation", val)):
            if tuple(data.images.shape[1:]) != (cfg.image_size, cfg.image_size):
                raise DataError(f"{part} images are {data.images.shape[2]}x{data.images.shape[1]}; the model "
                                f"takes {cfg.image_size}x{cfg.image_size}")
        self.train, self.val, self.batch_size, self.device = train, val, batch_size, device
        self.augmentation = augmentation

    def epoch_batches(self, epoch: int, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.train), generator=g)
        n = len(order) // self.batch_size * self.batch_size or len(order)  # drop a ragged last batch
        return list(order[:n].split(self.batch_size))

    def loss(self, model, batch: Tensor, cfg: TrainConfig) -> tuple[Tensor, int]:
        x = images_to_input(self.train.images[batch]).to(self.device)
        if self.augmentation:
            x = augment(x)
        y = self.train.labels[batch].to(self.device)
        loss = label_smoothed_cross_entropy(model(x), y, cfg.label_smoothing)
        return loss, len(batch)

    @torch.no_grad()
    def validate(self, model, cfg: TrainConfig) -> dict[str, float]:
        probs = predict(model, self.val.images)
        nll = F.nll_loss(probs.clamp_min(1e-12).log(), self.val.labels).item()
        return {"val_loss": nll, "val_acc": (probs.argmax(-1) == self.val.labels).float().mean().item()}
