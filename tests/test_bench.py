"""The benchmark suite: each script runs in its --quick mode (a tiny model) and prints the table it
promises; the FLOP count is right.

Peers (transformers, ctranslate2) are used where installed; their rows are skipped otherwise.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aiayn import bench
from aiayn.config import preset
from aiayn.model import Transformer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HAVE_HF = importlib.util.find_spec("transformers") is not None
HAVE_CT2 = HAVE_HF and importlib.util.find_spec("ctranslate2") is not None


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), "--quick", *args], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the Markdown table in a script's output."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, out
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%x"))


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_table():
    engines = "aiayn,hf" if HAVE_HF else "aiayn"
    return table_rows(run_script("train_throughput.py", "--engines", engines))


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_train_table_has_our_rows(train_table, precision):
    row = next(r for r in train_table if r[:3] == ["tiny", precision, "aiayn"])
    tok_s, mfu, rss = number(row[3]), number(row[5]), number(row[6])
    assert tok_s > 0 and mfu > 0 and rss > 0.05


def test_train_kernels_table_compares_each_kernel_with_pytorch():
    from aiayn import kernels

    if not kernels.available():
        pytest.skip("the kernels are not built here")
    rows = table_rows(run_script("train_kernels.py", "--threads", "1"))
    assert {r[0] for r in rows} >= {"attention, causal", "attention, every key", "loss", "dropout mask", "bias + GELU"}
    for row in rows:
        assert number(row[3]) > 0 and number(row[4]) > 0 and row[6].split()[0] in ("yes", "no")


def test_train_profile_names_the_ops():
    out = run_script("train_throughput.py", "--engines", "aiayn", "--precisions", "fp32", "--profile")
    assert "profile of tiny fp32 aiayn" in out and "aten::" in out


AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_a_precision_the_cpu_lacks_is_a_row_that_says_so():
    """On a CPU without bf16 (here: an x86 CPU capped to AVX2, as oneDNN and PyTorch are), the bf16
    rows say why they were not run, and no bf16 GEMM is timed (it would crawl or be refused)."""
    env = {**os.environ, **AVX2_CAPS}
    probe = subprocess.run([sys.executable, "-c", "from aiayn.capability import probe; print(probe().bf16)"],
                           capture_output=True, text=True, env=env, timeout=120).stdout.strip()
    if probe != "False":
        pytest.skip("this CPU keeps bf16 under the AVX2 caps (not x86)")
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--quick", "--engines", "aiayn",
                           "--precisions", "fp32,bf16,bf16-model"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r[1]: r for r in table_rows(proc.stdout)}
    assert number(rows["fp32"][3]) > 0
    for precision in ("bf16", "bf16-model"):
        assert rows[precision][3].startswith("not run: precision") and "AVX2" in rows[precision][3]
    assert "matmul peak (256x256): fp32" in proc.stdout and "bf16 " not in proc.stdout.split("matmul peak")[1].split("\n")[0]
    assert "native: fp32, int8" in proc.stdout  # the probe's line in the header


def test_the_lm_benchmark_refuses_a_precision_the_cpu_lacks_in_one_line():
    proc = subprocess.run([sys.executable, str(BENCH / "lm_train.py"), "--quick", "--precision", "bf16-model"],
                          capture_output=True, text=True, env={**os.environ, **AVX2_CAPS}, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this CPU keeps bf16 under the AVX2 caps (not x86)")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("needs bf16 in hardware, and this CPU is capped below bf16 "
                                                         "by ONEDNN_MAX_CPU_ISA=AVX2")


def test_the_lm_benchmark_alternates_settings_in_one_process():
    proc = subprocess.run([sys.executable, str(BENCH / "lm_train.py"), "--alternate", "fp32,fp32:nokernels",
                           "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("fp32")]
    assert [r[0] for r in rows] == ["fp32", "fp32:nokernels"] and rows[0][-1] == "1.00x"
    assert all(float(r[2]) > 0 for r in rows)  # median step ms
    bad = subprocess.run([sys.executable, str(BENCH / "lm_train.py"), "--alternate", "fp32,fp8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'fp8' is not a precision" in bad.stderr.strip().splitlines()[-1]


def test_train_rejects_no_passes():
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--passes", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("must be at least 1")


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_train_table_compares_with_hf(train_table, precision):
    pytest.importorskip("transformers")
    hf = next(r for r in train_table if r[:3] == ["tiny", precision, "HF Marian"])
    ours = next(r for r in train_table if r[:3] == ["tiny", precision, "aiayn"])
    assert number(hf[3]) > 0 and hf[7] == "1.00x"
    # the ratio is printed to 2 decimals and the rates to whole tokens: compare at that precision
    assert number(ours[7]) == pytest.approx(number(ours[3]) / number(hf[3]), rel=0.02, abs=0.006)


def test_train_flops_match_torch_flop_counter():
    """The analytic count is 3x torch's own count of the forward pass's matmuls, plus attention
    (which torch's counter does not see on a CPU: its flash kernel is not registered), here counted
    by hand: q k^T and (attention) v over the keys each query sees."""
    sys.path.insert(0, str(BENCH))
    try:
        from train_throughput import make_batches, train_flops
    finally:
        sys.path.remove(str(BENCH))
    from torch.utils.flop_counter import FlopCounterMode

    from aiayn.data.batching import collate

    cfg = preset("tiny", vocab_size=64)
    model = Transformer(cfg).eval()
    src, tgt = [5, 6, 7, 8, 9], [10, 11, 12]  # one sentence: no padding for the counter to count
    batch = collate([(src, tgt)])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        memory, mask = model.encode(batch.src)
        model.logits(model.decode(batch.tgt_in, memory, None))
    s, n, D = len(src), len(tgt) + 1, cfg.d_model
    attention = (cfg.n_encoder_layers * 4 * s * s * D
                 + cfg.n_decoder_layers * (4 * D * n * (n + 1) // 2 + 4 * n * s * D))
    assert train_flops(cfg, batch) == 3 * (counter.get_total_flops() + attention)
    assert make_batches(cfg, 200, 256, 3, seed=0)  # the batch maker runs at this size


# ------------------------------------------------------------------------------ decoding
DECODE_ENGINES = ["aiayn-plain", "aiayn-fp32", "aiayn-bf16", "aiayn-int8"]


@pytest.fixture(scope="module")
def decode_table():
    engines = DECODE_ENGINES + (["hf-fp32", "hf-bf16"] if HAVE_HF else []) + (
        ["ct2-float32", "ct2-int8"] if HAVE_CT2 else [])
    return table_rows(run_script("decode_throughput.py", "--engines", ",".join(engines)))


def _decode_rows(table, engine_prefix: str):
    """The rows of the engines whose names start with engine_prefix; a precision this CPU lacks is
    a row that says so (aiayn.bench.lacks), every other row has its rates."""
    rows = [r for r in table if r[2].startswith(engine_prefix)]
    assert {r[1] for r in rows} == {"greedy", "beam 4"}, table
    for r in rows:
        precision = r[2].split()[-1].replace("float32", "fp32")
        if bench.lacks(precision):
            assert r[3] == f"not run: {bench.lacks(precision)}", r
            continue
        assert not r[3].startswith("failed"), r
        assert "NOT forced" not in r[2], r
        assert number(r[3]) > 0 and number(r[4]) > 0
    return rows


def test_decode_table_has_our_rows(decode_table):
    rows = _decode_rows(decode_table, "aiayn")
    assert len(rows) == 2 * len(DECODE_ENGINES)


def test_decode_table_has_hf_rows(decode_table):
    pytest.importorskip("transformers")
    assert len(_decode_rows(decode_table, "HF generate")) == 4


def test_decode_table_has_ctranslate2_rows(decode_table):
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2")
    assert len(_decode_rows(decode_table, "CTranslate2")) == 4
    ours = next(r for r in decode_table if r[2] == "aiayn fp32" and r[1] == "greedy")
    assert ours[5].endswith("x") and ours[6].endswith("x")  # compared with both CT2 rows


# ------------------------------------------------------------------ fast inference models
def test_run_suite_rejects_unknown_parts_and_skips_missing_scripts(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="unknown benchmark"):
        bench.scripts_for("nope")
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    assert bench.run_suite("lm") == 0
    assert "not written yet" in capsys.readouterr().out


def test_aiayn_bench_passes_its_device_to_the_translation_benchmarks(monkeypatch, capsys):
    from aiayn import cli

    calls = []
    monkeypatch.setattr(bench, "run_suite", lambda part, quick=False, extra=(): calls.append((part, list(extra))) or 0)
    monkeypatch.setattr(cli, "_check_device", lambda device: None)  # (this machine may have no GPU)
    assert cli.main(["bench", "train", "--device", "cuda", "--configs", "base"]) == 0
    assert cli.main(["bench", "decode"]) == 0
    assert calls == [("train", ["--configs", "base", "--device", "cuda"]), ("decode", [])]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_aiayn_bench_on_a_gpu_this_machine_lacks_is_one_line(capsys):
    from aiayn import cli

    assert cli.main(["bench", "train", "--device", "cuda"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("aiayn: error: --device cuda") and "Traceback" not in err


# ------------------------------------------------------------------------------------- A/B
def _in_git() -> bool:
    try:
        return subprocess.run(["git", "-C", str(BENCH), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    except OSError:  # no git here
        return False


IN_GIT = _in_git()


@pytest.mark.skipif(not IN_GIT, reason="ab_step.py checks the base revision out of a git checkout")
@pytest.mark.parametrize("mode", ["decode", "train"])
def test_ab_step_times_both_trees_and_leaves_no_worktree(mode):
    worktrees = subprocess.run(["git", "-C", str(BENCH), "worktree", "list"], capture_output=True, text=True).stdout
    (row,) = table_rows(run_script("ab_step.py", mode, "--base", "HEAD"))
    base, head, ratio = (number(c) for c in row[1:])
    assert base > 0 and head > 0 and ratio == pytest.approx(head / base, abs=1e-3)
    assert subprocess.run(["git", "-C", str(BENCH), "worktree", "list"], capture_output=True, text=True).stdout == worktrees


def test_ab_step_refuses_an_unknown_revision_in_one_line():
    proc = subprocess.run([sys.executable, str(BENCH / "ab_step.py"), "decode", "--base", "no-such-rev", "--quick"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("ab_step.py: error:")


def test_linear_kernel_table_compares_the_kernels_with_the_gemm():
    from aiayn import capability, kernels

    out = run_script("linear_kernel.py", "--precisions", "fp32,int8")
    rows = table_rows(out)
    assert [r[0] for r in rows][:1] == ["fp32"] and ("int8" in [r[0] for r in rows]) == capability.probe("cpu").int8
    for precision in ("fp32", "int8"):
        mine = [r for r in rows if r[0] == precision]
        if not kernels.available() or not mine or mine[0][2] in ("0 / 0", "-"):
            continue  # not built, not this machine's, or lost everywhere: a row that says so
        assert [r[1] for r in mine] == ["1", "4", "all 64 (sorted)"]
        assert all(number(r[3]) > 0 and number(r[4]) > 0 for r in mine)
