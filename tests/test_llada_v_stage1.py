"""tests/test_llada_v_stage1.py: train_stage1.py --init-from FOLDER on the tiny real-format LLaDA-V
folder of tests/test_llada_v.py and a generated LLaVA-format caption set (images of several aspect ratios,
ViCrit pairs, ReDiff "revise" records): micro-batches (placeholders, padding to their own longest
row, answer positions), answer-only logits, gradients reach the projector and the tower only when it
trains, the loss falls, the exported folder loads back with the in-memory logits, one process with
--grad-accum 2 equals 2-process DDP and a run stopped in 1 process and resumed under FSDP2 in 2
(gloo), the memory plan on the real 8B config (meta device) and its refusal, each optimizer option
on CPU, and bad data stops with a clear error."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import distributed
import llada_v_train as lt
import memory_plan as mp
import rediff
import train_stage1
from cli import parse_config
from data.captions import CaptionData, load_captions
from llada_v import EOS_ID, EOT_ID, IMAGE_TOKEN_INDEX, STATE_FILE, answer_logits, load_llada_v
from train_stage1 import TrainConfig
from tests.test_llada_v import tiny  # noqa: F401  (module-scoped fixture: the tiny checkpoint folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (width, height, colour): different aspect ratios give different anyres layouts, so different image-token counts
IMAGES = [(40, 30, "red"), (30, 60, "green"), (56, 28, "blue"), (28, 28, "white"), (50, 50, "black"),
          (84, 30, "yellow"), (30, 30, "grey"), (45, 60, "purple")]
RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
       "black": (5, 5, 5), "yellow": (230, 230, 10), "grey": (128, 128, 128), "purple": (128, 0, 128)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(data.json, pairs.jsonl): 8 captioned images in LLaVA format, and 2 ViCrit pairs of which one has captions
    of equal token count (kept) and one not (dropped)."""
    d = tmp_path_factory.mktemp("captions")
    (d / "images").mkdir()
    records = []
    for i, (w, h, colour) in enumerate(IMAGES):
        Image.new("RGB", (w, h), RGB[colour]).save(d / "images" / f"{i}.png")
        records.append({"id": f"img{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"a {colour} picture." if i < 7 else f"a {colour} picture, {w} by {h} pixels."}]})
    with open(d / "data.json", "w") as f:
        json.dump(records, f)
    pairs = [{"image": "images/0.png", "caption": "the xkq box.", "hallucinated": "the qkx box."},
             {"image": "images/1.png", "caption": "the red box.", "hallucinated": "the xkqzvj box."}]
    with open(d / "pairs.jsonl", "w") as f:
        f.write("".join(json.dumps(p) + "\n" for p in pairs))
    return str(d / "data.json"), str(d / "pairs.jsonl")


def args(tiny, dataset, out, *extra):
    data_json, pairs = dataset
    return ["--init-from", tiny[0], "--data-json", data_json, "--vicrit-jsonl", pairs, "--answer-len", "20",
            "--batch-size", "4", "--steps", "4", "--lr", "1e-2", "--warmup", "1", "--save-dtype", "float32",
            "--eval-every", "1",
            "--shard-gb", "0.01", "--hallucination-frac", "0.25", "--device", "cpu", "--out", out,
            "--vision-lr", "1e-5", *extra]


def eq1_loss(model, data, step=0):
    """Eq. 1 on a fixed batch with fixed masks: comparable between models."""
    batch = data.batch(step, 8, 0.25)
    cfg = TrainConfig(objective="mask", answer_len=20)
    noisy = lt.corrupt(batch, cfg, None, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return lt.rows_loss(model, data, batch, noisy, slice(None), cfg, "cpu")[0].item()


def caption_data(tiny, dataset, model, tokenizer):
    cfg = TrainConfig(init_from=tiny[0], data_json=dataset[0], vicrit_jsonl=dataset[1], answer_len=20)
    captions, pairs = load_captions(cfg, cfg.objective)
    return CaptionData(captions, pairs, model, tokenizer, 20, 0)

# ----------------------------------------------------------------------------------------------------------------


def test_micro_batches_pad_their_own_rows_and_mark_the_answer(tiny, dataset):
    model, tokenizer = load_llada_v(tiny[0])
    data = caption_data(tiny, dataset, model, tokenizer)
    assert len(data.pairs) == 1 and data.stats["pairs_dropped_token_counts_differ"] == 1
    batch = data.batch(0, 8, 0.25)
    records = data.records(0, 8, 0.25)
    assert batch.answers.shape == batch.wrong.shape == (8, 20)
    counts = [model.n_image_tokens(Image.open(r["image_path"]).size) for r in records]
    assert len(set(counts[4:])) > 1, "the rows must differ in image-token count for this test to mean anything"
    rows = data.batch_rows(batch, batch.answers, slice(4, 8))  # a second rank's half of a global batch of 8
    starts = []
    for b, r in enumerate(records[4:]):
        row, at = rows.ids[b], rows.start + rows.answer_at[b]
        assert (row == IMAGE_TOKEN_INDEX).sum() == counts[4 + b]
        start = int(at[0])
        starts.append(start)
        assert at.tolist() == list(range(start, start + 20)) and (row[start + 20:] == EOS_ID).all()
        assert row[start - 1] != EOS_ID  # the prompt ends right before the answer
        caption = tokenizer.encode(r["caption"])
        if len(caption) >= 20:  # the long caption is cut, with no end of turn
            assert row[start:start + 20].tolist() == caption[:20]
            continue
        assert row[start:start + len(caption)].tolist() == caption
        assert row[start + len(caption)] == EOT_ID and (row[start + len(caption) + 1:start + 20] == EOS_ID).all()
    assert rows.start == min(starts) and rows.ids.shape[1] == max(starts) + 20  # padded to these rows' longest
    whole = data.batch_rows(batch, batch.answers, slice(None))
    assert whole.ids.shape[1] >= rows.ids.shape[1]
    cut = sum(len(tokenizer.encode(r["caption"])) >= 20 for r in records[:6])
    assert data.stats["captions_cut"] == cut
    assert data.answer(list(range(25))) == list(range(20)) and data.stats["captions_cut"] == cut + 1
    assert 8 - round(0.25 * 8) == sum(not r.get("wrong_ids") for r in records), "2 of 8 rows are ViCrit pairs"
    assert batch.wrong_span.any() and batch.wrong_span[:6].sum() == 0
    assert rows.images.sizes == [Image.open(r["image_path"]).size for r in records[4:]]  # these rows' images only
    assert rows.images.views.shape[0] == sum(1 + model.image_layout(s).rows * model.image_layout(s).cols
                                             for s in rows.images.sizes)


def test_micro_batches_of_one_process_are_those_of_several():
    """Rank r's micro-batch j holds the same rows as micro-batch r * grad_accum + j of one process.
    """
    one = lt.micro_batches(8, distributed.Context(), 4)
    for world, accum in ((2, 2), (4, 1)):
        ranks = [lt.micro_batches(8, distributed.Context("ddp", rank, world), accum) for rank in range(world)]
        assert [m for r in ranks for m in r] == one
    with pytest.raises(SystemExit, match="--batch-size 8 does not split into 1 process.*--grad-accum 3"):
        lt.micro_batches(8, distributed.Context(), 3)


def test_answer_logits_are_the_full_logits_at_the_answer_positions(tiny, dataset):
    model, tokenizer = load_llada_v(tiny[0])
    data = caption_data(tiny, dataset, model, tokenizer)
    batch = data.batch(0, 4, 0.25)
    rows = data.batch_rows(batch, batch.answers, slice(None))
    with torch.no_grad():
        ours = answer_logits(model, rows)                                                # (b, A, V)
        full = model(rows.ids, images=rows.images)                                       # (b, L, V)
    assert ours.shape == (4, 20, full.shape[-1])
    torch.testing.assert_close(ours, full.gather(1, (rows.start + rows.answer_at)[..., None].expand_as(ours)),
                               rtol=1e-4, atol=1e-4)
    assert not model.lm.norm._forward_pre_hooks, "the hook is removed after the call"


def test_gradients_reach_projector_language_model_and_the_tower_only_when_it_trains(tiny, dataset):
    model, tokenizer = load_llada_v(tiny[0])
    data = caption_data(tiny, dataset, model, tokenizer)
    for vision_lr in (0.0, 1e-6):
        cfg = TrainConfig(answer_len=20, vision_lr=vision_lr, lr=1e-4)
        _, _, optimizer = lt.prepare_training(model, distributed.Context(), cfg)
        model.zero_grad(set_to_none=True)
        batch = data.batch(0, 4, 0.25)
        noisy = lt.corrupt(batch, cfg, torch.arange(300), torch.Generator().manual_seed(0))
        loss, parts = lt.rows_loss(model, data, batch, noisy, slice(None), cfg, "cpu")
        loss.backward()
        assert set(parts) == set(rediff.TYPE_NAMES.values()) and parts["mask"] > 0
        for p in (model.mm_projector[0].weight, model.mm_projector[2].bias, model.image_newline,
                  model.lm.lm_head.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
        tower = list(model.vision_tower.parameters())
        if vision_lr:
            assert all(p.grad is not None for p in tower)
            assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, pytest.approx(0.01)]
            train_stage1.set_learning_rate(optimizer, 1e-4)
            assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-4), pytest.approx(1e-6)]
        else:
            assert all(p.grad is None for p in tower) and len(optimizer.param_groups) == 1
    # the batched, differentiable encode gives encode_image's tokens, image by image
    rows = data.batch_rows(batch, batch.answers, slice(None))
    tokens = model.embed_views(*rows.images)                                            # (B, N, D)
    for b in range(len(rows.images.sizes)):
        image = Image.open(data.records(0, 4, 0.25)[b]["image_path"]).convert("RGB")
        alone = model.encode_image(image)[0]
        torch.testing.assert_close(tokens[b, :len(alone)], alone)


# ----------------------------------------------------------------------------------------------------------------
# Real runs: the single-process ones in this process, the 2-process ones in one torchrun launch


@pytest.fixture(scope="module")
def runs(tiny, dataset, tmp_path_factory):
    """single: 4 steps in this process in 2 micro-batches. ddp: the same in 2 processes of one
    micro-batch (with activation checkpointing). resumed: steps 1-2 in this process (--stop-at 2: a
    DCP folder written by 1 process), steps 3-4 under FSDP2 in 2 processes."""
    d = tmp_path_factory.mktemp("finetune")
    p = lambda name: str(d / name)  # noqa: E731
    single = train_stage1.main(args(tiny, dataset, p("single"), "--grad-accum", "2"))
    train_stage1.main(args(tiny, dataset, p("resumed"), "--stop-at", "2", "--grad-accum", "2"))
    stopped = distributed.read_dcp_meta(p("resumed.dcp"))
    assert not os.path.exists(p("resumed")), "--stop-at saves the training state, not the export"
    launch = ["train_stage1.py", *args(tiny, dataset, p("ddp"), "--parallel", "ddp", "--activation-checkpointing"),
              "--then", "train_stage1.py", *args(tiny, dataset, p("resumed"), "--parallel", "fsdp", "--resume")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "tests/torchrun_runs.py", *launch], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return p, single, stopped, out.stdout


def history(folder):
    with open(os.path.join(folder, STATE_FILE)) as f:
        return json.load(f)["history"]


def assert_same_run(folder_a, folder_b):
    """Same loss parts at every step and the same exported weights (float tolerance)."""
    a, b = history(folder_a), history(folder_b)
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2, 3, 4]
    for ha, hb in zip(a, b):
        for key in ha:
            assert ha[key] == pytest.approx(hb[key], rel=1e-5), (key, ha, hb)
    index = lambda f: json.load(open(os.path.join(f, "model.safetensors.index.json")))["weight_map"]  # noqa: E731
    assert index(folder_a) == index(folder_b)
    for shard in sorted(set(index(folder_a).values())):
        wa, wb = load_file(os.path.join(folder_a, shard)), load_file(os.path.join(folder_b, shard))
        for key, weight in wa.items():
            torch.testing.assert_close(wb[key], weight, rtol=1e-3, atol=1e-4)  # Adam moves weights ~4e-2


def test_export_loads_back_with_the_in_memory_logits_and_captions(runs, tiny, dataset, capsys):
    import sample
    p, single, _, _ = runs
    folder = p("single")
    files = set(os.listdir(folder))
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", STATE_FILE} <= files
    assert "meta.json" not in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    with open(os.path.join(tiny[0], "config.json")) as f, open(os.path.join(folder, "config.json")) as g:
        assert json.load(f) == json.load(g)
    loaded, tokenizer = load_llada_v(folder)
    source, _ = load_llada_v(tiny[0])
    data = caption_data(tiny, dataset, loaded, tokenizer)
    batch = data.batch(0, 4, 0.25)
    rows = data.batch_rows(batch, batch.answers, slice(None))
    with torch.no_grad():
        ours, theirs, before = (m(rows.ids, images=rows.images, logits_from=rows.start)
                                for m in (single, loaded, source))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - before).abs().max() > 1e-2, "the export holds the trained weights, not the source's"
    # the tower trains at its own learning rate (1e-5 against 1e-2): Adam moves it about a
    # thousandth as far
    weights, start = dict(loaded.named_parameters()), dict(source.named_parameters())
    moved = lambda name: (weights[name] - start[name]).abs().max().item()  # noqa: E731
    for name in ("vision_tower.trunk.blocks.0.attn.qkv.weight", "vision_tower.trunk.pos_embed"):
        assert 0 < moved(name) <= 4 * 1e-5 * 1.01
    assert moved("mm_projector.0.weight") > 1e-2
    photo = os.path.join(os.path.dirname(dataset[0]), "images", "0.png")
    sample.main(["--ckpt", folder, "--image", photo, "--tokens-per-step", "4", "--gen-length", "8", "--device", "cpu"])
    assert "caption" in capsys.readouterr().out


def test_loss_falls_on_the_training_captions(runs, tiny, dataset):
    p, _, _, _ = runs
    source, tokenizer = load_llada_v(tiny[0])
    trained, _ = load_llada_v(p("single"))
    data = caption_data(tiny, dataset, source, tokenizer)
    before, after = eq1_loss(source, data), eq1_loss(trained, data)
    assert after < before - 1.0, (before, after)  # 14.0 -> 12.3 when written
    steps = history(p("single"))  # (the logged losses are too noisy to compare: 1/t weights, t ~ U(0, 1))
    assert any(h["hallucination"] > 0 for h in steps), "the ViCrit pair reached the hallucination term"


def test_ddp_two_processes_give_the_single_process_run_of_two_micro_batches(runs):
    p, _, _, stdout = runs
    assert_same_run(p("single"), p("ddp"))
    assert stdout.count("done: 4 steps") == 2, "rank 0 prints (both runs), rank 1 does not"


def test_stopped_in_one_process_and_resumed_under_fsdp_in_two_equals_the_uninterrupted_run(runs):
    p, _, stopped, stdout = runs
    assert (stopped["step"], stopped["written_by_processes"]) == (2, 1)
    assert distributed.read_dcp_meta(p("resumed.dcp"))["written_by_processes"] == 2
    assert "resumed " in stdout and "note:" not in stdout  # same settings: nothing to warn about
    assert_same_run(p("single"), p("resumed"))  # the export written from FSDP2 shards, gathered to rank 0


# ----------------------------------------------------------------------------------------------------------------
# Clear errors


def test_missing_image_and_bad_field_name_the_file_record_and_fix(tiny, dataset, tmp_path):
    data_json, _ = dataset
    records = json.load(open(data_json))
    broken = tmp_path / "broken.json"
    root = os.path.dirname(data_json)
    json.dump(records[:2] + [dict(records[2], image="images/gone.png")], open(broken, "w"))
    base = ["--init-from", tiny[0], "--data-json", str(broken), "--image-root", root, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"broken.json: record 2: image file .*gone.png not found.*--skip-missing"):
        train_stage1.main(base)
    json.dump(records[:1] + [{"image": "images/1.png", "conversation": []}], open(broken, "w"))
    with pytest.raises(SystemExit, match=r"broken.json: record 1: field 'conversations' is missing"):
        train_stage1.main(base)
    with pytest.raises(SystemExit, match=r"--init-from .*: no config.json"):
        train_stage1.main(["--init-from", str(tmp_path), "--data-json", str(broken)])
    cfg = TrainConfig(data_json=str(broken), image_root=root, skip_bad=True)
    captions, _ = load_captions(cfg, cfg.objective)
    assert len(captions) == 1
    with pytest.raises(SystemExit, match="--vicrit-jsonl / --vicrit-train-json feed Stage I"):
        train_stage1.main(base + ["--objective", "mask", "--vicrit-jsonl", dataset[1]])


# ----------------------------------------------------------------------------------------------------------------
# The memory plan and the optimizer options


def real_8b_config():
    from llada_v import config_from_hf
    from tests.test_llada_v import REAL_CONFIG
    return config_from_hf(REAL_CONFIG)


def test_memory_plan_of_the_real_8b_config_on_the_meta_device():
    config = real_8b_config()
    V, D, F, layers = 126349, 4096, 12288, 32
    n_lm = 2 * V * D + layers * (4 * D * D + 3 * D * F + 2 * D) + D
    Dv, Fv, used = 1152, 4304, 26  # SigLIP so400m/14, the 26 layers LLaDA-V runs
    n_tower = (3 * 14 * 14 * Dv + Dv) + 729 * Dv + used * (4 * Dv * Dv + 4 * Dv + 2 * Dv * Fv + Fv + Dv + 4 * Dv)
    n_rest = (Dv * D + D) + (D * D + D) + D  # projector, image_newline
    n_all = n_lm + n_tower + n_rest
    assert mp.parameter_counts(config) == (n_all, n_tower, 2 * V * D + D + n_rest)
    assert 8.4e9 < n_all < 8.5e9
    base = TrainConfig(batch_size=8, answer_len=128, vision_lr=1e-6, param_dtype="auto")
    plan = mp.memory_plan(config, base, 80 * mp.GIB)
    assert plan.parts["weights"] == 4 * n_all and plan.parts["compute copies"] == 2 * n_all
    assert plan.parts["gradients"] == 4 * n_all and plan.parts["optimizer states"] == 8 * n_all
    assert plan.seq_len == mp.TEXT_TOKENS + (729 + 40 * 55) + 128  # 640x480: 2 x 2 crops, 40 x 54 features kept
    assert plan.micro_batch == 8 and plan.parts["activations"] == 8 * plan.per_sample
    assert not plan.fits and plan.total > 18 * n_all  # float32 weights, gradients and Adam: 8.4 B x 18 bytes
    small = mp.memory_plan(config, dataclasses.replace(base, optimizer="adamw8bit", master_dtype="bfloat16",
                                                       activation_checkpointing=True, grad_accum=8), 80 * mp.GIB)
    assert small.parts["weights"] == small.parts["gradients"] == 2 * n_all and "compute copies" not in small.parts
    assert small.parts["optimizer states"] == int(n_all * (2 + 8 / 256))
    assert small.micro_batch == 1 and small.per_sample < plan.per_sample / 5  # checkpointing keeps block inputs
    assert small.fits, small.text()
    frozen = mp.memory_plan(config, dataclasses.replace(base, vision_lr=0.0), 80 * mp.GIB)
    assert frozen.parts["gradients"] == 4 * (n_all - n_tower) and frozen.per_sample < plan.per_sample
    sharded = mp.memory_plan(config, dataclasses.replace(base, parallel="fsdp"), 80 * mp.GIB, world=8)
    assert sharded.parts["weights"] == 4 * n_all // 8 and sharded.parts["optimizer states"] == 8 * n_all // 8
    assert sharded.micro_batch == 1 and "compute copies" not in sharded.parts
    fix = mp.fitting_flags(config, base, 80 * mp.GIB, 1)
    assert fix[:3] == ["--activation-checkpointing", "--optimizer adamw8bit", "--master-dtype bfloat16"]
    assert mp.fitting_flags(config, base, 10 * mp.GIB, 1) is None


def test_a_plan_that_does_not_fit_is_refused_before_loading_naming_the_flags(tiny, dataset, tmp_path):
    from llada_v import config_from_hf
    config = config_from_hf(json.load(open(os.path.join(tiny[0], "config.json"))))
    cfg = TrainConfig(batch_size=4, answer_len=20, param_dtype="float32")
    need = mp.memory_plan(config, cfg, 0, device_type="cpu").total
    lean = dataclasses.replace(cfg, activation_checkpointing=True, optimizer="adamw8bit", master_dtype="bfloat16")
    assert mp.memory_plan(config, lean, 0, device_type="cpu").total < need
    gib = (need + mp.memory_plan(config, lean, 0, device_type="cpu").total) / 2 / mp.GIB
    base = args(tiny, dataset, str(tmp_path / "o"), "--param-dtype", "float32", "--vision-lr", "1e-6",
                "--device-memory-gib", str(gib))
    with pytest.raises(SystemExit, match=r"memory plan: .* GiB per device, but cpu has .* GiB; add "
                                         r"--activation-checkpointing.*--ignore-memory-plan") as err:
        train_stage1.main(base)
    flags = str(err.value).split("; add ")[1].split(" (or")[0].split()
    fixed = parse_config(TrainConfig, base + flags)
    assert mp.memory_plan(config, fixed, gib * mp.GIB, device_type="cpu").fits
    with pytest.raises(SystemExit, match="--master-dtype bfloat16 needs --optimizer adamw8bit"):
        train_stage1.main(base + ["--master-dtype", "bfloat16"])


@pytest.mark.parametrize("flags", [["--optimizer", "adamw8bit"],
                                   ["--optimizer", "adamw8bit", "--master-dtype", "bfloat16"]])
def test_each_optimizer_option_trains_the_tiny_model_on_cpu(tiny, dataset, tmp_path, flags):
    """torchao's AdamW8bit (8-bit states; with bf16 weights, stochastic rounding). Its step is
    compiled with torch.compile, which takes minutes on a small CPU: the test runs the same code
    eagerly. torch AdamW (float32) is the run of the fixture above."""
    pytest.importorskip("torchao")
    out = str(tmp_path / "o")
    with torch.compiler.set_stance("force_eager"):
        model = train_stage1.main(args(tiny, dataset, out, "--steps", "2", "--batch-size", "2", *flags))
    steps = history(out)
    assert [h["step"] for h in steps] == [1, 2] and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in steps)
    dtype = torch.bfloat16 if "bfloat16" in flags else torch.float32
    assert model.lm.lm_head.weight.dtype == dtype
    source, _ = load_llada_v(tiny[0])
    moved = (model.lm.lm_head.weight.float() - source.lm.lm_head.weight).abs().max().item()
    assert moved > 1e-3, "lr 1e-2 for 2 steps moves the weights"
    meta = distributed.read_dcp_meta(out + ".dcp")
    assert meta["train_config"]["optimizer"] == "adamw8bit" and meta["step"] == 2


def test_a_saved_adamw8bit_state_loads_back_on_resume(tiny, dataset, tmp_path):
    """--optimizer adamw8bit: a run stopped after step 1 and resumed ends as the uninterrupted one,
    which it only can with torchao's 8-bit Adam states (and tensor learning rates) read back from
    OUT.dcp: a fresh optimizer would take other steps."""
    pytest.importorskip("torchao")
    flags = ["--steps", "2", "--batch-size", "2", "--optimizer", "adamw8bit"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "resumed")
    with torch.compiler.set_stance("force_eager"):
        uninterrupted = train_stage1.main(args(tiny, dataset, whole, *flags))
        train_stage1.main(args(tiny, dataset, part, *flags, "--stop-at", "1"))
        resumed = train_stage1.main(args(tiny, dataset, part, *flags, "--resume"))
    a, b = history(whole), history(part)
    assert [h["step"] for h in b] == [1, 2]
    for ha, hb in zip(a, b):
        assert ha == pytest.approx(hb, rel=1e-5), (ha, hb)
    for name, weight in uninterrupted.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], weight)


def test_revise_records_and_vicrit_train_become_hallucination_pairs(tiny, dataset, tmp_path):
    """ReDiff's records with "revise" corrections never train as captions as written; ViCrit-Train
    pairs are kept when both captions and both solutions have the same token count under the model's
    tokenizer."""
    data_json, _ = dataset
    root = os.path.dirname(data_json)
    records = json.load(open(data_json))
    wrong = dict(records[0], conversations=[records[0]["conversations"][0],
                                            {"from": "gpt", "value": "a teal picture."}],
                 revise=[{"org": "teal", "target": "red"}])
    json.dump(records + [wrong], open(tmp_path / "rediff.json", "w"))
    model, tokenizer = load_llada_v(tiny[0])
    same = lambda a, b: len(tokenizer.encode(a)) == len(tokenizer.encode(b))  # noqa: E731
    assert same("the xkq box.", "the qkx box.") and not same("the red box.", "the xkqzvj box.")
    vicrit = [{"image": "images/0.png", "problem": "<image>\nDescribe the image.", "original_caption": o,
               "changed_caption": c, "solution_original": so, "solution_target": st}
              for o, c, so, st in (("the xkq box.", "the qkx box.", "xkq", "qkx"),
                                   ("the red box.", "the xkqzvj box.", "red", "xkqzvj"))]
    json.dump(vicrit, open(tmp_path / "vicrit_train.json", "w"))
    cfg = TrainConfig(init_from=tiny[0], data_json=str(tmp_path / "rediff.json"), image_root=root,
                          vicrit_train_json=str(tmp_path / "vicrit_train.json"), answer_len=20)
    captions, pairs = load_captions(cfg, cfg.objective)
    assert len(captions) == len(records) and all("teal" not in c["caption"] for c in captions)
    assert [(p["wrong"], p["caption"]) for p in pairs[:1]] == [("a teal picture.", "a red picture.")]
    data = CaptionData(captions, pairs, model, tokenizer, 20, 0)
    assert [p["wrong"] for p in data.pairs] == ["a teal picture.", "the qkx box."]
    assert data.stats["pairs_dropped_token_counts_differ"] == 1
    masked, _ = load_captions(dataclasses.replace(cfg, vicrit_train_json=""), "mask")
    assert masked[-1]["caption"] == "a red picture." and "wrong" not in masked[-1]
