"""train_stage1.py: train the VLM on the shapes world, or a LLaDA-V / ReDiff folder on real
captions: the base model with the masked-diffusion objective (Eq. 1, Section 3.1) and ReDiff's
Stage I foundational revision from it (Eq. 2-3, Section 3.2), with one loop for both.

    python train_stage1.py --tiny                   # the CPU recipe: the base, then Stage I from it
    python train_stage1.py --tiny --objective mask  # the base model only
    python train_stage1.py --init-from out/base.safetensors  # Stage I only, from a base model
    python train_stage1.py --init-from LLaDA-V --data-json captions.json --image-root images \\
        --optimizer adamw8bit --master-dtype bfloat16 --activation-checkpointing --grad-accum 8
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import distributed
import llada_v_train
import rediff
import shapes_aids
from cli import (UsageError, check_checkpoint_out, option, parse_config, run_main,
                 show_config)
from data import shapes
from data.pipeline import ShapesData, prompt_ids
from data.tokenizer import WordTokenizer, tokenizer_from_dict
from model import (LMConfig, VLM, VisionConfig, VLMConfig, load_for, read_checkpoint,
                   read_dcp_meta, save_checkpoint)
from sample import caption_images, decode_answer


@dataclass
class TrainConfig(llada_v_train.LLaDAVFlags):
    """The shapes world's flags, then those of a LLaDA-V / ReDiff folder (llada_v_train.py)."""
    objective: str = option("revision", "revision: Stage I (Eq. 2-3); mask: the base (Eq. 1)",
                            choices=["revision", "mask"])
    out: str = option("out/stage1.safetensors", "NAME.safetensors (one file) or NAME.dcp (sharded)")
    init_from: str = option("", "start from these weights (a checkpoint or a LLaDA-V folder)")
    stop_at: int = option(0, "stop with a checkpoint after this step; 0: at --steps", at_least=0)
    resume: bool = option(False, "continue the run saved at --out")
    steps: int = option(6000, "optimizer steps", at_least=1)
    batch_size: int = option(64, "samples per step, all processes together", at_least=1)
    lr: float = option(2e-3, "peak learning rate (AdamW)", more_than=0)
    min_lr_frac: float = option(0.1, "the cosine ends at lr * min_lr_frac", at_least=0, at_most=1)
    warmup: int = option(100, "linear warm-up steps", at_least=0)
    weight_decay: float = option(0.01, "AdamW weight decay", at_least=0)
    grad_clip: float = option(1.0, "gradient-norm clip", more_than=0)
    mask_loss: str = option("eq1", "the base's loss: eq1, or balanced (one mean per word class)",
                            choices=["eq1", "balanced"])
    replace_prob: float = option(0.1, "Stage I: chance a visible answer token is replaced (paper "
                                 "0.1, official code 0.05)", at_least=0, at_most=1)
    t_dependent: bool = option(False, "Stage I: replacement rate min(t, --replace-prob) (Table 5)")
    hallucination_frac: float = option(0.25, "Stage I: share of each batch drawn as hallucination "
                                       "pairs", at_least=0, at_most=1)
    hallucination_form: str = option("rows", "Stage I: rows (official code) or visible (the paper)",
                                     choices=["rows", "visible"])
    d_model: int = option(256, "language-model width", at_least=1)
    n_layers: int = option(6, "language-model layers", at_least=1)
    n_heads: int = option(8, "attention heads", at_least=1)
    image_size: int = option(48, "image side in px (a multiple of 3 x --patch-size)", at_least=1)
    patch_size: int = option(16, "vision-tower patch size in px", at_least=1)
    vision_width: int = option(128, "vision-tower width", at_least=1)
    vision_layers: int = option(2, "vision-tower layers", at_least=1)
    image_features: str = option("patches", "what the LM reads: patches (mlp2x_gelu, the paper) or "
                                 "attributes (the toy tower's)", choices=["patches", "attributes"])
    prefix_dlm: bool = option(False, "LaViDa's Prefix-DLM mask, not LLaDA-V's (an exact cache)")
    vision_pretrain_steps: int = option(400, "a fresh tower's pretraining steps", at_least=0)
    vision_bar: float = option(0.0, "repeat the tower's pretraining until this held-out cell "
                               "accuracy (0: once)", at_least=0, at_most=1)
    answer_len: int = option(64, "answer length in tokens", at_least=2)
    n_scenes: int = option(20000, "training scenes rendered", at_least=1)
    eval_every: int = option(500, "steps between validation and checkpoints", at_least=1)
    seed: int = option(0, "seed for initialisation, data order and masking", at_least=0)
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    compile: bool = option(False, "torch.compile the model")
    parallel: str = option("auto", "ddp, fsdp (needs NAME.dcp --out); auto: ddp under torchrun",
                           choices=["auto", "none", "ddp", "fsdp"])
    param_dtype: str = option("auto", "fsdp compute dtype; auto: bfloat16 on CUDA",
                              choices=["auto", "bfloat16", "float32"])
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass")


# The --tiny recipe, both phases in one place. `python train_stage1.py --tiny` trains the base
# model with "values" and --objective mask (Eq. 1's masks: the phase the from-scratch toy model
# needs to read the image), then Stage I from the base's weights with "values" and "stage1",
# each phase exactly as its own command would (flags given on the command line win in both).
# With --init-from only Stage I runs, and "stage1" is not applied.
PRESETS = {"tiny": {"help": "the CPU recipe: a base model (Eq. 1 masks), then Stage I from it",
                    "values": dict(d_model=96, n_layers=4, n_heads=4, steps=3000, batch_size=32,
                                   answer_len=48, image_features="attributes",
                                   vision_pretrain_steps=500, vision_bar=0.99, n_scenes=10000,
                                   mask_loss="balanced", eval_every=1000),
                    "stage1": dict(steps=600, lr=1e-3, warmup=20, n_scenes=3000)}}


# ------------------------------------------------------------------------------------------------
# One training step's pieces


def warmup_cosine(step: int, steps: int, warmup: int, lr: float, min_lr_frac: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from lr down to lr * min_lr_frac at
    `steps` (the paper's fine-tuning schedule: cosine with warm-up)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_loss(model, batch, cfg: TrainConfig, tokenizer, generator, shard=None):
    """One batch's loss for cfg.objective -> (loss, {part: value}). mask: Eq. 1 on Section 3.1's
    masks (--mask-loss balanced: the shapes world's word-class loss on the same masks); revision:
    Eq. 2-3 on Section 3.2's corruption.

    shard (distributed.Context): `batch` is the global batch; masks and corruptions are drawn for
    all of it (the single-process draws), the model runs on this rank's rows, and the loss is
    normalised so that its mean over ranks is the whole batch's loss (Eq. 1-3: per-sample means
    over equal shards; the word-class loss: global counts)."""
    rows = slice(None) if shard is None else shard.rows(len(batch.ids))    # this rank's rows
    images = batch.images[rows]                                             # (b, 3, S, S)
    if cfg.objective == "mask":
        noisy, is_masked, p = rediff.forward_mask(batch.ids, batch.answer_mask, tokenizer.mask_id,
                                                  generator=generator)
        logits = model(noisy[rows], images=images)                          # (b, L, V)
        if cfg.mask_loss == "balanced":
            classes = shapes_aids.word_classes(batch.ids, tokenizer)        # (B, L)
            n_classes = len(shapes_aids.WORD_CLASSES)
            counts = None if shard is None else [shard.count(is_masked & (classes == k))
                                                 for k in range(n_classes)]
            loss, parts = shapes_aids.word_class_loss(logits, batch.ids[rows], is_masked[rows],
                                                      classes[rows], n_classes, counts)
            return loss, dict(zip(shapes_aids.WORD_CLASSES, parts))
        loss = rediff.masked_diffusion_loss(logits, batch.ids[rows], is_masked[rows], p[rows],
                                            batch.answer_mask[rows])
        return loss, {"mask": loss}
    visible_pairs = cfg.hallucination_form == "visible"  # the paper's text; rows: the official code
    inputs, labels, types, p = rediff.corrupt_for_revision(
        batch.ids, batch.answer_mask, tokenizer.mask_id, tokenizer.ordinary_ids, cfg.replace_prob,
        cfg.t_dependent, batch.wrong_ids if visible_pairs else None,
        batch.wrong_span if visible_pairs else None, generator=generator)
    if not visible_pairs:
        inputs, types, p = rediff.hallucination_rows(batch.ids, batch.answer_mask, batch.wrong_ids,
                                                     batch.wrong_span, inputs, types, p)
    logits = model(inputs[rows], images=images)                             # (b, L, V)
    return rediff.typed_losses(logits, labels[rows], types[rows], p[rows])


@torch.no_grad()
def validation_loss(model, val_data, tokenizer, device, n_batches: int = 4) -> float:
    """Eq. 1 on fixed validation batches (same masks every time), comparable across objectives."""
    model.eval()
    eq1, losses = TrainConfig(objective="mask", mask_loss="eq1"), []
    for k in range(n_batches):
        generator = torch.Generator(device=device).manual_seed(k)
        loss, _ = training_loss(model, val_data.batch(k, 64).to(device), eq1, tokenizer, generator)
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def freeze_vision(model) -> None:
    """The vision side (tower, and with image_features "attributes" its classifier head) stays
    fixed in both stages, like a pretrained encoder (the toy tower: shapes_aids.pretrain_vision)."""
    for part in (model.vision_tower, getattr(model, "attribute_head", None)):
        if part is not None:
            part.requires_grad_(False)
            part.eval()


def build_model(cfg: TrainConfig, tokenizer):
    """A fresh VLM of cfg's shape: LLaDA-V's architecture (vision tower, projector, LLaDA),
    scaled down."""
    lm = LMConfig(vocab_size=tokenizer.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                  n_heads=cfg.n_heads, mlp_hidden=int(cfg.d_model * 8 / 3) // 16 * 16)
    vision = VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size,
                          width=cfg.vision_width, layers=cfg.vision_layers,
                          heads=max(1, cfg.vision_width // 32))
    classes = shapes_aids.attribute_classes() if cfg.image_features == "attributes" else []
    # the image and prompt positions, under the Prefix-DLM mask
    prefix = len(prompt_ids(tokenizer, vision.grid ** 2)) if cfg.prefix_dlm else 0
    return VLM(VLMConfig(lm=lm, vision=vision, image_token_id=tokenizer.image_id,
                         image_features=cfg.image_features, attribute_classes=classes,
                         prefix_dlm_len=prefix))


RESUME_FREE = {"resume", "stop_at", "init_from", "out", "eval_every", "device", "compile",
               "parallel", "activation_checkpointing"}  # may change on --resume


def check_start(cfg: TrainConfig, model, meta: dict, source: str) -> None:
    """Refuse what --init-from / --resume cannot honour, with the fix: a shape flag asked for (on
    the command line or by a preset, i.e. not its default) that differs from the checkpoint, and
    on --resume another --objective. Other settings that differ from the resumed run's are listed
    (the continuation then differs from one run)."""
    defaults, flag = TrainConfig(), lambda name: "--" + name.replace("_", "-")  # noqa: E731
    lm, vision = model.cfg.lm, model.cfg.vision  # the checkpoint decides the model's shape:
    saved = dict(d_model=lm.d_model, n_layers=lm.n_layers, n_heads=lm.n_heads,
                 image_size=vision.image_size, patch_size=vision.patch_size,
                 vision_width=vision.width, vision_layers=vision.layers,
                 image_features=model.cfg.image_features, answer_len=meta["answer_len"],
                 prefix_dlm=model.cfg.prefix_dlm_len > 0)
    conflicts = [f"{flag(name)} {getattr(cfg, name)} but the checkpoint has {value}"
                 for name, value in saved.items()
                 if getattr(cfg, name) not in (getattr(defaults, name), value)]
    run = meta.get("train_config") or {}
    if cfg.resume and run.get("objective", cfg.objective) != cfg.objective:
        conflicts.append(f"--objective {cfg.objective} but the run was trained with --objective "
                         f"{run['objective']}")
    if conflicts:
        how = ("repeat the run's own flags (e.g. --objective, --tiny), or start a new run from it "
               "with --init-from" if cfg.resume else
               "leave these flags out (or give the checkpoint's values): the model comes from it")
        raise SystemExit(f"{'--resume' if cfg.resume else '--init-from'} {source}: "
                         f"{'; '.join(conflicts)}. Fix: {how}")
    if cfg.resume:
        changed = [f"{flag(k)} {getattr(cfg, k)} (was {v})" for k, v in run.items()
                   if k not in RESUME_FREE | set(saved) and hasattr(cfg, k)
                   and getattr(cfg, k) != v]
        if changed:
            print(f"note: resuming {source} with other settings than the run's: "
                  f"{', '.join(changed)}; the continuation will not match an uninterrupted run")


def check_flags(cfg: TrainConfig) -> None:
    """Refuse, before any work, an --out or model shape that the run cannot use (one line, with the
    fix); with --init-from or --resume the checkpoint decides the shape."""
    check_checkpoint_out(cfg.out, sharded=True)
    if cfg.parallel == "fsdp" and not distributed.is_dcp(cfg.out):
        raise SystemExit(f"--parallel fsdp writes sharded checkpoints: give --out a folder name, "
                         f"e.g. {cfg.out.removesuffix('.safetensors')}.dcp (python distributed.py "
                         f"makes one file of it)")
    if cfg.resume or cfg.init_from:
        return
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        raise UsageError(f"--d-model {cfg.d_model} / --n-heads {cfg.n_heads}: each head needs an "
                         f"even width (RoPE); choose --d-model a multiple of 2 x --n-heads")
    if cfg.image_size % (3 * cfg.patch_size):
        raise UsageError(f"--image-size {cfg.image_size}: must be a multiple of 3 x --patch-size "
                         f"(the scene's 3 x 3 cells), e.g. {3 * cfg.patch_size}")
    heads = max(1, cfg.vision_width // 32)  # build_model's vision heads
    if cfg.vision_width % heads:
        raise UsageError(f"--vision-width {cfg.vision_width}: must be a multiple of its {heads} "
                         f"attention heads (width // 32), e.g. {cfg.vision_width // heads * heads}")



class ShapesRun:
    """A run on the shapes world, set up for train()'s loop: the model built, or loaded from
    --init-from / --resume, the scenes rendered, a fresh tower pretrained (shapes_aids) and frozen,
    the optimizer. The loop calls batch, backward, evaluate, save and finish (as it does
    llada_v_train.Stage1Run's for a LLaDA-V folder)."""

    def __init__(self, cfg: TrainConfig, ctx, label: str = ""):
        print(show_config(cfg))
        torch.manual_seed(cfg.seed)
        device = self.draw_device = ctx.device  # masks and corruptions are drawn on the device
        try:
            world = shapes.WorldConfig(image_size=cfg.image_size, max_words=cfg.answer_len - 1)
        except ValueError as err:
            raise SystemExit(f"--answer-len {cfg.answer_len}: {err}") from None
        self.start_step, self.history = 0, []
        if cfg.resume or cfg.init_from:
            source = cfg.out if cfg.resume else cfg.init_from
            fix = ("point --out at a Stage I run, or drop --resume to start a new one "
                   "(train_stage2.py --resume continues Stage II runs)" if cfg.resume else
                   "pass a checkpoint written by train_stage1.py or train_stage2.py")
            stages = ("stage1-mask", "stage1-revision") + (() if cfg.resume else ("stage2",))
            model, meta = load_for(source, "--resume" if cfg.resume else "--init-from", stages,
                                   ("tokenizer", "world", "answer_len", "step"), fix, device)
            check_start(cfg, model, meta, source)
            tokenizer = tokenizer_from_dict(meta["tokenizer"])
            world = shapes.WorldConfig(**meta["world"])
            cfg.answer_len = meta["answer_len"]
            if cfg.resume:
                self.start_step, self.history = meta["step"], meta.get("history", [])
            print(f"loaded {source} (stage {meta['stage']}, step {meta['step']})")
        else:
            tokenizer = WordTokenizer.for_shapes_world()
            model = build_model(cfg, tokenizer).to(device)
            if cfg.objective == "revision":
                print("note: Stage I from scratch; the from-scratch model learned to read the "
                      "image only with --objective mask first (--tiny does both)")
        vision, self.t0 = model.cfg.vision, time.perf_counter()
        data, self.val_data = (ShapesData(tokenizer, world, split, n, model.n_image_tokens,
                                          cfg.answer_len, cfg.seed, vision.mean, vision.std)
                               for split, n in (("train", cfg.n_scenes), ("val", 256)))
        print(f"rendered {len(data)} train + {len(self.val_data)} val scenes in "
              f"{time.perf_counter() - self.t0:.1f} s; model {model.num_params() / 1e6:.2f} M "
              f"parameters on {device}")
        if not (cfg.resume or cfg.init_from) and cfg.vision_pretrain_steps > 0:
            shapes_aids.pretrain_vision(model, data, cfg.vision_pretrain_steps, 128, device,
                                        cfg.seed, label=label + ": " if label else "",
                                        held_out=self.val_data, bar=cfg.vision_bar)
        model.train()
        freeze_vision(model)  # the tower (and its attribute head) stays frozen, in eval mode
        train_model = distributed.wrap(model, ctx, cfg.param_dtype,
                                       cfg.activation_checkpointing)  # DDP / FSDP2 / the model
        self.params = [p for p in model.parameters() if p.requires_grad]  # after wrap: shards
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95),
                                           weight_decay=cfg.weight_decay)
        if cfg.resume and os.path.isdir(cfg.out):  # resharded to this run's ranks
            distributed.load_dcp_optimizer(cfg.out, model, self.optimizer)
        elif cfg.resume:
            load_for(cfg.out, "--resume", device=device, optimizer=self.optimizer)
        self.step_model = torch.compile(train_model) if cfg.compile else train_model
        self.cfg, self.ctx, self.model, self.tokenizer = cfg, ctx, model, tokenizer
        self.world, self.data, self.state = world, data, cfg.out

    def batch(self, step: int):
        """The global batch of `step`, with Stage I's hallucination pairs."""
        frac = self.cfg.hallucination_frac if self.cfg.objective == "revision" else 0.0
        return self.data.batch(step, self.cfg.batch_size, frac).to(self.ctx.device)

    def backward(self, batch, generator) -> tuple[torch.Tensor, dict]:
        """training_loss on this rank's rows, and its gradients -> (loss, parts)."""
        loss, parts = training_loss(self.step_model, batch, self.cfg, self.tokenizer, generator,
                                    self.ctx)
        loss.backward()
        return loss.detach(), parts

    def evaluate(self, step: int, loss: torch.Tensor, parts: dict) -> dict:
        """Eq. 1 on the validation scenes and a sample caption -> the history entry of `step`."""
        whole = distributed.full_copy(self.model, self.ctx)  # FSDP: a gathered replica
        val = validation_loss(whole, self.val_data, self.tokenizer, self.ctx.device)
        images = self.val_data.images([0]).to(self.ctx.device)              # (1, 3, S, S)
        ids, _ = caption_images(whole, self.tokenizer, images, self.cfg.answer_len, 1)
        self.model.train()
        self.model.vision_tower.eval()
        tqdm.write(f"step {step}: train loss {loss.item():.4f}, val loss (Eq. 1) {val:.4f}\n"
                   f"  sample (val scene 0, 1 token/step): {decode_answer(self.tokenizer, ids[0])}")
        return {"step": step, "train_loss": loss.item(), "val_loss": val}

    def save(self, step: int) -> None:
        """The checkpoint at --out: one file, or each rank's shard of a DCP folder."""
        cfg = self.cfg
        meta = {"stage": "stage1-" + cfg.objective, "step": step, "train_config": asdict(cfg),
                "tokenizer": self.tokenizer.to_dict(), "world": asdict(self.world),
                "answer_len": cfg.answer_len, "history": self.history}
        if distributed.is_dcp(cfg.out):
            distributed.save_dcp(cfg.out, self.model, self.optimizer, meta, self.ctx)
        elif self.ctx.is_main:
            save_checkpoint(cfg.out, self.model, meta, self.optimizer)

    def finish(self, step: int) -> None:
        """The end of the run: what it did, and every rank waits until the checkpoint is whole."""
        print(f"done in {time.perf_counter() - self.t0:.0f} s; checkpoint {self.cfg.out}")
        self.ctx.barrier()


def set_learning_rate(optimizer, lr: float) -> None:
    """Each parameter group at lr x its lr_scale (a LLaDA-V tower's --vision-lr); torchao's
    optimizers keep the rate in a tensor, filled in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def train(cfg: TrainConfig, label: str = ""):
    """One training run of cfg.objective (Eq. 1 or Eq. 2-3) on the shapes world (ShapesRun) or on a
    LLaDA-V / ReDiff folder (llada_v_train.Stage1Run), from its start, --init-from or --resume,
    with a checkpoint every --eval-every steps and at the end. label: names the progress bars (a
    phase of the --tiny recipe). Returns the model."""
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of torchrun's
    real = llada_v_train.selected(cfg.init_from)
    run = llada_v_train.Stage1Run(cfg, ctx) if real else ShapesRun(cfg, ctx, label)
    done = run.start_step
    bar = tqdm(range(done, cfg.steps), initial=done, total=cfg.steps,
               desc=label or cfg.objective, dynamic_ncols=True)
    for step in bar:
        set_learning_rate(run.optimizer, warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr,
                                                       cfg.min_lr_frac))
        batch = run.batch(step)
        generator = torch.Generator(device=run.draw_device).manual_seed(cfg.seed * 1_000_003 + step)
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = run.backward(batch, generator)  # this rank's rows, forward and backward
        batch_loss, parts = ctx.mean(loss), ctx.mean(parts)  # the whole batch's, as in one process
        if not torch.isfinite(batch_loss):
            raise SystemExit(f"step {step}: loss is {batch_loss.item()}; stopping. The last good "
                             f"checkpoint is {run.state} (try a lower --lr)")
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        run.optimizer.step()
        done = step + 1
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        due = done % cfg.eval_every == 0 or done == cfg.steps
        if due:
            run.history.append(run.evaluate(done, batch_loss, parts))
        if due or done == cfg.stop_at:
            run.save(done)
        if done == cfg.stop_at:
            print(f"stopped at step {done} (--stop-at); continue with --resume")
            break
    bar.close()
    run.finish(done)
    return run.model


# ------------------------------------------------------------------------------------------------
# The --tiny recipe in one command: the base model, then Stage I from it


def saved_run(path: str) -> tuple[dict | None, bool]:
    """(description, whether the run reached its --steps) of the checkpoint at `path` (a file or
    a DCP folder); (None, False) when there is none."""
    if not os.path.exists(path):
        return None, False
    try:
        meta = read_dcp_meta(path) if os.path.isdir(path) else read_checkpoint(path)[1]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{path}: {err}. Fix: move it away; --tiny writes there") from None
    return meta, meta.get("step", 0) >= meta.get("train_config", {}).get("steps", math.inf)


def train_tiny_recipe(cfg: TrainConfig, argv: list[str]):
    """`--tiny` without --init-from and --objective mask: the recipe's two phases, each exactly as
    its own command. The base model (Eq. 1's masks, Section 3.1: the phase the from-scratch toy
    model needs), written to base.safetensors in --out's folder, then Stage I from its weights
    (Eq. 2-3, Section 3.2), written to --out. A finished base is reused; --resume continues
    whichever phase was interrupted. Returns the Stage I model (None when a phase stopped early,
    --stop-at)."""
    folder = os.path.dirname(cfg.out.rstrip("/"))
    kind = ".dcp" if distributed.is_dcp(cfg.out) else ".safetensors"
    base = os.path.join(folder, "base" + kind)  # the recipe's base model, beside --out
    if os.path.abspath(base) == os.path.abspath(cfg.out.rstrip("/")):
        raise UsageError(f"--out {cfg.out}: --tiny writes its base model there; name Stage I's "
                         f"checkpoint otherwise, e.g. {os.path.join(folder, 'stage1' + kind)}")
    base_args = [*argv, "--objective", "mask", "--out", base]
    stage1_preset = [item for key, value in PRESETS["tiny"]["stage1"].items()  # as flags
                     for item in ("--" + key.replace("_", "-"), str(value))]
    stage1_args = [*stage1_preset, *argv, "--init-from", base]
    base_cfg = parse_config(TrainConfig, base_args, presets=PRESETS)
    check_flags(base_cfg)
    check_flags(parse_config(TrainConfig, stage1_args, presets=PRESETS))
    ctx = distributed.setup(cfg.parallel, cfg.device)  # before any print: other ranks stay quiet
    trained = []  # (what, checkpoint, steps, seconds; None: reused)

    def run_phase(label: str, what: str, args: list[str], resume: bool):
        args = args + ["--resume" if resume else "--no-resume"]  # argv may hold --resume
        print(f"phase {label}: {what}: python train_stage1.py {' '.join(args)}")
        start = time.perf_counter()
        phase_cfg = parse_config(TrainConfig, args, presets=PRESETS)
        model = train(phase_cfg, label)
        saved, finished = saved_run(phase_cfg.out)
        if not finished:
            return None  # stopped early (--stop-at): the phase said how to continue
        trained.append((what, phase_cfg.out, saved["step"], time.perf_counter() - start))
        return model

    saved, finished = saved_run(base)
    if finished:
        run = saved.get("train_config") or {}  # the settings that change the numbers:
        changed = [f"--{k.replace('_', '-')} {run[k]} (now {v})"
                   for k, v in asdict(base_cfg).items()
                   if k not in RESUME_FREE and k in run and run[k] != v]
        if changed:
            raise SystemExit(f"{base} is a base model trained with other settings "
                             f"({', '.join(changed)}). Fix: delete it to train it again, or start "
                             f"Stage I from it with --init-from {base}")
        print(f"phase 1/2: the finished base model {base} (step {saved['step']}) is reused; "
              f"delete it to train it again")
        trained.append(("the base model (Eq. 1 masks)", base, saved["step"], None))
    elif saved is not None and not cfg.resume:
        raise SystemExit(f"{base} holds an interrupted base model (step {saved['step']}). Fix: "
                         f"continue it with --resume, or delete it to start over")
    elif run_phase("1/2 base", "the base model (Eq. 1 masks)", base_args,
                   resume=saved is not None) is None:
        return None
    ctx.barrier()
    model = run_phase("2/2 Stage I", "Stage I from the base (Eq. 2-3)", stage1_args,
                      resume=cfg.resume and os.path.exists(cfg.out))
    if model is None:
        return None
    print("\nthe --tiny recipe trained:")
    for what, path, steps, seconds in trained:
        minutes, secs = divmod(round(seconds or 0), 60)  # 130.4 -> 2 min 10 s
        took = f"{minutes} min {secs} s" if minutes else f"{secs} s"
        took = "reused" if seconds is None else took
        print(f"  {what}: {path}, {steps} steps, {took}")
    ckpt = "" if cfg.out == TrainConfig().out else f" --ckpt {cfg.out}"
    print(f"next: python sample.py --tokens-per-step 8{ckpt}")
    return model


def main(argv=None):
    """The command line: the --tiny recipe's two phases, or one training run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(TrainConfig, argv, description=__doc__, presets=PRESETS)
    real = llada_v_train.choose(cfg, argv, llada_v_train.STAGE1_DEFAULTS)  # --init-from FOLDER
    if "--tiny" in argv and cfg.objective == "revision" and not cfg.init_from:
        return train_tiny_recipe(cfg, argv)
    (llada_v_train.check_flags if real else check_flags)(cfg)
    return train(cfg)


if __name__ == "__main__":
    run_main(main)
