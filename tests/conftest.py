import os

import pytest
import torch
from hypothesis import settings

# Every C kernel wherever it takes the inputs (not only those that won the timing on this machine,
# aiayn/kernels/tuning.py): tests then take the same paths on every machine; tests of the tuning
# itself set AIAYN_KERNELS=1.
os.environ["AIAYN_KERNELS"] = "all"

# CI runs the same examples every time: a failure found once is found again (and a fluke can't
# fail a submission). `pytest --hypothesis-profile=explore` searches new examples.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and do not slow to a crawl on a busy machine.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def every_kernel(monkeypatch):
    """aiayn.kernels with every kernel on for this test (AIAYN_KERNELS=all, over both_paths'
    reference, which turns them off); the test is skipped where the kernels are not built."""
    from aiayn import kernels

    monkeypatch.setenv("AIAYN_KERNELS", "all")
    if not kernels.available():
        pytest.skip("aiayn's C kernels are off or not built here")
    return kernels


@pytest.fixture
def record(monkeypatch):
    """record(owner, name) -> a list of what owner.name returns from then on, call by call (the
    function itself still runs; the test's end restores it)."""
    def record(owner, name):
        results, function = [], getattr(owner, name)

        def recorded(*args, **kwargs):
            results.append(function(*args, **kwargs))
            return results[-1]

        monkeypatch.setattr(owner, name, recorded)
        return results

    return record


@pytest.fixture(params=["reference", "fast"])
def both_paths(request, monkeypatch):
    """Runs a test twice: on the reference model (aiayn/model: plain PyTorch, no C kernel anywhere)
    and on the fast path (every module the test builds in its aiayn.fast form, every C kernel that
    takes the inputs), on every machine: without a compiler the fast path is its Python fallbacks.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("both_paths")`."""
    if request.param == "reference":
        monkeypatch.setenv("AIAYN_KERNELS", "0")
    else:
        from aiayn.fast.modules import FAST

        for base, fast in FAST.items():
            monkeypatch.setattr(base, "__init__", _then_fast(base.__init__, base, fast))
    return request.param


def _then_fast(init, base, fast):
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is base:
            self.__class__ = fast
    return __init__


def pytest_configure(config):
    config.addinivalue_line("markers", "bf16: needs a CPU that computes bf16 natively (skipped elsewhere)")


def pytest_collection_modifyitems(config, items):
    """Tests marked bf16 (precision bf16 or bf16-model, bf16 weights on oneDNN) are skipped, with the
    probe's reason, on a CPU without bf16 instructions: there aiayn refuses bf16 (aiayn.capability)."""
    from aiayn.capability import probe

    machine = probe("cpu")
    if machine.bf16:
        return
    skip = pytest.mark.skip(reason=f"no native bf16 here ({machine.describe()})")
    for item in items:
        if item.get_closest_marker("bf16") is not None:
            item.add_marker(skip)
