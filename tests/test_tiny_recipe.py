"""tests/test_tiny_recipe.py: `python train_stage1.py --tiny` trains the base model and then Stage I
from it, with exactly the numbers of the two separate commands; a finished base is reused, and
--resume continues whichever phase was interrupted."""
import os

import pytest
import torch

import train_stage1
from checkpoints import read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny step counts: flags given on the command line apply to both phases.
SMALL = ["--steps", "3", "--batch-size", "4", "--n-scenes", "40", "--vision-pretrain-steps", "2",
         "--eval-every", "3", "--device", "cpu"]


def weights(path: str) -> dict:
    tensors, meta = read_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, meta


def assert_same_weights(a: str, b: str) -> None:
    (wa, _), (wb, _) = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_chained_run_gives_the_weights_of_the_two_commands(tmp_path, one_thread, capsys):
    chained, separate = tmp_path / "chained", tmp_path / "separate"
    train_stage1.main(["--tiny", *SMALL, "--out", str(chained / "stage1.safetensors")])
    out = capsys.readouterr().out
    assert "phase 1/2" in out and "phase 2/2" in out and "the --tiny recipe trained:" in out
    assert f"next: python sample.py --tokens-per-step 8 --ckpt {chained / 'stage1.safetensors'}" in out
    # today's two commands, with the same small step counts
    base = str(separate / "base.safetensors")
    train_stage1.main(["--tiny", "--objective", "mask", *SMALL, "--out", base])
    train_stage1.main(["--tiny", "--init-from", base, "--steps", "600", "--lr", "1e-3", "--warmup",
                       "20", "--n-scenes", "3000", *SMALL,
                       "--out", str(separate / "stage1.safetensors")])
    assert_same_weights(str(chained / "base.safetensors"), base)
    assert_same_weights(str(chained / "stage1.safetensors"), str(separate / "stage1.safetensors"))
    _, base_meta = weights(str(chained / "base.safetensors"))
    _, meta = weights(str(chained / "stage1.safetensors"))
    assert base_meta["stage"] == "stage1-mask" and meta["stage"] == "stage1-revision"
    assert meta["train_config"]["lr"] == 1e-3 and meta["train_config"]["warmup"] == 20
    assert meta["train_config"]["init_from"] == str(chained / "base.safetensors")


def test_finished_base_is_reused_and_resume_continues_the_interrupted_phase(tmp_path, one_thread,
                                                                           capsys):
    out = str(tmp_path / "stage1.safetensors")
    base = str(tmp_path / "base.safetensors")
    train_stage1.main(["--tiny", *SMALL, "--out", out, "--stop-at", "2"])  # the base stops at 2
    assert read_checkpoint(base)[1]["step"] == 2 and not os.path.exists(out)
    with pytest.raises(SystemExit, match="interrupted base model .* --resume"):
        train_stage1.main(["--tiny", *SMALL, "--out", out])
    train_stage1.main(["--tiny", *SMALL, "--out", out, "--resume"])
    assert read_checkpoint(base)[1]["step"] == 3 and read_checkpoint(out)[1]["step"] == 3
    first = weights(out)[0]
    capsys.readouterr()
    train_stage1.main(["--tiny", *SMALL, "--out", out])  # the finished base is reused
    printed = capsys.readouterr().out
    assert "is reused" in printed and "reused" in printed.split("the --tiny recipe trained:")[1]
    assert all(torch.equal(v, weights(out)[0][k]) for k, v in first.items())
    with pytest.raises(SystemExit, match="other settings .*--seed 0 \\(now 1\\)"):
        train_stage1.main(["--tiny", *SMALL, "--out", out, "--seed", "1"])


def test_out_may_not_be_the_recipes_base(tmp_path):
    with pytest.raises(SystemExit, match="--tiny writes its base model there"):
        train_stage1.main(["--tiny", "--out", str(tmp_path / "base.safetensors")])
