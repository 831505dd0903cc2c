"""Inference copies (aiayn.fast.inference) decode like the model and leave it alone; translate() uses them."""

import platform

import pytest
import torch
import torch.nn.functional as F

from aiayn.config import preset
from aiayn.decode import beam_search, greedy
from aiayn.fast.inference import inference_model, onednn_available, quantize_int8
from aiayn.model import Transformer
from aiayn.translate import translate

from train import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    # untied: a random tied model mostly copies its input token, which would test little
    return Transformer(preset("tiny", vocab_size=32, tie_embeddings=False)).eval()


def sources() -> torch.Tensor:
    src = random_sources(6, 7, 32, seed=3)
    src[1, 4:] = 0  # some padding
    return src


def test_fp32_inference_model_decodes_like_the_model():
    model = tiny_model()
    fast = inference_model(model, "fp32")
    src = sources()
    assert greedy(fast, src, 2, 3, max_extra=5) == greedy(model, src, 2, 3, max_extra=5)
    ours, theirs = (beam_search(m, src, 2, 3, beam_size=3, max_extra=5) for m in (fast, model))
    assert [h[0][0] for h in ours] == [h[0][0] for h in theirs]
    assert [h[0][1] for h in ours] == pytest.approx([h[0][1] for h in theirs], abs=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_decoding_reads_no_cache_position_before_writing_it(precision, monkeypatch):
    """A new KV cache is not zeroed: an inference copy's decoding (its kernels: the whole step, beam
    search's in-place reorder) gives the same outputs with NaN in every position of a new cache."""
    fast, src = inference_model(tiny_model(), precision), sources()

    def decode():
        with torch.inference_mode():
            return greedy(fast, src, 2, 3, max_extra=5), beam_search(fast, src, 2, 3, beam_size=3, max_extra=5)

    expected = decode()
    new_cache = type(fast)._new_cache

    def poisoned(self, *args, **kwargs):
        cache = new_cache(self, *args, **kwargs)
        for buf in (*cache.self_k, *cache.self_v):
            buf.fill_(float("nan"))
        return cache

    monkeypatch.setattr(type(fast), "_new_cache", poisoned)
    assert decode() == expected


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=pytest.mark.bf16), "int8"])
def test_low_precision_models_decode_forced_lengths_and_leave_the_model_alone(precision):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_model(model, precision)
    src = sources()
    with torch.inference_mode():
        out = greedy(fast, src, 2, 3, max_extra=0, min_len=7)
        hyps = beam_search(fast, src, 2, 3, beam_size=2, max_extra=0, min_len=7)
    lengths = (src != 0).sum(1).tolist()
    assert [len(o) for o in out] == lengths  # EOS banned until the (source-length) limit
    assert [len(h[0][0]) for h in hyps] == lengths
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_int8_keeps_a_tied_generator_working():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=32)).eval()  # tied embeddings
    q = quantize_int8(model)
    assert model.generator.weight is model.src_embed.tokens.weight  # the original keeps its tie
    logits = q(sources(), torch.full((6, 1), 2))
    assert logits.shape == (6, 1, 32) and torch.isfinite(logits).all()


def test_int8_generator_has_a_scale_per_output_row():
    # rows of the shared embedding matrix differ in norm: one scale each (the others: one per matrix)
    model = Transformer(preset("tiny", vocab_size=32)).eval()
    with torch.no_grad():
        model.generator.weight[:16] *= 20  # half the rows 20x larger: one scale would flatten the rest
    q = quantize_int8(model)
    assert q.generator.weight().qscheme() == torch.per_channel_affine
    assert q.decoder.layers[0].self_attn.in_proj.weight().qscheme() == torch.per_tensor_affine
    h = torch.randn(4, 1, model.cfg.d_model)
    ref = model.generator(h)
    err = (q.generator(h) - ref).abs()[..., 16:].max() / ref[..., 16:].abs().max()
    assert err < 0.05


def test_int8_feed_forward_relu_is_fused_with_the_same_results():
    import torch.ao.nn.quantized.dynamic as nnqd

    model = tiny_model()
    q = quantize_int8(model)
    ffs = [layer.ff for layer in [*q.encoder.layers, *q.decoder.layers]]
    assert ffs and all(isinstance(ff.act, torch.nn.Identity) for ff in ffs)
    x = torch.randn(5, 3, model.cfg.d_model)
    for ff in ffs:  # torch.ao's int8 linears from the same packed weights (w1 then a ReLU)
        ff.w1.tiles = ff.w2.tiles = None  # fbgemm's GEMM, not the few-rows kernel (next test)
        plain1, plain2 = (nnqd.Linear(w.in_features, w.out_features, dtype=torch.qint8) for w in (ff.w1, ff.w2))
        plain1._packed_params._packed_params = ff.w1.packed
        plain2._packed_params._packed_params = ff.w2.packed
        assert torch.equal(ff.w1(x), torch.relu(plain1(x)))
        assert (ff.w1(x) == 0).any()
        assert torch.equal(ff.w2(ff.w1(x)), plain2(ff.w1(x)))  # and without the ReLU


def test_int8_decoding_steps_use_the_same_int8_weights_in_the_few_rows_kernel():
    """An int8 copy's decoding-step layers (not the encoder's, nor cross-attention's keys/values) also
    hold their int8 weights and scales in the few-rows kernel's tiles (tests/model/test_kernels.py
    checks its arithmetic): close to the same layer through fbgemm."""
    from aiayn import kernels

    if kernels.linear_rows(torch.int8) == 0:
        pytest.skip("the int8 few-rows kernel is not built or not used here")
    q = quantize_int8(tiny_model())
    tiled = {name for name, m in q.named_modules() if getattr(m, "tiles", None) is not None}
    assert tiled and not any(name.startswith("encoder.") or name.endswith("kv_proj") for name in tiled)
    for layer in q.decoder.layers:
        for m in (layer.ff.w1, layer.self_attn.in_proj):
            x = torch.randn(1, 1, m.in_features)
            ours = m(x)
            tiles, m.tiles = m.tiles, None
            torch.testing.assert_close(ours, m(x), rtol=0.05, atol=0.05 * m(x).abs().max().item())  # fbgemm's
            m.tiles = tiles


def test_int8_many_rows_go_to_onednn_on_amx_only(monkeypatch):
    """oneDNN's int8 GEMM serves an int8 copy's large products on CPUs with AMX's int8 tiles only
    (fbgemm has no AMX path; elsewhere it is the faster), and not under ONEDNN_MAX_CPU_ISA's cap."""
    from aiayn import capability
    from aiayn.fast import inference

    def machine(isa, flags):
        found = capability.Machine("cpu", isa, "x", bf16=True, fp16=False, int8=True)
        monkeypatch.setattr(capability, "probe", lambda device="cpu": found)
        monkeypatch.setattr(capability, "cpu_flags", lambda: frozenset(flags))
        return inference.onednn_int8.__wrapped__()

    assert not machine("avx512_bf16", {"avx512_bf16", "avx512_vnni"})  # a Zen 4: fbgemm
    assert not machine("avx2", {"avx2"})
    assert not machine("amx", {"amx_bf16", "amx_tile"})  # AMX without its int8 tiles
    # (this torch's op is tried for real: an x86 torch with oneDNN runs it on any x86 CPU)
    x86_onednn = platform.machine().lower() in ("x86_64", "amd64") and onednn_available()
    assert machine("amx", {"amx_bf16", "amx_tile", "amx_int8"}) or not x86_onednn


def test_int8_many_rows_on_onednn_agree_with_fbgemm_and_keep_its_fallback():
    """Where oneDNN's int8 GEMM takes the large products (AMX): the same int8 weights, inputs rounded
    with one scale and zero point, close to fbgemm's result of the same layer (and nearer the float
    one: 8 bits for the inputs, fbgemm's 7); the ReLU in its output stage; inputs with a NaN go to
    fbgemm."""
    import torch.ao.nn.quantized.dynamic as nnqd

    from aiayn import kernels
    from aiayn.fast.inference import ONEDNN_INT8_MACS, Int8Linear, onednn_int8

    if not (onednn_int8() and kernels.available()):
        pytest.skip("int8 products stay on fbgemm here (no AMX int8, or no kernels)")
    torch.manual_seed(0)
    for relu in (False, True):
        plain = nnqd.Linear(256, 1024, dtype=torch.qint8)
        plain.set_weight_bias(torch.quantize_per_tensor(torch.randn(1024, 256) / 16, 1 / 512, 0, torch.qint8),
                              torch.randn(1024))
        layer = Int8Linear(plain, relu=relu)
        rows = -(-ONEDNN_INT8_MACS // (256 * 1024))
        assert layer.onednn is not None and layer.onednn_rows == rows
        x = torch.randn(2, rows, 256)
        ours, fbgemm = layer(x), layer.op(x, layer.packed, True)
        ref = F.linear(x, plain.weight().dequantize(), plain.bias())
        ref = ref.relu() if relu else ref
        assert ours.shape == ref.shape and not torch.equal(ours, fbgemm)  # (another engine's rounding)
        assert (ours - ref).abs().max() < 0.6 * (fbgemm - ref).abs().max()
        assert not relu or (ours == 0).any()
        x[0, 1, 2] = float("nan")
        assert torch.equal(layer(x), layer.op(x, layer.packed, True))  # fbgemm's result, as without oneDNN


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linears")
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_onednn_feed_forward_relu_is_fused_with_the_same_results(precision):
    model = tiny_model()
    fast = inference_model(model, precision)
    pairs = list(zip([*fast.encoder.layers, *fast.decoder.layers], [*model.encoder.layers, *model.decoder.layers]))
    assert all(fast_layer.ff.w1.post_op == "relu" for fast_layer, _ in pairs)
    dtype = next(fast.parameters()).dtype
    x = torch.randn(5, 3, model.cfg.d_model, dtype=dtype)
    with torch.no_grad():
        for fast_layer, layer in pairs:  # max(0, x W1^T + b1) W2^T + b2, step by step
            w1, w2 = ((lin.weight.to(dtype), lin.bias.to(dtype)) for lin in (layer.ff.w1, layer.ff.w2))
            expected = F.linear(torch.relu(F.linear(x, *w1)), *w2)
            assert torch.allclose(fast_layer.ff(x), expected, atol=1e-5 if precision == "fp32" else 3e-2)


def random_sources(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab - 1, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_translate_decodes_on_a_copy_and_keeps_training_mode(precision):
    torch.manual_seed(0)
    model = Transformer(tiny.model_config()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sentences = ["a b c", "hello world", "x"]
    out = translate(model, tiny.tokenizer(), sentences, beam=2, precision=precision)
    assert len(out) == 3 and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    if precision == "fp32":  # the same arithmetic as the plain model
        assert out == translate(model, tiny.tokenizer(), sentences, beam=2, precision="plain")


def test_unknown_precision_and_fp16_on_a_cpu_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown precision"):
        inference_model(model, "fp8")
    with pytest.raises(ValueError, match="GPU"):
        inference_model(model, "fp16")


def test_translate_inside_an_autocast_region():
    """A training run validates under bf16 autocast: the oneDNN copy must not see bf16 activations."""
    torch.manual_seed(0)
    model = Transformer(tiny.model_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = translate(model, tiny.tokenizer(), ["a b c", "hello"], beam=1)
    assert len(out) == 2


@pytest.mark.parametrize("beam, n_best", [(1, 1), (3, 2)])
def test_decoding_workers_give_the_same_translations_in_order(beam, n_best):
    """Batches decoded by 2 worker threads (translate's default on 2 cores) come back in input order,
    the same as decoded one by one; the caller's thread setting is left as it was."""
    torch.manual_seed(0)
    model = Transformer(tiny.model_config())
    sentences = ["a b c", "hello world", "x", "the cat sat on the mat", "b", "a a a a", "hello", "c b a"]
    threads = torch.get_num_threads()
    # a small token budget: several batches, so that both workers get some
    one = translate(model, tiny.tokenizer(), sentences, beam=beam, n_best=n_best, max_tokens=200, workers=1)
    two = translate(model, tiny.tokenizer(), sentences, beam=beam, n_best=n_best, max_tokens=200, workers=2)
    assert two == one and len(one) == len(sentences)
    assert torch.get_num_threads() == threads
