"""conftest.py: tests run offline (no hub downloads) from the repository root."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One thread per process: the test machine has 2 cores, and the scripts the tests start run
# beside pytest itself; oversubscribed torch threads make small operations tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for a test that sets its own (small CPU models run far faster so on a busy
    machine); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
