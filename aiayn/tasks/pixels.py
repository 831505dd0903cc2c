"""Image generation, pixel by pixel, with the decoder-only language model (Image GPT, Chen et al.
2020): each image is a class token followed by its quantized pixels in raster order
(aiayn.data.pixels); the model learns next-pixel prediction, is scored in bits per pixel, and draws
new images with the project's sampling filters (temperature, top-k, top-p) over the KV cache.

Shape legend: B images per batch, L = 1 + H * W tokens, P = H * W pixels, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aiayn.config import ModelConfig, TrainConfig
from aiayn.data.images import ImageSet
from aiayn.data.pixels import PixelTokenizer
from aiayn.decode.greedy import evaluating
from aiayn.decode.sampling import _check, sample_next
from aiayn.errors import InputError
from aiayn.train.loss import label_smoothed_cross_entropy

ANY_CLASS_FRACTION = 0.1  # training images shown with the "any class" token: completion without a label
EVAL_BATCH = 64
MAX_VAL_IMAGES = 128      # validation scores at most this many held-out images (a forward pass of 785 tokens each)


# ---------------------------------------------------------------------------------------- recipe
def pixel_config(tokenizer: PixelTokenizer, **changes) -> ModelConfig:
    """A GPT-style decoder-only model over pixel tokens (pre-norm, GELU, tied embeddings). Positions
    are §3.5's sinusoids, not Image GPT's learned ones: the pixel above is always 28 positions back,
    an offset that sinusoids let attention learn once for every position, where learned positions
    must learn it position by position (after 4,000 images, a learned-position model still drew
    horizontal streaks). Small and with few heads: on a CPU, 785-token sequences cost mostly
    attention (B x heads x 785^2 scores per layer), so width and heads are kept low."""
    return ModelConfig(**{"vocab_size": tokenizer.vocab_size, "n_encoder_layers": 0, "n_decoder_layers": 4,
                          "d_model": 64, "n_heads": 2, "d_ff": 256, "dropout": 0.0, "norm_first": True,
                          "activation": "gelu", "positional": "sinusoidal", "tie_embeddings": True,
                          "max_len": tokenizer.seq_len, **changes})


def pixel_train(**changes) -> TrainConfig:
    """nanoGPT's recipe (as aiayn.tasks.lm): AdamW (0.9, 0.99), weight decay 0.1, short warm-up,
    cosine decay to a tenth, gradients clipped at 1, no label smoothing (we want true bits/pixel)."""
    return TrainConfig(**{"lr": 2e-3, "min_lr": 2e-4, "warmup": 100, "schedule": "cosine",
                          "optimizer": "adamw", "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1,
                          "label_smoothing": 0.0, "clip_norm": 1.0, "precision": "auto", "batch_size": 8,
                          "eval_bleu": False, "eval_every": 500, "log_every": 25, **changes})


# ------------------------------------------------------------------------------------------ task
def pixel_nll(model, tokens: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy (nats) of the pixels of (B, L) sequences; the class token is given,
    never predicted. mean: per pixel."""
    logits = model(tokens[:, :-1])  # (B, P, V)
    return label_smoothed_cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def bits_per_pixel(model, tokenizer: PixelTokenizer, data: ImageSet, conditional: bool = True,
                   batch_size: int = EVAL_BATCH) -> float:
    """Test negative log-likelihood of the quantized images, in bits per pixel (given the class
    token when conditional, else the "any class" token)."""
    nll, n, device = 0.0, 0, next(model.parameters()).device
    with evaluating(model):
        for i in range(0, len(data), batch_size):
            labels = data.labels[i:i + batch_size] if conditional else None
            tokens = tokenizer.encode(data.images[i:i + batch_size], labels).to(device)
            nll += pixel_nll(model, tokens, reduction="sum").item()
            n += tokens[:, 1:].numel()
    return nll / n / math.log(2)


def shift_images(images: Tensor, max_shift: int) -> Tensor:
    """(N, H, W) images, each moved by its own whole number of pixels, up to `max_shift` in each
    direction (drawn from torch's global generator); what is uncovered is black. Whole pixels keep
    the palette exact, and MNIST's digits lie in a centred 20x20 box, so shifts of up to 4 never
    cut a stroke: the same digits in more places, for a model that has seen each image 9 times."""
    if max_shift <= 0:
        return images
    n, h, w = images.shape
    s = max_shift
    padded = torch.nn.functional.pad(images, (s, s, s, s))
    dy, dx = torch.randint(-s, s + 1, (2, n)).tolist()
    return torch.stack([padded[i, s - dy[i]:s - dy[i] + h, s - dx[i]:s - dx[i] + w] for i in range(n)])


class PixelLMTask:
    """Shuffled batches of whole images as token sequences. A batch is the (B,) tensor of image
    indices; epochs are a pure function of (seed, epoch) and the class-token dropout and the
    shifts (`shift` > 0) draw from torch's global generator (saved in checkpoints), so a resumed
    run is exact."""

    name = "image-gpt"
    best_metric = ("val_loss", "min")

    def __init__(self, train: ImageSet, val: ImageSet, tokenizer: PixelTokenizer, batch_size: int,
                 device: str = "cpu", shift: int = 0):
        for part, data in (("training", train), ("validation", val)):
            if tuple(data.images.shape[1:]) != (tokenizer.image_size,) * 2:
                from aiayn.data.corpus import DataError

                raise DataError(f"{part} images are {data.images.shape[2]}x{data.images.shape[1]}; "
                                f"the model takes {tokenizer.image_size}x{tokenizer.image_size}")
        self.train, self.val, self.tokenizer = train, val.subset(torch.arange(min(len(val), MAX_VAL_IMAGES))), tokenizer
        self.batch_size, self.device, self.shift = batch_size, device, shift

    def epoch_batches(self, epoch: int, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.train), generator=g)
        n = len(order) // self.batch_size * self.batch_size or len(order)
        return list(order[:n].split(self.batch_size))

    def loss(self, model, batch: Tensor, cfg: TrainConfig) -> tuple[Tensor, int]:
        labels = self.train.labels[batch].clone()
        labels[torch.rand(len(batch)) < ANY_CLASS_FRACTION] = -1  # a few images without their class
        images = shift_images(self.train.images[batch], self.shift)
        tokens = self.tokenizer.encode(images, labels).to(self.device)
        return pixel_nll(model, tokens), tokens.size(0) * (tokens.size(1) - 1)

    @torch.no_grad()
    def validate(self, model, cfg: TrainConfig) -> dict[str, float]:
        bpp = bits_per_pixel(model, self.tokenizer, self.val)
        return {"val_loss": bpp * math.log(2), "val_bpp": bpp}


# ------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_images(model, tokenizer: PixelTokenizer, labels: list[int | None], temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    prompt: Tensor | None = None, keep_rows: int = 0, guidance: float = 1.0) -> Tensor:
    """Draw one image per entry of `labels` (a class index, or None for any class) -> (N, H, W) uint8.

    With `prompt` (H, W) uint8 and keep_rows > 0, its first keep_rows rows are kept (quantized) and
    the model completes the rest. Only palette tokens are drawn. seed: a private generator, so the
    same call gives the same images.

    guidance: classifier-free guidance (Ho & Salimans 2022). The model also reads each image after
    the "any class" token (it was trained so for 10% of the images), and each pixel is drawn from
    log p(x | any) + guidance * (log p(x | label) - log p(x | any)): 1 is the model's own
    distribution, > 1 images more like the label and less varied (at twice the cost), 0 ignores it.
    """
    _check(temperature, top_k, top_p)
    if not guidance >= 0:
        raise InputError(f"guidance must be >= 0, got {guidance}")
    size = tokenizer.image_size
    if not 0 <= keep_rows <= size:
        raise InputError(f"keep_rows must be in 0..{size}, got {keep_rows}")
    if keep_rows and prompt is None:
        raise InputError("keep_rows needs a prompt image")
    n = len(labels)
    param = next(model.parameters())
    device = param.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    first = torch.tensor([tokenizer.class_id(label) for label in labels], device=device)[:, None]  # (N, 1)
    guided = guidance != 1.0
    if guided:  # rows n.. read the same pixels after the "any class" token
        first = torch.cat([first, torch.full_like(first, tokenizer.any_class_id)])
    rows = first.size(0)
    kept = tokenizer.quantize(prompt[:keep_rows]).reshape(1, -1).expand(rows, -1).to(device) if keep_rows \
        else torch.zeros(rows, 0, dtype=torch.long, device=device)
    context = torch.cat([first, kept], dim=1)  # (rows, 1 + keep_rows * W)
    n_new = size * size - kept.size(1)
    pixels = [kept[:n]]
    with evaluating(model):
        cache = model.init_cache(rows, tokenizer.seq_len, device, param.dtype)
        logits = model.decode_step(context, cache)[:, -1]  # (rows, V): prefill
        for i in range(n_new):
            logits = logits.float()[:, :tokenizer.levels].log_softmax(-1)  # pixels only, never a class token
            if guided:
                given, anyone = logits[:n], logits[n:]
                logits = anyone + guidance * (given - anyone)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (N,)
            pixels.append(nxt[:, None])
            if i < n_new - 1:
                step = torch.cat([nxt, nxt]) if guided else nxt
                logits = model.decode_step(step[:, None], cache)[:, -1]
    return tokenizer.decode(torch.cat(pixels, dim=1).cpu())


def image_grid(images: Tensor, columns: int | None = None, pad: int = 2, scale: int = 1) -> Tensor:
    """(N, H, W) uint8 -> one (rows * (H + pad) + pad, ...) uint8 image: the N images in a grid on a
    mid-gray background, each enlarged `scale` times."""
    n, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    if scale > 1:
        images = images.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        h, w = h * scale, w * scale
    grid = torch.full((rows * (h + pad) + pad, columns * (w + pad) + pad), 128, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return grid


def save_png(image: Tensor, path) -> None:
    from PIL import Image

    Image.fromarray(image.numpy(), mode="L").save(path)
