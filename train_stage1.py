"""train_stage1.py: train the VLM on the shapes world, with the masked-diffusion objective (Eq. 1, the base model and
the mask-trained baseline) or ReDiff's Stage I foundational revision (Eq. 2-3, the default)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import distributed
import rediff
from cli import (UsageError, check_checkpoint_out, option, parse_config, run_main,
                 show_config)


@dataclass
class TrainConfig:
    objective: str = option("revision", "revision: Stage I typed losses (Eq. 2-3), meant to start from a base model "
                            "(--init-from); mask: masked diffusion (Eq. 1, or --mask-loss balanced), the base model",
                            choices=["revision", "mask"])
    out: str = option("out/stage1.safetensors", "checkpoint to write (atomically, every --eval-every steps and at the "
                      "end): NAME.safetensors is one file, NAME.dcp a sharded DCP folder (distributed.py; needed "
                      "for --parallel fsdp)")
    init_from: str = option("", "start from this checkpoint's weights (e.g. a base model); the optimizer starts fresh; "
                            "the model's shape is the checkpoint's (shape flags that contradict it are refused)")
    stop_at: int = option(0, "stop (with a checkpoint) after this step, as an interruption would; 0: run to --steps",
                          at_least=0)
    resume: bool = option(False, "continue the run saved at --out: weights, optimizer, schedule and data position")
    steps: int = option(6000, "optimizer steps", at_least=1)
    batch_size: int = option(64, "samples per step (with several processes: all of them together)",
                             at_least=1)
    lr: float = option(2e-3, "peak learning rate (AdamW)", more_than=0)
    min_lr_frac: float = option(0.1, "the cosine schedule ends at lr * min_lr_frac",
                                at_least=0, at_most=1)
    warmup: int = option(100, "linear warm-up steps", at_least=0)
    weight_decay: float = option(0.01, "AdamW weight decay", at_least=0)
    grad_clip: float = option(1.0, "gradient-norm clip", more_than=0)
    mask_loss: str = option("eq1", "--objective mask: eq1 (the paper's Eq. 1, 1/t-weighted) or balanced (not in the "
                            "paper: Eq. 1's masks, one plain cross-entropy mean per word class: content words, other "
                            "words, end-of-text; rediff.word_class_loss; README \"How the toy model learned to read "
                            "the image\"; --tiny sets it)",
                            choices=["eq1", "balanced"])
    replace_prob: float = option(0.1, "Stage I: chance that a visible answer token is replaced by a random one (paper 0.1, official code 0.05)",
                                 at_least=0, at_most=1)
    t_dependent: bool = option(False, "Stage I: replacement rate min(t, replace_prob) instead of fixed (Table 5 ablation)")
    align_steps: int = option(0, "first steps of an alignment warm-up (not in the paper; an experiment toward "
                              "grounding in the toy world, see the README's Results): only attribute words (colour, "
                              "shape, size) are masked and scored, position words stay visible; counted in --steps",
                              at_least=0)
    hallucination_frac: float = option(0.25, "Stage I: share of each batch drawn as hallucination pairs (0 = syntax errors only)",
                                       at_least=0, at_most=1)
    hallucination_form: str = option("rows", "Stage I: rows (the official code: a pair is a row of its own, the "
                                     "whole altered caption visible, loss on the altered span only) or visible "
                                     "(the paper's text: the pair is put on the tokens left visible after "
                                     "masking)", choices=["rows", "visible"])
    d_model: int = option(256, "language-model width", at_least=1)
    n_layers: int = option(6, "language-model layers", at_least=1)
    n_heads: int = option(8, "attention heads", at_least=1)
    image_size: int = option(48, "shapes-world image side in px (a multiple of 3 * patch size)",
                             at_least=1)
    patch_size: int = option(16, "vision-tower patch size in px", at_least=1)
    vision_width: int = option(128, "vision-tower width", at_least=1)
    vision_layers: int = option(2, "vision-tower layers", at_least=1)
    image_features: str = option("patches", "what the LM sees of the image: patches (LLaVA's mlp2x_gelu projector "
                                 "on the tower's patch tokens, as the paper) or attributes (the pretrained tower's "
                                 "per-cell attribute probabilities and occupancy-scaled cells through a linear "
                                 "projector; README \"How the toy model learned to read the image\"; --tiny sets it)",
                                 choices=["patches", "attributes"])
    prefix_dlm: bool = option(False, "not LLaDA-V: the image and prompt never attend to the answer (LaViDa's "
                              "Prefix-DLM mask), so the sampler's --prefix-cache is exact (README \"Speed\")")
    vision_pretrain_steps: int = option(400, "steps of per-cell attribute pretraining of a fresh vision tower (0: none)",
                                        at_least=0)
    answer_len: int = option(64, "answer length in tokens (captions padded with end-of-text)",
                             at_least=2)
    n_scenes: int = option(20000, "training scenes pre-rendered (each draw gets a fresh caption)",
                           at_least=1)
    eval_every: int = option(500, "steps between validation loss, a sample caption and a checkpoint",
                             at_least=1)
    seed: int = option(0, "seed for initialisation, data order and masking", at_least=0)
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    compile: bool = option(False, "torch.compile the model (about a minute up front; off by default)")
    parallel: str = option("auto", "several processes (torchrun --nproc_per_node N): ddp (a full replica per rank) or "
                           "fsdp (FSDP2: parameters, gradients and Adam states sharded; needs a DCP --out folder); "
                           "auto: ddp under torchrun, none otherwise", choices=["auto", "none", "ddp", "fsdp"])
    param_dtype: str = option("auto", "--parallel fsdp: dtype of the gathered parameters for compute (master weights, "
                              "Adam and gradient reduction stay float32); auto: bfloat16 on CUDA, float32 elsewhere",
                              choices=["auto", "bfloat16", "float32"])
    activation_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                            "pass (less memory, about 1/3 more compute)")


PRESETS = {"tiny": {"help": "the 5-minute CPU preset of the README (small model, fewer steps)",
                    "values": dict(d_model=96, n_layers=4, n_heads=4, steps=3000, batch_size=32, answer_len=48,
                                   image_features="attributes", vision_pretrain_steps=500, n_scenes=10000,
                                   mask_loss="balanced", eval_every=1000)}}


# ----------------------------------------------------------------------------------------------------------------
# Vision pretraining: the paper starts from a pretrained SigLIP; the toy tower learns per-cell attributes first.


def attribute_classes() -> list[int]:
    """Classes per attribute group of the shapes world (shape, colour, size), each with 0 = empty cell."""
    from data import shapes
    return [len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1, len(shapes.SIZES) + 1]


def cell_labels(scenes, grid: int, device) -> torch.Tensor:
    """Per patch (shape, colour, size) class ids, 0 = empty cell, (B, grid * grid, 3)."""
    from data import shapes
    labels = torch.zeros(len(scenes), grid * grid, 3, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for obj in scene["objects"]:
            for r in range(grid):
                for c in range(grid):
                    if r * 3 // grid == obj["row"] and c * 3 // grid == obj["col"]:
                        labels[b, r * grid + c] = torch.tensor([shapes.SHAPES.index(obj["shape"]) + 1,
                                                                shapes.COLOURS.index(obj["colour"]) + 1,
                                                                shapes.SIZES.index(obj["size"]) + 1])
    return labels.to(device)


VISION_LR = 2e-3


def pretrain_vision(model, data, steps: int, batch_size: int, device, seed: int) -> float:
    """Per-cell attribute classification on patch tokens; returns the final accuracy (all three attributes right)."""
    grid = model.cfg.vision.grid
    if grid % 3:
        raise ValueError(f"vision pretraining needs the patch grid ({grid}) to be a multiple of the 3 x 3 scene grid")
    sizes = attribute_classes()
    # With image_features "attributes" the classifier is the model's own attribute head (kept and frozen afterwards);
    # otherwise a throwaway head that only shapes the tower's patch tokens.
    head = model.attribute_head if hasattr(model, "attribute_head") else nn.Linear(model.cfg.vision.width, sum(sizes))
    head = head.to(device)
    if head.out_features != sum(sizes):
        raise ValueError(f"the attribute head has {head.out_features} classes, the shapes world {sum(sizes)}")
    params = list(model.vision_tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.0)
    rng = np.random.default_rng([seed, 10**6])
    bar = tqdm(range(steps), desc="vision pretraining", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:  # a short warm-up, then a cosine to 0: sharper final classes
            group["lr"] = warmup_cosine(step, steps, min(20, steps // 10 + 1), VISION_LR, 0.0)
        index = rng.integers(len(data), size=batch_size)
        tokens = model.vision_tower(data.images(index).to(device))                      # (B, N, Dv)
        labels = cell_labels([data.scenes[i] for i in index], grid, device)            # (B, N, 3)
        logits = head(tokens).split(sizes, dim=-1)                                      # 3 x (B, N, classes)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten()) for k, lg in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct = torch.stack([lg.argmax(-1) == labels[..., k] for k, lg in enumerate(logits)]).all(0)
        bar.set_postfix(loss=f"{loss.item():.3f}", cell_acc=f"{correct.float().mean().item():.3f}")
    return correct.float().mean().item()


# ----------------------------------------------------------------------------------------------------------------


def warmup_cosine(step: int, steps: int, warmup: int, lr: float, min_lr_frac: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from lr down to lr * min_lr_frac at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def learning_rate(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr_frac)


def attribute_ids(tokenizer) -> list[int]:
    """Token ids of the shapes world's attribute words: what the alignment warm-up masks."""
    from data import shapes
    return [tokenizer.encode(word)[0] for word in shapes.COLOURS + shapes.SHAPES + shapes.SIZES]


WORD_CLASSES = ["content", "other", "eos"]  # --mask-loss balanced: one loss mean per class


def word_classes(ids, tokenizer) -> torch.Tensor:
    """Per position (B, L): 0 = a content word only the image can tell (attribute or position), 1 = any other word,
    2 = end-of-text."""
    from data import shapes
    content = attribute_ids(tokenizer) + [tokenizer.encode(word)[0] for word in shapes.POSITIONS]  # one token each
    classes = torch.ones_like(ids)
    classes[torch.isin(ids, torch.tensor(content, device=ids.device))] = 0
    classes[ids == tokenizer.eos_id] = 2
    return classes


def training_loss(model, batch, cfg: TrainConfig, tokenizer, generator, shard=None, objective: str | None = None):
    """One batch's loss for the configured objective -> (loss, {part: value}).

    shard (distributed.Context): `batch` is the global batch; masks and corruptions are drawn for all of it (the
    single-process draws), the model runs on this rank's rows, and the loss is normalised so that its mean over
    ranks is the whole batch's loss (Eq. 1-3: per-sample means over equal shards; the balanced and align losses:
    global counts).
    objective: "align" for the warm-up steps (--align-steps), otherwise cfg.objective."""
    objective = objective or cfg.objective
    rows = slice(None) if shard is None else shard.rows(len(batch.ids))                  # this rank's rows
    images = batch.images[rows]                                                           # (b, 3, S, S)
    if objective == "align":  # the warm-up: attribute words masked, all else visible (rediff.mask_words)
        noisy, is_masked, _ = rediff.mask_words(batch.ids, batch.answer_mask, attribute_ids(tokenizer),
                                                tokenizer.mask_id, generator=generator)
        logits = model(noisy[rows], images=images)                                        # (b, L, V)
        count = None if shard is None else shard.count(is_masked)                         # global count / ranks
        loss = rediff.masked_token_loss(logits, batch.ids[rows], is_masked[rows], count)
        return loss, {"align": loss}
    if objective == "mask":
        noisy, is_masked, p = rediff.forward_mask(batch.ids, batch.answer_mask, tokenizer.mask_id, generator=generator)
        logits = model(noisy[rows], images=images)                                        # (b, L, V)
        if cfg.mask_loss == "balanced":
            classes = word_classes(batch.ids, tokenizer)                                  # (B, L)
            counts = None if shard is None else [shard.count(is_masked & (classes == k))
                                                 for k in range(len(WORD_CLASSES))]
            loss, parts = rediff.word_class_loss(logits, batch.ids[rows], is_masked[rows], classes[rows],
                                                 len(WORD_CLASSES), counts)
            return loss, dict(zip(WORD_CLASSES, parts))
        loss = rediff.masked_diffusion_loss(logits, batch.ids[rows], is_masked[rows], p[rows], batch.answer_mask[rows])
        return loss, {"mask": loss}
    visible_pairs = cfg.hallucination_form == "visible"  # the paper's text; "rows": the official code
    inputs, labels, types, p = rediff.corrupt_for_revision(
        batch.ids, batch.answer_mask, tokenizer.mask_id, tokenizer.ordinary_ids, cfg.replace_prob,
        cfg.t_dependent, batch.wrong_ids if visible_pairs else None,
        batch.wrong_span if visible_pairs else None, generator=generator)
    if not visible_pairs:
        inputs, types, p = rediff.hallucination_rows(batch.ids, batch.answer_mask, batch.wrong_ids,
                                                     batch.wrong_span, inputs, types, p)
    return rediff.typed_losses(model(inputs[rows], images=images), labels[rows], types[rows], p[rows])


@torch.no_grad()
def validation_loss(model, val_data, tokenizer, device, n_batches: int = 4) -> float:
    """Eq. 1 on fixed validation batches (same masks every time), comparable across objectives."""
    model.eval()
    losses = []
    for k in range(n_batches):
        batch = val_data.batch(k, 64).to(device)
        generator = torch.Generator(device=device).manual_seed(k)
        noisy, is_masked, p = rediff.forward_mask(batch.ids, batch.answer_mask, tokenizer.mask_id, generator=generator)
        logits = model(noisy, model.encode_images(batch.images))
        losses.append(rediff.masked_diffusion_loss(logits, batch.ids, is_masked, p, batch.answer_mask).item())
    model.train()
    return sum(losses) / len(losses)


def freeze_vision(model) -> None:
    """The pretrained vision side (tower, and with image_features "attributes" its classifier head) stays fixed."""
    for part in (model.vision_tower, getattr(model, "attribute_head", None)):
        if part is not None:
            part.requires_grad_(False)
            part.eval()


def build_model(cfg: TrainConfig, tokenizer):
    from data.pipeline import prompt_ids
    from model import LMConfig, VisionConfig, VLM, VLMConfig
    lm = LMConfig(vocab_size=tokenizer.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                  mlp_hidden=int(cfg.d_model * 8 / 3) // 16 * 16)
    vision = VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                          layers=cfg.vision_layers, heads=max(1, cfg.vision_width // 32))
    classes = attribute_classes() if cfg.image_features == "attributes" else []
    prefix = len(prompt_ids(tokenizer, vision.grid ** 2)) if cfg.prefix_dlm else 0  # image + prompt positions
    return VLM(VLMConfig(lm=lm, vision=vision, image_token_id=tokenizer.image_id, image_features=cfg.image_features,
                         attribute_classes=classes, prefix_dlm_len=prefix))


# --init-from / --resume: the checkpoint decides the model's shape, so these flags are only checked against it.
SHAPE_FLAGS = {"d_model": ("lm", "d_model"), "n_layers": ("lm", "n_layers"), "n_heads": ("lm", "n_heads"),
               "image_size": ("vision", "image_size"), "patch_size": ("vision", "patch_size"),
               "vision_width": ("vision", "width"), "vision_layers": ("vision", "layers"),
               "image_features": ("", "image_features")}
RESUME_FREE = {"resume", "stop_at", "init_from", "out", "eval_every", "device", "compile", "parallel",
               "activation_checkpointing"}  # may change on --resume


def check_start(cfg: TrainConfig, model, meta: dict, source: str) -> None:
    """Refuse what --init-from / --resume cannot honour, with the fix: a shape flag asked for (on the command line or
    by a preset, i.e. not its default) that differs from the checkpoint, and on --resume another --objective.
    Other settings that differ from the resumed run's are listed (the continuation then differs from one run)."""
    defaults, flag = TrainConfig(), lambda name: "--" + name.replace("_", "-")  # noqa: E731
    saved = {name: getattr(getattr(model.cfg, part) if part else model.cfg, key)
             for name, (part, key) in SHAPE_FLAGS.items()}
    saved["answer_len"] = meta["answer_len"]
    saved["prefix_dlm"] = model.cfg.prefix_dlm_len > 0
    conflicts = [f"{flag(name)} {getattr(cfg, name)} but the checkpoint has {value}" for name, value in saved.items()
                 if getattr(cfg, name) not in (getattr(defaults, name), value)]
    run = meta.get("train_config") or {}
    if cfg.resume and run.get("objective", cfg.objective) != cfg.objective:
        conflicts.append(f"--objective {cfg.objective} but the run was trained with --objective {run['objective']}")
    if conflicts:
        how = ("repeat the run's own flags (e.g. --objective, --tiny), or start a new run from it with --init-from"
               if cfg.resume else "leave these flags out (or give the checkpoint's values): the model comes from it")
        raise SystemExit(f"{'--resume' if cfg.resume else '--init-from'} {source}: {'; '.join(conflicts)}. Fix: {how}")
    if cfg.resume:
        changed = [f"{flag(k)} {getattr(cfg, k)} (was {v})" for k, v in run.items()
                   if k not in RESUME_FREE | set(saved) and hasattr(cfg, k) and getattr(cfg, k) != v]
        if changed:
            print(f"note: resuming {source} with other settings than the run's: {', '.join(changed)}; the "
                  f"continuation will not match an uninterrupted run")


def check_shape_flags(cfg: TrainConfig) -> None:
    """A fresh run's model shape flags must build a model (with --init-from the checkpoint decides)."""
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        raise UsageError(f"--d-model {cfg.d_model} / --n-heads {cfg.n_heads}: each head needs an "
                         f"even width (RoPE); choose --d-model a multiple of 2 x --n-heads")
    if cfg.image_size % (3 * cfg.patch_size):
        raise UsageError(f"--image-size {cfg.image_size}: must be a multiple of 3 x --patch-size "
                         f"{cfg.patch_size} (the scene's 3 x 3 grid of cells), e.g. "
                         f"{3 * cfg.patch_size}")
    heads = max(1, cfg.vision_width // 32)  # build_model's vision heads
    if cfg.vision_width % heads:
        raise UsageError(f"--vision-width {cfg.vision_width}: must be a multiple of its {heads} "
                         f"attention heads (width // 32), e.g. {cfg.vision_width // heads * heads}")


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, description=__doc__, presets=PRESETS)
    check_checkpoint_out(cfg.out, sharded=True)
    if not (cfg.resume or cfg.init_from):
        check_shape_flags(cfg)
    if cfg.parallel == "fsdp" and not distributed.is_dcp(cfg.out):
        raise SystemExit(f"--parallel fsdp writes sharded checkpoints: give --out a folder name, e.g. "
                         f"{cfg.out.removesuffix('.safetensors')}.dcp (python distributed.py makes one file of it)")
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of a torchrun group (and its device)
    print(show_config(cfg))
    from data import shapes
    from data.pipeline import ShapesData
    from data.tokenizer import WordTokenizer, tokenizer_from_dict
    from model import load_for, save_checkpoint
    from sample import caption_images, decode_answer
    torch.manual_seed(cfg.seed)
    device = ctx.device
    try:
        world = shapes.WorldConfig(image_size=cfg.image_size, max_words=cfg.answer_len - 1)
    except ValueError as err:
        raise SystemExit(f"--answer-len {cfg.answer_len}: {err}") from None
    start_step, optimizer_state, history = 0, None, []
    if cfg.resume or cfg.init_from:
        source = cfg.out if cfg.resume else cfg.init_from
        needs = ("tokenizer", "world", "answer_len", "step")
        if cfg.resume:
            model, meta = load_for(source, "--resume", ("stage1-mask", "stage1-revision"), needs, device=device,
                                   fix="--resume continues the Stage I run saved at --out: point --out at one, or drop "
                                   "--resume to start a new run (--init-from FILE to start from other weights; "
                                   "train_stage2.py --resume continues Stage II runs)")
        else:
            model, meta = load_for(source, "--init-from", ("stage1-mask", "stage1-revision", "stage2"), needs,
                                   device=device, fix="pass a checkpoint written by train_stage1.py or train_stage2.py")
        check_start(cfg, model, meta, source)
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        world = shapes.WorldConfig(**meta["world"])
        cfg.answer_len = meta["answer_len"]
        if cfg.resume:
            start_step, history = meta["step"], meta.get("history", [])
            optimizer_state = source
        print(f"loaded {source} (stage {meta['stage']}, step {meta['step']})")
    else:
        tokenizer = WordTokenizer.for_shapes_world()
        model = build_model(cfg, tokenizer).to(device)
        if cfg.objective == "revision":
            print("note: Stage I from scratch. In the shapes world the from-scratch model learned to read the image "
                  "only with --objective mask (README \"Results\"): train a base with it, then Stage I with "
                  "--init-from BASE")
    vision = model.cfg.vision
    t0 = time.perf_counter()
    data = ShapesData(tokenizer, world, "train", cfg.n_scenes, model.n_image_tokens, cfg.answer_len, cfg.seed,
                      vision.mean, vision.std)
    val_data = ShapesData(tokenizer, world, "val", 256, model.n_image_tokens, cfg.answer_len, cfg.seed,
                          vision.mean, vision.std)
    print(f"rendered {len(data)} train + {len(val_data)} val scenes in {time.perf_counter() - t0:.1f} s; "
          f"model {model.num_params() / 1e6:.2f} M parameters on {device}")
    if not (cfg.resume or cfg.init_from) and cfg.vision_pretrain_steps > 0:
        pretrain_vision(model, data, cfg.vision_pretrain_steps, 128, device, cfg.seed)
    freeze_vision(model)  # the tower (and its attribute head) stays frozen, like a pretrained encoder
    train_model = distributed.wrap(model, ctx, cfg.param_dtype, cfg.activation_checkpointing)  # DDP / FSDP2 / model
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP2 replaces them with shards
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if optimizer_state and os.path.isdir(optimizer_state):
        distributed.load_dcp_optimizer(optimizer_state, model, optimizer)  # resharded to this run's processes
    elif optimizer_state:
        load_for(optimizer_state, "--resume", device=device, optimizer=optimizer)
    step_model = torch.compile(train_model) if cfg.compile else train_model

    def save(step):
        meta = {"stage": "stage1-" + cfg.objective, "step": step, "train_config": asdict(cfg),
                "tokenizer": tokenizer.to_dict(), "world": asdict(world), "answer_len": cfg.answer_len,
                "history": history}
        if distributed.is_dcp(cfg.out):
            distributed.save_dcp(cfg.out, model, optimizer, meta, ctx)  # every rank writes its shard
        elif ctx.is_main:
            save_checkpoint(cfg.out, model, meta, optimizer)

    model.train()
    model.vision_tower.eval()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=cfg.objective, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        frac = cfg.hallucination_frac if cfg.objective == "revision" and step >= cfg.align_steps else 0.0
        batch = data.batch(step, cfg.batch_size, frac).to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        objective = "align" if step < cfg.align_steps else cfg.objective
        loss, parts = training_loss(step_model, batch, cfg, tokenizer, generator, ctx, objective)  # this rank's rows
        batch_loss, parts = ctx.mean(loss), ctx.mean(parts)  # the whole batch's values, as one process has them
        if not torch.isfinite(batch_loss):
            raise SystemExit(f"step {step}: loss is {batch_loss.item()}; stopping. The last good checkpoint is "
                             f"{cfg.out} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            whole = distributed.full_copy(model, ctx)  # FSDP: a gathered replica; otherwise the model itself
            val = validation_loss(whole, val_data, tokenizer, device)
            history.append({"step": step + 1, "train_loss": batch_loss.item(), "val_loss": val})
            ids, _ = caption_images(whole, tokenizer, val_data.images([0]).to(device), cfg.answer_len, 1)
            model.train()
            model.vision_tower.eval()
            tqdm.write(f"step {step + 1}: train loss {batch_loss.item():.4f}, val loss (Eq. 1) {val:.4f}\n"
                       f"  sample (val scene 0, 1 token/step): {decode_answer(tokenizer, ids[0])}")
            save(step + 1)
        if step + 1 == cfg.stop_at:
            save(step + 1)
            print(f"stopped at step {step + 1} (--stop-at); continue with --resume")
            break
    names = {"truncated": "captions truncated to --answer-len", "unknown": "unknown words (mapped to <unk>)"}
    for what, count in sorted(data.stats.items()):  # never silent, though the built-in world has neither
        if count:
            print(f"warning: {count} {names.get(what, what)} in the training batches")
    print(f"done in {time.perf_counter() - t0:.0f} s; checkpoint {cfg.out}")
    return model


if __name__ == "__main__":
    run_main(main)
