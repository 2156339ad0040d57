"""conftest.py: tests run offline (no hub downloads) from the repository root."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
