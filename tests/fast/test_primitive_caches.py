"""A long-lived process meets GEMMs of every shape; oneDNN caches a primitive per shape. Bounded
caches keep its memory flat (aiayn serve bounds them before loading anything)."""

import os
import subprocess
import sys

import pytest

from aiayn.cli import main
from aiayn.fast.inference import onednn_available

GROWTH = """
import torch
from aiayn.fast.inference import bound_primitive_caches
if {bound}:
    bound_primitive_caches(16)
torch.set_num_threads(1)

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(512, 512), 64)
b = torch.zeros(512)
torch.ops.mkldnn._linear_pointwise(torch.randn(1, 512), w, b, "none", [], "")
start = rss()
for rows in range(2, 302):
    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 512), w, b, "none", [], "")
print(rss() - start)
"""


def _growth(bound: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", GROWTH.format(bound=bound)], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return float(out.stdout)


@pytest.mark.skipif(not (onednn_available() and os.path.exists("/proc/self/status")),
                    reason="needs torch's oneDNN linears and Linux's /proc")
def test_bounded_caches_keep_memory_flat_over_300_gemm_shapes():
    unbounded, bounded = _growth(False), _growth(True)
    assert bounded < 40, (bounded, unbounded)  # 16 primitives; unbounded: ~195 MB on a Zen 4
    assert bounded < unbounded


def test_serve_bounds_the_caches_before_anything_else(monkeypatch, capsys):
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(var, raising=False)
    assert main(["serve", "--port", "70000"]) != 0  # refused after the caches are bounded
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == os.environ["LRU_CACHE_CAPACITY"] == "128"
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "8")
    main(["serve", "--port", "70000"])
    assert os.environ["LRU_CACHE_CAPACITY"] == "8"  # the user's own setting wins


@pytest.mark.parametrize("command, bounded", [(["train", "lm"], True), (["translate"], False)])
def test_training_bounds_the_caches_and_decoding_keeps_the_default(monkeypatch, capsys, tmp_path, command, bounded):
    """A training process meets a new GEMM shape nearly every batch, each primitive large (the small
    model's fp32 training grew by ~35 MB a step): `aiayn train` keeps TRAINING_PRIMITIVES."""
    from aiayn.fast.inference import TRAINING_PRIMITIVES

    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(var, raising=False)
    missing = str(tmp_path / "missing")
    args = [*command, "--data", missing, "--out", str(tmp_path / "run")] if bounded else [*command, "--model", missing, "x"]
    assert main(args) != 0  # refused after the caches are bounded (or not)
    expected = str(TRAINING_PRIMITIVES) if bounded else None
    assert os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == os.environ.get("LRU_CACHE_CAPACITY") == expected
