"""Short fixed-seed runs of the base, Stage I and one Stage II round give the losses recorded in
tests/fixtures/short_runs.json: moving code around must not change a number.

Record the fixture again (only after a change that is meant to change the numbers, with its reason):
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python tests/test_same_losses.py --record
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from tests.test_stage2 import drafts_with_mistakes  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "short_runs.json")
# The --tiny model's shape, spelled out so that a change of the preset's recipe does not touch this check.
TINY_SHAPE = ["--d-model", "96", "--n-layers", "4", "--n-heads", "4", "--answer-len", "48",
              "--image-features", "attributes", "--mask-loss", "balanced"]
TOLERANCE = 1e-4  # the printed digits (losses print with 4 decimals)


def short_runs(folder: str) -> dict:
    """The three runs, one thread; returns their recorded losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, stage1, stage2 = (os.path.join(folder, f"{n}.safetensors") for n in ("base", "s1", "s2"))
        common = ["--steps", "30", "--batch-size", "16", "--eval-every", "10", "--n-scenes", "300",
                  "--device", "cpu", "--seed", "3"]
        train_stage1.main(["--objective", "mask", *TINY_SHAPE, *common, "--vision-pretrain-steps", "20",
                           "--out", base])
        train_stage1.main(["--init-from", base, *common, "--lr", "1e-3", "--warmup", "5", "--out", stage1])
        real_drafts = train_stage2.make_drafts  # a 30-step model drafts nothing: give the expert mistakes
        train_stage2.make_drafts = drafts_with_mistakes(real_drafts)
        try:
                train_stage2.main(["--init-from", stage1, "--drafts-per-round", "48", "--draft-batch", "16",
                               "--tokens-per-step", "1", "8", "--steps", "10", "--batch-size", "16",
                               "--n-scenes", "100", "--lr", "1e-4", "--device", "cpu", "--out", stage2])
        finally:
            train_stage2.make_drafts = real_drafts
    finally:
        torch.set_num_threads(threads)
    found = {}
    for name, path in (("base", base), ("stage1", stage1), ("stage2", stage2)):
        model, meta = load_checkpoint(path)
        found[name] = {"history": meta["history"],
                       "weights_abs_sum": sum(p.detach().double().abs().sum().item() for p in model.parameters())}
    return found


def numbers(value, where=""):
    """Every number in a nested record, with its path: [(path, number)]."""
    if isinstance(value, dict):
        return [item for k, v in sorted(value.items()) for item in numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in numbers(v, f"{where}[{i}]")]
    return [(where, value)] if isinstance(value, (int, float)) else []


def test_short_runs_give_the_recorded_losses(tmp_path):
    if not os.path.exists(FIXTURE):
        pytest.fail(f"{FIXTURE} is missing: record it with python tests/test_same_losses.py --record")
    with open(FIXTURE) as f:
        expected = json.load(f)
    found = short_runs(str(tmp_path))
    want, got = dict(numbers(expected)), dict(numbers(found))
    assert set(got) == set(want), f"recorded fields differ: {sorted(set(got) ^ set(want))}"
    for path, value in want.items():
        scale = max(1.0, abs(value)) if path.endswith("weights_abs_sum") else 1.0
        assert abs(got[path] - value) <= TOLERANCE * scale, f"{path}: {got[path]} (recorded {value})"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        record = short_runs(folder)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {FIXTURE}")
