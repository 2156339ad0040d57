"""finetune_llada_v_stage2.py: ReDiff Stage II, online self-correction (Section 3.3, Eq. 4 of
arXiv 2510.19871), for a Hugging Face LLaDA-V / ReDiff folder and real caption data, in one process
or under torchrun (DDP / FSDP2): train_stage2.py's rounds on llada_v_train.Stage2Run.

Each of --rounds rounds:
  1. drafts     the current model captions the next --drafts-per-round images of --data-json (a
                fresh slice of a shuffled pass) with the refining sampler at --tokens-per-step
                1 4 8 of --gen-length 128 (the paper's 128 / 32 / 16 steps);
  2. expert     --expert openai (o4-mini in the paper; any OpenAI-compatible endpoint, the key from
                OPENAI_API_KEY only, answers cached in --cache) sees the image, the reference
                caption and the draft and answers "right" or {org, target} pairs;
  3. alignment  org occurs exactly once in the draft, target has org's token count; the target is
                the draft with the kept corrections applied, the mistake mask their positions;
  4. fine-tune  Eq. 4 on the model's own drafts (no masking), the cross-entropy on the mistake
                positions only; --stage1-mix of every batch is Stage I rows of --data-json;
then the round's statistics and the resumable training state (OUT.dcp). At the end a Hugging Face
folder (--out), which llada_v.load_llada_v and sample.py --ckpt read.

    OPENAI_API_KEY=... python finetune_llada_v_stage2.py --init-from out/rediff-s1 \\
        --data-json captions.json --image-root images --out out/rediff-s2
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

import distributed
import train_stage2
from cli import parse_config, run_main
from experts import make_expert, merge_rank_caches, rank_cache_path
from finetune_llada_v import set_learning_rate
from llada_v_train import Stage2Config, Stage2Run, check_flags
from train_stage1 import warmup_cosine


@torch.no_grad()
def make_drafts(model, source, cfg, round_index: int, ctx) -> list[dict]:
    """Caption the round's fresh items (source.draft_items) with the refining sampler; item k at
    tokens_per_step[k % n]. Items of one speed and one source.draft_group are drafted --draft-batch
    at a time; chunk j is rank j mod N's, and every rank gets every draft: those of one process."""
    items = source.draft_items(round_index, cfg.drafts_per_round)
    speeds = [cfg.tokens_per_step[k % len(cfg.tokens_per_step)] for k in range(len(items))]
    groups: dict[tuple, list] = {}
    for k, item in enumerate(items):
        groups.setdefault((speeds[k], source.draft_group(item)), []).append(k)
    chunks = [rows[i:i + cfg.draft_batch] for _, rows in sorted(groups.items())
              for i in range(0, len(rows), cfg.draft_batch)]
    model.eval()
    ids = {}
    for j, chunk in enumerate(tqdm(chunks, desc=f"round {round_index + 1} drafts",
                                   dynamic_ncols=True)):
        if j % ctx.world == ctx.rank:  # else another rank's chunk
            out = source.caption(model, [items[k] for k in chunk], speeds[chunk[0]])  # (b, G)
            ids.update(zip(chunk, out.tolist()))
    if ctx.world > 1:  # JSON keys come back as strings
        ids = {int(k): row for share in ctx.gather(ids) for k, row in share.items()}
    return [source.draft(item, torch.tensor(ids[k]), speeds[k]) for k, item in enumerate(items)]


def finetune(run, samples: list, cfg, round_index: int, ctx) -> list[dict]:
    """One round's optimizer steps (the cosine schedule restarts every round); returns each step's
    whole-batch losses."""
    steps, warmup = run.round_steps(samples)
    optimizer, losses = run.optimizer, []
    for i in tqdm(range(steps), desc=f"round {round_index + 1} fine-tune", dynamic_ncols=True):
        set_learning_rate(optimizer, warmup_cosine(i, steps, warmup, cfg.lr, cfg.min_lr_frac))
        optimizer.zero_grad(set_to_none=True)
        loss, parts = run.backward(samples, round_index, i)  # this process's rows
        parts = {k: v.item() for k, v in ctx.mean({**parts, "total": loss}).items()}
        if not math.isfinite(parts["total"]):
            raise SystemExit(f"round {round_index + 1}, step {i}: loss is {parts['total']}; "
                             f"stopping. The last saved state is {run.state} (try a lower --lr)")
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        optimizer.step()
        losses.append({"step": run.step + i + 1, **parts})
    return losses


def report(r: int, cfg, drafts, counts, samples, losses, expert_name: str) -> list[str]:
    """The round's statistics: drafts per speed, the expert's answers and pairs, training drafts,
    losses."""
    tag = f"round {r + 1}/{cfg.rounds}"
    speeds = ", ".join(f"{s} tok/step {sum(d['tokens_per_step'] == s for d in drafts)}"
                       for s in sorted(set(cfg.tokens_per_step)))
    words = sum(len(d["text"].split()) for d in drafts) / max(1, len(drafts))
    rejected = {k[len("rejected_"):]: v for k, v in sorted(counts.items())
                if k.startswith("rejected_")}
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                      if not k.startswith(("rejected_", "pairs_"))
                      and k not in ("right", "no_answer", "no_valid_pair"))
    lines = [f"{tag} | drafts {len(drafts)} ({speeds}), {words:.1f} words on average",
             f"{tag} | expert {expert_name}: right {counts['right']}, no answer "
             f"{counts['no_answer']}, pairs proposed {counts['pairs_proposed']}, kept "
             f"{counts['pairs_kept']}, rejected {sum(rejected.values())} "
             f"({', '.join(f'{k} {v}' for k, v in rejected.items()) or 'none'})"
             + (f" | {other}" if other else ""),
             f"{tag} | {len(samples)} drafts to train on ({counts['no_valid_pair']} left with no "
             f"valid pair), {sum(int(s['mistake'].sum()) for s in samples)} mistake tokens"]
    if samples:
        fixes = "; ".join(f"{p['org']!r} -> {p['target']!r}" for p in samples[0]["pairs"]
                          if isinstance(p, dict))
        lines += [f"  example draft ({samples[0]['tokens_per_step']} tok/step): "
                  f"{samples[0]['text'][:300]}", f"  its pairs (kept or not): {fixes[:300]}"]
    if losses:
        last = ", ".join(f"{k} {v:.4f}" for k, v in losses[-1].items() if k != "step")
        lines.append(f"{tag} | {len(losses)} steps, total loss {losses[0]['total']:.4f} -> {last}")
    return lines


def main(argv=None):
    cfg = parse_config(Stage2Config, argv, description=__doc__.split("\n\n")[0])
    check_flags(cfg)
    train_stage2.check_round_flags(cfg)
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or a rank of a torchrun group
    run = Stage2Run(cfg, ctx)
    shared_cache = cfg.expert == "openai" and cfg.cache
    if shared_cache and ctx.is_main:
        merge_rank_caches(cfg.cache)  # answers an interrupted multi-process run left per rank
    ctx.barrier()
    expert = make_expert(cfg.expert, cfg.expert_model, cfg.expert_base_url or None,
                         cfg.cache or None, cfg.max_in_flight)
    if shared_cache and not ctx.is_main:  # every rank reads the shared cache; rank 0 appends
        expert.cache.path = rank_cache_path(cfg.cache, ctx.rank)
    for r in range(run.first_round, cfg.rounds):
        drafts = make_drafts(run.drafting_model(), run, cfg, r, ctx)
        for k in ctx.part(len(drafts)):  # the share review_drafts gives this rank
            drafts[k]["image"] = run.image_of(drafts[k])
        reviews, counts = train_stage2.review_drafts(expert, drafts, ctx)
        for draft in drafts:
            draft["image"] = None
        if shared_cache and ctx.is_main:
            merge_rank_caches(cfg.cache)  # the other ranks' new answers (gathered: all answered)
        reviews = run.in_context(reviews, drafts, counts)
        samples = train_stage2.align(drafts, reviews, run.tokenizer, counts)
        losses = finetune(run, samples, cfg, r, ctx) if samples else []
        run.step += len(losses)
        run.history.append({"round": r + 1, "step": run.step, "drafts": len(drafts),
                            "samples": len(samples), "expert": dict(counts), "losses": losses,
                            "mistake_tokens": sum(int(s["mistake"].sum()) for s in samples)})
        for line in report(r, cfg, drafts, counts, samples, losses, expert.name):
            print(line)
        if not samples:
            print(f"round {r + 1}: no draft to train on (all right, or no valid pair)")
        run.save(r + 1)
        if r + 1 == cfg.stop_at:
            print(f"stopped after round {r + 1} (--stop-at); continue with --resume")
            return run.model
    run.finish()
    return run.model


if __name__ == "__main__":
    run_main(main)
