"""Image models against peers, in one run, on one CPU thread, trained for the same CPU minutes.

Budgets and speeds are measured in CPU time of this process (time.process_time), not wall time:
the machines of this workplace share their cores between several jobs, and a wall-clock budget
would give each model whatever share of the core it happened to get.

    python benchmarks/vision.py vit --minutes 5         # aiayn ViT vs HF ViTForImageClassification, + SVC(C=5)
    python benchmarks/vision.py pixels --minutes 5      # aiayn pixel model vs HF ImageGPTForCausalImageModeling
    python benchmarks/vision.py shipped                 # the shipped models: t10k accuracy, bits/pixel, samples
    python benchmarks/vision.py shipped --pixels RUN    # the same for a trained run (its best checkpoint)
    python benchmarks/vision.py shipped --guidance 2    # samples drawn with classifier-free guidance
    python benchmarks/vision.py vit --quick             # a few seconds: checks that it runs

Data: the shipped mnist10k (train 8,006 images, t10k 997); scores on t10k.

vit: both transformers have the shape of the shipped model (patch 4, d_model 128, 4 layers, 4 heads,
d_ff 256, GELU, pre-norm, class token, no dropout; HF's positions are learned, ours 2-D sinusoidal),
and are trained by the same loop here: the same batches of 128 (the shuffled training images, 1/16
held out as `aiayn train vit` does), the same augmentation (aiayn.tasks.vision.augment, drawn from
the same seed), AdamW lr 2e-3 (0.9, 0.999), weight decay 0.05 on matrices, label smoothing 0.1,
gradients clipped at 1, 200 warm-up steps then a cosine over the wall-clock budget, fp32. aiayn's
linears take oneDNN as in `aiayn train` (aiayn.fast.onednn). Reported: t10k accuracy, training
images/s, inference images/s (t10k in batches of 256). The SVM is scikit-learn's SVC(C=5,
gamma="scale") on pixels / 255, fitted on all 8,006 training images.

pixels: both decoder-only models have the same shape (default d_model 64, 4 layers, 2 heads,
d_ff 256: --d-model, --n-layers, --n-heads, --d-ff; the shipped mnist-pixels is 128, 4, 4, 512; no
dropout; 8 gray levels, class token first, the same 19-token vocabulary; ImageGPT's positions are
learned, ours sinusoidal) and the same recipe (AdamW lr 2e-3 (0.9, 0.99), weight decay 0.1, clip 1,
100 warm-up steps then a cosine over the wall-clock budget, batches of 8 images, 10% of them with the "any
class" token, fp32). Reported: t10k bits per pixel given the label, training images/s.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from aiayn.config import ViTConfig
from aiayn.data.images import load_images
from aiayn.data.pixels import PixelTokenizer
from aiayn.model import build_model
from aiayn.model.vit import VisionTransformer, images_to_input
from aiayn.tasks.pixels import ANY_CLASS_FRACTION, bits_per_pixel, pixel_config
from aiayn.tasks.vision import augment, split_train_val
from aiayn.fast import for_training
from aiayn.train.schedule import cosine


def adamw(model, lr, betas, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=1e-8)


def train_for(model, loss_fn, batches, seconds: float, lr: float, betas, weight_decay: float, warmup: int,
              seed: int, max_steps: int | None = None) -> tuple[int, int, float]:
    """Train until `seconds` of CPU time: -> (steps, images, CPU seconds). The learning rate follows a
    linear warm-up, then a cosine over the budget's elapsed fraction."""
    torch.manual_seed(seed)
    opt = adamw(model, lr, betas, weight_decay)
    model.train()
    steps = images = 0
    start = time.process_time()
    while (elapsed := time.process_time() - start) < seconds and (max_steps is None or steps < max_steps):
        batch = batches(steps)
        progress = elapsed / seconds
        rate = lr * (steps + 1) / (warmup + 1) if steps < warmup else cosine(1 + round(progress * 10_000), lr, 1, 10_000)
        for g in opt.param_groups:
            g["lr"] = rate
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        images += len(batch)
    return steps, images, time.process_time() - start


def epoch_batches(n: int, batch_size: int, seed: int):
    """Step -> a batch of indices: shuffled epochs, a pure function of the seed (same for both models)."""
    per_epoch = n // batch_size
    cache = {}

    def get(step):
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return cache[epoch][i * batch_size:(i + 1) * batch_size]
    return get


# ------------------------------------------------------------------------------------------ ViT
class HFViT(torch.nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        from transformers import ViTConfig as HFConfig, ViTForImageClassification

        self.model = ViTForImageClassification(HFConfig(
            image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.channels, hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=cfg.n_classes,
            attn_implementation="sdpa"))

    def forward(self, x):
        return self.model(pixel_values=x * 2 - 1).logits  # the same centring as aiayn's ViT


@torch.no_grad()
def evaluate_classifier(model, images, labels, batch_size=256) -> tuple[float, float]:
    model.eval()
    start = time.process_time()
    pred = torch.cat([model(images_to_input(c)).argmax(-1) for c in images.split(batch_size)])
    seconds = time.process_time() - start
    return (pred == labels).float().mean().item(), len(images) / seconds


def run_vit(args) -> None:
    train_all, test = load_images(), load_images(split="t10k")
    train, _ = split_train_val(train_all)
    cfg = ViTConfig()
    rows = []
    for name, make in (("aiayn ViT", lambda: for_training(VisionTransformer(cfg), "fp32", "cpu")),
                       ("HF ViTForImageClassification", lambda: HFViT(cfg))):
        torch.manual_seed(args.seed)
        model = make()
        batches = epoch_batches(len(train), 128, args.seed)
        aug = torch.Generator().manual_seed(args.seed)

        def loss_fn(m, idx):
            x = augment(images_to_input(train.images[idx]), generator=aug)
            return F.cross_entropy(m(x), train.labels[idx], label_smoothing=0.1)

        steps, n, secs = train_for(model, loss_fn, batches, args.minutes * 60, 2e-3, (0.9, 0.999), 0.05, 200,
                                   args.seed, 5 if args.quick else None)
        acc, infer = evaluate_classifier(model, test.images, test.labels)
        rows.append((name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", steps, f"{secs / 60:.1f}",
                     f"{100 * acc:.2f}", f"{n / secs:.0f}", f"{infer:.0f}"))
        print(rows[-1], flush=True)
    rows.append(svm_row(train_all, test, 500 if args.quick else len(train_all)))
    table(["model", "params", "steps", "train CPU min", "t10k acc %", "train img/s", "infer img/s"], rows)


def svm_row(train_all, test, n_svm: int) -> tuple:
    """The classical peer: an RBF SVM on the raw pixels of the first n_svm training images."""
    try:
        from sklearn.svm import SVC
    except ImportError:
        return ("sklearn SVC(C=5)", "not run: scikit-learn is missing (pip install -e '.[bench]')", "", "", "", "", "")
    x = train_all.images[:n_svm].reshape(n_svm, -1).numpy() / 255.0
    start = time.process_time()
    svm = SVC(C=5, gamma="scale").fit(x, train_all.labels[:n_svm].numpy())
    fit = time.process_time() - start
    start = time.process_time()
    pred = svm.predict(test.images.reshape(len(test), -1).numpy() / 255.0)
    infer = len(test) / (time.process_time() - start)
    acc = (torch.from_numpy(pred) == test.labels).float().mean().item()
    return ("sklearn SVC(C=5)", "-", "-", f"{fit / 60:.1f}", f"{100 * acc:.2f}", f"{n_svm / fit:.0f}", f"{infer:.0f}")


# --------------------------------------------------------------------------------------- pixels
class HFImageGPT(torch.nn.Module):
    def __init__(self, mcfg):
        super().__init__()
        from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

        # ImageGPT's head predicts vocab_size - 1 tokens (all but its start token): one more in, the
        # same vocabulary out
        self.model = ImageGPTForCausalImageModeling(ImageGPTConfig(
            vocab_size=mcfg.vocab_size + 1, n_positions=mcfg.max_len, n_embd=mcfg.d_model, n_layer=mcfg.n_decoder_layers,
            n_head=mcfg.n_heads, n_inner=mcfg.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits


def run_pixels(args) -> None:
    from aiayn.tasks.pixels import pixel_nll

    train_all, test = load_images(), load_images(split="t10k")
    train, _ = split_train_val(train_all)
    tok = PixelTokenizer(8, train_all.classes, 28)
    mcfg = pixel_config(tok, d_model=args.d_model, n_decoder_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff)
    if args.quick or args.test_images:
        test = test.subset(torch.arange(16 if args.quick else args.test_images))
    rows = []
    for name, make in (("aiayn LanguageModel", lambda: for_training(build_model(mcfg), "fp32", "cpu")),
                       ("HF ImageGPTForCausalImageModeling", lambda: HFImageGPT(mcfg))):
        torch.manual_seed(args.seed)
        model = make()
        model.cfg = mcfg  # bits_per_pixel and pixel_nll only call the model
        batches = epoch_batches(len(train), 8, args.seed)
        drop = torch.Generator().manual_seed(args.seed)

        def loss_fn(m, idx):
            labels = train.labels[idx].clone()
            labels[torch.rand(len(idx), generator=drop) < ANY_CLASS_FRACTION] = -1
            return pixel_nll(m, tok.encode(train.images[idx], labels))

        steps, n, secs = train_for(model, loss_fn, batches, args.minutes * 60, 2e-3, (0.9, 0.99), 0.1, 100,
                                   args.seed, 3 if args.quick else None)
        start = time.process_time()
        bpp = bits_per_pixel(model, tok, test)
        eval_s = time.process_time() - start
        rows.append((name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", steps, f"{secs / 60:.1f}",
                     f"{bpp:.4f}", f"{n / secs:.2f}", f"{len(test) / eval_s:.0f}"))
        print(rows[-1], flush=True)
    table(["model", "params", "steps", "train CPU min", "t10k bits/pixel", "train img/s", "score img/s"], rows)


# -------------------------------------------------------------------------------------- shipped
def run_shipped(args) -> None:
    """The shipped models as `aiayn classify` / `generate-image` use them: the ViT's t10k accuracy,
    the pixel model's t10k bits/pixel, and the fraction of its samples (temperature 1, --per-class
    per class, seeds 0-9) that the ViT classifies as the label asked for."""
    from aiayn.checkpoint import load_model_dir, model_dir
    from aiayn.tasks.pixels import generate_images, image_grid, save_png
    from aiayn.tasks.vision import accuracy, predict

    test = load_images(split="t10k")
    vit, labels, _, _ = load_model_dir(model_dir(args.vit, "vit"))
    pix, tok, _, _ = load_model_dir(model_dir(args.pixels, "image-gpt"))
    per_class = 2 if args.quick else args.per_class
    rows = [("mnist-vit t10k accuracy %", f"{100 * accuracy(vit, test):.2f}")]
    start = time.process_time()
    bpp = bits_per_pixel(pix, tok, test.subset(torch.arange(16)) if args.quick else test)
    rows.append(("mnist-pixels t10k bits/pixel (given the label)", f"{bpp:.4f}"))
    rows.append(("  (scoring CPU s)", f"{time.process_time() - start:.0f}"))
    hits, samples = [], []
    start = time.process_time()
    for label in range(10):
        drawn = generate_images(pix, tok, [label] * per_class, temperature=1.0,
                                seed=10 * args.sample_seeds + label, guidance=args.guidance)
        samples.append(drawn[:10])
        hits.append((predict(vit, drawn).argmax(-1) == label).float().mean().item())
        print(f"label {label}: {100 * hits[-1]:.0f}% of {per_class} samples classified as {label}", flush=True)
    rows.append((f"samples classified as their label % ({per_class}/class, T=1.0, guidance {args.guidance:g})",
                 f"{100 * sum(hits) / 10:.1f}"))
    rows.append(("  worst class", f"{min(range(10), key=hits.__getitem__)} ({100 * min(hits):.0f}%)"))
    rows.append(("  (sampling CPU s)", f"{time.process_time() - start:.0f}"))
    if args.grid:
        save_png(image_grid(torch.cat(samples), columns=10, scale=3), args.grid)
    table(["measure", "value"], rows)


def table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["vit", "pixels", "shipped"])
    p.add_argument("--per-class", type=int, default=100, help="shipped: samples drawn per class (default 100)")
    p.add_argument("--test-images", type=int, help="pixels: score the first N t10k images only (default all 997)")
    p.add_argument("--vit", help="shipped: score this ViT (a model or run directory) instead of mnist-vit")
    p.add_argument("--pixels", help="shipped: score this pixel model (a model or run directory) instead of "
                   "mnist-pixels")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="shipped: classifier-free guidance of the samples (default 1: the model's own)")
    p.add_argument("--grid", help="shipped: write the first 10 samples of each class as a PNG grid here")
    p.add_argument("--sample-seeds", type=int, default=0,
                   help="shipped: sampling seeds 10*S..10*S+9, one a class (default 0: seeds 0-9)")
    p.add_argument("--d-model", type=int, default=64, help="pixels: width of both models (default 64)")
    p.add_argument("--n-layers", type=int, default=4, help="pixels: layers (default 4)")
    p.add_argument("--n-heads", type=int, default=2, help="pixels: heads (default 2)")
    p.add_argument("--d-ff", type=int, default=256, help="pixels: feed-forward width (default 256)")
    p.add_argument("--minutes", type=float, default=5.0, help="training CPU minutes per model (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few steps, a small SVM: checks that it runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.minutes = min(args.minutes, 0.2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; {args.part}, {args.minutes} min per model, "
          f"seed {args.seed}", flush=True)
    {"vit": run_vit, "pixels": run_pixels, "shipped": run_shipped}[args.part](args)


if __name__ == "__main__":
    main()
