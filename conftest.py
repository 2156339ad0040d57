"""conftest.py: tests run offline (no hub downloads) from the repository root."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One thread per process: the test machine has 2 cores, and the scripts the tests start run beside pytest itself;
# oversubscribed torch threads make small operations tens of times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
