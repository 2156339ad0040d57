"""tests/test_cli_errors.py: every script with bad input, as a user runs it: a non-zero exit status
(2 for a bad flag value), a message on stderr that names the input, never a traceback; an existing
checkpoint at --out survives a run that fails early; an interrupted Stage II (kill -9 during a
round's fine-tuning) resumes to the weights of an uninterrupted run, asking the expert nothing
twice.

Most cases run in this process through cli.run_main (what each script's __main__ runs); a few run
as real subprocesses."""
import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import cli
from data.tokenizer import WordTokenizer
from tests.fake_openai import PROXY_VARIABLES, FakeOpenAI, local_only
from tests.test_reliability import write_ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER_LEN = 64  # write_ckpt's answer length


def closed_port() -> int:
    """A localhost port that refuses every connection (bound, then released: nobody listens)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{placeholder: path} of the good and bad inputs of the cases, made once (no training)."""
    d = tmp_path_factory.mktemp("inputs")
    write_ckpt(d / "s1.safetensors", stage="stage1-revision")
    write_ckpt(d / "s2.safetensors", stage="stage2")
    data = (d / "s1.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (d / "notes.safetensors").write_text("not a checkpoint")
    (d / "broken.png").write_bytes(b"this is not an image")
    Image.new("RGB", (48, 48), "red").save(d / "red.png")
    png = (d / "red.png").read_bytes()
    (d / "truncated.png").write_bytes(png[:len(png) // 2])
    (d / "a_file").write_text("a file where a folder is needed")
    hf = d / "hf_missing_shard"  # an interrupted download: the index lists two shards, one is there
    hf.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (hf / name).write_text("{}")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d / "captions.jsonl").write_text('{"id": "1", "caption": "a cat"}\n{"id": 2, "caption": \n')
    (d / "good_captions.jsonl").write_text('{"id": "1", "caption": "a cat"}\n')
    (d / "refs.json").write_text(json.dumps([{"id": "1", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a cat"}]}]))
    names = {"s1": "s1.safetensors", "s2": "s2.safetensors", "torn": "truncated.safetensors",
             "notes": "notes.safetensors", "broken": "broken.png", "torn_png": "truncated.png",
             "red": "red.png", "a_file": "a_file", "hf_missing_shard": "hf_missing_shard",
             "captions": "captions.jsonl", "good_captions": "good_captions.jsonl",
             "refs": "refs.json", "missing": "missing.safetensors",
             "cache": "cache.jsonl"}  # the cache is never written: its cases stop before a request
    return {"dir": str(d), "port": closed_port(), **{k: str(d / v) for k, v in names.items()}}


NO_EXPERT = ("--init-from {s1} --out {dir}/x.safetensors --expert openai --expert-base-url "
             "http://127.0.0.1:{port}/v1 --cache {cache}")  # an endpoint that refuses connections
# (script, argv with {placeholders} of `files`, exit status, what the message must name). Status
# 2: a bad flag value (argparse's, also for one found bad after parsing); 1: a bad file,
# checkpoint or endpoint.
CASES = [
    ("sample", "--ckpt {s1} --image {broken}", 1, ["broken.png", "not an image"]),
    ("sample", "--ckpt {s1} --image {torn_png}", 1, ["truncated.png", "truncated"]),
    ("sample", "--ckpt {s1} --image {dir}/none.png", 1, ["none.png", "not found"]),
    ("sample", "--ckpt {s1} --tokens-per-step 0", 2, ["--tokens-per-step", "at least 1"]),
    ("sample", "--ckpt {s1} --tokens-per-step -3", 2, ["--tokens-per-step", "-3"]),
    ("sample", "--ckpt {s1} --block-length 7", 2, ["--block-length 7", "answer length 64"]),
    ("sample", "--ckpt {s1} --temperature -1", 2, ["--temperature"]),
    ("sample", "--ckpt {s1} --gen-length many", 2, ["--gen-length", "'many' is not an integer"]),
    ("sample", "--ckpt {s1} --trace-out {a_file}/t.html", 2, ["--trace-out", "a_file is a file"]),
    ("sample", "--ckpt {torn}", 1, ["--ckpt", "truncated.safetensors", "not a readable"]),
    ("sample", "--ckpt {missing}", 1, ["--ckpt", "missing.safetensors", "does not exist"]),
    ("sample", "--ckpt {hf_missing_shard} --image {red}", 1,
     ["hf_missing_shard", "model-00002-of-00002"]),
    ("tools.eval", "--ckpt {s1} --n 0", 2, ["--n", "at least 1"]),
    ("tools.eval", "--ckpt {s1} --n 2 --block-length 5", 2, ["--block-length 5", "s1.safetensors"]),
    ("tools.eval", "--ckpt {s1} --threshold 1.5", 2, ["--threshold", "at most 1"]),
    ("tools.eval", "--ckpt {s1} --json {a_file}/eval.json", 2, ["--json"]),
    ("tools.eval", "--ckpt {notes} --n 2", 1, ["--ckpt", "notes.safetensors"]),
    ("train_stage1", "--steps -5 --out {dir}/x.safetensors", 2, ["--steps", "-5"]),
    ("train_stage1", "--batch-size 0 --out {dir}/x.safetensors", 2, ["--batch-size"]),
    ("train_stage1", "--lr 0 --out {dir}/x.safetensors", 2, ["--lr", "more than 0"]),
    ("train_stage1", "--lr nan --out {dir}/x.safetensors", 2, ["--lr", "finite"]),
    ("train_stage1", "--out {dir}/run", 2, ["--out", "NAME.safetensors", "NAME.dcp"]),
    ("train_stage1", "--out {a_file}/x.safetensors", 2, ["--out", "a_file is a file"]),
    ("train_stage1", "--d-model 30 --n-heads 4 --out {dir}/x.safetensors", 2,
     ["--d-model 30", "--n-heads 4"]),
    ("train_stage1", "--init-from {torn} --out {dir}/x.safetensors", 1,
     ["--init-from", "truncated"]),
    ("train_stage1", "--resume --out {s2}", 1, ["--resume", "kind 'stage2'", "train_stage2.py"]),
    ("train_stage2", "--init-from {s1} --out {dir}/x.dcp", 2, ["--out", "x.safetensors"]),
    ("train_stage2", "--resume --out {s1}", 1, ["s1.safetensors", "kind 'stage1-revision'"]),
    ("train_stage2", "--init-from {s1} --out {dir}/x.safetensors --rounds 0", 2, ["--rounds"]),
    ("train_stage2", NO_EXPERT, 1, ["--expert-base-url", "127.0.0.1:{port}", "connect"]),
    ("distributed", "--dcp {dir}/none.dcp --out {dir}/x.safetensors", 1,
     ["--dcp", "none.dcp", "does not exist"]),
    ("distributed", "--dcp {dir}/none.dcp --out {dir}/x", 2, ["--out FILE.safetensors"]),
    ("tools.judge", "--captions {dir}/none.jsonl", 1, ["none.jsonl", "not found"]),
    ("tools.judge", "--captions {captions} --no-judge", 1, ["captions.jsonl", "line 2"]),
    ("tools.judge", "--captions {good_captions} --references {refs} --base-url "
     "http://127.0.0.1:{port}/v1 --cache {cache}", 1, ["--base-url", "127.0.0.1:{port}"]),
    ("tools.judge", "--captions {good_captions} --max-in-flight 0", 2, ["--max-in-flight"]),
    ("tools.bench", "--repeats 0", 2, ["--repeats"]),
    ("tools.bench", "--ckpt {torn} --quick", 1, ["--ckpt", "truncated.safetensors"]),
    ("tools.reproduce", "--out {a_file}", 2, ["--out", "a_file", "folder"]),
    ("tools.reproduce", "--n 0", 2, ["--n"]),
    ("tools.reproduce", "--results-page {a_file}/results.md", 2, ["--results-page", "a_file"]),
    ("train_stage1", "--init-from {hf_missing_shard} --data-json {refs}", 1,
     ["--init-from", "model-00002-of-00002"]),
    ("train_stage1", "--init-from {hf_missing_shard} --data-json {refs} --lr -1", 2, ["--lr"]),
    ("train_stage2", "--init-from {hf_missing_shard} --data-json {refs} --rounds 0", 2,
     ["--rounds"]),
]


def fill(text: str, files: dict) -> str:
    return text.format(**files)


def in_process(script: str, argv: list, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python script.py ARGV`, run here through cli.run_main."""
    module = importlib.import_module(script)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(module.main, argv)
    return exit_.value.code, capsys.readouterr().err


def check_message(status, stderr: str, want_status: int, names: list):
    assert status == want_status, (status, stderr)
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]  # the line that ends the command names input and problem
    for name in names:
        assert name in last, (name, last)


@pytest.mark.parametrize("script, argv, status, names", CASES,
                         ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_bad_input_ends_with_one_line_naming_it(script, argv, status, names, files, capsys,
                                               monkeypatch):
    local_only(monkeypatch, "sk-test-never-sent")
    code, stderr = in_process(script, fill(argv, files).split(), capsys)
    check_message(code, stderr, status, [fill(n, files) for n in names])


def test_a_missing_key_stops_before_any_work(files, capsys, monkeypatch):
    local_only(monkeypatch)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, stderr = in_process("train_stage2", fill(NO_EXPERT, files).split(), capsys)
    check_message(code, stderr, 1, ["OPENAI_API_KEY"])


# A few cases as real subprocesses, started together: the interpreter's own exit is tested too.
SUBPROCESS_CASES = [c for c in CASES if c[:2] in {
    ("sample", "--ckpt {s1} --image {broken}"), ("sample", "--ckpt {s1} --tokens-per-step 0"),
    ("tools.eval", "--ckpt {s1} --n 0"), ("train_stage1", "--steps -5 --out {dir}/x.safetensors"),
    ("train_stage2", NO_EXPERT)}]


def test_bad_input_as_real_subprocesses(files):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OPENAI_API_KEY="sk-x",
               NO_PROXY="127.0.0.1,localhost")
    runs = [subprocess.Popen([sys.executable, script.replace(".", "/") + ".py",
                              *fill(argv, files).split()], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for script, argv, _, _ in SUBPROCESS_CASES]
    assert len(runs) == 5
    for (script, argv, status, names), run in zip(SUBPROCESS_CASES, runs):
        _, stderr = run.communicate(timeout=600)
        check_message(run.returncode, stderr, status, [fill(n, files) for n in names])
        if "at least" in stderr:  # argparse's own error: one line, not the whole usage block
            assert len(stderr.strip().splitlines()) == 1, stderr


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("script, argv", [
    ("train_stage1", "--init-from {torn}"),
    ("train_stage1", "--steps 0"),
    ("train_stage1", "--init-from {s1} --d-model 64"),
    ("train_stage2", "--init-from {notes}"),
    ("train_stage2", NO_EXPERT.replace(" --out {dir}/x.safetensors", "")),
], ids=["stage1 bad init", "stage1 zero steps", "stage1 contradicting shape", "stage2 bad init",
        "stage2 no expert"])
def test_an_existing_checkpoint_at_out_survives_a_run_that_fails_early(script, argv, files,
                                                                       tmp_path, capsys):
    out = str(tmp_path / "precious.safetensors")
    shutil.copy(files["s1"], out)
    before = digest(out)
    code, stderr = in_process(script, fill(argv, files).split() + ["--out", out], capsys)
    assert code != 0 and "Traceback" not in stderr
    assert digest(out) == before, "the checkpoint is untouched"
    assert os.listdir(tmp_path) == ["precious.safetensors"], "and nothing was left beside it"

# ------------------------------------------------------------------------------ what a run did


def test_unknown_draft_words_are_named_and_a_too_fast_schedule_says_what_it_did(files, capsys):
    import sample
    sample.main(["--ckpt", files["s1"], "--draft", "there is a purple hexagon in the sky",
                 "--device", "cpu", "--tokens-per-step", "100"])
    captured = capsys.readouterr()
    assert "'hexagon'" in captured.err and "'sky'" in captured.err
    assert "'purple'" not in captured.err, "a word of the vocabulary is not named"
    assert (f"1 step of {ANSWER_LEN} tokens (--tokens-per-step 100 is more than the "
            f"{ANSWER_LEN}-token answer)") in captured.out
    assert sample.schedule_text(64, 3) == "22 steps of up to 3 tokens"
    assert sample.schedule_text(48, 8) == "6 steps of 8 tokens"
    assert sample.schedule_text(48, 100, 16) == ("3 steps of 16 tokens (--tokens-per-step 100 is "
                                                 "more than the 16-token block)")
    tokenizer = WordTokenizer.for_shapes_world()
    ids = sample.draft_ids(tokenizer, " ".join(["circle"] * (ANSWER_LEN + 5)), ANSWER_LEN)
    assert ids == tokenizer.encode("circle") * ANSWER_LEN
    assert (f"--draft has {ANSWER_LEN + 5} tokens, more than the {ANSWER_LEN}-token answer: its "
            f"last 5 are dropped") in capsys.readouterr().err


def test_out_means_one_file_or_a_dcp_folder_in_both_training_scripts(tmp_path):
    import train_stage1
    import train_stage2
    cli.check_checkpoint_out(str(tmp_path / "a.safetensors"), sharded=True)
    cli.check_checkpoint_out(str(tmp_path / "a.dcp"), sharded=True)
    cli.check_checkpoint_out(str(tmp_path / "a.safetensors"), sharded=False)
    with pytest.raises(cli.UsageError, match="NAME.safetensors"):
        cli.check_checkpoint_out(str(tmp_path / "a"), sharded=True)
    with pytest.raises(cli.UsageError, match="a.safetensors"):
        cli.check_checkpoint_out(str(tmp_path / "a.dcp"), sharded=False)
    for config in (train_stage1.TrainConfig, train_stage2.Stage2Config):
        help_text = config.__dataclass_fields__["out"].metadata["help"]
        assert "NAME.safetensors" in help_text and "NAME.dcp" in help_text

# ------------------------------------------------------------------------- interrupted Stage II


SECRET = "sk-test-SECRET-cli-errors"
# train_stage2.py in a subprocess whose HANG_AT-th learning-rate call (a step of a round's
# fine-tuning) writes MARKER and sleeps, so that kill -9 lands inside the fine-tuning every time;
# its drafts are made as tests/test_stage2.py makes them (hallucinated captions: mistakes to fix).
KILLABLE_STAGE2 = """
import os, sys, time
import train_stage2
from tests.test_stage2 import drafts_with_mistakes
train_stage2.make_drafts = drafts_with_mistakes(train_stage2.make_drafts)
real, calls = train_stage2.warmup_cosine, [0]
def warmup_cosine(*args):
    calls[0] += 1
    if calls[0] == int(os.environ["HANG_AT"]):
        open(os.environ["MARKER"], "w").close()
        time.sleep(120)
    return real(*args)
train_stage2.warmup_cosine = warmup_cosine
train_stage2.main(sys.argv[1:])
"""
STEPS = 3  # optimizer steps per round


def aligned_answer(item: str, n: int):
    """The fake expert: word-alignment corrections of the draft towards the ground truth."""
    from experts import RIGHT, AlignExpert, Item
    text = json.loads(item)[0]["content"][0]["text"]  # the prompt (experts.OpenAIExpert.request)
    truth, draft = text.rsplit("Ground truth: ", 1)[1].split("\nDraft: ", 1)
    review = AlignExpert().review_one(Item(draft, truth))
    return 200, "right" if review == RIGHT else json.dumps(review)


def request_key(body: dict) -> str:
    return json.dumps(body["messages"], sort_keys=True)  # the whole request: text and image


def test_stage2_killed_during_fine_tuning_resumes_to_the_same_weights_paying_once(
        files, tmp_path, monkeypatch):
    import train_stage2
    from checkpoints import read_checkpoint
    from tests.test_stage2 import drafts_with_mistakes
    local_only(monkeypatch, SECRET)
    common = ["--init-from", files["s1"], "--rounds", "2", "--drafts-per-round", "4",
              "--tokens-per-step", "8", "--steps", str(STEPS), "--batch-size", "4",
              "--n-scenes", "8", "--draft-batch", "4", "--device", "cpu", "--expert", "openai",
              "--warmup", "1"]
    straight, killed = str(tmp_path / "straight.safetensors"), str(tmp_path / "killed.safetensors")

    # The uninterrupted run, in this process.
    monkeypatch.setattr(train_stage2, "make_drafts", drafts_with_mistakes(train_stage2.make_drafts))
    with FakeOpenAI(request_key, aligned_answer) as fake:
        train_stage2.main(common + ["--expert-base-url", fake.url, "--out", straight,
                                    "--cache", str(tmp_path / "straight.jsonl")])
        paid_straight = sum(fake.requests.values())
    _, meta = read_checkpoint(straight)
    assert meta["round"] == 2 and meta["step"] == 2 * STEPS, "both rounds fine-tuned"

    with FakeOpenAI(request_key, aligned_answer) as fake:
        args = common + ["--expert-base-url", fake.url, "--out", killed,
                         "--cache", str(tmp_path / "killed.jsonl")]
        # kill -9 in round 2's fine-tuning, after two of its optimizer steps
        marker, log = str(tmp_path / "in_round_2"), str(tmp_path / "killed.log")
        env = dict(os.environ, TQDM_DISABLE="1", HANG_AT=str(STEPS + 3), MARKER=marker)
        run = subprocess.Popen([sys.executable, "-c", KILLABLE_STAGE2, *args], cwd=ROOT, env=env,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not os.path.exists(marker):
            assert run.poll() is None, open(log).read()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for round 2's fine-tuning"
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        assert read_checkpoint(killed)[1]["round"] == 1, "killed before round 2's checkpoint"
        paid = dict(fake.requests)
        assert sum(paid.values()) == paid_straight, "both rounds were reviewed before the kill"

        train_stage2.main(args + ["--resume"])  # round 2 again: the same drafts, answers cached
        assert dict(fake.requests) == paid and max(paid.values()) == 1, "nothing asked twice"
    tensors, meta = read_checkpoint(killed)
    assert meta["round"] == 2 and meta["step"] == 2 * STEPS
    reference, _ = read_checkpoint(straight)
    assert set(tensors) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(tensors[name], value, msg=name)
