"""tests/test_distributed.py: multi-process training on CPU (gloo): 2 processes under torchrun give the single-process
loss curve and weights (DDP and FSDP2, Stage I and Stage II), DCP checkpoints resume across 1 <-> 2 processes, the
expert cache is shared safely; and the maths that makes it exact (shard losses average to the global batch's loss)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import distributed
import rediff
import shapes_aids
from distributed import Context
from checkpoints import load_checkpoint, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--steps", "4", "--batch-size", "8", "--n-scenes", "64",
        "--vision-pretrain-steps", "0", "--eval-every", "2"]
ATTRIBUTES = ["--image-features", "attributes", "--vision-pretrain-steps", "1"]  # the --tiny model's image tokens
STAGE2 = ["--drafts-per-round", "12", "--draft-batch", "4", "--tokens-per-step", "4", "8", "--steps", "3",
          "--batch-size", "8", "--n-scenes", "32"]

# ----------------------------------------------------------------------------------------------------------------
# The maths: each rank's loss is normalised so that the mean over ranks is the whole batch's loss (no process group)


def shard_mean(loss_fn, world: int, *tensors):
    """Mean over `world` simulated ranks of loss_fn(ctx, rows of each tensor)."""
    total = 0
    for rank in range(world):
        ctx = Context("ddp", rank, world)
        rows = ctx.rows(len(tensors[0]))
        total = total + loss_fn(ctx, *(t[rows] for t in tensors))
    return total / world


def test_word_class_loss_of_shards_averages_to_the_whole_batch_loss():
    g = torch.Generator().manual_seed(1)
    B, L, V, world = 8, 10, 7, 4
    logits = torch.randn(B, L, V, generator=g)
    labels = torch.randint(V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    classes = torch.randint(3, (B, L), generator=g)
    classes[:4] = 1                    # class 0 and 2 tokens only on the last ranks' rows
    whole, _ = shapes_aids.word_class_loss(logits, labels, masked, classes, 3)

    def shard_loss(ctx, lg, lb, mk, cl):  # the WHOLE batch's counts, as training_loss passes them
        counts = [ctx.count(masked & (classes == k)) for k in range(3)]
        return shapes_aids.word_class_loss(lg, lb, mk, cl, 3, counts)[0]
    torch.testing.assert_close(shard_mean(shard_loss, world, logits, labels, masked, classes), whole)


@pytest.mark.parametrize("world", [2, 4])
def test_typed_losses_of_shards_average_to_the_whole_batch_loss_and_gradient(world):
    g = torch.Generator().manual_seed(0)
    B, L, V = 8, 12, 7
    logits = torch.randn(B, L, V, generator=g, requires_grad=True)
    labels = torch.randint(V, (B, L), generator=g)
    types = torch.randint(5, (B, L), generator=g)
    types[:2] = rediff.IGNORE          # rank 0 of 4 gets no typed token at all
    types[4:, :3] = rediff.SYNTAX      # the syntax tokens are unevenly spread
    p = torch.rand(B, generator=g) * 0.9 + 0.1
    whole, _ = rediff.typed_losses(logits, labels, types, p)
    (grad_whole,) = torch.autograd.grad(whole, logits)

    def shard_loss(ctx, lg, lb, ty, pp):  # per-row terms: each rank's plain mean over its own rows
        return rediff.typed_losses(lg, lb, ty, pp)[0]
    sharded = shard_mean(shard_loss, world, logits, labels, types, p)
    (grad_sharded,) = torch.autograd.grad(sharded, logits)
    torch.testing.assert_close(sharded, whole)
    torch.testing.assert_close(grad_sharded, grad_whole)


def test_masked_diffusion_and_refinement_losses_of_shards_average_to_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    B, L, V = 8, 10, 5
    logits = torch.randn(B, L, V, generator=g)
    targets = torch.randint(V, (B, L), generator=g)
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[:, 3:] = True
    masked = (torch.rand(B, L, generator=g) < 0.5) & answer
    p = torch.rand(B, generator=g) * 0.9 + 0.1
    whole = rediff.masked_diffusion_loss(logits, targets, masked, p, answer)  # a per-sample mean: equal shards
    sharded = shard_mean(lambda ctx, *t: rediff.masked_diffusion_loss(*t), 2, logits, targets, masked, p, answer)
    torch.testing.assert_close(sharded, whole)
    mistake = torch.zeros(B, L, dtype=torch.bool)
    mistake[0, 4:9] = mistake[6, 5] = True  # one corrected draft per rank: 5 tokens on rank 0, 1 on rank 1
    whole = rediff.refinement_loss(logits, targets, mistake)
    sharded = shard_mean(lambda ctx, lg, t, m: rediff.refinement_loss(lg, t, m), 2, logits, targets, mistake)
    torch.testing.assert_close(sharded, whole)


def test_rows_parts_and_single_process_collectives():
    assert [Context("ddp", r, 2).rows(8) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]
    assert Context().rows(7) == slice(0, 7)
    with pytest.raises(SystemExit, match="multiples of 2"):
        Context("ddp", 0, 2).rows(7)
    parts = [Context("ddp", r, 3).part(7) for r in range(3)]
    assert [i for part in parts for i in part] == list(range(7))
    one = Context()
    assert one.gather({"a": [1, None, "right"]}) == [{"a": [1, None, "right"]}]
    x = torch.tensor(2.5)
    assert one.mean(x) is x


def test_activation_checkpointing_keeps_fewer_tensors_and_the_same_gradients():
    from tests.test_model import tiny_vlm

    def run(checkpointed: bool):
        torch.manual_seed(0)
        model = tiny_vlm()
        if checkpointed:
            distributed.checkpoint_blocks(model.lm.layers)
        ids = torch.randint(5, model.cfg.lm.vocab_size, (2, 20))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        return loss.item(), sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = run(False), run(True)
    assert checkpointed[0] == plain[0]
    assert checkpointed[1] < plain[1] * 0.8, (checkpointed[1], plain[1])
    assert checkpointed[2].keys() == plain[2].keys()
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, rtol=0, atol=0)


def test_expert_caches_of_other_ranks_merge_into_the_shared_one(tmp_path):
    from experts import AnswerCache, merge_rank_caches, rank_cache_path
    path = str(tmp_path / "expert.jsonl")
    AnswerCache(path).put("k0", "right", model="m")
    rank1 = AnswerCache(path)  # reads the shared cache, appends to its own file
    rank1.path = rank_cache_path(path, 1)
    rank1.put("k1", '[{"org": "a", "target": "b"}]', model="m", draft="a")
    rank1.put("k0", "right", model="m")  # already known: not written twice
    with open(rank1.path, "ab") as f:
        f.write(b'{"key": "k2", "answ')  # a torn last line
    assert merge_rank_caches(path) == 1 and not os.path.exists(rank1.path)
    merged = AnswerCache(path)
    assert merged.answers == {"k0": "right", "k1": '[{"org": "a", "target": "b"}]'} and merged.bad_lines == 0
    assert json.loads(open(path).read().splitlines()[1]) == {"key": "k1", "model": "m", "draft": "a",
                                                             "answer": '[{"org": "a", "target": "b"}]'}


def test_fsdp_needs_a_folder_and_dcp_errors_are_clear(tmp_path):
    import train_stage1
    with pytest.raises(SystemExit, match="folder name, e.g. .*x.dcp"):
        train_stage1.main(TINY + ["--parallel", "fsdp", "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(SystemExit, match="torchrun with several processes"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", "0")
            mp.setenv("WORLD_SIZE", "2")
            distributed.setup("none")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distributed.read_dcp_meta(str(tmp_path / "missing.dcp"))
    (tmp_path / "empty.dcp").mkdir()
    with pytest.raises(ValueError, match="no meta.json"):
        distributed.read_dcp_meta(str(tmp_path / "empty.dcp"))
    with pytest.raises(ValueError, match="is a folder: .* DCP folders with a meta.json"):
        load_checkpoint(str(tmp_path / "empty.dcp"))

# ----------------------------------------------------------------------------------------------------------------
# Real runs: one torchrun launch of 2 processes for all the multi-process runs, the single-process runs in-process


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.fake_openai import FakeOpenAI, local_only
    from tests.test_stage2 import SECRET, draft_of, expert_answer
    import train_stage1
    import train_stage2
    d = tmp_path_factory.mktemp("distributed")
    p = lambda name: str(d / name)  # noqa: E731
    info, t0 = {}, time.perf_counter()
    train_stage1.main(TINY + ["--out", p("single.safetensors")])
    train_stage1.main(TINY + ATTRIBUTES + ["--out", p("attr_single.safetensors")])
    train_stage1.main(TINY + ["--out", p("one_to_two.dcp"), "--stop-at", "2"])
    info["one_to_two_at_2"] = distributed.read_dcp_meta(p("one_to_two.dcp"))
    stage2 = STAGE2 + ["--init-from", p("single.safetensors")]
    train_stage2.main(stage2 + ["--expert", "align", "--out", p("s2_single.safetensors")])
    with FakeOpenAI(draft_of, expert_answer) as fake, pytest.MonkeyPatch.context() as mp:
        local_only(mp, SECRET)
        openai = ["--expert", "openai", "--expert-base-url", fake.url, "--cache", p("expert.jsonl"),
                  "--stage1-mix", "0"]
        launch = [
            "train_stage1.py", *TINY, "--parallel", "ddp", "--out", p("ddp.safetensors"), "--then",
            "train_stage1.py", *TINY, "--parallel", "fsdp", "--out", p("fsdp.dcp"), "--then",
            "train_stage1.py", *TINY, *ATTRIBUTES, "--parallel", "fsdp", "--out", p("attr_fsdp.dcp"), "--then",
            "train_stage1.py", *TINY, "--parallel", "fsdp", "--out", p("two_to_one.dcp"), "--stop-at", "2", "--then",
            "train_stage1.py", *TINY, "--parallel", "fsdp", "--out", p("one_to_two.dcp"), "--resume", "--then",
            "train_stage2.py", *stage2, "--parallel", "ddp", "--expert", "align", "--out", p("s2_ddp.safetensors"),
            "--then",
            "train_stage2.py", *stage2, "--parallel", "fsdp", "--expert", "align", "--out", p("s2_fsdp.safetensors"),
            "--then",
            "train_stage2.py", *stage2, *openai, "--out", p("s2_openai.safetensors")]
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        t1 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "tests/torchrun_runs.py", *launch], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=900)
        info["launch_seconds"] = time.perf_counter() - t1
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
        info["stdout"], info["requests"] = out.stdout, dict(fake.requests)
        info["two_to_one_at_2"] = distributed.read_dcp_meta(p("two_to_one.dcp"))
        info["cache_files"] = sorted(os.listdir(d))
        # One process, same drafts: every answer now comes from the merged cache.
        train_stage2.main(stage2 + openai + ["--out", p("s2_openai_again.safetensors")])
        info["requests_after_rerun"] = dict(fake.requests)
    train_stage1.main(TINY + ["--out", p("two_to_one.dcp"), "--resume"])
    info["seconds"] = time.perf_counter() - t0
    print(f"\ndistributed runs: {info['seconds']:.0f} s, of which the torchrun launch {info['launch_seconds']:.0f} s")
    return p, info


def assert_same_run(path_a: str, path_b: str, steps=(2, 4)):
    """Same logged losses at every evaluation and the same final weights (float tolerance)."""
    model_a, meta_a = load_checkpoint(path_a)
    model_b, meta_b = load_checkpoint(path_b)
    assert [h["step"] for h in meta_a["history"]] == [h["step"] for h in meta_b["history"]] == list(steps)
    for a, b in zip(meta_a["history"], meta_b["history"]):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    weights_b = model_b.state_dict()
    for name, weight in model_a.state_dict().items():
        torch.testing.assert_close(weights_b[name], weight, rtol=1e-5, atol=1e-6)


def test_ddp_two_processes_give_the_single_process_loss_curve(runs):
    p, info = runs
    assert_same_run(p("single.safetensors"), p("ddp.safetensors"))
    assert "step 4: train loss" in info["stdout"]  # rank 0 prints, and only rank 0:
    assert info["stdout"].count("step 4: train loss") == 4  # ddp, both fsdp and the resumed fsdp run: not rank 1


def test_fsdp_two_processes_give_the_single_process_loss_curve(runs):
    p, _ = runs
    assert_same_run(p("single.safetensors"), p("fsdp.dcp"))
    files = sorted(os.listdir(p("fsdp.dcp")))
    assert files == ["meta.json", "shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"], files
    assert distributed.read_dcp_meta(p("fsdp.dcp"))["written_by_processes"] == 2
    # attribute image tokens: the frozen attribute head sharded beside the trainable linear projector
    assert_same_run(p("attr_single.safetensors"), p("attr_fsdp.dcp"))


def test_dcp_checkpoint_of_two_processes_resumes_in_one(runs):
    p, info = runs
    assert (info["two_to_one_at_2"]["step"], info["two_to_one_at_2"]["written_by_processes"]) == (2, 2)
    assert distributed.read_dcp_meta(p("two_to_one.dcp"))["written_by_processes"] == 1
    assert_same_run(p("single.safetensors"), p("two_to_one.dcp"))


def test_dcp_checkpoint_of_one_process_resumes_in_two(runs):
    p, info = runs
    assert (info["one_to_two_at_2"]["step"], info["one_to_two_at_2"]["written_by_processes"]) == (2, 1)
    assert distributed.read_dcp_meta(p("one_to_two.dcp"))["written_by_processes"] == 2
    assert_same_run(p("single.safetensors"), p("one_to_two.dcp"))


def test_consolidated_dcp_checkpoint_is_a_plain_file(runs, tmp_path):
    p, _ = runs
    out = str(tmp_path / "one.safetensors")
    distributed.main(["--dcp", p("fsdp.dcp"), "--out", out])
    _, meta = read_checkpoint(out)
    assert meta["stage"] == "stage1-revision" and meta["step"] == 4 and "optimizer" not in meta
    assert_same_run(p("fsdp.dcp"), out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_stage2_two_processes_match_one(runs, mode):
    """Drafts split over the ranks and gathered, expert reviews split, fine-tuning on each rank's rows."""
    p, _ = runs
    _, meta = read_checkpoint(p(f"s2_{mode}.safetensors"))
    assert meta["history"][0]["samples"] > 0 and meta["history"][0]["refine_loss"] > 0, "something was fine-tuned"
    assert_same_run(p("s2_single.safetensors"), p(f"s2_{mode}.safetensors"), steps=[3])


def test_stage2_expert_calls_are_split_and_the_cache_shared(runs):
    p, info = runs
    assert sum(info["requests"].values()) == 12, "each of the 12 drafts was asked once, by one rank"
    assert not [f for f in info["cache_files"] if ".rank" in f], "per-rank files were merged into the shared cache"
    assert len(open(p("expert.jsonl")).read().splitlines()) == 12
    assert info["requests_after_rerun"] == info["requests"], "a rerun in one process is served from the cache"
    _, meta = read_checkpoint(p("s2_openai.safetensors"))
    assert meta["history"][0]["expert"]["requests"] == 12 and meta["history"][0]["expert"]["right"] == 12
