"""tests/test_gpu_check.py: tools/gpu_check.py end to end on the CPU with the tiny real-format
folder of tests/test_llada_v.py: the prompt ids beside the template text, one forward pass, captions
at 1 / 4 / 8 tokens per step, a few Stage I steps with the memory plan, nothing written; and its
clear errors."""
import os

import pytest
from PIL import Image

from llada_v import IMAGE_TOKEN_INDEX, load_llada_v
from tests.test_llada_v import VOCAB, tiny  # noqa: F401  (module-scoped fixture: the tiny folder)
from tools import gpu_check


def test_gpu_check_runs_on_cpu_with_the_tiny_folder(tiny, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (56, 40), (200, 30, 30)).save(photo)
    before = set(os.listdir(tiny[0]))
    gpu_check.main(["--ckpt", tiny[0], "--image", str(photo), "--device", "cpu",
                    "--gen-length", "8",
                    "--steps", "2", "--records", "2", "--batch-size", "2", "--grad-accum", "2",
                    "--optimizer", "adamw", "--master-dtype", "float32"])
    out = capsys.readouterr().out
    model, _ = load_llada_v(tiny[0])
    n_image = model.n_image_tokens((56, 40))
    assert f"{IMAGE_TOKEN_INDEX:>7} x {n_image}  <image>" in out
    assert "'<|start_header_id|>'" in out and "'<|eot_id|>'" in out  # special ids as their text
    assert "forward pass: " in out and f"logits (1, 8, {VOCAB})" in out
    for speed in (1, 4, 8):
        assert f"caption at {speed} token(s)/step:" in out
    assert "memory plan (computed from config.json and the flags" in out and "fits" in out
    assert "done: 2 steps" in out and "nothing written (--no-save)" in out
    assert "fine-tuning: 2 steps in" in out and "resident set of the process" in out
    assert set(os.listdir(tiny[0])) == before


def test_gpu_check_errors_name_the_flag(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--ckpt and --image are required"):
        gpu_check.main(["--ckpt", tiny[0]])
    with pytest.raises(SystemExit, match="--image .*gone.jpg: file not found"):
        gpu_check.main(["--ckpt", tiny[0], "--image", str(tmp_path / "gone.jpg")])
