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

import dataclasses
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import distributed
import llada_v_train
import rediff
from cli import (UsageError, check_checkpoint_out, check_writable,
                 option, parse_config, run_main, show_config)
from data import shapes
from data.pipeline import ShapesData, image_to_tensor, prompt_ids
from data.score import score_captions
from data.tokenizer import tokenizer_from_dict
from experts import (RIGHT, Item, check_endpoint, make_expert, merge_rank_caches, rank_cache_path,
                     validate_pairs)
from model import load_for
from sample import caption_images, decode_answer
from train_stage1 import (TrainConfig, freeze_vision, set_learning_rate, training_loss,
                          warmup_cosine)

DRAFT_OFFSET = 1_000_000  # drafts: train scenes from this index on; Stage I's banks start at 0
MIX_STEP_OFFSET = 10_000_000  # the mix's batches: ShapesData.batch(offset + step), not Stage I's
INIT_STAGES = ("stage1-revision", "stage1-mask", "stage2")


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
    rank's rows. Returns each step's losses, of the whole batch."""
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
# Loading, statistics, main


def load_start(cfg: Stage2Config, device):
    """(model, meta, first round) from --init-from, or --out with --resume; else a clear message."""
    if cfg.resume and not os.path.exists(cfg.out):
        raise SystemExit(f"--resume: there is no run to resume at {cfg.out}; start one with "
                         "--init-from")
    if not (cfg.resume or cfg.init_from):
        raise SystemExit("--init-from is required: a Stage I checkpoint (python train_stage1.py "
                         "--tiny) or a base model (python train_stage1.py --objective mask)")
    if not cfg.resume and os.path.abspath(cfg.init_from) == os.path.abspath(cfg.out):
        raise SystemExit(f"--out {cfg.out} would overwrite --init-from; choose another --out")
    path = cfg.out if cfg.resume else cfg.init_from
    fix = (f"to start Stage II from it, pass --init-from {path} and another --out" if cfg.resume
           else "train one with train_stage1.py (Stage I) first")
    model, meta = load_for(path, "--resume" if cfg.resume else "--init-from",
                           ("stage2",) if cfg.resume else INIT_STAGES,
                           ("tokenizer", "world", "answer_len"), fix, device)
    if meta["stage"] == "stage1-mask":  # a legitimate experiment (Stage II alone), not ReDiff
        print(f"note: {path} is a mask-trained model (stage1-mask) without Stage I revision "
              f"training: this run is Stage II alone. For ReDiff, train Stage I first: "
              f"python train_stage1.py --init-from {path}")
    first_round = meta.get("round", 0) if cfg.resume else 0
    print(f"loaded {path} (stage {meta['stage']}, step {meta.get('step')}"
          f"{', round ' + str(first_round) if cfg.resume else ''})")
    return model, meta, first_round


def stage1_config(meta: dict):
    """The Stage I TrainConfig of the initial checkpoint, for the mix (Section 3.3: Stage II keeps
    training on Stage I data too)."""
    saved = meta.get("stage1_config") or (meta.get("train_config")
                                          if meta["stage"].startswith("stage1") else None)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in (saved or {}).items() if k in known})


def draft_quality(drafts: list[dict]) -> dict:
    """Mean headline score (data/score.py) of the round's drafts per drafting speed."""
    by_speed: dict[int, list] = {}
    for d in drafts:
        by_speed.setdefault(d["tokens_per_step"], []).append(d)
    return {s: score_captions([d["text"] for d in ds], [d["scene"] for d in ds])["headline"]
            for s, ds in sorted(by_speed.items())}


def round_report(r: int, cfg: Stage2Config, drafts, quality, counts: Counter, samples,
                 expert_name: str) -> list[str]:
    """Section 3.3's round in numbers: drafts per speed, the expert's review, the alignment."""
    tag = f"round {r + 1}/{cfg.rounds}"
    per_speed = ", ".join(f"{s} tok/step: {sum(d['tokens_per_step'] == s for d in drafts)} drafts, "
                          f"headline {q:.1f}" for s, q in quality.items())
    rejects = {k[len("rejected_"):]: v for k, v in sorted(counts.items())
               if k.startswith("rejected_")}
    rejected = ", ".join(f"{k} {v}" for k, v in rejects.items()) or "none"
    shown = ("right", "no_answer", "no_valid_pair", "corrected_tokens", "changed_tokens")
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                      if not k.startswith(("rejected_", "pairs_")) and k not in shown)
    changed = counts["changed_tokens"] / max(1, counts["corrected_tokens"])
    lines = [f"{tag} | drafts made {len(drafts)} ({per_speed})",
             f"{tag} | expert {expert_name}: right {counts['right']}, no answer "
             f"{counts['no_answer']}, pairs proposed {counts['pairs_proposed']}, kept "
             f"{counts['pairs_kept']}, rejected {sum(rejects.values())} ({rejected})"
             + (f" | {other}" if other else ""),
             f"{tag} | alignment: {len(samples)} training samples ({counts['no_valid_pair']} "
             f"drafts left with no valid pair), {sum(int(s['mistake'].sum()) for s in samples)} "
             f"mistake tokens ({changed:.0%} of them changed by the expert)"]
    if samples:
        fixes = "; ".join(f"{p['org']!r} -> {p['target']!r}" for p in samples[0]["pairs"]
                          if isinstance(p, dict))
        lines += [f"  example draft ({samples[0]['tokens_per_step']} tok/step): "
                  f"{samples[0]['text']}", f"  expert fixes: {fixes}"]
    return lines


class ShapesStage2:
    """Stage II on the shapes world, set up for main()'s rounds (--init-from or --resume loaded,
    the Stage I mix's scenes rendered, the tower frozen), and the pieces a round calls, as
    llada_v_train.Stage2Run's for a LLaDA-V folder: the drafting source of make_drafts
    (draft_items, caption, draft), in_context, the fine-tuning steps (start_round, backward) and
    end_round (statistics, history, checkpoint)."""
    image_of, expert = None, None  # the drafts hold their rendered images; --expert reviews

    def __init__(self, cfg: Stage2Config, ctx):
        print(show_config(cfg))
        torch.manual_seed(cfg.seed)
        self.cfg, self.ctx = cfg, ctx
        self.model, self.meta, self.first_round = load_start(cfg, ctx.device)
        self.tokenizer = tokenizer_from_dict(self.meta["tokenizer"])
        self.world = shapes.WorldConfig(**self.meta["world"])
        self.answer_len, self.s1 = self.meta["answer_len"], stage1_config(self.meta)
        resumed = self.meta if cfg.resume else {}
        self.history, self.step = resumed.get("history", []), resumed.get("step", 0)
        self.state, self.mix_data = cfg.out if cfg.resume else cfg.init_from, None
        if cfg.stage1_mix > 0:
            vision = self.model.cfg.vision
            self.mix_data = ShapesData(self.tokenizer, self.world, "train", cfg.n_scenes,
                                       self.model.n_image_tokens, self.answer_len, cfg.seed,
                                       vision.mean, vision.std)
            print(f"Stage I mix: {cfg.stage1_mix:.0%} of each batch, objective "
                  f"{self.s1.objective}, {cfg.n_scenes} scenes")
        freeze_vision(self.model)  # frozen, as in Stage I
        self.train_model = distributed.wrap(self.model, ctx, cfg.param_dtype,
                                            cfg.activation_checkpointing)  # DDP / FSDP2 / model
        self.t0 = time.perf_counter()

    # drafting: make_drafts captions draft_items, those of one speed together (one prompt)
    def drafting_model(self):
        return distributed.full_copy(self.model, self.ctx).eval()  # FSDP: a gathered replica

    def draft_items(self, round_index: int, n: int) -> list[dict]:
        """Fresh training scenes: never in a Stage I bank, nor in another round."""
        first = DRAFT_OFFSET + round_index * n
        return [dict(shapes.sample("train", i, self.world), index=i)
                for i in range(first, first + n)]

    def tower_input(self, items: list[dict]) -> torch.Tensor:
        """The items' rendered images, normalised for the vision tower, (n, 3, S, S)."""
        vision = self.model.cfg.vision
        return image_to_tensor([item["image"] for item in items], vision.mean, vision.std)

    def caption(self, model, items: list[dict], speed: int) -> torch.Tensor:
        return caption_images(model, self.tokenizer, self.tower_input(items), self.answer_len,
                              speed, refine=True)[0]                               # (b, G)

    def draft(self, item: dict, ids: torch.Tensor, speed: int) -> dict:
        return {"scene_index": item["index"], "tokens_per_step": speed, "ids": ids,
                "text": decode_answer(self.tokenizer, ids), "truth": item["caption"],
                "scene": item["scene"], "image": item["image"]}

    def in_context(self, reviews: list, drafts: list, counts: Counter) -> list:
        return reviews  # a word-level tokenizer: validate_pairs checks everything

    # fine-tuning with Eq. 4 (+ Stage I data)
    def start_round(self, samples: list, round_index: int) -> tuple[int, int]:
        """The round's training tensors and a fresh AdamW -> (steps, warm-up steps)."""
        prompt = torch.tensor(prompt_ids(self.tokenizer, self.model.n_image_tokens))  # (P,)
        E, P = len(samples), len(prompt)
        stack = lambda key: torch.stack([s[key] for s in samples])  # noqa: E731       (E, G)
        self.inputs = torch.cat([prompt.expand(E, -1), stack("ids")], dim=1)  # (E, L): drafts
        self.labels = torch.cat([prompt.expand(E, -1), stack("refined")], dim=1)       # (E, L)
        self.mistake = torch.cat([torch.zeros(E, P, dtype=torch.bool), stack("mistake")],
                                 dim=1)                                                # (E, L)
        self.images = self.tower_input(samples)                                   # (E, 3, S, S)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=(0.9, 0.95),
                                           weight_decay=self.cfg.weight_decay)
        self.model.train()
        self.model.vision_tower.eval()
        return self.cfg.steps, self.cfg.warmup

    def backward(self, samples: list, round_index: int, i: int) -> tuple[torch.Tensor, dict]:
        """Step i: Eq. 4 on this rank's share of the own-draft rows (drawn with replacement), the
        Stage I loss on its share of the mix rows, each weighted by its share of the batch;
        forward and backward -> (loss, parts)."""
        cfg, ctx, device = self.cfg, self.ctx, self.ctx.device
        n_mix = round(cfg.batch_size * cfg.stage1_mix) if self.mix_data is not None else 0
        n_own = cfg.batch_size - n_mix
        rng = np.random.default_rng([cfg.seed, round_index, i])
        pick = torch.from_numpy(rng.integers(len(samples), size=n_own))             # (n_own,)
        own = pick[ctx.rows(n_own)]                                                 # this rank's
        logits = self.train_model(self.inputs[own].to(device),
                                  images=self.images[own].to(device))              # (b, L, V)
        loss_own = rediff.refinement_loss(logits, self.labels[own].to(device),
                                          self.mistake[own].to(device))  # Eq. 4, per draft
        loss, parts = loss_own, {"refine": loss_own}
        if n_mix:
            global_step = MIX_STEP_OFFSET + round_index * cfg.steps + i
            frac = self.s1.hallucination_frac if self.s1.objective == "revision" else 0.0
            batch = self.mix_data.batch(global_step, n_mix, frac).to(device)
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003
                                                                   + global_step)
            loss_mix, _ = training_loss(self.train_model, batch, self.s1, self.tokenizer,
                                        generator, ctx)
            loss = (n_own * loss_own + n_mix * loss_mix) / cfg.batch_size  # by share of the batch
            parts["stage1"] = loss_mix
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def end_round(self, r: int, drafts, counts: Counter, samples, losses, expert_name: str):
        """The round's statistics and history entry, and the checkpoint (weights only)."""
        cfg, meta, quality = self.cfg, self.meta, draft_quality(drafts)
        for line in round_report(r, cfg, drafts, quality, counts, samples, expert_name):
            tqdm.write(line)
        parts = {k: v for k, v in losses[-1].items() if k != "step"} if losses else {}
        self.history.append({"round": r + 1, "step": self.step, "drafts": len(drafts),
                             "samples": len(samples),
                             "draft_headline": {str(k): v for k, v in quality.items()},
                             "expert": dict(counts), **{f"{k}_loss": v for k, v in parts.items()}})
        distributed.save_file(cfg.out, self.model, {  # weights only; rank 0 writes them
            "stage": "stage2", "round": r + 1, "step": self.step, "train_config": asdict(cfg),
            "stage1_config": asdict(self.s1),
            "init_from": cfg.init_from or meta.get("init_from", ""),
            "init_stage": meta.get("init_stage", meta["stage"]),  # stage1-mask: Stage II alone
            "tokenizer": self.tokenizer.to_dict(), "world": asdict(self.world),
            "answer_len": self.answer_len, "expert_stats": dict(counts),
            "history": self.history}, self.ctx)
        self.state = cfg.out
        shown = ", ".join(f"{k} {v:.4f}" for k, v in parts.items())
        tqdm.write(f"round {r + 1}/{cfg.rounds} | step {self.step} | {shown or 'no loss'} | "
                   f"checkpoint {cfg.out} | {time.perf_counter() - self.t0:.0f} s")


def main(argv=None):
    """Section 3.3's rounds: draft, expert review, alignment, fine-tuning (Eq. 4), checkpoint; on
    the shapes world (ShapesStage2) or a LLaDA-V / ReDiff folder (llada_v_train.Stage2Run)."""
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
    run = llada_v_train.Stage2Run(cfg, ctx) if real else ShapesStage2(cfg, ctx)
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
