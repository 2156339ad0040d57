"""llada_v.py: load a Hugging Face LLaDA-V / ReDiff checkpoint folder into this repo's model
classes and caption a photo with the frozen or the refining sampler.

A checkpoint folder holds `config.json`, `tokenizer.json` and safetensors shards listed in
`model.safetensors.index.json` (about 17 GB in bf16). The pieces, with the facts they follow
(the published config.json and the official LLaDA-V code):
    vision tower   SigLIP so400m / patch 14 / 384 px (timm's `vit_so400m_patch14_siglip_384`, the
                   trunk of open_clip's "ViT-SO400M-14-SigLIP-384"); features: layer 26 of 27,
                   before the post-layernorm (LLaVA's mm_vision_select_layer = -2)
    projector      "mlp2x_gelu": Linear(1152 -> 4096), GELU, Linear(4096 -> 4096)
    anyres_max_4   a 384 px base view plus up to 6 x 6 crops, unpadded to the image's aspect
                   ratio, downsampled to about 4 crops' worth of tokens, and a learned
                   `image_newline` at the end of every feature row
    language model model.py's `LLaDA` (LLaDA-V's LLaMA-style names, or LLaDA's), bidirectional
The loader builds the model on the meta device and reads the shards one tensor at a time straight
into place (peak host memory about one copy of the weights; on CUDA straight to the GPU).

Shape legend: L sequence length, D language-model width, Dv vision width, V vocabulary, g feature
grid side (27), n crops, N image tokens, H x W feature rows x columns after unpadding.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

import distributed
import rediff
from data.loaders import open_image
from data.pipeline import image_to_tensor
from model import LLaDA, LMConfig, ModelLogits, pick_device

# --------------------------------------------------------------------------------------------------
# Special ids of the LLaDA tokenizer (its published tokenizer.json); LLaDATokenizer checks them.

SPECIAL_TOKENS = {"<|startoftext|>": 126080,      # BOS
                  "<|endoftext|>": 126081,        # EOS: end of text, the padding after an answer
                  "<|mdm_mask|>": 126336,         # the diffusion mask
                  "<|start_header_id|>": 126346, "<|end_header_id|>": 126347,
                  "<|eot_id|>": 126348}           # end of turn, where a caption stops
BOS_ID, EOS_ID, MASK_ID, START_HEADER_ID, END_HEADER_ID, EOT_ID = SPECIAL_TOKENS.values()
# The official LLaDA-V sampler bans these (logit -inf, as the mask) and stops an answer at EOT_ID.
SAMPLER_BANNED_IDS = (EOS_ID, BOS_ID, START_HEADER_ID, END_HEADER_ID)
IMAGE_TOKEN_INDEX = -200  # LLaVA's image placeholder in prompt ids: no vocabulary id, never sampled

# The LLaDA-V chat template ("llava_llada", LLaMA-3 layout) and the paper's captioning question.
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the "
                 "visual content that the user provides, and assist the user with a variety of "
                 "tasks using natural language.")
CAPTION_QUESTION = "Please describe the image in detail."


def chat_prompt(question: str = CAPTION_QUESTION, system: str = SYSTEM_PROMPT) -> str:
    """One user turn with the image, then the assistant header; the answer is generated after it."""
    return ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\n" + question + "<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


class LLaDATokenizer:
    """tokenizer.json through the `tokenizers` package, with data/tokenizer.py's interface (mask_id,
    eos_id, special_ids, encode, decode) for sample.py's helpers. The template writes the BOS."""

    def __init__(self, path: str):
        self.tok = Tokenizer.from_file(path)
        found = {text: self.tok.token_to_id(text) for text in SPECIAL_TOKENS}
        if found != SPECIAL_TOKENS:
            raise ValueError(f"{path}: not a LLaDA tokenizer: special ids {found}, expected "
                             f"{SPECIAL_TOKENS}")
        self.mask_id, self.eos_id, self.eot_id = MASK_ID, EOT_ID, EOT_ID  # a caption ends its turn
        added = self.tok.get_added_tokens_decoder()                      # {id: AddedToken}
        self.special_ids = sorted(i for i, t in added.items() if t.special)
        self.stop_ids = (EOT_ID, EOS_ID)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def prompt_ids(tokenizer: LLaDATokenizer, n_image_tokens: int,
               question: str = CAPTION_QUESTION) -> list[int]:
    """The chat prompt as ids, its `<image>` replaced by n_image_tokens IMAGE_TOKEN_INDEX."""
    before, after = chat_prompt(question).split("<image>")
    return tokenizer.encode(before) + [IMAGE_TOKEN_INDEX] * n_image_tokens + tokenizer.encode(after)


# --------------------------------------------------------------------------------------------------
# Configs: read from a checkpoint's config.json


@dataclass
class SiglipConfig:
    """SigLIP so400m/14 at 384 px, as LLaVA hard-codes it; a config.json's "vision_config" dict in
    Hugging Face SigLIP names may override these defaults (the tests do)."""
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152         # Dv
    layers: int = 27          # released SigLIP; LLaDA-V runs the first layers + 1 + select_layer
    heads: int = 16
    mlp_hidden: int = 4304
    norm_eps: float = 1e-6
    select_layer: int = -2    # mm_vision_select_layer: hidden_states[-2], second-to-last layer's
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    @property
    def grid(self) -> int:    # g: 384 / 14 = 27 patches a side, 729 tokens a crop
        return self.image_size // self.patch_size

    @property
    def used_layers(self) -> int:  # 27 + 1 - 2 = 26
        return self.layers + 1 + self.select_layer


@dataclass
class LLaDAVConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: SiglipConfig | None = field(default_factory=SiglipConfig)  # None: text-only LLaDA
    image_aspect_ratio: str = "anyres_max_4"
    grid_pinpoints: list = field(
        default_factory=lambda: parse_grid_pinpoints("(1x1),...,(6x6)", 384))

    @property
    def max_crops(self) -> int | None:
        """anyres_max_4 -> 4: features downsampled to about 4 crops' worth; "anyres" -> None."""
        match = re.fullmatch(r"anyres_max_(\d+)", self.image_aspect_ratio)
        return int(match.group(1)) if match else None


_VISION_FIELDS = {"hidden_size": "width", "intermediate_size": "mlp_hidden",
                  "num_hidden_layers": "layers", "num_attention_heads": "heads",
                  "layer_norm_eps": "norm_eps", "image_size": "image_size",
                  "patch_size": "patch_size"}


def config_from_hf(d: dict, path: str = "config.json") -> LLaDAVConfig:
    """A config.json dict (read from `path`, named in errors) -> LLaDAVConfig: LLaDA-V's LLaMA
    names (hidden_size, ...) or the original LLaDA's OLMo names (d_model, embedding_size, ...).
    No default rope_theta: a wrong RoPE base gives plausible but wrong logits, so it is required."""
    if d.get("rope_theta") is None:
        raise CheckpointMismatch(f"{path}: no \"rope_theta\" field (the RoPE base; LLaDA-V and "
                                 f"LLaDA-8B use 500000.0): add the model's original value")
    flags = ("tie_word_embeddings", "attention_bias", "mlp_bias", "rope_scaling")
    if "d_model" in d:  # original LLaDA: its OLMo names as LLaDA-V's
        flags = ("weight_tying", "include_bias")
        d = {**d, "vocab_size": d.get("embedding_size") or d["vocab_size"],
             "hidden_size": d["d_model"], "num_hidden_layers": d["n_layers"],
             "num_attention_heads": d["n_heads"], "num_key_value_heads": d.get("n_kv_heads"),
             "intermediate_size": d["mlp_hidden_size"]}
    heads = d["num_attention_heads"]
    lm = LMConfig(vocab_size=d["vocab_size"], d_model=d["hidden_size"],
                  n_layers=d["num_hidden_layers"], n_heads=heads,
                  n_kv_heads=d.get("num_key_value_heads") or heads,
                  mlp_hidden=d["intermediate_size"], rope_theta=float(d["rope_theta"]),
                  norm_eps=d.get("rms_norm_eps", 1e-5))
    unsupported = {k: d[k] for k in flags if d.get(k)}
    if unsupported:
        raise ValueError(f"config.json: {unsupported} not supported by model.py's LLaDA "
                         f"(untied, no bias, plain RoPE)")
    if "mm_vision_tower" not in d:
        return LLaDAVConfig(lm=lm, vision=None)

    hf_vision = d.get("vision_config") or {}
    vision = SiglipConfig(select_layer=d.get("mm_vision_select_layer", -2), **{
        ours: hf_vision[name] for name, ours in _VISION_FIELDS.items() if name in hf_vision})
    problems = [f"{key} {d[key]!r} (only {only})" for key, only in (
        ("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch"))
        if d.get(key, only) != only]
    if "siglip" not in d["mm_vision_tower"].lower():
        problems.append(f"mm_vision_tower {d['mm_vision_tower']!r} is not a SigLIP tower")
    if d.get("mm_hidden_size", vision.width) != vision.width:
        problems.append(f"mm_hidden_size {d['mm_hidden_size']} != vision width {vision.width}")
    if "unpad" not in d.get("mm_patch_merge_type", "spatial_unpad"):
        problems.append(f"mm_patch_merge_type {d['mm_patch_merge_type']!r} (only spatial_unpad)")
    aspect = d.get("image_aspect_ratio") or "anyres_max_4"
    if not (aspect in ("anyres", "pad") or re.fullmatch(r"anyres_max_\d+", aspect)):
        problems.append(f"image_aspect_ratio {aspect!r} (only anyres, anyres_max_N and pad)")
    if problems:
        raise ValueError("config.json describes a model this loader does not build: "
                         + "; ".join(problems))
    pinpoints = d.get("image_grid_pinpoints") or "(1x1),...,(6x6)"
    return LLaDAVConfig(lm=lm, vision=vision, image_aspect_ratio=aspect,
                        grid_pinpoints=parse_grid_pinpoints(pinpoints, vision.image_size))


# --------------------------------------------------------------------------------------------------
# anyres: pure functions of the image size (LLaVA-NeXT / LLaVA-OneVision, as LLaDA-V uses them)


def parse_grid_pinpoints(pinpoints, crop_size: int) -> list[tuple[int, int]]:
    """The candidate canvas sizes (width, height). "(1x1),...,(6x6)": every i x j crops for i, j in
    1..6, in that order (it breaks ties); a list (or its string form): the sizes in pixels."""
    if isinstance(pinpoints, str) and "x" in pinpoints:
        ranges = re.findall(r"\((\d+)x(\d+)\)", pinpoints)                  # first and last "(AxB)"
        (i0, j0), (i1, j1) = map(int, ranges[0]), map(int, ranges[-1])
        return [(i * crop_size, j * crop_size)
                for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
    if isinstance(pinpoints, str):
        pinpoints = ast.literal_eval(pinpoints)
    return [(int(w), int(h)) for w, h in pinpoints]


def select_best_resolution(image_size: tuple[int, int], candidates) -> tuple[int, int]:
    """The canvas (width, height) that keeps the most of the image's pixels after an aspect-keeping
    fit (at most the image's own), then the one wasting the fewest; the first wins a full tie."""
    width, height = image_size

    def kept_then_not_wasted(canvas):
        scale = min(canvas[0] / width, canvas[1] / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        return effective, effective - canvas[0] * canvas[1]
    return max(candidates, key=kept_then_not_wasted)        # max: the first of equal keys


@dataclass
class AnyresLayout:
    cols: int                       # crops across
    rows: int                       # crops down
    window: tuple                   # (top, bottom, left, right) of the (rows g) x (cols g) features
    size: tuple                     # (H, W) feature rows x columns after unpadding and downsampling
    tokens: int                     # g^2 (base view) + H (W + 1) (a newline per row)


def anyres_layout(image_size: tuple[int, int], pinpoints, crop_size: int = 384, grid: int = 27,
                  max_crops: int | None = 4) -> AnyresLayout:
    """What an image's tokens owe to its size alone: the crop grid, the unpad window (the canvas
    is padded on two sides: centred on one axis, full on the other), the downsampled size and the
    token count. An unpadded grid of more than (1.1^2) x max_crops crops' worth of features is
    resized by 1/times each way, times = sqrt(H W / (max_crops g^2))."""
    width, height = image_size
    canvas_w, canvas_h = select_best_resolution(image_size, pinpoints)
    cols, rows = canvas_w // crop_size, canvas_h // crop_size
    h, w = rows * grid, cols * grid                                  # the canvas's feature grid
    if width / height > w / h:                        # wider than the canvas: bars above and below
        pad = (h - int(height * (w / width))) // 2
        window = (pad, h - pad, 0, w)
    else:                                                 # taller: black bars left and right
        pad = (w - int(width * (h / height))) // 2
        window = (0, h, pad, w - pad)
    h, w = window[1] - window[0], window[3] - window[2]
    times = 0 if max_crops is None else math.sqrt(h * w / (max_crops * grid ** 2))
    if times > 1.1:
        h, w = int(h // times), int(w // times)
    return AnyresLayout(cols, rows, window, (h, w), grid ** 2 + h * (w + 1))


def anyres_crops(image, pinpoints, crop_size: int = 384) -> list:
    """PIL image -> [base view squashed to crop_size^2] + the canvas crops, row by row; the image
    fits inside the canvas keeping its aspect ratio, centred on black."""
    (width, height), (tw, th) = image.size, select_best_resolution(image.size, pinpoints)
    scale_w, scale_h = tw / width, th / height       # LLaVA's float expressions: its rounding
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(height * scale_w), th)
    else:
        nw, nh = min(math.ceil(width * scale_h), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [canvas.crop((x, y, x + crop_size, y + crop_size))
             for y in range(0, th, crop_size) for x in range(0, tw, crop_size)]
    return [image.resize((crop_size, crop_size), Image.BICUBIC)] + tiles


def merge_anyres_features(feats: torch.Tensor, layout: AnyresLayout,
                          newline: torch.Tensor) -> torch.Tensor:
    """Projected crop features (1 + rows cols, g^2, D) -> the image's tokens (N, D): the base view's
    g^2, then the crops as one grid, unpadded, downsampled (bilinear), a newline ending each row."""
    base, tiles = feats[0], feats[1:]                            # (g^2, D), (rows cols, g^2, D)
    D, g, rows, cols = feats.shape[-1], math.isqrt(feats.shape[1]), layout.rows, layout.cols
    x = tiles.view(rows, cols, g, g, D)                                   # (rows, cols, g, g, D)
    x = x.permute(4, 0, 2, 1, 3).reshape(D, rows * g, cols * g)   # (D, rows g, cols g): one grid
    top, bottom, left, right = layout.window
    x = x[:, top:bottom, left:right]                                           # (D, h, w) unpadded
    if tuple(x.shape[1:]) != layout.size:
        x = F.interpolate(x[None], size=list(layout.size), mode="bilinear")[0]  # (D, H, W)
    rows_newline = newline.to(x.dtype)[:, None, None].expand(D, x.shape[1], 1)
    x = torch.cat([x, rows_newline], dim=2)                                    # (D, H, W + 1)
    return torch.cat([base, x.flatten(1).T])                                # (g^2 + H (W + 1), D)


# --------------------------------------------------------------------------------------------------
# The model


class SiglipTower(nn.Module):
    """SigLIP patch features (B, 3, S, S) -> (B, g^2, Dv): a timm VisionTransformer (the
    vit_so400m_patch14_siglip_384 layout open_clip wraps) cut to the layers LLaDA-V uses, without
    the final LayerNorm and the attention-pooling head (LLaVA's SigLIP tower drops both)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer  # here: it loads slowly
        self.trunk = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
            depth=cfg.used_layers, num_heads=cfg.heads,
            mlp_ratio=(cfg.mlp_hidden + 0.5) / cfg.width,  # +0.5: int(width * ratio) == mlp_hidden
            class_token=False, global_pool="", num_classes=0,
            act_layer="gelu_tanh",  # SigLIP's tanh-approximated GELU (HF: gelu_pytorch_tanh)
            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
        self.trunk.norm = nn.Identity()  # features are taken before SigLIP's post-layernorm
        assert self.trunk.blocks[0].mlp.fc1.out_features == cfg.mlp_hidden

    def forward(self, images):
        return self.trunk.forward_features(images)                             # (B, g^2, Dv)


class AnyresImages(NamedTuple):
    """A batch's images as LLaDAV's `images`: every image's views, concatenated (sum n, 3, S, S),
    and each image's (width, height)."""
    views: torch.Tensor
    sizes: list

    def to(self, device) -> AnyresImages:
        return AnyresImages(self.views.to(device), self.sizes)


def anyres_images(model: LLaDAV, paths: list) -> AnyresImages:
    """Decode image files -> their anyres views (on the CPU: a data loader's part) and sizes."""
    images = [open_image(path) for path in paths]
    return AnyresImages(torch.cat([model.image_views(im) for im in images]),
                        [im.size for im in images])


class LLaDAV(nn.Module):
    """Vision tower + mlp2x_gelu projector + image_newline + model.py's LLaDA (text-only: LLaDA)."""

    def __init__(self, cfg: LLaDAVConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vision is not None:
            self.vision_tower = SiglipTower(cfg.vision)
            width, D = cfg.vision.width, cfg.lm.d_model
            self.mm_projector = nn.Sequential(nn.Linear(width, D), nn.GELU(), nn.Linear(D, D))
            self.image_newline = nn.Parameter(torch.zeros(cfg.lm.d_model))
        self.lm = LLaDA(cfg.lm)

    def image_layout(self, image_size: tuple[int, int]) -> AnyresLayout | None:
        """The anyres layout of an image of this (width, height); None for "pad"."""
        cfg = self.cfg
        return None if cfg.image_aspect_ratio == "pad" else anyres_layout(
            image_size, cfg.grid_pinpoints, cfg.vision.image_size, cfg.vision.grid, cfg.max_crops)

    def n_image_tokens(self, image_size: tuple[int, int]) -> int:
        """N for an image of this (width, height), from the size alone: the prompt's placeholders"""
        layout = self.image_layout(image_size)
        return self.cfg.vision.grid ** 2 + 1 if layout is None else layout.tokens

    def image_views(self, image) -> torch.Tensor:
        """PIL image -> the tower's normalised views (n, 3, S, S), on the CPU (a data loader's):
        anyres crops, or ("pad") the image centred on a square of the mean colour."""
        vision = self.cfg.vision
        if self.cfg.image_aspect_ratio == "pad":
            side = max(image.size)
            square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in vision.mean))
            square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
            views = [square.resize((vision.image_size, vision.image_size), Image.BICUBIC)]
        else:
            views = anyres_crops(image, self.cfg.grid_pinpoints, vision.image_size)
        return image_to_tensor(views, vision.mean, vision.std)

    def embed_views(self, views: torch.Tensor, sizes: list) -> torch.Tensor:
        """Several images' views, concatenated (sum n, 3, S, S), and their (width, height) -> their
        tokens, right-padded with zeros to the longest (B, N, D). One tower call for all;
        differentiable: training reaches the projector, image_newline (and an unfrozen tower)."""
        param = next(self.mm_projector.parameters())                    # feats: (sum n, g^2, D)
        feats = self.mm_projector(self.vision_tower(views.to(param.device, param.dtype)))
        tokens, start = [], 0
        for layout in map(self.image_layout, sizes):
            n = 1 if layout is None else 1 + layout.rows * layout.cols
            own, start = feats[start:start + n], start + n                     # (n, g^2, D)
            if layout is None:                                 # one view: its tokens, one newline
                tokens.append(torch.cat([own[0], self.image_newline[None].to(own.dtype)]))
            else:
                tokens.append(merge_anyres_features(own, layout, self.image_newline))
        return nn.utils.rnn.pad_sequence(tokens, batch_first=True)            # (B, N, D)

    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """PIL image -> its token embeddings (1, N, D), computed once per caption."""
        return self.embed_views(self.image_views(image), [image.size])

    def forward(self, ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
                past_kv: list | None = None, keep_kv: int = 0, logits_from: int = 0,
                images: AnyresImages | None = None) -> torch.Tensor:
        """ids (B, L), image placeholders = IMAGE_TOKEN_INDEX -> logits (B, L - logits_from, V); a
        row's k-th placeholder gets its k-th image token (of the one image_embeds row, if one).
        past_kv, keep_kv, logits_from: the sampler's prefix cache and partial logits, as model.VLM
        takes them (model.ModelLogits drives both); logits_from = the answer's start skips the LM
        head on ~3,800 image and prompt positions. images (one per row) instead of image_embeds:
        encoded here, so a training step is one call of the module (DDP and FSDP act around it)."""
        if images is not None:
            image_embeds = self.embed_views(*images)                          # (B, N, D)
        x = self.lm.embed_tokens(ids.clamp(min=0))              # (B, L, D); placeholders replaced
        if image_embeds is not None:
            is_image = ids == IMAGE_TOKEN_INDEX                                # (B, L)
            slot = (is_image.cumsum(dim=1) - 1).clamp(0, image_embeds.shape[1] - 1)
            slot = slot[..., None].expand(-1, -1, x.shape[-1])                # (B, L, D)
            spliced = image_embeds.expand(ids.shape[0], -1, -1).gather(1, slot)
            x = torch.where(is_image[..., None], spliced.to(x.dtype), x)
        return self.lm(x, past_kv, keep_kv, logits_from)


def answer_logits(model, rows) -> torch.Tensor:
    """The answer positions' logits (b, A, V) of data.captions.Rows; `model`: LLaDAV or its DDP /
    FSDP module. Logits start at rows.start; a pre-hook on the final norm keeps each row's A answer
    positions: the LM head (V = 126k) never sees the gap after a short prompt, nor the padding."""
    lm = getattr(model, "module", model).lm                          # DDP keeps it in .module
    index = rows.answer_at[..., None]                                               # (b, A, 1)

    def gather(module, args):
        x = args[0]                                                  # (b, L - start, D)
        return (x.gather(1, index.expand(-1, -1, x.shape[-1])),)                    # (b, A, D)
    handle = lm.norm.register_forward_pre_hook(gather)
    try:
        return model(rows.ids, images=rows.images, logits_from=rows.start)
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------
# Checkpoint names -> this model's parameter names

LLADA_LAYER_NAMES = {  # original LLaDA (OLMo style): model.transformer.blocks.{i}.<name>
    "q_proj.weight": "self_attn.q_proj.weight", "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight", "attn_out.weight": "self_attn.o_proj.weight",
    "ff_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ff_norm.weight": "post_attention_layernorm.weight"}
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
SIGLIP_LAYER_NAMES = {  # Hugging Face SigLIP encoder.layers.{i}.<name> -> timm blocks.{i}.<name>
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def checkpoint_names(cfg: LLaDAVConfig, naming: str) -> dict[str, list[str]]:
    """{our parameter name: the checkpoint keys it is made of}. One key, except timm's fused
    attention input: Hugging Face's q_proj, k_proj and v_proj stacked (in that order)."""
    if naming == "llama":  # LLaDA-V / ReDiff: model.layers.{i}.<name>, our names
        names = {"lm.embed_tokens.weight": ["model.embed_tokens.weight"],
                 "lm.norm.weight": ["model.norm.weight"], "lm.lm_head.weight": ["lm_head.weight"]}
        layer_prefix, layer_names = "model.layers", {n: n for n in LLADA_LAYER_NAMES.values()}
    else:
        names = {"lm.embed_tokens.weight": ["model.transformer.wte.weight"],
                 "lm.norm.weight": ["model.transformer.ln_f.weight"],
                 "lm.lm_head.weight": ["model.transformer.ff_out.weight"]}
        layer_prefix, layer_names = "model.transformer.blocks", LLADA_LAYER_NAMES
    for i in range(cfg.lm.n_layers):
        for theirs, ours in layer_names.items():
            names[f"lm.layers.{i}.{ours}"] = [f"{layer_prefix}.{i}.{theirs}"]
    if cfg.vision is None:
        return names
    v, t = VISION_PREFIX, "vision_tower.trunk."
    names.update({f"{t}patch_embed.proj.weight": [f"{v}embeddings.patch_embedding.weight"],
                  f"{t}patch_embed.proj.bias": [f"{v}embeddings.patch_embedding.bias"],
                  f"{t}pos_embed": [f"{v}embeddings.position_embedding.weight"],
                  "image_newline": ["model.image_newline"],
                  **{f"mm_projector.{j}.{kind}": [f"model.mm_projector.{j}.{kind}"]
                     for j in (0, 2) for kind in ("weight", "bias")}})
    for i in range(cfg.vision.used_layers):
        for kind in ("weight", "bias"):
            qkv = [f"{v}encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            names[f"{t}blocks.{i}.attn.qkv.{kind}"] = qkv
            for theirs, ours in SIGLIP_LAYER_NAMES.items():
                names[f"{t}blocks.{i}.{ours}.{kind}"] = [f"{v}encoder.layers.{i}.{theirs}.{kind}"]
    return names


def ignored_key(key: str, cfg: LLaDAVConfig) -> bool:
    """Checkpoint keys known and left unused: SigLIP's post-layernorm and pooling head (features
    come before them), encoder layers past the used ones (the dropped last), cached RoPE tables."""
    rest = key.removeprefix(VISION_PREFIX)
    if cfg.vision is None or rest == key:                                # not a vision key
        return key.endswith("rotary_emb.inv_freq")
    layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
    dropped_layer = layer is not None and int(layer.group(1)) >= cfg.vision.used_layers
    return rest.startswith(("post_layernorm.", "head.")) or dropped_layer


class CheckpointMismatch(ValueError):
    """The checkpoint folder does not describe a model this loader builds: a config.json field is
    missing, or the checkpoint's keys or shapes do not fit the model its config.json describes."""


HF_FILES = ("config.json", "tokenizer.json")  # a Hugging Face folder's files beside its weights
HF_INDEX, HF_SINGLE = "model.safetensors.index.json", "model.safetensors"


def weight_shards(folder: str) -> list[str]:
    """The folder's weight files: every shard its index lists, or its one model.safetensors; [] when
    it has neither (ValueError: an index without a "weight_map")."""
    index = os.path.join(folder, HF_INDEX)
    if not os.path.isfile(index):
        return [HF_SINGLE] if os.path.isfile(os.path.join(folder, HF_SINGLE)) else []
    try:
        with open(index, encoding="utf-8") as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{HF_INDEX} is not a valid index (no \"weight_map\" of key -> shard "
                         f"file)") from None


def check_hf_folder(folder: str, flag: str) -> None:
    """A Hugging Face LLaDA-V / ReDiff folder is whole before anything is loaded: config.json,
    tokenizer.json, and every weight shard its index lists (an interrupted download often lacks
    one)."""
    fix = "download the whole folder again (huggingface-cli download REPO --local-dir DIR)"
    try:
        shards = weight_shards(folder) or [f"{HF_INDEX} or {HF_SINGLE}"]
    except ValueError as err:
        raise SystemExit(f"{flag} {folder}: {err}; {fix}") from None
    missing = [name for name in (*HF_FILES, *shards)
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise SystemExit(f"{flag} {folder}: a Hugging Face LLaDA-V / ReDiff folder, but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; "
                         f"{fix}")


def load_llada_v(model_dir: str, device="cpu",
                 dtype: torch.dtype | None = None) -> tuple[LLaDAV, LLaDATokenizer]:
    """A Hugging Face LLaDA-V / ReDiff (or original LLaDA) folder -> (model, eval mode; tokenizer).
    dtype: default bfloat16 on CUDA (the checkpoint's own: no conversion copy), else float32.
    Every missing, unexpected or mis-shaped key is in one CheckpointMismatch before any read."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        cfg = config_from_hf(json.load(f), config_path)
    tokenizer = LLaDATokenizer(os.path.join(model_dir, "tokenizer.json"))
    with torch.device("meta"):
        model = LLaDAV(cfg)                                             # shapes only, no memory
    shards = weight_shards(model_dir)
    if not shards:
        raise FileNotFoundError(f"{model_dir}: no {HF_INDEX} or {HF_SINGLE}; download the folder")
    shapes = {}                                    # {checkpoint key: shape}, from the headers only
    for shard in shards:
        with safe_open(os.path.join(model_dir, shard), framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    naming = "llada" if any(k.startswith("model.transformer.") for k in shapes) else "llama"
    names = checkpoint_names(cfg, naming)

    params = dict(model.named_parameters())
    expected = {}                                              # {checkpoint key: expected shape}
    for ours, keys in names.items():
        shape = tuple(params[ours].shape)
        if ours.endswith("pos_embed"):                         # timm (1, g^2, Dv) <- HF (g^2, Dv)
            shape = shape[1:]
        for key in keys:
            expected[key] = (shape[0] // len(keys),) + shape[1:]   # fused qkv: each part a third
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in expected and not ignored_key(k, cfg))
    misshaped = sorted(f"{k}: checkpoint {list(shapes[k])}, model {list(expected[k])}"
                       for k in expected if k in shapes and shapes[k] != expected[k])
    unfilled = sorted(set(params) - set(names))
    if missing or unexpected or misshaped or unfilled:
        parts = [f"{len(v)} {title}:\n  " + "\n  ".join(v) for title, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                  ("model parameters with no checkpoint name", unfilled)) if v]
        raise CheckpointMismatch(f"{model_dir} ({naming} names) does not fit its config.json:\n"
                                 + "\n".join(parts))

    # Read shard by shard, tensor by tensor, onto the device; each replaces a meta parameter.
    owner = {key: ours for ours, keys in names.items() for key in keys}
    pending: dict[str, dict] = {}                              # parts of fused tensors seen so far
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for shard in shards:
        with safe_open(os.path.join(model_dir, shard), framework="pt", device=str(device)) as f:
            for key in (k for k in f.keys() if k in owner):
                ours = owner[key]
                parts = pending.setdefault(ours, {})
                parts[key] = f.get_tensor(key).to(device=device, dtype=dtype)
                if len(parts) == len(names[ours]):
                    tensor = torch.cat([parts[k] for k in names[ours]]) if len(parts) > 1 \
                        else parts[key]
                    module_name, _, attr = ours.rpartition(".")
                    model.get_submodule(module_name)._parameters[attr] = nn.Parameter(
                        tensor.reshape(params[ours].shape), requires_grad=False)
                    del pending[ours]
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"parameters never loaded: {left}"
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Writing a folder: the inverse of load_llada_v

STATE_FILE = "train_state.json"  # exported folder: step, settings, loss history (meta.json: DCP)


def export_hf(path: str, model: LLaDAV, ctx, source: str, dtype: torch.dtype, shard_gb: float,
              state: dict) -> None:
    """Write the weights as a Hugging Face LLaDA-V folder for load_llada_v and sample.py --ckpt:
    LLaMA-style keys (checkpoint_names; timm's fused qkv split into q, k, v), shards of at most
    shard_gb and their index, the source folder's small files (config.json, tokenizer.json, ...)
    and STATE_FILE (`state`). Every rank calls this; rank 0 writes PATH.tmp and swaps it in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0's CPU
    weights = get_model_state_dict(model, options=full) if ctx.mode == "fsdp" \
        else model.state_dict()
    if ctx.is_main:
        tensors = {}
        for ours, keys in checkpoint_names(model.cfg, "llama").items():
            t = weights[ours].detach().to("cpu", dtype)
            t = t[0] if ours.endswith("pos_embed") else t           # timm (1, g^2, Dv) -> (g^2, Dv)
            tensors.update({k: part.contiguous() for k, part in zip(keys, t.chunk(len(keys)))})
        shards, size = [[]], 0
        for key, t in tensors.items():                                   # fill shards in key order
            if shards[-1] and size + t.nbytes > shard_gb * 1e9:
                shards, size = shards + [[]], 0
            shards[-1].append(key)
            size += t.nbytes
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in sorted(os.listdir(source)):              # config.json, tokenizer.json, ...
            src = os.path.join(source, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (
                    "model.safetensors.index.json", distributed.META_FILE, STATE_FILE):
                shutil.copy(src, tmp)
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, os.path.join(tmp, name),
                      metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"source": os.path.abspath(source), **state}, f)
        distributed.swap_in_folder(tmp, path)
    ctx.barrier()


def read_state(path: str) -> dict:
    """STATE_FILE of a folder this repository exported ({} for a downloaded one)."""
    file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# Captioning: sample.py calls this when --ckpt is a folder


@torch.no_grad()
def generate_answer(model: LLaDAV, image_embeds: torch.Tensor, prompt: torch.Tensor,
                    gen_length: int, steps: int, refine: bool = True, prefix_cache: bool = False,
                    **options):
    """rediff.generate with the official LLaDA-V sampler's rules: SAMPLER_BANNED_IDS (and the
    mask) at logit -inf, each row stopped at its first <|eot_id|>. prompt (B, P) with the image
    placeholders, image_embeds (B or 1, N, D); prefix_cache: model.ModelLogits'; options:
    rediff.generate's. Returns (rediff.generate's output, forward passes)."""
    logits_fn = ModelLogits(model, image_embeds, prompt.shape[1], prefix_cache)
    out = rediff.generate(logits_fn, prompt, gen_length, steps, refine=refine, mask_id=MASK_ID,
                          eot_id=EOT_ID, banned_ids=SAMPLER_BANNED_IDS,
                          on_block=logits_fn.begin_block, **options)
    return out, logits_fn.forward_passes


@torch.no_grad()
def caption(model_dir: str, image_path: str, tokens_per_step: int = 8, refine: bool = True,
            gen_length: int = 128, question: str = CAPTION_QUESTION, device="auto", seed: int = 0,
            return_trace: bool = False, loaded: tuple | None = None,
            block_length: int | None = None, **options) -> dict:
    """Caption one image file with a LLaDA-V / ReDiff checkpoint folder as the paper evaluates: one
    block of gen_length tokens, steps = ceil(gen_length / tokens_per_step), greedy, refining
    (ReDiff) or frozen (LLaDA-V), the official sampler's banned ids and end-of-turn stop.
    loaded: load_llada_v's (model, tokenizer), to caption many images without reloading.
    block_length and options (temperature, prefix_cache, threshold): sample.py's (off: the paper's).
    Returns a dict: text, ids (G,), image_tokens, prompt_tokens, forward_passes, seconds, trace."""
    model, tokenizer = loaded or load_llada_v(model_dir, pick_device(device))
    if model.cfg.vision is None:
        raise ValueError(f"{model_dir} is a text-only LLaDA checkpoint: it cannot caption images")
    device = next(model.parameters()).device
    start = time.perf_counter()
    image_embeds = model.encode_image(open_image(image_path))                  # (1, N, D)
    prompt = torch.tensor([prompt_ids(tokenizer, image_embeds.shape[1], question)],
                          device=device)                                          # (1, P)
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks = gen_length // (block_length or gen_length)
    steps = rediff.steps_for(gen_length, tokens_per_step, blocks)
    out, forward_passes = generate_answer(model, image_embeds, prompt, gen_length, steps, refine,
                                          block_length=block_length, generator=generator,
                                          return_trace=return_trace, **options)
    ids, trace = out if return_trace else (out, None)
    answer = ids[0].tolist()
    cut = min([answer.index(s) for s in tokenizer.stop_ids if s in answer] + [len(answer)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"text": tokenizer.decode(answer[:cut]).strip(), "ids": ids[0],
            "image_tokens": image_embeds.shape[1], "prompt_tokens": prompt.shape[1],
            "forward_passes": forward_passes, "seconds": time.perf_counter() - start,
            "trace": trace}
