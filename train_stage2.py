"""train_stage2.py: ReDiff Stage II, online self-correction (Section 3.3, Eq. 4 of arXiv
2510.19871), on the shapes world or a LLaDA-V / ReDiff folder (--init-from FOLDER), one loop.

Each of --rounds rounds:
  1. drafts     the current model captions fresh training scenes (or images of --data-json) with
                the refining sampler, at several speeds (--tokens-per-step 1 4 8: the paper's
                128 / 32 / 16 steps);
  2. expert     an expert reviews each draft: "right", or {org, target} pairs of equal token
                count (experts.py);
  3. alignment  each kept pair is located in the draft's token ids: the mistake mask marks its
                positions, and the refined target is the draft with the corrections applied;
  4. fine-tune  Eq. 4: the input is the model's own draft (no masking), the loss the cross-entropy
                on the mistake positions only; --stage1-mix of every batch is ordinary Stage I data;
then a checkpoint and the round's statistics.

    python train_stage2.py --tiny --init-from out/stage1.safetensors --out out/stage2.safetensors
    OPENAI_API_KEY=... python train_stage2.py --init-from out/stage1.safetensors --expert openai \\
        --cache out/expert.jsonl
    OPENAI_API_KEY=... python train_stage2.py --init-from out/rediff-s1 --data-json captions.json \\
        --image-root images --out out/rediff-s2                    # LLaDA-V (llada_v_train.py)

A rerun with --resume continues after the last finished round; with --expert openai, answers
already in --cache are never requested again.
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

import distributed
import llada_v_train
import shapes_train
from cli import UsageError, check_checkpoint_out, check_writable, option, parse_config, run_main
from experts import (RIGHT, Item, check_endpoint, make_expert, merge_rank_caches, rank_cache_path,
                     validate_pairs)
from train_stage1 import TrainConfig, set_learning_rate, training_loss, warmup_cosine



@dataclass
class Stage2Config(llada_v_train.LLaDAVStage2Flags):
    """The shapes world's flags, then those of a LLaDA-V / ReDiff folder (llada_v_train.py)."""
    init_from: str = option("", "required: the Stage I checkpoint (a base model, --objective mask: "
                            "Stage II alone); a Hugging Face LLaDA-V / ReDiff folder: the real "
                            "model, with its own defaults and the flags from --data-json on")
    out: str = option("out/stage2.safetensors", "NAME.safetensors written (atomically, weights "
                      "only) after every round; NAME.dcp folders are train_stage1.py's")
    resume: bool = option(False, "continue the run saved at --out after its last finished round")
    stop_at: int = option(0, "stop after this round, as an interruption would; 0: all --rounds",
                          at_least=0)
    rounds: int = option(1, "rounds of draft -> expert -> fine-tune (the paper: one round gives "
                         "most of the gain)", at_least=1)
    drafts_per_round: int = option(1536, "drafts per round, on fresh training scenes (the paper: "
                                   "about 10k)", at_least=1)
    tokens_per_step: list = option([1, 4, 8], "drafting speeds, the round's scenes spread over "
                                   "them", nargs="+", type=int, at_least=1)
    draft_batch: int = option(128, "captions drafted together", at_least=1)
    expert: str = option("oracle", "who reviews the drafts: oracle (knows the scene), openai (an "
                         "LLM), align (word alignment with the ground truth)",
                         choices=["oracle", "openai", "align"])
    expert_model: str = option("o4-mini", "--expert openai: the chat model")
    expert_base_url: str = option("", "--expert openai: an OpenAI-compatible endpoint (empty: "
                                  "api.openai.com); the key is read from OPENAI_API_KEY only")
    max_in_flight: int = option(8, "--expert openai: most requests at once per process", at_least=1)
    cache: str = option("out/expert_cache.jsonl", "--expert openai: answer cache (empty: none)")
    stage1_mix: float = option(0.25, "share of every batch that is Stage I data, with the initial "
                               "checkpoint's objective (0: none)", at_least=0, less_than=1)
    n_scenes: int = option(4000, "scenes pre-rendered for the Stage I mix", at_least=1)
    steps: int = option(300, "optimizer steps per round", at_least=1)
    batch_size: int = option(64, "samples per step, all processes together", at_least=1)
    lr: float = option(3e-4, "peak learning rate (AdamW; cosine, restarted every round)",
                       more_than=0)
    min_lr_frac: float = option(0.1, "the cosine ends at lr * min_lr_frac", at_least=0, at_most=1)
    warmup: int = option(10, "linear warm-up steps (the paper: 3 percent of the steps)", at_least=0)
    weight_decay: float = option(0.01, "AdamW weight decay", at_least=0)
    grad_clip: float = option(1.0, "gradient-norm clip", more_than=0)
    seed: int = option(0, "seed for batches and the Stage I mix", at_least=0)
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    parallel: str = option("auto", "torchrun: ddp or fsdp, drafts and expert calls split over the "
                           "ranks; auto: ddp under torchrun", choices=distributed.MODES)
    param_dtype: str = option("auto", "--parallel fsdp: dtype of the gathered parameters; auto: "
                              "bfloat16 on CUDA", choices=["auto", "bfloat16", "float32"])
    activation_checkpointing: bool = option(False, "recompute each block's activations in the "
                                            "backward pass (less memory)")


PRESETS = {"tiny": {"help": "a CPU-sized run, the reproduction's recipe: 3072 drafts, 120 steps x "
                            "32 at 1e-4 (about 2 min on 2 CPU cores)",
                    "values": dict(drafts_per_round=3072, draft_batch=64, steps=120,
                                   batch_size=32, n_scenes=1000, lr=1e-4)}}


# -------------------------------------------------------------------------------------------------
# 1. Drafts


@torch.no_grad()
def make_drafts(model, source, cfg: Stage2Config, round_index: int, ctx) -> list[dict]:
    """Section 3.3's drafts: caption round `round_index`'s fresh items (source.draft_items:
    shapes-world scenes, or images of --data-json) with the refining sampler; item k at
    tokens_per_step[k % n]. Items of one speed and one "group" (a LLaDA-V prompt length) are
    drafted --draft-batch at a time; chunk j is rank j mod N's, and every rank gets every draft:
    those of one process."""
    items = source.draft_items(round_index, cfg.drafts_per_round)
    speeds = [cfg.tokens_per_step[k % len(cfg.tokens_per_step)] for k in range(len(items))]
    groups: dict[tuple, list] = {}
    for k, item in enumerate(items):
        groups.setdefault((speeds[k], item.get("group", 0)), []).append(k)
    chunks = [rows[i:i + cfg.draft_batch] for _, rows in sorted(groups.items())
              for i in range(0, len(rows), cfg.draft_batch)]
    ids = {}
    for j, chunk in enumerate(tqdm(chunks, desc=f"round {round_index + 1} drafts",
                                   dynamic_ncols=True)):
        if j % ctx.world == ctx.rank:  # else another rank's chunk
            out = source.caption(model, [items[k] for k in chunk], speeds[chunk[0]])  # (b, G)
            ids.update(zip(chunk, out.tolist()))
    # every rank gets every draft (JSON keys come back as strings)
    ids = {int(k): row for share in ctx.gather(ids) for k, row in share.items()}
    return [source.draft(item, torch.tensor(ids[k]), speeds[k]) for k, item in enumerate(items)]

# -------------------------------------------------------------------------------------------------
# 2. Expert review


def review_drafts(expert, drafts: list[dict], ctx, image_of=None) -> tuple[list, Counter]:
    """(the expert's review of every draft, the expert's statistics for them): each rank reviews
    its own contiguous share (its own API calls) and every rank gets all reviews, in draft order.
    image_of(draft): the image the expert sees, read when asked (LLaDA-V drafts); None:
    draft["image"]."""
    share, before = ctx.part(len(drafts)), Counter(expert.counts)
    reviews = expert.review([Item(d["text"], d["truth"], d["scene"],
                                  image_of(d) if image_of else d["image"])
                             for d in drafts[share.start:share.stop]])
    counts = sum((Counter(c) for c in ctx.gather(dict(expert.counts - before))), Counter())
    return [review for part in ctx.gather(reviews) for review in part], counts

# -------------------------------------------------------------------------------------------------
# 3. Alignment


def apply_corrections(draft_ids: torch.Tensor, kept) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft ids (G,), validated (start, target ids) pairs -> (refined ids (G,), mistake mask (G,)
    bool). The mask covers each corrected segment whole, as in Eq. 4 (unchanged words included)."""
    refined, mistake = draft_ids.clone(), torch.zeros_like(draft_ids, dtype=torch.bool)
    for start, target in kept:
        refined[start:start + len(target)] = torch.tensor(target, dtype=draft_ids.dtype)
        mistake[start:start + len(target)] = True
    return refined, mistake


def align(drafts: list[dict], reviews: list, tokenizer, counts: Counter) -> list[dict]:
    """Section 3.3: reviews -> training samples (validated pairs -> refined target, mistake mask).
    Drafts that are "right", unanswered, or left with no valid pair are dropped (and counted)."""
    samples = []
    for draft, review in zip(drafts, reviews):
        if review is None:
            counts["no_answer"] += 1
        elif review == RIGHT:
            counts["right"] += 1
        elif not (kept := validate_pairs(review, draft["ids"].tolist(), tokenizer, counts)):
            counts["no_valid_pair"] += 1
        else:
            refined, mistake = apply_corrections(draft["ids"], kept)
            counts["corrected_tokens"] += int(mistake.sum())  # the positions Eq. 4 trains on
            counts["changed_tokens"] += int((refined != draft["ids"]).sum())  # the expert's changes
            samples.append({**draft, "refined": refined, "mistake": mistake, "pairs": review})
    return samples

# -------------------------------------------------------------------------------------------------
# 4. Fine-tuning with Eq. 4 (+ Stage I data)


def finetune(run, samples: list, cfg: Stage2Config, round_index: int, ctx) -> list[dict]:
    """Eq. 4 on the round's corrected drafts (plus the Stage I mix): the round's optimizer steps,
    its cosine schedule restarted (run.start_round: its steps and warm-up); run.backward runs this
    rank's rows (rediff.refinement_loss on the model's own drafts: shapes_train.ShapesStage2's, or
    llada_v_train.eq4_loss). Returns each step's losses, of the whole batch."""
    steps, warmup = run.start_round(samples, round_index)
    losses = []
    bar = tqdm(range(steps), desc=f"round {round_index + 1} fine-tune", dynamic_ncols=True)
    for i in bar:
        set_learning_rate(run.optimizer, warmup_cosine(i, steps, warmup, cfg.lr, cfg.min_lr_frac))
        run.optimizer.zero_grad(set_to_none=True)
        loss, parts = run.backward(samples, round_index, i)
        parts = {k: v.item() for k, v in ctx.mean({**parts, "total": loss}).items()}  # whole batch
        if not math.isfinite(total := parts["total"]):
            raise SystemExit(f"round {round_index + 1}, step {i}: loss is {total}; stopping. The "
                             f"last good checkpoint is {run.state} (try a lower --lr)")
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        run.optimizer.step()
        losses.append({"step": run.step + i + 1, **parts})
        bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
    bar.close()
    return losses

# -------------------------------------------------------------------------------------------------
# The rounds


def main(argv=None):
    """Section 3.3's rounds: draft, expert review, alignment, fine-tuning (Eq. 4), checkpoint; on
    the shapes world (shapes_train.ShapesStage2) or a LLaDA-V / ReDiff folder
    (llada_v_train.Stage2Run)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(Stage2Config, argv, description=__doc__.split("\n\n")[0], presets=PRESETS)
    real = llada_v_train.choose(cfg, argv, llada_v_train.STAGE2_DEFAULTS)  # --init-from FOLDER
    if real:
        llada_v_train.check_flags(cfg)
    else:
        check_checkpoint_out(cfg.out, sharded=False)
    if cfg.batch_size - round(cfg.batch_size * cfg.stage1_mix) < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} with --stage1-mix {cfg.stage1_mix} leaves "
                         f"no row for the model's own drafts; raise --batch-size or lower "
                         f"--stage1-mix")
    if cfg.expert == "openai" and not cfg.drafts_json:  # recorded drafts ask no expert
        check_writable(cfg.cache, "--cache")
        check_endpoint(cfg.expert_base_url, "--expert-base-url", cfg.cache)  # before any drafting
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of torchrun's
    run = (llada_v_train.Stage2Run(cfg, ctx) if real  # the world's run; the Stage I mix's loss
           else shapes_train.ShapesStage2(cfg, ctx, training_loss, TrainConfig))  # and config
    if run.first_round >= cfg.rounds:
        print(f"{cfg.out} has finished {run.first_round} rounds already (--rounds {cfg.rounds}): "
              f"nothing to do")
        return run.model
    shared_cache = cfg.expert == "openai" and cfg.cache and run.expert is None
    if shared_cache and ctx.is_main:
        merge_rank_caches(cfg.cache)  # answers an interrupted multi-process run left per rank
    ctx.barrier()
    expert = run.expert or make_expert(cfg.expert, cfg.expert_model, cfg.expert_base_url or None,
                                       cfg.cache or None, cfg.max_in_flight)
    if shared_cache and not ctx.is_main:  # every rank reads the shared cache; rank 0 appends
        expert.cache.path = rank_cache_path(cfg.cache, ctx.rank)
    for r in range(run.first_round, cfg.rounds):
        drafts = make_drafts(run.drafting_model(), run, cfg, r, ctx)
        reviews, counts = review_drafts(expert, drafts, ctx, run.image_of)  # and its statistics
        if shared_cache and ctx.is_main:
            merge_rank_caches(cfg.cache)  # the other ranks' new answers (all gathered)
        samples = align(drafts, run.in_context(reviews, drafts, counts), run.tokenizer, counts)
        losses = finetune(run, samples, cfg, r, ctx) if samples else []
        run.step += len(losses)
        run.end_round(r, drafts, counts, samples, losses, expert.name)
        if r + 1 == cfg.stop_at:
            print(f"stopped after round {r + 1} (--stop-at); continue with --resume")
            break
    return run.model


if __name__ == "__main__":
    run_main(main)
