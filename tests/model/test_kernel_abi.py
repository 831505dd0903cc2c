"""aiayn/kernels/abi.h: the boundary between Python and the C kernels. Each ctypes struct matches the
library's own table of its C struct (else the library is not used); a kernel refuses sizes over its
limits, NULL pointers, bad strides and ids out of range with a status, before touching memory, and the
wrappers turn that into PyTorch's path or a clear error; NaN and infinities give defined results (NaN
where PyTorch gives NaN), never undefined behaviour (checked under UBSan)."""

import ctypes
import os
import re
import subprocess
import sys
from enum import IntEnum
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aiayn import kernels
from aiayn.kernels import Status

pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def library():
    if not kernels.available():
        pytest.skip("the kernels are not built here (no C compiler?)")
    return kernels._library()


def test_every_struct_matches_the_library_field_by_field(library):
    assert kernels._abi_mismatch(library) is None
    size = ctypes.c_int64()
    for kernel, struct in kernels._STRUCTS.items():
        table = library.aiayn_abi_fields(kernel.encode(), ctypes.byref(size))
        names = []
        while table[len(names)].name is not None:
            names.append(table[len(names)].name.decode())
        assert names == [name for name, _ in struct._fields_] and size.value == ctypes.sizeof(struct), kernel
    assert not library.aiayn_abi_fields(b"no_such_kernel", ctypes.byref(size))
    with pytest.raises(AttributeError):  # a misspelt field is an error, not a silent attribute
        kernels._STRUCTS["attend"](scael=1.0)


def test_the_limits_are_defined_once_in_abi_h(library):
    header = (Path(kernels.__file__).parent / "abi.h").read_text()
    for name in ("MAX_KEYS", "MAX_HEAD_DIM", "MAX_ROW"):
        assert getattr(kernels, name) == int(re.search(rf"AIAYN_{name} = (\d+)", header).group(1))
    for name in ("INT8_HEAD", "INT8_MAX_K"):
        assert kernels._LIMITS[name] == int(re.search(rf"AIAYN_{name} = (\d+)", header).group(1))
    assert re.search(r"MAX_KEYS\s*=|MAX_HEAD_DIM\s*=|MAX_ROW\s*=|INT8_HEAD\s*=|INT8_MAX_K\s*=",
                     Path(kernels.__file__).read_text()) is None


def _swapped(struct, a, b):
    """struct with fields a and b swapped: the same size and kinds, so only the names tell."""
    fields = list(struct._fields_)
    i, j = (next(n for n, (name, _) in enumerate(fields) if name == x) for x in (a, b))
    fields[i], fields[j] = fields[j], fields[i]
    return type(struct.__name__, (ctypes.Structure,), {"__slots__": (), "_fields_": fields})


@pytest.mark.parametrize("change", ["two fields swapped", "abi version", "a status renumbered"])
def test_a_library_that_does_not_match_is_not_used(monkeypatch, change):
    from aiayn.model.attention import attend

    if change == "two fields swapped":
        monkeypatch.setitem(kernels._STRUCTS, "attend", _swapped(kernels._STRUCTS["attend"], "ks_h", "ks_t"))
    elif change == "abi version":
        monkeypatch.setattr(kernels, "ABI_VERSION", kernels.ABI_VERSION + 1)
    else:
        monkeypatch.setattr(kernels, "Status", IntEnum("Status", {"OK": 0, "OVER_LIMIT": 1}))
    kernels._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="do not match"):
            assert not kernels.available()
        q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
        with torch.no_grad():
            out, _ = attend(q, k, v)
            assert kernels.cross_attention_step(torch.randn(2, 1, 16), k, v, None) is None
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()
    assert kernels.available()


# ---------------------------------------------------------------- each kernel's checks, called raw
def _valid(kernel):
    """A call of `kernel` that is correct: (its fields, the tensors it addresses, the tensor it writes)."""
    f32 = torch.float32
    if kernel == "attend":
        q, k, v, out = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16), torch.zeros(2, 1, 2, 16)
        strides = dict(qs_b=32, qs_h=16, qs_i=16, ks_b=160, ks_h=80, ks_t=16, vs_b=160, vs_h=80, vs_t=16,
                       os_b=32, os_i=32, os_h=16)
        return dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), B=2, H=2, n_queries=1, t=5,
                    dh=16, group=1, scale=0.25, **strides), (q, k, v), out
    if kernel == "add_norm":
        x, w, out = torch.randn(3, 8), torch.ones(8), torch.zeros(3, 8)
        return dict(x=x.data_ptr(), y=x.data_ptr(), weight=w.data_ptr(), bias=w.data_ptr(), out=out.data_ptr(),
                    rows=3, n=8, xs=8, ys=8, os=8, eps=1e-5), (x, w), out
    if kernel == "argmax":
        x, banned, out = torch.randn(2, 10), torch.tensor([0]), torch.full((2,), -7)
        return dict(x=x.data_ptr(), banned=banned.data_ptr(), out=out.data_ptr(), rows=2, n=10, xs=10,
                    n_banned=1), (x, banned), out
    if kernel == "embed":
        tokens, table, positions, out = torch.tensor([1, 4]), torch.randn(5, 8), torch.randn(1, 8), torch.zeros(2, 8)
        return dict(tokens=tokens.data_ptr(), table=table.data_ptr(), positions=positions.data_ptr(),
                    out=out.data_ptr(), rows=2, length=1, vocab=5, n=8, scale=2.0), (tokens, table, positions), out
    if kernel == "beam":
        x, scores, forbid = torch.randn(2, 12), torch.zeros(2), torch.tensor([0])
        out, ids = torch.zeros(1, 2), torch.full((2, 1, 2), -7)
        return dict(x=x.data_ptr(), scores=scores.data_ptr(), forbid=forbid.data_ptr(), out_scores=out.data_ptr(),
                    out_tokens=ids.data_ptr(), out_beams=ids.data_ptr() + 16, sentences=1, r=2, V=12, xs=12, n=2,
                    n_forbid=1, eos=2), (x, scores, forbid, ids), out
    if kernel == "linear":
        x, w, bias, out = torch.randn(3, 8), torch.randn(2, 8, 16), torch.randn(20), torch.zeros(3, 20)
        return dict(x=x.data_ptr(), w=w.data_ptr(), bias=bias.data_ptr(), out=out.data_ptr(), rows=3, n=20, k=8,
                    xs=8, os=20, relu=1), (x, w, bias), out
    if kernel == "decoder_layer":  # B 2, D 16, 2 heads of 8, d_ff 32, 1 position cached, 3 source tokens
        x, out = torch.randn(2, 16), torch.zeros(2, 16)
        tiles = {"qkv_w": torch.randn(3, 16, 16), "ff1_w": torch.randn(2, 16, 16), "ff2_w": torch.randn(1, 32, 16)}
        weights = {name: tiles.get(name, torch.randn(1, 16, 16) if name.endswith("_w") and not name.startswith("norm")
                                     else torch.randn(48 if name == "qkv_b" else 32 if name == "ff1_b" else 16))
                   for name in kernels.LAYER_WEIGHTS}
        cache, source, mask = torch.randn(2, 2, 2, 4, 8), torch.randn(2, 2, 2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
        return dict(x=x.data_ptr(), out=out.data_ptr(), k_cache=cache[0].data_ptr(), v_cache=cache[1].data_ptr(),
                    source_k=source[0].data_ptr(), source_v=source[1].data_ptr(), mask=mask.data_ptr(),
                    B=2, D=16, H=2, d_ff=32, t=1, S=3, group=1, ks_b=64, ks_h=32, ks_t=8, vs_b=64, vs_h=32, vs_t=8,
                    sks_b=48, sks_h=24, sks_t=8, svs_b=48, svs_h=24, svs_t=8, ms_b=3, eps=1e-5,
                    **{name: w.data_ptr() for name, w in weights.items()}), (x, cache, source, mask, weights), out
    if kernel == "attention_forward":
        qkv, out, probs = torch.randn(2, 3, 48), torch.zeros(2, 3, 16), torch.zeros(2, 2, 3, 3, dtype=f32)
        return dict(q=qkv.data_ptr(), k=qkv.data_ptr() + 64, v=qkv.data_ptr() + 128, out=out.data_ptr(),
                    probs=probs.data_ptr(), B=2, H=2, nt=3, ns=3, dh=8, qs_b=144, qs_t=48, ks_b=144, ks_s=48,
                    vs_b=144, vs_s=48, os_b=48, os_t=16, threads=1, scale=0.35), (qkv, probs), out
    if kernel == "dropout_mask":
        mask = torch.full((10,), -7.0)
        return dict(mask=mask.data_ptr(), n=10, seed=3, threshold=6554, threads=1, scale=1 / 0.9), (), mask
    if kernel == "cross_entropy":
        logits, target, losses = torch.randn(3, 7), torch.tensor([0, 6, 2]), torch.zeros(3)
        return dict(logits=logits.data_ptr(), target=target.data_ptr(), losses=losses.data_ptr(), stride=7, rows=3,
                    V=7, threads=1, eps=0.1, scale=1.0), (logits, target), losses
    raise KeyError(kernel)


REFUSALS = [  # (kernel, what changes, the status)
    ("attend", lambda: dict(t=kernels.MAX_KEYS + 1), Status.OVER_LIMIT),
    ("attend", lambda: dict(dh=kernels.MAX_HEAD_DIM + 1), Status.OVER_LIMIT),
    ("attend", lambda: dict(q=0), Status.NULL_POINTER),
    ("attend", lambda: dict(k_new=16), Status.NULL_POINTER),  # k_new without v_new
    ("attend", lambda: dict(group=3), Status.BAD_SIZE),       # 2 rows in groups of 3
    ("attend", lambda: dict(t=0), Status.BAD_SIZE),
    ("attend", lambda: dict(ks_t=-16), Status.BAD_STRIDE),
    ("add_norm", lambda: dict(n=kernels.MAX_ROW + 1, xs=10**6, ys=10**6, os=10**6), Status.OVER_LIMIT),
    ("add_norm", lambda: dict(xs=4), Status.BAD_STRIDE),       # rows that overlap
    ("argmax", lambda: dict(x=0), Status.NULL_POINTER),
    ("argmax", lambda: dict(banned=0), Status.NULL_POINTER),   # one id to ban, and no list
    ("argmax", lambda: dict(n=0), Status.BAD_SIZE),
    ("embed", lambda: dict(vocab=4), Status.BAD_INDEX),        # token 4 is then out of range
    ("beam", lambda: dict(eos=12), Status.BAD_INDEX),
    ("beam", lambda: dict(xs=11), Status.BAD_STRIDE),
    ("linear", lambda: dict(w=0), Status.NULL_POINTER),
    ("linear", lambda: dict(n=0), Status.BAD_SIZE),
    ("linear", lambda: dict(relu=2), Status.BAD_SIZE),
    ("linear", lambda: dict(xs=7), Status.BAD_STRIDE),        # rows that overlap
    ("decoder_layer", lambda: dict(norm2_b=0), Status.NULL_POINTER),
    ("decoder_layer", lambda: dict(H=3), Status.BAD_SIZE),      # 16 does not split into 3 heads
    ("decoder_layer", lambda: dict(group=3), Status.BAD_SIZE),  # 2 rows in groups of 3
    ("decoder_layer", lambda: dict(t=kernels.MAX_KEYS), Status.OVER_LIMIT),
    ("decoder_layer", lambda: dict(svs_t=-16), Status.BAD_STRIDE),
    ("attention_forward", lambda: dict(ns=kernels.MAX_KEYS + 1), Status.OVER_LIMIT),
    ("attention_forward", lambda: dict(out=0), Status.NULL_POINTER),  # (probs may be NULL: not kept)
    ("attention_forward", lambda: dict(ms_t=-1), Status.BAD_STRIDE),
    ("dropout_mask", lambda: dict(threshold=65537), Status.BAD_SIZE),
    ("cross_entropy", lambda: dict(V=8), Status.BAD_STRIDE),    # a row stride shorter than a row
    ("cross_entropy", lambda: dict(V=6, stride=7), Status.BAD_INDEX),  # target 6 is then out of range
]


@pytest.mark.parametrize("kernel", sorted({k for k, _, _ in REFUSALS}))
def test_a_correct_call_runs(library, kernel):
    fields, _, out = _valid(kernel)
    before = out.clone()
    assert getattr(library, f"{kernel}_f32")(kernels._STRUCTS[kernel](**fields)) == Status.OK
    assert not torch.equal(out, before)  # it wrote its output


@pytest.mark.parametrize("kernel, change, status", REFUSALS, ids=[f"{k}-{s.name}-{i}" for i, (k, _, s) in enumerate(REFUSALS)])
def test_a_kernel_refuses_what_breaks_its_contract_before_touching_memory(library, kernel, change, status):
    fields, _, out = _valid(kernel)
    before = out.clone()
    args = kernels._STRUCTS[kernel](**{**fields, **change()})
    assert getattr(library, f"{kernel}_f32")(args) == status
    assert torch.equal(out, before)  # nothing written
    with pytest.raises(kernels.KernelError, match=f"{kernel}_f32 kernel refused its arguments: .*status {int(status)}"):
        kernels._call(f"{kernel}_f32", args)


def test_over_the_limits_the_wrappers_use_pytorch_or_raise_clearly(library, monkeypatch):
    from aiayn.model.attention import attend

    S, Dh = kernels.MAX_KEYS + 1, 16
    q, k, v = torch.randn(1, 1, 1, Dh), torch.randn(1, 1, S, Dh), torch.randn(1, 1, S, Dh)
    with torch.no_grad():
        assert not kernels.supports(q, k, v, None)  # Python asks first, with the library's limits
        out, _ = attend(q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
        # as if the Python side's checks were wrong: the C side refuses, the wrappers decline or raise
        monkeypatch.setitem(kernels._LIMITS, "MAX_KEYS", 10**6)
        monkeypatch.setitem(kernels._LIMITS, "MAX_ROW", 10**6)
        k_buf, v_buf = torch.zeros(1, 1, S, Dh), torch.zeros(1, 1, S, Dh)
        assert kernels.self_attention_step(torch.randn(1, 1, 3 * Dh), k_buf, v_buf, S - 1, 1) is None
        assert not k_buf.any() and not v_buf.any()  # the cache untouched: PyTorch's path writes it
        assert kernels.cross_attention_step(torch.randn(1, 1, Dh), k, v, None) is None
        with pytest.raises(kernels.KernelError, match="over the kernels' limits"):
            kernels.decode_attention(q, k, v)  # its caller asks `supports` first
        wide = kernels.MAX_ROW + 1
        x = torch.randn(2, wide)
        assert kernels.add_layer_norm(x, x, torch.nn.LayerNorm(wide)) is None


def test_the_limits_need_the_library(monkeypatch, tmp_path):
    monkeypatch.setenv("AIAYN_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels._library.cache_clear()
    try:
        with pytest.raises(AttributeError, match="not built"):
            _ = kernels.MAX_KEYS
    finally:
        kernels._library.cache_clear()


# ------------------------------------------------------------------------------ NaN and infinity
DTYPES = [torch.float32, torch.bfloat16]


def _math_attention(q, k, v):
    """softmax(q kᵀ / sqrt(Dh)) v in float64, step by step: NaN wherever a score or value is. (PyTorch's
    fused CPU attention gives zeros for a query whose every score is NaN, its math backend NaN.)"""
    q, k, v = q.double(), k.double(), v.double()
    return (q @ k.transpose(-1, -2) / q.size(-1) ** 0.5).softmax(-1) @ v


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_in_decoding_attention_give_nan_where_the_math_does(library, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, n, 16, generator=g) for n in (1, 7, 7))
    q[0, 1, 0, 5] = NAN  # every score of (row 0, head 1) NaN
    k[1, 0, 3, 2] = NAN  # one score NaN: that softmax NaN
    v[2, 1, 4, 0] = NAN  # one value NaN: one output component NaN
    q[3, 0, 0, 1] = INF  # scores of +-inf: inf - inf in the softmax
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.no_grad():
        out = kernels.decode_attention(q, k, v)
    ref = _math_attention(q, k, v)
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_training_attention_gives_nan_where_the_math_does(library, dtype):
    B, T, H, D = 2, 5, 2, 16
    x = torch.randn(B, T, 3 * D, generator=torch.Generator().manual_seed(1))
    x[0, 2, 5] = NAN       # a query of head 0
    x[1, 1, D + 9] = NAN   # a key of head 1: every query of that head
    qkv = x.to(dtype).requires_grad_()
    out = kernels.training_attention(qkv, qkv, None, H, D, D)
    heads = [t.double().view(B, T, H, D // H).transpose(1, 2) for t in x.to(dtype).chunk(3, -1)]
    ref = _math_attention(*heads).transpose(1, 2).reshape(B, T, D)
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    out.backward(torch.ones_like(out))  # and the backward pass runs through them
    assert qkv.grad.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_logits_in_the_loss_give_nan_as_pytorch(library, dtype):
    logits = torch.randn(4, 37, generator=torch.Generator().manual_seed(2))
    logits[1, 20] = NAN
    logits[2, 3] = INF
    logits = logits.to(dtype)
    target = torch.tensor([0, 5, 3, 36])
    losses, grad = kernels.cross_entropy(logits, target, 0.1, 1.0, want_grad=True)
    z = logits.double().requires_grad_()
    ref = F.cross_entropy(z, target, label_smoothing=0.1, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(losses.double(), ref.detach(), rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(grad.isnan(), z.grad.isnan()) and grad[1].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_step_never_chooses_nan(library, dtype):
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    x[0] = NAN                   # nothing but NaN: the first allowed id, as for a row of -inf
    x[1, 0] = NAN                # a NaN first does not hide the maximum after it
    x[2, 5::7] = NAN
    x[3] = -INF
    x[3, 10] = NAN
    x[4, 299] = INF
    x = x.to(dtype)
    banned = torch.tensor([2])
    n = x.size(0)
    tokens, record = torch.empty(n, 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.long)
    done = kernels.greedy_step(x[:, None], banned, tokens, record, torch.arange(n), 0, -1, torch.full((n,), 9))
    expected = x.float().masked_fill(x.float().isnan(), -INF).index_fill(-1, banned, -INF).argmax(-1)
    assert done == 0 and tokens[:, 0].tolist() == expected.tolist() == [0, expected[1].item(), expected[2].item(), 0, 299]
    assert expected[1] != 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_beam_with_a_nan_logit_gives_no_candidates(library, dtype):
    logits = 3 * torch.randn(4, 1, 50, generator=torch.Generator().manual_seed(4))
    without = logits.clone()
    logits[0, 0, 17] = NAN     # sentence 0, beam 0
    logits[2:, 0, :] = NAN     # sentence 1: every beam
    without[0] = -INF          # a beam with no live candidate
    without[2:] = -INF
    scores = -torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
    forbid = torch.tensor([0])
    got = kernels.beam_candidates(logits.to(dtype), scores, 4, forbid, 2, False, None)
    ref = kernels.beam_candidates(without.to(dtype), scores, 4, forbid, 2, False, None)
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)
    assert got[3] == ref[3] == 1  # sentence 1: no live candidate (keep 0: no EOS looked for)
    assert (got[2][0] == 1).all() and torch.isinf(got[0][1]).all() and not got[0].isnan().any()


def test_nan_in_a_layer_norm_row_stays_in_that_row(library):
    norm = torch.nn.LayerNorm(24)
    x, y = torch.randn(3, 24), torch.randn(3, 24)
    x[1, 4] = NAN
    with torch.no_grad():
        out = kernels.add_layer_norm(x, y, norm)
        ref = norm(x + y)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True)


# ---------------------------------------------------------------- no undefined behaviour (UBSan)
UBSAN = ["-O1", "-fopenmp-simd", "-fsanitize=undefined,float-cast-overflow", "-fno-sanitize-recover=all"]


def _feed_nan_and_inf() -> None:
    """Every kernel, on inputs with NaN and infinities (run in a library built with UBSan)."""
    torch.manual_seed(0)
    for dtype in DTYPES:
        def odd(*shape):
            x = torch.randn(*shape)
            flat = x.view(-1)
            flat[::7], flat[3::11], flat[5::13] = NAN, INF, -INF
            return x.to(dtype)

        with torch.no_grad():
            assert kernels.decode_attention(odd(4, 2, 1, 16), odd(4, 2, 9, 16), odd(4, 2, 9, 16)) is not None
            qkv, k_buf, v_buf = odd(3, 1, 96), odd(3, 2, 6, 16), odd(3, 2, 6, 16)
            assert kernels.self_attention_step(qkv, k_buf, v_buf, 2, 2) is not None
            assert kernels.add_layer_norm(odd(5, 32), odd(5, 32), torch.nn.LayerNorm(32).to(dtype)) is not None
            logits = odd(4, 1, 300)
            tokens, record = torch.empty(4, 1, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long)
            kernels.greedy_step(logits, torch.tensor([0]), tokens, record, torch.arange(4), 1, 2, torch.full((4,), 5))
            assert kernels.beam_candidates(logits, -torch.rand(2, 2), 4, torch.tensor([0]), 2, True, None) is not None
            assert kernels.embed(torch.tensor([[1, 2]]), odd(5, 16), 4.0, odd(2, 16)) is not None
        qkv = odd(2, 8, 48).requires_grad_()
        kernels.training_attention(qkv, qkv, None, 2, 16, 16).sum().backward()
        x, y = odd(6, 32).requires_grad_(), odd(6, 32).requires_grad_()
        kernels.residual_layer_norm(x, y, torch.nn.LayerNorm(32).to(dtype), 0.1).sum().backward()
        kernels.cross_entropy(odd(6, 40), torch.randint(0, 40, (6,)), 0.1, 1.0, want_grad=True)


def test_no_undefined_behaviour_on_nan_or_inf_under_ubsan(tmp_path):
    """The kernels built with UBSan (every check fatal) in a fresh process, fed NaN and infinities."""
    if kernels._compiler() is None or not sys.platform.startswith("linux"):
        pytest.skip("no C compiler")
    probe = subprocess.run([*kernels._compiler().split(), "-fsanitize=undefined", "-x", "c", "-", "-o",
                            str(tmp_path / "probe")], input="int main(void) { return 0; }", capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"this compiler has no UBSan: {probe.stderr.strip()[-200:]}")
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_kernel_abi as t; "
              f"from aiayn import kernels; kernels._FLAG_SETS = ({UBSAN!r},); "
              "assert kernels.available(), 'the UBSan build failed'; t._feed_nan_and_inf(); print('fed')")
    env = {**os.environ, "AIAYN_CACHE": str(tmp_path), "AIAYN_KERNELS": "all", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fed" in run.stdout, run.stderr[-3000:]
    assert "runtime error" not in run.stderr
