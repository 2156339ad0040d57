"""tests/test_llada_v.py: the real-weights loader on a tiny checkpoint folder in the exact real format (real key names,
two shards + index, config.json field names, a tokenizer.json with the real special ids), checked against
transformers' Llama and SigLIP on the same random weights; anyres against hand-computed values; the full-size
model on the meta device. CPU only, nothing downloaded."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llada_v
import sample
from cli import run_main
from llada_v import (BOS_ID, EOT_ID, IMAGE_TOKEN_INDEX, MASK_ID, SAMPLER_BANNED_IDS,
                     CheckpointMismatch, LLaDAV, anyres_crops, anyres_layout, caption, chat_prompt,
                     config_from_hf, load_llada_v, merge_anyres_features, parse_grid_pinpoints,
                     prompt_ids)
from model import LLADA_8B, LLaDA

transformers = pytest.importorskip("transformers")  # test-only dependency (requirements.txt)

VOCAB = EOT_ID + 1   # 126349: the LLaDA tokenizer's size, and the vocab_size of the published ReDiff config.json
TINY = dict(hidden=32, mlp=64, layers=2, heads=4, kv_heads=2,                       # LM (grouped KV heads)
            v_hidden=32, v_mlp=48, v_layers=3, v_heads=4, image=28, patch=14)       # SigLIP: 2 x 2 patches a crop

# The published LLaDA-V / ReDiff config.json, as far as this loader reads it (a ReDiff-derived config.json on GitHub:
# "architectures": ["LlavaLLaDAModelLM"], vocab_size 126349, siglip2-so400m-patch14-384, mlp2x_gelu, select layer -2).
REAL_CONFIG = {
    "architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 12288, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": None, "attention_bias": False,
    "tie_word_embeddings": False, "vocab_size": VOCAB, "mm_hidden_size": 1152, "mm_projector_type": "mlp2x_gelu",
    "mm_vision_tower": "google/siglip2-so400m-patch14-384", "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "mm_patch_merge_type": "spatial_unpad", "mm_newline_position": "grid",
    "image_aspect_ratio": "anyres_max_4", "image_grid_pinpoints": "(1x1),...,(6x6)", "torch_dtype": "bfloat16"}


# ----------------------------------------------------------------------------------------------------------------
# The tiny checkpoint folder


def write_tokenizer(path):
    """A byte-level BPE tokenizer.json whose vocabulary runs to the real size, with the real special tokens at their
    real ids (the gaps hold reserved tokens, as in LLaDA's own vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ["a cat sits on a red mat.", chat_prompt(), "the image shows two dogs in the park."]
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    specials = {i: text for text, i in llada_v.SPECIAL_TOKENS.items()}
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), VOCAB):
        vocab[specials.get(i, f"<|reserved_token_{i}|>")] = i
    spec["added_tokens"] = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, text in sorted(specials.items())]
    with open(path, "w") as f:
        json.dump(spec, f)


def randomize(module, scale=0.2):
    """Random weights everywhere (norm gains around 1), so that no parameter can be silently skipped."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn_like(p))


def write_shards(folder, tensors, second_shard_keys):
    """Two shards and the index that lists them, as the Hugging Face writer lays them out."""
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = [{k: v.contiguous() for k, v in tensors.items() if k not in second_shard_keys},
             {k: v.contiguous() for k, v in tensors.items() if k in second_shard_keys}]
    weight_map = {}
    for name, part in zip(names, parts):
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("llada_v_tiny")))


def build_tiny(folder: str):
    """(folder, llama, siglip): a LLaDA-V folder whose LM is a transformers Llama and whose tower is a transformers
    SigLIP, as LLaDA-V saves them (the tower's last layer and pooling head dropped, its post-layernorm kept), written
    into the existing `folder` (also used by workshop/ex6_scale.py)."""
    torch.manual_seed(0)
    t = TINY
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=t["hidden"], intermediate_size=t["mlp"], num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=4096)).eval()
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=t["v_hidden"], intermediate_size=t["v_mlp"], num_hidden_layers=t["v_layers"],
        num_attention_heads=t["v_heads"], image_size=t["image"], patch_size=t["patch"])).eval()
    randomize(llama, 0.05)
    randomize(siglip)
    tensors = dict(llama.state_dict())
    for key, value in siglip.state_dict().items():
        key = key.removeprefix("vision_model.")
        if key.startswith("head.") or key.startswith(f"encoder.layers.{t['v_layers'] - 1}."):
            continue  # LLaVA deletes the last layer and replaces the head by Identity before saving
        tensors[llada_v.VISION_PREFIX + key] = value
    tensors.update({"model.mm_projector.0.weight": 0.2 * torch.randn(t["hidden"], t["v_hidden"]),
                    "model.mm_projector.0.bias": 0.2 * torch.randn(t["hidden"]),
                    "model.mm_projector.2.weight": 0.2 * torch.randn(t["hidden"], t["hidden"]),
                    "model.mm_projector.2.bias": 0.2 * torch.randn(t["hidden"]),
                    "model.image_newline": torch.randn(t["hidden"])})
    q0 = llada_v.VISION_PREFIX + "encoder.layers.0.self_attn.q_proj.weight"
    second = {k for k in tensors if not k.startswith(("model.layers", "model.embed"))} - {q0}  # q apart from k and v
    write_shards(folder, tensors, second)
    config = dict(REAL_CONFIG, hidden_size=t["hidden"], intermediate_size=t["mlp"], num_hidden_layers=t["layers"],
                  num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"], mm_hidden_size=t["v_hidden"],
                  vision_config={"hidden_size": t["v_hidden"], "intermediate_size": t["v_mlp"],
                                 "num_hidden_layers": t["v_layers"], "num_attention_heads": t["v_heads"],
                                 "image_size": t["image"], "patch_size": t["patch"]})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer(os.path.join(folder, "tokenizer.json"))
    return folder, llama, siglip


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_llada_v(tiny[0])


# ----------------------------------------------------------------------------------------------------------------
# Parity with independent implementations


def llama_logits(llama, ids):
    """transformers' Llama with a (1, 1, L, L) all-True mask: every token sees every token, as in LLaDA."""
    full = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        return llama(input_ids=ids, attention_mask=full).logits


def test_lm_matches_transformers_llama_without_causal_mask(tiny, loaded):
    _, llama, _ = tiny
    model, _ = loaded
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        ours = model(ids)                                                     # (1, L, V)
    assert ours.shape == (1, 24, VOCAB)
    assert (ours - llama_logits(llama, ids)).abs().max().item() <= 1e-4


def test_vision_tower_matches_transformers_siglip_penultimate_layer(tiny, loaded):
    _, _, siglip = tiny
    model, _ = loaded
    images = torch.randn(2, 3, TINY["image"], TINY["image"])
    with torch.no_grad():
        ours = model.vision_tower(images)                                     # (2, g^2, Dv)
        ref = siglip(pixel_values=images, output_hidden_states=True).hidden_states[-2]  # before post-layernorm
    assert ours.shape == ref.shape == (2, 4, TINY["v_hidden"])
    assert (ours - ref).abs().max().item() <= 1e-4


def test_original_llada_names_load_into_the_same_model(tiny, tmp_path):
    """The original LLaDA-8B layout (model.transformer.*, OLMo config names), text only, one file."""
    _, llama, _ = tiny
    rename = {v: k for k, v in llada_v.LLADA_LAYER_NAMES.items()}
    tensors = {"model.transformer.wte.weight": llama.model.embed_tokens.weight,
               "model.transformer.ln_f.weight": llama.model.norm.weight,
               "model.transformer.ff_out.weight": llama.lm_head.weight}
    for key, value in llama.model.layers.state_dict().items():
        i, name = key.split(".", 1)
        tensors[f"model.transformer.blocks.{i}.{rename[name]}"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    t = TINY
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": t["hidden"],
                   "n_layers": t["layers"], "n_heads": t["heads"], "n_kv_heads": t["kv_heads"],
                   "mlp_hidden_size": t["mlp"],
                   "vocab_size": VOCAB, "embedding_size": VOCAB, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                   "weight_tying": False, "include_bias": False, "mask_token_id": MASK_ID}, f)
    shutil.copy(os.path.join(tiny[0], "tokenizer.json"), tmp_path / "tokenizer.json")
    model, _ = load_llada_v(str(tmp_path))
    assert model.cfg.vision is None and not hasattr(model, "vision_tower")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (model(ids) - llama_logits(llama, ids)).abs().max().item() <= 1e-4


def test_every_bad_key_is_listed_in_one_error(tiny, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny[0], folder)
    first = str(folder / "model-00001-of-00002.safetensors")
    second = str(folder / "model-00002-of-00002.safetensors")
    a, b = load_file(first), load_file(second)
    del a["model.layers.1.mlp.up_proj.weight"]                                # missing
    a["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)               # unexpected
    b["model.mm_projector.0.bias"] = torch.zeros(7)                           # mis-shaped
    save_file(a, first)
    save_file(b, second)
    with pytest.raises(CheckpointMismatch) as err:
        load_llada_v(str(folder))
    message = str(err.value)
    for expected in ("1 missing", "model.layers.1.mlp.up_proj.weight",
                     "1 unexpected", "model.layers.0.self_attn.extra.weight",
                     "1 mis-shaped", "model.mm_projector.0.bias: checkpoint [7], model [32]"):
        assert expected in message
    # the deliberately unused keys (SigLIP's post-layernorm) are not reported
    assert "post_layernorm" not in message


def test_tokenizer_special_ids_and_prompt(loaded):
    _, tokenizer = loaded
    ids = prompt_ids(tokenizer, 5)
    assert ids[0] == BOS_ID and ids.count(IMAGE_TOKEN_INDEX) == 5 and ids.count(EOT_ID) == 2
    assert tokenizer.decode(tokenizer.encode("a cat sits")) == "a cat sits"
    assert {BOS_ID, MASK_ID, EOT_ID} <= set(tokenizer.special_ids)
    assert tokenizer.encode("<|mdm_mask|>") == [MASK_ID]


# ----------------------------------------------------------------------------------------------------------------
# anyres


# (width, height) -> (crops across, crops down, unpad window, (H, W) after downsampling, tokens), by hand:
# e.g. 1920 x 1080: the smallest canvas that holds every pixel is 1920 x 1152 = 5 x 3 crops -> an 81 x 135 feature
# grid; the image fills int(1080 * 135 / 1920) = 75 rows, (81 - 75) // 2 = 3 padded rows above; 75 x 135 = 10125
# features > 1.1^2 x 4 x 729, so times = sqrt(10125 / 2916) = 1.863 -> 40 x 72; tokens 729 + 40 x (72 + 1) = 3649.
HAND = {(640, 480): (2, 2, (7, 47, 0, 54), (40, 54), 729 + 40 * 55),
        (384, 384): (1, 1, (0, 27, 0, 27), (27, 27), 729 + 27 * 28),
        (1920, 1080): (5, 3, (3, 78, 0, 135), (40, 72), 729 + 40 * 73),
        (300, 1000): (1, 3, (0, 81, 1, 26), (81, 25), 729 + 81 * 26),   # (27 - 24) // 2 = 1 column cut on each side
        (100, 50): (1, 1, (7, 20, 0, 27), (13, 27), 729 + 13 * 28),     # small images still get the 1 x 1 grid
        (4000, 3000): (6, 5, (7, 128, 0, 162), (46, 62), 729 + 46 * 63)}


@pytest.mark.parametrize("size", list(HAND))
def test_anyres_grid_and_token_count_match_hand_computation(size):
    layout = anyres_layout(size, parse_grid_pinpoints("(1x1),...,(6x6)", 384), crop_size=384, grid=27, max_crops=4)
    assert (layout.cols, layout.rows, layout.window, layout.size, layout.tokens) == HAND[size]


def test_grid_pinpoints_parse_in_llava_order():
    pins = parse_grid_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pins) == 36 and pins[:2] == [(384, 384), (384, 768)] and pins[-1] == (2304, 2304)
    assert parse_grid_pinpoints([[384, 768], [768, 384]], 384) == [(384, 768), (768, 384)]


def test_merge_stitches_crops_row_by_row_and_adds_newlines():
    """640 x 480 (2 x 2 crops, no downsampling): every kept feature must come from the right crop and position."""
    g, size = 27, (640, 480)
    layout = anyres_layout(size, parse_grid_pinpoints("(1x1),...,(6x6)", 384))
    feats = torch.zeros(1 + 4, g * g, 3)                                      # channel 0 crop, 1 row, 2 column
    for crop in range(4):
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        feats[1 + crop] = torch.stack([torch.full((g, g), float(crop)), rows.float(), cols.float()], -1).view(g * g, 3)
    newline = torch.tensor([-1.0, -1.0, -1.0])
    out = merge_anyres_features(feats, layout, newline)                 # (N, 3)
    assert out.shape == (layout.tokens, 3)
    H, W = layout.size
    grid = out[g * g:].view(H, W + 1, 3)
    assert (grid[:, -1] == -1).all()                                          # a newline closes every row
    for r in (0, 19, 20, 39):
        for c in (0, 26, 27, 53):
            big_r = r + layout.window[0]                                      # row in the 54 x 54 canvas grid
            expected = [2 * (big_r // g) + c // g, big_r % g, c % g]
            assert grid[r, c].tolist() == expected


def test_downsampled_merge_has_the_layout_token_count():
    size = (1920, 1080)
    layout = anyres_layout(size, parse_grid_pinpoints("(1x1),...,(6x6)", 384))
    feats = torch.randn(1 + layout.rows * layout.cols, 729, 4)
    assert merge_anyres_features(feats, layout, torch.zeros(4)).shape == (3649, 4)


def test_anyres_crops_pad_the_canvas_with_black():
    from PIL import Image
    crops = anyres_crops(Image.new("RGB", (640, 480), (255, 255, 255)), parse_grid_pinpoints("(1x1),...,(6x6)", 384))
    assert len(crops) == 5 and all(c.size == (384, 384) for c in crops)
    # canvas 768 x 768, image resized to 768 x 576 and pasted 96 rows down: the top crops start with 96 black rows
    assert crops[1].getpixel((200, 95)) == (0, 0, 0) and crops[1].getpixel((200, 96)) == (255, 255, 255)
    assert crops[0].getpixel((0, 0)) == (255, 255, 255)                       # the base view is squashed, not padded


# ----------------------------------------------------------------------------------------------------------------
# End to end and full size


def test_caption_runs_end_to_end_on_the_tiny_folder(tiny, loaded, tmp_path):
    from PIL import Image
    path = str(tmp_path / "photo.png")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path)
    model, _ = loaded
    v = model.cfg.vision
    for refine in (True, False):
        out = caption(tiny[0], path, tokens_per_step=4, refine=refine, gen_length=8, device="cpu", loaded=loaded)
        assert isinstance(out["text"], str) and out["ids"].shape == (8,)
        assert out["forward_passes"] == 2                                     # 8 tokens at 4 per step
        assert out["image_tokens"] == anyres_layout((60, 40), model.cfg.grid_pinpoints, v.image_size, v.grid, 4).tokens
        assert MASK_ID not in out["ids"].tolist()


def test_sample_py_captions_with_a_real_format_folder(tiny, tmp_path, capsys):
    """sample.py --ckpt FOLDER --image PHOTO goes through llada_v.py, with the refinement trace on request."""
    from PIL import Image
    path = str(tmp_path / "photo.png")
    Image.new("RGB", (50, 50), (30, 30, 200)).save(path)
    text = sample.main(["--ckpt", tiny[0], "--image", path, "--tokens-per-step", "4", "--gen-length", "8",
                        "--trace", "--device", "cpu"])
    out = capsys.readouterr().out
    assert isinstance(text, str) and "caption" in out and "2 forward passes" in out and "step" in out
    # the sampler's speed-ups work on a folder too; --draft is refused in one line
    sample.main(["--ckpt", tiny[0], "--image", path, "--gen-length", "8", "--block-length", "4",
                 "--threshold", "0.9", "--prefix-cache", "--device", "cpu"])
    assert "threshold 0.9, prefix cache (refresh once per block)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        run_main(sample.main, ["--ckpt", tiny[0], "--image", path, "--draft", "a cat"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and len(lines) == 1 and "--draft" in lines[0]


def photo(tmp_path, size=(60, 40)):
    from PIL import Image
    path = str(tmp_path / "photo.png")
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_logits_from_the_answer_start_and_the_prefix_cache_equal_the_full_pass(loaded, tmp_path):
    """The caption path's partial logits (from the answer's start) and a fresh prefix cache
    (sample.ModelLogits) give the full forward pass's logits of those positions."""
    from data.loaders import open_image
    model, tokenizer = loaded
    embeds = model.encode_image(open_image(photo(tmp_path)))                 # (1, N, D)
    prompt = prompt_ids(tokenizer, embeds.shape[1])
    ids = torch.tensor([prompt + [MASK_ID, 5, MASK_ID, 17, MASK_ID, MASK_ID]])   # (1, P + 6)
    P = len(prompt)
    with torch.no_grad():
        full = model(ids, embeds)                                             # (1, L, V)
        partial = model(ids, embeds, logits_from=P)                           # (1, 6, V)
        first, kv = model(ids, embeds, keep_kv=P, logits_from=P)
        cached = model(ids[:, P:], past_kv=kv)                     # the answer only, on the cache
    assert partial.shape == (1, 6, VOCAB)
    for other in (partial, first, cached):
        assert (other - full[:, P:]).abs().max().item() <= 1e-5


def test_caption_computes_logits_for_the_answer_only(loaded, tmp_path):
    model, _ = loaded
    rows = []
    hook = model.lm.lm_head.register_forward_hook(lambda m, i, out: rows.append(out.shape[1]))
    try:
        out = caption("", photo(tmp_path), tokens_per_step=4, gen_length=8, loaded=loaded)
    finally:
        hook.remove()
    assert out["forward_passes"] == len(rows) == 2 and rows == [8, 8]        # not prompt_tokens + 8
    # blocks of one step: the cache is built at every step, so exact
    blocks = caption("", photo(tmp_path), tokens_per_step=4, gen_length=8, loaded=loaded,
                     block_length=4)
    cached = caption("", photo(tmp_path), tokens_per_step=4, gen_length=8, loaded=loaded,
                     block_length=4, prefix_cache=True)
    assert torch.equal(cached["ids"], blocks["ids"])


class FavouredIds(torch.nn.Module):
    """An LM head that adds `bonus` to the logits of some ids (a model that wants them always)."""

    def __init__(self, head, bonus: dict):
        super().__init__()
        self.head, self.bonus = head, bonus

    def forward(self, x):
        logits = self.head(x).clone()
        for i, b in self.bonus.items():
            logits[..., i] += b
        return logits


def test_caption_uses_the_official_banned_ids_and_stops_at_the_end_of_turn(loaded, tmp_path):
    """Every banned id is favoured most, <|eot_id|> next: none of the banned ids appears, the
    caption is empty and the answer is <|eot_id|> from its stop on, which comes within two steps
    (8 tokens, 4 a step). The banned ids favoured alone: the answer holds none of them (no mask)."""
    assert set(SAMPLER_BANNED_IDS) == {126081, 126080, 126346, 126347}
    model, _ = loaded
    head = model.lm.lm_head
    try:
        banned = {i: 2000.0 for i in SAMPLER_BANNED_IDS}
        model.lm.lm_head = FavouredIds(head, banned | {EOT_ID: 1000.0})
        for refine in (True, False):
            out = caption("", photo(tmp_path), tokens_per_step=4, refine=refine, gen_length=8,
                          loaded=loaded)
            assert out["ids"].tolist() == [EOT_ID] * 8 and out["text"] == ""
            assert out["forward_passes"] <= 2
        model.lm.lm_head = FavouredIds(head, banned)
        out = caption("", photo(tmp_path), tokens_per_step=4, gen_length=8, loaded=loaded)
        assert not set(SAMPLER_BANNED_IDS + (MASK_ID,)) & set(out["ids"].tolist())
    finally:
        model.lm.lm_head = head


def test_rope_theta_is_read_from_the_config_and_required(tiny, tmp_path, capsys):
    assert config_from_hf(dict(REAL_CONFIG, rope_theta=123.0)).lm.rope_theta == 123.0
    original = {"d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_hidden_size": 64,
                "vocab_size": VOCAB}
    assert config_from_hf(dict(original, rope_theta=77.0)).lm.rope_theta == 77.0
    for config in (REAL_CONFIG, original):
        missing = {k: v for k, v in config.items() if k != "rope_theta"}
        with pytest.raises(CheckpointMismatch, match=r"here/config.json: no \"rope_theta\" field"):
            config_from_hf(missing, "here/config.json")
    # through sample.py: one line on stderr naming the file and the field, a non-zero exit
    folder = tmp_path / "no_rope"
    shutil.copytree(tiny[0], folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    del config["rope_theta"]
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(SystemExit) as exit_:
        run_main(sample.main, ["--ckpt", str(folder), "--image", photo(tmp_path), "--device",
                               "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code != 0 and len(lines) == 1, lines
    assert f"{folder}/config.json" in lines[0] and "rope_theta" in lines[0]


def test_image_tokens_are_spliced_at_placeholders_and_pad_mode_adds_one_newline(loaded):
    import dataclasses
    from PIL import Image
    model, tokenizer = loaded
    image = Image.new("RGB", (50, 30), (10, 200, 10))
    embeds = model.encode_image(image)                                        # (1, N, D) anyres
    ids = torch.tensor([prompt_ids(tokenizer, embeds.shape[1])])
    with torch.no_grad():
        a, b = model(ids, embeds), model(ids, torch.randn_like(embeds))
    assert not torch.allclose(a, b), "the image must reach the logits"
    pad_model = LLaDAV.__new__(LLaDAV)                                        # same weights, image_aspect_ratio "pad"
    pad_model.__dict__.update(model.__dict__)
    pad_model.cfg = dataclasses.replace(model.cfg, image_aspect_ratio="pad")
    padded = pad_model.encode_image(image)
    assert padded.shape == (1, model.cfg.vision.grid ** 2 + 1, TINY["hidden"])
    assert torch.equal(padded[0, -1], model.image_newline)


def test_full_size_model_builds_on_meta_with_the_checkpoint_parameter_count():
    """Expected counts, from the published model shapes (vocab from the published config.json):
    LM: 32 layers x (4 x 4096^2 attention + 3 x 4096 x 12288 SwiGLU + 2 x 4096 norms) = 6,979,584,000
        + embeddings and untied head 2 x 126349 x 4096 = 1,035,051,008 + final norm 4096     -> 8,014,639,104
    SigLIP so400m, 26 of 27 layers: patch embed 3 x 14^2 x 1152 + 1152 = 678,528, positions 729 x 1152 = 839,808,
        26 x (4 x (1152^2 + 1152) + 2 x 1152 x 4304 + 4304 + 1152 + 4 x 1152 = 15,239,504)   ->   397,745,440
    projector 1152 x 4096 + 4096 + 4096^2 + 4096 = 21,504,000; image_newline 4096
    total 8,433,892,640 parameters; the checkpoint also stores SigLIP's unused post-layernorm (2 x 1152),
    8,433,894,944 numbers = 16.87 GB in bf16 (the published checkpoint: about 17 GB)."""
    cfg = config_from_hf(REAL_CONFIG)
    with torch.device("meta"):
        model = LLaDAV(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.lm) == 8_014_639_104
    assert count(model.vision_tower) == 397_745_440
    assert count(model.mm_projector) == 21_504_000
    assert count(model) == 8_433_892_640
    # LLaDA-8B's own 126464-row vocabulary gives the LLaDA paper's 8.02B language model
    with torch.device("meta"):
        assert count(LLaDA(LLADA_8B)) == 8_015_581_184
    # the tower has exactly the shapes of timm's named so400m/14/384 model (open_clip's SigLIP-384 trunk), cut to 26
    import timm
    with torch.device("meta"):
        ref = timm.create_model("vit_so400m_patch14_siglip_384", depth=26, global_pool="", num_classes=0)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("norm.")}  # final norm dropped
    assert ref_shapes == {k: v.shape for k, v in model.vision_tower.trunk.state_dict().items()}
    # and the loader expects one checkpoint key per tensor: 3 + 32 x 9 LM, 3 + 26 x 16 tower, 4 projector, 1 newline
    names = llada_v.checkpoint_names(cfg, "llama")
    assert sum(len(keys) for keys in names.values()) == 291 + 419 + 4 + 1
