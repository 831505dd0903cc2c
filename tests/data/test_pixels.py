"""Pixel tokens: the palette round trip and the sequence layout (class token first, raster order)."""

import torch

from aiayn.data.pixels import PixelTokenizer


def test_palette_round_trip():
    for levels in (2, 8, 16, 256):
        tok = PixelTokenizer(levels, ["a", "b"], 4)
        palette = tok.palette()
        assert palette[0] == 0 and palette[-1] == 255 and len(palette) == levels
        ids = torch.arange(levels)
        assert torch.equal(tok.quantize(tok.dequantize(ids)), ids)  # levels survive exactly
        x = torch.arange(256, dtype=torch.uint8)
        err = (tok.dequantize(tok.quantize(x)).int() - x.int()).abs()
        assert int(err.max()) <= 255 / (levels - 1) / 2 + 0.5  # the nearest level
    assert torch.equal(PixelTokenizer(256, ["a"], 1).dequantize(torch.arange(256)), torch.arange(256).to(torch.uint8))


def test_sequence_layout():
    tok = PixelTokenizer(8, [str(i) for i in range(10)], 3)
    assert tok.vocab_size == 8 + 10 + 1 and tok.seq_len == 10 and tok.any_class_id == 18
    images = torch.tensor([[[0, 255, 0], [0, 0, 0], [0, 0, 128]]] * 2, dtype=torch.uint8)
    seq = tok.encode(images, torch.tensor([7, -1]))
    assert seq.shape == (2, 10)
    assert seq[0, 0] == 8 + 7 and seq[1, 0] == tok.any_class_id
    assert seq[0, 1:].tolist() == [0, 7, 0, 0, 0, 0, 0, 0, 4]  # raster order: row by row
    assert torch.equal(tok.decode(seq[:, 1:])[0, 0], torch.tensor([0, 255, 0], dtype=torch.uint8))
    assert tok.encode(images, None)[:, 0].tolist() == [18, 18]


def test_save_load(tmp_path):
    tok = PixelTokenizer(16, ["x", "y"], 28)
    tok.save(tmp_path)
    back = PixelTokenizer.load(tmp_path)
    assert (back.levels, back.classes, back.image_size) == (16, ["x", "y"], 28)
