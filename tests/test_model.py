"""tests/test_model.py: the model's invariants, checkpoints, and the scripts end to end on a few steps."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rediff
import shapes_train
from model import LLADA_8B, LLaDA, LMConfig, VisionConfig, VLM, VLMConfig
from checkpoints import load_checkpoint, read_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vlm(vocab=20, image_token_id=4):
    torch.manual_seed(0)
    cfg = VLMConfig(lm=LMConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64),
                    vision=VisionConfig(image_size=48, patch_size=16, width=32, layers=1, heads=2),
                    image_token_id=image_token_id)
    return VLM(cfg)


def test_attention_is_bidirectional():
    model = tiny_vlm()
    ids = torch.randint(5, 20, (1, 10))
    changed = ids.clone()
    changed[0, -1] = 5 if ids[0, -1] != 5 else 6
    a, b = model(ids), model(changed)
    assert not torch.allclose(a[0, 0], b[0, 0]), "a later token must change an earlier position's logits"


def test_image_tokens_are_spliced_at_placeholders():
    model = tiny_vlm()
    images = torch.randn(2, 3, 48, 48)
    embeds = model.encode_images(images)                               # (2, 9, 32)
    ids = torch.tensor([[4] * 9 + [7, 8]] * 2)
    with_image = model(ids, embeds)
    other = model(ids, model.encode_images(torch.randn(2, 3, 48, 48)))
    assert not torch.allclose(with_image, other), "the image must reach the logits"
    no_placeholders = torch.tensor([[9] * 9 + [7, 8]] * 2)
    assert torch.allclose(model(no_placeholders, embeds), model(no_placeholders)), "no placeholder, no image"


def test_grouped_kv_heads_and_llada_8b_shapes():
    lm = LLaDA(LMConfig(vocab_size=30, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden=48))
    assert lm(torch.randn(2, 5, 32)).shape == (2, 5, 30)
    with torch.device("meta"):
        big = LLaDA(LLADA_8B)
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096
    expected = 2 * 126464 * 4096 + 32 * per_layer + 4096
    assert sum(p.numel() for p in big.parameters()) == expected


def test_tiny_model_overfits_one_batch():
    """Eq. 1 alone must let a small model memorise 4 random sequences (the answer given the first 4 tokens)."""
    model = tiny_vlm()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 20, (4, 12), generator=g)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 4:] = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(600):
        noisy, masked, p = rediff.forward_mask(ids, answer, 1, generator=g)
        loss = rediff.masked_diffusion_loss(model(noisy), ids, masked, p, answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = rediff.generate(model, ids[:, :4], gen_length=8, steps=8, mask_id=1)       # (4, 8)
    accuracy = (out == ids[:, 4:]).float().mean()
    assert accuracy >= 0.9, f"a tiny model must memorise 4 sequences, got accuracy {accuracy:.2f}"


def test_checkpoint_round_trip_rebuilds_from_saved_config(tmp_path):
    model = tiny_vlm(vocab=23, image_token_id=3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 23, (1, 5))).sum().backward()
    optimizer.step()
    path = str(tmp_path / "ck.safetensors")
    save_checkpoint(path, model, {"tokenizer": {"kind": "word", "words": []}, "stage": "test", "step": 7}, optimizer)
    assert [f for f in os.listdir(tmp_path)] == ["ck.safetensors"], "no temporary file is left behind"
    loaded, meta = load_checkpoint(path)
    assert loaded.cfg == model.cfg and meta["step"] == 7 and meta["stage"] == "test"
    ids = torch.randint(0, 23, (2, 6))
    assert torch.equal(loaded(ids), model(ids))
    fresh = torch.optim.AdamW(loaded.parameters())
    load_checkpoint(path, optimizer=fresh)
    for a, b in zip(optimizer.state.values(), fresh.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_attribute_features_are_class_probabilities_and_cells(tmp_path):
    """image_features "attributes": the projector reads per-group softmax probabilities plus a one-hot cell scaled by
    the cell's probability of holding an object; the
    attribute head is part of the checkpoint; train_stage1 trains it with the tower, then freezes both."""
    import shapes_aids
    torch.manual_seed(0)
    cfg = VLMConfig(lm=LMConfig(vocab_size=20, d_model=32, n_layers=1, n_heads=4, mlp_hidden=64),
                    vision=VisionConfig(image_size=48, patch_size=16, width=32, layers=1, heads=2),
                    image_features="attributes", attribute_classes=shapes_aids.attribute_classes())
    model = VLM(cfg)
    images = torch.randn(2, 3, 48, 48)
    head_logits = model.attribute_head(model.vision_tower(images))                   # (2, 9, 16)
    probs = shapes_aids.attribute_probs(head_logits, cfg.attribute_classes)           # (2, 9, 16)
    assert probs.shape == (2, 9, sum(cfg.attribute_classes))
    for group in probs.split(cfg.attribute_classes, dim=-1):
        assert torch.allclose(group.sum(-1), torch.ones(2, 9))
    empty = (probs[..., 0] + probs[..., 6] + probs[..., 13]) / 3                       # class 0 of each group
    inputs = torch.cat([probs, torch.eye(9) * (1 - empty)[..., None]], dim=-1)        # occupancy-scaled cells
    assert torch.allclose(model.encode_images(images), model.mm_projector(inputs))
    path = str(tmp_path / "attr.safetensors")
    save_checkpoint(path, model, {"stage": "test", "step": 0})
    loaded, _ = load_checkpoint(path)
    assert loaded.cfg == cfg and torch.equal(loaded.attribute_head.weight, model.attribute_head.weight)
    with pytest.raises(ValueError, match="attribute_classes"):
        VLM(VLMConfig(lm=cfg.lm, vision=cfg.vision, image_features="attributes"))
    with pytest.raises(ValueError, match="patches"):
        VLM(VLMConfig(lm=cfg.lm, vision=cfg.vision, image_features="pixels"))

    from data import shapes
    from data.pipeline import ShapesData
    from data.tokenizer import WordTokenizer
    data = ShapesData(WordTokenizer.for_shapes_world(), shapes.WorldConfig(), "train", 16, 9, 64, 0)
    before = model.attribute_head.weight.clone()
    shapes_aids.pretrain_vision(model, data, 2, 4, "cpu", 0)
    assert not torch.equal(before, model.attribute_head.weight), "vision pretraining trains the model's own head"
    shapes_train.freeze_vision(model)
    assert not any(p.requires_grad for p in model.attribute_head.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.mm_projector.parameters())


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "missing.safetensors"))
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_checkpoint(str(torn))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no 'rediff' metadata"):
        read_checkpoint(str(tmp_path / "foreign.safetensors"))


SCRIPTS = ["train_stage1.py", "sample.py", "tools/eval.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_script(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--device" in out.stdout or script == "tools/eval.py"


def run(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_tiny_smoke_run_train_sample_eval(tmp_path):
    """A few steps of each objective, then sample.py (trace, draft, HTML) and tools/eval.py (JSON
    contract)."""
    base, stage1 = str(tmp_path / "base.safetensors"), str(tmp_path / "stage1.safetensors")
    small = ["--tiny", "--steps", "4", "--eval-every", "2", "--n-scenes", "64", "--vision-pretrain-steps", "2",
             "--batch-size", "8"]
    run(["train_stage1.py", *small, "--objective", "mask", "--mask-loss", "balanced", "--out", base])
    assert read_checkpoint(base)[1]["train_config"]["mask_loss"] == "balanced"
    out = run(["train_stage1.py", *small, "--objective", "revision", "--init-from", base, "--out", stage1])
    assert "loaded" in out
    _, meta = read_checkpoint(stage1)
    assert meta["stage"] == "stage1-revision" and meta["step"] == 4 and meta["train_config"]["objective"] == "revision"
    html = str(tmp_path / "trace.html")
    out = run(["sample.py", "--ckpt", stage1, "--scene-seed", "3", "--tokens-per-step", "8", "--trace",
               "--trace-out", html, "--draft", "there is a small red circle"])
    assert "caption" in out and "forward passes" in out and "score" in out
    assert open(html).read().startswith("<!doctype html>")
    report = str(tmp_path / "eval.json")
    run(["tools/eval.py", "--ckpt", stage1, "--tokens-per-step", "1", "8", "--both", "--n", "6",
         "--json", report])
    results = json.load(open(report))["results"]
    assert len(results) == 4
    for r in results:
        assert {"ckpt", "tokens_per_step", "refine", "headline", "factuality", "coverage", "syntax", "repetition",
                "forward_passes"} <= set(r)
    answer_len = meta["answer_len"]                                                    # the --tiny preset's 48
    assert {r["forward_passes"] for r in results if r["tokens_per_step"] == 8} == {answer_len / 8}
    assert all(r["revisions"] == 0 for r in results if not r["refine"]), "the frozen sampler never revises"
    assert all(r["revisions"] >= 0 for r in results)
    assert all(0 <= r["caption_steps"] <= r["forward_passes"] for r in results)
    assert os.path.exists(str(tmp_path / "eval.png")) and os.path.exists(str(tmp_path / "eval.md"))
    blocks = str(tmp_path / "blocks.json")
    run(["tools/eval.py", "--ckpt", stage1, "--tokens-per-step", "8", "--block-length", "16",
         "--n", "6", "--json", blocks])
    (row,) = json.load(open(blocks))["results"]
    # answer_len / 16 blocks of 2 steps; end-of-text stopping may end the batch after any whole block
    assert row["block_length"] == 16 and row["forward_passes"] in range(2, answer_len // 8 + 1, 2)
    assert 0 <= row["words"] <= answer_len
    bad = subprocess.run([sys.executable, "tools/eval.py", "--ckpt", stage1, "--block-length", "10",
                          "--n", "2"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"))
    assert bad.returncode != 0 and "--block-length 10 must divide" in bad.stderr


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """A Stage I run stopped at step 2 and resumed to step 4 logs the same losses as one run of 4
    steps (the --tiny model's shape, without --tiny's two phases)."""
    small = ["--d-model", "96", "--n-layers", "4", "--n-heads", "4", "--answer-len", "48",
             "--image-features", "attributes", "--objective", "revision", "--eval-every", "2",
             "--n-scenes", "32", "--vision-pretrain-steps", "2", "--batch-size", "4"]
    whole, parted = str(tmp_path / "whole.safetensors"), str(tmp_path / "parted.safetensors")
    run(["train_stage1.py", *small, "--steps", "4", "--out", whole])
    run(["train_stage1.py", *small, "--steps", "4", "--out", parted, "--stop-at", "2"])
    assert read_checkpoint(parted)[1]["step"] == 2
    run(["train_stage1.py", *small, "--steps", "4", "--out", parted, "--resume"])
    a, b = read_checkpoint(whole)[1]["history"], read_checkpoint(parted)[1]["history"]
    assert [h["step"] for h in a] == [h["step"] for h in b] == [2, 4]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
