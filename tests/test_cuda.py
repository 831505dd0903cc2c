"""The CUDA path, on a GPU (skipped without one): the same model computes the same results there as on
the CPU, training runs in every precision the GPU has and resumes with the same random draws (equal to
rounding: GPU kernels may sum in another order from run to run), decoding in bf16/fp16 keeps the
shipped model's BLEU, and every command takes --device cuda.

Reference results on the GPU are computed with TF32 off (`exact_fp32`): cuBLAS and cuDNN may round
fp32 products through TF32 otherwise, which is a precision of its own, not fp32's."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from aiayn import capability
from aiayn.checkpoint import checkpoints, load_model_dir, model_dir
from aiayn.cli import main
from aiayn.config import preset
from aiayn.data.batching import collate, token_batches
from aiayn.model import build_model
from aiayn.tasks.translation import translation_loss
from aiayn.translate import translate

from train import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
SENTENCES = ["A man is riding a bicycle down the street.", "A dog runs on the beach.",
             "Two children are playing in the park.", "A woman in a red dress sings on a stage.",
             "Several people stand in front of a building while it rains."]


@contextlib.contextmanager
def exact_fp32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(scope="module")
def shipped():
    return load_model_dir(model_dir(None, "translation"))[:2]


def _out(capsys, *args) -> tuple[str, str]:
    capsys.readouterr()
    assert main(list(args)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_the_probe_sees_the_gpu_and_auto_takes_its_bf16():
    m = capability.probe("cuda")
    major, _ = torch.cuda.get_device_capability()
    assert m.device == "cuda" and m.name == torch.cuda.get_device_name() and m.bf16 == (major >= 8)
    precision, why = capability.choose_precision("auto", "cuda", "train")
    assert precision == ("bf16" if m.bf16 else "fp32") and "GPU" in why
    with pytest.raises(capability.PrecisionError, match="CPU only"):
        capability.choose_precision("int8", "cuda", "decode")


def test_a_gpu_this_machine_lacks_is_refused_in_one_line(capsys):
    n = torch.cuda.device_count()
    assert main(["translate", "--device", f"cuda:{n}", "A dog."]) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (f"aiayn: error: --device cuda:{n}: this machine has {n} CUDA GPU(s), "
                                    f"cuda:0 to cuda:{n - 1}") and "Traceback" not in err


def test_a_training_step_computes_the_same_loss_and_gradients_as_on_the_cpu():
    cfg = preset("small", vocab_size=500)
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # no dropout: the same function on both devices
    pairs = [([4 + (i * 7 + j) % 400 for j in range(5 + i % 9)], [4 + (i * 3 + j) % 400 for j in range(4 + i % 11)])
             for i in range(64)]
    batch = collate([pairs[i] for i in token_batches(pairs, 2048, seed=0)[0]])

    def loss_and_grads(model, batch):
        model.zero_grad(set_to_none=True)
        loss = translation_loss(model, batch, label_smoothing=0.1)
        loss.backward()
        return loss.detach().cpu(), {n: p.grad.to("cpu", copy=True) for n, p in model.named_parameters()}

    cpu_loss, cpu_grads = loss_and_grads(model.double(), batch)  # the float64 reference
    with exact_fp32():
        gpu_loss, gpu_grads = loss_and_grads(model.float().cuda(), batch.to("cuda"))
    torch.testing.assert_close(gpu_loss.double(), cpu_loss, rtol=1e-5, atol=0)
    # each gradient within 1e-3 of float64's (relative, as a whole): fp32 on the CPU is within 1.2e-4
    # (ReLU's input rounding to either side of 0), bf16 3e-2 away; TF32 would fail this too
    errors = {name: ((gpu_grads[name].double() - g).norm() / g.norm()).item() for name, g in cpu_grads.items()}
    assert max(errors.values()) < 1e-3, max(errors.items(), key=lambda e: e[1])


def test_the_loss_in_several_gpu_blocks_is_the_float64_loss(monkeypatch):
    from aiayn.train import loss as loss_module

    monkeypatch.setattr(loss_module, "GPU_BLOCK", 300 * 7)  # blocks of 7 rows: several, the last one partial
    torch.manual_seed(0)
    logits, target = torch.randn(40, 300, dtype=torch.float64) * 3, torch.randint(0, 300, (40,))
    expected = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        z = logits.to("cuda", dtype).requires_grad_()
        loss = loss_module.label_smoothed_cross_entropy(z, target.cuda(), 0.1)
        loss.backward()
        ref = logits.clone().requires_grad_()
        torch.nn.functional.cross_entropy(ref, target, label_smoothing=0.1).backward()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=tol, atol=0)
        torch.testing.assert_close(z.grad.double().cpu(), ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())


def test_attention_on_the_gpu_never_takes_cudnns_kernel(monkeypatch):
    # cuDNN's fused attention builds a graph for every new shape: seconds lost in every epoch's first steps
    from aiayn.model import attention

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recorded)
    q = torch.randn(2, 4, 5, 16, device="cuda", dtype=torch.bfloat16 if BF16 else torch.float16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool, device="cuda")
    for m in (None, mask, attention.causal_mask(5, "cuda")):
        attention.attend(q, q, q, m)
    assert seen == [False] * 3 and torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("beam", [1, 4])
def test_the_shipped_model_translates_the_same_on_the_gpu(shipped, beam):
    model, tokenizer = shipped
    cpu = translate(model, tokenizer, SENTENCES, beam=beam, alpha=1.0)
    with exact_fp32():
        gpu = translate(model.cuda(), tokenizer, SENTENCES, beam=beam, alpha=1.0, device="cuda")
    model.cpu()
    assert gpu == cpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_decoding_keeps_the_shipped_models_bleu(capsys, precision):
    if precision == "bf16" and not BF16:
        pytest.skip("this GPU has no bf16")
    scores = {}
    for p in ("fp32", precision):
        out, _ = _out(capsys, "evaluate", "--device", "cuda", "--precision", p)
        scores[p] = json.loads(out)["lc_tok_bleu"]
    assert abs(scores[precision] - scores["fp32"]) <= 0.3, scores
    assert scores["fp32"] >= 41.5, scores


def test_translate_on_the_gpu_says_its_precision_once(capsys):
    out, err = _out(capsys, "translate", "--device", "cuda", SENTENCES[0], SENTENCES[1])
    lines = out.strip().splitlines()
    assert len(lines) == 2 and "Mann" in lines[0] and "Hund" in lines[1]
    assert err.count("precision ") == 1 and ("bf16" if BF16 else "fp32") in err


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-model", "fp16"])
def test_training_on_the_gpu_in_every_precision(tmp_path, capsys, precision):
    if precision.startswith("bf16") and not BF16:
        pytest.skip("this GPU has no bf16")
    args = tiny.cli_train_args(tmp_path, tmp_path / "run", "--device", "cuda", "--max-steps", "30",
                               "--eval-every", "30", "--lr", "1e-2")
    args[args.index("--precision") + 1] = precision
    assert main(args) == 0
    rows = tiny.train_rows(tmp_path / "run")
    # fp16: the loss scaler's first scales overflow and those updates are skipped (their loss is None)
    losses = [loss for _, loss, _ in rows if loss is not None]
    assert len(rows) == 30 and len(losses) >= (20 if precision == "fp16" else 30)
    assert all(loss == loss for loss in losses) and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    model, tokenizer, _, _ = load_model_dir(checkpoints(tmp_path / "run")[-1])
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_resuming_on_the_gpu_draws_the_same_dropout(tmp_path, capsys):
    # with dropout on, a resumed run matches only if the GPU's random state was saved and restored
    common = ("--device", "cuda", "--eval-every", "4")
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "straight", *common, "--max-steps", "8")) == 0
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "resumed", *common, "--max-steps", "4")) == 0
    assert main(["train", "translation", "--resume", "--out", str(tmp_path / "resumed"), "--max-steps", "8",
                 "--quiet"]) == 0
    straight, resumed = (tiny.train_rows(tmp_path / d) for d in ("straight", "resumed"))
    assert [r[0] for r in resumed] == list(range(1, 9))
    # GPU kernels may sum in another order from run to run (atomics): equal to rounding, not bit for bit
    for (_, a, _), (_, b, _) in zip(straight, resumed):
        assert a == pytest.approx(b, rel=1e-4)
    a, b = (tiny.weights(tmp_path / d / "step-00000008") for d in ("straight", "resumed"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_language_model_trains_and_samples_on_the_gpu(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{w} speaks the line {i % 7}.\n" for i, w in enumerate(["ROMEO", "JULIET"] * 60)))
    run = tmp_path / "lm"
    assert main(["train", "lm", "--data", str(text), "--out", str(run), "--device", "cuda", "--max-steps", "40",
                 "--eval-every", "40", "--n-layers", "2", "--d-model", "64", "--n-heads", "2", "--context", "32",
                 "--batch-size", "8", "--quiet"]) == 0
    sample = ("generate", "--model", str(run), "--prompt", "ROMEO", "-n", "60")
    first, _ = _out(capsys, *sample, "--device", "cuda", "--seed", "1")
    again, _ = _out(capsys, *sample, "--device", "cuda", "--seed", "1")
    assert first == again and first.startswith("ROMEO")
    # greedy decoding with the KV cache: the same text on the GPU as on the CPU
    greedy = (*sample, "--temperature", "0", "--precision", "fp32")
    with exact_fp32():
        gpu, _ = _out(capsys, *greedy, "--device", "cuda")
    cpu, _ = _out(capsys, *greedy)
    assert gpu == cpu


def test_lora_fine_tuning_and_the_image_models_train_on_the_gpu(tmp_path, capsys):
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "base", "--device", "cuda", "--max-steps", "6",
                                    "--eval-every", "6")) == 0
    base = checkpoints(tmp_path / "base")[-1]
    assert main(tiny.cli_train_args(tmp_path, tmp_path / "lora", "--device", "cuda", "--init-from", str(base),
                                    "--lora-rank", "2", "--max-steps", "4", "--eval-every", "4")) == 0
    out, _ = _out(capsys, "translate", "--device", "cuda", "--model", str(base), "--adapter",
                  str(tmp_path / "lora" / "adapter.safetensors"), "the red dog runs")
    assert out.strip()
    small = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-layers", "1", "--quiet"]
    assert main(["train", "vit", "--out", str(tmp_path / "vit"), "--device", "cuda", "--max-steps", "20",
                 "--eval-every", "20", "--batch-size", "32", *small]) == 0
    assert main(["train", "image-gpt", "--out", str(tmp_path / "pixels"), "--device", "cuda", "--max-steps", "6",
                 "--eval-every", "6", "--batch-size", "8", "--levels", "4", *small]) == 0
    assert checkpoints(tmp_path / "vit") and checkpoints(tmp_path / "pixels")


def test_explain_draws_the_same_attention_on_the_gpu(tmp_path, capsys):
    # the shipped translation model and the shipped ViT on an image: the text summary (top next tokens,
    # probabilities) the same as on the CPU, in fp32 without TF32
    from PIL import Image

    image = tmp_path / "digit.png"
    digit = Image.new("L", (28, 28))
    digit.paste(255, (12, 5, 16, 23))  # a 1: a bar down the middle
    digit.save(image)
    for what in (["A dog runs on the beach."], [str(image)]):
        summaries = []
        for device in ("cpu", "cuda"):
            with exact_fp32():
                out, _ = _out(capsys, "explain", *what, "--device", device, "--precision", "fp32",
                              "--out", str(tmp_path / device))
            summaries.append(out.replace(str(tmp_path / device), "OUT"))
        assert summaries[0] == summaries[1]
        assert sorted(p.name for p in (tmp_path / "cpu").iterdir()) == sorted(p.name for p in (tmp_path / "cuda").iterdir())


def test_the_search_steps_pick_on_the_gpu_what_they_pick_on_the_cpu():
    # on a CPU they search blocks of the vocabulary first; on a GPU all of it at once (one kernel)
    from aiayn.decode.beam import beam_step
    from aiayn.decode.greedy import row_argmax

    torch.manual_seed(0)
    logits = torch.randn(6, 4, 8000)
    lprobs, scores = logits.log_softmax(-1), torch.randn(6, 4)
    for cpu, gpu in zip(beam_step(lprobs, scores, 4), beam_step(lprobs.cuda(), scores.cuda(), 4)):
        assert torch.equal(gpu.cpu(), cpu)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.view(24, 8000).to(dtype)
        assert torch.equal(row_argmax(x.cuda()).cpu(), row_argmax(x))


def test_the_server_translates_and_generates_on_the_gpu():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from aiayn.data.corpus import ASSETS
    from aiayn.serve.app import create_app
    from aiayn.serve.models import load_models

    models = load_models(ASSETS / "models" / "en-de", ASSETS / "models" / "shakespeare-char", "cuda")
    with exact_fp32(), TestClient(create_app(models), raise_server_exceptions=False) as client:
        r = client.post("/v1/translate", json={"texts": SENTENCES[:2], "precision": "fp32"})
        assert r.status_code == 200, r.text
        cpu = translate(load_model_dir(model_dir(None, "translation"))[0], models.translation.tokenizer,
                        SENTENCES[:2], beam=4, alpha=models.translation.alpha)
        assert r.json()["translations"] == cpu
        r = client.post("/v1/generate", json={"prompt": "ROMEO:", "max_new_tokens": 20, "temperature": 0})
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 20
        # a precision the GPU lacks is the request's error, said as the CLI says it
        r = client.post("/v1/translate", json={"text": "A dog.", "precision": "int8"})
        assert r.status_code == 422 and "CPU only" in r.text
