"""The capability probe and the precision each command runs in (aiayn/capability.py).

The refusal and fallback paths are tested on every machine by simulating the probe's answer; the
real probe is checked against this machine's own flags and the ISA caps that oneDNN and PyTorch read.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from aiayn import capability
from aiayn.capability import Machine, PrecisionError, choose_precision, x86_level
from aiayn.cli import main

AVX2 = Machine("cpu", "avx2", "AMD EPYC (Zen 3)", bf16=False, fp16=False, int8=True)
AVX512_BF16 = Machine("cpu", "avx512_bf16", "AMD EPYC (Zen 4)", bf16=True, fp16=False, int8=True)
OLD_X86 = Machine("cpu", "sse", "an old x86", bf16=False, fp16=False, int8=False)
TURING = Machine("cuda", "sm_75", "Tesla T4", bf16=False, fp16=True, int8=False)


@pytest.fixture
def machine(monkeypatch):
    """Pretend to run on the given machine: `machine(AVX2)`."""
    def use(m: Machine):
        monkeypatch.setattr(capability, "probe", lambda device="cpu": m)
    return use


# ------------------------------------------------------------------------------- the ISA level
AVX2_FLAGS = frozenset("sse4_2 avx avx2 fma f16c".split())
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("flags, level", [
    (frozenset({"sse4_2"}), "sse"), (AVX2_FLAGS, "avx2"), (AVX512_FLAGS, "avx512"),
    (AVX512_FLAGS | {"avx512_bf16"}, "avx512_bf16"), (AVX512_FLAGS | {"avx512_bf16", "amx_bf16", "amx_tile"}, "amx")])
def test_level_from_flags(monkeypatch, flags, level):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert x86_level(flags) == (level, "")


@pytest.mark.parametrize("var, value, level", [
    ("ONEDNN_MAX_CPU_ISA", "AVX2", "avx2"), ("ONEDNN_MAX_CPU_ISA", "avx512_core", "avx512"),
    ("ONEDNN_MAX_CPU_ISA", "SSE41", "sse"), ("ONEDNN_MAX_CPU_ISA", "ALL", "avx512_bf16"),
    ("ATEN_CPU_CAPABILITY", "avx2", "avx2"), ("ATEN_CPU_CAPABILITY", "default", "sse"),
    ("ATEN_CPU_CAPABILITY", "avx512", "avx512_bf16")])
def test_isa_caps_lower_the_level(monkeypatch, var, value, level):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv(var, value)
    found, capped = x86_level(AVX512_FLAGS | {"avx512_bf16"})
    assert found == level
    assert capped == ("" if level == "avx512_bf16" else f"{var}={value}")


def test_the_real_probe_describes_this_machine():
    m = capability.probe("cpu")
    assert m.device == "cpu" and m.name
    line = m.describe()
    assert "\n" not in line and "native: fp32" in line
    if m.isa in ("avx512_bf16", "amx") and torch.backends.mkldnn.is_available():
        assert m.bf16


@pytest.mark.skipif(capability.x86_level(capability.cpu_flags())[0] not in ("avx512", "avx512_bf16", "amx"),
                    reason="needs an x86 CPU above AVX2 to cap")
def test_the_probe_honours_the_isa_caps_of_onednn_and_pytorch():
    """ONEDNN_MAX_CPU_ISA=AVX2 + ATEN_CPU_CAPABILITY=avx2 make this machine an AVX2 one: to the probe,
    and to PyTorch's own bf16 check (which then refuses oneDNN bf16, as on a real AVX2 CPU)."""
    code = ("import torch, json; from aiayn.capability import probe; m = probe(); "
            "print(json.dumps([m.isa, m.bf16, m.capped, torch.ops.mkldnn._is_mkldnn_bf16_supported()]))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    isa, bf16, capped, torch_bf16 = json.loads(out.stdout)
    assert (isa, bf16, torch_bf16) == ("avx2", False, False)
    assert capped.startswith(("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))


# ------------------------------------------------------------------------ ARM: bf16 measured
@pytest.fixture
def arm(monkeypatch):
    """Probe as an aarch64 CPU with BF16 instructions whose torch build's bf16 GEMM runs at `speedup`
    times its fp32 speed: `arm(0.05)` (a build without Arm Compute Library), `arm(2.5)`."""
    def use(speedup: float) -> Machine:
        monkeypatch.setattr(capability.platform, "machine", lambda: "aarch64")
        monkeypatch.setattr(capability, "cpu_flags", lambda: frozenset({"fp", "asimd", "bf16", "i8mm"}))
        monkeypatch.setattr(capability, "cpu_name", lambda: "Neoverse-V1")
        monkeypatch.setattr(capability.torch.backends.mkldnn, "is_available", lambda: True)
        monkeypatch.setattr(capability, "bf16_gemm_speedup", lambda: speedup)
        m = capability._probe_cpu()
        monkeypatch.setattr(capability, "probe", lambda device="cpu": m)
        return m
    return use


def test_arm_bf16_instructions_with_a_slow_bf16_gemm_train_in_fp32(arm):
    m = arm(0.05)
    assert (m.isa, m.bf16, m.bf16_speedup) == ("arm_bf16", False, 0.05)
    assert "a bf16 GEMM 0.05x fp32's here" in m.describe() and "native: fp32, int8" in m.describe()
    precision, why = choose_precision("auto", "cpu", "train")
    assert precision == "fp32" and "has BF16 instructions" in why and "0.05x" in why
    with pytest.raises(PrecisionError) as e:
        choose_precision("bf16", "cpu", "decode")
    message = str(e.value)
    assert "\n" not in message and "faster than fp32's" in message and "use --precision fp32" in message


def test_arm_bf16_instructions_with_a_fast_bf16_gemm_train_in_bf16(arm):
    m = arm(2.5)
    assert m.bf16 and "native: fp32, bf16" in m.describe()
    assert choose_precision("auto", "cpu", "train") == ("bf16", "precision bf16: this CPU computes bf16 natively "
                                                                "(ARM BF16)")
    assert choose_precision("bf16-model", "cpu", "train") == ("bf16-model", "")


def test_arm_without_bf16_instructions_is_not_measured(arm, monkeypatch):
    arm(2.5)
    monkeypatch.setattr(capability, "cpu_flags", lambda: frozenset({"fp", "asimd"}))
    m = capability._probe_cpu()
    assert (m.isa, m.bf16, m.bf16_speedup) == ("arm", False, None)


def test_the_bf16_gemm_is_measured_against_fp32_on_this_cpu():
    """The measurement itself, on whatever CPU runs the tests (no speed asserted: ~1.8x on a Zen 4,
    ~0.02x on an AVX2 CPU, where bf16 is PyTorch's generic loop and it stops after one timed call)."""
    speedup = capability.bf16_gemm_speedup(n=64, tries=2)
    assert 0.0 < speedup < float("inf")


def test_a_bf16_gemm_that_fails_measures_zero(monkeypatch):
    def refuse(a, b):
        if a.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive descriptor")
        return a @ b
    monkeypatch.setattr(capability.torch, "mm", refuse)
    assert capability.bf16_gemm_speedup(n=8, tries=1) == 0.0


# --------------------------------------------------------------------------------- choosing
def test_auto_is_fp32_without_bf16_and_says_why(machine):
    machine(AVX2)
    for purpose in ("train", "decode"):
        precision, why = choose_precision("auto", "cpu", purpose)
        assert precision == "fp32" and "no bf16 instructions (AVX2)" in why
    assert choose_precision(None)[0] == "fp32"


def test_auto_is_bf16_where_the_cpu_has_it(machine):
    machine(AVX512_BF16)
    precision, why = choose_precision("auto", "cpu", "train")
    assert precision == "bf16" and "AVX512_BF16" in why
    assert choose_precision("bf16-model", "cpu", "train") == ("bf16-model", "")


@pytest.mark.parametrize("precision, purpose", [("bf16", "decode"), ("bf16", "train"), ("bf16-model", "train")])
def test_bf16_without_bf16_instructions_is_refused_with_what_to_use(machine, precision, purpose):
    machine(AVX2)
    with pytest.raises(PrecisionError) as e:
        choose_precision(precision, "cpu", purpose)
    message = str(e.value)
    assert "\n" not in message and "no bf16 instructions (AVX2)" in message and "fp32" in message


def test_fp16_on_a_cpu_and_int8_on_a_gpu_are_refused(machine):
    machine(AVX512_BF16)
    with pytest.raises(PrecisionError, match="fp16 needs a GPU.*auto, fp32, bf16 or int8"):
        choose_precision("fp16", "cpu", "decode")
    machine(AVX2)
    with pytest.raises(PrecisionError, match="fp16 needs a GPU.*auto, fp32 or int8"):
        choose_precision("fp16", "cpu", "decode")
    machine(TURING)
    with pytest.raises(PrecisionError, match="int8 runs on a CPU only"):
        choose_precision("int8", "cuda", "decode")


def test_int8_needs_a_quantized_engine(machine):
    machine(AVX2)
    assert choose_precision("int8") == ("int8", "")
    machine(OLD_X86)
    with pytest.raises(PrecisionError, match="int8 needs a quantized engine"):
        choose_precision("int8")


def test_a_gpu_without_bf16_trains_in_fp32_and_may_use_fp16(machine):
    machine(TURING)
    precision, why = choose_precision("auto", "cuda", "train")
    assert precision == "fp32" and "sm_80" in why
    assert choose_precision("fp16", "cuda", "train") == ("fp16", "")


def test_unknown_precisions_and_purposes_are_refused():
    with pytest.raises(PrecisionError, match="unknown precision"):
        choose_precision("int8", "cpu", "train")  # int8 is for decoding only
    with pytest.raises(PrecisionError, match="unknown precision"):
        choose_precision("fp8")


# -------------------------------------------------------------------- the library refuses too
def test_trainer_and_inference_refuse_bf16_without_it(machine, tmp_path):
    from aiayn.config import ModelConfig, TrainConfig
    from aiayn.fast.inference import inference_model
    from aiayn.model import build_model
    from aiayn.train.loop import Trainer, autocast

    machine(AVX2)
    model = build_model(ModelConfig(vocab_size=20, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1,
                                    n_decoder_layers=1, max_len=16))
    with pytest.raises(PrecisionError, match="AVX2"):
        inference_model(model, "bf16")
    with pytest.raises(PrecisionError, match="AVX2"):
        Trainer(None, model, None, TrainConfig(max_steps=1, precision="bf16"), tmp_path)
    trainer = Trainer(None, model, None, TrainConfig(max_steps=1, precision="auto"), tmp_path)
    assert trainer.cfg.precision == "fp32"
    assert not torch.is_autocast_enabled("cpu")
    with autocast(TrainConfig(max_steps=1, precision="auto")):  # the loop's autocast resolves auto too
        assert not torch.is_autocast_enabled("cpu")
    machine(AVX512_BF16)
    with autocast(TrainConfig(max_steps=1, precision="auto")):
        assert torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------------------------- the CLI
def test_translate_with_bf16_on_an_avx2_cpu_is_one_line(machine, capsys):
    machine(AVX2)
    assert main(["translate", "--precision", "bf16", "A man."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aiayn: error: precision bf16 needs bf16 in hardware")


def test_train_with_bf16_on_an_avx2_cpu_is_one_line(machine, capsys, tmp_path):
    machine(AVX2)
    assert main(["train", "lm", "--out", str(tmp_path / "r"), "--precision", "bf16-model", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bf16 instructions (AVX2)" in err[0]
    assert not (tmp_path / "r").exists()  # nothing started


def test_translate_says_its_choice_once(machine, capsys):
    machine(AVX2)
    assert main(["translate", "--beam", "1", "A dog runs."]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    # (the first test to use the kernels built for this ISA also hears that they are built, once)
    once = ("aiayn: building the C kernels", "aiayn: timing its kernels")
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith(once)]
    assert lines == ["aiayn: precision fp32: this CPU has no bf16 instructions (AVX2)"]


def _lm_run(tmp_path, *extra):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 40)
    return ["train", "lm", "--data", str(text), "--out", str(tmp_path / "run"), "--n-layers", "1", "--d-model", "16",
            "--n-heads", "2", "--context", "8", "--batch-size", "2", "--eval-every", "2", "--quiet", *extra]


def test_a_bf16_run_resumes_in_fp32_on_a_cpu_without_bf16(machine, capsys, tmp_path):
    machine(AVX512_BF16)
    assert main(_lm_run(tmp_path, "--max-steps", "2", "--precision", "fp32")) == 0
    run_json = tmp_path / "run" / "run.json"
    meta = json.loads(run_json.read_text())
    meta["train"]["precision"] = "bf16"  # as if started on a machine with bf16
    run_json.write_text(json.dumps(meta))
    capsys.readouterr()
    machine(AVX2)
    assert main(_lm_run(tmp_path, "--resume", "--max-steps", "4")) == 0
    err = capsys.readouterr().err
    assert "resuming in fp32, not the run's bf16" in err
    assert json.loads(run_json.read_text())["train"]["precision"] == "fp32"


def test_an_lm_trains_in_fp32_by_default_on_an_avx2_cpu(machine, capsys, tmp_path):
    machine(AVX2)
    assert main(_lm_run(tmp_path, "--max-steps", "2")) == 0
    assert "aiayn: precision fp32: this CPU has no bf16 instructions (AVX2)" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["precision"] == "fp32"


def test_the_server_decodes_in_auto_and_refuses_what_the_cpu_lacks(machine):
    pytest.importorskip("fastapi")
    from aiayn.serve.models import decode_precision

    machine(AVX2)
    assert decode_precision(None) == "fp32" and decode_precision("int8") == "int8"
    with pytest.raises(ValueError, match="no bf16 instructions"):
        decode_precision("bf16")
    machine(AVX512_BF16)
    assert decode_precision(None) == "bf16" and decode_precision(None, "fp32") == "fp32"


def test_a_gpu_servers_requests_are_checked_against_the_gpu(monkeypatch):
    # its models on a GPU: auto and a request's precision are the GPU's to run, not the host CPU's
    pytest.importorskip("fastapi")
    from aiayn.serve.app import Server
    from aiayn.serve.models import Limits, Models, TranslationModel

    monkeypatch.setattr(capability, "probe", lambda device="cpu": TURING if device == "cuda" else AVX512_BF16)
    gpu = Models(TranslationModel("m", None, None, None, "en", "de", 0.6, device="cuda"), None)
    assert gpu.device == "cuda" and Models(None, None).device == "cpu"
    assert Server(gpu, Limits(), None, 4, "auto").precision == "fp32"  # a T4 has no bf16; the CPU has
    with pytest.raises(PrecisionError, match="CPU only"):
        Server(gpu, Limits(), None, 4, "int8")
