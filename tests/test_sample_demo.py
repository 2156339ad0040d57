"""tests/test_sample_demo.py: `python sample.py --tokens-per-step 8`, the newcomer's demo.

The missing checkpoint's message, what the demo prints, and the sampler it picks for each kind of
checkpoint (and that the flags override it)."""
import os
import shutil

import pytest

import sample
from cli import run_main
from data.pipeline import held_out_indices
from checkpoints import read_checkpoint

FAST = ["--tokens-per-step", "8", "--n-mean", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A mask-trained base (stage1-mask) and Stage I from it (stage1-revision), 4 steps each."""
    import train_stage1
    folder = tmp_path_factory.mktemp("demo")
    base, stage1 = str(folder / "base.safetensors"), str(folder / "stage1.safetensors")
    small = ["--tiny", "--steps", "4", "--eval-every", "4", "--n-scenes", "64",
             "--vision-pretrain-steps", "2", "--batch-size", "8", "--device", "cpu"]
    train_stage1.main([*small, "--objective", "mask", "--out", base])
    train_stage1.main([*small, "--init-from", base, "--out", stage1])
    assert read_checkpoint(base)[1]["stage"] == "stage1-mask"
    assert read_checkpoint(stage1)[1]["stage"] == "stage1-revision"
    return {"mask": base, "revision": stage1}


def test_missing_checkpoint_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/stage1.safetensors here
    with pytest.raises(SystemExit) as exit_:
        run_main(sample.main, ["--tokens-per-step", "8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "out/stage1.safetensors" in err and "python train_stage1.py --tiny" in err


def test_the_demo_prints_scene_trace_both_samplers_and_the_mean(checkpoints, tmp_path,
                                                                monkeypatch, capsys):
    os.makedirs(tmp_path / "out")
    shutil.copy(checkpoints["revision"], tmp_path / "out" / "stage1.safetensors")
    monkeypatch.chdir(tmp_path)
    sample.main(FAST)                        # the default --ckpt
    out = capsys.readouterr().out
    assert f"held-out test scene {held_out_indices(1, 0)[0]}" in out
    assert "ground truth :" in out and "step   0 |" in out
    assert out.count("caption      :") == 2 and out.count("score        : headline") == 2
    assert "decoding     : refining" in out and "decoding     : frozen" in out
    assert "for comparison, the frozen sampler on the same input" in out
    assert "mean over 4 held-out scenes" in out and "verdict      : refining - frozen = " in out
    assert "refining     : headline" in out and "frozen       : headline" in out
    sample.main(FAST + ["--no-trace", "--n-mean", "0"])
    out = capsys.readouterr().out
    assert "step   0 |" not in out and "mean over" not in out and "for comparison" in out


@pytest.mark.parametrize("kind,flags,picked,why", [
    ("mask", [], "frozen", "mask-trained"),
    ("revision", [], "refining", "trained to revise"),
    ("mask", ["--refine"], "refining", "--refine"),
    ("revision", ["--no-refine"], "frozen", "--no-refine"),
])
def test_the_sampler_follows_the_checkpoint_and_the_flags_override(checkpoints, capsys, kind,
                                                                   flags, picked, why):
    sample.main(["--ckpt", checkpoints[kind], *FAST, "--n-mean", "0", "--no-trace", *flags])
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith(f"sampler      : {picked}: ") and why in first
    other = "frozen" if picked == "refining" else "refining"
    assert f"decoding     : {picked}" in out and f"the {other} sampler on the same input" in out
