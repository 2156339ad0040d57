"""finetune_llada_v.py: fine-tune a Hugging Face LLaDA-V / ReDiff folder on real caption data with the masked-diffusion
objective (Eq. 1) or ReDiff's Stage I foundational revision (Eq. 2-3), in one process or under torchrun (DDP / FSDP2).

    python finetune_llada_v.py --hf-model LLaDA-V --data-json captions.json --image-root images --out out/rediff-s1
    torchrun --nproc_per_node 8 finetune_llada_v.py --parallel fsdp --activation-checkpointing --hf-model LLaDA-V \\
        --data-json captions.json --image-root images --vicrit-jsonl vicrit.jsonl --batch-size 32 --out out/rediff-s1
    python sample.py --ckpt out/rediff-s1 --image photo.jpg --tokens-per-step 4

What it writes:
  --out   a Hugging Face folder in LLaDA-V's own layout (the source folder's config.json, tokenizer.json and other small
          files; safetensors shards under the checkpoint's key names; model.safetensors.index.json), which
          llada_v.load_llada_v and sample.py --ckpt read. Written at the end, beside and then swapped in.
  --dcp   the resumable training state (weights, Adam, step, loss history): a sharded DCP folder (distributed.py),
          every --save-every steps, at --stop-at and at the end. --resume continues it with any number of processes.

A row of a batch: the LLaDA chat prompt (one placeholder per image token, their number from the image's anyres
layout, then the question), the answer (caption, <|eot_id|>, then <|endoftext|> up to --answer-len: LLaDA trains on
that padding), then <|endoftext|> up to the longest row of the global batch (visible, never masked or scored). Only
the answer is masked, corrupted and scored. The vision tower stays frozen; projector, image_newline and LM train.
The rules for several processes are distributed.py's: every rank builds the token ids of the whole global batch and
draws its masks (one process's draws), decodes the images of its own rows only, and runs the model on them.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import distributed
import rediff
from cli import check_folder_out, option, parse_config, run_main, show_config
from data.loaders import DataError, load_llava_json, load_vicrit_jsonl, open_image
from llada_v import CAPTION_QUESTION, EOS_ID, EOT_ID, MASK_ID, checkpoint_names, load_llada_v, prompt_ids
from sample import check_hf_folder
from train_stage1 import warmup_cosine

STATE_FILE = "finetune_state.json"  # in --out: step, settings and loss history (not meta.json: that marks DCP folders)


@dataclass
class FinetuneConfig:
    hf_model: str = option("", "required: a Hugging Face LLaDA-V / ReDiff folder (config.json, tokenizer.json, "
                           "safetensors shards), e.g. from huggingface-cli download GSAI-ML/LLaDA-V --local-dir DIR")
    data_json: str = option("", "required: LLaVA / ShareGPT4V conversation JSON; the first human turn is the "
                            "question, the first assistant turn after it the reference caption")
    image_root: str = option("", "folder the data's image paths are relative to (empty: the folder of --data-json)")
    vicrit_jsonl: str = option("", "--objective revision: ViCrit-style hallucination pairs (JSONL with image, caption, "
                               "hallucinated); a pair is kept when both captions have the same token count")
    skip_missing: bool = option(False, "skip (and count) records whose image file is missing instead of stopping")
    skip_bad: bool = option(False, "skip (and count) malformed records instead of stopping")
    objective: str = option("revision", "revision: Stage I typed losses (Eq. 2-3); mask: plain masked diffusion "
                            "(Eq. 1, the mask-trained baseline)", choices=["revision", "mask"])
    replace_prob: float = option(0.1, "Stage I: chance that a visible answer token is replaced by a random ordinary "
                                 "token (paper 0.1, official code 0.05)", at_least=0, at_most=1)
    t_dependent: bool = option(False, "Stage I: replacement rate min(t, replace_prob) instead of fixed (Table 5)")
    hallucination_frac: float = option(0.25, "Stage I with --vicrit-jsonl: share of each batch that is ViCrit pairs",
                                       at_least=0, at_most=1)
    answer_len: int = option(128, "answer tokens per row: caption, <|eot_id|>, <|endoftext|> padding (longer "
                             "captions are cut and counted); the paper generates 128", at_least=2)
    out: str = option("out/llada-v-stage1", "Hugging Face folder to write at the end (sample.py --ckpt reads it)")
    dcp: str = option("", "training-state folder (DCP) for --resume; empty: --out with .dcp added")
    save_every: int = option(500, "steps between training-state saves to --dcp", at_least=1)
    stop_at: int = option(0, "stop (with a --dcp save) after this step, as an interruption would; 0: run to --steps",
                          at_least=0)
    resume: bool = option(False, "continue the run saved at --dcp: weights, optimizer, schedule and data position")
    steps: int = option(0, "optimizer steps; 0: one pass over the captions of --data-json (the paper: 1 epoch)",
                        at_least=0)
    batch_size: int = option(32, "samples per step, all processes together (a multiple of their number)",
                             at_least=1)
    lr: float = option(5e-6, "peak learning rate (AdamW; the paper's 5e-6)", more_than=0)
    min_lr_frac: float = option(0.0, "the cosine schedule ends at lr * min_lr_frac",
                                at_least=0, at_most=1)
    warmup_frac: float = option(0.03, "share of the steps spent in linear warm-up (the paper: 3 percent)",
                                at_least=0, at_most=1)
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = option(1.0, "gradient-norm clip", more_than=0)
    seed: int = option(0, "seed for the data order, masks and corruptions", at_least=0)
    device: str = option("auto", "auto (cuda, mps, cpu), cpu, cuda or mps")
    parallel: str = option("auto", "several processes (torchrun --nproc_per_node N): ddp (a full replica per rank) or "
                           "fsdp (FSDP2: parameters, gradients and Adam states sharded); auto: ddp under torchrun, "
                           "none otherwise", choices=["auto", "none", "ddp", "fsdp"])
    param_dtype: str = option("auto", "compute dtype (master weights and Adam stay float32): auto = bfloat16 on CUDA "
                              "(fsdp: gathered parameters; none / ddp: autocast), float32 elsewhere",
                              choices=["auto", "bfloat16", "float32"])
    activation_checkpointing: bool = option(False, "recompute each transformer block's activations in the backward "
                                            "pass (less memory, about 1/3 more compute)")
    save_dtype: str = option("bfloat16", "dtype of the --out shards: bfloat16 (the released checkpoints' own) or "
                             "float32 (exactly the trained weights)", choices=["bfloat16", "float32"])
    shard_gb: float = option(5.0, "largest --out shard in GB", more_than=0)


# ----------------------------------------------------------------------------------------------------------------
# Data: a fixed global order, batches of token ids for all rows and image views for this rank's rows


@functools.lru_cache(maxsize=4)
def shuffled(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def take(records: list, seed: int, stream: int, start: int, count: int) -> list:
    """Items start .. start + count - 1 of an endless sequence of shuffled passes over `records`."""
    return [records[shuffled(len(records), seed, stream, pos // len(records))[pos % len(records)]]
            for pos in range(start, start + count)]


@dataclass
class Batch:
    ids: torch.Tensor           # (B, L) prompt (placeholders), answer, <|endoftext|> padding: the whole global batch
    answer_mask: torch.Tensor   # (B, L) bool
    wrong_ids: torch.Tensor     # (B, L) ids with the hallucinated answer of ViCrit rows
    wrong_span: torch.Tensor    # (B, L) bool: where wrong_ids differ
    start: int                  # first answer position of any row: logits are computed from here on
    views: torch.Tensor         # (sum n, 3, S, S): the anyres views of THIS rank's rows' images
    sizes: list                 # their (width, height)

    def to(self, device):
        move = lambda t: t.to(device)  # noqa: E731
        return Batch(move(self.ids), move(self.answer_mask), move(self.wrong_ids), move(self.wrong_span), self.start,
                     move(self.views), self.sizes)


class CaptionData:
    """Step s takes the next batch_size - k captions of an endless sequence of shuffled passes, and k =
    round(hallucination_frac x batch_size) ViCrit pairs from a second one: a batch depends only on (seed, step)."""

    def __init__(self, captions: list, pairs: list, model, tokenizer, cfg: FinetuneConfig):
        self.captions, self.model, self.tokenizer, self.cfg = captions, model, tokenizer, cfg
        self.stats = {"captions_cut": 0, "pairs_dropped_token_counts_differ": 0}
        self.pairs = []
        for record in pairs:  # tokenised once: a pair is usable when both captions have the same token count
            right, wrong = tokenizer.encode(record["caption"]), tokenizer.encode(record["wrong"])
            if len(right) == len(wrong):
                self.pairs.append(dict(record, ids=right, wrong_ids=wrong))
            else:
                self.stats["pairs_dropped_token_counts_differ"] += 1
        self.sizes: dict[str, tuple] = {}

    def image_size(self, path: str) -> tuple[int, int]:
        """(width, height) from the file header (no decoding): every rank needs it for every row's placeholders."""
        if path not in self.sizes:
            try:
                with Image.open(path) as im:
                    self.sizes[path] = im.size
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot read the image header ({err}); replace the file or remove its "
                                f"record") from None
        return self.sizes[path]

    def answer(self, ids: list[int], count: bool = True) -> list[int]:
        """Caption ids -> exactly answer_len ids: caption, <|eot_id|>, <|endoftext|> padding; a longer caption is cut
        (no end of turn: it did not end)."""
        n = self.cfg.answer_len
        if len(ids) >= n:
            self.stats["captions_cut"] += count
            return ids[:n]
        return ids + [EOT_ID] + [EOS_ID] * (n - len(ids) - 1)

    def records(self, step: int, batch_size: int) -> list[dict]:
        k = round(self.cfg.hallucination_frac * batch_size) if self.pairs else 0
        return (take(self.captions, self.cfg.seed, 0, step * (batch_size - k), batch_size - k)
                + take(self.pairs, self.cfg.seed, 1, step * k, k))

    def batch(self, step: int, batch_size: int, rows: slice) -> Batch:
        records = self.records(step, batch_size)
        prompts, answers, wrongs = [], [], []
        for r in records:
            n_image = self.model.n_image_tokens(self.image_size(r["image_path"]))
            prompts.append(prompt_ids(self.tokenizer, n_image, r.get("prompt") or CAPTION_QUESTION))
            answers.append(self.answer(r["ids"] if "ids" in r else self.tokenizer.encode(r["caption"])))
            wrongs.append(self.answer(r["wrong_ids"], count=False) if "wrong_ids" in r else answers[-1])
        (ids, wrong_ids), answer_mask, start = right_padded(prompts, answers, wrongs)
        views, sizes = image_views(self.model, [r["image_path"] for r in records[rows]])  # this rank's rows only
        return Batch(ids, answer_mask, wrong_ids, wrong_ids != ids, start, views, sizes)


def right_padded(prompts: list, *answer_lists: list) -> tuple[list, torch.Tensor, int]:
    """Rows of prompt + answer with <|endoftext|> on the right up to the longest row: one (B, L) tensor per list of
    answers (lists or tensors; row b of each holds prompts[b], then that list's answer b; the answers of one row have
    the same length), the answer mask (B, L) and the first answer position of any row (logits are needed from there
    on)."""
    L = max(len(p) + len(a) for p, a in zip(prompts, answer_lists[0]))
    rows = [torch.full((len(prompts), L), EOS_ID) for _ in answer_lists]                 # each (B, L)
    answer_mask = torch.zeros(len(prompts), L, dtype=torch.bool)                         # (B, L)
    for b, prompt in enumerate(prompts):
        P, A = len(prompt), len(answer_lists[0][b])
        for ids, answers in zip(rows, answer_lists):
            ids[b, :P], ids[b, P:P + A] = torch.tensor(prompt), torch.as_tensor(answers[b])
        answer_mask[b, P:P + A] = True
    return rows, answer_mask, min(len(p) for p in prompts)


def image_views(model, paths: list) -> tuple[torch.Tensor, list]:
    """Decode image files -> (their anyres views concatenated (sum n, 3, S, S), their (width, height))."""
    images = [open_image(path) for path in paths]
    return torch.cat([model.image_views(im) for im in images]), [im.size for im in images]


def load_data(cfg: FinetuneConfig) -> tuple[list, list]:
    root = cfg.image_root or os.path.dirname(os.path.abspath(cfg.data_json))
    try:
        captions, stats = load_llava_json(cfg.data_json, root, cfg.skip_missing, cfg.skip_bad)
        pairs, pair_stats = (load_vicrit_jsonl(cfg.vicrit_jsonl, root, cfg.skip_missing, cfg.skip_bad)
                             if cfg.vicrit_jsonl else ([], {}))
    except DataError as err:
        # the loaders name their keyword arguments; here they are flags
        raise SystemExit(str(err).replace("skip_missing=True", "--skip-missing").replace("skip_bad=True", "--skip-bad")
                         .replace("allow_outside_root=True", "an --image-root that holds it")) from None
    except FileNotFoundError as err:
        raise SystemExit(f"{err.filename}: file not found; check --data-json / --vicrit-jsonl") from None
    if not captions:
        raise SystemExit(f"{cfg.data_json}: no usable caption record ({stats}); fix the data or --image-root")
    print(f"{len(captions)} captions (skipped {stats}), {len(pairs)} hallucination pairs (skipped {pair_stats})")
    return captions, pairs

# ----------------------------------------------------------------------------------------------------------------
# Loss, schedule, checkpoints


def training_loss(model, batch: Batch, cfg: FinetuneConfig, ctx, ordinary_ids, generator):
    """The global batch's loss on this rank's rows -> (loss, {part: value}), by train_stage1.training_loss's rules:
    masks and corruptions drawn for the whole batch, the model run on this rank's rows, the loss normalised so that
    its mean over ranks is the whole batch's (Eq. 1: per-sample mean; Eq. 2-3: global type counts)."""
    rows, s = ctx.rows(len(batch.ids)), batch.start
    targets = batch.ids.clamp(min=0)  # image placeholders (-200) are never scored, but cross_entropy needs an id

    def logits(inputs):                                                                  # (b, L - s, V)
        return model(inputs[rows], views=batch.views, image_sizes=batch.sizes, logits_from=s)
    if cfg.objective == "mask":
        noisy, is_masked, p = rediff.forward_mask(batch.ids, batch.answer_mask, MASK_ID, generator=generator)
        loss = rediff.masked_diffusion_loss(logits(noisy), targets[rows, s:], is_masked[rows, s:], p[rows],
                                            batch.answer_mask[rows, s:])
        return loss, {"mask": loss}
    inputs, _, types, p = rediff.corrupt_for_revision(
        batch.ids, batch.answer_mask, MASK_ID, ordinary_ids, cfg.replace_prob, cfg.t_dependent, batch.wrong_ids,
        batch.wrong_span, generator=generator)
    counts = {name: ctx.count(types == t) for t, name in rediff.TYPE_NAMES.items()}
    return rediff.typed_losses(logits(inputs), targets[rows, s:], types[rows, s:], p[rows], counts)


def learning_rate(step: int, cfg: FinetuneConfig) -> float:
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    return warmup_cosine(step, cfg.steps, warmup, cfg.lr, cfg.min_lr_frac)


def export_hf(path: str, model, ctx, cfg: FinetuneConfig, state: dict) -> None:
    """Write the weights as a Hugging Face LLaDA-V folder (the inverse of llada_v.load_llada_v): LLaMA-style key
    names (llada_v.checkpoint_names; timm's fused qkv split back into q, k, v), shards of at most --shard-gb and
    their index, the source folder's small files (config.json, tokenizer.json, ...) and STATE_FILE. Every rank calls
    this (FSDP gathers the weights to rank 0's CPU); rank 0 writes PATH.tmp and swaps it in."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if ctx.mode == "fsdp":
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = model.state_dict()
    if ctx.is_main:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.save_dtype]
        tensors = {}
        for ours, keys in checkpoint_names(model.cfg, "llama").items():
            t = weights[ours].detach().to("cpu", dtype)
            t = t[0] if ours.endswith("pos_embed") else t                              # timm (1, g^2, Dv) -> (g^2, Dv)
            tensors.update({key: part.contiguous() for key, part in zip(keys, t.chunk(len(keys)))})
        shards, size = [[]], 0
        for key, t in tensors.items():                                                   # fill shards in key order
            if shards[-1] and size + t.nbytes > cfg.shard_gb * 1e9:
                shards, size = shards + [[]], 0
            shards[-1].append(key)
            size += t.nbytes
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in sorted(os.listdir(cfg.hf_model)):                                    # config.json, tokenizer.json..
            src = os.path.join(cfg.hf_model, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (
                    "model.safetensors.index.json", "meta.json", STATE_FILE):
                shutil.copy(src, tmp)
        weight_map = {}
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in keys})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"source": os.path.abspath(cfg.hf_model), **state}, f)
        distributed.swap_in_folder(tmp, path)
    ctx.barrier()


def check_resume(cfg: FinetuneConfig, meta: dict) -> None:
    """Refuse a resume that cannot continue the run; note settings that make it differ from an uninterrupted one."""
    run, flag = meta.get("train_config", {}), lambda k: "--" + k.replace("_", "-")  # noqa: E731
    conflicts = [f"{flag(k)} {getattr(cfg, k)} but the run used {run[k]}" for k in ("objective", "answer_len")
                 if k in run and run[k] != getattr(cfg, k)]
    if conflicts:
        raise SystemExit(f"--resume {cfg.dcp}: {'; '.join(conflicts)}. Fix: repeat the run's own flags")
    free = {"resume", "stop_at", "out", "dcp", "save_every", "device", "parallel", "activation_checkpointing",
            "param_dtype", "save_dtype", "shard_gb", "hf_model"}
    changed = [f"{flag(k)} {getattr(cfg, k)} (was {v})" for k, v in run.items()
               if k not in free and hasattr(cfg, k) and getattr(cfg, k) != v]
    if changed:
        print(f"note: resuming with other settings than the run's: {', '.join(changed)}; the continuation will not "
              f"match an uninterrupted run")


# ----------------------------------------------------------------------------------------------------------------
# Start-up pieces (finetune_llada_v_stage2.py uses them too)


def check_inputs(cfg, script: str) -> None:
    """--hf-model and --data-json are given, and the folder has config.json and tokenizer.json."""
    for name, path in (("--hf-model", cfg.hf_model), ("--data-json", cfg.data_json)):
        if not path:
            raise SystemExit(f"{name} is required (python {script} --help)")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(cfg.hf_model, name)):
            raise SystemExit(f"--hf-model {cfg.hf_model}: no {name}; give a downloaded LLaDA-V / ReDiff folder "
                             f"(huggingface-cli download GSAI-ML/LLaDA-V --local-dir DIR)")


def ordinary_ids(model, tokenizer, device) -> torch.Tensor:
    """Every id of the vocabulary that is not special: Stage I's random replacement tokens."""
    special = set(tokenizer.special_ids)
    vocab = min(tokenizer.tok.get_vocab_size(), model.cfg.lm.vocab_size)
    return torch.tensor([i for i in range(vocab) if i not in special], device=device)


def prepare_training(model, ctx, cfg):
    """Freeze the tower, wrap (DDP / FSDP2 / the model itself), build AdamW -> (train_model, params, optimizer)."""
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(False)  # frozen, as in the paper; projector, image_newline and LM train
    model.train()
    train_model = distributed.wrap(model, ctx, cfg.param_dtype, cfg.activation_checkpointing)  # DDP / FSDP2 / model
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP2 replaces them with shards
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    count = lambda ps: sum(p.numel() for p in ps) / 1e9  # noqa: E731  (a DTensor shard counts as its whole tensor)
    print(f"model {count(model.parameters()):.3f} B parameters ({count(params):.3f} B trainable) on {ctx.device}, "
          f"{ctx.world} process(es), parallel {ctx.mode}")
    return train_model, params, optimizer


def load_state(cfg, model, optimizer) -> dict:
    """--resume: weights and Adam state from --dcp (resharded to this run's processes); returns its meta.json."""
    try:
        meta = distributed.load_dcp_weights(cfg.dcp, model)
        distributed.load_dcp_optimizer(cfg.dcp, model, optimizer)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--resume: {err}. Fix: point --dcp (or --out) at a run of this script") from None
    return meta


def autocast_for(cfg, ctx):
    """bf16 autocast on CUDA without FSDP (FSDP2 casts through its MixedPrecisionPolicy instead); else nothing."""
    dtype = distributed.resolve_dtype(cfg.param_dtype, ctx.device)
    return (torch.autocast(ctx.device.type, dtype=dtype) if dtype != torch.float32 and ctx.mode != "fsdp"
            else nullcontext())

# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(FinetuneConfig, argv, description=__doc__.split("\n\n")[0])
    check_inputs(cfg, "finetune_llada_v.py")
    check_hf_folder(cfg.hf_model, "--hf-model")
    check_folder_out(cfg.out, "the Hugging Face export")
    if cfg.vicrit_jsonl and cfg.objective != "revision":
        raise SystemExit("--vicrit-jsonl feeds Stage I's hallucination term: use it with --objective revision")
    if cfg.answer_len < 2:
        raise SystemExit(f"--answer-len {cfg.answer_len}: needs at least 2 (a caption token and the end of turn)")
    cfg.dcp = cfg.dcp or cfg.out.rstrip("/") + ".dcp"
    ctx = distributed.setup(cfg.parallel, cfg.device)  # one process, or this rank of a torchrun group (and its device)
    device = ctx.device
    captions, pairs = load_data(cfg)
    model, tokenizer = load_llada_v(cfg.hf_model, device, torch.float32)  # float32 master weights
    if model.cfg.vision is None:
        raise SystemExit(f"--hf-model {cfg.hf_model} is a text-only LLaDA checkpoint: captioning needs LLaDA-V")
    data = CaptionData(captions, pairs, model, tokenizer, cfg)
    cfg.steps = cfg.steps or math.ceil(len(captions) / cfg.batch_size)
    ctx.rows(cfg.batch_size)  # refuses a batch that does not split evenly, before any work
    print(show_config(cfg))
    ordinary = ordinary_ids(model, tokenizer, device)  # replacement tokens
    train_model, params, optimizer = prepare_training(model, ctx, cfg)
    start_step, history = 0, []
    if cfg.resume:
        meta = load_state(cfg, model, optimizer)
        check_resume(cfg, meta)
        start_step, history = meta["step"], meta["history"]
        print(f"resumed {cfg.dcp} at step {start_step}")
    autocast = autocast_for(cfg, ctx)

    def save_state(step):
        distributed.save_dcp(cfg.dcp, model, optimizer, {"stage": "finetune-" + cfg.objective, "step": step,
                                                         "train_config": asdict(cfg), "history": history}, ctx)

    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=cfg.objective,
               dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        try:
            batch = data.batch(step, cfg.batch_size, ctx.rows(cfg.batch_size)).to(device)
        except DataError as err:
            raise SystemExit(f"step {step}: {err}") from None
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        with autocast:
            loss, parts = training_loss(train_model, batch, cfg, ctx, ordinary, generator)  # this rank's rows
        batch_loss, parts = ctx.mean(loss), ctx.mean(parts)  # the whole batch's values, as one process has them
        if not torch.isfinite(batch_loss):
            raise SystemExit(f"step {step}: loss is {batch_loss.item()}; stopping. The last saved state is "
                             f"{cfg.dcp} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        history.append({"step": step + 1, "loss": batch_loss.item(), **{k: v.item() for k, v in parts.items()}})
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.stop_at, cfg.steps):
            save_state(step + 1)
        if step + 1 == cfg.stop_at:
            print(f"stopped at step {step + 1} (--stop-at); continue with --resume")
            return model
    if data.stats["captions_cut"] or data.stats["pairs_dropped_token_counts_differ"]:
        print(f"warning: {data.stats['captions_cut']} caption draws cut to --answer-len (no end of turn learnt for "
              f"them); {data.stats['pairs_dropped_token_counts_differ']} ViCrit pairs dropped (token counts differ)")
    export_hf(cfg.out, model, ctx, cfg, {"step": cfg.steps, "train_config": asdict(cfg), "history": history})
    print(f"done: {cfg.steps} steps, last loss {history[-1]['loss'] if history else float('nan'):.4f}; "
          f"Hugging Face folder {cfg.out} (sample.py --ckpt {cfg.out} --image PHOTO), training state {cfg.dcp}")
    return model


if __name__ == "__main__":
    run_main(main)
