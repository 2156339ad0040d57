"""tests/test_finetune_llada_v.py: finetune_llada_v.py on the tiny real-format LLaDA-V folder of tests/test_llada_v.py
and a generated LLaVA-format caption set (images of several aspect ratios, ViCrit pairs): batches (placeholders, right
padding, answer mask), gradients reach the projector and not the frozen tower, the loss falls, the exported folder
loads back with the in-memory logits, 2-process DDP and FSDP2 (gloo) give the single-process losses and weights, a
run stopped in 2 processes and resumed in 1 ends as the uninterrupted run, and bad data stops with a clear error."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import distributed
import finetune_llada_v as ft
import rediff
from llada_v import EOS_ID, EOT_ID, IMAGE_TOKEN_INDEX, load_llada_v
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
    return ["--hf-model", tiny[0], "--data-json", data_json, "--vicrit-jsonl", pairs, "--answer-len", "20",
            "--batch-size", "4", "--steps", "4", "--lr", "1e-2", "--warmup-frac", "0", "--save-dtype", "float32",
            "--shard-gb", "0.01", "--hallucination-frac", "0.25", "--device", "cpu", "--out", out, *extra]


def eq1_loss(model, data, step=0):
    """Eq. 1 on a fixed batch with fixed masks: comparable between models."""
    batch = data.batch(step, 8, slice(None))
    generator = torch.Generator().manual_seed(123)
    cfg = ft.FinetuneConfig(objective="mask", answer_len=20)
    with torch.no_grad():
        return ft.training_loss(model, batch, cfg, distributed.Context(), None, generator)[0].item()


def caption_data(tiny, dataset, model, tokenizer, **overrides):
    cfg = ft.FinetuneConfig(hf_model=tiny[0], data_json=dataset[0], vicrit_jsonl=dataset[1], answer_len=20,
                            **overrides)
    captions, pairs = ft.load_data(cfg)
    return ft.CaptionData(captions, pairs, model, tokenizer, cfg)

# ----------------------------------------------------------------------------------------------------------------


def test_batches_pad_rows_on_the_right_and_mark_the_answer(tiny, dataset):
    model, tokenizer = load_llada_v(tiny[0])
    data = caption_data(tiny, dataset, model, tokenizer, hallucination_frac=0.25)
    assert len(data.pairs) == 1 and data.stats["pairs_dropped_token_counts_differ"] == 1
    batch = data.batch(0, 8, slice(4, 8))  # a second rank's half of a global batch of 8
    records = data.records(0, 8)
    counts = [model.n_image_tokens(Image.open(r["image_path"]).size) for r in records]
    assert len(set(counts)) > 1, "the rows must differ in image-token count for this test to mean anything"
    for b, r in enumerate(records):
        row, answer = batch.ids[b], batch.answer_mask[b]
        assert (row == IMAGE_TOKEN_INDEX).sum() == counts[b]
        start = int(answer.nonzero()[0])
        assert answer.sum() == 20 and answer[start:start + 20].all()
        caption = tokenizer.encode(r["caption"])
        if len(caption) >= 20:  # the long caption is cut, with no end of turn
            assert row[start:start + 20].tolist() == caption[:20] and (row[start + 20:] == EOS_ID).all()
            continue
        assert row[start:start + len(caption)].tolist() == caption
        assert row[start + len(caption)] == EOT_ID and (row[start + len(caption) + 1:] == EOS_ID).all()
    starts = [int(m.nonzero()[0]) for m in batch.answer_mask]                      # prompt lengths
    assert batch.start == min(starts) and batch.ids.shape[1] == max(starts) + 20  # padded to the longest row
    cut = sum(len(tokenizer.encode(r["caption"])) >= 20 for r in records[:6])
    assert data.stats["captions_cut"] == cut
    assert data.answer(list(range(25))) == list(range(20)) and data.stats["captions_cut"] == cut + 1
    assert 8 - round(0.25 * 8) == sum(not r.get("wrong_ids") for r in records), "2 of 8 rows are ViCrit pairs"
    assert batch.wrong_span.any() and not (batch.wrong_span & ~batch.answer_mask).any()
    assert batch.sizes == [Image.open(r["image_path"]).size for r in records[4:]]  # this rank's images only
    assert batch.views.shape[0] == sum(1 + model.image_layout(s).rows * model.image_layout(s).cols
                                       for s in batch.sizes)


def test_gradients_reach_projector_and_language_model_not_the_frozen_tower(tiny, dataset):
    model, tokenizer = load_llada_v(tiny[0])
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    data = caption_data(tiny, dataset, model, tokenizer)
    batch = data.batch(0, 4, slice(None))
    cfg = ft.FinetuneConfig(answer_len=20)
    ordinary = torch.arange(300)
    loss, parts = ft.training_loss(model, batch, cfg, distributed.Context(), ordinary, torch.Generator().manual_seed(0))
    loss.backward()
    assert set(parts) == set(rediff.TYPE_NAMES.values()) and parts["mask"] > 0
    for p in (model.mm_projector[0].weight, model.mm_projector[2].bias, model.image_newline, model.lm.lm_head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision_tower.parameters())
    # the batched, differentiable encode gives encode_image's tokens, image by image
    tokens = model.embed_views(batch.views, batch.sizes)                                # (B, N, D)
    for b in range(len(batch.sizes)):
        image = Image.open(data.records(0, 4)[b]["image_path"]).convert("RGB")
        alone = model.encode_image(image)[0]
        torch.testing.assert_close(tokens[b, :len(alone)], alone)


# ----------------------------------------------------------------------------------------------------------------
# Real runs: the single-process ones in this process, the 2-process ones in one torchrun launch


@pytest.fixture(scope="module")
def runs(tiny, dataset, tmp_path_factory):
    """single: 4 steps in this process. ddp: the same in 2 processes (with activation checkpointing). resumed: steps
    1-2 in this process (--stop-at 2: a DCP folder written by 1 process), steps 3-4 under FSDP2 in 2 processes."""
    d = tmp_path_factory.mktemp("finetune")
    p = lambda name: str(d / name)  # noqa: E731
    single = ft.main(args(tiny, dataset, p("single")))
    ft.main(args(tiny, dataset, p("resumed"), "--stop-at", "2"))
    stopped = distributed.read_dcp_meta(p("resumed.dcp"))
    assert not os.path.exists(p("resumed")), "--stop-at saves the training state, not the export"
    launch = ["finetune_llada_v.py", *args(tiny, dataset, p("ddp"), "--parallel", "ddp", "--activation-checkpointing"),
              "--then", "finetune_llada_v.py", *args(tiny, dataset, p("resumed"), "--parallel", "fsdp", "--resume")]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "tests/torchrun_runs.py", *launch], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return p, single, stopped, out.stdout


def history(folder):
    with open(os.path.join(folder, ft.STATE_FILE)) as f:
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
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json", ft.STATE_FILE} <= files
    assert "meta.json" not in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    with open(os.path.join(tiny[0], "config.json")) as f, open(os.path.join(folder, "config.json")) as g:
        assert json.load(f) == json.load(g)
    loaded, tokenizer = load_llada_v(folder)
    source, _ = load_llada_v(tiny[0])
    data = caption_data(tiny, dataset, loaded, tokenizer)
    batch = data.batch(0, 4, slice(None))
    with torch.no_grad():
        ours, theirs, before = (m(batch.ids, views=batch.views, image_sizes=batch.sizes, logits_from=batch.start)
                                for m in (single, loaded, source))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (theirs - before).abs().max() > 1e-2, "the export holds the trained weights, not the source's"
    for name in ("vision_tower.trunk.blocks.0.attn.qkv.weight", "vision_tower.trunk.pos_embed"):  # frozen: unchanged
        assert torch.equal(dict(loaded.named_parameters())[name], dict(source.named_parameters())[name])
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


def test_ddp_two_processes_give_the_single_process_run(runs):
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
    base = ["--hf-model", tiny[0], "--data-json", str(broken), "--image-root", root, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"broken.json: record 2: image file .*gone.png not found.*--skip-missing"):
        ft.main(base)
    json.dump(records[:1] + [{"image": "images/1.png", "conversation": []}], open(broken, "w"))
    with pytest.raises(SystemExit, match=r"broken.json: record 1: field 'conversations' is missing"):
        ft.main(base)
    with pytest.raises(SystemExit, match=r"--hf-model .*: no config.json"):
        ft.main(["--hf-model", str(tmp_path), "--data-json", str(broken)])
    cfg = ft.FinetuneConfig(data_json=str(broken), image_root=root, skip_bad=True)
    captions, _ = ft.load_data(cfg)
    assert len(captions) == 1
    with pytest.raises(SystemExit, match="--vicrit-jsonl feeds Stage I"):
        ft.main(base + ["--objective", "mask", "--vicrit-jsonl", dataset[1]])
