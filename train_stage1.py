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

import checkpoints
import distributed
import llada_v_train
import rediff
import shapes_aids
import shapes_train
from cli import UsageError, option, parse_config, run_main


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


def set_learning_rate(optimizer, lr: float) -> None:
    """Each parameter group at lr x its lr_scale (a LLaDA-V tower's --vision-lr); torchao's
    optimizers keep the rate in a tensor, filled in place."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def train(cfg: TrainConfig, label: str = ""):
    """One training run of cfg.objective (Eq. 1 or Eq. 2-3) on the shapes world
    (shapes_train.ShapesRun) or on a LLaDA-V / ReDiff folder (llada_v_train.Stage1Run), from its
    start, --init-from or --resume, with a checkpoint every --eval-every steps and at the end.
    label: names the progress bars (a phase of the --tiny recipe). Returns the model."""
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of torchrun's
    real = llada_v_train.selected(cfg.init_from)
    run = (llada_v_train.Stage1Run(cfg, ctx) if real  # the world's run, given this file's loss:
           else shapes_train.ShapesRun(cfg, ctx, training_loss, label))
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
    shapes_train.check_flags(base_cfg)
    shapes_train.check_flags(parse_config(TrainConfig, stage1_args, presets=PRESETS))
    ctx = distributed.setup(cfg.parallel, cfg.device)  # before any print: other ranks stay quiet
    trained = []  # (what, checkpoint, steps, seconds; None: reused)

    def run_phase(label: str, what: str, args: list[str], resume: bool):
        args = args + ["--resume" if resume else "--no-resume"]  # argv may hold --resume
        print(f"phase {label}: {what}: python train_stage1.py {' '.join(args)}")
        start = time.perf_counter()
        phase_cfg = parse_config(TrainConfig, args, presets=PRESETS)
        model = train(phase_cfg, label)
        saved, finished = checkpoints.saved_run(phase_cfg.out)
        if not finished:
            return None  # stopped early (--stop-at): the phase said how to continue
        trained.append((what, phase_cfg.out, saved["step"], time.perf_counter() - start))
        return model

    saved, finished = checkpoints.saved_run(base)
    if finished:
        run = saved.get("train_config") or {}  # the settings that change the numbers:
        changed = [f"--{k.replace('_', '-')} {run[k]} (now {v})"
                   for k, v in asdict(base_cfg).items()
                   if k not in shapes_train.RESUME_FREE and k in run and run[k] != v]
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
    (llada_v_train if real else shapes_train).check_flags(cfg)
    return train(cfg)


if __name__ == "__main__":
    run_main(main)
