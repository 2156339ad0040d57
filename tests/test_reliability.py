"""tests/test_reliability.py: faults a user meets: wrong-kind or incompatible checkpoints give a clear message (no
traceback); a run killed (kill -9, also in the middle of a checkpoint write) or interrupted (Ctrl-C) keeps a loadable
checkpoint and resumes as if never stopped; a NaN loss stops the run naming the step."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import shapes_train
import train_stage1
import train_stage2
from data.tokenizer import WordTokenizer
from model import LMConfig, VisionConfig, VLM, VLMConfig
from checkpoints import load_checkpoint, read_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = WordTokenizer.for_shapes_world()
WORLD = {"image_size": 48, "min_objects": 1, "max_objects": 4, "jitter": None, "p_count": 0.5, "p_relation": 0.3,
         "max_words": 63}


def small_model(d_model=32):
    torch.manual_seed(0)
    return VLM(VLMConfig(lm=LMConfig(vocab_size=TOKENIZER.vocab_size, d_model=d_model, n_layers=1, n_heads=2,
                                     mlp_hidden=64),
                         vision=VisionConfig(image_size=48, patch_size=16, width=32, layers=1, heads=1),
                         image_token_id=TOKENIZER.image_id))


def write_ckpt(path, stage="stage1-mask", drop=(), optimizer=None, **meta):
    """A checkpoint as the training scripts write it (train_config holds only what the tests need)."""
    model = small_model()
    full = {"stage": stage, "step": 3, "tokenizer": TOKENIZER.to_dict(), "world": WORLD, "answer_len": 64,
            "train_config": {"objective": stage.removeprefix("stage1-")}, **meta}
    save_checkpoint(str(path), model, {k: v for k, v in full.items() if k not in drop},
                    optimizer(model) if optimizer else None)
    return str(path)


def stage1_exit(argv) -> str:
    """train_stage1.main's SystemExit message (the checks run before any scene is rendered)."""
    with pytest.raises(SystemExit) as exit_:
        train_stage1.main(argv)
    message = str(exit_.value.code)
    assert "Traceback" not in message and message.strip(), "a message, not a traceback or a bare exit code"
    return message

# ---------------------------------------------------------------------------------------------------- wrong files


def test_init_from_files_that_are_not_checkpoints(tmp_path):
    out = ["--out", str(tmp_path / "out.safetensors")]
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    pickled = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, str(pickled))  # a pickle: must be refused unread, never unpickled
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "hf_folder").mkdir()
    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_json), metadata={"rediff": "{not json"})
    cases = {str(tmp_path / "missing.safetensors"): "does not exist", str(text): "not a readable safetensors",
             str(pickled): "not a readable safetensors", str(tmp_path / "foreign.safetensors"): "no 'rediff' metadata",
             str(tmp_path / "hf_folder"): "no config.json (nor a sharded checkpoint's meta.json)",
             str(bad_json): "not valid JSON"}
    for path, what in cases.items():
        message = stage1_exit(["--init-from", path, *out])
        assert message.startswith("--init-from") and path in message and what in message, message
    assert not (tmp_path / "out.safetensors").exists(), "nothing is written after a refused start"


def test_wrong_kind_or_missing_fields_name_what_the_file_holds_and_the_fix(tmp_path):
    out = ["--out", str(tmp_path / "out.safetensors")]
    odd = write_ckpt(tmp_path / "odd.safetensors", stage="llada-v")
    message = stage1_exit(["--init-from", odd, *out])
    assert "kind 'llada-v'" in message and "expected 'stage1-mask' or 'stage1-revision' or 'stage2'" in message
    assert "Fix: pass a checkpoint written by train_stage1.py or train_stage2.py" in message
    no_world = write_ckpt(tmp_path / "no_world.safetensors", drop=("world",))
    assert "lacks the metadata field(s) world" in stage1_exit(["--init-from", no_world, *out])
    # A model_config from another version of the code: named, not a dataclass TypeError.
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    path = write_ckpt(tmp_path / "future.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(load_file(path), path, metadata={"rediff": meta["rediff"].replace('"d_model"', '"width_v2"', 1)})
    assert "field 'model_config' is missing or not understood" in stage1_exit(["--init-from", path, *out])
    # Weights that do not fit the file's own config (e.g. a tensor swapped by hand): no state-dict traceback.
    tensors = load_file(odd)
    tensors["model.lm.norm.weight"] = torch.zeros(7)
    save_file(tensors, path, metadata={"rediff": meta["rediff"]})
    assert "do not fit its own model_config" in stage1_exit(["--init-from", path, *out])


def test_resume_refuses_another_stage_and_another_objective(tmp_path):
    stage2 = write_ckpt(tmp_path / "s2.safetensors", stage="stage2")
    message = stage1_exit(["--resume", "--out", stage2])
    assert "kind 'stage2'" in message and "train_stage2.py --resume continues Stage II runs" in message
    message = stage1_exit(["--resume", "--out", str(tmp_path / "none.safetensors")])
    assert message.startswith("--resume: ") and "does not exist" in message and "drop --resume" in message
    mask_run = write_ckpt(tmp_path / "base.safetensors", stage="stage1-mask")
    message = stage1_exit(["--resume", "--out", mask_run])  # --objective defaults to revision
    assert "--objective revision but the run was trained with --objective mask" in message
    assert "repeat the run's own flags" in message


def test_shape_flags_that_contradict_the_checkpoint_are_refused(tmp_path, capsys):
    base = write_ckpt(tmp_path / "base.safetensors")  # d_model 32, answer_len 64
    message = stage1_exit(["--init-from", base, "--d-model", "64", "--answer-len", "80",
                           "--out", str(tmp_path / "o.safetensors")])
    assert "--d-model 64 but the checkpoint has 32" in message and "--answer-len 80 but the checkpoint has 64" in message
    assert "--n-layers" not in message, "a flag left at its default is not a request"
    message = stage1_exit(["--init-from", base, "--prefix-dlm", "--out", str(tmp_path / "o.safetensors")])
    assert "--prefix-dlm True but the checkpoint has False" in message, "the attention mask is the checkpoint's"
    message = stage1_exit(["--tiny", "--init-from", base, "--out", str(tmp_path / "o.safetensors")])
    assert "--d-model 96 but the checkpoint has 32" in message, "a preset's sizes are requests too"
    # Agreeing flags pass; on --resume, other run settings are listed (the losses will then differ).
    model, meta = load_checkpoint(base)
    cfg = train_stage1.TrainConfig(d_model=32, objective="mask", resume=True, lr=1e-4)
    shapes_train.check_start(cfg, model, {**meta, "train_config": {"objective": "mask", "lr": 2e-3}}, base)
    assert "--lr 0.0001 (was 0.002)" in capsys.readouterr().out


def test_resume_with_an_optimizer_that_does_not_fit(tmp_path):
    """A run saved with the vision tower in its optimizer cannot be resumed into one where the tower is frozen."""
    path = write_ckpt(tmp_path / "run.safetensors", stage="stage1-mask", optimizer=lambda m: torch.optim.AdamW(
        m.parameters()), train_config={"objective": "mask"})
    message = stage1_exit(["--resume", "--objective", "mask", "--out", path, "--n-scenes", "4", "--steps", "4"])
    assert "optimizer state does not fit this run's trainable parameters" in message and "--init-from" in message
    assert read_checkpoint(path)[1]["step"] == 3, "the refused run did not touch the checkpoint"


def test_stage2_names_the_kind_and_says_when_it_starts_from_a_mask_only_model(tmp_path, capsys):
    stage1 = write_ckpt(tmp_path / "s1.safetensors", stage="stage1-revision")
    with pytest.raises(SystemExit, match=r"kind 'stage1-revision'.*Fix: to start Stage II from it, pass --init-from"):
        train_stage2.main(["--resume", "--out", stage1])
    base = write_ckpt(tmp_path / "base.safetensors", stage="stage1-mask")
    cfg = train_stage2.Stage2Config(init_from=base, out=str(tmp_path / "s2.safetensors"))
    model, meta, first_round = shapes_train.load_start(cfg, "cpu")  # allowed: Stage II alone is an experiment
    assert meta["stage"] == "stage1-mask" and first_round == 0
    out = capsys.readouterr().out
    assert "mask-trained model (stage1-mask)" in out and "Stage II alone" in out
    shapes_train.load_start(train_stage2.Stage2Config(init_from=stage1, out=cfg.out), "cpu")
    assert "Stage II alone" not in capsys.readouterr().out

# ---------------------------------------------------------------------------------------------------- kill -9

# Runs train_stage1.py so that its HANG_AT_WRITE-th checkpoint write stops halfway (half the bytes written and
# fsynced) for a minute: "killed in the middle of a checkpoint write" is then a moment the test hits every time.
HANGING_WRITE = """
import os, runpy, sys, time
import safetensors.torch as st
writes = 0
def save_file(tensors, filename, metadata=None):
    global writes
    writes += 1
    data = st.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[:len(data) // 2]); f.flush(); os.fsync(f.fileno())
        if writes == int(os.environ.get("HANG_AT_WRITE", "0")):
            time.sleep(60)
        f.write(data[len(data) // 2:])
st.save_file = save_file
sys.argv = ["train_stage1.py"] + sys.argv[1:]
runpy.run_path("train_stage1.py", run_name="__main__")
"""
STEPS = 8
FLAGS = ["--objective", "revision", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--vision-width", "32",
         "--vision-layers", "1", "--vision-pretrain-steps", "0", "--n-scenes", "16", "--batch-size", "4",
         "--steps", str(STEPS), "--warmup", "2", "--eval-every", "1", "--device", "cpu"]


def start(out, log, resume=False, hang_at_write=0):
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HANG_AT_WRITE=str(hang_at_write))
    args = [sys.executable, "-c", HANGING_WRITE, *FLAGS, "--out", out] + (["--resume"] if resume else [])
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(condition, proc, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def saved_step(out):
    """The step of the checkpoint at --out, 0 before the first one; a torn file fails the test at once."""
    try:
        return read_checkpoint(out)[1]["step"]
    except FileNotFoundError:
        return 0


def temp_files(folder):
    return [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def writing(folder, ignore=()) -> bool:
    """True while some temporary checkpoint file (not in `ignore`) holds bytes: a write is in progress."""
    for name in set(temp_files(folder)) - set(ignore):
        try:
            if os.path.getsize(os.path.join(folder, name)) > 0:
                return True
        except FileNotFoundError:  # renamed into place just now
            pass
    return False


def logged_losses(log) -> dict:
    """{step: train loss} of every step a run printed, saved or not."""
    return {int(s): float(v) for s, v in re.findall(r"step (\d+): train loss ([\d.]+)", open(log).read())}


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_9_at_any_moment_keeps_a_loadable_checkpoint_and_resume_continues(tmp_path):
    out, logs = str(tmp_path / "run.safetensors"), [str(tmp_path / f"log{k}.txt") for k in range(3)]

    # 1. kill -9 in the middle of the third checkpoint write (half its bytes on disk), after two checkpoints landed.
    run = start(out, logs[0], hang_at_write=3)
    wait_for(lambda: saved_step(out) == 2 and writing(tmp_path), run, "the third write, halfway")
    kill(run)
    assert run.returncode == -signal.SIGKILL
    first = read_checkpoint(out)[1]["step"]   # loads: the torn bytes are in the temporary file, never at --out
    assert first == 2 and temp_files(tmp_path), "the torn temporary file is left behind, and ignored"
    load_checkpoint(out)

    # 2. --resume, then kill -9 at a random moment once it has saved a later step.
    run = start(out, logs[1], resume=True)
    wait_for(lambda: saved_step(out) > first, run, "a checkpoint after the resumed step")
    time.sleep(random.uniform(0.0, 0.5))
    kill(run)
    second = read_checkpoint(out)[1]["step"]
    assert second > first
    load_checkpoint(out)

    # 3. --resume to the end: the history holds every step once, and every loss any run printed for a step (also
    # for steps whose checkpoint was never finished) equals the final run's: resuming lost and changed nothing.
    run = start(out, logs[2], resume=True)
    assert run.wait(timeout=120) == 0, open(logs[2]).read()[-3000:]
    _, meta = read_checkpoint(out)
    assert meta["step"] == STEPS and [h["step"] for h in meta["history"]] == list(range(1, STEPS + 1))
    assert not temp_files(tmp_path), "the next write removes the temporary file a killed writer left behind"
    final = {h["step"]: h["train_loss"] for h in meta["history"]}
    printed = [logged_losses(log) for log in logs]
    assert max(printed[0]) > first, "run 1 had computed a step whose checkpoint it never finished"
    for losses in printed:
        for step, loss in losses.items():
            assert loss == pytest.approx(final[step], abs=1e-4), (step, loss, final[step])


def test_ctrl_c_during_a_checkpoint_write_keeps_the_old_one_and_no_temporary_file(tmp_path):
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; in the middle of a write that is inside
    _atomic_write's write_fn: the previous checkpoint stays whole and the temporary file is removed."""
    import checkpoints
    path = write_ckpt(tmp_path / "run.safetensors", step=5)

    def interrupted(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        checkpoints._atomic_write(path, interrupted)
    assert read_checkpoint(path)[1]["step"] == 5 and os.listdir(tmp_path) == ["run.safetensors"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = train_stage1.training_loss

    def nan_at_step_2(model, batch, cfg, tokenizer, generator, *shard):
        loss, parts = real(model, batch, cfg, tokenizer, generator, *shard)
        step = generator.initial_seed() - cfg.seed * 1_000_003   # the loop seeds each step's generator this way
        return (loss * float("nan"), parts) if step == 2 else (loss, parts)
    monkeypatch.setattr(train_stage1, "training_loss", nan_at_step_2)
    out = str(tmp_path / "run.safetensors")
    with pytest.raises(SystemExit) as exit_:
        train_stage1.main(FLAGS + ["--out", out])
    assert str(exit_.value.code).startswith(f"step 2: loss is nan; stopping. The last good checkpoint is {out}")
    model, meta = load_checkpoint(out)
    assert meta["step"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_sample_and_eval_name_a_bad_checkpoint_without_a_traceback(tmp_path):
    from tools import eval as eval_script
    import sample
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit, match="^--ckpt: checkpoint .* does not exist"):
        sample.main(["--ckpt", missing])
    stage2 = write_ckpt(tmp_path / "s2.safetensors", stage="stage2", drop=("world",))
    with pytest.raises(SystemExit, match="^--ckpt: .* lacks the metadata field\\(s\\) world"):
        eval_script.main(["--ckpt", stage2, "--n", "2"])


def test_too_short_answer_length_is_a_clear_error(tmp_path):
    import train_stage1
    with pytest.raises(SystemExit, match=r"--answer-len 20: .*--answer-len \d+ or more"):
        train_stage1.main(["--answer-len", "20", "--out", str(tmp_path / "x.safetensors")])
    assert not os.listdir(tmp_path)


def test_stage2_nan_loss_stops_naming_round_and_step_and_writes_nothing(tmp_path, monkeypatch):
    import rediff
    from tests.test_stage2 import drafts_with_mistakes
    s1, s2 = str(tmp_path / "s1.safetensors"), str(tmp_path / "s2.safetensors")
    train_stage1.main(FLAGS + ["--out", s1, "--steps", "1"])
    monkeypatch.setattr(train_stage2, "make_drafts", drafts_with_mistakes(train_stage2.make_drafts))
    monkeypatch.setattr(rediff, "refinement_loss", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(SystemExit) as exit_:
        train_stage2.main(["--init-from", s1, "--out", s2, "--drafts-per-round", "4", "--tokens-per-step", "8",
                           "--steps", "2", "--batch-size", "4", "--n-scenes", "8", "--draft-batch", "4"])
    assert str(exit_.value.code).startswith(f"round 1, step 0: loss is inf; stopping. The last good checkpoint is {s1}")
    assert not os.path.exists(s2)
