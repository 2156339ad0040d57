"""finetune_llada_v.py: fine-tune a Hugging Face LLaDA-V / ReDiff folder on real caption data with
the masked-diffusion objective (Eq. 1) or ReDiff's Stage I foundational revision (Eq. 2-3), in one
process or under torchrun (DDP / FSDP2): train_stage1.py's loop on llada_v_train.Stage1Run.

    python finetune_llada_v.py --init-from LLaDA-V --data-json captions.json --image-root images \\
        --out out/rediff-s1 --optimizer adamw8bit --master-dtype bfloat16 \\
        --activation-checkpointing --grad-accum 8                               # one 80 GB GPU
    python sample.py --ckpt out/rediff-s1 --image photo.jpg --tokens-per-step 4

What it writes, how a step splits into micro-batches, and the memory plan: llada_v_train.py.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

import distributed
from cli import parse_config, run_main
from llada_v_train import Stage1Config, Stage1Run, check_flags
from train_stage1 import warmup_cosine


def set_learning_rate(optimizer, lr: float) -> None:
    """Every parameter group at lr times its lr_scale (the vision tower's --vision-lr)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao keeps it in a tensor (compiled step)
            group["lr"].fill_(lr * group.get("lr_scale", 1.0))
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def main(argv=None):
    cfg = parse_config(Stage1Config, argv, description=__doc__.split("\n\n")[0])
    check_flags(cfg)
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or a rank of a torchrun group
    run = Stage1Run(cfg, ctx)
    optimizer, done = run.optimizer, run.start_step
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps,
               desc=cfg.objective, dynamic_ncols=True)
    for step in bar:
        set_learning_rate(optimizer, warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr,
                                                   cfg.min_lr_frac))
        batch = run.batch(step)
        generator = torch.Generator(device=run.draw_device).manual_seed(cfg.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        loss, parts = run.backward(batch, generator)  # this process's rows
        batch_loss, parts = ctx.mean(loss), ctx.mean(parts)  # the whole batch's values
        if not torch.isfinite(batch_loss):
            raise SystemExit(f"step {step}: loss is {batch_loss.item()}; stopping. The last saved "
                             f"state is {run.state} (try a lower --lr)")
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        optimizer.step()
        done = step + 1
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        due = done % cfg.eval_every == 0 or done == cfg.steps
        if due:
            run.history.append(run.evaluate(done, batch_loss, parts))
            run.save(done)
        if done == cfg.stop_at:
            if not due:
                run.save(done)
            print(f"stopped at step {done} (--stop-at); continue with --resume")
            break
    run.finish(done)
    return run.model


if __name__ == "__main__":
    run_main(main)
