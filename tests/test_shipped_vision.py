"""The shipped image models load and do their job: the ViT classifies t10k digits, `classify` works
on PNG files by default, and the pixel model draws digits that the ViT recognizes."""

import numpy as np
import pytest
import torch
from PIL import Image

from aiayn.checkpoint import load_model_dir
from aiayn.cli import DEFAULT_PIXEL_MODEL, DEFAULT_VIT_MODEL, _default_model_dir, main
from aiayn.data.images import load_images
from aiayn.tasks.pixels import generate_images
from aiayn.tasks.vision import accuracy, predict

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_vit_classifies_t10k():
    model, labels, task, _ = load_model_dir(_default_model_dir(DEFAULT_VIT_MODEL))
    assert task == "vit" and labels.classes == [str(d) for d in range(10)]
    test = load_images(split="t10k")
    assert accuracy(model, test.subset(torch.arange(300))) >= 0.97


def test_classify_uses_the_shipped_model(tmp_path, capsys):
    test = load_images(split="t10k")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i].numpy(), mode="L").save(paths[-1])
    capsys.readouterr()
    assert main(["classify", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[1] for line in lines] == [str(int(y)) for y in test.labels[:3]]


def test_shipped_pixel_model_draws_digits_the_vit_recognizes():
    pix, tok, task, _ = load_model_dir(_default_model_dir(DEFAULT_PIXEL_MODEL))
    vit, _, _, _ = load_model_dir(_default_model_dir(DEFAULT_VIT_MODEL))
    assert task == "image-gpt" and tok.image_size == 28
    labels = [0, 1, 7]
    drawn = generate_images(pix, tok, labels, seed=1)
    assert drawn.shape == (3, 28, 28) and set(np.unique(drawn.numpy())) <= set(tok.palette().tolist())
    assert (predict(vit, drawn).argmax(-1) == torch.tensor(labels)).sum() >= 2
