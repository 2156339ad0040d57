"""model.py: the vision-language model: a LLaDA-style bidirectional transformer, an open_clip
vision tower, the mlp2x_gelu projector, and self-describing checkpoints (one safetensors file;
sharded DCP folders are read here and written by distributed.py).

Shape legend used in the comments:
    B batch, L sequence length, D language-model width, H attention heads, Hkv key/value heads,
    Dh head width, F MLP hidden width, V vocabulary, N image tokens, Dv vision width,
    S image side (px).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
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

        The sampler's options (sample.ModelLogits):
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
# Checkpoints: one safetensors file; its metadata: configs, tokenizer, stage, step (JSON).

CKPT_FORMAT = "rediff-ckpt-v1"


def _atomic_write(path: str, write_fn) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: a kill at any moment
    leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}-"
    for stale in os.listdir(folder):  # left by a writer killed mid-write; one writer per path
        if stale.startswith(prefix):
            os.remove(os.path.join(folder, stale))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".safetensors")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _flatten_optimizer(optimizer) -> tuple[dict, dict]:
    """Optimizer state as flat tensors plus a JSON part (param groups and non-tensor state)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    """The optimizer's state_dict from _flatten_optimizer's two parts."""
    state: dict = {}
    for key, value in [*tensors.items(), *meta["plain"].items()]:  # "optim.3.exp_avg", "3.step"
        pid, name = key.removeprefix("optim.").split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str, model: VLM, meta: dict, optimizer=None):
    """Save weights, the optimizer if given, and `meta` (needs "tokenizer"; "stage", "step"...)."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    description = {"format": CKPT_FORMAT, "model_config": asdict(model.cfg), **meta}
    if optimizer is not None:
        optim_tensors, description["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update(optim_tensors)
    metadata = {"rediff": json.dumps(description)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """(tensors, description) of a checkpoint file; clear errors for a missing or foreign file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder: none of the sharded DCP folders with "
                         f"a meta.json (distributed.py), nor a LLaDA-V folder (config.json)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: train one first "
                                f"(python train_stage1.py --tiny)")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("rediff")
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for torn or foreign files
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file ({err}); "
                         f"re-save or re-train it") from err
    if raw is None:
        raise ValueError(f"checkpoint {path!r} has no 'rediff' metadata: not written by this "
                         f"project (for a LLaDA-V folder pass the folder, not a shard)")
    try:
        description = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {path!r}: 'rediff' metadata not valid JSON ({err})") from None
    if not isinstance(description, dict) or description.get("format") != CKPT_FORMAT:
        raise ValueError(f"checkpoint {path!r}: field 'format' is {description.get('format')!r}, "
                         f"expected {CKPT_FORMAT!r}")
    return tensors, description


# Sharded checkpoints: a DCP folder (written by distributed.save_dcp) is read here, so that every
# script loads both kinds through load_checkpoint.

DCP_FORMAT = "rediff-dcp-v1"
META_FILE = "meta.json"


def read_dcp_meta(path: str) -> dict:
    """meta.json of a DCP folder; clear errors for a missing, half-written or foreign folder."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        hint = (f" (an interrupted save left {path}.old: rename it to {path})"
                if os.path.isdir(path + ".old") else "")
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist{hint}")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} has no {META_FILE}: it is not a DCP checkpoint written by "
                         f"distributed.py")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != DCP_FORMAT:
        raise ValueError(f"{meta_path}: field 'format' {meta.get('format')!r}, not {DCP_FORMAT!r}")
    return meta


def load_dcp_state(path: str, state: dict) -> None:
    """Fill `state` in place from the folder's shards, resharded to how this run holds them."""
    import torch.distributed.checkpoint as dcp  # here: it loads slowly, only DCP folders need it
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled": one process, as meant
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(path),
                     no_dist=not dist.is_initialized())
    except Exception as err:  # DCP reports missing or mis-shaped tensors with its own exceptions
        raise ValueError(f"DCP checkpoint {path!r} does not fit this model or optimizer "
                         f"({str(err)[:500]})") from None


def load_dcp(path: str, device="cpu"):
    """load_checkpoint for a DCP folder: (model rebuilt from the saved config, meta)."""
    meta = read_dcp_meta(path)
    model = VLM(VLMConfig.from_dict(meta["model_config"]))
    load_dcp_state(path, {"model": model.state_dict()})  # in place, into the model's own tensors
    return model.to(device), meta


def load_checkpoint(path: str, device="cpu", optimizer=None) -> tuple[VLM, dict]:
    """Rebuild the model from the saved config (never from defaults), load its weights (and the
    optimizer's); a file or a DCP folder."""
    if os.path.isfile(os.path.join(path, META_FILE)):  # a sharded DCP folder
        if optimizer is not None:
            raise ValueError(f"{path!r} is a DCP folder: load its optimizer state with "
                             f"distributed.load_dcp_optimizer")
        return load_dcp(path, device)
    tensors, description = read_checkpoint(path)
    try:
        model = VLM(VLMConfig.from_dict(description["model_config"]))
    except (KeyError, TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"checkpoint {path!r}: field 'model_config' is missing or not understood "
                         f"({err!r}): another version of this code wrote it; re-train it") from None
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"checkpoint {path!r}: its weights do not fit its own model_config "
                         f"({err})") from None
    if optimizer is not None:
        if "optimizer" not in description:
            raise ValueError(f"checkpoint {path!r} holds no optimizer state, so it cannot be "
                             f"resumed; use --init-from")
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        try:
            optimizer.load_state_dict(_unflatten_optimizer(optim_tensors, description["optimizer"]))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"checkpoint {path!r}: its optimizer state does not fit this run's "
                             f"trainable parameters ({err}); start a new run from its weights "
                             f"with --init-from") from None
    return model.to(device), description


def load_for(path: str, purpose: str, stages=None, needs=(), fix: str = "", device="cpu",
             optimizer=None):
    """load_checkpoint for a script's --init-from or --resume: every problem becomes a SystemExit
    that names `purpose`, the file, what it holds, what was expected and `fix`, never a
    state-dict traceback. stages: the accepted values of the checkpoint's "stage" (None: any);
    needs: metadata fields the caller reads."""
    fix = f". Fix: {fix}" if fix else ""
    try:
        model, meta = load_checkpoint(path, device, optimizer)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{purpose}: {err}{fix}") from None
    stage = meta.get("stage")
    if stages is not None and stage not in stages:
        raise SystemExit(f"{purpose}: {path} is a checkpoint of kind {stage!r} (step "
                         f"{meta.get('step')}), expected {' or '.join(map(repr, stages))}{fix}")
    missing = ", ".join(k for k in needs if k not in meta)
    if missing:
        raise SystemExit(f"{purpose}: {path} (kind {stage!r}) lacks the metadata field(s) "
                         f"{missing}, written by every training script of this project{fix}")
    return model, meta
