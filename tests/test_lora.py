"""aiayn.lora: a fresh adapter changes nothing, merging changes nothing more than rounding, only the
adapters get gradients, every path of the model (teacher forcing, cross-attention's row slices,
cached decoding, inference copies) sees the adapter, and an adapter refuses a base it was not
trained on."""

import copy

import pytest
import torch

from aiayn import lora
from aiayn.config import preset
from aiayn.fast.inference import inference_model
from aiayn.lora import AdapterError, LoRAConfig, LoRALinear
from aiayn.model import build_model
from aiayn.tasks.lm import lm_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ALL = ("q", "k", "v", "o", "ff")


def translation_model(seed=0):
    torch.manual_seed(seed)
    return build_model(preset("tiny", vocab_size=50, dropout=0.0, attn_dropout=0.0)).eval()


def lm_model(seed=0):
    torch.manual_seed(seed)
    return build_model(lm_config(vocab_size=40, n_decoder_layers=2, n_heads=2, d_model=32, d_ff=64,
                                 max_len=32, dropout=0.0)).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 50, (3, 9), generator=g)
    src[1, 6:] = 0  # padding
    return src, torch.randint(4, 50, (3, 7), generator=g)


def outputs(model):
    with torch.no_grad():
        if model.cfg.n_encoder_layers:
            return model(*batch())
        return model(batch()[1].clamp(max=39))


def randomize(model, seed=2):
    """Non-zero B (a trained adapter) so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("make", [translation_model, lm_model])
@pytest.mark.parametrize("targets", [ALL, ("q", "v"), ("k",)])
def test_a_fresh_adapter_leaves_the_outputs_exactly_as_they_were(make, targets):
    model = make()
    before = outputs(model)
    lora.add_lora(model, LoRAConfig(rank=4, targets=targets), seed=0)
    assert torch.equal(outputs(model), before)


@pytest.mark.parametrize("make", [translation_model, lm_model])
@pytest.mark.parametrize("targets", [ALL, ("q", "v"), ("k", "o")])
def test_merged_equals_unmerged_within_1e_5(make, targets):
    model = make()
    base = outputs(model)
    lora.add_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets), seed=0)
    randomize(model)
    unmerged = outputs(model)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter does something
    merged = lora.merge(copy.deepcopy(model))
    assert not lora.lora_layers(merged) and all(type(m) is torch.nn.Linear for m in merged.modules()
                                                if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(outputs(merged), unmerged, rtol=0, atol=1e-5)


def test_the_layer_is_the_papers_formula_in_float64():
    """h = W x + b + (alpha / r) B A x on each targeted block of rows, zero elsewhere."""
    model = translation_model().double()
    lora.add_lora(model, LoRAConfig(rank=3, alpha=6, targets=("q", "v")), seed=0)
    randomize(model)
    layer = model.encoder.layers[0].self_attn.in_proj
    assert isinstance(layer, LoRALinear)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    D = layer.in_features
    expected = x @ layer.weight.T + layer.bias
    for i, start in enumerate((0, 2 * D)):  # q rows, v rows
        expected[:, start:start + D] += 2.0 * x @ layer.lora_A[i].T @ layer.lora_B[i].T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.forward_rows(x, slice(D, None)), expected[:, D:], rtol=1e-12, atol=1e-12)


def test_cached_decoding_and_inference_copies_see_the_adapter():
    """decode_step (C kernels, cross-attention's keys from linear_rows) and every inference copy
    (which merges) give what the unmerged model's full forward pass gives."""
    model = translation_model()
    lora.add_lora(model, LoRAConfig(rank=4, targets=ALL), seed=0)
    randomize(model)
    src, tgt = batch()
    full = outputs(model)
    base = outputs(lora.remove_lora(copy.deepcopy(model)))
    for form in (model, inference_model(model, "fp32"), inference_model(model, "int8")):
        with torch.no_grad():
            memory, mask = form.encode(src)
            cache = form.init_cache(memory, mask, tgt.size(1))
            steps = torch.cat([form.decode_step(tgt[:, t:t + 1], cache) for t in range(tgt.size(1))], dim=1)
        if any("Int8" in type(m).__name__ for m in form.modules()):  # int8 rounding: nearer the adapted model
            assert (steps - full).abs().mean() < 0.2 * (steps - base).abs().mean()
        else:
            torch.testing.assert_close(steps, full, rtol=0, atol=1e-4)
    assert lora.lora_layers(model)  # the model itself keeps its adapter


def test_only_the_adapters_get_gradients():
    model = translation_model().train()
    names = lora.add_lora(model, LoRAConfig(rank=4, targets=ALL), seed=0)
    assert len(names) == 2 * 3 * 2 + 2 * 2 + 2 * 1 * 2  # tiny: 2+2 layers; in_proj+out_proj per attention, 2 ff
    src, tgt = batch()
    model(src, tgt).square().mean().backward()
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".lora_B"))


def test_adapter_file_round_trip_and_wrong_base_refusal(tmp_path):
    model = translation_model()
    digest = lora.weights_digest(model)
    cfg = LoRAConfig(rank=2, targets=("q", "v", "ff"), base_sha256=digest, task="translation", extra={"tgt": "fr"})
    lora.add_lora(model, cfg, seed=0)
    randomize(model)
    expected = outputs(model)
    path = lora.save_adapter(tmp_path / "a", model, cfg)
    assert path.name == lora.ADAPTER_FILE and path.stat().st_size < 40_000
    fresh = translation_model()
    assert lora.load_adapter(fresh, tmp_path / "a", task="translation", merged=False).extra == {"tgt": "fr"}
    assert torch.equal(outputs(fresh), expected)  # unmerged: the same layers, the same numbers
    merged = translation_model()
    lora.load_adapter(merged, path)
    torch.testing.assert_close(outputs(merged), expected, rtol=0, atol=1e-5)
    other = translation_model(seed=1)  # same shape, other weights
    with pytest.raises(AdapterError, match="another base model") as e:
        lora.load_adapter(other, path)
    assert "\n" not in str(e.value) and not lora.lora_layers(other)
    with pytest.raises(AdapterError, match="not a lm model"):
        lora.load_adapter(translation_model(), path, task="lm")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="corrupt or not an aiayn LoRA adapter"):
        lora.read_adapter(tmp_path / "junk.safetensors")


def test_weights_digest_sees_weights_not_adapters():
    a, b = translation_model(), translation_model()
    assert lora.weights_digest(a) == lora.weights_digest(b)
    lora.add_lora(b, LoRAConfig(rank=2))
    assert lora.weights_digest(a) == lora.weights_digest(b)
    with torch.no_grad():
        a.encoder.layers[0].ff.w1.weight[0, 0] += 1e-6
    assert lora.weights_digest(a) != lora.weights_digest(b)


@pytest.mark.parametrize("kwargs, message", [({"rank": 0}, "rank"), ({"alpha": -1.0}, "alpha"),
                                             ({"targets": ("q", "x")}, "unknown LoRA target")])
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        LoRAConfig(**kwargs)


def test_an_adapter_on_an_adapted_layer_is_refused():
    model = translation_model()
    lora.add_lora(model, LoRAConfig(rank=2))
    with pytest.raises(AdapterError, match="already has a LoRA adapter"):
        lora.add_lora(model, LoRAConfig(rank=2))
