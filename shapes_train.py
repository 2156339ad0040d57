"""shapes_train.py: the shapes world's side of train_stage1.py's and train_stage2.py's loops (as
llada_v_train.py is a LLaDA-V folder's): the toy model built, or loaded with its flags checked, the
scenes rendered, a fresh tower pretrained and frozen, and the run objects each loop drives. The
scripts pass in their Stage I loss and config (train_stage1.py): this module cannot import them."""
from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import distributed
import rediff
import shapes_aids
from checkpoints import load_for, save_checkpoint
from cli import UsageError, check_checkpoint_out, show_config
from data import shapes
from data.pipeline import ShapesData, image_to_tensor, prompt_ids
from data.score import score_captions
from data.tokenizer import WordTokenizer, tokenizer_from_dict
from model import LMConfig, VLM, VisionConfig, VLMConfig
from sample import caption_images, decode_answer


# --------------------------------------------------------------------------------------------------
# The base model and Stage I on the shapes world (train_stage1.py): the toy model built or checked


def freeze_vision(model) -> None:
    """The vision side (tower, and with image_features "attributes" its classifier head) stays
    fixed in both stages, like a pretrained encoder (the toy tower: shapes_aids.pretrain_vision)."""
    for part in (model.vision_tower, getattr(model, "attribute_head", None)):
        if part is not None:
            part.requires_grad_(False)
            part.eval()


def build_model(cfg, tokenizer):
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


def check_flags(cfg) -> None:
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


RESUME_FREE = {"resume", "stop_at", "init_from", "out", "eval_every", "device", "compile",
               "parallel", "activation_checkpointing"}  # may change on --resume


def check_start(cfg, model, meta: dict, source: str) -> None:
    """Refuse what --init-from / --resume cannot honour, with the fix: a shape flag asked for (on
    the command line or by a preset, i.e. not its default) that differs from the checkpoint, and
    on --resume another --objective. Other settings that differ from the resumed run's are listed
    (the continuation then differs from one run)."""
    defaults, flag = type(cfg)(), lambda name: "--" + name.replace("_", "-")  # noqa: E731
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


@torch.no_grad()
def validation_loss(model, val_data, tokenizer, device, n_batches: int = 4) -> float:
    """Eq. 1 on fixed validation batches (same masks every time), comparable across objectives."""
    model.eval()
    losses = []
    for k in range(n_batches):
        generator = torch.Generator(device=device).manual_seed(k)
        batch = val_data.batch(k, 64).to(device)
        noisy, is_masked, p = rediff.forward_mask(batch.ids, batch.answer_mask, tokenizer.mask_id,
                                                  generator=generator)
        logits = model(noisy, images=batch.images)                                  # (B, L, V)
        loss = rediff.masked_diffusion_loss(logits, batch.ids, is_masked, p, batch.answer_mask)
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


class ShapesRun:
    """A run on the shapes world, set up for train()'s loop: the model built, or loaded from
    --init-from / --resume, the scenes rendered, a fresh tower pretrained (shapes_aids) and frozen,
    the optimizer. The loop calls batch, backward, evaluate, save and finish (as it does
    llada_v_train.Stage1Run's for a LLaDA-V folder). loss_fn: train_stage1.training_loss."""

    def __init__(self, cfg, ctx, loss_fn, label: str = ""):
        print(show_config(cfg))
        self.loss_fn = loss_fn
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
        """The loss on this rank's rows, and its gradients -> (loss, parts)."""
        loss, parts = self.loss_fn(self.step_model, batch, self.cfg, self.tokenizer, generator,
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


# --------------------------------------------------------------------------------------------------
# Stage II on the shapes world (train_stage2.py)


DRAFT_OFFSET = 1_000_000  # drafts: train scenes from this index on; Stage I's banks start at 0
MIX_STEP_OFFSET = 10_000_000  # the mix's batches: ShapesData.batch(offset + step), not Stage I's
INIT_STAGES = ("stage1-revision", "stage1-mask", "stage2")


def load_start(cfg, device):
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


def stage1_config(meta: dict, config_cls):
    """The Stage I TrainConfig of the initial checkpoint, for the mix (Section 3.3: Stage II keeps
    training on Stage I data too)."""
    saved = meta.get("stage1_config") or (meta.get("train_config")
                                          if meta["stage"].startswith("stage1") else None)
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in (saved or {}).items() if k in known})


def draft_quality(drafts: list[dict]) -> dict:
    """Mean headline score (data/score.py) of the round's drafts per drafting speed."""
    by_speed: dict[int, list] = {}
    for d in drafts:
        by_speed.setdefault(d["tokens_per_step"], []).append(d)
    return {s: score_captions([d["text"] for d in ds], [d["scene"] for d in ds])["headline"]
            for s, ds in sorted(by_speed.items())}


def round_report(r: int, cfg, drafts, quality, counts: Counter, samples,
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
    end_round (statistics, history, checkpoint). stage1_loss: train_stage1.training_loss, for the
    Stage I mix; stage1_cls: train_stage1.TrainConfig, the mix's settings (stage1_config)."""
    image_of, expert = None, None  # the drafts hold their rendered images; --expert reviews

    def __init__(self, cfg, ctx, stage1_loss, stage1_cls):
        print(show_config(cfg))
        self.stage1_loss = stage1_loss
        torch.manual_seed(cfg.seed)
        self.cfg, self.ctx = cfg, ctx
        self.model, self.meta, self.first_round = load_start(cfg, ctx.device)
        self.tokenizer = tokenizer_from_dict(self.meta["tokenizer"])
        self.world = shapes.WorldConfig(**self.meta["world"])
        self.answer_len, self.s1 = self.meta["answer_len"], stage1_config(self.meta, stage1_cls)
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
            loss_mix, _ = self.stage1_loss(self.train_model, batch, self.s1, self.tokenizer,
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
