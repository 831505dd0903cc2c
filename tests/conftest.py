import pytest
import torch
from hypothesis import settings

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
