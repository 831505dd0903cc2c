"""The vision tasks: augmentation, exact epochs, a tiny ViT that learns, pixel-model loss in bits,
sampling that draws only palette tokens and keeps a prompt's rows, and attention rollout."""

import math

import pytest
import torch

from aiayn.config import ViTConfig
from aiayn.data.images import ImageSet
from aiayn.data.pixels import PixelTokenizer
from aiayn.model import build_model
from aiayn.model.vit import VisionTransformer
from aiayn.tasks.pixels import PixelLMTask, bits_per_pixel, shift_images, generate_images, image_grid, pixel_config, pixel_train
from aiayn.tasks.vision import ViTTask, accuracy, augment, split_train_val, vit_train
from aiayn.vision import attention_rollout, cls_maps, vit_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def bars(n: int, size: int = 8) -> ImageSet:
    """Class 0: a vertical bar, class 1: a horizontal bar, at random places."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, size, size, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    for i in range(n):
        j = int(torch.randint(1, size - 1, (1,), generator=g))
        if labels[i]:
            images[i, j, 1:-1] = 255
        else:
            images[i, 1:-1, j] = 255
    return ImageSet(images, labels, ["vertical", "horizontal"])


def test_augment_identity_and_range():
    x = torch.rand(3, 1, 8, 8)
    same = augment(x, max_shift=0, max_rotate=0, max_scale=0, max_shear=0)
    torch.testing.assert_close(same, x)
    y = augment(x, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1 and not torch.allclose(x, y)
    shifted = augment(torch.eye(8)[None, None].repeat(1, 1, 1, 1), max_shift=0, max_rotate=0, max_scale=0, max_shear=0)
    torch.testing.assert_close(shifted, torch.eye(8)[None, None])


def test_epochs_are_a_function_of_seed_and_epoch():
    data = bars(40)
    task = ViTTask(*split_train_val(data, 0.25), ViTConfig(image_size=8, n_classes=2), batch_size=8)
    a, b = task.epoch_batches(3, seed=1), task.epoch_batches(3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 30 // 8
    assert not torch.equal(torch.cat(a), torch.cat(task.epoch_batches(4, seed=1)))
    train, val = split_train_val(data, 0.25)
    assert len(train) == 30 and len(val) == 10


def test_tiny_vit_learns_bars():
    torch.manual_seed(0)
    data = bars(64)
    cfg = ViTConfig(image_size=8, patch_size=2, n_classes=2, d_model=16, n_heads=2, d_ff=32, n_layers=1)
    model = VisionTransformer(cfg)
    task = ViTTask(data, data, cfg, batch_size=16, augmentation=False)
    tcfg = vit_train(max_steps=60)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        loss, n = task.loss(model, task.epoch_batches(step // 4, 1)[step % 4], tcfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert accuracy(model, data) == 1.0 and task.validate(model, tcfg)["val_acc"] == 1.0


def test_rollout_and_class_token_maps():
    T = 5
    eye = [torch.eye(T)[None].repeat(2, 1, 1)] * 3  # every token attends to itself only
    torch.testing.assert_close(attention_rollout(eye), torch.eye(T))
    uniform = [torch.full((2, T, T), 1 / T)]
    torch.testing.assert_close(attention_rollout(uniform), 0.5 * torch.eye(T) + 0.5 / T)
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, d_model=16, n_heads=2, d_ff=32, n_layers=2))
    probs, weights = vit_attention(model, torch.randint(0, 256, (8, 8), dtype=torch.uint8))
    per_head, rollout = cls_maps(model, weights)
    assert per_head.shape == (2, 2, 2, 2) and rollout.shape == (2, 2)
    torch.testing.assert_close(per_head.sum((-1, -2)) + torch.stack([w[:, 0, 0] for w in weights]),
                               torch.ones(2, 2))
    assert abs(float(probs.sum()) - 1) < 1e-5


# ---------------------------------------------------------------------------------- pixel model
def tiny_pixel_model(levels=4, size=4):
    tok = PixelTokenizer(levels, ["a", "b"], size)
    torch.manual_seed(0)
    return build_model(pixel_config(tok, n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32)), tok


def test_bits_per_pixel_of_a_uniform_model_is_log2_vocab():
    model, tok = tiny_pixel_model()
    torch.nn.init.zeros_(model.tgt_embed.tokens.weight)  # tied with the output: every logit 0
    data = ImageSet(torch.randint(0, 256, (5, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 0, 1, 0]), ["a", "b"])
    assert math.isclose(bits_per_pixel(model, tok, data, batch_size=2), math.log2(tok.vocab_size), rel_tol=1e-5)


def black_and_white(steps: int):
    """A tiny pixel model trained `steps` batches on two classes: a all black, b all white ->
    (model, tokenizer, task, train config, pixels in the last batch)."""
    model, tok = tiny_pixel_model()
    images = torch.zeros(16, 4, 4, dtype=torch.uint8)
    images[8:] = 255
    data = ImageSet(images, (torch.arange(16) >= 8).long(), ["a", "b"])
    task = PixelLMTask(data, data, tok, batch_size=8)
    tcfg = pixel_train(max_steps=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss, n = task.loss(model, task.epoch_batches(step, 1)[step % 2], tcfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, tok, task, tcfg, n


def test_pixel_task_learns_and_counts_pixels():
    model, tok, task, tcfg, n = black_and_white(80)
    assert n == 8 * 16
    assert task.validate(model, tcfg)["val_bpp"] < 0.2
    drawn = generate_images(model, tok, [0, 1, 1], seed=3)
    assert drawn.shape == (3, 4, 4) and drawn[0].max() == 0 and drawn[1:].min() == 255


def test_shifts_move_whole_images_by_at_most_the_limit():
    images = torch.zeros(200, 9, 9, dtype=torch.uint8)
    images[:, 3:6, 3:6] = torch.arange(1, 10, dtype=torch.uint8).view(3, 3)  # a 3x3 stamp in the middle
    assert torch.equal(shift_images(images, 0), images)
    torch.manual_seed(0)
    moved = shift_images(images, 2)
    assert moved.shape == images.shape and moved.dtype == torch.uint8
    seen = set()
    for image in moved:  # the stamp, intact, somewhere within 2 pixels of where it was; the rest black
        ys, xs = torch.nonzero(image == 1, as_tuple=True)
        y, x = int(ys[0]), int(xs[0])
        assert abs(y - 3) <= 2 and abs(x - 3) <= 2
        assert torch.equal(image[y:y + 3, x:x + 3], images[0, 3:6, 3:6]) and int(image.sum()) == 45
        seen.add((y, x))
    assert len(seen) == 25  # every shift drawn
    torch.manual_seed(0)
    assert torch.equal(shift_images(images, 2), moved)  # torch's generator: a resumed run is exact


def test_sampling_draws_palette_tokens_is_seeded_and_keeps_prompt_rows():
    model, tok = tiny_pixel_model(levels=4, size=4)
    torch.nn.init.normal_(model.generator.weight, std=3.0)  # tied: class tokens get large logits too
    a = generate_images(model, tok, [0, 1, None], temperature=1.0, seed=7)
    b = generate_images(model, tok, [0, 1, None], temperature=1.0, seed=7)
    assert torch.equal(a, b) and set(a.unique().tolist()) <= set(tok.palette().tolist())
    prompt = torch.tensor([[255, 0, 85, 170]] * 4, dtype=torch.uint8)
    done = generate_images(model, tok, [1, 1], top_k=2, top_p=0.9, seed=1, prompt=prompt, keep_rows=2)
    assert torch.equal(done[:, :2], prompt[:2].expand(2, -1, -1))
    with pytest.raises(ValueError, match="keep_rows"):
        generate_images(model, tok, [0], prompt=prompt, keep_rows=5)


def test_guidance_mixes_the_labelled_and_the_any_class_distributions():
    """0: the "any class" model's samples, 1: the labelled model's, both exactly (same seed); 3 and the
    guidance of a class-blind prompt (None) change nothing that 1 does not."""
    model, tok = tiny_pixel_model(levels=4, size=4)
    torch.nn.init.normal_(model.generator.weight, std=3.0)
    plain = generate_images(model, tok, [0, 1], seed=5)
    assert torch.equal(generate_images(model, tok, [0, 1], seed=5, guidance=1.0), plain)
    anyone = generate_images(model, tok, [None, None], seed=5)
    assert torch.equal(generate_images(model, tok, [0, 1], seed=5, guidance=0.0), anyone)
    strong = generate_images(model, tok, [0, 1] * 8, seed=5, guidance=3.0)
    assert set(strong.unique().tolist()) <= set(tok.palette().tolist())
    assert not torch.equal(strong, generate_images(model, tok, [0, 1] * 8, seed=5))
    assert torch.equal(generate_images(model, tok, [None], seed=2, guidance=3.0), generate_images(model, tok, [None], seed=2))
    with pytest.raises(ValueError, match="guidance"):
        generate_images(model, tok, [0], guidance=-1.0)


def test_guidance_pulls_samples_towards_their_label():
    """Two classes that the model tells apart only a little: guidance 4 draws the labelled class's
    image far more often than the model's own samples do."""
    model, tok, _, _, _ = black_and_white(6)  # a few steps only: the label barely matters yet
    labels = [0, 1] * 64

    def as_asked(guidance):  # the fraction of images mostly black for class a, mostly white for b
        white = generate_images(model, tok, labels, seed=1, guidance=guidance).float().mean((1, 2)) > 127
        return (white == torch.tensor(labels).bool()).float().mean().item()

    plain, guided = as_asked(1.0), as_asked(4.0)  # ~0.8 and ~0.95 here
    assert guided > 0.9 and guided > plain + 0.08


def test_image_grid():
    imgs = torch.full((5, 2, 2), 255, dtype=torch.uint8)
    grid = image_grid(imgs, columns=3, pad=1, scale=2)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert int((grid == 255).sum()) == 5 * 16 and grid[0, 0] == 128
