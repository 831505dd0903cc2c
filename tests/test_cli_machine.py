"""`aiayn machine`: what the machine computes natively, and which C kernels run here as timed."""

import json

import pytest
import torch

from aiayn import capability, kernels
from aiayn.cli import main
from aiayn.kernels import tuning


def _out(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["machine", *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def library(tmp_path, monkeypatch):
    """A kernels library of the test's own (a name: its timings are files beside it), this machine's
    real one left alone."""
    path = tmp_path / "kernels-0123456789abcdef.so"
    monkeypatch.setattr(kernels, "library_path", lambda: path)
    monkeypatch.setattr(tuning, "torch_table", lambda: tmp_path / "torch-0123456789abcdef")
    monkeypatch.setenv("AIAYN_KERNELS", "1")
    yield path
    tuning.forget()


def _save(library, threads=None, **decisions):
    table = {"version": tuning.VERSION, "threads": threads or torch.get_num_threads(), **decisions}
    path = library.with_name(f"{library.stem}.tuning-{table['threads']}t.json")
    path.write_text(json.dumps(table))
    return path


def test_it_says_the_device_auto_and_the_threads(capsys):
    out = _out(capsys).splitlines()
    assert out[0] == capability.probe("cpu").describe()
    assert out[1] == f"auto: {capability.choose_precision('auto', 'cpu')[1]}"
    assert out[2].startswith(f"torch {torch.__version__}")
    assert out[3].startswith(f"threads: {torch.get_num_threads()} ")


def test_each_decision_timed_here_in_words(capsys, library):
    _save(library, attention_bf16_dh32=64, attention_bf16_dh32_speedups=[1.3, 1.1, 0.9],
          attention_bf16_dh32_busy=0.0, attention_bf16_dh32_causal=512,
          attention_bf16_dh32_causal_speedups=[1.4, 1.4, 2.5, 2.5, 2.1, 0.7], loss_f32=True, loss_f32_speedups=[1.45], loss_f32_busy=0.1,
          residual_f32=False, residual_f32_speedups=[0.94], linear_i8=0, linear_i8_speedups=[0.8],
          linear_f32=2, linear_f32_speedups=[1.7, 1.5, 1.07, 0.9],
          layer_f32=16, layer_f32_speedups=[2.0, 1.5, 1.2, 1.1, 1.05, 0.9], layer_f32_busy=1.5)
    out = _out(capsys)
    assert f"C kernels: {library}" in out
    lines = {line.split()[0]: " ".join(line.split()) for line in out.splitlines() if line.startswith("  ")}
    assert lines["attention_bf16_dh32"].endswith("training attention, every key on up to 64 tokens 1.30x at 32, "
                                                 "1.10x at 64, 0.90x at 128")
    assert lines["attention_bf16_dh32_causal"].endswith("training attention, causal on up to 512 tokens 1.40x at 32, "
                                                        "1.40x at 64, 2.50x at 128, 2.50x at 256, 2.10x at 512, 0.70x at 1024")
    assert lines["loss_f32"].endswith("training loss on 1.45x")
    assert lines["residual_f32"].endswith("off 0.94x")
    assert lines["linear_i8"].endswith("a decoding step's linear layers off 0.80x")
    assert lines["linear_f32"].endswith("a decoding step's linear layers on up to 2 rows (in the one-call step's "
                                        "generator: 4) 1.70x at 1, 1.50x at 2, 1.07x at 4, 0.90x at 8")
    assert "on up to 16 rows" in lines["layer_f32"]
    assert "timed while other work ran (1.5 cores): timed again on a quiet CPU" in lines["layer_f32"]
    assert not any("other work" in lines[k] for k in ("attention_bf16_dh32", "loss_f32"))


def test_nothing_timed_yet_and_another_thread_count_apart(capsys, library):
    _save(library, threads=torch.get_num_threads() + 1, loss_f32=True, loss_f32_speedups=[1.4])
    assert "timings: none yet for" in _out(capsys)


def test_pytorchs_own_choices_are_listed_with_the_kernels_or_without_them(capsys, library, monkeypatch):
    _save(tuning.torch_table(), gemm_f32=False, gemm_f32_speedups=[0.93])
    expected = "gemm_f32 fp32 training's linear layers on oneDNN (else PyTorch's own GEMM) off 0.93x"
    lines = [" ".join(line.split()) for line in _out(capsys).splitlines()]
    assert expected in lines
    monkeypatch.setattr(kernels, "library_path", lambda: None)  # no compiler: that choice still holds
    lines = [" ".join(line.split()) for line in _out(capsys).splitlines()]
    assert expected in lines and any(line.startswith("C kernels: none here") for line in lines)


def test_retime_forgets_every_thread_count_and_the_next_use_times_again(capsys, library):
    tables = [_save(library, loss_f32=True), _save(library, threads=torch.get_num_threads() + 1, loss_f32=True),
              _save(tuning.torch_table(), gemm_f32=True)]
    out = _out(capsys, "--retime")
    assert "removed 3 table(s) of timings" in out
    assert not any(t.exists() for t in tables)
    assert "timings: none yet" in _out(capsys)


def test_kernels_off_is_said(capsys, monkeypatch):
    monkeypatch.setenv("AIAYN_KERNELS", "0")
    assert "C kernels: off (AIAYN_KERNELS=0)" in _out(capsys)


def test_a_device_it_cannot_use_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["machine", "--device", "cuda"]) != 0
    assert capsys.readouterr().err.strip() == "aiayn: error: --device cuda asked for, but no CUDA GPU is available"
