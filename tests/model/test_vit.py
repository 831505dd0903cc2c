"""The Vision Transformer: patch embedding as a linear map of flattened patches, 2-D positions, the
shared encoder stack, pooling, and the attention weights that `explain` reads."""

import pytest
import torch

from aiayn.config import ViTConfig
from aiayn.model.layers import Stack, sinusoidal_encoding
from aiayn.model.vit import PatchEmbedding, VisionTransformer, images_to_input, sincos_2d

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ViTConfig(image_size=8, patch_size=4, d_model=16, n_heads=2, d_ff=32, n_layers=2)


def test_patch_embedding_is_a_linear_map_of_each_flattened_patch():
    torch.manual_seed(0)
    cfg = TINY.replace(channels=3)
    emb = PatchEmbedding(cfg).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # reference: cut into 4x4 patches, row-major, flatten (C, P, P), multiply by W (D, C*P*P)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 2, 4, 4)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 4, 3 * 16)  # (B, N, C*P*P)
    w = emb.proj.weight.reshape(16, -1)
    torch.testing.assert_close(emb(x), patches @ w.T + emb.proj.bias)


def test_sincos_2d_encodes_row_and_column():
    pe = sincos_2d(3, 8).reshape(3, 3, 8)
    half = sinusoidal_encoding(3, 4)
    for r in range(3):
        for c in range(3):
            assert torch.equal(pe[r, c, :4], half[r]) and torch.equal(pe[r, c, 4:], half[c])
    assert len({tuple(v.tolist()) for v in sincos_2d(3, 8)}) == 9  # every patch its own position


def test_shapes_pooling_and_the_shared_stack():
    torch.manual_seed(0)
    for pool in ("cls", "mean"):
        for positional in ("sincos2d", "learned"):
            model = VisionTransformer(TINY.replace(pool=pool, positional=positional))
            assert isinstance(model.encoder, Stack) and model.encoder.layers[0].norm_first
            x = torch.rand(3, 1, 8, 8)
            assert model(x).shape == (3, 10)
            pooled, weights = model.features(x, need_weights=True)
            T = 4 + (pool == "cls")
            assert pooled.shape == (3, 16) and len(weights) == 2 and weights[0].shape == (3, 2, T, T)
            torch.testing.assert_close(weights[0].sum(-1), torch.ones(3, 2, T))


@pytest.mark.bf16
@pytest.mark.parametrize("positional", ["sincos2d", "learned"])
def test_the_residual_stream_keeps_the_weights_type(positional):
    """Under bf16 autocast an fp32 ViT's tokens stay fp32 (its patches come out bf16); in a bf16 copy
    of it (precision bf16-model) they are bf16, the fp32 images and sinusoidal buffer cast to it."""
    torch.manual_seed(0)
    model = VisionTransformer(TINY.replace(positional=positional, pool="mean"))  # (no class token to cat)
    x = torch.rand(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.tokens(x).dtype == torch.float32
    for p in model.parameters():  # as aiayn.train.loop.Bf16Twin makes its copy
        p.data = p.data.to(torch.bfloat16)
    assert model.tokens(x).dtype == torch.bfloat16 and model(x).dtype == torch.bfloat16


def test_zero_head_starts_uniform_and_images_are_independent():
    torch.manual_seed(0)
    model = VisionTransformer(TINY).eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(x).softmax(-1), torch.full((4, 10), 0.1))
    torch.nn.init.normal_(model.head.weight)
    a = model(x)
    x2 = x.clone()
    x2[1:] = torch.rand(3, 1, 8, 8)  # other images in the batch never change image 0's logits
    torch.testing.assert_close(model(x2)[0], a[0])


def test_positions_matter_and_inputs_are_scaled():
    torch.manual_seed(0)
    model = VisionTransformer(TINY).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.rand(1, 1, 8, 8)
    swapped = torch.cat([x[..., 4:, :], x[..., :4, :]], dim=2)  # top and bottom patch rows swapped
    assert not torch.allclose(model(x), model(swapped))
    u8 = torch.tensor([[[0, 255], [128, 51]]], dtype=torch.uint8)
    torch.testing.assert_close(images_to_input(u8), u8[:, None].float() / 255)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(d_model=18, n_heads=2)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ViTConfig(d_model=16, n_heads=3)
    cfg = ViTConfig()
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["kind"] == "vit"
    assert cfg.encoder().norm_first and cfg.encoder().max_len == cfg.n_patches + 1
