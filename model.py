"""model.py: the vision-language model: a LLaDA-style bidirectional transformer, an open_clip
vision tower and the mlp2x_gelu projector (their checkpoints: checkpoints.py).

Shape legend used in the comments:
    B batch, L sequence length, D language-model width, H attention heads, Hkv key/value heads,
    Dh head width, F MLP hidden width, V vocabulary, N image tokens, Dv vision width,
    S image side (px).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from shapes_aids import attribute_features

# --------------------------------------------------------------------------------------------------
# Language model (LLaDA): float32 RMSNorm, rotate-half RoPE, no causal mask, SwiGLU, no biases.


@dataclass
class LMConfig:
    vocab_size: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None    # None: same as n_heads (LLaDA-8B uses 32 of 32)
    mlp_hidden: int = 384            # SwiGLU hidden width F
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# The real LLaDA-8B language model (its published config.json); tests count it on the meta device.
LLADA_8B = LMConfig(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                    mlp_hidden=12288, rope_theta=500000.0, norm_eps=1e-5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()   # LLaDA computes the norm in float32 whatever the activation dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device):
    """cos and sin tables for rotary embeddings in the rotate-half layout, each (L, Dh)."""
    f32 = dict(device=device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, **f32) / head_dim)   # (Dh/2,)
    angles = torch.outer(torch.arange(seq_len, **f32), inv_freq)                 # (L, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)                                 # (L, Dh)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, H, L, Dh), rotate-half layout: each head's first half pairs with its second."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.kv_heads = cfg.n_kv_heads or cfg.n_heads  # grouped KV heads (LLaDA-8B: all 32)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, past_kv=None, new_kv: list | None = None, query_from: int = 0,
                allowed=None):
        """x (B, L, D) -> (B, L - query_from, D). The rest, off by default, serves the sampler's
        prefix cache (LLaDA.forward): past_kv: (k, v) (B, Hkv, Lp, Dh) of earlier positions that
        x's tokens attend to as well; new_kv: a list that receives this call's (k, v) after RoPE;
        query_from: positions before it serve as keys and values only; allowed (L, Lp + L) bool:
        which keys each query may see (LLaDA.forward's prefix_len), None: all."""
        B, L, _ = x.shape
        xq = x[:, query_from:] if query_from else x  # (B, Lq, D); training: no slice, same graph
        Lq, Dh = xq.shape[1], self.head_dim
        q = self.q_proj(xq).view(B, Lq, self.n_heads, Dh).transpose(1, 2)         # (B, H, Lq, Dh)
        k = self.k_proj(x).view(B, L, self.kv_heads, Dh).transpose(1, 2)          # (B, Hkv, L, Dh)
        v = self.v_proj(x).view(B, L, self.kv_heads, Dh).transpose(1, 2)          # (B, Hkv, L, Dh)
        q, k = apply_rope(q, cos[query_from:], sin[query_from:]), apply_rope(k, cos, sin)
        if new_kv is not None:
            new_kv.append((k, v))
        if past_kv is not None:  # k, v: (B, Hkv, Lp + L, Dh)
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        if self.kv_heads != self.n_heads:  # grouped KV heads: each serves `group` query heads
            group = self.n_heads // self.kv_heads
            k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))           # (B, H, L, Dh)
        mask = None if allowed is None else allowed[query_from:]  # (Lq, Lp + L); None: all see all
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # (B, H, Lq, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, Lq, -1))                  # (B, Lq, D)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, L, F) -> (B, L, D)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, past_kv=None, new_kv: list | None = None, query_from: int = 0,
                allowed=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, past_kv, new_kv, query_from, allowed)
        x = (x[:, query_from:] if query_from else x) + h                           # (B, Lq, D)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA(nn.Module):
    """The LLaDA mask predictor; its parameter names are LLaDA-V checkpoints' LLaMA-style ones."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied: its own weights

    def forward(self, inputs_embeds: torch.Tensor, past_kv: list | None = None, keep_kv: int = 0,
                logits_from: int = 0, prefix_len: int = 0):
        """inputs_embeds (B, L, D) -> logits (B, L - logits_from, V); the defaults: the plain pass.

        The sampler's options (ModelLogits, below):
        - logits_from: only positions from here on get logits; the last layer computes its queries
          (and MLP) only there too. Exact: the other positions still serve as keys and values.
        - keep_kv = n: also return the keys and values of the first n positions, one (k, v)
          (B, Hkv, n, Dh) per layer: (logits, kv).
        - past_kv: such a list from an earlier call (a prefix cache, as Fast-dLLM's approximate KV
          cache); inputs_embeds then holds only the later positions, which attend to the cached
          prefix and to each other. Approximate: in bidirectional attention the prefix's keys and
          values depend on the later tokens, which have changed since the cache was built.
        - prefix_len = P > 0 (not LLaDA: LaViDa's Prefix-DLM mask, for models trained with it):
          the first P positions (image + prompt) attend only to each other, never to the answer,
          so their keys and values do not depend on it and a prefix cache of them is exact."""
        x, L = inputs_embeds, inputs_embeds.shape[1]                                # (B, L, D)
        Lp = 0 if past_kv is None else past_kv[0][0].shape[2]                   # cached positions
        allowed = None
        if prefix_len > Lp:  # some queries are prefix positions: they must not see the answer
            where = torch.arange(Lp + L, device=x.device)                              # (Lp + L,)
            allowed = (where[Lp:, None] >= prefix_len) | (where[None, :] < prefix_len)  # (L, Lp+L)
        cos, sin = rope_tables(Lp + L, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        cos, sin = cos[Lp:], sin[Lp:]                                     # (L, Dh): positions Lp..
        new_kv = [] if keep_kv else None
        for i, layer in enumerate(self.layers):
            query_from = logits_from if i == len(self.layers) - 1 else 0  # the last layer only
            x = layer(x, cos, sin, past_kv[i] if past_kv else None, new_kv, query_from, allowed)
        logits = self.lm_head(self.norm(x))                                # (B, L - logits_from, V)
        if keep_kv:
            return logits, [(k[:, :, :keep_kv], v[:, :, :keep_kv]) for k, v in new_kv]
        return logits


# --------------------------------------------------------------------------------------------------
# Vision tower (open_clip) and projector


@dataclass
class VisionConfig:
    image_size: int = 48          # S; at 48 px, 16 px patches match the shapes world's 3 x 3 grid
    patch_size: int = 16
    width: int = 128              # Dv
    layers: int = 2
    heads: int = 4
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class VisionTower(nn.Module):
    """Patch tokens of an open_clip ViT, not its pooled embedding: (B, 3, S, S) -> (B, N, Dv)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import open_clip  # here: it (and torchvision) loads slowly, and only the VLM needs it
        self.visual = open_clip.transformer.VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
            layers=cfg.layers, heads=cfg.heads, mlp_ratio=4.0, output_dim=cfg.width,
            output_tokens=True)

    def forward(self, images):
        _, tokens = self.visual(images)                 # (B, N, Dv), after the final LayerNorm
        return tokens


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (grid * grid, dim) of a patch grid; dim / 2 per axis."""
    quarter = dim // 4
    freqs = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")                 # (grid, grid) each
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = torch.outer(axis, freqs)                                       # (N, dim/4)
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=-1)                                            # (N, 4 * quarter)
    return F.pad(table, (0, dim - table.shape[1]))                              # (N, dim)


# --------------------------------------------------------------------------------------------------
# The vision-language model


@dataclass
class VLMConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 4       # the tokenizer's image placeholder id: one per image token
    # What the LM sees of the image. "patches": LLaVA's mlp2x_gelu projector on the tower's patch
    # tokens (the paper's set-up). "attributes": a linear projector (LLaVA-1's) on the tower's
    # per-patch attribute probabilities and occupied cells (shapes_aids.attribute_features): a
    # tiny LM learns to read them in minutes; raw patch tokens stayed at chance (docs/toy_world.md).
    image_features: str = "patches"
    attribute_classes: list = field(default_factory=list)  # classes per attribute group, 0 = empty
    # 0: bidirectional (LLaDA-V). P > 0: LaViDa's Prefix-DLM mask (train_stage1.py --prefix-dlm):
    # the first P positions (image + prompt) never see the answer: an exact sampler prefix cache.
    prefix_dlm_len: int = 0

    @staticmethod
    def from_dict(d: dict) -> "VLMConfig":
        d = {k: v for k, v in d.items() if k != "image_pos_embed"}  # older files: always on
        vision = {k: v for k, v in d.pop("vision").items() if not k.startswith("open_clip")}
        vision.update(mean=tuple(vision["mean"]), std=tuple(vision["std"]))  # JSON gave lists
        return VLMConfig(lm=LMConfig(**d.pop("lm")), vision=VisionConfig(**vision), **d)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        Dv, D = cfg.vision.width, cfg.lm.d_model
        if cfg.image_features == "attributes":
            if not cfg.attribute_classes:
                raise ValueError("image_features 'attributes' needs attribute_classes (per group)")
            n_attributes = sum(cfg.attribute_classes)
            self.attribute_head = nn.Linear(Dv, n_attributes)
            self.mm_projector = nn.Linear(n_attributes + self.n_image_tokens, D)  # LLaVA-1 "linear"
        elif cfg.image_features == "patches":  # LLaVA's "mlp2x_gelu"
            self.mm_projector = nn.Sequential(nn.Linear(Dv, D), nn.GELU(), nn.Linear(D, D))
        else:
            raise ValueError(f"image_features {cfg.image_features!r}: use patches or attributes")
        self.lm = LLaDA(cfg.lm)
        if cfg.image_features == "patches":  # fixed 2-D positions (toy-world grounding)
            self.register_buffer("image_pos", sincos_2d(cfg.vision.grid, Dv), persistent=False)
        self.lm.apply(self._init_weights)          # open_clip initialises its own tower
        self.mm_projector.apply(self._init_weights)
        if cfg.image_features == "attributes":
            # N(0, 1), as embedding tables: image tokens ~50x the small word embeddings keep their
            # attribute and cell content through the layers; at std 0.02 the toy LM never bound
            # words to cells.
            nn.init.normal_(self.mm_projector.weight, std=1.0)

    @staticmethod
    def _init_weights(module):
        # Small token embeddings: PyTorch's N(0, 1) drowns the other inputs (toy-world calibration
        # notes). Linear layers N(0, 1 / fan_in): unit-scale activations at any width; GPT-2's 0.02
        # is that scale at width ~2,500, 5x too small at the toy width 96, where attention starts
        # uniform and the toy LM learned to find image tokens more slowly (docs/toy_world.md).
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.vision.grid ** 2

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> projected image tokens (B, N, D), computed once per caption, not
        per step (LLaVA's vision tower and projector, as LLaDA-V)."""
        feats = self.vision_tower(images)                                        # (B, N, Dv)
        if self.cfg.image_features == "attributes":  # the toy tower's head (shapes_aids.py)
            head_logits = self.attribute_head(feats)                             # (B, N, A)
            features = attribute_features(head_logits, self.cfg.attribute_classes)  # (B, N, A + N)
            return self.mm_projector(features)                                   # (B, N, D)
        # Fixed 2-D positions, added before the projector, at the scale of the tower's layer-normed
        # features (after it, the table would be ~20x larger than the small-init projected content).
        feats = feats + self.image_pos.to(feats.dtype)
        return self.mm_projector(feats)                                          # (B, N, D)

    def forward(self, ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
                past_kv: list | None = None, keep_kv: int = 0, logits_from: int = 0,
                images: torch.Tensor | None = None):
        """Token ids (B, L) with image placeholders -> logits (B, L, V).

        The k-th placeholder of a row receives that row's k-th image token. A row may hold fewer
        placeholders than image tokens, or none (classifier-free guidance masks the whole prompt,
        image included). past_kv, keep_kv, logits_from: see LLaDA.forward. images (B, 3, S, S)
        instead of image_embeds: encoded here, so a training step is one call of the module (DDP
        and FSDP act around forward calls; distributed.py)."""
        if images is not None:
            image_embeds = self.encode_images(images)                            # (B, N, D)
        x = self.lm.embed_tokens(ids)                                            # (B, L, D)
        if image_embeds is not None:
            is_image = ids == self.cfg.image_token_id                            # (B, L)
            slot = (is_image.cumsum(dim=1) - 1).clamp(0, image_embeds.shape[1] - 1)  # (B, L): k - 1
            spliced = image_embeds.gather(1, slot.unsqueeze(-1).expand_as(x))    # (B, L, D)
            x = torch.where(is_image.unsqueeze(-1), spliced.to(x.dtype), x)
        return self.lm(x, past_kv, keep_kv, logits_from, self.cfg.prefix_dlm_len)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------------
# Device


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; an explicit name is checked: a missing backend is a clear error."""
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device("cuda" if has["cuda"] else "mps" if has["mps"] else "cpu")
    if not has.get(name.split(":")[0], True):
        raise SystemExit(f"--device {name}: this PyTorch sees no such device; use --device auto")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# The model as the sampler's logits_fn (rediff.generate)


class ModelLogits:
    """rediff.generate's logits_fn for a VLM whose image tokens were computed once per caption:
    model.VLM, or llada_v.LLaDAV (the real LLaDA-V / ReDiff weights; its forward takes the same
    call).

    Only positions from the current block on get logits (the prompt's are never read), which is
    exact. With prefix_cache=True (the idea of Fast-dLLM's block-wise approximate KV cache), the
    first step of each block runs the whole sequence once and keeps the keys and values of every
    position before the block (image, prompt, earlier blocks); the block's other steps run only the
    positions from the block on, attending to that cache. The cache goes stale as the answer fills
    in (bidirectional attention), so it is an approximation; a model trained with the Prefix-DLM
    mask (VLMConfig.prefix_dlm_len) keeps the image and prompt blind to the answer: with one block
    its cache is exact. It is also rebuilt whenever the prefix ids change (e.g. classifier-free
    guidance's unconditional pass), so it is never used for another sequence."""

    def __init__(self, model, image_embeds, prompt_len: int, prefix_cache: bool = False):
        self.model, self.image_embeds = model, image_embeds                        # (B, N, D)
        self.prefix_cache = prefix_cache
        self.start = prompt_len  # the current block's first position; generate's on_block moves it
        self.kv, self.kv_ids = None, None
        self.forward_passes, self.cache_builds = 0, 0

    def begin_block(self, start: int):
        self.start, self.kv = start, None

    def __call__(self, ids):
        self.forward_passes += 1
        image_embeds = self.image_embeds[: ids.shape[0]]
        if not self.prefix_cache:
            return self.model(ids, image_embeds, logits_from=self.start)        # (B, L - start, V)
        prefix = ids[:, :self.start]                                                # (B, start)
        if self.kv is None or not torch.equal(prefix, self.kv_ids):
            # one full pass: this step's logits, and the prefix's keys and values for the next steps
            logits, self.kv = self.model(ids, image_embeds, keep_kv=self.start,
                                         logits_from=self.start)                # (B, L - start, V)
            self.kv_ids = prefix.clone()
            self.cache_builds += 1
            return logits
        return self.model(ids[:, self.start:], past_kv=self.kv)                  # (B, L - start, V)
