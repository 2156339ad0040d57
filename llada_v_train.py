"""llada_v_train.py: what train_stage1.py and train_stage2.py need beyond their shared loops to
train a Hugging Face LLaDA-V / ReDiff folder (--init-from FOLDER): its flags and defaults, the
memory plan check, caption batches, the optimizer options, micro-batches, the training state and
the export.

    python train_stage1.py --init-from LLaDA-V --data-json captions.json --image-root images \\
        --out out/rediff-s1 --optimizer adamw8bit --master-dtype bfloat16 \\
        --activation-checkpointing --grad-accum 8                               # one 80 GB GPU

A run writes --out, a Hugging Face folder in LLaDA-V's own layout (llada_v.export_hf), at the end,
and OUT.dcp, the training state that --resume continues in any number of processes (distributed.py),
every --eval-every steps. A step's masks and corruptions are drawn on the global batch's answers;
each process runs its rows in --grad-accum micro-batches, each padded to its own longest row, and
adds up their gradients: one process with --grad-accum 2 trains the weights of two with 1.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import distributed
import rediff
from cli import UsageError, check_folder_out, option, show_config
from data.captions import CaptionData, load_captions, take
from data.loaders import DataError, load_llava_json, open_image
from experts import Expert, occurrences
from llada_v import (MASK_ID, answer_logits, anyres_images, check_hf_folder, export_hf,
                     generate_answer, load_llada_v, read_state)
from memory_plan import GIB, check_memory

MASTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def selected(path: str) -> bool:
    """Whether --init-from names a folder that is not a DCP checkpoint: a Hugging Face LLaDA-V /
    ReDiff folder, which the training scripts train with this module's flags and pieces."""
    return (bool(path) and os.path.isdir(path)
            and not os.path.isfile(os.path.join(path, distributed.META_FILE)))


@dataclass
class LLaDAVFlags:
    """train_stage1.py's flags for --init-from FOLDER, after the shapes world's (TrainConfig)."""
    data_json: str = option("", "FOLDER: captions as LLaVA / ShareGPT4V conversation JSON")
    image_root: str = option("", "FOLDER: the folder image paths are relative to (empty: "
                             "--data-json's)")
    vicrit_train_json: str = option("", "FOLDER: ViCrit-Train hallucination pairs as released")
    vicrit_jsonl: str = option("", "FOLDER: hallucination pairs (image, caption, hallucinated)")
    skip_missing: bool = option(False, "FOLDER: skip (and count) records without their image")
    skip_bad: bool = option(False, "FOLDER: skip (and count) malformed records")
    vision_lr: float = option(1e-6, "FOLDER: the vision tower's peak learning rate; 0 freezes it",
                              at_least=0)
    optimizer: str = option("adamw", "FOLDER: adamw (torch, 8 bytes a parameter in float32) or "
                            "adamw8bit (torchao, about 2)", choices=["adamw", "adamw8bit"])
    master_dtype: str = option("float32", "FOLDER: dtype of the trained weights and gradients "
                               "(bfloat16 needs adamw8bit)", choices=["float32", "bfloat16"])
    grad_accum: int = option(1, "FOLDER: micro-batches per step in each process", at_least=1)
    save_dtype: str = option("bfloat16", "FOLDER: dtype of the exported --out shards",
                             choices=["bfloat16", "float32"])
    shard_gb: float = option(5.0, "FOLDER: largest exported shard in GB", more_than=0)
    device_memory_gib: float = option(0.0, "FOLDER: one device's memory in GiB for the memory "
                                      "plan (0: the device's own)", at_least=0)
    plan_image: str = option("640x480", "FOLDER: WIDTHxHEIGHT of a memory plan's sample image")
    ignore_memory_plan: bool = option(False, "FOLDER: go on when the memory plan does not fit")
    save: bool = option(True, "FOLDER: write the training state and the export")


@dataclass
class LLaDAVStage2Flags(LLaDAVFlags):
    """train_stage2.py's flags for --init-from FOLDER: Stage I's, the drafts' length, and recorded
    drafts."""
    gen_length: int = option(128, "FOLDER: draft length in tokens, one block", at_least=1)
    drafts_json: str = option("", "FOLDER: ReDiff's Stage II records (LLaVA JSON, the draft as "
                              "the answer, its corrections in \"revise\"), trained as they are")


# --init-from FOLDER: the real model's defaults (the paper's recipe) for the flags not given
RECIPE = dict(steps=0, batch_size=32, lr=5e-6, min_lr_frac=0.0, warmup=-1, weight_decay=0.0)
STAGE1_DEFAULTS = dict(RECIPE, out="out/llada-v-stage1", answer_len=128)
STAGE2_DEFAULTS = dict(RECIPE, out="out/llada-v-stage2", drafts_per_round=10000, draft_batch=16,
                       expert="openai", cache="out/expert_cache_llada_v.jsonl")
SHAPES_ONLY = {"tiny", "mask_loss", "hallucination_form", "d_model", "n_layers", "n_heads",
               "image_size", "patch_size", "vision_width", "vision_layers", "image_features",
               "prefix_dlm", "vision_pretrain_steps", "n_scenes", "compile"}
WARMUP_FRAC = 0.03  # steps 0 (one epoch) and warmup -1: the paper's 3 percent of the steps


def choose(cfg, argv: list, defaults: dict) -> bool:
    """Whether cfg trains a LLaDA-V / ReDiff folder (--init-from FOLDER). Then the flags not given
    take the real model's defaults, and a flag of the shapes world is refused; otherwise a flag of
    the folder's is. Returns the choice."""
    given = {arg[2:].split("=")[0].removeprefix("no-").replace("-", "_") for arg in argv
             if arg.startswith("--")}  # --no-save sets save
    real = selected(cfg.init_from)
    wrong = sorted(given & (SHAPES_ONLY if real else {f.name for f in fields(LLaDAVStage2Flags)}))
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise UsageError(f"{flag}: a flag of the shapes world; with --init-from {cfg.init_from} "
                         f"the model is the folder's; leave it out" if real else
                         f"{flag}: a flag of the real model; give --init-from a Hugging Face "
                         f"LLaDA-V / ReDiff folder")
    if real:
        for name in set(defaults) - given:
            setattr(cfg, name, defaults[name])
    return real


def check_flags(cfg) -> None:
    """Refuse, before any work, what a run cannot do: a missing --init-from folder or --data-json,
    bfloat16 weights without the stochastic rounding of --optimizer adamw8bit (with plain rounding
    a step of lr 5e-6 is below half of bf16's spacing for most weights and is lost), hallucination
    pairs with Eq. 1, an export --out that is not a folder, the shapes world's oracle expert."""
    if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):  # nor meta.json (DCP)
        raise SystemExit(f"--init-from {cfg.init_from}: no config.json (nor a sharded checkpoint's "
                         f"meta.json); give a downloaded LLaDA-V / ReDiff folder "
                         f"(huggingface-cli download GSAI-ML/LLaDA-V --local-dir DIR)")
    if not cfg.data_json:
        raise SystemExit("--data-json is required with --init-from FOLDER (--help lists the flags)")
    check_hf_folder(cfg.init_from, "--init-from")
    check_folder_out(cfg.out, "the Hugging Face export")
    if cfg.master_dtype == "bfloat16" and cfg.optimizer != "adamw8bit":
        raise UsageError("--master-dtype bfloat16 needs --optimizer adamw8bit (its bf16 stochastic "
                         "rounding keeps the small updates that plain rounding to bf16 would drop)")
    objective = getattr(cfg, "objective", None) or mix_settings(cfg.init_from).objective
    if (cfg.vicrit_jsonl or cfg.vicrit_train_json) and (
            objective != "revision" or not getattr(cfg, "stage1_mix", 1)):
        raise SystemExit("--vicrit-jsonl / --vicrit-train-json feed Stage I's hallucination term: "
                         "use them with --objective revision (and, in Stage II, --stage1-mix > 0)")
    if getattr(cfg, "expert", "") == "oracle":
        raise UsageError("--expert oracle knows the shapes world's scenes; with --init-from FOLDER "
                         "choose --expert openai or align")


@dataclass
class MixSettings:
    """Stage I's settings for Stage II's --stage1-mix rows: those the --init-from export was
    trained with (its llada_v.STATE_FILE), else Stage I's defaults (a downloaded folder)."""
    objective: str = "revision"
    replace_prob: float = 0.1
    t_dependent: bool = False
    hallucination_frac: float = 0.25
    answer_len: int = 128


def mix_settings(folder: str) -> MixSettings:
    state = read_state(folder)
    saved = state.get("stage1_config") or state.get("train_config") or {}
    return MixSettings(**{f.name: saved[f.name] for f in fields(MixSettings) if f.name in saved})

# --------------------------------------------------------------------------------------------------
# Training pieces: optimizer options, micro-batches, mixed precision, resume


def prepare_training(model, ctx, cfg):
    """Set what trains (everything; the vision tower only with --vision-lr > 0), wrap (DDP / FSDP2 /
    the model itself, with activation checkpointing), build AdamW with the tower in a group of its
    own (lr_scale: the loop's learning rate times it) -> (train_model, params, optimizer). AdamW is
    torch's (states in the weights' dtype) or torchao's AdamW8bit (block-wise 8-bit states; with
    bfloat16 weights it rounds each update stochastically, so that lr 5e-6 is not lost)."""
    tower_trains = cfg.vision_lr > 0
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(tower_trains)
    model.train()
    if cfg.activation_checkpointing and tower_trains:  # a trained tower stores 26 layers a crop
        distributed.checkpoint_blocks(model.vision_tower.trunk.blocks)
    train_model = distributed.wrap(model, ctx, cfg.param_dtype, cfg.activation_checkpointing)
    tower = {id(p) for p in model.vision_tower.parameters()}  # after wrap: FSDP2 shards them
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in tower], "lr_scale": 1.0}]
    if tower_trains:
        groups.append({"params": [p for p in params if id(p) in tower],
                       "lr_scale": cfg.vision_lr / cfg.lr})
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, **adam)
    else:
        try:  # imported here: an optional dependency whose import takes seconds
            from torchao.optim import AdamW8bit
        except ImportError:
            raise SystemExit("--optimizer adamw8bit needs torchao: pip install -r "
                             "requirements.txt") from None
        optimizer = AdamW8bit(groups, **adam, bf16_stochastic_round=cfg.master_dtype == "bfloat16")
    count = lambda ps: sum(p.numel() for p in ps) / 1e9  # noqa: E731  (a DTensor counts whole)
    print(f"model {count(model.parameters()):.3f} B parameters ({count(params):.3f} B trainable) "
          f"on {ctx.device}, {ctx.world} process(es), parallel {ctx.mode}, optimizer "
          f"{cfg.optimizer}, weights {cfg.master_dtype}")
    return train_model, params, optimizer


def micro_batches(n_rows: int, ctx, grad_accum: int) -> list[slice]:
    """This process's rows of a global batch of n_rows, in grad_accum consecutive micro-batches of
    equal size: micro-batch j of rank r holds global rows (r grad_accum + j) m .. + m - 1, m =
    n_rows / (world grad_accum)."""
    mine = ctx.rows(n_rows)
    m, rest = divmod(mine.stop - mine.start, grad_accum)
    if rest or not m:
        raise SystemExit(f"--batch-size {n_rows} does not split into {ctx.world} process(es) x "
                         f"--grad-accum {grad_accum} equal micro-batches; make it a multiple of "
                         f"{ctx.world * grad_accum}")
    return [slice(mine.start + j * m, mine.start + (j + 1) * m) for j in range(grad_accum)]


def autocast_for(cfg, ctx, drafting: bool = False):
    """bf16 autocast on CUDA, but not to train under FSDP (FSDP2 casts through its
    MixedPrecisionPolicy); else nothing."""
    dtype = distributed.resolve_dtype(cfg.param_dtype, ctx.device)
    return (torch.autocast(ctx.device.type, dtype=dtype)
            if dtype != torch.float32 and (drafting or ctx.mode != "fsdp") else nullcontext())


def accumulate(train_model, ctx, micro: list, autocast, loss_of) -> tuple[torch.Tensor, dict]:
    """Gradient accumulation: loss_of(rows) -> (loss, parts) for each micro-batch, each backward
    scaled by 1/len(micro) so that the gradients add up to the mean's; DDP synchronises on the last
    micro-batch only. Returns this process's mean loss and parts over its micro-batches (detached).
    """
    total, sums = 0.0, {}
    for j, rows in enumerate(micro):
        last = j == len(micro) - 1
        with train_model.no_sync() if ctx.mode == "ddp" and not last else nullcontext():
            with autocast:
                loss, parts = loss_of(rows)
            (loss / len(micro)).backward()
        total = total + loss.detach() / len(micro)
        sums = {k: sums.get(k, 0.0) + v.detach() / len(micro) for k, v in parts.items()}
    return total, sums


RESUME_FREE = {"resume", "stop_at", "out", "eval_every", "device", "parallel", "save",
               "activation_checkpointing", "param_dtype", "save_dtype", "shard_gb", "init_from",
               "grad_accum", "device_memory_gib", "plan_image", "ignore_memory_plan"}


def check_resume(cfg, meta: dict, world: int = 1) -> None:
    """Refuse a resume that cannot continue the run; note settings that make it differ from an
    uninterrupted one. --grad-accum may change with the number of processes: the micro-batches stay
    the same while processes x grad_accum does."""
    run, flag = meta.get("train_config", {}), lambda k: "--" + k.replace("_", "-")  # noqa: E731
    conflicts = [f"{flag(k)} {getattr(cfg, k)} but the run used {run[k]}"
                 for k in ("objective", "answer_len", "optimizer", "master_dtype")
                 if k in run and hasattr(cfg, k) and run[k] != getattr(cfg, k)]
    if conflicts:
        raise SystemExit(f"--resume {cfg.out}.dcp: {'; '.join(conflicts)}. Fix: repeat the run's "
                         f"own flags")
    changed = [f"{flag(k)} {getattr(cfg, k)} (was {v})" for k, v in run.items()
               if k not in RESUME_FREE and hasattr(cfg, k) and getattr(cfg, k) != v]
    before = meta.get("written_by_processes", 1) * run.get("grad_accum", 1)
    if world * cfg.grad_accum != before:
        changed.append(f"processes x --grad-accum {world} x {cfg.grad_accum} (was {before} in all: "
                       f"other micro-batches, other padding)")
    if changed:
        print(f"note: resuming with other settings than the run's: {', '.join(changed)}; the "
              f"continuation will not match an uninterrupted run")


class FolderRun:
    """What a Stage I and a Stage II run on a LLaDA-V / ReDiff folder share (check_flags passed):
    the memory plan printed before any weight is loaded, the captions, then (load) the folder, its
    caption data and the optimizer; the training state on disk, the closing lines and the export.
    """

    def __init__(self, cfg, ctx, objective: str):
        self.cfg, self.ctx, self.state = cfg, ctx, cfg.out.rstrip("/") + ".dcp"
        self.plan = check_memory(cfg, ctx)  # before any weight is loaded
        self.captions, self.pairs = load_captions(cfg, objective)

    def load(self, answer_len: int) -> dict | None:
        """Load the folder, build the caption data, the replacement tokens of Stage I (every id
        that is not special, drawn on the CPU) and the optimizer -> --resume's meta.json (None)."""
        cfg, ctx = self.cfg, self.ctx
        print(show_config(cfg))
        model, tokenizer = load_llada_v(cfg.init_from, ctx.device, MASTER_DTYPES[cfg.master_dtype])
        self.model, self.tokenizer = model, tokenizer
        self.data = CaptionData(self.captions, self.pairs, model, tokenizer, answer_len, cfg.seed)
        special, vocab = set(tokenizer.special_ids), tokenizer.tok.get_vocab_size()
        self.ordinary = torch.tensor([i for i in range(min(vocab, model.cfg.lm.vocab_size))
                                      if i not in special])
        self.train_model, self.params, self.optimizer = prepare_training(model, ctx, cfg)
        self.autocast = autocast_for(cfg, ctx)
        return self.load_state() if cfg.resume else None

    def load_state(self) -> dict:
        """--resume: weights and Adam state from OUT.dcp (resharded to this run's processes) ->
        its meta.json."""
        try:
            meta = distributed.load_dcp_weights(self.state, self.model)
            distributed.load_dcp_optimizer(self.state, self.model, self.optimizer)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"--resume: {err}. Fix: point --out at a run of this script") from None
        self.tensor_rates()
        return meta

    def tensor_rates(self) -> None:
        """torchao keeps learning rates in tensors (train_stage1.set_learning_rate fills them);
        OUT.dcp holds them as numbers."""
        if self.cfg.optimizer == "adamw8bit":
            for group in self.optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]))

    def save_state(self, meta: dict) -> None:
        """distributed.save_dcp at OUT.dcp, learning rates as numbers (--no-save: nothing)."""
        if self.cfg.save:
            for group in self.optimizer.param_groups:
                group["lr"] = float(group["lr"])
            distributed.save_dcp(self.state, self.model, self.optimizer, meta, self.ctx)
            self.tensor_rates()

    def close(self, done: str, meta: dict | None) -> None:
        """Say what the data cut and the peak memory (CUDA: beside the plan's total); export --out
        with meta (None: the run is not over)."""
        cfg, device = self.cfg, self.ctx.device
        self.data.warn()
        if device.type == "cuda":
            print(f"peak memory allocated {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB "
                  f"(reserved {torch.cuda.max_memory_reserved(device) / GIB:.2f} GiB); the plan "
                  f"said {self.plan.total / GIB:.2f} GiB")
        if not cfg.save:
            print(f"{done}; nothing written (--no-save)")
        elif meta is None:
            print(f"{done}; training state {self.state}")
        else:
            export_hf(cfg.out, self.model, self.ctx, cfg.init_from, MASTER_DTYPES[cfg.save_dtype],
                      cfg.shard_gb, meta)
            print(f"{done}; Hugging Face folder {cfg.out} (sample.py --ckpt {cfg.out} --image "
                  f"PHOTO), training state {self.state}")

# --------------------------------------------------------------------------------------------------
# Stage I: Eq. 1 and Eq. 2-3 on caption batches, the pieces train_stage1.py's loop calls


def corrupt(batch, cfg, ordinary, generator) -> dict:
    """Eq. 1's masks (--objective mask) or Section 3.2's masks, syntax errors and hallucinations
    (revision; a pair's wrong span on visible tokens), drawn on the whole global batch's answers
    (B, A) on the CPU: the same draws in any number of processes, with any padding. -> {"inputs":
    (B, A), "p": (B,), and "is_masked" (mask) or "types" (revision): (B, A)}."""
    answer_mask = torch.ones_like(batch.answers, dtype=torch.bool)                  # (B, A)
    if cfg.objective == "mask":
        inputs, is_masked, p = rediff.forward_mask(batch.answers, answer_mask, MASK_ID,
                                                   generator=generator)
        return {"inputs": inputs, "is_masked": is_masked, "p": p}
    inputs, _, types, p = rediff.corrupt_for_revision(
        batch.answers, answer_mask, MASK_ID, ordinary, cfg.replace_prob, cfg.t_dependent,
        batch.wrong, batch.wrong_span, generator=generator)
    return {"inputs": inputs, "types": types, "p": p}


def rows_loss(model, data: CaptionData, batch, noisy: dict, rows: slice, cfg,
              device) -> tuple[torch.Tensor, dict]:
    """The loss of rows `rows` of the global batch (a micro-batch of this process) -> (loss, {part:
    value}). Per-row means (Eq. 1: each sample's sum over its answer length; Eq. 2-3: each type's
    mean in each row), averaged over the rows: equal micro-batches average to the whole batch's
    loss."""
    part = data.batch_rows(batch, noisy["inputs"], rows).to(device)
    logits = answer_logits(model, part)                                             # (b, A, V)
    targets, p = batch.answers[rows].to(device), noisy["p"][rows].to(device)
    if cfg.objective == "mask":
        is_masked = noisy["is_masked"][rows].to(device)
        everywhere = torch.ones_like(is_masked)                                     # (b, A)
        loss = rediff.masked_diffusion_loss(logits, targets, is_masked, p, everywhere)
        return loss, {"mask": loss}
    return rediff.typed_losses(logits, targets, noisy["types"][rows].to(device), p)


class Stage1Run(FolderRun):
    """A Stage I run on a LLaDA-V / ReDiff folder, set up for train_stage1's loop (--steps 0: one
    pass over the captions), with --resume the state of OUT.dcp loaded. The loop calls batch,
    backward, evaluate, save and finish (as it does shapes_train.ShapesRun's)."""
    draw_device = "cpu"  # masks and corruptions are drawn on the CPU (any padding, any processes)

    def __init__(self, cfg, ctx):
        self.micro = micro_batches(cfg.batch_size, ctx, cfg.grad_accum)  # refuses an uneven batch
        super().__init__(cfg, ctx, cfg.objective)
        cfg.steps = cfg.steps or math.ceil(len(self.captions) / cfg.batch_size)
        cfg.warmup = cfg.warmup if cfg.warmup >= 0 else max(1, round(WARMUP_FRAC * cfg.steps))
        meta = self.load(cfg.answer_len)
        self.start_step, self.history = (meta["step"], meta["history"]) if meta else (0, [])
        if meta:
            check_resume(cfg, meta, ctx.world)
            print(f"resumed {self.state} at step {self.start_step}")

    def batch(self, step: int):
        """The global batch of `step` (data.captions.Batch)."""
        frac = self.cfg.hallucination_frac if self.cfg.objective == "revision" else 0.0
        return self.data.batch(step, self.cfg.batch_size, frac)

    def backward(self, batch, generator) -> tuple[torch.Tensor, dict]:
        """Draw the batch's corruptions, run this process's micro-batches forward and backward ->
        (this process's loss, parts)."""
        noisy = corrupt(batch, self.cfg, self.ordinary, generator)

        def loss_of(rows):
            return rows_loss(self.train_model, self.data, batch, noisy, rows, self.cfg,
                             self.ctx.device)
        return accumulate(self.train_model, self.ctx, self.micro, self.autocast, loss_of)

    def evaluate(self, step: int, loss: torch.Tensor, parts: dict) -> dict:
        """The history entry of `step`: the whole batch's loss and its parts."""
        entry = {"step": step, "train_loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items()
                                                   if k != "step"))
        return entry

    def meta(self, step: int) -> dict:
        return {"stage": "llada-v-stage1-" + self.cfg.objective, "step": step,
                "train_config": asdict(self.cfg), "history": self.history}

    def save(self, step: int) -> None:
        self.save_state(self.meta(step))

    def finish(self, step: int) -> None:
        last = self.history[-1]["train_loss"] if self.history else float("nan")
        self.close(f"done: {step} steps, last loss {last:.4f}",
                   self.meta(step) if step >= self.cfg.steps else None)

# --------------------------------------------------------------------------------------------------
# Stage II: the pieces train_stage2.py's rounds call

DRAFT_STREAM = 2      # take() streams: 0 and 1 are the Stage I captions and pairs (the mix), 2 the
PICK_STREAM = 1000    # drafts, PICK_STREAM + round the order a round's corrected drafts train in


def expert_image(path: str):
    """What the expert is sent: a JPEG or PNG file's own bytes; any other format decoded (then sent
    as PNG)."""
    with open(path, "rb") as f:
        data = f.read()
    return (data if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"
            else open_image(path))


def in_context(review, draft: dict, tokenizer, counts: Counter):
    """The expert's rules that need the draft's text (experts.validate_pairs checks the rest on
    ids): org occurs exactly once in it (else rejected_absent / rejected_repeated); a byte-level
    BPE spells " red" otherwise than "red": when only the spaced spelling is in the draft's ids,
    org and target get the leading space the text had."""
    if not isinstance(review, list):
        return review
    ids, kept = draft["ids"].tolist(), []
    for pair in review:
        if isinstance(pair, dict) and isinstance(pair.get("org"), str) \
                and isinstance(pair.get("target"), str) and pair["org"].strip():
            org, target, n = pair["org"], pair["target"], draft["text"].count(pair["org"])
            if n != 1:
                counts["pairs_proposed"] += 1
                counts["rejected_" + ("absent" if n == 0 else "repeated")] += 1
                continue
            if (not org.startswith(" ") and not occurrences(ids, tokenizer.encode(org))
                    and occurrences(ids, tokenizer.encode(" " + org))):
                pair = {"org": " " + org,
                        "target": target if target.startswith(" ") else " " + target}
        kept.append(pair)
    return kept


@dataclass
class Eq4Batch:
    """A global batch of corrected drafts at the level of their answers (G tokens each)."""
    samples: list               # B samples: image_path, prompt, ids (the draft), refined, mistake
    drafts: torch.Tensor        # (B, G) the model's own drafts: the input (no masking)
    refined: torch.Tensor       # (B, G) the same with the expert's corrections applied
    mistake: torch.Tensor       # (B, G) bool: the corrected segments (Eq. 4 scores these only)


def eq4_batch(samples: list[dict], picks: list[int]) -> Eq4Batch:
    """Samples `picks` as one global batch."""
    chosen = [samples[k] for k in picks]
    stack = lambda key: torch.stack([torch.as_tensor(s[key]) for s in chosen])  # noqa: E731 (B, G)
    return Eq4Batch(chosen, stack("ids"), stack("refined"), stack("mistake"))


def eq4_loss(model, data: CaptionData, batch: Eq4Batch, rows: slice, device):
    """Eq. 4 on rows `rows` of the global batch (a micro-batch of this process): a mean over drafts,
    each its own mean over its corrected positions (every draft here has a correction), so equal
    micro-batches average to the whole batch's loss. The input is the draft itself after its
    prompt; logits at the draft's positions only (llada_v.answer_logits)."""
    chosen = batch.samples[rows]
    part = data.rows(chosen, [s["prompt"] for s in chosen], batch.drafts[rows]).to(device)
    logits = answer_logits(model, part)                                             # (b, G, V)
    refined, mistake = batch.refined[rows].to(device), batch.mistake[rows].to(device)  # (b, G)
    return rediff.refinement_loss(logits, refined, mistake)


def load_recorded(cfg) -> list[dict]:
    """--drafts-json: ReDiff's Stage II records (data.loaders.load_llava_json: "wrong" holds the
    model's draft, "revise" its corrections, "caption" the corrected answer); records without
    corrections (nothing to learn with Eq. 4) are left out and counted."""
    root = cfg.image_root or os.path.dirname(os.path.abspath(cfg.drafts_json))
    try:
        records, stats = load_llava_json(cfg.drafts_json, root, cfg.skip_missing, cfg.skip_bad)
    except (DataError, FileNotFoundError) as err:
        raise SystemExit(f"--drafts-json {cfg.drafts_json}: {err}") from None
    recorded = [r for r in records if "revise" in r]
    if not recorded:
        raise SystemExit(f"--drafts-json {cfg.drafts_json}: no record with \"revise\" "
                         f"corrections ({stats}); give ReDiff's Stage II records")
    print(f"{len(recorded)} recorded drafts with corrections ({len(records) - len(recorded)} "
          f"without, skipped {stats})")
    return recorded


class RecordedCorrections(Expert):
    """The expert of recorded drafts: each draft's answer is its record's own "revise" list,
    carried in the draft's "scene" (what the oracle expert knows of a shapes-world draft)."""
    name = "records"

    def review_one(self, item):
        self.counts["recorded"] += 1
        return list(item.scene)


class Stage2Run(FolderRun):
    """A Stage II run on a LLaDA-V / ReDiff folder (one optimizer over all rounds): each round
    drafts the next --drafts-per-round images with the current model (draft_items, caption, draft;
    one block of --gen-length, the official sampler's rules), an expert reviews them (image_of,
    in_context), Eq. 4 trains on the corrected segments with --stage1-mix of Stage I rows
    (start_round, backward), end_round keeps the state. --drafts-json: recorded drafts instead."""

    def __init__(self, cfg, ctx):
        self.mix = mix_settings(cfg.init_from)
        self.n_mix = round(cfg.batch_size * cfg.stage1_mix)
        self.n_own = cfg.batch_size - self.n_mix
        self.own_micro = micro_batches(self.n_own, ctx, cfg.grad_accum)  # refuses an uneven split
        self.mix_micro = (micro_batches(self.n_mix, ctx, cfg.grad_accum) if self.n_mix
                          else [None] * cfg.grad_accum)
        super().__init__(cfg, ctx, self.mix.objective)
        self.recorded = load_recorded(cfg) if cfg.drafts_json else []
        self.expert = RecordedCorrections() if self.recorded else None  # else --expert's
        print(f"Stage I mix: {cfg.stage1_mix:.0%} of each batch, {asdict(self.mix)}")
        meta = self.load(self.mix.answer_len)
        self.first_round, self.step, self.history = 0, 0, []
        if meta:
            if "round" not in meta:
                raise SystemExit(f"--resume: {self.state} holds a {meta.get('stage')!r} run, not "
                                 f"Stage II; start Stage II from its export with --init-from")
            check_resume(cfg, meta, ctx.world)
            self.first_round, self.step, self.history = meta["round"], meta["step"], meta["history"]
            print(f"resumed {self.state} after round {self.first_round}")

    # drafting: make_drafts captions draft_items, those of one speed and "group" together
    def drafting_model(self):
        """The model that drafts, in eval mode: the model itself (recorded drafts: unused), but
        under FSDP2 one replica in the compute dtype built parameter by parameter from the gathered
        shards (the peak: that replica and one gathered tensor, never a float32 state dict beside
        a float32 replica, 67 GB for 8B). Every rank calls it (the gathers are collectives)."""
        model, ctx = self.model, self.ctx
        if self.recorded or ctx.mode != "fsdp":
            return model.eval()
        dtype = distributed.resolve_dtype(self.cfg.param_dtype, ctx.device)
        # fully_shard subclasses the model: the replica is of the model's own class
        cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            replica = cls(model.cfg)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # one at a time
            owner, _, attr = name.rpartition(".")
            module = replica.get_submodule(owner)
            value = full.detach().to(ctx.device, dtype if full.is_floating_point() else full.dtype)
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
            del full
        return replica.eval()

    def draft_items(self, round_index: int, n: int) -> list[dict]:
        """The next n records of a shuffled pass over the captions (or the recorded drafts), with
        their prompts; a group is one prompt length (rows whose image placeholders line up)."""
        records = take(self.recorded or self.captions, self.cfg.seed, DRAFT_STREAM,
                       round_index * n, n)
        prompts = [self.data.prompt(r) for r in records]
        return [dict(r, prompt_ids=p, group=len(p)) for r, p in zip(records, prompts)]

    def caption(self, model, items: list[dict], speed: int) -> torch.Tensor:
        """Draft answers (b, G) of items with one prompt length: the refining sampler, one block,
        greedy, with the official sampler's rules (llada_v.generate_answer); or the recorded
        drafts' own answers."""
        length = self.cfg.gen_length
        if self.recorded:
            return torch.tensor([self.data.answer(self.tokenizer.encode(item["wrong"]), False,
                                                  length) for item in items])
        images = anyres_images(model, [item["image_path"] for item in items])
        prompt = torch.tensor([item["prompt_ids"] for item in items], device=self.ctx.device)
        with autocast_for(self.cfg, self.ctx, drafting=True):
            embeds = model.embed_views(*images)                                     # (b, N, D)
            out, _ = generate_answer(model, embeds, prompt, length, math.ceil(length / speed))
        return out                                                                  # (b, G)

    def draft(self, item: dict, ids: torch.Tensor, speed: int) -> dict:
        """A draft's record; its text cut at the first end of turn / end of text (as
        llada_v.caption), a recorded draft's corrections as its "scene" (RecordedCorrections)."""
        answer = ids.tolist()
        cut = min([answer.index(s) for s in self.tokenizer.stop_ids if s in answer] + [len(answer)])
        return {"image_path": item["image_path"], "truth": item["caption"],
                "prompt": item["prompt_ids"], "tokens_per_step": speed, "ids": ids,
                "text": self.tokenizer.decode(answer[:cut]).strip(), "image": None,
                "scene": item.get("revise")}

    def image_of(self, draft: dict):
        """The image an LLM expert sees, read from disk when its review is asked for."""
        return (expert_image(draft["image_path"])
                if self.cfg.expert == "openai" and self.expert is None else None)

    def in_context(self, reviews: list, drafts: list, counts: Counter) -> list:
        return [in_context(rv, d, self.tokenizer, counts) for rv, d in zip(reviews, drafts)]

    # fine-tuning
    def start_round(self, samples: list, round_index: int) -> tuple[int, int]:
        """(steps, warm-up steps) of a round: --steps, or one pass over its corrected drafts."""
        steps = self.cfg.steps or math.ceil(len(samples) / self.n_own)
        warmup = self.cfg.warmup if self.cfg.warmup >= 0 else max(1, round(WARMUP_FRAC * steps))
        self.model.train()  # after drafting in eval mode
        return steps, warmup

    def backward(self, samples: list, round_index: int, i: int) -> tuple[torch.Tensor, dict]:
        """Step i of a round: the own-draft rows (Eq. 4) and the Stage I rows of the mix (Eq. 2-3
        or Eq. 1), this process's rows of each in --grad-accum micro-batches, forward and backward
        -> (this process's loss, parts): each part weighted by its share of the batch."""
        cfg, step = self.cfg, self.step + i
        picks = take(list(range(len(samples))), cfg.seed, PICK_STREAM + round_index,
                     i * self.n_own, self.n_own)  # passes over them
        batch = eq4_batch(samples, picks)
        if self.n_mix:
            mix = self.data.batch(step, self.n_mix, self.mix.hallucination_frac)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            noisy = corrupt(mix, self.mix, self.ordinary, generator)

        def loss_of(rows):
            own_rows, mix_rows = rows
            own = eq4_loss(self.train_model, self.data, batch, own_rows, self.ctx.device)
            if not self.n_mix:
                return own, {"refine": own}
            stage1, _ = rows_loss(self.train_model, self.data, mix, noisy, mix_rows, self.mix,
                                  self.ctx.device)
            total = (self.n_own * own + self.n_mix * stage1) / cfg.batch_size
            return total, {"refine": own, "stage1": stage1}
        micro = list(zip(self.own_micro, self.mix_micro))
        return accumulate(self.train_model, self.ctx, micro, self.autocast, loss_of)

    def end_round(self, r: int, drafts, counts: Counter, samples, losses, expert_name: str):
        """The round's statistics and history entry, the training state, and after the last
        round the export (--out)."""
        cfg, tag = self.cfg, f"round {r + 1}/{self.cfg.rounds}"
        mistakes = sum(int(s["mistake"].sum()) for s in samples)
        self.history.append({"round": r + 1, "step": self.step, "drafts": len(drafts),
                             "samples": len(samples), "expert": dict(counts), "losses": losses,
                             "mistake_tokens": mistakes})
        speeds = Counter(d["tokens_per_step"] for d in drafts)
        speeds = ", ".join(f"{s} tok/step {n}" for s, n in sorted(speeds.items()))
        answers = {"right": counts["right"], **dict(sorted(counts.items()))}  # right first
        answers = ", ".join(f"{k} {v}" for k, v in answers.items())
        print(f"{tag} | drafts {len(drafts)} ({speeds})\n{tag} | expert {expert_name}: {answers}"
              f"\n{tag} | {len(samples)} drafts to train on, {mistakes} mistake tokens")
        if samples:
            print(f"  example draft: {samples[0]['text'][:300]!r}; its pairs (kept or not): "
                  f"{samples[0]['pairs']!r:.300}")
        if losses:
            last = ", ".join(f"{k} {v:.4f}" for k, v in losses[-1].items() if k != "step")
            print(f"{tag} | {len(losses)} steps, total loss {losses[0]['total']:.4f} -> {last}")
        meta = {"stage": "llada-v-stage2", "round": r + 1, "step": self.step,
                "train_config": asdict(cfg), "stage1_config": asdict(self.mix),
                "history": self.history}
        self.save_state(meta)
        if r + 1 == cfg.rounds:
            self.close(f"done: {cfg.rounds} round(s), {self.step} steps", meta)
